"""The settings of the loraops Serve application, and the serve config file that carries them.

A serve config (``serve/tiny.yaml``, ``serve/phi2.yaml``) is a Ray Serve config file, so Ray's own
``serve deploy`` accepts it. Its one loraops application has ``import_path:
loraops.serve.app:build_app``, and its ``args`` are the :class:`ServeSettings` below. Its
``deployments`` entries (``SummarizerModel``, ``SummarizerAPI``) carry Ray's per-deployment
options: autoscaling, resources per replica, ``max_ongoing_requests``, ``user_config``.

Errors name the key and are raised as :class:`~loraops.config.ConfigError`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from loraops.config import ConfigError, Section, apply_overrides, format_validation_error, read_yaml, resolve_workspace
from loraops.registry.refs import DEFAULT_ALIAS, normalize_ref

#: The application builder that Ray's ``serve deploy`` imports.
IMPORT_PATH = "loraops.serve.app:build_app"
MODEL_DEPLOYMENT = "SummarizerModel"
API_DEPLOYMENT = "SummarizerAPI"
DEPLOYMENTS = (MODEL_DEPLOYMENT, API_DEPLOYMENT)
#: Keys of :class:`ServeSettings` that a replica also takes from Serve's ``user_config``: changing
#: them there is a lightweight update (``reconfigure``, no replica restart).
LIVE_KEYS = ("adapter", "max_batch_size", "batch_wait_timeout_s", "registry_poll_s")


def _check_ref(value: str) -> str:
    from loraops.errors import LoraopsError

    try:
        return normalize_ref(value.strip())
    except LoraopsError as exc:
        raise ValueError(f"{exc} (expected NAME, NAME@ALIAS or NAME:VERSION)") from None


def _check_pattern(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\*?", value):
        raise ValueError(f"{value!r}: expected an adapter name or a prefix pattern like 'team-*'")
    return value


class LiveSettings(Section):
    """The part of the settings a replica applies in place, from Serve's ``user_config``."""

    adapter: str = Field(f"tiny@{DEFAULT_ALIAS}", description=f"Registry reference: NAME (= NAME@{DEFAULT_ALIAS}), NAME@ALIAS or NAME:VERSION.")
    max_batch_size: int = Field(8, ge=1, le=256, description="Most requests that share one generate call.")
    batch_wait_timeout_s: float = Field(0.02, ge=0.0, le=10.0, description="How long a batch waits to fill before it runs.")
    registry_poll_s: float = Field(
        5.0, ge=0.0, le=25.0, description="Seconds between registry checks for a moved alias (0: never; a pinned NAME:VERSION is never polled)."
    )

    @field_validator("adapter")
    @classmethod
    def _valid_ref(cls, value: str) -> str:
        return _check_ref(value)


class ServeSettings(LiveSettings):
    """The ``args`` of the loraops application in a serve config."""

    adapters: list[Annotated[str, AfterValidator(_check_ref)]] | None = Field(
        None,
        min_length=1,
        description="Registry references served at once (a request picks one with model); the first is the default and is adapter. Default: [adapter].",
    )
    max_adapters: int = Field(
        4, ge=1, le=64, description="Most references a replica serves at once: adapters plus those loaded on demand (a running canary's candidate: one more)."
    )
    load_on_demand: bool = Field(
        False,
        description="Serve any registered NAME@ALIAS or NAME:VERSION a request names, loaded on first use; a replica keeps the most "
        "recently used ones, max_adapters minus adapters (see docs/serving.md, \"Adapters on demand\").",
    )
    on_demand_names: list[Annotated[str, AfterValidator(_check_pattern)]] | None = Field(
        None, min_length=1, description="With load_on_demand: the adapter names that may be loaded, each a name or a prefix-* pattern. Default: any."
    )

    mode: Literal["nf4", "merged"] = Field(
        "merged", description="nf4: 4-bit base + unmerged adapter (least memory). merged: base dequantized, adapter merged (fast, same numerics)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="merged mode: dtype of the dequantized base; auto = the quantization compute dtype the adapter was trained with."
    )
    batching: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: requests join and leave the running batch between decode steps. static: a batch runs until all its requests end.",
    )
    batch_buckets: list[int] | None = Field(
        None, description="Batch sizes a decode step runs at (rows padded up to the next); default 1, 2, 4, ... below max_batch_size, then max_batch_size."
    )
    length_buckets: list[int] | None = Field(
        None,
        description="KV-cache lengths (prompt + new tokens) a step attends over, rounded up to the next; default 256, 512, ... below the context, then it.",
    )
    prefill_batch_size: int = Field(4, ge=1, le=256, description="Most prompts prefilled in one pass (prefill batch buckets are the batch buckets up to it).")
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Compile the decode step, one graph per bucket shape, all during warm-up. auto: merged mode on a GPU (nf4 does not compile usefully).",
    )
    default_max_new_tokens: int = Field(64, ge=1, description="Summary length in tokens when a request does not say.")
    max_new_tokens_limit: int = Field(256, ge=1, le=4096, description="The largest max_new_tokens a request may ask for.")
    max_batch_dialogues: int = Field(32, ge=1, le=1024, description="Most dialogues in one /v1/summarize/batch request.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body; bigger ones get 413.")
    context_tokens: int | None = Field(None, ge=16, description="Prompt + summary token limit; default the model's context window.")
    request_timeout_s: float = Field(300.0, gt=0.0, description="How long the API waits for the model before answering 503.")
    body_timeout_s: float = Field(
        10.0, gt=0.0, le=600.0, description="How long the API waits for a request's whole body before answering 408 (a stalled client holds an API slot)."
    )
    allow_trust_remote_code: bool = Field(
        False, description="Serve versions trained with model.trust_remote_code: true (that runs code from the model repository in every replica)."
    )
    torch_threads: int | None = Field(None, ge=1, description="torch threads per model replica; default its num_cpus (at least 1, at most the cores).")
    auth_token_env: str = Field(
        "LORAOPS_API_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Environment variable holding the bearer token; auth is on when it is set."
    )
    db_url: str | None = Field(None, description="Registry database URL; default $LORAOPS_DATABASE_URL, else the workspace's SQLite file.")
    artifact_uri: str | None = Field(None, description="Registry artifact root; default $LORAOPS_ARTIFACT_URI, else WORKSPACE/registry.")
    workspace: str | None = Field(None, description="Workspace (models, registry cache); default $LORAOPS_HOME, else ./.loraops.")

    @field_validator("batch_buckets", "length_buckets")
    @classmethod
    def _ascending(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value or value != sorted(set(value)) or value[0] < 1:
            raise ValueError(f"expected ascending positive integers without repeats, got {value}")
        return value

    @model_validator(mode="after")
    def _default_within_limit(self) -> ServeSettings:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(f"default_max_new_tokens ({self.default_max_new_tokens}) is above max_new_tokens_limit ({self.max_new_tokens_limit})")
        return self

    @model_validator(mode="after")
    def _adapter_set(self) -> ServeSettings:
        """``adapters`` defaults to ``[adapter]``; when given, ``adapter`` is its first entry (the default reference)."""
        if self.adapters is None:
            self.__dict__["adapters"] = [self.adapter]  # direct: assignment would validate the model again
            return self
        repeated = next((ref for i, ref in enumerate(self.adapters) if ref in self.adapters[:i]), None)
        if repeated:
            raise ValueError(f"adapters: {repeated} is listed twice")
        if len(self.adapters) > self.max_adapters:
            raise ValueError(f"adapters: {len(self.adapters)} references, more than max_adapters ({self.max_adapters})")
        if "adapter" in self.model_fields_set and self.adapter != self.adapters[0]:
            raise ValueError(f"adapter: {self.adapter} differs from the first of adapters ({self.adapters[0]}); set one of them")
        self.__dict__["adapter"] = self.adapters[0]
        return self

    @model_validator(mode="after")
    def _room_on_demand(self) -> ServeSettings:
        if self.load_on_demand and len(self.adapters) >= self.max_adapters:
            raise ValueError(f"load_on_demand: max_adapters ({self.max_adapters}) leaves no room next to the {len(self.adapters)} configured adapters")
        if self.on_demand_names is not None and not self.load_on_demand:
            raise ValueError("on_demand_names: set load_on_demand: true too (the list only limits what loads on demand)")
        return self

    def buckets(self, max_batch_size: int, context_tokens: int):
        """The engine's :class:`~loraops.serve.engine.buckets.Buckets`: batch buckets capped by ``max_batch_size``, length buckets by the context."""
        from loraops.serve.engine.buckets import Buckets

        over = [n for n in self.length_buckets or [] if n > context_tokens]
        if over:
            raise ConfigError(f"args.length_buckets: {over[0]} is over the context of {context_tokens} tokens")
        return Buckets.build(max_batch_size, context_tokens, self.batch_buckets, self.length_buckets, self.prefill_batch_size)

    def compiles(self, served) -> bool:
        """Whether the engine compiles its decode step for ``served``: ``on``, ``off``, or ``auto`` (merged mode on a GPU)."""
        if self.compile == "auto":
            return served.mode == "merged" and next(served.model.parameters()).device.type == "cuda"
        return self.compile == "on"

    def live(self) -> dict[str, Any]:
        """The Serve ``user_config`` of the model deployment: the settings a replica updates in place."""
        return {key: getattr(self, key) for key in LIVE_KEYS}

    def open_registry(self):
        """The :class:`~loraops.registry.Registry` these settings serve from: ``db_url``, ``artifact_uri``, ``workspace``."""
        from loraops.registry import Registry

        return Registry(db_url=self.db_url, artifact_uri=self.artifact_uri, workspace=self.workspace)

    def with_absolute_paths(self) -> ServeSettings:
        """Workspace and registry locations made absolute here: Ray workers run in another directory.

        A database URL with a password that comes from $LORAOPS_DATABASE_URL is not copied in:
        these settings become the deployments' arguments, which Serve stores with the application,
        so the replicas read the variable from their own environment instead.
        """
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        from loraops.config import artifact_uri, database_url

        workspace = resolve_workspace(self.workspace)
        db_url: str | None = database_url(self.db_url, workspace)
        try:
            secret = self.db_url is None and make_url(db_url).password is not None
        except ArgumentError:  # not a URL: the registry names the problem when it connects
            secret = False
        return self.model_copy(
            update={
                "workspace": str(workspace),
                "db_url": None if secret else _absolute_sqlite(db_url),
                "artifact_uri": _absolute_uri(artifact_uri(self.artifact_uri, workspace)),
            }
        )


def _absolute_sqlite(url: str) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url[len(prefix):] not in ("", ":memory:"):
        return prefix + str(Path(url[len(prefix):]).expanduser().resolve())
    return url


def _absolute_uri(uri: str) -> str:
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def validate_settings(args: dict[str, Any] | None, origin: str = "args") -> ServeSettings:
    """``args`` as :class:`ServeSettings`, or ConfigError naming the key."""
    try:
        return ServeSettings.model_validate(args or {})
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {format_validation_error(exc)}") from None


def validate_live(user_config: dict[str, Any] | None, base: ServeSettings) -> LiveSettings:
    """A ``user_config`` on top of the deployed settings: its keys win, missing keys keep the settings' value."""
    if user_config is not None and not isinstance(user_config, dict):
        raise ConfigError(f"user_config: expected a mapping of {', '.join(LIVE_KEYS)}, got {type(user_config).__name__}")
    try:
        return LiveSettings.model_validate(base.live() | dict(user_config or {}))
    except ValidationError as exc:
        raise ConfigError(f"user_config: {format_validation_error(exc)}") from None


# --- the serve config file ---------------------------------------------------------------------


@dataclass
class ServeConfigFile:
    """A validated serve config: the loraops application's settings and Ray options."""

    app_name: str
    route_prefix: str
    settings: ServeSettings
    #: Deployment name -> keyword arguments of ``Deployment.options`` (only the keys the file sets).
    deployment_options: dict[str, dict[str, Any]]
    http_options: dict[str, Any]
    raw: dict[str, Any]


def load_serve_config(path: str | os.PathLike, overrides: list[str] | None = None, ray_schema: bool = True) -> ServeConfigFile:
    """Read a serve config file, apply ``--set`` overrides and validate it (Ray's schema, then ours).

    Unknown keys are errors at every level (Ray's own schema ignores some, e.g. a misspelt
    ``route_prefx`` next to ``route_prefix``).

    Override keys are relative to the loraops application: ``args.KEY``,
    ``deployments.<SummarizerModel|SummarizerAPI>.KEY...``, ``http_options.KEY``, ``name``, ``route_prefix``.
    ``ray_schema=False`` skips Ray's part (and so does not import Ray): for readers of ``args`` alone,
    such as the model-level benchmark on a machine without Ray.
    """
    raw = read_yaml(path)
    app = _loraops_application(raw, str(path))
    _apply_app_overrides(raw, app, list(overrides or []))
    if ray_schema:
        _reject_unknown_keys(raw, app, str(path))
        _validate_ray_schema(raw, str(path))
    settings = validate_settings(app.get("args"), origin=f"{path}: args")
    options = {}
    for index, entry in enumerate(app.get("deployments") or []):
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in DEPLOYMENTS:
            raise ConfigError(f"{path}: deployments.{index}.name: unknown deployment {name!r} (expected {' or '.join(DEPLOYMENTS)})")
        options[name] = {key: value for key, value in entry.items() if key != "name"}
        if not ray_schema:
            continue
        unknown = sorted(set(options[name]) - _deployment_option_names())
        if unknown:
            raise ConfigError(f"{path}: deployments.{index} ({name}).{unknown[0]}: unknown deployment option")
        _validate_nested(options[name], f"{path}: deployments.{index} ({name})")
    return ServeConfigFile(
        app_name=str(app.get("name", "default")),
        route_prefix=str(app.get("route_prefix", "/")),
        settings=settings,
        deployment_options=options,
        http_options=dict(raw.get("http_options") or {}),
        raw=raw,
    )


def _loraops_application(raw: dict[str, Any], origin: str) -> dict[str, Any]:
    apps = raw.get("applications")
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"{origin}: applications: expected a list with the loraops application (import_path: {IMPORT_PATH})")
    ours = [app for app in apps if isinstance(app, dict) and app.get("import_path") == IMPORT_PATH]
    if len(ours) != 1:
        raise ConfigError(f"{origin}: applications: expected exactly one application with import_path {IMPORT_PATH}, found {len(ours)}")
    return ours[0]


def _apply_app_overrides(raw: dict[str, Any], app: dict[str, Any], overrides: list[str]) -> None:
    """--set on a view of the application where deployments are keyed by name, then written back."""
    if not overrides:
        return
    if not isinstance(app.get("args"), dict):
        app["args"] = {}
    if not isinstance(raw.get("http_options"), dict):
        raw["http_options"] = {}
    deployments = {entry["name"]: entry for entry in app.get("deployments") or [] if isinstance(entry, dict) and "name" in entry}
    view: dict[str, Any] = {
        "name": app.get("name"),
        "route_prefix": app.get("route_prefix"),
        "args": app["args"],
        "deployments": deployments,
        "http_options": raw["http_options"],
    }
    apply_overrides(view, overrides)
    unknown = sorted(set(view) - {"name", "route_prefix", "args", "deployments", "http_options"})
    if unknown:
        raise ConfigError(f"--set {unknown[0]}: unknown key (use args.KEY, deployments.{MODEL_DEPLOYMENT}.KEY, http_options.KEY, name or route_prefix)")
    for key in ("name", "route_prefix"):
        if view[key] is not None:
            app[key] = view[key]
    app["args"], raw["http_options"] = view["args"], view["http_options"]
    app["deployments"] = [dict(entry, name=name) for name, entry in view["deployments"].items()]


def _reject_unknown_keys(raw: dict[str, Any], app: dict[str, Any], origin: str) -> None:
    """Top-level, ``http_options`` and application keys that Ray's schema does not know (it silently drops them)."""
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    index = raw["applications"].index(app)
    for where, mapping, schema in (
        ("", raw, ServeDeploySchema),
        ("http_options.", raw.get("http_options"), HTTPOptionsSchema),
        (f"applications.{index}.", app, ServeApplicationSchema),
    ):
        unknown = sorted(set(mapping) - set(schema.model_fields)) if isinstance(mapping, dict) else []
        if unknown:
            raise ConfigError(f"{origin}: {where}{unknown[0]}: unknown key (known: {', '.join(sorted(schema.model_fields))})")


def _deployment_option_names() -> set[str]:
    """Options a deployment entry may set: Ray's deployment schema (which itself ignores unknown keys)."""
    from ray.serve.schema import DeploymentSchema

    return set(DeploymentSchema.model_fields) - {"name"}


def _validate_nested(options: dict[str, Any], origin: str) -> None:
    """Check autoscaling_config and ray_actor_options fully: Ray's schema lets unknown keys (typos) through."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import RayActorOptionsSchema

    for key, schema in (("autoscaling_config", AutoscalingConfig), ("ray_actor_options", RayActorOptionsSchema)):
        value = options.get(key)
        if not isinstance(value, dict):
            continue
        unknown = sorted(set(value) - set(schema.model_fields))
        if unknown:
            raise ConfigError(f"{origin}.{key}.{unknown[0]}: unknown key (known: {', '.join(sorted(schema.model_fields))})")
        try:
            schema.model_validate(value)
        except ValidationError as exc:
            raise ConfigError(f"{origin}.{key}: {format_validation_error(exc)}") from None


def _validate_ray_schema(raw: dict[str, Any], origin: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {format_validation_error(exc)}") from None
