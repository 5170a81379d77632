"""The adapter registry: versioned LoRA adapters with lineage, aliases, gated promotion, rollback.

Concepts (close to MLflow's model registry with aliases):

- An **adapter** is a name, e.g. ``dialogsum-phi2``. Names and aliases use the characters
  ``A-Z a-z 0-9 . _ -``, start with a letter or digit, are at most 128 characters long and never
  contain ``..`` (so a name is always one safe path component of the artifact store).
- A **version** (1, 2, 3, ...) is immutable: a copy of the adapter's files in registry storage
  with the sha256 of each, the base model, quantization and LoRA configs, hyperparameters,
  metrics (eval loss, ROUGE, ...), the data source and its fingerprint, and its lineage
  (experiment, trial id, the folder it was registered from).
- An **alias** (``production``, ``staging``, ...) points at one version; serving follows an alias.
  Every alias change is appended to an audit log (when, who, from, to, why).

References: ``NAME`` (the latest version), ``NAME@ALIAS`` and ``NAME:VERSION`` (``NAME:3`` or
``NAME:v3``).

``--if-better METRIC`` direction: metrics whose name contains ``loss`` or ``perplexity`` are
better when lower; every other metric (ROUGE, accuracy, ...) is better when higher. Pass
``higher_is_better`` to override.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from loraops import config as lconfig
from loraops.errors import LoraopsError
from loraops.registry import db
from loraops.registry.db import AdapterRow, AliasEventRow, AliasRow, VersionRow
from loraops.registry.store import ArtifactStore, StagedUpload, verify_local

log = logging.getLogger(__name__)

#: Files every registered adapter folder must have (PEFT format).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: Files of a training checkpoint folder that are not part of the adapter: not copied when a
#: ``checkpoint-<step>`` folder is registered (optimizer state is large, and a pickle).
NOT_ADAPTER_FILES = ("trainer_state.pt",)
NAME_RULE = "1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, no '..'"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION = re.compile(r"^[vV]?([0-9]+)$")
#: Name fragments of metrics where lower is better; any other metric is better when higher.
LOWER_IS_BETTER = ("loss", "perplexity")
DEFAULT_ALIAS = "production"
#: The file an experiment folder names its best trial in (written by ``loraops tune``).
BEST_TRIAL_FILE = "best_trial.json"


class PromotionRefused(LoraopsError):
    """``--if-better`` found the candidate no better than the alias's current version."""


# --- records returned by the API ---------------------------------------------------------------


@dataclass
class ModelVersion:
    """One registered version with its metadata (what ``registry show NAME:V`` prints)."""

    name: str
    version: int
    created_at: datetime
    created_by: str | None
    description: str | None
    base_model: str | None
    quantization: dict[str, Any] | None
    lora: dict[str, Any] | None
    hyperparameters: dict[str, Any] | None
    metrics: dict[str, float]
    data_source: str | None
    data_fingerprint: str | None
    experiment: str | None
    trial_id: str | None
    source_path: str | None
    artifact_uri: str
    files: dict[str, dict[str, Any]]
    aliases: list[str] = field(default_factory=list)
    #: The resolved training config the adapter was made with (None for versions registered without one).
    config: dict[str, Any] | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        return data


@dataclass
class AdapterInfo:
    """An adapter's summary: its versions and where its aliases point."""

    name: str
    created_at: datetime
    versions: int
    latest_version: int | None
    aliases: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"created_at": self.created_at.isoformat()}


@dataclass
class AliasEvent:
    """One entry of the append-only audit log."""

    name: str
    alias: str
    at: datetime
    actor: str | None
    action: str
    from_version: int | None
    to_version: int
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"at": self.at.isoformat()}


@dataclass
class AliasChange:
    """What promote / rollback did; ``changed`` is False when the alias already pointed there."""

    name: str
    alias: str
    version: int
    previous: int | None
    changed: bool
    message: str


# --- names, references, metrics ----------------------------------------------------------------


def validate_name(value: str, what: str = "adapter name") -> str:
    """Return ``value`` if it is a valid adapter or alias name, else raise naming the rule."""
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise LoraopsError(f"invalid {what} {value!r}: use {NAME_RULE}")
    return value


def parse_version(value: str | int) -> int:
    match = _VERSION.match(str(value).strip())
    if not match or int(match.group(1)) < 1:
        raise LoraopsError(f"invalid version {value!r}: expected a positive number like 3 or v3")
    return int(match.group(1))


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """``NAME`` | ``NAME@ALIAS`` | ``NAME:VERSION`` -> (name, alias or None, version or None)."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return validate_name(name), validate_name(alias, "alias"), None
    if ":" in ref:
        name, version = ref.split(":", 1)
        return validate_name(name), None, parse_version(version)
    return validate_name(ref), None, None


def lower_is_better(metric: str) -> bool:
    """The default direction of ``--if-better``: loss / perplexity down, everything else up."""
    return any(fragment in metric.lower() for fragment in LOWER_IS_BETTER)


def flatten_metrics(raw: dict[str, Any], strict: bool, prefix: str = "") -> dict[str, float]:
    """Nested dicts become dotted names; ``strict`` rejects non-numbers, else they are dropped."""
    flat: dict[str, float] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, strict, prefix=f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = value
        elif strict:
            raise LoraopsError(f"metric {name!r} must be a finite number, got {value!r}")
    return flat


def parse_metrics(value: str | dict[str, Any] | None) -> dict[str, float]:
    """User metrics: a dict, a JSON object string, or the path of a JSON file holding one."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return flatten_metrics(value, strict=True)
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise LoraopsError(f"--metrics: {value!r} is neither a JSON object nor an existing file")
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LoraopsError(f"--metrics: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LoraopsError(f"--metrics: expected a JSON object of name -> number, got {type(data).__name__}")
    return flatten_metrics(data, strict=True)


def default_actor() -> str | None:
    """The OS user, for the audit log; None where the platform cannot tell."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # e.g. a container uid without a passwd entry
        return os.environ.get("USER") or None


# --- data fingerprint --------------------------------------------------------------------------

_DATA_KEYS = ("source", "train_split", "eval_split", "test_split", "id_column", "dialogue_column", "summary_column")


def data_fingerprint(data_config: dict[str, Any]) -> str:
    """sha256 identifying the training data of a ``data`` config section.

    It covers the source, the split names and the column names (defaults filled in, so an
    omitted key and its default give the same fingerprint), and:

    - for ``builtin``: ``builtin_size`` (the built-in set is generated deterministically from it);
    - for a local file or folder: the name, size and bytes of every file in it, in place of the
      path itself, so the same data copied elsewhere keeps its fingerprint and an edited file
      changes it;
    - for a hub data set: nothing more (the hub name is all that is known without a download).
    """
    merged = lconfig.DataConfig().model_dump() | dict(data_config)
    described: dict[str, Any] = {key: merged.get(key) for key in _DATA_KEYS}
    digest = hashlib.sha256()
    source = str(merged.get("source") or "")
    if source == lconfig.BUILTIN_DATA:
        described["builtin_size"] = merged.get("builtin_size")
    else:
        local = Path(source).expanduser()
        if local.exists():
            described["source"] = {"local": sorted(_data_files(local))}
            for rel in described["source"]["local"]:
                _hash_file_into(digest, local / rel if local.is_dir() else local)
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _data_files(local: Path) -> list[str]:
    if local.is_file():
        return [local.name]
    return [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]


def _hash_file_into(digest: Any, path: Path) -> None:
    digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * 1024 * 1024):
            digest.update(chunk)


# --- what a run folder says about its adapter --------------------------------------------------


@dataclass
class Lineage:
    """Everything recorded with a version besides its files."""

    config: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    hyperparameters: dict[str, Any] | None = None
    experiment: str | None = None
    trial_id: str | None = None
    description: str | None = None


def check_adapter_dir(adapter: str | os.PathLike) -> Path:
    """The adapter folder as an absolute path, or an error naming what is missing."""
    path = Path(adapter).expanduser().resolve()
    if not path.is_dir():
        raise LoraopsError(f"adapter folder not found: {path}")
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise LoraopsError(f"{path} is not a PEFT adapter folder: missing {', '.join(missing)}")
    return path


def read_run_folder(adapter_dir: Path) -> Lineage:
    """Best effort: what the training run folder around ``adapter_dir`` recorded.

    - ``../config.yaml``: the resolved loraops config (model, quantization, lora, training, data);
    - ``../metrics.jsonl``: ``eval_loss``, the best one (or, for a ``checkpoint-<step>`` folder,
      the one at that step);
    - ``../evaluation.json``: ROUGE of the tuned model (``rouge1``, ``rouge2``, ``rougeL``,
      ``rougeLsum``), used only if the report is about this adapter folder.

    Missing or unreadable files are skipped with a log line; they never stop a registration.
    """
    run = adapter_dir.parent
    lineage = Lineage()
    config = _read_structured(run / "config.yaml", yaml.safe_load)
    if isinstance(config, dict):
        lineage.config = config
        training = config.get("training")
        lineage.hyperparameters = dict(training) if isinstance(training, dict) else None
    eval_loss = _eval_loss(run / "metrics.jsonl", adapter_dir.name)
    if eval_loss is not None:
        lineage.metrics["eval_loss"] = eval_loss
    lineage.metrics.update(_rouge(run / "evaluation.json", adapter_dir))
    return lineage


def _read_structured(path: Path, parse: Any) -> Any:
    if not path.is_file():
        return None
    try:
        return parse(path.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None


def _eval_loss(metrics_file: Path, adapter_folder_name: str) -> float | None:
    if not metrics_file.is_file():
        return None
    events = []
    for line in metrics_file.read_text().splitlines():
        try:
            event = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(event, dict) and isinstance(event.get("eval_loss"), (int, float)):
            events.append(event)
    match = re.fullmatch(r"checkpoint-(\d+)", adapter_folder_name)
    if match:  # a step checkpoint: its own eval loss, not the run's best
        at_step = [e["eval_loss"] for e in events if e.get("step") == int(match.group(1))]
        return at_step[-1] if at_step else None
    return min((e["eval_loss"] for e in events), default=None)


def _rouge(evaluation_file: Path, adapter_dir: Path) -> dict[str, float]:
    report = _read_structured(evaluation_file, json.loads)
    if not isinstance(report, dict) or not isinstance(report.get("tuned"), dict):
        return {}
    about = report.get("adapter")
    if about and Path(about).expanduser().resolve() != adapter_dir:
        log.info("ignoring %s: it evaluated %s, not %s", evaluation_file, about, adapter_dir)
        return {}
    return {key: value for key, value in flatten_metrics(report["tuned"], strict=False).items() if key.startswith("rouge")}


def read_best_trial(experiment: str | os.PathLike) -> tuple[Path, Lineage]:
    """The adapter folder and lineage of an experiment's best trial (``best_trial.json``)."""
    folder = Path(experiment).expanduser().resolve()
    if not folder.is_dir():
        raise LoraopsError(f"experiment folder not found: {folder}")
    best_file = folder / BEST_TRIAL_FILE
    if not best_file.is_file():
        raise LoraopsError(f"{best_file} not found: is {folder} a finished loraops tune experiment?")
    try:
        best = json.loads(best_file.read_text())
    except json.JSONDecodeError as exc:
        raise LoraopsError(f"{best_file}: invalid JSON ({exc})") from None
    if not isinstance(best, dict) or not best.get("adapter_path"):
        raise LoraopsError(f"{best_file}: expected an object with at least 'adapter_path'")
    adapter = Path(best["adapter_path"]).expanduser()
    adapter = check_adapter_dir(adapter if adapter.is_absolute() else folder / adapter)
    lineage = read_run_folder(adapter)  # the trial's own run folder, when it has one
    if isinstance(best.get("config"), dict):
        lineage.config = best["config"]
        training = best["config"].get("training")
        lineage.hyperparameters = dict(training) if isinstance(training, dict) else lineage.hyperparameters
    if isinstance(best.get("params"), dict):  # the searched values: what this trial was about
        lineage.hyperparameters = best["params"]
    if isinstance(best.get("metrics"), dict):
        lineage.metrics.update(flatten_metrics(best["metrics"], strict=False))
    lineage.experiment = str(best.get("experiment") or folder)
    lineage.trial_id = str(best["trial_id"]) if best.get("trial_id") is not None else None
    return adapter, lineage


# --- the registry ------------------------------------------------------------------------------


class Registry:
    """Registered adapters in a database (SQLite or PostgreSQL) plus an artifact store.

    ``db_url`` defaults to $LORAOPS_DATABASE_URL, else ``sqlite:///WORKSPACE/loraops.db``;
    ``artifact_uri`` to $LORAOPS_ARTIFACT_URI, else ``WORKSPACE/registry``. Pass ``store`` to use
    an already opened :class:`ArtifactStore` (any pyarrow filesystem).
    """

    def __init__(
        self,
        db_url: str | None = None,
        artifact_uri: str | None = None,
        workspace: str | os.PathLike | None = None,
        store: ArtifactStore | None = None,
    ):
        self.workspace = lconfig.resolve_workspace(workspace)
        self.db_url = lconfig.database_url(db_url, self.workspace)
        self.artifact_uri = store.uri if store is not None else lconfig.artifact_uri(artifact_uri, self.workspace)
        self._store = store
        self._engine: Engine | None = None

    @property
    def store(self) -> ArtifactStore:
        """The artifact store, opened on first use (listing and the audit log never need it)."""
        if self._store is None:
            self._store = ArtifactStore(self.artifact_uri)
        return self._store

    @property
    def engine(self) -> Engine:
        """The database engine, connected (and the tables created) on first use."""
        if self._engine is None:
            self._engine = db.get_engine(self.db_url)
        return self._engine

    # --- registering ---------------------------------------------------------------------------

    def register(
        self,
        adapter_dir: str | os.PathLike,
        name: str,
        metrics: dict[str, Any] | str | None = None,
        *,
        lineage: Lineage | None = None,
        description: str | None = None,
        actor: str | None = None,
    ) -> ModelVersion:
        """Copy an adapter folder into the registry as the next version of ``name``.

        Metadata comes from ``lineage`` when given, else from the run folder around the adapter
        (see :func:`read_run_folder`); ``metrics`` (a dict, JSON string or JSON file) is added
        on top and wins on equal names.
        """
        validate_name(name)
        source = check_adapter_dir(adapter_dir)
        lineage = replace(lineage or read_run_folder(source))  # a copy: the caller's stays as it was
        lineage.metrics = lineage.metrics | parse_metrics(metrics)
        if description is not None:
            lineage.description = description
        # Everything slow (hashing the data, copying the files) happens before any lock is taken.
        fields = self._version_fields(source, lineage, actor or default_actor())
        staged = self.store.stage(name, source, skip=NOT_ADAPTER_FILES)
        try:
            row = self._commit_version(name, staged, fields)
        except BaseException:
            self.store.delete(staged.path)
            raise
        log.debug("registered %s:%d (%d files) from %s", name, row.version, len(row.files), source)
        return self._to_version(row, name, [])

    def register_from_experiment(
        self,
        experiment: str | os.PathLike,
        name: str,
        metrics: dict[str, Any] | str | None = None,
        *,
        description: str | None = None,
        actor: str | None = None,
    ) -> ModelVersion:
        """Register the best trial of a tune experiment folder, with its metrics and lineage."""
        validate_name(name)
        adapter, lineage = read_best_trial(experiment)
        return self.register(adapter, name, metrics, lineage=lineage, description=description, actor=actor)

    @staticmethod
    def _version_fields(source: Path, lineage: Lineage, actor: str | None) -> dict[str, Any]:
        """The version row's columns that do not depend on its number or storage place."""
        config = lineage.config or {}
        data = config.get("data") if isinstance(config.get("data"), dict) else None
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        return {
            "created_by": actor,
            "description": lineage.description,
            "base_model": model.get("name"),
            "quantization": config.get("quantization"),
            "lora": config.get("lora") or _json_or_none(source / "adapter_config.json"),
            "hyperparameters": lineage.hyperparameters,
            "metrics": lineage.metrics,
            "data_source": str(data.get("source", lconfig.BUILTIN_DATA)) if data is not None else None,
            "data_fingerprint": data_fingerprint(data) if data is not None else None,
            "experiment": lineage.experiment,
            "trial_id": lineage.trial_id,
            "source_path": str(source),
            "config": config or None,
        }

    def _commit_version(self, name: str, staged: StagedUpload, fields: dict[str, Any]) -> VersionRow:
        """Give the staged files the next version number, retrying when concurrent writers collide."""
        adapter_id = self._ensure_adapter(name)
        for attempt in range(1, db.WRITE_ATTEMPTS + 1):
            try:
                return self._allocate_and_publish(adapter_id, name, staged, fields)
            except DBAPIError as exc:
                if not db.is_contention(exc) or attempt == db.WRITE_ATTEMPTS:
                    raise
                log.debug("version allocation for %s collided (attempt %d): %s", name, attempt, exc)
        raise AssertionError("unreachable")

    def _allocate_and_publish(self, adapter_id: int, name: str, staged: StagedUpload, fields: dict[str, Any]) -> VersionRow:
        """Allocate the number, move the files to NAME/vN and insert the row, all in one transaction.

        The number comes from the adapter row's counter, incremented while that row is locked
        (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite the transaction's ``BEGIN IMMEDIATE``
        holds the database's write lock), so concurrent registrations queue up and get
        consecutive numbers, and a rolled-back transaction gives its number back. The unique
        (adapter, version) constraint backs this up. The row appears only with the commit, and
        only after the files are complete in their final place.
        """
        final: str | None = None
        number = 0
        try:
            with db.write_transaction(self.engine) as session:
                adapter = session.scalars(select(AdapterRow).where(AdapterRow.id == adapter_id).with_for_update()).one()
                adapter.last_version = number = adapter.last_version + 1
                session.flush()
                final = self.store.publish(staged, name, number)
                row = VersionRow(adapter_id=adapter_id, version=number, artifact_uri=self.store.uri_of(final), files=staged.manifest, **fields)
                session.add(row)
            return row
        except BaseException:
            if final is not None:
                committed = self._find_committed(adapter_id, number, final)
                if committed is not None:  # the commit went through; only its acknowledgement was lost
                    return committed
                # Back under the staging name: a retry publishes them again, else the caller deletes them.
                self.store.move(final, staged.path, staged.manifest)
            raise

    def _ensure_adapter(self, name: str) -> int:
        """The adapter row's id, creating the row if needed (a lost insert race just retries)."""

        def work(session: Session) -> int:
            adapter = session.scalars(select(AdapterRow).where(AdapterRow.name == name)).one_or_none()
            if adapter is None:
                adapter = AdapterRow(name=name, last_version=0)
                session.add(adapter)
                session.flush()
            return adapter.id

        return db.run_write(self.engine, work)

    def _find_committed(self, adapter_id: int, number: int, path: str) -> VersionRow | None:
        try:
            with db.read_session(self.engine) as session:
                return session.scalars(
                    select(VersionRow).where(VersionRow.adapter_id == adapter_id, VersionRow.version == number, VersionRow.artifact_uri == self.store.uri_of(path))
                ).one_or_none()
        except DBAPIError:
            return None

    # --- reading -------------------------------------------------------------------------------

    def list_adapters(self) -> list[AdapterInfo]:
        """Every registered adapter, by name."""
        with db.read_session(self.engine) as session:
            counts = dict(session.execute(select(VersionRow.adapter_id, func.count()).group_by(VersionRow.adapter_id)).all())
            latest = dict(session.execute(select(VersionRow.adapter_id, func.max(VersionRow.version)).group_by(VersionRow.adapter_id)).all())
            aliases: dict[int, dict[str, int]] = {}
            for alias in session.scalars(select(AliasRow).order_by(AliasRow.alias)):
                aliases.setdefault(alias.adapter_id, {})[alias.alias] = alias.version
            return [
                AdapterInfo(row.name, _utc(row.created_at), counts.get(row.id, 0), latest.get(row.id), aliases.get(row.id, {}))
                for row in session.scalars(select(AdapterRow).order_by(AdapterRow.name))
            ]

    def adapter(self, name: str) -> AdapterInfo:
        """One adapter's summary; unknown names are an error."""
        validate_name(name)
        for info in self.list_adapters():
            if info.name == name:
                return info
        raise self._unknown_adapter(name)

    def versions(self, name: str) -> list[ModelVersion]:
        """All versions of ``name``, oldest first."""
        validate_name(name)
        with db.read_session(self.engine) as session:
            adapter = self._adapter_row(session, name)
            aliases = self._aliases_by_version(session, adapter.id)
            return [self._to_version(row, name, aliases.get(row.version, [])) for row in adapter.versions]

    def get(self, ref: str) -> ModelVersion:
        """The version ``ref`` names: ``NAME`` (latest), ``NAME@ALIAS`` or ``NAME:VERSION``."""
        name, alias, number = parse_ref(ref)
        with db.read_session(self.engine) as session:
            adapter = self._adapter_row(session, name)
            if alias is not None:
                number = self._alias_target(session, adapter, alias)
            row = self._version_of(session, adapter, number)
            return self._to_version(row, name, self._aliases_by_version(session, adapter.id).get(row.version, []))

    def resolve(self, ref: str) -> Path:
        """A local folder with the verified files of ``ref``, ready to load with PEFT.

        A local store is read in place; a remote one is downloaded once into
        ``WORKSPACE/cache/registry/NAME/vN``. Every call checks each file's sha256 against the
        database and raises :class:`~loraops.registry.store.IntegrityError` naming the first bad
        file: a corrupt adapter is never handed out.
        """
        version = self.get(ref)
        stored = self.store.version_path(version.name, version.version)
        label = f"{version.ref} ({version.artifact_uri})"
        if self.store.is_local:
            verify_local(stored, version.files, label)
            return Path(stored)
        cache = self.workspace / "cache" / "registry" / version.name / f"v{version.version}"
        if cache.is_dir():
            try:
                verify_local(cache, version.files, f"{label}, cached copy")
                return cache
            except LoraopsError as exc:
                log.warning("%s; downloading it again", exc)
                shutil.rmtree(cache, ignore_errors=True)
        self.store.download(stored, version.files, cache)
        verify_local(cache, version.files, label)
        return cache

    def audit_log(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        """Every alias change of ``name`` (optionally of one alias), oldest first."""
        validate_name(name)
        if alias is not None:
            validate_name(alias, "alias")
        with db.read_session(self.engine) as session:
            adapter = self._adapter_row(session, name)
            query = select(AliasEventRow).where(AliasEventRow.adapter_id == adapter.id)
            if alias is not None:
                query = query.where(AliasEventRow.alias == alias)
            return [
                AliasEvent(name, e.alias, _utc(e.at), e.actor, e.action, e.from_version, e.to_version, e.reason)
                for e in session.scalars(query.order_by(AliasEventRow.id))
            ]

    # --- aliases -------------------------------------------------------------------------------

    def promote(
        self,
        name: str,
        version: int | str,
        alias: str = DEFAULT_ALIAS,
        if_better: str | None = None,
        higher_is_better: bool | None = None,
        actor: str | None = None,
        reason: str | None = None,
    ) -> AliasChange:
        """Point ``NAME@alias`` at ``version``.

        With ``if_better=METRIC`` the move happens only when the candidate's metric beats the
        alias's current version's (strictly; direction from :func:`lower_is_better` unless
        ``higher_is_better`` is given); otherwise :class:`PromotionRefused` names both figures.
        An alias with no version yet is always set.
        """
        validate_name(name)
        validate_name(alias, "alias")
        number = parse_version(version)
        actor = actor or default_actor()

        def work(session: Session) -> AliasChange:
            adapter = self._adapter_row(session, name, lock=True)
            candidate = self._version_of(session, adapter, number)
            current = session.get(AliasRow, (adapter.id, alias))
            previous = current.version if current else None
            if previous == number:
                return AliasChange(name, alias, number, previous, False, f"{name}@{alias} already points to version {number}")
            verdict = ""
            if if_better and previous is not None:
                verdict = self._compare(session, adapter, candidate, previous, alias, if_better, higher_is_better)
            self._move_alias(session, adapter.id, alias, number, previous, "promote", actor, reason)
            moved = f"{name}@{alias}: version {previous if previous is not None else '(none)'} -> {number}"
            return AliasChange(name, alias, number, previous, True, f"{moved}{verdict}")

        return db.run_write(self.engine, work)

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS, actor: str | None = None, reason: str | None = None) -> AliasChange:
        """Point ``NAME@alias`` back at the version it had before its latest promotion.

        The audit log is read as a stack: a promotion pushes its version, a rollback pops one.
        So repeated rollbacks walk back through earlier targets (3 -> 2 -> 1) instead of
        toggling between the last two; with nothing earlier it is an error.
        """
        validate_name(name)
        validate_name(alias, "alias")
        actor = actor or default_actor()

        def work(session: Session) -> AliasChange:
            adapter = self._adapter_row(session, name, lock=True)
            current = session.get(AliasRow, (adapter.id, alias))
            if current is None:
                raise LoraopsError(f"{name} has no alias {alias!r}{self._known_aliases(session, adapter)}")
            events = session.scalars(select(AliasEventRow).where(AliasEventRow.adapter_id == adapter.id, AliasEventRow.alias == alias).order_by(AliasEventRow.id))
            stack: list[int] = []
            for event_row in events:
                if event_row.action == "rollback":
                    stack = stack[:-1]
                else:
                    stack.append(event_row.to_version)
            if len(stack) < 2:
                raise LoraopsError(f"{name}@{alias} (version {current.version}) has no earlier target to roll back to")
            target, previous = stack[-2], current.version  # read before _move_alias updates the row
            self._move_alias(session, adapter.id, alias, target, previous, "rollback", actor, reason)
            return AliasChange(name, alias, target, previous, True, f"{name}@{alias}: rolled back from version {previous} to {target}")

        return db.run_write(self.engine, work)

    def _move_alias(self, session: Session, adapter_id: int, alias: str, to: int, previous: int | None, action: str, actor: str | None, reason: str | None) -> None:
        row = session.get(AliasRow, (adapter_id, alias))
        if row is None:
            session.add(AliasRow(adapter_id=adapter_id, alias=alias, version=to))
        else:
            row.version, row.updated_at = to, db.utcnow()
        session.add(AliasEventRow(adapter_id=adapter_id, alias=alias, actor=actor, action=action, from_version=previous, to_version=to, reason=reason))

    def _compare(self, session: Session, adapter: AdapterRow, candidate: VersionRow, previous: int, alias: str, metric: str, higher_is_better: bool | None) -> str:
        """'' when the candidate is strictly better on ``metric``, else PromotionRefused."""
        incumbent = self._version_of(session, adapter, previous)
        new, old = _metric(candidate, metric, adapter.name), _metric(incumbent, metric, adapter.name)
        higher = (not lower_is_better(metric)) if higher_is_better is None else higher_is_better
        better = new > old if higher else new < old
        figures = f"{metric}: candidate v{candidate.version} = {new:g}, {alias} v{previous} = {old:g}; {'higher' if higher else 'lower'} is better"
        if not better:
            raise PromotionRefused(f"not promoted, {adapter.name} v{candidate.version} is not better than {alias}: {figures}")
        return f" ({figures})"

    # --- lookups -------------------------------------------------------------------------------

    def _adapter_row(self, session: Session, name: str, lock: bool = False) -> AdapterRow:
        query = select(AdapterRow).where(AdapterRow.name == name)
        adapter = session.scalars(query.with_for_update() if lock else query).one_or_none()
        if adapter is None:
            raise self._unknown_adapter(name, session)
        return adapter

    def _unknown_adapter(self, name: str, session: Session | None = None) -> LoraopsError:
        if session is None:
            with db.read_session(self.engine) as fresh:
                return self._unknown_adapter(name, fresh)
        names = list(session.scalars(select(AdapterRow.name).order_by(AdapterRow.name).limit(11)))
        known = f"; registered: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}" if names else "; the registry is empty"
        return LoraopsError(f"unknown adapter {name!r}{known}")

    def _version_of(self, session: Session, adapter: AdapterRow, number: int | None) -> VersionRow:
        query = select(VersionRow).where(VersionRow.adapter_id == adapter.id)
        query = query.where(VersionRow.version == number) if number is not None else query.order_by(VersionRow.version.desc()).limit(1)
        row = session.scalars(query).first()
        if row is None:
            if number is None:
                raise LoraopsError(f"{adapter.name} has no versions yet")
            top = session.scalar(select(func.max(VersionRow.version)).where(VersionRow.adapter_id == adapter.id))
            raise LoraopsError(f"{adapter.name} has no version {number} (versions: {'1..' + str(top) if top else 'none'})")
        return row

    def _alias_target(self, session: Session, adapter: AdapterRow, alias: str) -> int:
        row = session.get(AliasRow, (adapter.id, alias))
        if row is None:
            raise LoraopsError(f"{adapter.name} has no alias {alias!r}{self._known_aliases(session, adapter)}")
        return row.version

    def _known_aliases(self, session: Session, adapter: AdapterRow) -> str:
        names = list(session.scalars(select(AliasRow.alias).where(AliasRow.adapter_id == adapter.id).order_by(AliasRow.alias)))
        return f" (aliases: {', '.join(names)})" if names else " (it has no aliases yet: see `loraops promote`)"

    def _aliases_by_version(self, session: Session, adapter_id: int) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        for row in session.scalars(select(AliasRow).where(AliasRow.adapter_id == adapter_id).order_by(AliasRow.alias)):
            found.setdefault(row.version, []).append(row.alias)
        return found

    @staticmethod
    def _to_version(row: VersionRow, name: str, aliases: list[str]) -> ModelVersion:
        return ModelVersion(
            name=name,
            version=row.version,
            created_at=_utc(row.created_at),
            created_by=row.created_by,
            description=row.description,
            base_model=row.base_model,
            quantization=row.quantization,
            lora=row.lora,
            hyperparameters=row.hyperparameters,
            metrics=dict(row.metrics or {}),
            data_source=row.data_source,
            data_fingerprint=row.data_fingerprint,
            experiment=row.experiment,
            trial_id=row.trial_id,
            source_path=row.source_path,
            artifact_uri=row.artifact_uri,
            files=dict(row.files),
            aliases=list(aliases),
            config=row.config,
        )


def _metric(row: VersionRow, metric: str, name: str) -> float:
    value = (row.metrics or {}).get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        known = ", ".join(sorted(row.metrics or {})) or "none"
        raise PromotionRefused(f"cannot compare on {metric!r}: {name} v{row.version} has no such metric (its metrics: {known})")
    return float(value)


def _json_or_none(path: Path) -> dict[str, Any] | None:
    data = _read_structured(path, json.loads)
    return data if isinstance(data, dict) else None


def _utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; they were written in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
