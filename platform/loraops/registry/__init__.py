"""Adapter registry: versions with lineage and checksums, aliases, gated promotion, rollback.

    from loraops.registry import Registry

    registry = Registry()                      # workspace SQLite + WORKSPACE/registry by default
    v = registry.register("runs/demo/adapter", "dialogsum", metrics={"rougeL": 41.2})
    registry.promote("dialogsum", v.version, if_better="eval_loss")
    path = registry.resolve("dialogsum@production")   # verified local folder for PEFT

See :mod:`loraops.registry.api` for the concepts. The names below are imported lazily, so that
importing :mod:`loraops.registry.refs` (serve settings, the CLI) does not load SQLAlchemy or pyarrow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AdapterInfo",
    "AliasChange",
    "AliasEvent",
    "ArtifactStore",
    "CanaryState",
    "CanaryStatus",
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
#: Where each public name lives.
_EXPORTS = {
    "AdapterInfo": "loraops.registry.records",
    "AliasChange": "loraops.registry.records",
    "AliasEvent": "loraops.registry.records",
    "ArtifactStore": "loraops.registry.store",
    "CanaryState": "loraops.registry.canary",
    "CanaryStatus": "loraops.registry.canary",
    "IntegrityError": "loraops.registry.store",
    "Lineage": "loraops.registry.lineage",
    "ModelVersion": "loraops.registry.records",
    "PromotionRefused": "loraops.registry.aliases",
    "Registry": "loraops.registry.api",
    "data_fingerprint": "loraops.training.data",
    "lower_is_better": "loraops.metrics",
    "parse_ref": "loraops.registry.refs",
    "read_best_trial": "loraops.registry.lineage",
    "read_run_folder": "loraops.registry.lineage",
    "validate_name": "loraops.layout",
}

if TYPE_CHECKING:
    from loraops.layout import validate_name
    from loraops.metrics import lower_is_better
    from loraops.registry.aliases import PromotionRefused
    from loraops.registry.api import Registry
    from loraops.registry.canary import CanaryState, CanaryStatus
    from loraops.registry.lineage import Lineage, read_best_trial, read_run_folder
    from loraops.registry.records import AdapterInfo, AliasChange, AliasEvent, ModelVersion
    from loraops.registry.refs import parse_ref
    from loraops.registry.store import ArtifactStore, IntegrityError
    from loraops.training.data import data_fingerprint


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loraops.registry' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
