"""A throwaway PostgreSQL server that a test may stop, start, freeze and thaw (the shared server of
``LORAOPS_TEST_POSTGRES_URL`` must never be stopped). Started like ``.ci/run`` does: initdb into a
temporary folder (as the ``postgres`` user when running as root), 127.0.0.1 on a free port, fsync off.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from helpers import free_port


def server_bin() -> str | None:
    """The folder of initdb/pg_ctl (Debian's versioned folder first, else the PATH's), or None."""
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    if folders:
        return folders[-1]
    found = shutil.which("pg_ctl")
    return str(Path(found).parent) if found else None


def children_of(parent: int) -> list[int]:
    """The processes whose parent is ``parent``, from /proc (no pgrep needed)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(command)", which may hold spaces
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


class PostgresServer:
    """One server of this test's own: :meth:`start`, :meth:`stop`, :meth:`freeze` (SIGSTOP every process) and :meth:`thaw`."""

    def __init__(self, bin_dir: str):
        self.bin = Path(bin_dir)
        self.folder = Path(tempfile.mkdtemp(prefix="loraops-test-pg-"))
        self.port = free_port()
        self.url = f"postgresql://loraops@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
        self._run("initdb", "-D", str(self.folder / "data"), "-U", "loraops", "--auth=trust", "-E", "UTF8")

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "server.log"), "-w", "-t", "60", "-o", options, "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")

    def pids(self) -> list[int]:
        """The postmaster and its children (the backends holding the clients' connections)."""
        main = int((self.folder / "data" / "postmaster.pid").read_text().split()[0])
        return [main, *children_of(main)]

    def freeze(self) -> None:
        for pid in self.pids():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self.pids():
            os.kill(pid, signal.SIGCONT)

    def remove(self) -> None:
        try:
            self.thaw()
            self.stop()
        except (OSError, RuntimeError, ValueError):
            pass
        shutil.rmtree(self.folder, ignore_errors=True)
