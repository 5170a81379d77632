"""Experiments and the registry on S3, against a real S3 server (SeaweedFS on loopback, the
``s3_server`` fixture), configured with the standard AWS variables only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import run_cli, run_main
from helpers import s3_objects as objects
from loraops.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def test_the_aws_variables_reach_the_s3_server(s3_env, tmp_path):
    """AWS_ENDPOINT_URL's scheme and host are used as they are: http on loopback, never a public endpoint."""
    from loraops import storage

    filesystem, path = storage.open_uri(f"s3://{s3_env.bucket}/probe/")
    assert path == f"{s3_env.bucket}/probe"
    storage.check_access(filesystem, path, "s3://probe")
    with filesystem.open_output_stream(f"{path}/hello.txt") as stream:
        stream.write(b"hello")
    assert objects(s3_env, "probe") == {f"{s3_env.bucket}/probe/hello.txt": b"hello"}
    reduced = filesystem.__reduce__()[1][0]  # what a pickled copy (Tune's state, a trial's arguments) carries
    assert reduced["endpoint_override"] == s3_env.endpoint.split("://")[1] and reduced["scheme"] == "http"
    assert reduced["access_key"] is None and reduced["secret_key"] is None


def test_aws_endpoint_url_s3_wins_over_aws_endpoint_url(s3_env, monkeypatch):
    from loraops import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint)
    filesystem, path = storage.open_uri(f"s3://{s3_env.bucket}/x")
    storage.check_access(filesystem, path, "s3://x")  # reaches the server


def test_registry_on_s3_caches_versions_by_checksum_and_keeps_no_credentials(s3_env, make_run, tmp_path, monkeypatch):
    """Registered files land in the bucket; a replica's workspace downloads a version once into a
    cache keyed by its sha256, reuses it while the server is unreachable, and refetches a damaged copy."""
    db = f"sqlite:///{tmp_path / 'registry.db'}"
    uri = f"s3://{s3_env.bucket}/registry-{tmp_path.name}"
    registry = Registry(db_url=db, workspace=tmp_path / "ws", artifact_uri=uri)
    version = registry.register(make_run(tmp_path / "run", seed=3), "cached")
    assert version.artifact_uri == f"{uri.removesuffix('/')}/cached/v1"
    stored = objects(s3_env, f"registry-{tmp_path.name}/cached/v1")
    assert sorted(Path(key).name for key in stored) == ["adapter_config.json", "adapter_model.safetensors"]

    replica = Registry(db_url=db, workspace=tmp_path / "replica", artifact_uri=uri)  # another machine's workspace
    cached = replica.resolve("cached:1")
    assert cached.parent == tmp_path / "replica" / "cache" / "registry" and cached.name.startswith("sha256-")
    assert (cached / "adapter_model.safetensors").read_bytes() == stored[f"{s3_env.bucket}/registry-{tmp_path.name}/cached/v1/adapter_model.safetensors"]

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the store unreachable: a restart still finds its cache
    assert Registry(db_url=db, workspace=tmp_path / "replica", artifact_uri=uri).resolve("cached:1") == cached
    (cached / "adapter_config.json").write_text("{}")
    with pytest.raises(Exception, match="cannot connect|adapter_config.json"):
        Registry(db_url=db, workspace=tmp_path / "replica", artifact_uri=uri).resolve("cached:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)
    assert json.loads((replica.resolve("cached:1") / "adapter_config.json").read_text())["r"] == 4  # fetched again

    raw = (tmp_path / "registry.db").read_bytes()
    assert s3_env.secret.encode() not in raw and s3_env.key.encode() not in raw


#: Seconds a CLI call here may take (an S3 call retries before it gives up).
CLI_TIMEOUT = 300


@pytest.mark.parametrize(
    ("problem", "change", "expected"),
    [
        ("wrong key", {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
         "access denied at http://127.0.0.1:{port} (AWS_ENDPOINT_URL): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ("missing bucket", {"BUCKET": "no-such-bucket"}, "bucket 'no-such-bucket' does not exist at http://127.0.0.1:{port} (AWS_ENDPOINT_URL)"),
        ("unreachable", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "cannot connect to http://127.0.0.1:9 (AWS_ENDPOINT_URL)"),
    ],
)
def test_bad_s3_settings_are_one_line_and_write_nothing(problem, change, expected, s3_server, cli_env, make_run, tmp_path):
    """register and tune: one line naming the URI and the variable to check, exit 2, nothing written."""
    env = cli_env(tmp_path / "ws") | s3_server.env()
    bucket = change.pop("BUCKET", s3_server.bucket)
    env |= change
    prefix = f"bad-{tmp_path.name}"
    port = s3_server.endpoint.rsplit(":", 1)[1]
    adapter = make_run(tmp_path / "run")
    register = run_cli("register", "--adapter", str(adapter), "--name", "x", "--store", f"s3://{bucket}/{prefix}/registry", env=env, timeout=CLI_TIMEOUT)
    tiny = str(REPO / "tune" / "tiny.yaml")
    tune = run_cli("tune", "--config", tiny, "--set", f"search.storage=s3://{bucket}/{prefix}/experiments", env=env, timeout=CLI_TIMEOUT)
    for result, uri in ((register, f"s3://{bucket}/{prefix}/registry"), (tune, f"s3://{bucket}/{prefix}/experiments")):
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and uri in lines[0] and expected.format(port=port) in lines[0], problem
        assert s3_server.secret not in result.stdout + result.stderr
    assert objects(s3_server, prefix) == {}
    listing = run_main("registry", "list", env=cli_env(tmp_path / "ws"))
    assert "no adapters registered yet" in listing.stdout


@pytest.mark.slow
def test_tune_on_s3_then_show_register_promote_and_load_on_machines_without_its_files(s3_server, cli_env, workspace, tmp_path, small_search):
    """The hand-offs through storage alone: the search's own workspace loses its experiment folder,
    and --show, register, promote and a replica's load run from other workspaces that never held a
    trial's file. No credential lands in the bucket, the database or the output."""
    prefix = f"e2e-{tmp_path.name}"
    shared = {"LORAOPS_DATABASE_URL": f"sqlite:///{tmp_path / 'shared.db'}", "LORAOPS_ARTIFACT_URI": f"s3://{s3_server.bucket}/{prefix}/registry"}
    env = cli_env(workspace) | s3_server.env() | shared
    env.pop("RAY_ADDRESS", None)  # a Ray of its own, started with these variables: the trials read S3 with them
    experiment = f"s3://{s3_server.bucket}/{prefix}/experiments/s3exp"
    settings = [*small_search, "search.num_samples=2", "search.scheduler={type: fifo}", "search.max_steps=20", "search.keep_checkpoints=1",
                f"search.storage=s3://{s3_server.bucket}/{prefix}/experiments"]
    overrides = [arg for item in settings for arg in ("--set", item)]
    tune = run_cli("tune", "-c", str(REPO / "tune" / "tiny.yaml"), "--name", "s3exp", *overrides, env=env, timeout=600)
    assert tune.returncode == 0, tune.stdout[-3000:] + tune.stderr[-3000:]
    stored = objects(s3_server, f"{prefix}/experiments/s3exp")
    line = next(line for line in tune.stdout.splitlines() if line.startswith("storage: "))
    assert line.startswith(f"storage: {len(stored)} objects, ") and experiment in line, line
    # Two checkpoints per trial were reported, one kept (the best) plus Tune's latest; no base model.
    checkpoints = {key.split("/checkpoint_")[0] + "/checkpoint_" + key.split("/checkpoint_")[1].split("/")[0] for key in stored if "/checkpoint_" in key}
    per_trial = [sum(1 for path in checkpoints if f"/{trial}/" in path) for trial in {path.rsplit("/", 2)[-2] for path in checkpoints}]
    assert len(per_trial) == 2 and all(1 <= count <= 2 for count in per_trial), sorted(checkpoints)
    assert not [key for key in stored if key.endswith(("/model.safetensors", "pytorch_model.bin"))]
    shutil.rmtree(workspace / "experiments")

    elsewhere = cli_env(tmp_path / "other") | s3_server.env() | shared
    # --show, register and promote run in this process (run_main): the same commands without a subprocess's imports.
    shown = run_main("tune", "--show", experiment, env=elsewhere)
    assert shown.returncode == 0 and "best" in shown.stdout.lower(), shown.stdout + shown.stderr
    resumed = run_cli("tune", "--resume", experiment, env=elsewhere | {"LORAOPS_HOME": str(workspace)}, timeout=300)  # finished: nothing to run
    assert resumed.returncode == 0 and experiment in resumed.stdout, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    registered = run_main("register", "--from-experiment", experiment, "--name", "tiny", env=elsewhere)
    assert registered.returncode == 0, registered.stdout + registered.stderr
    root = f"{s3_server.bucket}/{prefix}/experiments/s3exp"
    best = json.loads(stored[f"{root}/best_trial.json"])
    promoted = run_main("promote", "tiny", "1", env=elsewhere)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr

    replica = Registry(db_url=shared["LORAOPS_DATABASE_URL"], workspace=tmp_path / "replica", artifact_uri=shared["LORAOPS_ARTIFACT_URI"])
    import os

    os.environ.update(s3_server.env())  # what the replica's node has
    try:
        version = replica.get("tiny@production")
        folder = replica.resolve("tiny@production")
    finally:
        for name in s3_server.env():
            os.environ.pop(name, None)
    weights = (folder / "adapter_model.safetensors").read_bytes()
    assert weights == stored[f"{root}/{best['checkpoint']}/adapter_model.safetensors"]  # the trial's checkpoint, not a node's copy
    assert version.trial_id == best["trial_id"] and version.metrics["eval_loss"] == pytest.approx(best["metrics"]["eval_loss"])
    from loraops.config import Config, validate
    from loraops.training.model import load_for_inference

    model, _ = load_for_inference(validate(Config, version.config, origin="the registered version"), folder)
    assert type(model).__name__.startswith("Peft")

    everything = b"".join(objects(s3_server, prefix).values()) + (tmp_path / "shared.db").read_bytes()
    everything += (tune.stdout + tune.stderr + resumed.stdout + resumed.stderr + registered.stdout + registered.stderr + shown.stdout).encode()
    logs = [path for home in (workspace, tmp_path / "other") for path in (home / "logs").rglob("*") if path.is_file()]
    assert logs  # tune's log file (Ray's and the libraries' output) is among what is searched
    everything += b"".join(path.read_bytes() for path in logs)
    assert s3_server.secret.encode() not in everything


def test_promote_and_canary_verify_the_stored_files_and_refuse_while_the_store_is_unreachable(s3_server, cli_env, make_run, tmp_path):
    """promote and canary start/promote read the version's files in the bucket (their checks hash them
    there); with the endpoint unreachable they refuse with one line and move nothing."""
    uri = f"s3://{s3_server.bucket}/canary-{tmp_path.name}/registry"
    env = cli_env(tmp_path / "ws") | s3_server.env() | {"LORAOPS_ARTIFACT_URI": uri}
    # The commands that succeed run in this process (run_main); the refusals run as a user runs them, so
    # "one line" counts what the whole process writes to stderr, the storage libraries' own output included.
    for seed in (1, 2):
        adapter = make_run(tmp_path / f"run{seed}", seed=seed)
        assert run_main("register", "--adapter", str(adapter), "--name", "tiny", env=env).returncode == 0
    assert run_main("promote", "tiny", "1", env=env).returncode == 0

    down = env | {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    for args in (["promote", "tiny", "2"], ["canary", "start", "tiny:2", "--percent", "30"]):
        refused = run_cli(*args, env=down, timeout=CLI_TIMEOUT)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "cannot connect to http://127.0.0.1:9 (AWS_ENDPOINT_URL)" in refused.stderr and "Traceback" not in refused.stderr
    status = run_main("canary", "status", "tiny", env=env)
    assert "no canary" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr

    started = run_main("canary", "start", "tiny:2", "--percent", "30", env=env)
    assert started.returncode == 0, started.stderr
    promoted = run_main("canary", "promote", "tiny", "--force", env=env)
    assert promoted.returncode == 0 and "version 1 -> 2" in promoted.stdout, promoted.stdout + promoted.stderr
