"""Putting the application on a cluster: check the adapter reference, start Serve, run the app.

``loraops serve`` and the demo call :func:`deploy`; Ray's own ``serve deploy`` goes through
:func:`loraops.serve.app.build_app` instead.
"""

from __future__ import annotations

import logging

from ray import serve

from loraops.errors import LoraopsError
from loraops.serve.app import build

log = logging.getLogger("ray.serve")


def target_version(config):
    """The registered version a serve config's default adapter reference names now, once every reference in
    ``adapters`` has been checked.

    An unknown reference, an unreachable registry or a version trained with
    ``model.trust_remote_code: true`` (unless ``args.allow_trust_remote_code``) is an error. Needs no
    Ray: ``loraops serve`` calls it before starting a cluster, so such a mistake costs no cluster start.
    """
    from loraops.serve.model import training_config

    settings = config.settings.with_absolute_paths()
    registry = settings.open_registry()
    versions = [registry.get(ref) for ref in settings.adapters]
    for version in versions:
        training_config(version, str(settings.workspace), settings.allow_trust_remote_code)
    return versions[0]


def deploy(config) -> str:
    """Run a validated serve config (:class:`~loraops.serve.settings.ServeConfigFile`) on the connected Ray cluster.

    Starts Serve with the file's ``http_options`` (if Serve is not running yet), checks the adapter
    reference (:func:`target_version`) before any replica starts, and returns the application's URL.
    """
    from ray.exceptions import RayTaskError

    settings = config.settings.with_absolute_paths()
    version = target_version(config)
    log.info("deploying %s: %s (%s mode)", config.app_name, version.ref, settings.mode)
    try:
        serve.start(http_options=config.http_options or None)
        serve.run(build(settings, config.deployment_options), name=config.app_name, route_prefix=config.route_prefix)
    except RayTaskError as exc:
        if "Failed to bind to address" not in str(exc):  # Serve's proxy could not listen
            raise
        raise LoraopsError(f"http_options: port {_port(config)} is in use on the cluster's head node: stop what listens there or pick another port") from None
    return app_url(config)


def _host(config) -> str:
    return str(config.http_options.get("host") or "127.0.0.1")


def _port(config) -> int:
    return int(config.http_options.get("port") or 8000)


def app_url(config) -> str:
    """``http://HOST:PORT/PREFIX`` of a serve config's application (0.0.0.0 shown as 127.0.0.1)."""
    host = "127.0.0.1" if _host(config) in ("0.0.0.0", "::") else _host(config)
    return f"http://{host}:{_port(config)}{config.route_prefix.rstrip('/')}"


def check_port_free(config) -> None:
    """Refuse, in one line, to start a local Serve whose HTTP port is taken (Ray would fail with actor tracebacks)."""
    import socket

    host, port = _host(config), _port(config)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Serve's server does: TIME_WAIT leftovers don't count
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = f"http_options: cannot listen on {host}:{port} ({exc.strerror})"
            raise LoraopsError(f"{reason}: stop what uses it or pick another port with --set http_options.port=N") from None
