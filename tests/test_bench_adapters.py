"""``loraops bench serve --model-only --adapters N`` (:mod:`loraops.bench.adapters`): N resident adapters against one,
and the cold loads, on the registry's tiny adapter; its argument checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli
from loraops.bench.adapters import ROUNDS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_adapters_bench_compares_n_resident_adapters_with_one(cli_env, serving_home, tmp_path):
    output = tmp_path / "adapters.json"

    done = run_cli(
        "bench", "serve", "--model-only", "--config", str(REPO / "serve" / "tiny.yaml"), "--set", f"args.workspace={serving_home}",
        "--set", "args.context_tokens=256", "--modes", "nf4", "--concurrency", "2", "--duration", "2", "--max-new-tokens", "8",
        "--adapters", "3", "--skew", "1", "--output", str(output), env=cli_env(serving_home), timeout=900,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert [(r["mode"], r["adapters"], r["skew"]) for r in report["results"]] == [("nf4", 1, None), ("nf4", 3, 1.0)]
    assert all(r["requests"] > 0 and r["failed"] == 0 for r in report["results"])
    assert report["cold_load_local_s"]["nf4"]["loads"] == 2 * ROUNDS and report["cold_load_local_s"]["nf4"]["p50_s"] > 0
    assert report["ratios"]["nf4"] > 0 and "3 adapters at" in done.stdout and f"results: {output}" in done.stdout
    assert not any((serving_home / "registry").glob("bench-*"))  # the versions went to a scratch registry


def test_the_adapters_bench_refuses_bad_arguments_with_one_line(cli_env, tmp_path):
    for args, message in [
        (["--adapters", "8"], "--adapters needs --model-only"),
        (["--model-only", "--adapters", "1"], "--adapters 1: expected 2 to 64"),
        (["--model-only", "--adapters", "4", "--skew", "-1"], "--skew -1.0: expected 0 (uniform) or more"),
    ]:
        done = run_cli("bench", "serve", *args, env=cli_env(tmp_path), timeout=120)
        assert done.returncode == 2 and done.stderr.startswith("loraops: error:") and message in done.stderr, done.stderr
