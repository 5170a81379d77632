"""The adapter registry: versioned LoRA adapters with lineage, aliases, gated promotion, rollback.

Concepts (close to MLflow's model registry with aliases):

- An **adapter** is a name, e.g. ``dialogsum-phi2``, following :data:`loraops.layout.NAME_RULE`
  (so a name is always one safe path component of the artifact store).
- A **version** (1, 2, 3, ...) is immutable: a copy of the adapter's files in registry storage
  with the sha256 of each, the base model, quantization and LoRA configs, hyperparameters,
  metrics (eval loss, ROUGE, ...), the data source and its fingerprint, and its lineage
  (experiment, trial id, the folder it was registered from; see :mod:`loraops.registry.lineage`).
- An **alias** (``production``, ``staging``, ...) points at one version; serving follows an alias.
  Every alias change is appended to an audit log (when, who, from, to, why).

- A **canary** sends a share of an alias's traffic to a candidate version until it is promoted
  or aborted (:mod:`loraops.registry.canary`).

References and the ``--if-better`` direction: :mod:`loraops.registry.refs`; alias moves, the rollback
stack and the ``--if-better`` comparison inside a transaction: :mod:`loraops.registry.aliases`.
"""

from __future__ import annotations

import getpass
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from loraops import config as lconfig
from loraops.errors import LoraopsError
from loraops.layout import NOT_ADAPTER_FILES, check_adapter_dir, validate_name
from loraops.registry import aliases, canary, db
from loraops.registry.aliases import PromotionRefused
from loraops.registry.canary import CanaryState, CanaryStatus, Totals
from loraops.registry.db import AdapterRow, AliasEventRow, AliasRow, VersionRow
from loraops.registry.lineage import Lineage, read_best_trial, read_run_folder
from loraops.registry.records import AdapterInfo, AliasChange, AliasEvent, ModelVersion, same_files_as, utc
from loraops.registry.refs import DEFAULT_ALIAS, Bare, Ref, parse_metrics, parse_version
from loraops.registry.store import ArtifactStore, IntegrityError, StagedUpload

#: PromotionRefused lives with the alias logic in :mod:`loraops.registry.aliases`; it stays importable from here.
__all__ = ["PromotionRefused", "Registry", "default_actor"]

log = logging.getLogger(__name__)


def default_actor() -> str | None:
    """The OS user, for the audit log; None where the platform cannot tell."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # e.g. a container uid without a passwd entry
        return os.environ.get("USER") or None


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
        fields = lineage.version_fields(source, actor or default_actor())
        self.store.check()
        staged = self.store.stage(name, source, skip=NOT_ADAPTER_FILES)
        try:
            row = self._commit_version(name, staged, fields)
        except BaseException:
            self.store.delete(staged.path)  # best effort: a store that is down keeps it until a later sweep
            raise
        self.store.sweep_staging(name)  # what failed registrations of this name could not remove (over an hour old)
        log.debug("registered %s:%d (%d files) from %s", name, row.version, len(row.files), source)
        version = ModelVersion.from_row(row, name, [])
        version.same_files_as = same_files_as(self.versions(name), version)
        return version

    def register_from_experiment(
        self,
        experiment: str | os.PathLike,
        name: str,
        metrics: dict[str, Any] | str | None = None,
        *,
        description: str | None = None,
        actor: str | None = None,
    ) -> ModelVersion:
        """Register the best trial of a tune experiment (a folder or a storage URI), with its metrics and lineage."""
        validate_name(name)
        with tempfile.TemporaryDirectory(prefix="loraops-register-") as download:  # a remote experiment's checkpoint
            adapter, lineage = read_best_trial(experiment, Path(download))
            return self.register(adapter, name, metrics, lineage=lineage, description=description, actor=actor)

    def _commit_version(self, name: str, staged: StagedUpload, fields: dict[str, Any]) -> VersionRow:
        """Give the staged files the next version number, retrying when concurrent writers collide."""
        adapter_id = self._ensure_adapter(name)
        for attempt in range(1, db.WRITE_ATTEMPTS + 1):
            try:
                return self._allocate_and_publish(adapter_id, name, staged, fields)
            except DBAPIError as exc:
                if not db.is_contention(exc) or attempt == db.WRITE_ATTEMPTS:
                    raise db.failure(exc, self.engine) from None
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
                try:
                    self.store.move(final, staged.path, staged.manifest)
                except OSError:  # the store failed too: the files at vN go with the next publish of that number
                    log.debug("could not move %s back to %s", final, staged.path)
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
                    select(VersionRow).where(
                        VersionRow.adapter_id == adapter_id, VersionRow.version == number, VersionRow.artifact_uri == self.store.uri_of(path)
                    )
                ).one_or_none()
        except (DBAPIError, db.DatabaseError):
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
                AdapterInfo(row.name, utc(row.created_at), counts.get(row.id, 0), latest.get(row.id), aliases.get(row.id, {}))
                for row in session.scalars(select(AdapterRow).order_by(AdapterRow.name))
            ]

    def adapter(self, name: str) -> AdapterInfo:
        """One adapter's summary; unknown names are an error."""
        validate_name(name)
        for info in self.list_adapters():
            if info.name == name:
                return info
        with db.read_session(self.engine) as session:
            raise aliases.unknown_adapter(session, name)

    def versions(self, name: str) -> list[ModelVersion]:
        """All versions of ``name``, oldest first."""
        validate_name(name)
        with db.read_session(self.engine) as session:
            adapter = aliases.adapter_row(session, name)
            by_version = aliases.aliases_by_version(session, adapter.id)
            return [ModelVersion.from_row(row, name, by_version.get(row.version, [])) for row in adapter.versions]

    def get(self, ref: str) -> ModelVersion:
        """The version ``ref`` names: ``NAME`` (latest), ``NAME@ALIAS`` or ``NAME:VERSION``."""
        parsed = Ref.parse(ref, bare=Bare.LATEST)
        name, alias, number = parsed.name, parsed.alias, parsed.version
        with db.read_session(self.engine) as session:
            adapter = aliases.adapter_row(session, name)
            if alias is not None:
                number = aliases.alias_target(session, adapter, alias)
            row = aliases.version_of(session, adapter, number)
            return ModelVersion.from_row(row, name, aliases.aliases_by_version(session, adapter.id).get(row.version, []))

    def resolve(self, ref: str | ModelVersion) -> Path:
        """A local folder with the verified files of ``ref`` (a reference, or a version already read), ready to load with PEFT.

        A local store is read in place; a remote one is downloaded once into
        ``WORKSPACE/cache/registry/sha256-DIGEST`` (:meth:`ArtifactStore.local_copy`). Every call checks each file's sha256 against the
        database and raises :class:`~loraops.registry.store.IntegrityError` naming the first bad
        file: a corrupt adapter is never handed out.
        """
        version = ref if isinstance(ref, ModelVersion) else self.get(ref)
        stored = self.store.version_path(version.name, version.version)
        return self.store.local_copy(stored, version.files, self.workspace / "cache" / "registry", version.label)

    def verify(self, ref: str) -> ModelVersion:
        """Re-hash every stored file of ``ref`` against the sha256 recorded at registration.

        Reads the artifact store itself (never a local cache), so it tells whether a replica
        that loads this version now would get intact files. Returns the version when all match;
        raises :class:`~loraops.registry.store.IntegrityError` naming the first missing or altered
        file, or a :class:`LoraopsError` when the store cannot be read at all.
        """
        version = self.get(ref)
        self._verify_stored(version)
        return version

    def _verify_stored(self, version: ModelVersion) -> None:
        self.store.verify(self.store.version_path(version.name, version.version), version.files, version.label)

    def _verified_target(self, name: str, number: int, refusal: str) -> None:
        """Refuse to point an alias at a version whose files would not load (serving would fail on it)."""
        version = self.get(f"{name}:{number}")  # outside the try: an unknown version is an error of its own
        try:
            self._verify_stored(version)
        except IntegrityError as exc:
            raise IntegrityError(f"{refusal}: its artifacts fail verification: {exc}") from None
        except LoraopsError as exc:  # e.g. the store is unreachable: nothing is known about the files
            raise LoraopsError(f"{refusal}: its artifacts cannot be verified: {exc}") from None

    def audit_log(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        """Every alias change of ``name`` (optionally of one alias), oldest first."""
        validate_name(name)
        if alias is not None:
            validate_name(alias, "alias")
        with db.read_session(self.engine) as session:
            adapter = aliases.adapter_row(session, name)
            query = select(AliasEventRow).where(AliasEventRow.adapter_id == adapter.id)
            if alias is not None:
                query = query.where(AliasEventRow.alias == alias)
            return [
                AliasEvent(name, e.alias, utc(e.at), e.actor, e.action, e.from_version, e.to_version, e.reason)
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
        # Hashing takes a while: done before the write transaction, so no lock is held meanwhile
        # (versions are immutable, so the check stays true until the alias moves).
        self._verified_target(name, number, f"refusing to promote {name}:{number} to {alias}")

        def work(session: Session) -> AliasChange:
            adapter = aliases.adapter_row(session, name, lock=True)
            candidate = aliases.version_of(session, adapter, number)
            current = session.get(AliasRow, (adapter.id, alias))
            previous = current.version if current else None
            if previous == number:
                return AliasChange(name, alias, number, previous, False, f"{name}@{alias} already points to version {number}")
            verdict = ""
            if if_better and previous is not None:
                verdict = aliases.compare(session, adapter, candidate, previous, alias, if_better, higher_is_better)
            aliases.move_alias(session, adapter.id, alias, number, previous, "promote", actor, reason)
            moved = f"{name}@{alias}: version {previous if previous is not None else '(none)'} -> {number}"
            return AliasChange(name, alias, number, previous, True, f"{moved}{verdict}")

        return db.run_write(self.engine, work)

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS, actor: str | None = None, reason: str | None = None) -> AliasChange:
        """Point ``NAME@alias`` back at the version it had before its latest promotion.

        The audit log is read as a stack: a promotion pushes its version, a rollback pops one.
        So repeated rollbacks walk back through earlier targets (3 -> 2 -> 1) instead of
        toggling between the last two; with nothing earlier it is an error. A target whose
        files fail verification is refused (:class:`~loraops.registry.store.IntegrityError`).
        """
        validate_name(name)
        validate_name(alias, "alias")
        actor = actor or default_actor()
        for _ in range(db.WRITE_ATTEMPTS):
            # Plan, verify the target's files without holding a lock, then move the alias only if
            # the plan still holds (another rollback or promotion may have moved it meanwhile).
            with db.read_session(self.engine) as session:
                planned, _ = aliases.rollback_target(session, name, alias, lock=False)
            self._verified_target(name, planned, f"refusing to roll back {name}@{alias} to version {planned}")

            def work(session: Session, planned: int = planned) -> AliasChange | None:
                target, adapter_id = aliases.rollback_target(session, name, alias, lock=True)
                if target != planned:
                    return None
                previous = session.get(AliasRow, (adapter_id, alias)).version  # read before move_alias updates the row
                aliases.move_alias(session, adapter_id, alias, target, previous, "rollback", actor, reason)
                return AliasChange(name, alias, target, previous, True, f"{name}@{alias}: rolled back from version {previous} to {target}")

            change = db.run_write(self.engine, work)
            if change is not None:
                return change
        raise LoraopsError(f"{name}@{alias} kept changing during the rollback; try again")

    # --- canaries (the logic is in loraops.registry.canary) -----------------------------------------

    def start_canary(
        self,
        ref: str,
        percent: float,
        alias: str = DEFAULT_ALIAS,
        max_error_margin: float = canary.DEFAULT_MAX_ERROR_MARGIN,
        min_requests: int = canary.DEFAULT_MIN_REQUESTS,
        actor: str | None = None,
        reason: str | None = None,
    ) -> CanaryState:
        """Send ``percent``% of ``NAME@alias``'s traffic to ``ref`` (``NAME:VERSION``), whose files must verify."""
        parsed = Ref.parse(ref, bare=Bare.LATEST)
        name, number = parsed.name, parsed.version
        if not parsed.pinned:
            raise LoraopsError(f"a canary needs a NAME:VERSION reference, got {ref!r}")
        validate_name(alias, "alias")
        canary.check_settings(percent, max_error_margin, min_requests)
        self._verified_target(name, number, f"refusing to start a canary of {name}:{number}")
        actor = actor or default_actor()
        return db.run_write(self.engine, lambda s: canary.start(s, name, number, alias, percent, max_error_margin, min_requests, actor, reason))

    def canary(self, name: str) -> CanaryState | None:
        """The running canary of ``name``, or None."""
        validate_name(name)
        with db.read_session(self.engine) as session:
            return canary.current(session, name)

    def running_canaries(self) -> list[CanaryState]:
        """Every running canary, of every adapter, oldest first."""
        with db.read_session(self.engine) as session:
            return canary.all_running(session)

    def canary_status(self, name: str) -> CanaryStatus:
        """The running canary of ``name`` (else the last one that ended) with both versions' figures."""
        validate_name(name)
        with db.read_session(self.engine) as session:
            return canary.status(session, name)

    def promote_canary(self, name: str, actor: str | None = None, reason: str | None = None, force: bool = False) -> AliasChange:
        """Move the canary's alias to its candidate (audited as ``canary-promote``) and end the canary as promoted
        (refused when it answered no requests, unless ``force``)."""
        running = self.canary(name)
        if running is None:
            raise canary.no_running_canary(name)
        self._verified_target(name, running.candidate, f"refusing to promote {name}:{running.candidate}")
        return db.run_write(self.engine, lambda s: canary.promote(s, running, actor or default_actor(), reason, force))

    def abort_canary(self, name: str, actor: str | None = None, reason: str | None = None, canary_id: int | None = None) -> CanaryState | None:
        """End the running canary of ``name`` as aborted. With ``canary_id``, only that one (None when it already ended)."""
        validate_name(name)
        return db.run_write(self.engine, lambda s: canary.abort(s, name, actor or default_actor(), reason, canary_id))

    def record_canary_stats(self, canary_id: int, reporter: str, version: int, totals: Totals) -> None:
        """Upsert one reporter's cumulative totals of one version (idempotent: a repeated flush counts once)."""
        db.run_write(self.engine, lambda s: canary.upsert_stats(s, canary_id, reporter, version, totals))

    def record_canary_load(self, canary_id: int, replica: str, error: str | None, poll_s: float | None = None, beat: bool = False) -> None:
        """Record that a model replica loaded the canary's candidate (``error`` None), or why it could not."""
        db.run_write(self.engine, lambda s: canary.upsert_load(s, canary_id, replica, error, poll_s, beat))
