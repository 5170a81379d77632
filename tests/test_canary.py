"""Canaries: state in a real registry database (SQLite always, PostgreSQL when $LORAOPS_TEST_POSTGRES_URL is set),
the ingress-side router and its statistics, automatic abort, the ``loraops canary`` commands, per-version metrics."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from helpers import run_main
from loraops.errors import LoraopsError
from loraops.registry import IntegrityError, Registry
from loraops.registry import db as registry_db
from loraops.registry.canary import LATENCY_BOUNDS_S, CanaryStatus, Totals, VersionStats, judge, quantile
from loraops.serve.canary import CanaryRouter
from loraops.serve.metrics import VersionMetrics

NAME = "cn"


@pytest.fixture
def registry(db_url, make_run, tmp_path) -> Registry:
    """Three versions of ``cn``; production -> v1."""
    registry = Registry(db_url=db_url, artifact_uri=str(tmp_path / "store"), workspace=tmp_path / "ws")
    for seed in (1, 2, 3):
        registry.register(make_run(tmp_path / f"run{seed}", seed=seed), NAME)
    registry.promote(NAME, 1)
    return registry


def reopen(registry: Registry) -> Registry:
    """Another Registry on the same database and store, as a restarted process would open it."""
    return Registry(db_url=registry.db_url, artifact_uri=registry.artifact_uri, workspace=registry.workspace)


# --- start / status / promote / abort -----------------------------------------------------------


def test_start_refusals_abort_and_promote_audited(registry):
    started = registry.start_canary(f"{NAME}:2", 30, actor="ana", reason="new data")
    assert (started.name, started.candidate, started.baseline, started.alias, started.percent, started.state) == (NAME, 2, 1, "production", 30.0, "running")
    assert (started.actor, started.reason, started.max_error_margin, started.min_requests) == ("ana", "new data", 0.05, 20)
    assert registry.canary(NAME) == started

    with pytest.raises(LoraopsError, match="already has a running canary"):
        registry.start_canary(f"{NAME}:3", 10)
    aborted = registry.abort_canary(NAME, actor="bob", reason="wrong data")
    assert (aborted.state, aborted.ended_by, aborted.end_reason) == ("aborted", "bob", "wrong data")
    assert registry.canary(NAME) is None
    assert registry.get(f"{NAME}@production").version == 1
    with pytest.raises(LoraopsError, match="no running canary"):
        registry.abort_canary(NAME)

    for ref, percent, message in [
        (f"{NAME}:1", 10, "already points to version 1"),
        (f"{NAME}:9", 10, "has no version 9"),
        (f"{NAME}@production", 10, "NAME:VERSION"),
        (f"{NAME}:2", 0, "percent must be above 0"),
        (f"{NAME}:2", 100.5, "percent must be above 0"),
        ("nope:1", 10, "unknown adapter"),
    ]:
        with pytest.raises(LoraopsError, match=message):
            registry.start_canary(ref, percent)
    with pytest.raises(LoraopsError, match="has no alias 'staging'"):
        registry.start_canary(f"{NAME}:2", 10, alias="staging")

    second = registry.start_canary(f"{NAME}:3", 100, actor="ana")
    assert second.id != started.id
    with pytest.raises(LoraopsError, match="cn:3 has answered no requests of its canary.*--force"):
        registry.promote_canary(NAME, actor="carol")  # nothing was compared: refused
    change = registry.promote_canary(NAME, actor="carol", reason="looks good", force=True)
    assert (change.previous, change.version, change.changed) == (1, 3, True)
    assert registry.get(f"{NAME}@production").version == 3
    assert registry.canary(NAME) is None
    final = registry.canary_status(NAME).canary
    assert (final.id, final.state, final.ended_by, final.end_reason) == (second.id, "promoted", "carol", "looks good")
    events = registry.audit_log(NAME)
    assert [(e.action, e.from_version, e.to_version, e.actor, e.reason) for e in events] == [
        ("promote", None, 1, events[0].actor, None),
        ("canary-promote", 1, 3, "carol", "looks good"),
    ]
    assert registry.rollback(NAME).version == 1  # a canary promotion is undone like any other
    with pytest.raises(LoraopsError, match="no running canary"):
        registry.promote_canary(NAME)


def test_concurrent_starts_leave_one_running_canary(registry):
    from concurrent.futures import ThreadPoolExecutor

    def start(ref: str):
        try:
            return reopen(registry).start_canary(ref, 10)
        except LoraopsError as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(start, [f"{NAME}:2", f"{NAME}:3"]))
    started = [r for r in results if not isinstance(r, Exception)]
    assert len(started) == 1, results
    assert "already has a running canary" in str(next(r for r in results if isinstance(r, Exception)))
    assert registry.canary(NAME).id == started[0].id


def test_a_version_with_corrupt_files_cannot_be_a_canary(registry):
    stored = Path(registry.store.version_path(NAME, 2)) / "adapter_model.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="refusing to start a canary of cn:2"):
        registry.start_canary(f"{NAME}:2", 30)
    assert registry.canary(NAME) is None


def test_status_before_any_canary_is_an_error(registry):
    with pytest.raises(LoraopsError, match="has had no canary"):
        registry.canary_status(NAME)


# --- routing, statistics, automatic abort --------------------------------------------------------


def test_routing_is_deterministic_and_close_to_the_percent(registry):
    router = CanaryRouter(registry, NAME, "production")
    assert router.refresh() is None and router.route("a") is None
    registry.start_canary(f"{NAME}:2", 30)
    router.refresh()
    ids = [f"req-{i}" for i in range(100)]
    routes = [router.route(request_id) for request_id in ids]
    assert set(routes) == {None, f"{NAME}:2"}
    assert 20 <= routes.count(f"{NAME}:2") <= 40
    assert [router.route(request_id) for request_id in ids] == routes  # a retry lands on the same version
    restarted = CanaryRouter(reopen(registry), NAME, "production")
    restarted.refresh()
    assert [restarted.route(request_id) for request_id in ids] == routes  # and so does one in another process
    assert CanaryRouter(registry, NAME, "staging").refresh() is None  # a canary of production routes nothing of staging


def test_two_reporters_flushed_twice_count_each_request_once(registry):
    registry.start_canary(f"{NAME}:2", 50)
    first, second = CanaryRouter(registry, NAME), CanaryRouter(reopen(registry), NAME)
    first.refresh(), second.refresh()
    assert first.reporter != second.reporter
    for i in range(30):
        first.record(1, 0.010, error=i % 10 == 0, completion_tokens=20)  # 3 errors
    for _ in range(12):
        second.record(2, 0.500, error=False, completion_tokens=10)
    second.record(2, 2.0, error=True, completion_tokens=0)
    second.record(3, 0.1, error=False, completion_tokens=5)  # not a version of the canary: metrics only
    for router in (first, second, first, second):
        assert router.flush() is None

    status = registry.canary_status(NAME)
    base, cand = status.baseline, status.candidate
    assert (base.version, base.role, base.requests, base.errors, base.reporters) == (1, "baseline", 30, 3, 1)
    assert (cand.version, cand.role, cand.requests, cand.errors, cand.reporters) == (2, "candidate", 13, 1, 1)
    assert base.error_rate == pytest.approx(0.1) and cand.error_rate == pytest.approx(1 / 13)
    assert (base.mean_completion_tokens, cand.mean_completion_tokens) == (20.0, 120 / 13)
    assert 0.010 <= base.p50_s < 0.010 * 1.2 and base.p99_s == base.p50_s
    assert 0.5 <= cand.p50_s < 0.6 and 2.0 <= cand.p99_s < 2.4

    for _ in range(5):  # more traffic in the first process: its row grows, the other's stays
        first.record(2, 0.5, error=False, completion_tokens=10)
    first.flush()
    cand = registry.canary_status(NAME).candidate
    assert (cand.requests, cand.reporters) == (18, 2)
    assert first.metrics.counts[(NAME, 1)].ok == 27 and second.metrics.counts[(NAME, 3)].ok == 1


def test_automatic_abort_waits_for_min_requests_then_fires(registry):
    registry.start_canary(f"{NAME}:2", 50, min_requests=10, max_error_margin=0.05)
    router = CanaryRouter(registry, NAME)
    router.refresh()
    for _ in range(9):
        router.record(1, 0.1, error=False, completion_tokens=8)
        router.record(2, 0.1, error=True, completion_tokens=0)
    assert router.flush() is None  # 9 requests each: too few to judge, however bad
    assert registry.canary(NAME) is not None
    router.record(1, 0.1, error=False, completion_tokens=8)
    router.record(2, 0.1, error=True, completion_tokens=0)
    reason = router.flush()
    assert reason == "candidate v2 error rate 100.0% (10/10) exceeds baseline v1's 0.0% (0/10) by more than 5 points"
    assert registry.canary(NAME) is None and router.canary is None and router.route("any") is None
    ended = registry.canary_status(NAME)
    assert (ended.canary.state, ended.canary.ended_by, ended.canary.end_reason) == ("aborted", "auto", reason)
    assert (ended.baseline.requests, ended.candidate.errors) == (10, 10)  # the final figures stay readable
    assert registry.get(f"{NAME}@production").version == 1


def test_requests_that_name_a_version_are_counted_apart_and_never_judged(registry):
    registry.start_canary(f"{NAME}:2", 50, min_requests=5)
    router = CanaryRouter(registry, NAME)
    router.refresh()
    for _ in range(6):  # clients naming the versions: v2 fails every time, v1 never
        router.record(2, 0.1, error=True, completion_tokens=0, split=False)
        router.record(1, 0.1, error=False, completion_tokens=8, split=False)
    for _ in range(3):
        router.record(1, 0.1, error=False, completion_tokens=8)
        router.record(2, 0.1, error=False, completion_tokens=8, intended=2)
    assert router.flush() is None and registry.canary(NAME) is not None  # the named failures do not abort it
    status = registry.canary_status(NAME)
    assert (status.baseline.requests, status.candidate.requests, status.candidate.errors) == (3, 3, 0)
    assert [(v.version, v.requests, v.errors) for v in status.named] == [(1, 6, 0), (2, 6, 6)]
    assert status.missed == 0
    shown = status.to_dict()
    assert [v["requests"] for v in shown["versions"]] == [3, 3] and [v["requests"] for v in shown["named"]] == [6, 6]


def test_a_candidate_no_replica_can_load_is_aborted_once_the_split_sent_it_min_requests(registry):
    canary = registry.start_canary(f"{NAME}:2", 50, min_requests=4)
    router = CanaryRouter(registry, NAME)
    router.refresh()
    registry.record_canary_load(canary.id, "replica-a", "checksum mismatch: adapter_model.safetensors")
    registry.record_canary_load(canary.id, "replica-a", "checksum mismatch: adapter_model.safetensors")  # a retry that failed again
    registry.record_canary_load(canary.id, "replica-b", None)
    for _ in range(4):  # the split sent these to v2; v1 answered them (the replica had not loaded v2)
        router.record(1, 0.1, error=False, completion_tokens=8, intended=2)
    assert router.flush() is None  # replica-b loaded it: not every replica failed
    status = registry.canary_status(NAME)
    assert status.missed == 4 and status.baseline.requests == 4 and status.candidate.requests == 0
    assert [(r.replica, r.error is None, r.attempts) for r in status.replicas] == [("replica-a", False, 2), ("replica-b", True, 0)]

    registry.record_canary_load(canary.id, "replica-b", "checksum mismatch: adapter_model.safetensors")
    reason = router.flush()
    assert reason == (
        "candidate v2 could not be loaded by any replica (2 tried: checksum mismatch: adapter_model.safetensors); "
        "the 4 requests the split routed to it were answered by v1"
    )
    ended = registry.canary_status(NAME).canary
    assert (ended.state, ended.ended_by, ended.end_reason) == ("aborted", "auto", reason)


def test_judge_tolerates_the_margin():
    def status(base_errors: int, cand_errors: int, n: int = 100) -> CanaryStatus:
        from datetime import datetime, timezone

        from loraops.registry.canary import CanaryState

        canary = CanaryState(1, NAME, 2, 1, "production", 10.0, datetime.now(timezone.utc), "running", None, max_error_margin=0.05, min_requests=20)
        return CanaryStatus(canary, VersionStats.of(1, "baseline", totals(n, base_errors), 1), VersionStats.of(2, "candidate", totals(n, cand_errors), 1))

    def totals(n: int, errors: int) -> Totals:
        figures = Totals()
        for i in range(n):
            figures.add(0.1, i < errors, 1)
        return figures

    assert judge(status(2, 7)) is None  # exactly at the margin
    assert "8.0% (8/100)" in judge(status(2, 8))
    assert judge(status(0, 19, n=19)) is None  # below min_requests


def test_state_and_figures_survive_a_restart(registry):
    registry.start_canary(f"{NAME}:2", 30)
    router = CanaryRouter(registry, NAME, reporter="replica-a")
    router.refresh()
    router.record(2, 0.2, error=False, completion_tokens=4)
    router.flush()

    again = reopen(registry)
    restarted = CanaryRouter(again, NAME, reporter="replica-a")
    state = restarted.refresh()
    assert (state.candidate, state.baseline, state.percent, state.state) == (2, 1, 30.0, "running")
    assert again.canary_status(NAME).candidate.requests == 1
    restarted.record(2, 0.2, error=False, completion_tokens=4)
    restarted.flush()  # same reporter, fresh process totals: its row is replaced, not added to
    assert again.canary_status(NAME).candidate.requests == 1


def test_latency_quantiles_come_from_the_buckets():
    figures = Totals()
    for seconds in [0.0005] * 98 + [1.0, 1000.0]:
        figures.add(seconds, False, 0)
    assert quantile(figures.latency_counts, 0.5) == LATENCY_BOUNDS_S[0]
    assert 1.0 <= quantile(figures.latency_counts, 0.99) < 1.0 * 1.19  # the bound just above 1 s: buckets are 19% wide
    assert math.isinf(quantile(figures.latency_counts, 1.0))  # 1000 s is past the last bound
    assert quantile(Totals().latency_counts, 0.5) is None


# --- schema migration ----------------------------------------------------------------------------


def test_an_older_database_gets_the_canary_tables(db_url, make_run, tmp_path):
    from sqlalchemy import create_engine, text

    from loraops.config import normalize_database_url

    old = Registry(db_url=db_url, artifact_uri=str(tmp_path / "store"), workspace=tmp_path / "ws")
    for seed in (1, 2):
        old.register(make_run(tmp_path / f"run{seed}", seed=seed), NAME)
    old.promote(NAME, 1)
    registry_db.dispose_engine(db_url)
    engine = create_engine(normalize_database_url(db_url))
    with engine.begin() as connection:  # the schema before canaries existed (the tables that refer to the canaries go first)
        connection.execute(text("DROP TABLE registry_canary_loads"))
        connection.execute(text("DROP TABLE registry_canary_stats"))
        connection.execute(text("DROP TABLE registry_canaries"))
    engine.dispose()

    upgraded = reopen(old)
    canary = upgraded.start_canary(f"{NAME}:2", 25)
    assert canary.baseline == 1
    upgraded.record_canary_load(canary.id, "replica-a", None)  # the newest canary table is there too
    assert [load.replica for load in upgraded.canary_status(NAME).replicas] == ["replica-a"]
    assert upgraded.get(f"{NAME}@production").version == 1  # the old rows are intact
    registry_db.dispose_engine(db_url)


# --- metrics ------------------------------------------------------------------------------------


def test_metrics_count_in_memory_without_ray():
    metrics = VersionMetrics()
    metrics.record("tiny", 3, 0.25, error=False, completion_tokens=12)
    metrics.record("tiny", 3, 0.75, error=True, completion_tokens=0)
    metrics.record("tiny", 4, 0.5, error=False, completion_tokens=7)
    three = metrics.counts[("tiny", 3)]
    assert (three.ok, three.errors, three.tokens, three.seconds) == (1, 1, 12, 1.0)
    assert (metrics.counts[("tiny", 4)].ok, metrics.counts[("tiny", 4)].tokens) == (1, 7)


# --- the commands -------------------------------------------------------------------------------


def test_cli_start_status_promote_abort(registry, cli_env, tmp_path):
    def loraops(*args: str) -> subprocess.CompletedProcess:
        return run_main("canary", args[0], "--db", registry.db_url, "--store", registry.artifact_uri, *args[1:], env=cli_env(tmp_path / "ws"), cwd=tmp_path)

    started = loraops("start", f"{NAME}:2", "--percent", "30", "--reason", "try v2")
    assert started.returncode == 0, started.stderr
    assert f"{NAME}:2 takes 30% of {NAME}@production (baseline v1)" in started.stdout
    refused = loraops("start", f"{NAME}:3", "--percent", "30")
    assert refused.returncode == 2 and refused.stderr.startswith("loraops: error: cn already has a running canary") and "Traceback" not in refused.stderr
    bad = loraops("start", f"{NAME}:3", "--percent", "150")
    assert bad.returncode == 2 and "percent must be above 0 and at most 100" in bad.stderr

    router = CanaryRouter(registry, NAME)
    router.refresh()
    for _ in range(4):
        router.record(1, 0.05, error=False, completion_tokens=10)
    router.record(2, 0.05, error=True, completion_tokens=0)
    router.flush()
    table = loraops("status", NAME)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"canary 1 of {NAME}@production: running, 30% to v2, started ")
    assert lines[1].split() == ["VERSION", "ROLE", "REQUESTS", "ERRORS", "ERROR", "RATE", "P50", "P99", "MEAN", "TOKENS"]
    assert lines[2].split()[:5] == ["1", "baseline", "4", "0", "0.0%"] and lines[3].split()[:5] == ["2", "candidate", "1", "1", "100.0%"]
    figures = json.loads(loraops("status", NAME, "--json").stdout)
    assert [v["requests"] for v in figures["versions"]] == [4, 1] and figures["canary"]["reason"] == "try v2"

    promoted = loraops("promote", NAME, "--reason", "ship it")
    assert promoted.returncode == 0 and f"{NAME}@production: version 1 -> 2 (canary promoted)" in promoted.stdout
    assert registry.get(f"{NAME}@production").version == 2
    assert "promoted" in loraops("status", NAME).stdout.splitlines()[0]
    assert loraops("start", f"{NAME}:3", "--percent", "5").returncode == 0
    aborted = loraops("abort", NAME, "--reason", "not today")
    assert aborted.returncode == 0 and "aborted" in aborted.stdout
    missing = loraops("abort", NAME)
    assert missing.returncode == 2 and missing.stderr.strip() == f"loraops: error: {NAME} has no running canary (see `loraops canary status {NAME}`)"
    assert loraops("start", f"{NAME}:3", "--percent", "5").returncode == 0
    untested = loraops("promote", NAME)
    assert untested.returncode == 2 and "has answered no requests" in untested.stderr and "Traceback" not in untested.stderr
    forced = loraops("promote", NAME, "--force")
    assert forced.returncode == 0 and registry.get(f"{NAME}@production").version == 3


# --- a model replica's candidate: load, report, retry (in process: the load fails at the checksums, before any model) ---


def test_a_replica_that_cannot_load_the_candidate_reports_it_and_retries_with_back_off(registry, cli_env, tmp_path):
    import time

    from loraops.serve.adapters import AdapterSet, Reference
    from loraops.serve.candidate import CandidateLoader
    from loraops.serve.settings import ServeSettings

    settings = ServeSettings(adapter=f"{NAME}@production", workspace=str(registry.workspace))
    adapters = AdapterSet(registry, settings)
    adapters.references.append(Reference(f"{NAME}@production", registry.get(f"{NAME}@production")))  # the default, as a replica holds it
    loader = CandidateLoader(registry, adapters, "replica-a")
    canary = registry.start_canary(f"{NAME}:2", 30)
    stored = Path(registry.store.version_path(NAME, 2)) / "adapter_model.safetensors"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))  # after the start's verification, before the replica polls

    started = time.monotonic()
    loader.follow(lambda: None, 1.0)
    [load] = registry.canary_status(NAME).replicas
    assert (load.replica, load.attempts) == ("replica-a", 1) and "cn:2" in load.error
    assert loader.problem.startswith("cannot serve the canary candidate cn:2: ") and f"answered by {NAME}:1" in loader.problem
    assert loader.info() == {"candidate": f"{NAME}:2", "loaded": False, "attempts": 1}
    loader.follow(lambda: None, 1.0)
    assert registry.canary_status(NAME).replicas[0].attempts == 1  # too soon: the back-off holds the retry

    deadline = time.monotonic() + 30
    while registry.canary_status(NAME).replicas[0].attempts < 3 and time.monotonic() < deadline:
        loader.follow(lambda: None, 1.0)
        time.sleep(0.1)
    assert registry.canary_status(NAME).replicas[0].attempts == 3
    assert time.monotonic() - started >= 1.0 + 2.0  # waits of 1 s, then 2 s: doubling from the poll interval

    shown = run_main("canary", "status", NAME, "--db", registry.db_url, "--store", registry.artifact_uri, env=cli_env(tmp_path / "ws"), cwd=tmp_path)
    print(shown.stdout)
    assert shown.returncode == 0 and "model replicas and v2:" in shown.stdout
    assert shown.stdout.splitlines()[-1].split()[:3] == ["replica-a", "FAILED", "3"]

    registry.abort_canary(NAME)
    loader.follow(lambda: None, 1.0)
    assert loader.problem is None and loader.info() is None and canary.id == registry.canary_status(NAME).canary.id




def test_cli_status_and_abort_without_name_take_the_one_running_canary(registry, make_run, cli_env, tmp_path):
    """NAME may be left out while exactly one canary runs; with none or several, the error lists them."""

    def loraops(*args: str) -> subprocess.CompletedProcess:
        return run_main("canary", args[0], "--db", registry.db_url, "--store", registry.artifact_uri, *args[1:], env=cli_env(tmp_path / "ws"), cwd=tmp_path)

    none = loraops("status")
    assert none.returncode == 2 and none.stderr.startswith("loraops: error: no canary is running") and "Traceback" not in none.stderr
    registry.start_canary(f"{NAME}:2", 30)

    status = loraops("status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"canary 1 of {NAME}@production: running, 30% to v2")

    registry.register(make_run(tmp_path / "other", seed=9), "other")
    registry.register(make_run(tmp_path / "other2", seed=10), "other")
    registry.promote("other", 1)
    registry.start_canary("other:2", 10)
    several = loraops("abort")
    assert several.returncode == 2
    assert "2 canaries are running: cn (cn:2, 30% of @production), other (other:2, 10% of @production)" in several.stderr
    assert registry.canary(NAME) is not None and registry.canary("other") is not None  # nothing was aborted

    registry.abort_canary("other")
    aborted = loraops("abort", "--reason", "the only one")
    assert aborted.returncode == 0 and f"canary 1 of {NAME}:2 aborted" in aborted.stdout
    assert registry.canary(NAME) is None
