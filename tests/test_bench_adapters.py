"""``loraops bench serve --model-only --adapters N`` (:mod:`loraops.bench.adapters`): N resident adapters against one,
the cold loads, and with ``--max-adapters K`` a resident set smaller than the working set (:mod:`loraops.bench.adapters_lru`);
its argument checks."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from helpers import run_cli, s3_objects
from loraops.bench.adapters import ROUNDS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_adapters_bench_compares_n_resident_adapters_with_one_and_an_lru_from_an_s3_store(cli_env, serving_home, s3_env, tmp_path):
    """One run covers the three: one adapter, N resident, and an LRU of K < N (evictions), the versions in the served
    registry's kind of store (here ``s3://``: every timed cold load of the N-adapter run downloads)."""
    from loraops.registry import Registry
    from loraops.registry.store import manifest_digest

    prefix = f"bench-source-{uuid.uuid4().hex[:8]}"
    db_url, store = f"sqlite:///{tmp_path / 'registry.db'}", f"s3://{s3_env.bucket}/{prefix}"
    source = Registry(db_url=db_url, artifact_uri=store, workspace=serving_home)
    source.register(Registry(workspace=serving_home).resolve("tiny:1"), "tiny")
    source.promote("tiny", 1)
    output = tmp_path / "adapters.json"
    copies = {path.name for path in (serving_home / "cache" / "registry").glob("*")}

    done = run_cli(
        "bench", "serve", "--model-only", "--config", str(REPO / "serve" / "tiny.yaml"), "--set", f"args.workspace={serving_home}",
        "--set", f"args.db_url={db_url}", "--set", f"args.artifact_uri={store}", "--set", "args.context_tokens=256",
        "--modes", "nf4", "--concurrency", "2", "--duration", "1.5", "--max-new-tokens", "8",
        "--adapters", "4", "--skew", "1", "--max-adapters", "1", "--output", str(output), env=cli_env(serving_home), timeout=900,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert [(r["mode"], r["adapters"], r["skew"], r.get("max_adapters")) for r in report["results"]] == [
        ("nf4", 1, None, None), ("nf4", 4, 1.0, None), ("nf4", 4, 1.0, 1)
    ]  # fmt: skip
    assert all(r["requests"] > 0 and r["failed"] == 0 for r in report["results"])
    assert report["store"] == "s3" and report["cold_load_s"]["nf4"]["loads"] == 3 * ROUNDS and report["cold_load_s"]["nf4"]["p50_s"] > 0
    lru = report["lru"]["nf4"]
    assert lru["capacity"] == 1 and lru["requests"] == lru["hits"] + lru["misses"] == report["results"][2]["requests"]
    assert 0 < lru["hit_ratio"] < 1 and lru["loads"] <= lru["misses"] and lru["loads"] == lru["cold_load_s"]["loads"] > 0
    assert lru["evictions"] >= lru["loads"] - ROUNDS  # one slot: every load after a turn's first evicts
    assert report["ratios"]["nf4"] > 0 and "4 adapters at" in done.stdout and "LRU of 1 + the default: hit ratio" in done.stdout
    left = s3_objects(s3_env, prefix)
    assert left and all(f"{prefix}/tiny/" in key for key in left), sorted(left)  # the scratch versions went, the source stayed
    source_copy = f"sha256-{manifest_digest(source.get('tiny:1').files)}"  # the served version's own, fetched to copy it
    new_copies = {path.name for path in (serving_home / "cache" / "registry").glob("*")} - copies
    assert new_copies <= {source_copy}  # and so did the replica's local copies of the scratch versions


def test_the_resident_set_evicts_the_least_recently_used_and_unloads_a_busy_one_after_its_last_row():
    from loraops.bench.adapters_lru import ResidentSet

    changes: list[str] = []  # loads and unloads run one at a time on the set's own thread; acquire waits for its load
    resident = ResidentSet(2, lambda ref: changes.append(f"+{ref}") or f"slot-{ref}", lambda slot: changes.append(f"-{slot}"))
    assert [resident.acquire(ref) for ref in ("a", "b", "a")] == ["slot-a", "slot-b", "slot-a"]  # a: two rows
    resident.release("b")
    resident.acquire("c")  # b, least recently used and idle, is unloaded before c loads
    assert changes == ["+a", "+b", "-slot-b", "+c"] and list(resident.resident) == ["a", "c"]
    resident.acquire("d")  # a is evicted with rows running: still loaded
    assert changes[-1] == "+d" and "-slot-a" not in changes
    assert resident.acquire("a") == "slot-a" and resident.reclaimed == 1  # taken back without a load; c (one row) is evicted
    for ref in ("a", "a", "a", "c", "d"):
        resident.release(ref)  # c's last row: c unloaded now
    resident.acquire("e")  # d, idle, makes room

    assert changes == ["+a", "+b", "-slot-b", "+c", "+d", "-slot-c", "-slot-d", "+e"]
    assert resident.close() == ["slot-a", "slot-e"]
    counts = {"capacity": 2, "requests": 11, "hits": 6, "misses": 5, "reclaimed": 1, "loads": 0, "evictions": 4, "hit_ratio": round(6 / 11, 3)}
    assert resident.counts(default_requests=4) == counts | {"loads": 5} and len(resident.load_seconds) == 5


def test_the_adapters_bench_refuses_bad_arguments_with_one_line(cli_env, tmp_path):
    for args, message in [
        (["--model-only", "--adapters", "1"], "--adapters 1: expected 2 to 64"),
        (["--model-only", "--adapters", "4", "--skew", "-1"], "--skew -1.0: expected 0 (uniform) or more"),
        (["--model-only", "--adapters", "4", "--max-adapters", "3"], "--max-adapters 3: expected 1 to 2"),
        (["--model-only", "--max-adapters", "2"], "--max-adapters needs --adapters"),
    ]:
        done = run_cli("bench", "serve", *args, env=cli_env(tmp_path), timeout=120)
        assert done.returncode == 2 and done.stderr.startswith("loraops: error:") and message in done.stderr, done.stderr

