"""A real two-node Ray cluster on this machine whose nodes share no disk: a head and a worker, each
its own `ray start`, with Ray's token authentication on (as Ray 2.60 turns it on for a head that
finds a token). A 2-trial `loraops tune --register` runs one trial per node, and
`loraops serve --detach` places the model replica on the worker, which answers over HTTP.

Private disks: each node runs in its own mount namespace (``unshare --mount``) with a private tmpfs
mounted over the same folder, NODE_ROOT (a short path under /tmp: Ray's socket paths are limited
to 107 bytes). There each node has its workspace (``NODE_ROOT/ws``, LORAOPS_HOME) and its Ray temp
folder (``NODE_ROOT/ray-ROLE``); neither node sees the other's, and this test process sees an empty
folder. The tiny base model is copied into each workspace before `ray start` (it plays a hub
download every node does). The nodes share only what pods of a Kubernetes cluster would: the
PostgreSQL database (a fresh one per run) and the S3 server (``s3_server``, a prefix per run),
with the variables in each node's environment at `ray start`, which trial workers and replicas
inherit. The drivers (`loraops tune`, `loraops serve`, the small probes) run ON THE HEAD, inside
its mount namespace (``nsenter --target PID --mount``, PID: the head's `ray start --block`): a
driver needs its node's Ray temp folder for its sockets.

Separate from the session's Ray instance: its own ports, temp folders and token; it is stopped by
the pids of its own `ray start --block` processes (never `ray stop`, which would stop every Ray
here). The worker gets its own loopback address (127.0.0.2), so each trial's ``node_ip`` says where
it ran.
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
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from helpers import free_ports

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
#: A PostgreSQL server URL (as conftest's POSTGRES_ENV): the one database both nodes share.
POSTGRES_ENV = "LORAOPS_TEST_POSTGRES_URL"
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
#: Run as a node's first process inside its new mount namespace: its own tmpfs over NODE_ROOT, its
#: workspace with the base model, a marker naming the node, then `ray start` ("$@") in its place.
NODE_SETUP = (
    'mount -t tmpfs -o size=2g,mode=0700 tmpfs "$NODE_ROOT" && mkdir -p "$LORAOPS_HOME" "$RAY_TEMP" '
    '&& cp -r "$BASE_MODELS" "$LORAOPS_HOME/models" && echo "$NODE_ROLE" > "$LORAOPS_HOME/node" && exec "$@"'
)


def _mount_namespace_problem() -> str | None:
    """Why this machine cannot give each node a private tmpfs, else None (probed once, at collection)."""
    missing = [tool for tool in ("unshare", "nsenter", "mount") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (util-linux): the nodes' private disks are mount namespaces"
    try:
        probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`unshare --mount true` failed: {exc}"
    if probe.returncode != 0:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}, not root"
        return f"mount namespaces are not permitted here ({who}): `unshare --mount true` said {probe.stderr.strip()!r}"
    return None


MOUNT_PROBLEM = _mount_namespace_problem()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.skipif(not os.environ.get(POSTGRES_ENV), reason=f"{POSTGRES_ENV} is not set: the nodes share a PostgreSQL database (.ci/run starts one)"),
    pytest.mark.skipif(MOUNT_PROBLEM is not None, reason=f"each node needs its own mount namespace: {MOUNT_PROBLEM}"),
]


@dataclass
class Cluster:
    address: str  # the head's GCS address, what RAY_ADDRESS takes
    env: dict[str, str]  # every process of the cluster's: RAY_ADDRESS, the token, LORAOPS_*, the AWS variables
    root: Path  # NODE_ROOT: each node's own tmpfs there, an empty folder to this process
    pids: dict[str, int]  # "head"/"worker" -> its `ray start --block`: a process inside that node's mount namespace
    storage: str  # s3://BUCKET/PREFIX of this run

    @property
    def workspace(self) -> Path:
        """LORAOPS_HOME: the same path on both nodes, a different folder on each."""
        return self.root / "ws"

    def run(self, role: str, command: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """``command`` inside node ``role``'s mount namespace (so it sees that node's disk), in the repository."""
        enter = ["nsenter", f"--target={self.pids[role]}", "--mount", f"--wd={REPO}", "--"]
        return subprocess.run([*enter, *command], env=self.env if env is None else env, capture_output=True, text=True, timeout=timeout)

    def exists(self, role: str, pattern: str) -> bool:
        """Whether anything matches the glob ``pattern`` on node ``role``'s disk."""
        return self.run(role, ["sh", "-c", 'for path in $1; do test -e "$path" && exit 0; done; exit 1', "sh", pattern]).returncode == 0


def start_node(role: str, root: Path, args: list[str], env: dict[str, str], models: Path, log: Path) -> subprocess.Popen:
    """`ray start --block` in a new mount namespace (see NODE_SETUP), in its own session: SIGTERM to it
    stops this node's Ray processes (and only them). The Popen's pid is `ray start` itself (unshare and
    sh exec), a process inside the namespace."""
    agent, grpc, runtime_env, metrics, manager, objects = free_ports(6)
    ray_start = [
        RAY, "start", "--block", "--num-cpus=1", f"--temp-dir={root / f'ray-{role}'}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}", f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}", f"--node-manager-port={manager}", f"--object-manager-port={objects}", *args,
    ]  # fmt: skip
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", NODE_SETUP, "node-setup", *ray_start]
    setup = {"NODE_ROOT": str(root), "RAY_TEMP": str(root / f"ray-{role}"), "BASE_MODELS": str(models), "NODE_ROLE": role}
    with log.open("w") as handle:
        process = subprocess.Popen(command, env={**env, **setup}, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    # Until its tmpfs is mounted and filled, the pid may still be in this process's mount namespace (unshare
    # has not run yet): an `nsenter` then would enter ours, and a driver there would write into the empty
    # folder. /proc/PID/root resolves paths in that process's namespace: the marker is NODE_SETUP's last step.
    marker = Path(f"/proc/{process.pid}/root{root / 'ws' / 'node'}")
    deadline = time.monotonic() + 60
    while not marker.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return process


def stop_node(process: subprocess.Popen, temp_dir: Path) -> None:
    """SIGTERM the node's `ray start --block` (it stops its raylet, workers, GCS), then make sure: the
    process group, and any process still naming this node's temp dir. The node's tmpfs goes with the
    last process of its namespace."""
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
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()


def ray_python(cluster: Cluster, code: str, timeout: float = 120) -> str:
    """Run ``code`` in a driver on the head connected to the cluster (this process stays on the session's Ray)."""
    done = cluster.run("head", [sys.executable, "-c", "import json, ray\nray.init(log_to_driver=False)\n" + code], timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture
def shared_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this run (registry and Optuna study), dropped at the end."""
    from sqlalchemy import create_engine, make_url, text

    from loraops.config import normalize_database_url

    server = os.environ[POSTGRES_ENV]
    name = f"loraops_2n_{uuid.uuid4().hex[:12]}"
    admin = create_engine(normalize_database_url(server), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def cluster(shared_database, s3_server, tiny_model_home, tmp_path) -> Iterator[Cluster]:
    """Head (1 CPU) + worker (1 CPU, 127.0.0.2, resource loraops_worker), each on its own private
    disk, token auth on with a token of its own, sharing only the database and the S3 server."""
    storage = f"s3://{s3_server.bucket}/two-nodes-{uuid.uuid4().hex[:8]}"
    root = Path(tempfile.mkdtemp(prefix="lo2n-", dir="/tmp"))  # short: the sockets are under it
    # None of this machine's own S3, registry or cluster settings: only what the test gives the nodes.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "LORAOPS_", "RAY_ADDRESS", "RAY_AUTH_"))}
    # Every process of the cluster (nodes, drivers, CLI) must run in token mode with the same token;
    # RAY_AUTH_TOKEN takes precedence over the ~/.ray/auth_token file that `ray start` would pick up.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHONUNBUFFERED="1")
    # No drain on SIGTERM: Ray 2.60's `ray start --block` otherwise waits up to 30 s per node for Serve
    # to quiesce before it stops its processes, a minute of the teardown for nothing here.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    # What a pod gets from its Secrets: the shared database and object store, nothing else shared.
    env.update(LORAOPS_HOME=str(root / "ws"), LORAOPS_DATABASE_URL=shared_database, LORAOPS_ARTIFACT_URI=f"{storage}/registry", **s3_server.env())
    nodes: list[tuple[subprocess.Popen, Path]] = []
    try:
        gcs, client = free_ports(2)
        address = f"127.0.0.1:{gcs}"
        head = start_node("head", root, ["--head", f"--port={gcs}", f"--ray-client-server-port={client}", "--include-dashboard=false"],
                          env, tiny_model_home / "models", tmp_path / "head.log")  # fmt: skip
        nodes.append((head, root / "ray-head"))
        cluster = Cluster(address, {**env, "RAY_ADDRESS": address}, root, {"head": head.pid}, storage)
        _wait_for(lambda: _joined(cluster, 1), "the head node", nodes, tmp_path)
        worker_args = [f"--address={address}", f"--node-ip-address={WORKER_IP}", f"--resources={json.dumps({WORKER_RESOURCE: 1})}"]
        worker = start_node("worker", root, worker_args, env, tiny_model_home / "models", tmp_path / "worker.log")
        nodes.append((worker, root / "ray-worker"))
        cluster.pids["worker"] = worker.pid
        _wait_for(lambda: _joined(cluster, 2), "the worker node to join", nodes, tmp_path)
        yield cluster
    finally:
        for process, temp_dir in reversed(nodes):
            stop_node(process, temp_dir)
        with contextlib.suppress(OSError):
            root.rmdir()  # empty here: the nodes' files were in their tmpfs


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


def trial_results(s3_server, experiment: str) -> dict[str, list[dict]]:
    """Each trial's result.json lines, read from the S3 server with its own credentials (no disk holds them)."""
    import pyarrow.fs as pafs

    filesystem = s3_server.filesystem()
    infos = filesystem.get_file_info(pafs.FileSelector(experiment, recursive=True, allow_not_found=True))
    found = {}
    for info in infos:
        if info.type == pafs.FileType.File and info.base_name == "result.json":
            with filesystem.open_input_stream(info.path) as stream:
                found[info.path] = [json.loads(line) for line in stream.read().decode().splitlines() if line.strip()]
    return found


def test_tune_register_and_serve_across_two_nodes_on_private_disks_with_token_auth(cluster, s3_server, tmp_path):
    nodes = json.loads(ray_python(cluster, "print(json.dumps({n['NodeManagerAddress']: n['Resources'] for n in ray.nodes() if n['Alive']}))"))
    head_ip = next(ip for ip, resources in nodes.items() if WORKER_RESOURCE not in resources)
    assert set(nodes) == {head_ip, WORKER_IP}

    # The disks are private: the same path holds each node's own files, and nothing here.
    assert not any(cluster.root.iterdir())
    for role, other in (("head", "worker"), ("worker", "head")):
        marker = cluster.run(role, ["cat", str(cluster.workspace / "node")])
        assert marker.stdout.strip() == role, marker.stderr
        assert cluster.exists(role, str(cluster.root / f"ray-{role}" / "session_*"))
        assert not cluster.exists(role, str(cluster.root / f"ray-{other}"))

    # The token is enforced: a driver without it is refused.
    no_token = {key: value for key, value in cluster.env.items() if key not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    refused = cluster.run("head", [sys.executable, "-c", "import ray; ray.init()"], env={**no_token, "HOME": str(tmp_path)})
    assert refused.returncode != 0

    # Two trials of one CPU each on two one-CPU nodes: one trial per node. The driver runs on the head,
    # the experiment lives in S3, and the best trial is registered from there into the shared registry.
    experiment = f"{cluster.storage}/experiments"
    tune = [sys.executable, "-m", "loraops", "tune", "--config", str(REPO / "tune" / "tiny.yaml"), "--name", "two-nodes", "--register", "twonodes"]
    done = cluster.run("head", [*tune, *(arg for item in [*TUNE, f"search.storage={experiment}"] for arg in ("--set", item))], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "registered twonodes:1" in done.stdout
    results = trial_results(s3_server, f"{experiment.removeprefix('s3://')}/two-nodes")
    assert len(results) == 2, sorted(results)
    ran_on = set()
    for lines in results.values():
        assert lines and lines[-1]["step"] == 10
        ran_on |= {line["node_ip"] for line in lines}
    assert ran_on == {head_ip, WORKER_IP}
    # The driver's results stayed on the head's disk.
    best = cluster.workspace / "experiments" / "two-nodes" / "best_trial.json"
    assert cluster.exists("head", str(best))
    assert not cluster.exists("worker", str(best))

    # The model replica needs the worker's resource: it can only run on the worker node, which reads
    # the version from the shared database and S3 into its own cache.
    port = free_ports(1)[0]
    serve_args = [
        "args.adapter=twonodes:1",
        f"http_options.port={port}",
        "deployments.SummarizerModel.autoscaling_config={min_replicas: 1, initial_replicas: 1, max_replicas: 1}",
        f"deployments.SummarizerModel.ray_actor_options={{num_cpus: 0.5, resources: {{{WORKER_RESOURCE}: 1}}}}",
    ]
    serve = [sys.executable, "-m", "loraops", "serve", "--config", str(REPO / "serve" / "tiny.yaml"), "--detach"]
    done = cluster.run("head", [*serve, *(arg for item in serve_args for arg in ("--set", item))], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/summarize", json={"dialogue": "#Person1#: Is the shop open?\n#Person2#: Yes, until six."}, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == {"name": "twonodes", "version": 1}
    held = float(ray_python(cluster, f"print(ray.cluster_resources()['{WORKER_RESOURCE}'] - ray.available_resources().get('{WORKER_RESOURCE}', 0.0))"))
    assert held == 1.0  # the replica holds the worker's resource
    cached = str(cluster.workspace / "cache" / "registry" / "sha256-*")
    assert cluster.exists("worker", cached)
    assert not cluster.exists("head", cached)
