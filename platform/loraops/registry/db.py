"""The registry's metadata: SQLAlchemy 2.0 tables, engines and transactions.

One database holds adapters, their versions, the aliases that point at versions, an
append-only audit log of alias changes, and canaries with their per-version statistics. It is a
SQLite file in the workspace by default and a PostgreSQL server (``postgresql://...``, through psycopg2) on a cluster; the tables carry a
``registry_`` prefix so the same database can also hold Optuna's study tables.

Tables are created on first use. Writers go through :func:`write_transaction`, which serialises
them per database: ``BEGIN IMMEDIATE`` on SQLite (the write lock is taken up front, so two
writers never deadlock upgrading a read lock), and on PostgreSQL the callers lock the adapter row
with ``SELECT ... FOR UPDATE``.

Waits are bounded (:mod:`loraops.registry.bounds`): a SQLite lock held by another process is waited
for ``SQLITE_BUSY_TIMEOUT_S`` (``?timeout=SECONDS`` in the URL changes it), a PostgreSQL server
for ``POSTGRES_CONNECT_TIMEOUT_S`` to connect (``?connect_timeout=SECONDS``) and for its
``statement_timeout`` to answer each call, even when frozen. A database that cannot be reached,
opened or written, or stays locked or silent, is a :class:`DatabaseError` naming it in one line.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import JSON, DateTime, Engine, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from loraops.config import display_url, normalize_database_url
from loraops.errors import LoraopsError
from loraops.registry.bounds import SQLITE_BUSY_TIMEOUT_S, postgres_connect_args

log = logging.getLogger(__name__)
T = TypeVar("T")

#: What error messages offer instead of an unusable URL.
SUPPORTED_URLS = "sqlite:///PATH and postgresql://USER@HOST/DB (driver psycopg2, installed with loraops)"
#: A writer that has waited this long for the lock says so, so a long wait is never silent.
LOCK_WAIT_NOTICE_S = 2.0
#: Attempts of a write transaction that failed only because another writer got in the way.
WRITE_ATTEMPTS = 8
#: Arbitrary constant key of the PostgreSQL advisory lock that serialises table creation.
_SCHEMA_LOCK_KEY = 0x10A0_0B5


class DatabaseError(LoraopsError):
    """The database cannot be reached, opened or written, or another process held its lock too long."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class AdapterRow(Base):
    """A registered adapter: a name and a counter of the versions allocated so far."""

    __tablename__ = "registry_adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    # Incremented under the row lock in the transaction that inserts the version row, so a
    # rolled-back registration gives its number back and numbers stay consecutive.
    last_version: Mapped[int] = mapped_column(Integer, default=0, nullable=False)

    versions: Mapped[list[VersionRow]] = relationship(back_populates="adapter", order_by="VersionRow.version")


class VersionRow(Base):
    """One immutable version: where its files are, their checksums, and how it was made."""

    __tablename__ = "registry_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "version", name="uq_registry_versions_adapter_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("registry_adapters.id"), nullable=False, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    created_by: Mapped[str | None] = mapped_column(String(128))
    description: Mapped[str | None] = mapped_column(Text)
    base_model: Mapped[str | None] = mapped_column(Text)
    quantization: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    lora: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    hyperparameters: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    data_source: Mapped[str | None] = mapped_column(Text)
    data_fingerprint: Mapped[str | None] = mapped_column(String(64))
    experiment: Mapped[str | None] = mapped_column(Text)
    trial_id: Mapped[str | None] = mapped_column(String(256))
    source_path: Mapped[str | None] = mapped_column(Text)
    #: The full resolved training config (model, quantization, prompt template, ...): what a
    #: serving replica needs to rebuild the model the adapter was trained on.
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    artifact_uri: Mapped[str] = mapped_column(Text, nullable=False)
    #: {relative path: {"sha256": hex, "size": bytes}} for every file of the version.
    files: Mapped[dict[str, dict[str, Any]]] = mapped_column(JSON, nullable=False)

    adapter: Mapped[AdapterRow] = relationship(back_populates="versions")


class AliasRow(Base):
    """adapter + alias -> version number (e.g. ``summarizer@production`` -> 3)."""

    __tablename__ = "registry_aliases"

    adapter_id: Mapped[int] = mapped_column(ForeignKey("registry_adapters.id"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)


class AliasEventRow(Base):
    """One alias change. Rows are only ever inserted: the registry code has no update or delete."""

    __tablename__ = "registry_alias_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("registry_adapters.id"), nullable=False, index=True)
    alias: Mapped[str] = mapped_column(String(128), nullable=False)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    actor: Mapped[str | None] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(16), nullable=False)  # "promote" or "rollback"
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int] = mapped_column(Integer, nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)


class CanaryRow(Base):
    """A canary: a candidate version taking ``percent``% of an alias's traffic (see :mod:`loraops.registry.canary`).

    The row is its own audit record: who started and ended it, when and why.
    """

    __tablename__ = "registry_canaries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("registry_adapters.id"), nullable=False, index=True)
    candidate: Mapped[int] = mapped_column(Integer, nullable=False)
    baseline: Mapped[int] = mapped_column(Integer, nullable=False)
    alias: Mapped[str] = mapped_column(String(128), nullable=False)
    percent: Mapped[float] = mapped_column(Float, nullable=False)
    max_error_margin: Mapped[float] = mapped_column(Float, nullable=False)
    min_requests: Mapped[int] = mapped_column(Integer, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)  # "running", "promoted" or "aborted"
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    actor: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_by: Mapped[str | None] = mapped_column(String(128))
    end_reason: Mapped[str | None] = mapped_column(Text)


class CanaryStatsRow(Base):
    """One reporter's (serving process's) cumulative totals for one version during a canary, overwritten on each flush."""

    __tablename__ = "registry_canary_stats"

    canary_id: Mapped[int] = mapped_column(ForeignKey("registry_canaries.id"), primary_key=True)
    reporter: Mapped[str] = mapped_column(String(256), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    requests: Mapped[int] = mapped_column(Integer, nullable=False)
    errors: Mapped[int] = mapped_column(Integer, nullable=False)
    completion_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    #: Counts per latency bucket over :data:`loraops.registry.canary.LATENCY_BOUNDS_S` (one more for the overflow).
    latency_counts: Mapped[list[int]] = mapped_column(JSON, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)


class CanaryLoadRow(Base):
    """Whether one model replica has loaded a canary's candidate, or why it could not (its last try), written as it changes."""

    __tablename__ = "registry_canary_loads"

    canary_id: Mapped[int] = mapped_column(ForeignKey("registry_canaries.id"), primary_key=True)
    replica: Mapped[str] = mapped_column(String(256), primary_key=True)
    error: Mapped[str | None] = mapped_column(Text)  # None: loaded
    attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    #: The replica's heartbeat: its last poll during the canary, and its poll interval (None: written before heartbeats).
    seen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    poll_s: Mapped[float | None] = mapped_column(Float)


# --- engines -----------------------------------------------------------------------------------

_engines: dict[tuple[int, str], Engine] = {}
_engines_lock = threading.Lock()


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def get_engine(url: str) -> Engine:
    """The engine for ``url`` in this process, with the registry tables created on first use."""
    key = (os.getpid(), normalize_database_url(url))  # a forked child must not reuse its parent's connections
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _create_engine(key[1])
            _create_tables(engine)
            _engines[key] = engine
        return engine


def _create_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise LoraopsError(f"not a database URL: {url!r} (expected e.g. sqlite:///path/loraops.db or postgresql://user@host/db)") from None
    try:
        if parsed.get_backend_name() != "sqlite":
            bounds = postgres_connect_args(dict(parsed.query)) if parsed.get_backend_name() == "postgresql" else {}
            return create_engine(parsed, pool_pre_ping=True, connect_args=bounds)
        _make_sqlite_folder(parsed)
        # The URL's own ?timeout= wins; connect_args would override it.
        engine = create_engine(parsed, connect_args={} if "timeout" in parsed.query else {"timeout": SQLITE_BUSY_TIMEOUT_S})
    except (ArgumentError, ImportError) as exc:  # an unknown dialect (NoSuchModuleError) or a driver that is not installed
        raise LoraopsError(f"cannot use the database URL {display_url(parsed)}: {exc}; loraops supports {SUPPORTED_URLS}") from None
    _take_over_sqlite_transactions(engine)
    return engine


def _make_sqlite_folder(url: URL) -> None:
    """Create the folder of a SQLite file (not of ``:memory:`` or a ``file:`` URI, which sqlite3 opens itself)."""
    if not url.database or url.database == ":memory:" or url.query.get("uri") == "true":
        return
    folder = os.path.dirname(os.path.abspath(url.database))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise DatabaseError(f"cannot create the folder {folder} of the database {display_url(url)}: {exc.strerror}") from None


def sqlite_timeout(url: URL) -> float:
    """Seconds a SQLite connection to ``url`` waits for a lock."""
    raw = url.query.get("timeout")
    try:
        return float(raw) if isinstance(raw, str) else SQLITE_BUSY_TIMEOUT_S
    except ValueError:
        return SQLITE_BUSY_TIMEOUT_S


def failure(exc: DBAPIError, engine: Engine) -> Exception:
    """What to raise for ``exc``: a :class:`DatabaseError` when the database itself failed, else ``exc``."""
    return database_error(exc, engine.url) if isinstance(exc, (OperationalError, InterfaceError)) else exc


def database_error(exc: DBAPIError, url: URL) -> DatabaseError:
    """One line for a database that cannot be reached, opened or written, or stays locked."""
    where = display_url(url)
    detail = " ".join(str(exc.orig).split())  # drivers' messages span lines (psycopg2 adds a hint line)
    lowered = detail.lower()
    if url.get_backend_name() == "sqlite" and "database is locked" in lowered:
        return DatabaseError(
            f"the database {where} is locked by another process: gave up after {sqlite_timeout(url):g} s "
            "(retry when that process is done, or wait longer with ?timeout=SECONDS in the database URL)"
        )
    if "readonly database" in lowered or "read-only" in lowered:
        return DatabaseError(f"the database {where} is read-only ({detail}): check the permissions of the file and its folder, or use a writable copy")
    if "unable to open database file" in lowered:
        return DatabaseError(f"cannot open the database {where}: {detail} (does its folder exist, and may this user write there?)")
    return DatabaseError(f"cannot use the database {where}: {detail}")


@contextmanager
def database_errors(engine_or_url: Engine | str) -> Iterator[None]:
    """Turn SQLAlchemy's connection-level failures in the block into a :class:`DatabaseError`.

    Only failures of the database itself (unreachable, locked, read-only, gone) are converted;
    constraint violations and programming errors stay what they are.
    """
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else normalize_database_url(engine_or_url)
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        raise database_error(exc, make_url(url)) from None
    except (ArgumentError, ImportError) as exc:  # a URL of an unknown dialect, or of a driver that is not installed
        raise LoraopsError(f"cannot use the database URL {display_url(url)}: {exc}; loraops supports {SUPPORTED_URLS}") from None


def _take_over_sqlite_transactions(engine: Engine) -> None:
    """Let SQLAlchemy, not the sqlite3 module, emit BEGIN, so writers can say BEGIN IMMEDIATE.

    The sqlite3 module's own deferred BEGIN makes a writer take its write lock late; two writers
    that both read first then deadlock, and one fails at once with "database is locked" instead
    of waiting for the busy timeout. (SQLAlchemy's documented recipe for pysqlite.)
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        if not connection.get_execution_options().get("loraops_write"):
            connection.exec_driver_sql("BEGIN DEFERRED")
            return
        # Here a writer waits (up to the busy timeout) while another process holds the lock.
        notice = threading.Timer(LOCK_WAIT_NOTICE_S, _log_lock_wait, args=(engine,))
        notice.daemon = True
        notice.start()
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        finally:
            notice.cancel()


def _log_lock_wait(engine: Engine) -> None:
    log.warning("the database %s is locked by another process; waiting up to %g s for it", display_url(engine.url), sqlite_timeout(engine.url))


def _create_tables(engine: Engine) -> None:
    """CREATE TABLE IF NOT EXISTS, serialised so that many processes starting at once don't race.

    A database whose schema is already complete is only read: readers then need no write lock
    (so they neither wait for a writer nor fail on a read-only database).
    """

    def create(session: Session) -> None:
        if engine.dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        Base.metadata.create_all(session.connection())
        _add_missing_columns(session)

    with database_errors(engine), engine.connect() as connection:
        complete = not _missing_schema(inspect(connection))
    if not complete:
        run_write(engine, create)


def _missing_schema(inspector) -> list[str]:
    """Tables and added columns the database lacks, as ``table`` or ``table.column``."""
    tables = set(inspector.get_table_names())
    missing = [name for name in Base.metadata.tables if name not in tables]
    for table_name, column_name in _ADDED_COLUMNS:
        if table_name in tables and column_name not in {column["name"] for column in inspector.get_columns(table_name)}:
            missing.append(f"{table_name}.{column_name}")
    return missing


#: Columns added after the first release: (table, column). Databases created before get them on
#: first use (nullable, so existing rows stay valid); create_all only creates missing tables.
_ADDED_COLUMNS = (("registry_versions", "config"), ("registry_canary_loads", "seen_at"), ("registry_canary_loads", "poll_s"))


def _add_missing_columns(session: Session) -> None:
    connection = session.connection()
    inspector = inspect(connection)
    for table_name, column_name in _ADDED_COLUMNS:
        if column_name in {column["name"] for column in inspector.get_columns(table_name)}:
            continue
        column = Base.metadata.tables[table_name].columns[column_name]
        column_type = column.type.compile(dialect=connection.dialect)
        connection.execute(text(f"ALTER TABLE {table_name} ADD COLUMN {column_name} {column_type}"))


# --- transactions ------------------------------------------------------------------------------


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    """A session for reading; objects stay usable after it closes. Database failures: :class:`DatabaseError`."""
    with database_errors(engine), Session(engine, expire_on_commit=False) as session:
        yield session


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Session]:
    """One write transaction: committed at the end of the block, rolled back on an exception."""
    bind = engine.execution_options(loraops_write=True) if is_sqlite(engine) else engine
    with Session(bind, expire_on_commit=False) as session, session.begin():
        yield session


def is_contention(exc: Exception) -> bool:
    """True for failures that only mean another writer got there first (worth a retry).

    Not SQLite's "database is locked": writers take the lock with ``BEGIN IMMEDIATE`` and wait
    for it up to the busy timeout, so that error means the whole wait has already been spent.
    """
    if isinstance(exc, IntegrityError):
        return True
    if isinstance(exc, DBAPIError) and not isinstance(exc.orig, sqlite3.Error):
        message = str(exc.orig).lower()
        return any(word in message for word in ("deadlock detected", "could not serialize"))
    return False


def run_write(engine: Engine, work: Callable[[Session], T], attempts: int = WRITE_ATTEMPTS) -> T:
    """Run ``work`` in a write transaction, retrying (with backoff) when a concurrent writer collides.

    ``work`` must be safe to repeat: it runs from scratch in a fresh transaction each time.
    Database failures (unreachable, read-only, locked too long) are a :class:`DatabaseError`.
    """
    for attempt in range(1, attempts + 1):
        try:
            with write_transaction(engine) as session:
                return work(session)
        except DBAPIError as exc:
            if attempt < attempts and is_contention(exc):
                time.sleep(min(0.05 * 2**attempt, 2.0))
                continue
            raise failure(exc, engine) from None
    raise AssertionError("unreachable")


def dispose_engine(url: str) -> None:
    """Close this process's pooled connections to ``url`` (e.g. before dropping that database)."""
    with _engines_lock:
        engine = _engines.pop((os.getpid(), normalize_database_url(url)), None)
    if engine is not None:
        engine.dispose()
