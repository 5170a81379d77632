"""The registry's S3 store failing for real: a SeaweedFS server of the test's own (``own_s3_server``),
stopped (killed, as a crash would) and restarted on the same ports and data.

A registration whose store goes down half-way fails with one line and leaves no version; what it
left in the bucket does not stand in the way of the next one. Serving replicas answer from their
local copies through the outage, report ``degraded`` only when a version they must fetch cannot be,
and catch up at their next registry poll once the store is back.

The server is stopped at fixed points inside real code (``stop_at``): every request still goes over
HTTP to the real server, nothing of S3 is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import helpers
from helpers import s3_objects, save_random_adapters, wait_until
from loraops.errors import LoraopsError
from loraops.registry import Registry

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny"
DIALOGUE = "#Person1#: Is the shop open on Sunday?\n#Person2#: Yes, from ten until four."


# --- stopping the server inside a registration -----------------------------------------------


class _StopsAfterOneMove:
    """A store's filesystem, every call passed through to it, that stops the server once one file has been moved."""

    def __init__(self, filesystem, stop: Callable[[], None]):
        self._filesystem, self._stop = filesystem, stop

    def __getattr__(self, name: str):
        return getattr(self._filesystem, name)

    def move(self, source: str, target: str) -> None:
        self._filesystem.move(source, target)
        self._stop()


def stop_at(point: str, stop: Callable[[], None], patch=setattr) -> None:
    """Make the next registration call ``stop`` (which stops the S3 server) at ``point``, once:
    ``upload``: as the upload of its second file starts; ``publish``: when publish has moved one
    file to NAME/vN (on S3 a move is a copy and a delete per file), before the next."""
    from loraops.registry.store import ArtifactStore

    fired: list[bool] = []

    def once() -> None:
        if not fired:
            fired.append(True)
            stop()

    if point == "upload":
        upload, uploads = ArtifactStore._upload, []

        def second_upload_stops(self, source, target):
            uploads.append(target)
            if len(uploads) == 2:
                once()
            return upload(self, source, target)

        patch(ArtifactStore, "_upload", second_upload_stops)
    elif point == "publish":
        move = ArtifactStore.move

        def publish_stops_after_one_file(self, source, target, manifest):
            if fired:
                return move(self, source, target, manifest)
            real, self.fs = self.fs, _StopsAfterOneMove(self.fs, once)
            try:
                return move(self, source, target, manifest)
            finally:
                self.fs = real

        patch(ArtifactStore, "move", publish_stops_after_one_file)
    else:
        raise ValueError(point)


def _cli_with_s3_stopped_at(point: str, pid: int, port: int, *argv: str) -> int:
    """``loraops ARGV`` in this process (a subprocess of the test), the S3 server (process group ``pid``,
    listening on ``port``) killed at ``point``; the test reaps it."""
    from loraops.cli import main

    def kill() -> None:
        os.killpg(pid, signal.SIGKILL)
        wait_until(lambda: _refused(port), 30, f"port {port} to refuse connections")

    stop_at(point, kill)
    return main(list(argv))


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _stored(server, prefix: str) -> dict[str, bytes]:
    """The objects under ``prefix``, by their path inside it."""
    return {key.removeprefix(f"{server.bucket}/{prefix}/"): data for key, data in s3_objects(server, prefix).items()}


def _versions(registry: Registry) -> int:
    """How many versions of NAME the registry has (an upload that failed before the number was allocated leaves no adapter row either)."""
    return next((info.versions for info in registry.list_adapters() if info.name == NAME), 0)


def _cannot_connect(uri: str, server) -> str:
    return f"{uri}: cannot connect to {server.endpoint} (AWS_ENDPOINT_URL)"


# --- registering ---------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["upload", "publish"])
def test_a_registration_whose_s3_goes_down_leaves_no_version_and_nothing_in_the_way(point, own_s3_server, make_run, tmp_path, monkeypatch):
    """``upload``: one file staged, the second never; ``publish``: the number allocated, one file already
    at NAME/v1, the row not committed. Either way: one line, no version, the number given back, and
    once the server is back the same registration gets version 1 with exactly its files."""
    server = own_s3_server
    uri = f"s3://{server.bucket}/registry"
    registry = Registry(db_url=f"sqlite:///{tmp_path / 'registry.db'}", workspace=tmp_path / "ws", artifact_uri=uri)
    adapter = make_run(tmp_path / "run")
    stop_at(point, server.stop, monkeypatch.setattr)

    with pytest.raises(LoraopsError) as caught:
        registry.register(adapter, NAME)
    assert str(caught.value) == _cannot_connect(uri, server)
    assert server.process.poll() is not None  # really stopped, not mocked
    assert _versions(registry) == 0

    server.restart()
    debris = _stored(server, f"registry/{NAME}")  # what the failed attempt could not remove with the server down
    staged = {key for key in debris if key.startswith(".staging-")}
    assert len({key.split("/")[0] for key in staged}) == 1
    assert sorted(key.rsplit("/", 1)[1] for key in staged) == (["adapter_config.json"] if point == "upload" else ["adapter_model.safetensors"])
    assert sorted(set(debris) - staged) == ([] if point == "upload" else ["v1/adapter_config.json"])  # files at v1, no row

    version = registry.register(adapter, NAME)
    assert version.version == 1
    registry.verify(f"{NAME}:1")
    stored = _stored(server, f"registry/{NAME}/v1")
    assert stored == {rel: (adapter / rel).read_bytes() for rel in version.files}  # its files, nothing of the failed attempt
    assert staged <= set(_stored(server, f"registry/{NAME}"))  # under an hour old: it might be an upload in progress (sweep_staging)
    replica = Registry(db_url=registry.db_url, workspace=tmp_path / "replica", artifact_uri=uri)
    assert (replica.resolve(f"{NAME}:1") / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()


def test_register_on_the_command_line_with_s3_going_down_is_one_line(own_s3_server, make_run, cli_env, tmp_path):
    """The same fault (at publish) in ``loraops register``: exit 2, one line on stderr, no traceback."""
    server = own_s3_server
    uri = f"s3://{server.bucket}/registry"
    env = cli_env(tmp_path / "ws") | server.env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    code = "import sys, test_storage_faults as t; sys.exit(t._cli_with_s3_stopped_at(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]))"
    hook = ["publish", str(server.process.pid), str(server.endpoint.rsplit(":", 1)[1])]
    register = ["register", "--adapter", str(make_run(tmp_path / "run")), "--name", NAME, "--store", uri]
    result = subprocess.run([sys.executable, "-c", code, *hook, *register], env=env, capture_output=True, text=True, timeout=180)

    assert server.process.wait(timeout=30) == -signal.SIGKILL  # killed by the command's hook
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [f"loraops: error: {_cannot_connect(uri, server)}"]
    assert server.secret not in result.stdout + result.stderr
    assert _versions(Registry(workspace=tmp_path / "ws", artifact_uri=uri)) == 0


def test_a_registration_removes_staging_folders_left_over_an_hour_ago(s3_env, make_run, tmp_path):
    """Debris of failed registrations goes with the next registration of the name, once it is over an
    hour old (by the UTC time in its name): younger folders may be uploads in progress and stay."""
    prefix = f"sweep-{tmp_path.name}"
    filesystem = s3_env.filesystem()
    now = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folders = {
        "abandoned": f".staging-20000101T000000Z-{uuid.uuid4().hex}",
        "in progress": f".staging-{now}-{uuid.uuid4().hex}",
        "unknown age": f".staging-{uuid.uuid4().hex}",  # the naming before the time was added
    }
    for folder in folders.values():
        with filesystem.open_output_stream(f"{s3_env.bucket}/{prefix}/{NAME}/{folder}/adapter_config.json") as stream:
            stream.write(b"{}")

    registry = Registry(db_url=f"sqlite:///{tmp_path / 'registry.db'}", workspace=tmp_path / "ws", artifact_uri=f"s3://{s3_env.bucket}/{prefix}")
    assert registry.register(make_run(tmp_path / "run"), NAME).version == 1

    left = {key.split("/")[0] for key in _stored(s3_env, f"{prefix}/{NAME}")}
    assert left == {"v1", folders["in progress"], folders["unknown age"]}


# --- serving -------------------------------------------------------------------------------------


def _answer(http: httpx.Client) -> int:
    response = http.post("/v1/summarize", json={"dialogue": DIALOGUE, "max_new_tokens": 2})
    assert response.status_code == 200, response.text
    return response.json()["model"]["version"]


def _health(http: httpx.Client) -> dict:
    response = http.get("/healthz")
    assert response.status_code == 200, response.text
    return response.json()


def _serves_from_its_cache(http: httpx.Client, version: int, seconds: float) -> None:
    """For ``seconds`` (longer than a registry poll), every request answered by ``version`` and /healthz ok."""
    until = time.monotonic() + seconds

    def answered() -> bool:
        assert _answer(http) == version and _health(http)["status"] == "ok"
        return time.monotonic() >= until

    wait_until(answered, seconds + 60, f"{seconds} s of answers from version {version}")


def _move_alias(registry: Registry, version: int) -> None:
    """Point production at ``version`` with the rows ``promote`` writes, but not its check of the files:
    a promotion that verified them just before the store went down."""
    from loraops.registry import aliases, db

    def move(session) -> None:
        adapter = aliases.adapter_row(session, NAME, lock=True)
        previous = aliases.alias_target(session, adapter, "production")
        aliases.move_alias(session, adapter.id, "production", version, previous, "promote", "test", "verified just before the outage")

    db.run_write(registry.engine, move)


@pytest.mark.slow
@pytest.mark.reliability
@pytest.mark.ray
def test_replicas_serve_through_an_s3_outage_and_catch_up_after_it(own_s3_server, deploy_tiny_app, tiny_model_home, tmp_path):

    from loraops.config import load_config
    from loraops.registry import Lineage

    server = own_s3_server
    home = tmp_path / "home"  # the replica's workspace: the base model, and its cache of registry versions
    shutil.copytree(tiny_model_home / "models", home / "models")
    db_url, uri = f"sqlite:///{tmp_path / 'registry.db'}", f"s3://{server.bucket}/registry"
    registry = Registry(db_url=db_url, workspace=tmp_path / "operator", artifact_uri=uri)  # another machine: no cache shared with the replica
    config = load_config(REPO / "tune" / "tiny.yaml", [f"workspace={home}"])
    lineage = Lineage(config=config.model_dump(mode="json"))
    adapters = save_random_adapters(config, tmp_path / "adapters", 3)
    for folder in adapters[:2]:
        registry.register(folder, NAME, lineage=lineage)
    registry.promote(NAME, 1)

    # The session's Ray workers do not have the AWS variables: the replica gets them here. A real
    # cluster sets them on its nodes (or uses an instance role) rather than in the serve config.
    env_vars = json.dumps({"env_vars": server.env()})
    url = deploy_tiny_app(
        [
            "name=storage-faults",
            f"args.workspace={home}",
            f"args.db_url={db_url}",
            f"args.artifact_uri={uri}",
            "args.registry_poll_s=1",
            "args.auth_token_env=LORAOPS_TEST_NO_TOKEN",
            "args.max_batch_size=1",
            "args.prefill_batch_size=1",
            "args.context_tokens=256",  # one length bucket: a short warm-up
            "args.default_max_new_tokens=2",
            f"deployments.SummarizerModel.ray_actor_options.runtime_env={env_vars}",
        ]
    )
    cache = home / "cache" / "registry"
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            assert _answer(http) == 1 and _health(http)["status"] == "ok"
            assert len(list(cache.glob("sha256-*"))) == 1

            # The store goes down. Nothing needs fetching: the replica answers from its copy of v1, and
            # its registry polls (the database only) find nothing to do.
            server.stop()
            _serves_from_its_cache(http, 1, seconds=2.5)
            with pytest.raises(LoraopsError) as refused:
                registry.promote(NAME, 2)  # it cannot verify the files: nothing moves
            assert str(refused.value).startswith(f"refusing to promote {NAME}:2 to production: its artifacts cannot be verified: ")
            assert str(refused.value).endswith(_cannot_connect(uri, server))

            # The alias moves to v2, which the replica has never fetched: it keeps serving v1 and says why.
            _move_alias(registry, 2)
            health = wait_until(lambda: (h := _health(http))["status"] == "degraded" and h, 60, "/healthz to report that tiny:2 cannot be fetched", 0.2)
            problem = health["problem"]
            assert problem == f"cannot switch to {NAME}:2: <path>: cannot connect to <path> (AWS_ENDPOINT_URL); still serving {NAME}:1", problem
            assert health["model"]["version"] == 1 and _answer(http) == 1
            models = http.get("/v1/models").text
            for secret in (server.key, server.secret, str(tmp_path), "127.0.0.1"):
                assert secret not in models and secret not in json.dumps(health)
            with pytest.raises(LoraopsError, match=f"refusing to roll back {NAME}@production to version 1: its artifacts cannot be verified: .*cannot connect"):
                registry.rollback(NAME)

            # The store is back: the next poll fetches v2, with no one doing anything.
            server.restart()
            wait_until(lambda: _health(http)["status"] == "ok", 60, "/healthz to be ok again", 0.2)
            assert _answer(http) == 2 and _health(http)["model"]["version"] == 2

            # And the next promotion goes through to the replica.
            registry.register(adapters[2], NAME, lineage=lineage)
            registry.promote(NAME, 3)
            wait_until(lambda: _answer(http) == 3, 60, "answers from tiny:3", 0.2)
            assert _health(http) == {"status": "ok", "model": {"name": NAME, "version": 3, "mode": "merged", "adapter": f"{NAME}@production"}}
            assert len(list(cache.glob("sha256-*"))) == 3
    finally:
        helpers.remove_applications()
