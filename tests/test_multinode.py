"""A real two-node Ray cluster on this machine: a head and a worker, each its own `ray start`, with
Ray's token authentication on (as Ray 2.60 turns it on for a head that finds a token). A 2-trial
`loraops tune` runs one trial per node, and `loraops serve --detach` places the model replica on
the worker, which answers over HTTP.

Separate from the session's Ray instance: its own ports, temp dirs and token; it is stopped by the
pids of its own `ray start --block` processes (never `ray stop`, which would stop every Ray here).
The worker gets its own loopback address (127.0.0.2), so each trial's ``node_ip`` says where it ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from helpers import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
WORKER_IP = "127.0.0.2"
#: Only the worker node has this resource; the serve config asks for it, so the replica can only land there.
WORKER_RESOURCE = "loraops_worker"
#: The tiny config, shrunk to a few seconds per trial: 2 trials of 10 steps, one CPU each.
TUNE = [
    "search.num_samples=2",
    "search.max_concurrent_trials=2",
    "search.max_steps=10",
    "search.scheduler={type: fifo}",
    "search.resources={cpu: 1, gpu: 0}",
    "training.eval_steps=10",
    "training.logging_steps=10",
    "training.per_device_train_batch_size=4",
    "training.warmup_steps=0",
    "training.eval_max_samples=8",
    "data.builtin_size=60",
]


@dataclass
class Cluster:
    address: str  # the head's GCS address, what RAY_ADDRESS takes
    env: dict[str, str]  # RAY_ADDRESS plus the token settings every process of the cluster needs


def start_node(args: list[str], temp_dir: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`ray start --block` in its own session: SIGTERM to it stops this node's Ray processes (and only them)."""
    agent, grpc, runtime_env, metrics, manager, objects = free_ports(6)
    command = [
        RAY, "start", "--block", "--num-cpus=1", f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}", f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}", f"--node-manager-port={manager}", f"--object-manager-port={objects}", *args,
    ]  # fmt: skip
    with log.open("w") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def ray_python(cluster: Cluster, code: str, timeout: float = 120) -> str:
    """Run ``code`` in a driver connected to the cluster (this process stays on the session's Ray)."""
    script = "import json, ray\nray.init(log_to_driver=False)\n" + code
    done = subprocess.run([sys.executable, "-c", script], env=cluster.env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def stop_node(process: subprocess.Popen, temp_dir: Path) -> None:
    """SIGTERM the node's `ray start --block` (it stops its raylet, workers, GCS), then make sure: the
    process group, and any process still naming this node's temp dir."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    import psutil

    for leftover in psutil.process_iter(["cmdline"]):
        if any(str(temp_dir) in part for part in leftover.info["cmdline"] or ()):
            leftover.kill()


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    """Head (1 CPU) + worker (1 CPU, 127.0.0.2, resource loraops_worker), token auth on, a token of its own."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # Every process of the cluster (nodes, drivers, CLI) must run in token mode with the same token;
    # RAY_AUTH_TOKEN takes precedence over the ~/.ray/auth_token file that `ray start` would pick up.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # Short paths: Ray's Unix sockets live in the temp dir, and socket paths are limited to 107 bytes.
    temp_dirs = [Path(tempfile.mkdtemp(prefix="lo2n-head-")), Path(tempfile.mkdtemp(prefix="lo2n-worker-"))]
    nodes: list[tuple[subprocess.Popen, Path]] = []
    try:
        gcs, client = free_ports(2)
        address = f"127.0.0.1:{gcs}"
        nodes.append(
            (
                start_node(
                    ["--head", f"--port={gcs}", f"--ray-client-server-port={client}", "--include-dashboard=false"], temp_dirs[0], env, tmp_path / "head.log"
                ),
                temp_dirs[0],
            )
        )
        worker_args = [f"--address={address}", f"--node-ip-address={WORKER_IP}", f"--resources={json.dumps({WORKER_RESOURCE: 1})}"]
        cluster = Cluster(address, {**env, "RAY_ADDRESS": address})
        _wait_for(lambda: _joined(cluster, 1), "the head node", nodes, tmp_path)
        nodes.append((start_node(worker_args, temp_dirs[1], env, tmp_path / "worker.log"), temp_dirs[1]))
        _wait_for(lambda: _joined(cluster, 2), "the worker node to join", nodes, tmp_path)
        yield cluster
    finally:
        for process, temp_dir in reversed(nodes):
            stop_node(process, temp_dir)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _joined(cluster: Cluster, count: int) -> bool:
    try:
        return int(ray_python(cluster, "print(sum(node['Alive'] for node in ray.nodes()))", timeout=60)) >= count
    except (AssertionError, subprocess.TimeoutExpired):
        return False


def _wait_for(condition, what: str, nodes, logs: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process, _ in nodes):
            break
        if condition():
            return
        time.sleep(2)
    tails = {log.name: log.read_text()[-2000:] for log in logs.glob("*.log")}
    pytest.fail(f"timed out waiting for {what}: {tails}")


def test_tune_and_serve_across_two_nodes_with_token_auth(cluster, workspace, tmp_path, cli_env):
    env = {**cli_env(workspace), **cluster.env}
    nodes = json.loads(ray_python(cluster, "print(json.dumps({n['NodeManagerAddress']: n['Resources'] for n in ray.nodes() if n['Alive']}))"))
    head_ip = next(ip for ip, resources in nodes.items() if WORKER_RESOURCE not in resources)
    assert set(nodes) == {head_ip, WORKER_IP}

    # The token is enforced: a driver without it is refused.
    no_token = {key: value for key, value in cluster.env.items() if key not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    refused = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init()"], env={**no_token, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0

    # Two trials of one CPU each on two one-CPU nodes: one trial per node.
    tune = [sys.executable, "-m", "loraops", "tune", "--config", str(REPO / "tune" / "tiny.yaml"), "--name", "two-nodes", "--register", "twonodes"]
    done = subprocess.run([*tune, *(arg for item in TUNE for arg in ("--set", item))], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ran_on = set()
    for result in (workspace / "experiments" / "two-nodes").glob("trial_*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        assert lines and lines[-1]["step"] == 10
        ran_on |= {line["node_ip"] for line in lines}
    assert ran_on == {head_ip, WORKER_IP}
    assert "registered twonodes:1" in done.stdout

    # The model replica needs the worker's resource: it can only run on the worker node.
    port = free_ports(1)[0]
    serve_args = [
        "args.adapter=twonodes:1",
        f"http_options.port={port}",
        "deployments.SummarizerModel.autoscaling_config={min_replicas: 1, initial_replicas: 1, max_replicas: 1}",
        f"deployments.SummarizerModel.ray_actor_options={{num_cpus: 0.5, resources: {{{WORKER_RESOURCE}: 1}}}}",
    ]
    serve = [sys.executable, "-m", "loraops", "serve", "--config", str(REPO / "serve" / "tiny.yaml"), "--detach"]
    done = subprocess.run([*serve, *(arg for item in serve_args for arg in ("--set", item))], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/summarize", json={"dialogue": "#Person1#: Is the shop open?\n#Person2#: Yes, until six."}, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == {"name": "twonodes", "version": 1}
    held = float(ray_python(cluster, f"print(ray.cluster_resources()['{WORKER_RESOURCE}'] - ray.available_resources().get('{WORKER_RESOURCE}', 0.0))"))
    assert held == 1.0  # the replica holds the worker's resource
