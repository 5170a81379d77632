"""Adapter names, registry references and metrics: parsing and checking, without a database.

References (:class:`Ref`): ``NAME@ALIAS``, ``NAME:VERSION`` (``NAME:3`` or ``NAME:v3``) and a bare
``NAME``, whose meaning depends on who reads it, so every caller says which (:class:`Bare`): the
registry and the CLI read it as the latest version, serving as ``NAME@production``
(:data:`DEFAULT_ALIAS`). Names and aliases follow :data:`loraops.layout.NAME_RULE`.

The ``--if-better METRIC`` direction is :func:`loraops.metrics.lower_is_better`.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraops.errors import LoraopsError
from loraops.layout import validate_name
from loraops.metrics import LOWER_IS_BETTER, lower_is_better

__all__ = [
    "DEFAULT_ALIAS",
    "DEFAULT_MAX_ERROR_MARGIN",
    "DEFAULT_MIN_REQUESTS",
    "LOWER_IS_BETTER",
    "Bare",
    "Ref",
    "lower_is_better",
    "normalize_ref",
    "parse_ref",
    "parse_version",
]

#: The alias promotion moves and serving follows unless told otherwise.
DEFAULT_ALIAS = "production"
#: A canary's abort rule unless told otherwise (:mod:`loraops.registry.canary`); here, in this light module,
#: so that ``loraops canary --help`` shows them without loading SQLAlchemy.
DEFAULT_MAX_ERROR_MARGIN = 0.05
DEFAULT_MIN_REQUESTS = 20
_VERSION = re.compile(r"^[vV]?([0-9]+)$")


def parse_version(value: str | int) -> int:
    match = _VERSION.match(str(value).strip())
    if not match or int(match.group(1)) < 1:
        raise LoraopsError(f"invalid version {value!r}: expected a positive number like 3 or v3")
    return int(match.group(1))


class Bare(enum.Enum):
    """What a bare ``NAME`` means to the one who reads it."""

    #: The newest registered version (the registry, the CLI).
    LATEST = "latest"
    #: ``NAME@production``: the version the default alias points to, followed as it moves (serving).
    DEFAULT_ALIAS = DEFAULT_ALIAS


@dataclass(frozen=True)
class Ref:
    """A parsed reference: ``name`` plus at most one of ``alias`` and ``version``; neither means the latest version."""

    name: str
    alias: str | None = None
    version: int | None = None

    @classmethod
    def parse(cls, text: str, bare: Bare) -> Ref:
        """``NAME`` | ``NAME@ALIAS`` | ``NAME:VERSION``; a bare ``NAME`` means what ``bare`` says."""
        if "@" in text:
            name, alias = text.split("@", 1)
            return cls(validate_name(name), alias=validate_name(alias, "alias"))
        if ":" in text:
            name, version = text.split(":", 1)
            return cls(validate_name(name), version=parse_version(version))
        name = validate_name(text)
        return cls(name, alias=DEFAULT_ALIAS) if bare is Bare.DEFAULT_ALIAS else cls(name)

    @property
    def pinned(self) -> bool:
        """``NAME:VERSION``: exactly that version, never moved by an alias or a canary."""
        return self.version is not None

    @property
    def latest(self) -> bool:
        return self.alias is None and self.version is None

    def __str__(self) -> str:
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return f"{self.name}:{self.version}" if self.version is not None else self.name


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """``NAME`` (latest) | ``NAME@ALIAS`` | ``NAME:VERSION`` -> (name, alias or None, version or None)."""
    parsed = Ref.parse(ref, bare=Bare.LATEST)
    return parsed.name, parsed.alias, parsed.version


def normalize_ref(ref: str) -> str:
    """A reference as serving reads it: a bare ``NAME`` becomes ``NAME@production``; any other is kept as written."""
    parsed = Ref.parse(ref, bare=Bare.LATEST)
    return str(Ref.parse(ref, bare=Bare.DEFAULT_ALIAS)) if parsed.latest else ref


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
