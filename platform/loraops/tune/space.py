"""The search space: ``search.space`` in YAML -> Ray Tune domains -> Optuna distributions, and back.

Each entry maps a dotted config key to one distribution::

    training.learning_rate: {loguniform: [1.0e-4, 5.0e-3]}   # float, uniform in log space
    lora.dropout:           {uniform: [0.0, 0.1]}            # float
    training.warmup_steps:  {randint: [0, 20]}               # int, both ends included
    lora.r:                 {choice: [8, 16, 32]}
    lora.target_modules:    {choice: [[q_proj, v_proj], [q_proj, k_proj, v_proj, dense]]}
    training:               {choice: [{per_device_train_batch_size: 16, gradient_accumulation_steps: 1},
                                      {per_device_train_batch_size: 8, gradient_accumulation_steps: 2}]}

The Ray domains are the experiment's ``param_space`` (what Tune records and shows); the searcher
samples the matching Optuna distributions (:meth:`SearchSpace.optuna_distributions`).
Optuna's categorical distribution only takes scalars, so a list or mapping option travels as a
readable label (its YAML flow form, e.g. ``[q_proj, v_proj]``) and :meth:`SearchSpace.decode`
turns it back into the value. A mapping option sets several keys of the section at once.

Every bound and option is checked against the config schema up front, so a bad space is a
:class:`~loraops.config.ConfigError` naming ``search.space.<key>`` before any trial starts.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from loraops.config import Config, ConfigError, dump_config, format_validation_error

#: Sections whose keys may be searched (not name, workspace or the search itself).
SEARCHABLE_SECTIONS = ("model", "quantization", "lora", "training", "data", "evaluation")
#: Optuna's categorical distribution accepts only these types as choices.
SCALARS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Dimension:
    """One searched config key and its distribution."""

    key: str
    kind: str
    bounds: tuple[float, ...] = ()
    #: For ``choice``: (label shown to Ray/Optuna, config value) pairs.
    options: tuple[tuple[Any, Any], ...] = ()

    @property
    def log(self) -> bool:
        return self.kind == "loguniform"

    def ray_domain(self) -> Any:
        """The Ray Tune domain for ``param_space``."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.bounds)
        if self.kind == "loguniform":
            return tune.loguniform(*self.bounds)
        if self.kind == "quniform":
            return tune.quniform(*self.bounds)
        if self.kind == "randint":
            low, high = (int(bound) for bound in self.bounds)
            return tune.randint(low, high + 1)  # YAML bounds are inclusive, Ray's upper bound is not
        return tune.choice([label for label, _ in self.options])

    def optuna_distribution(self) -> Any:
        """The Optuna distribution TPE samples: the same values as :meth:`ray_domain`."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution([label for label, _ in self.options])
        if self.kind == "randint":
            return IntDistribution(int(self.bounds[0]), int(self.bounds[1]))
        if self.kind == "quniform":
            return FloatDistribution(self.bounds[0], self.bounds[1], step=self.bounds[2])
        return FloatDistribution(self.bounds[0], self.bounds[1], log=self.log)

    def decode(self, sampled: Any) -> Any:
        """The config value for a value Ray/Optuna sampled (a choice label becomes its option)."""
        if self.kind == "choice":
            return dict(self.options)[sampled]
        return int(sampled) if self.kind == "randint" else float(sampled)


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]

    @classmethod
    def from_config(cls, config: Config) -> SearchSpace:
        """The validated space of ``config.search.space``; ConfigError names the bad key."""
        if not config.search.space:
            raise ConfigError("search.space: nothing to search; add at least one key, e.g. training.learning_rate: {loguniform: [1.0e-4, 1.0e-3]}")
        base = dump_config(config)
        dimensions = []
        for key, spec in config.search.space.items():
            _check_key(key, config)
            dimension = _dimension(key, spec.kind, getattr(spec, spec.kind))
            for value in _probe_values(dimension):
                try:
                    Config.model_validate(apply_values(base, {key: value}))
                except (ValidationError, ConfigError) as exc:
                    problem = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
                    raise ConfigError(f"search.space.{key}: {label(value)!r} is not a valid value here: {problem}") from None
            dimensions.append(dimension)
        return cls(tuple(dimensions))

    @property
    def keys(self) -> list[str]:
        return [dimension.key for dimension in self.dimensions]

    def dimension(self, key: str) -> Dimension:
        return next(dimension for dimension in self.dimensions if dimension.key == key)

    def ray_param_space(self) -> dict[str, Any]:
        """``Tuner(param_space=...)``: flat dotted keys -> Ray Tune domains."""
        return {dimension.key: dimension.ray_domain() for dimension in self.dimensions}

    def optuna_distributions(self) -> dict[str, Any]:
        """Searched key -> the Optuna distribution TPE samples, in the order of the space."""
        return {dimension.key: dimension.optuna_distribution() for dimension in self.dimensions}

    def decode(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Dotted key -> config value for a sampled point (Tune's trial config)."""
        return {dimension.key: dimension.decode(sampled[dimension.key]) for dimension in self.dimensions}


def _dimension(key: str, kind: str, spec: Any) -> Dimension:
    if kind != "choice":
        return Dimension(key, kind, bounds=tuple(spec))
    options = tuple((label(value), value) for value in spec)
    labels = [shown for shown, _ in options]
    duplicates = sorted({str(shown) for shown in labels if labels.count(shown) > 1})
    if duplicates:
        raise ConfigError(f"search.space.{key}: choice lists {', '.join(duplicates)} more than once")
    return Dimension(key, kind, options=options)


def _check_key(key: str, config: Config) -> None:
    section = key.split(".", 1)[0]
    if section not in SEARCHABLE_SECTIONS:
        raise ConfigError(f"search.space.{key}: only keys of {', '.join(SEARCHABLE_SECTIONS)} can be searched")
    if key == "training.max_steps" and (config.search.scheduler.type == "asha" or config.search.max_steps):
        raise ConfigError(
            "search.space.training.max_steps: it is the budget of every trial (ASHA's max_t, search.max_steps); "
            "search it with search.scheduler.type: fifo and no search.max_steps"
        )


def _probe_values(dimension: Dimension) -> list[Any]:
    """Values that must all be valid: the bounds, a point inside (it catches a float range on an
    int key), or every option."""
    if dimension.kind == "choice":
        return [value for _, value in dimension.options]
    low, high = dimension.bounds[:2]
    if dimension.kind == "randint":
        return [int(low), int(high)]
    inside = math.exp(math.log(low) + 0.37 * (math.log(high) - math.log(low))) if dimension.log else low + 0.37 * (high - low)
    return [low, high] if dimension.kind == "quniform" else [low, inside, high]


def label(value: Any) -> Any:
    """How an option appears to Ray and Optuna: scalars as they are, lists and mappings as YAML flow text."""
    if isinstance(value, SCALARS):
        return value
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=math.inf).strip()


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the config dict ``base`` with each dotted key set; a mapping value updates
    the section it names instead of replacing it."""
    data = copy.deepcopy(base)
    for key, value in values.items():
        *parents, last = key.split(".")
        node = data
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parents[:depth + 1])} is not a section")
            node = child
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = {**node[last], **copy.deepcopy(value)}
        else:
            node[last] = copy.deepcopy(value)
    return data


def trial_name(experiment: str, trial_id: str) -> str:
    """The ``name`` of a trial's config: its experiment and Tune trial id."""
    return f"{experiment}-{trial_id}"


def trial_config(base: dict[str, Any], values: dict[str, Any], name: str) -> Config:
    """The full, validated config of one trial: the experiment's base config plus its sampled values.

    Every evaluation reaches Tune with a checkpoint (``save_steps = eval_steps``), which Tune copies
    into the experiment; so the trial itself keeps only its newest one.
    """
    data = apply_values(base, values)
    data["name"] = name
    data["training"]["save_steps"] = data["training"]["eval_steps"]
    data["training"]["save_total_limit"] = 1
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"trial {name}: the sampled config is invalid: {format_validation_error(exc)}") from None
