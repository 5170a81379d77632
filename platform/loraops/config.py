"""Typed configuration: one pydantic schema, loaded from YAML, with `--set a.b=c` overrides.

Every command takes the same file. Errors name the key (``training.learning_rate: ...``) and are
raised as :class:`ConfigError`, which the CLI turns into one line and exit code 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraops.errors import LoraopsError
from loraops.layout import NAME_RULE, is_valid_name

#: Environment variable that moves the workspace (everything loraops generates).
WORKSPACE_ENV = "LORAOPS_HOME"
DEFAULT_WORKSPACE = ".loraops"
#: Environment variable with the SQLAlchemy URL of the project database (registry, Optuna studies).
DATABASE_ENV = "LORAOPS_DATABASE_URL"
#: Environment variable with the root URI for registry artifacts (local folder, s3://, gs://).
ARTIFACTS_ENV = "LORAOPS_ARTIFACT_URI"
#: The model name that selects the embedded tiny Phi model, built once into the workspace.
TINY_MODEL = "builtin:tiny-phi"
#: The data source that selects the built-in DialogSum-format data set.
BUILTIN_DATA = "builtin"

PHI2_PROMPT = "Instruct: Summarize the following conversation.\n{dialogue}\nOutput:\n"


class ConfigError(LoraopsError, ValueError):
    """A configuration problem; the message names the offending key."""


class Section(BaseModel):
    """Base for every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(TINY_MODEL, description="Hub name, local checkpoint folder, or builtin:tiny-phi.")
    trust_remote_code: bool = Field(
        False, description="Let transformers run the model repository's own code (serving refuses such versions unless args.allow_trust_remote_code)."
    )
    revision: str | None = Field(None, description="Hub revision of the model: a branch, tag or commit; default the hub's default branch.")


class QuantizationConfig(Section):
    """bitsandbytes settings; the defaults are the seed's BitsAndBytesConfig."""

    load_in_4bit: bool = Field(True, description="Load the base model's linear layers in 4 bits (bitsandbytes).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the base weights.")
    bnb_4bit_compute_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype of the 4-bit layers' matmuls and of autocast on a GPU; float16 turns on dynamic loss scaling."
    )
    bnb_4bit_use_double_quant: bool = Field(False, description="Quantize the quantization constants too (a little less memory).")


class LoraSettings(Section):
    r: int = Field(32, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling: the update is multiplied by alpha / r.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "dense"], description="Names of the linear layers that get an adapter."
    )
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input during training.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train (PEFT's bias option).")
    task_type: Literal["CAUSAL_LM"] = Field("CAUSAL_LM", description="PEFT task type.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one module name")
        return value


class TrainingConfig(Section):
    """One QLoRA run; the defaults are the seed's recipe."""

    max_steps: int = Field(1000, ge=1, description="Optimizer steps of the run.")
    per_device_train_batch_size: int = Field(
        1, ge=1, description="Rows per micro-batch; a step draws this x gradient_accumulation_steps rows (micro-batch size without a token budget)."
    )
    per_device_eval_batch_size: int = Field(8, ge=1, description="Rows per batch when computing eval loss.")
    gradient_accumulation_steps: int = Field(4, ge=1, description="Micro-batches of rows per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0, description="Peak learning rate, after warm-up.")
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = Field("linear", description="Learning-rate decay after warm-up.")
    warmup_steps: int = Field(1, ge=0, description="Steps of linear learning-rate warm-up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm (gradients are unscaled first).")
    optim: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused"] = Field(
        "paged_adamw_32bit", description="Optimizer: bitsandbytes' paged AdamW (32- or 8-bit state) or torch's AdamW (fused: one kernel on a GPU)."
    )
    logging_steps: int = Field(25, ge=1, description="Write train loss and learning rate to metrics.jsonl every N steps (and at the last).")
    eval_steps: int = Field(25, ge=1, description="Compute eval loss every N steps (and at the last); a search reports to Tune at each.")
    save_steps: int = Field(25, ge=1, description="Save a resumable checkpoint every N steps (and at the last).")
    save_total_limit: int | None = Field(None, ge=1, description="Keep only the newest N step checkpoints.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in the backward pass: less memory, more compute.")
    group_by_length: bool = Field(True, description="Draw rows of similar length into the same step (less padding).")
    max_tokens_per_batch: int | None = Field(
        None,
        ge=16,
        description="Token budget of a micro-batch. A step's per_device_train_batch_size x gradient_accumulation_steps rows are "
        "sorted by length and cut into micro-batches of at most this many tokens (padded: rows x longest row; packed: the sum). "
        "Default: micro-batches of per_device_train_batch_size rows.",
    )
    packing: bool = Field(
        False,
        description="Padding-free micro-batches: rows concatenated, position_ids restarting per row, no attention and no loss "
        "across rows; one sequence per micro-batch with flex/flash attention, sequences of <= data.max_length tokens with "
        "sdpa/eager (dense masks). Training and eval loss.",
    )
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"] | None = Field(
        None,
        description="Attention kernel of the training model; default: transformers' choice (sdpa). "
        "flash_attention_2/3 need the flash-attn package and a GPU.",
    )
    report_to: list[Literal["none", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["none"],
        description="Also send metrics to TensorBoard (run folder's tensorboard/) and/or Weights & Biases; extras loraops[tensorboard], loraops[wandb].",
    )
    seed: int = Field(42, description="Seed of the data order, the adapter's initialisation and dropout.")
    eval_max_samples: int | None = Field(None, ge=1, description="Cap the eval split (eval loss) size.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class DataConfig(Section):
    """Where the dialogues come from and how they become prompts."""

    source: str = Field(BUILTIN_DATA, description="builtin, a hub data set name, or a local .jsonl/.json/.csv/.parquet file or folder.")
    train_split: str = Field("train", description="Split that trains.")
    eval_split: str = Field("validation", description="Split of the eval loss (and of a search's ROUGE-L).")
    test_split: str = Field("test", description="Held-out split that loraops evaluate and the demo score, unless evaluation.split names another.")
    id_column: str = Field("id", description="Column with a row's id.")
    dialogue_column: str = Field("dialogue", description="Column with the dialogue.")
    summary_column: str = Field("summary", description="Reference column; summary1..summaryN are also read as extra references.")
    prompt_template: str = Field(PHI2_PROMPT, description="The prompt around a dialogue; must contain {dialogue}. Default: Phi-2's instruct format.")
    max_length: int = Field(512, ge=16, description="Tokens of prompt + summary + EOS; the dialogue is cut first.")
    max_summary_length: int = Field(128, ge=1, description="Tokens kept of a training summary.")
    max_train_samples: int | None = Field(None, ge=1, description="Use only the first N training rows; default all.")
    builtin_size: int = Field(2000, ge=30, description="Dialogues generated for the built-in data set.")

    @field_validator("prompt_template")
    @classmethod
    def _has_dialogue_slot(cls, value: str) -> str:
        if "{dialogue}" not in value:
            raise ValueError("must contain the placeholder {dialogue}")
        return value

    @model_validator(mode="after")
    def _summary_fits(self) -> DataConfig:
        if self.max_summary_length >= self.max_length:
            raise ValueError("max_summary_length must be smaller than max_length")
        return self


class EvaluationConfig(Section):
    """Held-out generation and ROUGE."""

    split: str | None = Field(None, description="Defaults to data.test_split.")
    max_samples: int | None = Field(200, ge=1, description="Held-out dialogues scored (the first N); null: the whole split.")
    batch_size: int = Field(16, ge=1, description="Dialogues generated per batch.")
    max_new_tokens: int = Field(64, ge=1, le=2048, description="Most summary tokens generated per dialogue.")


#: The distributions a ``search.space`` entry may use; each maps to both Ray Tune and Optuna.
SEARCH_DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice")


def _unset(value: Any) -> bool:
    return value is None


class SearchDistribution(Section):
    """One searched key of ``search.space``: exactly one distribution.

    Bounds are inclusive and must themselves be valid values of the key. ``choice`` options may be
    lists (a set of target modules) or mappings (several keys of a section chosen together, such as
    micro-batch and gradient accumulation).
    """

    uniform: tuple[float, float] | None = Field(None, exclude_if=_unset, description="[low, high]: a float, uniform.")
    loguniform: tuple[float, float] | None = Field(None, exclude_if=_unset, description="[low, high], low > 0: a float, uniform in log space.")
    quniform: tuple[float, float, float] | None = Field(None, exclude_if=_unset, description="[low, high, q]: a float, uniform, a multiple of q.")
    randint: tuple[int, int] | None = Field(None, exclude_if=_unset, description="[low, high]: an integer, both ends included.")
    choice: list[Any] | None = Field(None, exclude_if=_unset, min_length=1, description="One of these values.")

    @model_validator(mode="after")
    def _exactly_one_valid(self) -> SearchDistribution:
        given = [name for name in SEARCH_DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"needs exactly one of {', '.join(SEARCH_DISTRIBUTIONS)}, got {given or 'none'}")
        bounds = self.uniform or self.loguniform or self.quniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]}: low must be smaller than high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be positive, got {self.loguniform[0]}")
        if self.quniform is not None:
            low, high, q = self.quniform
            steps = (high - low) / q if q > 0 else 0.5
            if abs(steps - round(steps)) > 1e-9:
                raise ValueError(f"quniform: q must be positive and divide high - low, got {list(self.quniform)}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in SEARCH_DISTRIBUTIONS if getattr(self, name) is not None)


class SchedulerConfig(Section):
    """When trials stop: ASHA stops weak trials early on eval loss; FIFO runs every trial to its last step."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(100, ge=1, description="Optimizer steps every trial runs before ASHA may stop it.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA keeps the best 1/reduction_factor of the trials at each rung.")


class TrialResources(Section):
    """What one trial reserves on the Ray cluster."""

    cpu: float = Field(1.0, gt=0.0, description="CPUs per trial; also the trial's torch threads.")
    gpu: float | None = Field(None, ge=0.0, description="GPUs per trial, fractions share a GPU; default 1 if the cluster has GPUs, else 0.")


class SearchConfig(Section):
    """A Ray Tune hyperparameter search (``loraops tune``): Optuna TPE proposes, ASHA stops on eval loss, ``metric`` picks the best."""

    num_samples: int = Field(8, ge=1, description="Trials in the experiment.")
    metric: Literal["eval_loss", "rougeL"] = Field(
        "eval_loss",
        description="What selects the best trial and what TPE optimizes: eval_loss (lowest), or rougeL (highest; greedy "
        "summaries of rouge_samples validation dialogues, computed once at a trial's last step).",
    )
    rouge_samples: int = Field(32, ge=1, description="Validation dialogues (the first N) scored at a trial's last step when metric is rougeL.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps per trial (ASHA's max_t); default training.max_steps.")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Default: the trials the cluster's GPUs (else CPUs) hold at once.")
    algorithm: Literal["tpe", "random"] = Field(
        "tpe", description="tpe: Optuna TPE proposes each trial from the results so far; random: Ray Tune's seeded random sampling of the same space."
    )
    seed: int = Field(0, description="Seed of the sampler (TPE or random).")
    startup_trials: int | None = Field(
        None, ge=1, description="Random trials TPE samples before it models the results; default num_samples / 2, at least 2, at most 10."
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    resources: TrialResources = Field(default_factory=TrialResources)
    keep_checkpoints: int = Field(2, ge=1, description="Adapter checkpoints kept per trial, the best by eval loss (plus the latest).")
    max_failures: int = Field(0, ge=0, description="Retries of a failed trial, from its latest checkpoint.")
    storage: str | None = Field(None, description="Experiments root: a folder or a pyarrow URI (s3://, gs://); default WORKSPACE/experiments.")
    database_url: str | None = Field(None, description=f"SQLAlchemy URL of the Optuna studies; default ${DATABASE_ENV} or WORKSPACE/loraops.db.")
    ray_address: str | None = Field(None, description="Ray cluster to run on; default $RAY_ADDRESS, else a new local instance.")
    space: dict[str, SearchDistribution] = Field(default_factory=dict, description="Dotted config key -> distribution.")


class Config(Section):
    """The whole configuration of a loraops job."""

    name: str = Field("run", description="Run, experiment and (by default) adapter name; a folder name.")
    workspace: str | None = Field(None, description=f"Folder for everything generated; default ${WORKSPACE_ENV} or ./{DEFAULT_WORKSPACE}.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError(f"use {NAME_RULE}")
        return value

    @model_validator(mode="after")
    def _rows_fit_the_token_budget(self) -> Config:
        budget = self.training.max_tokens_per_batch
        if budget is not None and budget < self.data.max_length:
            raise ValueError(
                f"training.max_tokens_per_batch ({budget}) must be at least data.max_length ({self.data.max_length}), so that every row fits a micro-batch"
            )
        return self

    @property
    def workspace_path(self) -> Path:
        return resolve_workspace(self.workspace)


def resolve_workspace(explicit: str | os.PathLike | None = None) -> Path:
    """The workspace folder: explicit value, else $LORAOPS_HOME, else ./.loraops."""
    raw = explicit or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
    return Path(raw).expanduser().resolve()


def database_url(explicit: str | None = None, workspace: str | os.PathLike | None = None) -> str:
    """The project database: explicit URL, else $LORAOPS_DATABASE_URL, else a SQLite file in the workspace.

    PostgreSQL URLs come back with the driver loraops installs (see :func:`normalize_database_url`).
    """
    url = explicit or os.environ.get(DATABASE_ENV)
    if url:
        return normalize_database_url(url)
    return f"sqlite:///{resolve_workspace(workspace) / 'loraops.db'}"


#: The PostgreSQL driver loraops depends on (psycopg2-binary). A URL without a driver gets it.
POSTGRES_DRIVER_SCHEME = "postgresql+psycopg2://"


def normalize_database_url(url: str) -> str:
    """``postgresql://...`` and ``postgres://...`` -> ``postgresql+psycopg2://...``; other URLs unchanged.

    Without a driver in the URL SQLAlchemy picks its own default, which changed from psycopg2 to
    psycopg (v3) in SQLAlchemy 2.1, and it does not know ``postgres://`` (libpq's and many hosting
    providers' spelling) at all. Naming the installed driver makes both spellings work on every
    SQLAlchemy version, for the registry and for Optuna alike.
    """
    scheme, separator, rest = url.partition("://")
    if separator and scheme.lower() in ("postgresql", "postgres"):
        return POSTGRES_DRIVER_SCHEME + rest
    return url


def display_url(url) -> str:
    """A database URL (string or SQLAlchemy ``URL``) for messages and logs, its password masked: the one masking helper."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return repr(str(url))
    if parsed.get_backend_name() == "sqlite":  # a path, shown as typed (render_as_string would escape it)
        query = "&".join(f"{key}={value}" for key, value in parsed.query.items())
        return f"{parsed.drivername}:///{parsed.database or ''}" + (f"?{query}" if query else "")
    return parsed.render_as_string(hide_password=True)


def artifact_uri(explicit: str | None = None, workspace: str | os.PathLike | None = None) -> str:
    """Where registered adapters' files live: explicit, else $LORAOPS_ARTIFACT_URI, else WORKSPACE/registry."""
    return explicit or os.environ.get(ARTIFACTS_ENV) or str(resolve_workspace(workspace) / "registry")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=c`` into (["a", "b"], value); the value is parsed as YAML (numbers, lists, ...)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. training.learning_rate=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


#: Sections whose keys are themselves dotted config keys: ``search.space.lora.dropout`` is the entry
#: ``lora.dropout`` of ``search.space``, not a section ``lora`` inside it.
DOTTED_KEY_SECTIONS = (("search", "space"),)


def _split_at_dotted_section(path: list[str]) -> list[str]:
    """``path`` with everything after a dotted-key section joined back into one key."""
    for section in DOTTED_KEY_SECTIONS:
        if tuple(path[: len(section)]) == section and len(path) > len(section) + 1:
            return [*section, ".".join(path[len(section):])]
    return path


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a nested dict (in place) and return it."""
    for item in overrides:
        path, value = parse_override(item)
        path = _split_at_dotted_section(path)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(path[:depth + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(error: ValidationError) -> str:
    """One line per problem, each starting with the dotted key."""
    lines = []
    for problem in error.errors():
        if not problem["loc"] and problem["type"] == "value_error":
            lines.append(str(problem["ctx"]["error"]))  # a check across sections names its keys itself
            continue
        key = ".".join(str(part) for part in problem["loc"]) or "<root>"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        elif problem["type"] != "missing" and "input" in problem and not isinstance(problem["input"], (dict, list)):
            message = f"{message} (got {problem['input']!r})"
        lines.append(f"{key}: {message}")
    return "; ".join(lines)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from a file, or ConfigError naming the file and the problem."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{file}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def validate(schema: type[BaseModel], data: dict[str, Any], origin: str = "config") -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {format_validation_error(exc)}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a :class:`Config` from YAML (or defaults when ``path`` is None) plus overrides."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    return validate(Config, data, origin=str(path) if path is not None else "config")


def dump_config(config: BaseModel) -> dict[str, Any]:
    """Plain-data form (YAML/JSON ready) of a config."""
    return config.model_dump(mode="json")
