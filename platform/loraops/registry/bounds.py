"""Bounds on every wait for the registry database, so that a database that stops answering is a clear error.

SQLite: another process's lock is waited for the busy timeout (``?timeout=SECONDS``, default
:data:`SQLITE_BUSY_TIMEOUT_S`). PostgreSQL: a connection attempt for libpq's ``?connect_timeout=``
(default :data:`POSTGRES_CONNECT_TIMEOUT_S`), and each statement for the server's
``statement_timeout`` (default :data:`POSTGRES_STATEMENT_TIMEOUT_S`; libpq's own
``?options=-c statement_timeout=...`` in the URL changes it, which Optuna's engine honours too).

A server that is frozen (its processes stopped, a host that hangs) cannot enforce its statement
timeout, and the kernel still acknowledges what is sent to it, so nothing would ever fail: every
call on a loraops PostgreSQL connection (statements, commit, rollback, the pool's liveness ping)
is also watched from this side (:class:`BoundedConnection`). A call that has not returned
:data:`WATCHDOG_MARGIN_S` after the statement timeout has its socket shut down, which makes the
blocked call fail at once with "the server did not answer within N s".
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

#: Seconds a SQLite connection waits for another process's lock before giving up (default of the
#: URL's ``?timeout=``); the write lock is waited for once, not again on every retry.
SQLITE_BUSY_TIMEOUT_S = 10.0
#: Seconds to wait for a PostgreSQL server to accept a connection (default of ``?connect_timeout=``).
POSTGRES_CONNECT_TIMEOUT_S = 5
#: Seconds a PostgreSQL statement may run, lock waits included (default of the server's ``statement_timeout``).
POSTGRES_STATEMENT_TIMEOUT_S = 5.0
#: Seconds past the statement timeout after which a call that has not returned is cut from this side.
WATCHDOG_MARGIN_S = 1.0

_TIMEOUT_OPTION = re.compile(r"statement_timeout\s*=\s*'?(\d+(?:\.\d+)?)\s*(ms|s|min)?'?")
_UNIT_S = {"ms": 0.001, None: 0.001, "s": 1.0, "min": 60.0}


def statement_timeout_s(options: str | None) -> float | None:
    """The ``statement_timeout`` set by libpq ``options`` (``-c statement_timeout=5000`` or ``=5s``), in seconds; None if unset."""
    match = _TIMEOUT_OPTION.search(options or "")
    return float(match.group(1)) * _UNIT_S[match.group(2)] if match else None


def postgres_connect_args(query: dict[str, Any]) -> dict[str, Any]:
    """psycopg2 arguments that bound every wait of a connection with the URL's ``query``: defaults for what it leaves unset."""
    options = query.get("options")
    options = options[-1] if isinstance(options, tuple) else options
    args: dict[str, Any] = {}
    if "connect_timeout" not in query:
        args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    timeout = statement_timeout_s(options)
    if timeout is None:
        timeout = POSTGRES_STATEMENT_TIMEOUT_S
        args["options"] = f"{options or ''} -c statement_timeout={int(timeout * 1000)}".strip()
    if timeout > 0:  # 0 switches the server's timeout off: nothing to watch for then
        args["connection_factory"] = bounded_connection_class(timeout + WATCHDOG_MARGIN_S)
    return args


@cache
def bounded_connection_class(bound_s: float) -> type:
    """A psycopg2 connection class whose every call fails once it has waited ``bound_s`` seconds for the server."""
    import psycopg2
    import psycopg2.extensions

    class BoundedCursor(psycopg2.extensions.cursor):
        def execute(self, query, vars=None):
            with self.connection.bounded():
                return super().execute(query, vars)

        def executemany(self, query, vars_list):
            with self.connection.bounded():
                return super().executemany(query, vars_list)

    class BoundedConnection(psycopg2.extensions.connection):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.cursor_factory = BoundedCursor
            self._watch = threading.Lock()
            self._armed = self._cut = False

        @contextmanager
        def bounded(self) -> Iterator[None]:
            timer = threading.Timer(bound_s, self._cut_off)
            timer.daemon = True
            with self._watch:
                self._armed, self._cut = True, False
            timer.start()
            try:
                yield
            except psycopg2.Error:
                if self._cut:
                    message = f"the server did not answer within {bound_s:g} s (statement_timeout plus {WATCHDOG_MARGIN_S:g} s)"
                    raise psycopg2.OperationalError(message) from None
                raise
            finally:
                timer.cancel()
                with self._watch:
                    self._armed = False

        def _cut_off(self) -> None:
            # The blocked call waits in recv() for a server that cannot answer: shutting the socket
            # down wakes it with an error (libpq then marks the connection bad, the pool drops it).
            with self._watch:
                if not self._armed:
                    return
                self._cut = True
                try:
                    with socket.socket(fileno=os.dup(self.fileno())) as sock:
                        sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        def commit(self) -> None:
            with self.bounded():
                super().commit()

        def rollback(self) -> None:
            with self.bounded():
                super().rollback()

    return BoundedConnection
