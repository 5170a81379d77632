"""Adapter registry: versions with lineage and checksums, aliases, gated promotion, rollback.

    from loraops.registry import Registry

    registry = Registry()                      # workspace SQLite + WORKSPACE/registry by default
    v = registry.register("runs/demo/adapter", "dialogsum", metrics={"rougeL": 41.2})
    registry.promote("dialogsum", v.version, if_better="eval_loss")
    path = registry.resolve("dialogsum@production")   # verified local folder for PEFT

See :mod:`loraops.registry.api` for the concepts. The names below are imported lazily, so
``import loraops.registry.cli`` (done by ``loraops --help``) does not load SQLAlchemy or pyarrow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AdapterInfo",
    "AliasChange",
    "AliasEvent",
    "ArtifactStore",
    "IntegrityError",
    "Lineage",
    "ModelVersion",
    "PromotionRefused",
    "Registry",
    "data_fingerprint",
    "lower_is_better",
    "parse_ref",
    "read_best_trial",
    "read_run_folder",
    "validate_name",
]
#: Where each public name lives; everything not from the store comes from the API module.
_EXPORTS = {name: "loraops.registry.store" if name in ("ArtifactStore", "IntegrityError") else "loraops.registry.api" for name in __all__}

if TYPE_CHECKING:
    from loraops.registry.api import (
        AdapterInfo,
        AliasChange,
        AliasEvent,
        Lineage,
        ModelVersion,
        PromotionRefused,
        Registry,
        data_fingerprint,
        lower_is_better,
        parse_ref,
        read_best_trial,
        read_run_folder,
        validate_name,
    )
    from loraops.registry.store import ArtifactStore, IntegrityError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loraops.registry' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
