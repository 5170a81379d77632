"""The one way loraops joins Ray: connect to a cluster or start a local instance, and leave it as found.

Every command that needs Ray (``tune``, ``serve``, ``bench serve``, ``demo``) goes through
:func:`connect`: an address given explicitly (``--address``, ``search.ray_address``), else
``$RAY_ADDRESS``, else a new local instance, whatever Ray's address file says (a ``ray start``
cluster on this machine, alive or long gone, is joined only when named: ``--address auto``). A process that is already connected (a notebook, a
test, the demo calling the search) is left as it is. :func:`shutdown` ends only a connection this
process made, so a caller's Ray is never stopped under it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

#: Ray's own variable naming the cluster to join; ``ray.init()`` reads it too.
ADDRESS_ENV = "RAY_ADDRESS"
#: ``ray.init``'s address for "start a new local instance": without it ``ray.init()`` joins the last
#: cluster ``ray start`` left in its address file, or fails when that cluster is gone.
LOCAL = "local"


#: Serve settings of a local instance, read by its controller from the environment: a proxy that dies is
#: found after 3 failed health checks, so checking every 2 s instead of 10 brings the endpoint back in
#: about 8 s instead of 30 (measured in tests/test_replica_crash.py). A variable already set wins.
LOCAL_SERVE_ENV = {"RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "2"}


def use_local_serve_env() -> None:
    """Set :data:`LOCAL_SERVE_ENV` where unset, before a local instance starts (its processes inherit this environment)."""
    for key, value in LOCAL_SERVE_ENV.items():
        os.environ.setdefault(key, value)


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else $RAY_ADDRESS, else None (start a local instance)."""
    return address or os.environ.get(ADDRESS_ENV) or None


def init_address(address: str | None = None) -> str:
    """What :func:`connect` passes to ``ray.init``: :func:`cluster_address`, else :data:`LOCAL`."""
    return cluster_address(address) or LOCAL


def connect(
    address: str | None = None,
    *,
    namespace: str | None = None,
    logging_level: int | None = None,
    runtime_env: dict[str, Any] | None = None,
    num_cpus: int | None = None,
    log_to_driver: bool = True,
    configure_logging: bool = True,
) -> bool:
    """Connect this process to Ray; True when this call made the connection (the caller owns it).

    Already connected: nothing happens and the answer is False. Else join the cluster of
    :func:`cluster_address`, or start a local instance with ``num_cpus`` (None: Ray counts them).
    ``configure_logging=False`` leaves the process's logging as the CLI set it up.
    """
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": log_to_driver, "configure_logging": configure_logging}
    options |= {key: value for key, value in (("namespace", namespace), ("runtime_env", runtime_env), ("logging_level", logging_level)) if value is not None}
    target = init_address(address)
    if target == LOCAL:
        use_local_serve_env()
        ray.init(address=LOCAL, num_cpus=num_cpus, **options)
    else:
        ray.init(address=target, **options)
    if target == LOCAL:  # operators need its address to inspect it (token auth is on: docs/operations.md)
        address = ray.get_runtime_context().gcs_address
        log.info("started a new local Ray instance at %s (inspect it: RAY_AUTH_MODE=token ray status --address %s)", address, address)
    else:
        log.debug("connected to Ray at %s", target)
    return True


def shutdown(owned: bool) -> None:
    """Disconnect, and stop a local instance, when this process connected (``owned``); else nothing."""
    if owned:
        import ray

        ray.shutdown()


@contextmanager
def session(address: str | None = None, **options: Any) -> Iterator[bool]:
    """:func:`connect` for the duration of a ``with`` block, then :func:`shutdown` what it connected."""
    owned = connect(address, **options)
    try:
        yield owned
    finally:
        shutdown(owned)


def wait_until_interrupted(message: str = "press Ctrl-C to stop") -> None:
    """Print ``message`` and block until Ctrl-C or SIGTERM (the foreground of ``serve`` and ``demo --keep-serving``).

    SIGTERM (``kill``, ``docker stop``, systemd) ends the wait like Ctrl-C, so the caller's clean
    shutdown runs instead of Ray's fatal-signal handler; SIGINT counts even when the shell that
    started the process in the background left it ignored.
    """

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    print(message, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)  # None: a handler set outside Python (Ray's)
