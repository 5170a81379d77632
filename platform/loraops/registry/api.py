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

References and the ``--if-better`` direction: :mod:`loraops.registry.refs`.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from loraops import config as lconfig
from loraops.errors import LoraopsError
from loraops.layout import NOT_ADAPTER_FILES, check_adapter_dir, validate_name
from loraops.registry import db
from loraops.registry.db import AdapterRow, AliasEventRow, AliasRow, VersionRow
from loraops.registry.lineage import Lineage, read_best_trial, read_run_folder
from loraops.registry.records import AdapterInfo, AliasChange, AliasEvent, ModelVersion, utc
from loraops.registry.refs import DEFAULT_ALIAS, lower_is_better, parse_metrics, parse_ref, parse_version
from loraops.registry.store import ArtifactStore, StagedUpload, verify_local

log = logging.getLogger(__name__)


class PromotionRefused(LoraopsError):
    """``--if-better`` found the candidate no better than the alias's current version."""


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
        staged = self.store.stage(name, source, skip=NOT_ADAPTER_FILES)
        try:
            row = self._commit_version(name, staged, fields)
        except BaseException:
            self.store.delete(staged.path)
            raise
        log.debug("registered %s:%d (%d files) from %s", name, row.version, len(row.files), source)
        return ModelVersion.from_row(row, name, [])

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
                AdapterInfo(row.name, utc(row.created_at), counts.get(row.id, 0), latest.get(row.id), aliases.get(row.id, {}))
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
            return [ModelVersion.from_row(row, name, aliases.get(row.version, [])) for row in adapter.versions]

    def get(self, ref: str) -> ModelVersion:
        """The version ``ref`` names: ``NAME`` (latest), ``NAME@ALIAS`` or ``NAME:VERSION``."""
        name, alias, number = parse_ref(ref)
        with db.read_session(self.engine) as session:
            adapter = self._adapter_row(session, name)
            if alias is not None:
                number = self._alias_target(session, adapter, alias)
            row = self._version_of(session, adapter, number)
            return ModelVersion.from_row(row, name, self._aliases_by_version(session, adapter.id).get(row.version, []))

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



def _metric(row: VersionRow, metric: str, name: str) -> float:
    value = (row.metrics or {}).get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        known = ", ".join(sorted(row.metrics or {})) or "none"
        raise PromotionRefused(f"cannot compare on {metric!r}: {name} v{row.version} has no such metric (its metrics: {known})")
    return float(value)
