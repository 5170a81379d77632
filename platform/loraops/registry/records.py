"""What the registry API returns: plain records of versions, adapters and alias changes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from loraops.registry.db import VersionRow

if TYPE_CHECKING:
    from loraops.registry.store import Manifest


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
    files: Manifest
    aliases: list[str] = field(default_factory=list)
    #: The resolved training config the adapter was made with (None for versions registered without one).
    config: dict[str, Any] | None = None
    #: Set by ``register`` only: the latest earlier version whose files are byte for byte these
    #: (the same adapter registered again); the new version is still created, as registries do.
    same_files_as: int | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def label(self) -> str:
        """How errors about its files name it: the reference and where the files are."""
        return f"{self.ref} ({self.artifact_uri})"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        if self.same_files_as is None:
            del data["same_files_as"]  # known at registration only: other answers do not claim "no duplicate"
        return data

    @classmethod
    def from_row(cls, row: VersionRow, name: str, aliases: list[str]) -> ModelVersion:
        return cls(
            name=name,
            version=row.version,
            created_at=utc(row.created_at),
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


def utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; they were written in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def same_files_as(versions: list[ModelVersion], version: ModelVersion) -> int | None:
    """The latest of ``versions`` before ``version`` with the same files (paths, sizes, sha256), if any."""
    earlier = [other for other in versions if other.version < version.version and other.files == version.files]
    return earlier[-1].version if earlier else None
