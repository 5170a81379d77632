"""``loraops bench serve``: the workload, the statistics, and the model-level mode end to end (no Ray, no HTTP),
on the registry's adapter and on a random-init Phi-2 architecture cut to one layer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import forbid_ray, run_main

REPO = Path(__file__).resolve().parents[1]


def test_statistics_give_percentiles_throughput_and_serve_overhead():
    from loraops.bench.load import Record, summarize_records

    records = [Record(0, 0.0, 0.1 * (i + 1), 200, completion_tokens=10, model_ms=100 * (i + 1) - 5) for i in range(10)]
    records.append(Record(1, 0.0, 0.5, 503, error="busy"))

    summary = summarize_records(records, duration_s=2.0)

    assert (summary["requests"], summary["failed"]) == (11, 1)
    assert (summary["p50_s"], summary["p99_s"]) == (0.55, 0.991)
    assert summary["p99_over_p50"] == 1.8
    assert summary["completion_tokens_per_s"] == 50.0
    assert summary["overhead_p50_ms"] == 5.0 and summary["overhead_p99_ms"] == 5.0
    assert (summary["ms_per_token_p50"], summary["ms_per_token_p99"]) == (55.0, 99.1)


def test_workload_mixes_lengths_and_reads_dialogsum_files(tmp_path):
    from loraops.bench.serve import load_workload
    from loraops.errors import LoraopsError

    builtin, source = load_workload(None, 48, "fixed", count=32)
    lengths = [len(item.dialogue) for item in builtin]
    assert source == "built-in test split" and len(builtin) == 32
    assert lengths != sorted(lengths) and max(lengths) > 1.5 * min(lengths)  # shuffled, varied
    assert {item.max_new_tokens for item in builtin} == {48}

    data = tmp_path / "dialogsum.jsonl"
    rows = [{"id": str(i), "dialogue": f"#Person1#: Hello {i}.\n#Person2#: Hi.", "summary": "one two three " * (i + 1)} for i in range(5)]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n{broken\n")

    class Words:  # a tokenizer of words, enough for reference lengths
        def encode(self, text, add_special_tokens=False):
            return text.split()

    items, source = load_workload(str(data), 10, "reference", tokenizer=Words())
    assert source == "dialogsum.jsonl (5 usable rows)"
    assert sorted(item.max_new_tokens for item in items) == [4, 7, 10, 10, 10]  # summary words + end-of-text, at most 10
    with pytest.raises(LoraopsError, match="no such file"):
        load_workload(str(tmp_path / "missing.jsonl"), 10, "fixed")


def _bench(cli_env, home: Path, output: Path | None, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [
        "bench", "serve", "--model-only", "--config", str(REPO / "serve" / "tiny.yaml"),
        "--set", f"args.workspace={home}", "--set", "args.context_tokens=256", "--modes", "merged",
        "--concurrency", "1,2", "--duration", "2", "--max-new-tokens", "8", *(["--output", str(output)] if output else []), *extra,
    ]  # fmt: skip
    return run_main(*command, env=cli_env(home), cwd=cwd)  # in this process: no Ray, no subprocess's imports


@pytest.mark.slow
def test_model_level_bench_compares_batching_on_the_registry_adapter(cli_env, serving_home, tmp_path):
    output = tmp_path / "model.json"

    done = _bench(cli_env, serving_home, output, "--batching", "continuous,static,generate")

    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["level"] == "model" and report["device"] == "cpu" and "tiny:1" in report["model"]
    assert [(r["batching"], r["concurrency"]) for r in report["results"]] == [
        ("continuous", 1), ("static", 1), ("generate", 1), ("continuous", 2), ("static", 2), ("generate", 2)
    ]  # fmt: skip  (the batchings take turns at each concurrency)
    assert all(r["requests"] > 0 and r["failed"] == 0 and r["p99_s"] >= r["p50_s"] for r in report["results"])
    assert report["warm_up"]["merged/continuous"]["shapes"] == 2 * 1 + 2 * 1  # prefill (1, 2) and decode (1, 2) rows x one length (256)
    assert "p99/p50" in done.stdout and f"results: {output}" in done.stdout


@pytest.mark.slow
def test_model_level_bench_runs_a_random_init_architecture(cli_env, tmp_path):
    """Also: without --output the figures go to the workspace, never into the repository's benchmarks/results/."""
    home = tmp_path / "ws"
    output = home / "benchmarks" / "serve-model-cpu.json"
    (tmp_path / "checkout").mkdir()

    done = _bench(cli_env, home, None, "--random-init", "phi-2", "--random-init-layers", "1", "--batching", "continuous", "--concurrency", "2",
                  cwd=tmp_path / "checkout")

    assert done.returncode == 0, done.stderr[-3000:]
    assert f"results: {output}" in done.stdout and not (tmp_path / "checkout" / "benchmarks").exists()
    report = json.loads(output.read_text())
    assert report["model"].startswith("random-init phi-2") and report["workload"]["lengths"] == "reference"
    assert report["results"][0]["failed"] == 0 and report["results"][0]["completion_tokens_per_s"] > 0
    assert (home / "models" / "random-init-phi-2-1layers" / "config.json").is_file()


def test_bench_serve_refuses_bad_arguments_with_one_line(cli_env, tmp_path, monkeypatch):
    """In this process (run_main), where connecting to Ray fails the test: each refusal comes before Ray starts."""
    forbid_ray(monkeypatch)
    for args, message in [
        (["--random-init", "phi-2"], "--random-init needs --model-only"),
        (["--concurrency", "1,x"], "--concurrency '1,x': expected comma-separated integers"),
        (["--batching", "generate"], "over HTTP the replica batches continuous or static"),
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),  # before Ray starts and a model loads
        (["--model-only", "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),  # before the model loads
    ]:
        done = run_main("bench", "serve", *args, env=cli_env(tmp_path))
        assert done.returncode == 2 and done.stderr.startswith("loraops: error:") and message in done.stderr, done.stderr
