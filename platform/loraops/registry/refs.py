"""Adapter names, registry references and metrics: parsing and checking, without a database.

References: ``NAME`` (the latest version), ``NAME@ALIAS`` and ``NAME:VERSION`` (``NAME:3`` or
``NAME:v3``). Names and aliases follow :data:`loraops.layout.NAME_RULE`. A bare ``NAME`` given
to serving means ``NAME@production`` (:data:`DEFAULT_ALIAS`).

``--if-better METRIC`` direction: metrics whose name contains ``loss`` or ``perplexity`` are
better when lower; every other metric (ROUGE, accuracy, ...) is better when higher.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from loraops.errors import LoraopsError
from loraops.layout import validate_name

#: The alias promotion moves and serving follows unless told otherwise.
DEFAULT_ALIAS = "production"
#: Name fragments of metrics where lower is better; any other metric is better when higher.
LOWER_IS_BETTER = ("loss", "perplexity")
_VERSION = re.compile(r"^[vV]?([0-9]+)$")


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
