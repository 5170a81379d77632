"""The whole loop end to end at a minimal budget, as `make demo` runs it: `loraops demo` in its own
process with its own Ray: search -> register -> promote -> serve -> HTTP; a quiet terminal, the
rest in the log file. Experiments and the registry are on the S3 server (``s3_server``), as on a
cluster whose machines share no disk; every other test of the loop covers the local folders."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port

REPO = Path(__file__).resolve().parents[1]
#: The demo's own budget, small: 2 trials of 80 steps, 8 dialogues over HTTP.
MINIMAL = [
    "data.builtin_size=200",
    "search.max_steps=80",
    "training.eval_steps=40",
    "training.logging_steps=10",
    "training.eval_max_samples=16",
    "search.num_samples=2",
    "search.max_concurrent_trials=2",
    "search.scheduler.type=fifo",
    "evaluation.max_new_tokens=32",
]
#: `make demo`'s whole output must fit on about two screens.
MAX_LINES = 120


@pytest.mark.slow
@pytest.mark.ray
def test_demo_runs_the_whole_loop_on_a_quiet_terminal(workspace, tmp_path, s3_server):
    from loraops.registry import Registry

    prefix = f"s3://{s3_server.bucket}/demo-{tmp_path.name}"
    settings = [*MINIMAL, f"search.storage={prefix}/experiments"]
    command = [sys.executable, "-m", "loraops", "demo", "--samples", "8", *[arg for item in settings for arg in ("--set", item)],
               "--serve-set", f"http_options.port={free_port()}", "--serve-set", "deployments.SummarizerModel.autoscaling_config.max_replicas=1"]
    env = dict(os.environ, LORAOPS_HOME=str(workspace), PYTHONUNBUFFERED="1", LORAOPS_ARTIFACT_URI=f"{prefix}/registry") | s3_server.env()
    env.pop("RAY_ADDRESS", None)  # its own local Ray, like `make demo`
    run = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    out = run.stdout
    assert run.returncode == 0, out[-5000:]

    lines = out.splitlines()
    assert len(lines) <= MAX_LINES, out
    for step in ("1/4 search", "2/4 register", "3/4 serve", "4/4 call the endpoint", "where things are"):
        assert step in out
    assert re.search(r"^trial +status +training\.learning_rate .*best_eval_loss", out, re.MULTILINE)  # the trials table
    assert len(re.findall(r"^\[ *\d+s\] trial \w+ started", out, re.MULTILINE)) == 2  # one line per trial event
    assert len(re.findall(r"^\[ *\d+s\] trial \w+ finished at step 80", out, re.MULTILINE)) == 2
    assert out.count("  base:      ") == 3 and out.count("  tuned:     ") == 3  # base vs tuned examples
    gains = dict(re.findall(r"^(rouge\w+) +[\d.]+ +[\d.]+ +([+-][\d.]+)$", out, re.MULTILINE))  # the ROUGE table
    assert set(gains) == {"rouge1", "rouge2", "rougeL", "rougeLsum"} and float(gains["rougeL"]) > 0, out
    assert "tuned = tiny:[1] over HTTP" in out  # every answer came from the promoted version
    registry = Registry(workspace=workspace, artifact_uri=f"{prefix}/registry")
    assert registry.get("tiny@production").version == 1 and registry.get("tiny:1").artifact_uri == f"{prefix}/registry/tiny/v1"
    assert f"experiment (Tune)   {prefix}/experiments/" in out and f"registry artifacts  {prefix}/registry" in out
    assert not (workspace / "registry").exists()  # the version went to the bucket; the replica read it from its cache
    assert list((workspace / "cache" / "registry").glob("sha256-*"))
    assert s3_server.secret not in out
    for noise in ("== Status ==", "(raylet)", "(pid=", "Token authentication", "Started a local Ray instance", "Loading weights", "WARNING"):
        assert noise not in out, noise

    log_file = Path(re.search(r"^log: (\S+)", out, re.MULTILINE).group(1))
    assert log_file.parent == workspace / "logs" and f"log file            {log_file}" in out
    log = log_file.read_text()
    for noise in ("Started a local Ray instance", "Tune status", "== Status ==", "INFO ray.serve:", "INFO optuna"):
        assert noise in log, noise
