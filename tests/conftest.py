"""Shared fixtures. Every test gets its own workspace (LORAOPS_HOME), except the tiny model, which
is built once per session into a shared workspace and copied, because building it is the slow part."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import helpers
from helpers import free_port
from s3_server import S3Server, start_s3_server, stop_s3_server

REPO = Path(__file__).resolve().parents[1]
#: A DialogSum-format .jsonl file (e.g. the official dialogsum.dev.jsonl); the tests that read real
#: DialogSum data are skipped without it.
DIALOGSUM_ENV = "LORAOPS_TEST_DIALOGSUM"
#: A PostgreSQL server URL; the registry tests also run against PostgreSQL when it is set.
POSTGRES_ENV = "LORAOPS_TEST_POSTGRES_URL"
#: The adapter name the ``serving_home`` fixture registers.
SERVED_ADAPTER = "tiny"


@pytest.fixture(scope="session")
def tiny_model_home(tmp_path_factory) -> Path:
    """A workspace holding the built tiny model.

    Building it (tokenizer + a short pre-training) takes minutes on 2 cores, so it is built once per
    machine into loraops' own cache (``$XDG_CACHE_HOME/loraops/tiny-phi/<recipe key>``) and copied here.
    """
    from loraops.training.tiny_model import ensure_tiny_model

    home = tmp_path_factory.mktemp("tiny-model-home")
    ensure_tiny_model(home)
    return home


@pytest.fixture
def workspace(tmp_path, tiny_model_home, monkeypatch) -> Path:
    """A fresh workspace for one test, with the tiny model already in it."""
    home = tmp_path / "ws"
    shutil.copytree(tiny_model_home / "models", home / "models")
    monkeypatch.setenv("LORAOPS_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def cli_env():
    """A function: the environment for a ``loraops`` subprocess working in workspace ``home``."""

    return helpers.cli_env


@pytest.fixture(scope="session")
def dialogsum_sample() -> Path:
    """A real DialogSum-format file named by $LORAOPS_TEST_DIALOGSUM; the test is skipped without one."""
    raw = os.environ.get(DIALOGSUM_ENV)
    if not raw:
        pytest.skip(f"{DIALOGSUM_ENV} is not set (the path of a DialogSum-format .jsonl file)")
    path = Path(raw).expanduser()
    if not path.is_file():
        pytest.skip(f"{DIALOGSUM_ENV}={raw}: no such file")
    return path


@pytest.fixture(scope="session")
def ray_address():
    """One real local Ray instance for the whole test session (each xdist worker's own), sized for CI's 2 cores.

    Yields its address, so CLI subprocesses can join it through RAY_ADDRESS. Always shut down. A new
    instance whatever Ray's address file says (``address="local"``): never another process's cluster.
    """
    import ray

    from loraops.cluster import use_local_serve_env

    use_local_serve_env()  # the Serve settings of `loraops serve`'s local instance
    # Autoscaling metrics every 2 s instead of Ray's 10 s, so the autoscaling test's short look-back window
    # always holds fresh figures (read by Serve's processes when they start, hence before ray.init).
    for variable in ("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"):
        os.environ.setdefault(variable, "2")
    context = ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        object_store_memory=200 * 1024 * 1024,
    )
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


# --- trained adapters -----------------------------------------------------------------------


#: A 30-step training run of the tiny model (three evaluations, three checkpoints).
QUICK = [
    "data.builtin_size=200",
    "training.max_steps=30",
    "training.eval_steps=10",
    "training.save_steps=10",
    "training.logging_steps=5",
    "training.eval_max_samples=16",
    "training.per_device_train_batch_size=8",
    "evaluation.max_samples=8",
    "evaluation.max_new_tokens=12",
]


@pytest.fixture(scope="session")
def quick_config():
    """A function: the tiny tune config cut to a 30-step run, plus ``extra`` overrides."""
    from loraops.config import load_config

    return lambda *extra: load_config(REPO / "tune" / "tiny.yaml", QUICK + list(extra))


@pytest.fixture(scope="session")
def trained(tiny_model_home, tmp_path_factory, quick_config):
    """One short real training run (config, result) shared by the training and evaluation tests."""
    from loraops.training.train import train

    config = quick_config(f"workspace={tiny_model_home}")
    return config, train(config, output_dir=tmp_path_factory.mktemp("run"), progress=False)


@pytest.fixture(scope="session")
def serving_home(tmp_path_factory, tiny_model_home) -> Path:
    """A workspace with the tiny model, one short training run (``runs/serve-test``) and its two
    checkpoints registered as ``tiny`` v1 (promoted to production) and v2."""
    from loraops.config import load_config
    from loraops.registry import Registry
    from loraops.training.train import train

    workspace = tmp_path_factory.mktemp("serve-home")
    shutil.copytree(tiny_model_home / "models", workspace / "models")
    config = load_config(
        REPO / "tune" / "tiny.yaml",
        [
            f"workspace={workspace}",
            "name=serve-test",
            "data.builtin_size=200",
            "training.max_steps=12",
            "training.per_device_train_batch_size=8",
            "training.save_steps=6",
            "training.eval_steps=6",
            "training.logging_steps=6",
            "training.eval_max_samples=16",
            "training.save_total_limit=null",
        ],
    )
    run = train(config, progress=False)
    registry = Registry(workspace=workspace)
    registry.register(run.output_dir / "checkpoint-6", SERVED_ADAPTER)  # v1
    registry.register(run.output_dir / "checkpoint-12", SERVED_ADAPTER)  # v2: six more steps, different weights
    registry.promote(SERVED_ADAPTER, 1)
    return workspace


@pytest.fixture(scope="session")
def serve_port(ray_address) -> int:
    """The local port of the session's Serve instance: started by the first module that serves, shared by the
    modules after it, each removing its applications when done (``helpers.remove_applications``)."""
    return free_port()


@pytest.fixture(scope="session")
def deploy_tiny_app(serve_port):
    """A function: start Serve on the session's port (or use it where it runs) and deploy ``serve/tiny.yaml``
    with ``overrides`` (the loraops path of ``loraops serve``); returns the application's URL. The caller
    removes its application (``helpers.remove_applications``).

    The application is sized for CI's 2 cores beside the other tests: one model replica without
    autoscaling, small CPU shares; ``overrides`` come after and win."""
    small = [
        "deployments.SummarizerModel.autoscaling_config=null",
        "deployments.SummarizerModel.num_replicas=1",
        "deployments.SummarizerModel.ray_actor_options.num_cpus=0.25",
        "deployments.SummarizerAPI.ray_actor_options.num_cpus=0.05",
    ]

    def deploy_app(overrides: list[str]) -> str:
        from loraops.serve.deploy import deploy
        from loraops.serve.settings import load_serve_config

        helpers.start_serve(serve_port)
        return deploy(load_serve_config(REPO / "serve" / "tiny.yaml", [f"http_options.port={serve_port}", *small, *overrides]))

    return deploy_app


#: The bearer token of the ``shared_app`` application, and the variable its ingress reads it from.
SHARED_APP_TOKEN, SHARED_APP_TOKEN_ENV = "shared-app-token", "LORAOPS_TEST_SHARED_APP_TOKEN"


@dataclass
class SharedApp:
    """The one Serve application the read-only serving modules share (``shared_app``): ``serve/tiny.yaml``
    on the ``serving_home`` registry, serving ``tiny@production`` (v1, the default) and ``tiny:2`` in
    nf4 mode (the base in 4 bits plus the adapter unmerged, as ``loraops evaluate`` computes), bearer
    auth on with ``token``, the registry polled every second. Deployed on first use, stopped by
    ``pytest_runtest_teardown`` after the last test that uses it (the modules that do run one after
    the other: ``pytest_collection_modifyitems``), so the modules with their own Serve start afresh."""

    deploy: object  # deploy_tiny_app's function
    home: Path
    token: str = SHARED_APP_TOKEN
    running: str | None = None  # the URL while deployed

    def url(self) -> str:
        if self.running is None:
            self.running = self.deploy(
                [
                    f"args.workspace={self.home}",
                    "args.adapters=[tiny@production, 'tiny:2']",
                    "args.mode=nf4",
                    "args.registry_poll_s=1",
                    f"args.auth_token_env={SHARED_APP_TOKEN_ENV}",
                    f"deployments.SummarizerAPI.ray_actor_options.runtime_env.env_vars.{SHARED_APP_TOKEN_ENV}={self.token}",
                ]
            )
        return self.running

    def http(self):
        """An HTTP client of the application with its bearer token (the caller closes it)."""
        import httpx

        return httpx.Client(base_url=self.url(), headers={"Authorization": f"Bearer {self.token}"}, timeout=120)

    def openai_client(self):
        """The official ``openai`` client of the application's OpenAI routes, without client-side retries."""
        import openai

        return openai.OpenAI(base_url=f"{self.url()}/v1", api_key=self.token, max_retries=0, timeout=120)

    def stop(self) -> None:
        if self.running is not None:
            self.running = None
            helpers.remove_applications()


_shared_apps: list[SharedApp] = []  # the session's one, for the hooks below


@pytest.fixture(scope="session")
def shared_app(deploy_tiny_app, serving_home) -> SharedApp:
    """The session's :class:`SharedApp` (a Serve start and deployment cost 20-45 s on 2 cores: paid once)."""
    app = SharedApp(deploy_tiny_app, serving_home)
    _shared_apps.append(app)
    return app


def _uses_shared_app(item) -> bool:
    return "shared_app" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items):
    """The modules with a test that uses ``shared_app`` run one after the other, where the first of them
    was, so its application is deployed once; the order inside each module and of the others is kept."""
    sharing = {item.path for item in items if _uses_shared_app(item)}
    if not sharing:
        return
    first = next(index for index, item in enumerate(items) if item.path in sharing)
    grouped = [item for item in items if item.path in sharing]
    rest = [item for item in items if item.path not in sharing]
    items[:] = rest[:first] + grouped + rest[first:]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test in a row that uses ``shared_app`` (and its modules' fixtures): stop it, as the
    modules with their own application stop theirs, so the CPUs and Serve's port go back."""
    yield
    if _uses_shared_app(item) and (nextitem is None or not _uses_shared_app(nextitem)):
        for app in _shared_apps:
            app.stop()


@pytest.fixture(scope="session")
def small_search() -> list[str]:
    """Overrides of ``tune/tiny.yaml`` for searches whose trials take a few seconds on one core:
    20 steps of 4 rows, an eval every 10, two trials at a time, ASHA from step 10."""
    return [
        "search.max_steps=20",
        "training.eval_steps=10",
        "training.logging_steps=10",
        "training.per_device_train_batch_size=4",
        "training.warmup_steps=0",
        "training.eval_max_samples=16",
        "data.builtin_size=120",
        "search.max_concurrent_trials=2",
        "search.resources={cpu: 1, gpu: 0}",
        "search.scheduler={type: asha, grace_period: 10, reduction_factor: 2}",
    ]


# --- registry ---------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty database per test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    server = os.environ.get(POSTGRES_ENV)
    if not server:
        pytest.skip(f"{POSTGRES_ENV} is not set (.ci/run starts a PostgreSQL server and sets it)")
    from sqlalchemy import create_engine, make_url, text

    name = f"loraops_test_{uuid.uuid4().hex[:12]}"
    from loraops.config import normalize_database_url

    admin = create_engine(normalize_database_url(server), isolation_level="AUTOCOMMIT")  # CI's URL is the plain postgresql:// form
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(server).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        from loraops.registry import db as registry_db

        registry_db.dispose_engine(url)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def make_run():
    """A function that writes a training run folder like ``loraops train`` does, with a small but valid
    PEFT adapter, and returns the adapter folder."""
    return _make_run


def _make_run(root: Path, seed: int = 0, eval_losses=(2.5, 2.0, 2.2), rouge_l: float | None = None, data: dict | None = None) -> Path:
    adapter = root / "adapter"
    adapter.mkdir(parents=True)
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 32)).astype(np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((32, 4)).astype(np.float32),
    }
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    config = {
        "name": root.name,
        "model": {"name": "builtin:tiny-phi"},
        "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
        "training": {"learning_rate": 1e-3, "max_steps": 30},
        "data": data or {"source": "builtin", "builtin_size": 300},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    events = [{"step": 10 * (i + 1), "eval_loss": loss} for i, loss in enumerate(eval_losses)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [{"step": 5, "train_loss": 3.0}] + events))
    if rouge_l is not None:
        report = {"adapter": str(adapter), "tuned": {"rouge1": rouge_l + 5, "rouge2": rouge_l - 10, "rougeL": rouge_l, "rougeLsum": rouge_l, "seconds": 1.5}}
        (root / "evaluation.json").write_text(json.dumps(report))
    return adapter


# --- a PostgreSQL server of a module's own --------------------------------------------------------


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server for one test module, which its tests may stop, start, freeze and thaw
    (``pg_server.PostgresServer``); skipped where PostgreSQL's server programs are not installed."""
    from pg_server import PostgresServer, server_bin

    folder = server_bin()
    if folder is None:
        pytest.skip("PostgreSQL's server programs are not installed (.ci/run installs them)")
    server = PostgresServer(folder)
    try:
        server.start()
        yield server
    finally:
        server.remove()


# --- a real S3 server (tests/s3_server.py) ---------------------------------------------------------
# A test that stops its server takes one of its own (``own_s3_server``), which restarts on the same ports and data.

@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server for the whole session (about 5 s to start, 100 MB of memory), stopped at the end."""
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        stop_s3_server(server, grace_s=0)  # its data is thrown away; a graceful stop hangs 15 s in the filer's gRPC shutdown


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The AWS variables of ``s3_server`` set in this process (and none of the developer's own)."""
    return _use_s3(s3_server, monkeypatch)


@pytest.fixture
def own_s3_server(tmp_path, monkeypatch):
    """A SeaweedFS S3 server for this test alone (about 5 s to start), which it may stop and restart
    (``server.stop()``, ``server.restart()``), its AWS variables set as ``s3_env`` sets them; killed at the end."""
    server = start_s3_server(tmp_path / "own-seaweedfs")
    try:
        yield _use_s3(server, monkeypatch)
    finally:
        stop_s3_server(server, grace_s=0)  # as s3_server's


def _use_s3(server: S3Server, monkeypatch) -> S3Server:
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return server
