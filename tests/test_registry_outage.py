"""Every registry database call is bounded (issue #29 item 2): a PostgreSQL server of the test's own is
frozen (SIGSTOP: its connections stay open, nothing answers) or holds a lock, and each call fails within
the statement timeout plus the watchdog's margin, with one clear error, instead of waiting for ever."""

from __future__ import annotations

import threading
import time

import pytest

pytestmark = pytest.mark.reliability

#: libpq's connect timeout the tests set (seconds): short, so that a frozen server fails fast.
CONNECT_S = 2


@pytest.fixture
def registry(postgres, make_run, tmp_path, request):
    """A registry on the test's own server, with ``drill:1`` registered and promoted, and a bounded URL: loraops'
    default statement timeout, or the one in milliseconds a test gives as the fixture's parameter (indirect)."""
    from loraops.registry import Registry
    from loraops.registry import db as registry_db

    url = f"{postgres.url}?connect_timeout={CONNECT_S}"
    if getattr(request, "param", None):
        url += f"&options=-c%20statement_timeout%3D{request.param}"  # libpq's own option: the URL's wins
    registry = Registry(db_url=url, artifact_uri=str(tmp_path / "store"), workspace=tmp_path / "ws")
    registry.register(make_run(tmp_path / "run", seed=1), "drill")
    registry.promote("drill", 1)
    yield registry
    with registry_db.database_errors(url), registry.engine.connect() as connection:  # leave the next test an empty database
        registry_db.Base.metadata.drop_all(connection)
        connection.commit()
    registry_db.dispose_engine(url)


def call_within(work, bound_s: float):
    """``(exception or result, seconds)`` of ``work()`` run in a thread; AssertionError if it has not returned after ``bound_s``."""
    outcome: list = []

    def run() -> None:
        started = time.monotonic()
        try:
            outcome.append((work(), time.monotonic() - started))
        except Exception as exc:  # noqa: BLE001 - returned to the test
            outcome.append((exc, time.monotonic() - started))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(bound_s)
    assert outcome, f"the call did not return within {bound_s:g} s"
    return outcome[0]


def test_a_frozen_server_fails_a_pooled_connection_within_the_bound(postgres, registry):
    """The registry's pooled connection is open when the server freezes: a read fails after the statement
    timeout plus the margin (the server itself cannot cancel anything; the pool's liveness ping is cut,
    then a new connection times out); after SIGCONT the same registry works."""
    from loraops.registry.bounds import POSTGRES_STATEMENT_TIMEOUT_S, WATCHDOG_MARGIN_S
    from loraops.registry.db import DatabaseError

    assert registry.get("drill@production").version == 1  # the pool holds a connection now
    postgres.freeze()
    try:
        error, seconds = call_within(lambda: registry.get("drill@production"), bound_s=60)
    finally:
        postgres.thaw()
    assert isinstance(error, DatabaseError), error
    bound = POSTGRES_STATEMENT_TIMEOUT_S + WATCHDOG_MARGIN_S
    assert "timeout expired" in str(error) or f"the server did not answer within {bound:g} s" in str(error), error
    assert bound <= seconds < bound + CONNECT_S + 20, seconds
    assert registry.get("drill@production").version == 1  # the cut connection was dropped, a new one works
    assert [event.to_version for event in registry.audit_log("drill")] == [1]


def test_a_lock_held_elsewhere_fails_a_write_within_the_statement_timeout(postgres, registry, make_run, tmp_path):
    """Another session holds the adapter's row lock and never commits: promote and register give up after
    the statement timeout (the server cancels), leave nothing half-written, and work once the lock is gone."""
    from sqlalchemy import text

    from loraops.registry.bounds import POSTGRES_STATEMENT_TIMEOUT_S
    from loraops.registry.db import DatabaseError

    second = make_run(tmp_path / "run2", seed=2)
    with registry.engine.connect() as holder:
        holder.execute(text("SELECT id FROM registry_adapters WHERE name = 'drill' FOR UPDATE"))
        error, seconds = call_within(lambda: registry.register(second, "drill"), bound_s=60)
        assert isinstance(error, DatabaseError) and "statement timeout" in str(error), error
        assert POSTGRES_STATEMENT_TIMEOUT_S <= seconds < POSTGRES_STATEMENT_TIMEOUT_S + 20, seconds
        holder.rollback()
    assert [v.version for v in registry.versions("drill")] == [1]
    assert registry.register(second, "drill").version == 2



def test_the_url_decides_the_bounds_loraops_fills_in_the_rest():
    """libpq's own parameters in the URL win (so Optuna's engine honours them too); loraops adds what is unset."""
    from loraops.registry.bounds import POSTGRES_CONNECT_TIMEOUT_S, postgres_connect_args, statement_timeout_s

    default = postgres_connect_args({})
    assert default["connect_timeout"] == POSTGRES_CONNECT_TIMEOUT_S and default["options"] == "-c statement_timeout=5000"
    given = postgres_connect_args({"connect_timeout": "2", "options": "-c search_path=x -c statement_timeout=3s"})
    assert "connect_timeout" not in given and "options" not in given  # the URL's own are used as they are
    assert given["connection_factory"] is postgres_connect_args({"options": "-c statement_timeout=3000"})["connection_factory"]
    assert [statement_timeout_s(o) for o in ("-c statement_timeout=250", "-c statement_timeout=2min", "-c work_mem=4MB")] == [0.25, 120.0, None]
    assert "connection_factory" not in postgres_connect_args({"options": "-c statement_timeout=0"})  # switched off: nothing to watch


def freeze_before(postgres, registry, table: str):
    """A fault hook: freeze the server just before the first INSERT INTO ``table`` (mid-transaction, earlier statements sent)."""
    from sqlalchemy import event

    armed = [True]

    def hook(connection, cursor, statement, parameters, context, executemany):
        if armed[0] and statement.lstrip().upper().startswith(f"INSERT INTO {table.upper()}"):
            armed[0] = False
            postgres.freeze()

    event.listen(registry.engine, "before_cursor_execute", hook)
    return lambda: event.remove(registry.engine, "before_cursor_execute", hook)


@pytest.mark.slow
@pytest.mark.parametrize("registry", [2000], indirect=True, ids=["statement_timeout=2s"])  # three waits for the bound: short ones
def test_a_server_frozen_between_the_statements_of_a_write_leaves_no_half_state(postgres, registry, make_run, tmp_path):
    """promote, canary start and register each meet a server frozen half-way through their transaction: each
    fails within the bound with a DatabaseError (the command's one line), and after SIGCONT nothing of it is there."""
    from loraops.registry.db import DatabaseError

    registry.register(make_run(tmp_path / "run2", seed=2), "drill")  # drill:2, production -> 1
    before = ([v.version for v in registry.versions("drill")], [(e.from_version, e.to_version) for e in registry.audit_log("drill")])
    writes = {
        "registry_alias_events": lambda: registry.promote("drill", 2),
        "registry_canaries": lambda: registry.start_canary("drill:2", 50),
        "registry_versions": lambda: registry.register(make_run(tmp_path / "run3", seed=3), "drill"),
    }
    for table, write in writes.items():
        remove = freeze_before(postgres, registry, table)
        try:
            error, seconds = call_within(write, bound_s=90)
        finally:
            postgres.thaw()
            remove()
        assert isinstance(error, DatabaseError) and seconds < 60, (table, error, seconds)
        assert registry.get("drill@production").version == 1 and registry.canary("drill") is None, table
        assert ([v.version for v in registry.versions("drill")], [(e.from_version, e.to_version) for e in registry.audit_log("drill")]) == before, table
    stored = sorted(p.relative_to(tmp_path / "store").parts[:2] for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert set(stored) == {("drill", "v1"), ("drill", "v2")}, stored  # no v3 files, no staging left


def test_a_replica_with_no_recorded_resolution_waits_for_the_database_then_loads(postgres, registry, caplog):
    """What a model replica's constructor does when it starts during an outage on a node that never resolved its
    reference (issue #29 item 3): no traceback, one warning per try with a bounded back-off, and the load as soon as
    the database answers. The test's ``sleep`` starts the server again at the second wait instead of sleeping."""
    import logging

    from loraops.serve.remembered import RememberingRegistry, until_the_database_answers

    remembering = RememberingRegistry(registry)  # nothing recorded in this workspace
    waits: list[float] = []
    loaded = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            postgres.start()

    caplog.set_level(logging.WARNING, logger="ray.serve")
    postgres.stop()
    try:
        with remembering.remembered():
            until_the_database_answers(lambda: loaded.append(remembering.get("drill@production")), ["drill@production"], sleep=sleep)
    finally:
        if len(waits) < 2:
            postgres.start()
    assert [v.ref for v in loaded] == ["drill:1"] and waits == [1.0, 2.0]
    lines = [r.getMessage() for r in caplog.records if "waiting for the database" in r.getMessage()]
    assert len(lines) == 2, caplog.text
    expected = "registry unreachable and no resolution of drill@production recorded on this node; waiting for the database (attempt 2, next in 2 s): "
    assert lines[1].startswith(expected), lines
