"""The registry's metadata: SQLAlchemy 2.0 tables, engines and transactions.

One database holds adapters, their versions, the aliases that point at versions and an
append-only audit log of alias changes. It is a SQLite file in the workspace by default and a
PostgreSQL server (``postgresql+psycopg2://...``) on a cluster; the tables carry a
``registry_`` prefix so the same database can also hold Optuna's study tables.

Tables are created on first use. Writers go through :func:`write_transaction`, which serialises
them per database: ``BEGIN IMMEDIATE`` on SQLite (the write lock is taken up front, so two
writers never deadlock upgrading a read lock), and on PostgreSQL the callers lock the adapter row
with ``SELECT ... FOR UPDATE``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import JSON, DateTime, Engine, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from loraops.errors import LoraopsError

T = TypeVar("T")

#: Seconds a SQLite writer waits for another writer's lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 60
#: Attempts of a write transaction that failed only because another writer got in the way.
WRITE_ATTEMPTS = 8
#: Arbitrary constant key of the PostgreSQL advisory lock that serialises table creation.
_SCHEMA_LOCK_KEY = 0x10A0_0B5


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


# --- engines -----------------------------------------------------------------------------------

_engines: dict[tuple[int, str], Engine] = {}
_engines_lock = threading.Lock()


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def get_engine(url: str) -> Engine:
    """The engine for ``url`` in this process, with the registry tables created on first use."""
    key = (os.getpid(), url)  # a forked child must not reuse its parent's connections
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _create_engine(url)
            _create_tables(engine)
            _engines[key] = engine
        return engine


def _create_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise LoraopsError(f"not a database URL: {url!r} (expected e.g. sqlite:///path/loraops.db or postgresql+psycopg2://user@host/db)") from None
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
    engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
    _take_over_sqlite_transactions(engine)
    return engine


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
        mode = "IMMEDIATE" if connection.get_execution_options().get("loraops_write") else "DEFERRED"
        connection.exec_driver_sql(f"BEGIN {mode}")


def _create_tables(engine: Engine) -> None:
    """CREATE TABLE IF NOT EXISTS, serialised so that many processes starting at once don't race."""

    def create(session: Session) -> None:
        if engine.dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        Base.metadata.create_all(session.connection())
        _add_missing_columns(session)

    try:
        run_write(engine, create)
    except OperationalError as exc:
        raise LoraopsError(f"cannot open the registry database {engine.url.render_as_string(hide_password=True)}: {exc.orig}") from None


#: Columns added after the first release: (table, column). Databases created before get them on
#: first use (nullable, so existing rows stay valid); create_all only creates missing tables.
_ADDED_COLUMNS = (("registry_versions", "config"),)


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
    """A session for reading; objects stay usable after it closes."""
    with Session(engine, expire_on_commit=False) as session:
        yield session


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Session]:
    """One write transaction: committed at the end of the block, rolled back on an exception."""
    bind = engine.execution_options(loraops_write=True) if is_sqlite(engine) else engine
    with Session(bind, expire_on_commit=False) as session, session.begin():
        yield session


def is_contention(exc: Exception) -> bool:
    """True for failures that only mean another writer got there first (worth a retry)."""
    if isinstance(exc, IntegrityError):
        return True
    if isinstance(exc, DBAPIError):
        message = str(exc.orig).lower()
        return any(word in message for word in ("database is locked", "deadlock detected", "could not serialize", "busy"))
    return False


def run_write(engine: Engine, work: Callable[[Session], T], attempts: int = WRITE_ATTEMPTS) -> T:
    """Run ``work`` in a write transaction, retrying (with backoff) when a concurrent writer collides.

    ``work`` must be safe to repeat: it runs from scratch in a fresh transaction each time.
    """
    for attempt in range(1, attempts + 1):
        try:
            with write_transaction(engine) as session:
                return work(session)
        except (IntegrityError, OperationalError, DBAPIError) as exc:
            if attempt == attempts or not is_contention(exc):
                raise
            time.sleep(min(0.05 * 2**attempt, 2.0))
    raise AssertionError("unreachable")


def dispose_engine(url: str) -> None:
    """Close this process's pooled connections to ``url`` (e.g. before dropping that database)."""
    with _engines_lock:
        engine = _engines.pop((os.getpid(), url), None)
    if engine is not None:
        engine.dispose()
