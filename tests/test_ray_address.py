"""Ray is joined only where asked (issue #29 item 8): without an address or $RAY_ADDRESS, loraops starts a
new local instance whatever Ray's address file says. The file is written stale (naming a cluster that is
gone, as after a crashed ``ray start``) into a Ray temp folder of the test's own ($RAY_TMPDIR), so no
other Ray session on the machine sees it or is seen."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import free_port


@pytest.fixture
def stale_ray_tmpdir():
    """A short private Ray temp folder (Ray's socket paths must stay short) whose address file names a dead cluster."""
    from ray._private.utils import get_ray_address_file

    base = tempfile.mkdtemp(prefix="lr-")  # $RAY_TMPDIR: Ray's temp folder is its "ray" subfolder
    stale = f"127.0.0.1:{free_port()}"
    (Path(base) / "ray").mkdir()
    Path(get_ray_address_file(str(Path(base) / "ray"))).write_text(stale)
    try:
        yield base, stale
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_without_an_address_ray_is_told_to_start_a_new_instance(stale_ray_tmpdir, monkeypatch):
    """Ray's own resolution: ``ray.init()`` would pick the stale cluster; what loraops passes starts a new one."""
    from ray._private.services import canonicalize_bootstrap_address

    from loraops import cluster

    base, stale = stale_ray_tmpdir
    folder = str(Path(base) / "ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert canonicalize_bootstrap_address(None, folder).endswith(stale.rsplit(":")[1])  # the trap: the address file decides
    assert cluster.init_address() == "local"
    assert canonicalize_bootstrap_address(cluster.init_address(), folder) is None  # None: start a new local instance
    assert cluster.init_address("10.0.0.1:6379") == "10.0.0.1:6379"
    assert cluster.init_address("auto") == "auto"  # asking for the address file explicitly still works
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert cluster.init_address() == "10.0.0.2:6379"


@pytest.mark.ray
def test_connect_starts_a_local_instance_despite_a_stale_address_file(stale_ray_tmpdir, tmp_path):
    """The real thing, in a process of its own: before, ``ray.init(num_cpus=...)`` failed at once
    ("When connecting to an existing cluster, num_cpus and num_gpus must not be provided"). The new
    instance's address is logged, for operators to inspect it."""
    base, stale = stale_ray_tmpdir
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = base
    code = (
        "import logging, ray\nfrom loraops import cluster\nlogging.basicConfig(level=logging.INFO)\n"
        "owned = cluster.connect(num_cpus=1, log_to_driver=False, configure_logging=False)\n"
        "print('address', ray.get_runtime_context().gcs_address, 'owned', owned, flush=True)\n"
        "cluster.shutdown(owned)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("address "))
    address, owned = line.split()[1], line.split()[3]
    assert address != stale and owned == "True", line
    assert f"started a new local Ray instance at {address} (inspect it: RAY_AUTH_MODE=token ray status --address {address})" in done.stderr
