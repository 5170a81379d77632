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

_EXPORTS = {
    "Registry": "loraops.registry.api",
    "ModelVersion": "loraops.registry.api",
    "AdapterInfo": "loraops.registry.api",
    "AliasEvent": "loraops.registry.api",
    "AliasChange": "loraops.registry.api",
    "Lineage": "loraops.registry.api",
    "PromotionRefused": "loraops.registry.api",
    "data_fingerprint": "loraops.registry.api",
    "lower_is_better": "loraops.registry.api",
    "parse_ref": "loraops.registry.api",
    "validate_name": "loraops.registry.api",
    "read_best_trial": "loraops.registry.api",
    "read_run_folder": "loraops.registry.api",
    "ArtifactStore": "loraops.registry.store",
    "IntegrityError": "loraops.registry.store",
}

__all__ = sorted(_EXPORTS)

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
