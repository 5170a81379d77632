"""What a model replica last resolved, so that one starting while the registry database is down still serves.

Every successful resolution of a reference (``tiny@production`` -> ``tiny:3`` with its files' checksums)
is written beside the checksum-keyed artifact cache, ``WORKSPACE/cache/registry/resolved/KEY.json``
(KEY: the database and the reference). A replica that starts during a database outage (a
replacement, a scale-up) is answered from that record (:meth:`RememberingRegistry.remembered`):
the version's files are still checked against the recorded sha256 before anything loads, so
nothing unverified is served. The replica then reports ``degraded`` and follows the registry again
once it answers. Without a record (this workspace never resolved the reference) it cannot serve: it
waits for the database in its constructor (:func:`until_the_database_answers`, one log line per try,
no traceback), and starts once it answers (Serve has no start-up deadline, only a slow-start warning).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from loraops.config import display_url
from loraops.registry.db import DatabaseError
from loraops.registry.records import ModelVersion

log = logging.getLogger("ray.serve")

#: The longest wait between two tries of a replica that cannot start without the database.
MAX_WAIT_S = 15.0


def until_the_database_answers(load: Callable[[], None], refs: list[str], sleep: Callable[[float], None] = time.sleep) -> None:
    """``load()``, tried again while the database fails it (bounded back-off: 1, 2, 4, 8, then every 15 s).

    What a replica does that starts during an outage without a recorded resolution of ``refs``: raising
    would only have Serve start another replica that fails alike, each with a traceback in its log."""
    attempt = 0
    while True:
        try:
            return load()
        except DatabaseError as exc:
            attempt += 1
            wait = min(MAX_WAIT_S, 2.0 ** (attempt - 1))
            what = f"registry unreachable and no resolution of {', '.join(refs)} recorded on this node"
            log.warning("%s; waiting for the database (attempt %d, next in %.0f s): %s", what, attempt, wait, exc)
            sleep(wait)


class RememberingRegistry:
    """A :class:`~loraops.registry.Registry` whose ``get``/``resolve`` record what they answer, and inside
    :meth:`remembered` fall back to that record when the database fails. Everything else passes through."""

    def __init__(self, registry):
        self._registry = registry
        self._fallback = False
        self._recorded: dict[str, Any] = {}  # reference -> the files last written for it
        #: The database failure met inside :meth:`remembered` (None: the database answered).
        self.outage: DatabaseError | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._registry, name)

    @property
    def folder(self) -> Path:
        return self._registry.workspace / "cache" / "registry" / "resolved"

    def _record_path(self, ref: str) -> Path:
        key = hashlib.sha256(f"{display_url(self._registry.db_url)}\n{ref}".encode()).hexdigest()[:24]
        return self.folder / f"{key}.json"

    @contextlib.contextmanager
    def remembered(self) -> Iterator[None]:
        """Within the block, a database failure is answered from the last recorded resolution (see :attr:`outage`)."""
        self._fallback = True
        try:
            yield
        finally:
            self._fallback = False

    def get(self, ref: str) -> ModelVersion:
        try:
            version = self._registry.get(ref)
        except DatabaseError as exc:
            return self._recalled(ref, exc)
        self._record(ref, version)
        return version

    def resolve(self, ref: str) -> Path:
        """The verified local folder of ``ref``'s files (checked against the recorded checksums while the database is down)."""
        try:
            return self._registry.resolve(ref)
        except DatabaseError as exc:
            return self._registry.resolve(self._recalled(ref, exc))  # the recorded version: its files checked, no database read

    def _record(self, ref: str, version: ModelVersion) -> None:
        """Write what ``ref`` (and ``NAME:VERSION``, which loading resolves) names now, when it changed."""
        for key in dict.fromkeys((ref, version.ref)):
            if self._recorded.get(key) == version.files:
                continue
            path = self._record_path(key)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(f".{path.name}.{os.getpid()}")
                partial.write_text(json.dumps({"ref": key, "version": version.to_dict()}))
                partial.replace(path)  # whole or not at all, even with replicas of one node writing at once
                self._recorded[key] = version.files
            except OSError as exc:  # serving goes on; only a start during an outage would miss it
                log.debug("cannot record the resolution of %s in %s: %s", key, path, exc)

    def _recalled(self, ref: str, error: DatabaseError) -> ModelVersion:
        if not self._fallback:
            raise error
        try:
            data = json.loads(self._record_path(ref).read_text())["version"]
        except (OSError, ValueError, KeyError):
            raise error from None
        data["created_at"] = datetime.fromisoformat(data["created_at"])
        version = ModelVersion(**data)
        if self.outage is None:
            log.warning("the registry cannot be read (%s): starting with %s for %s, its last recorded resolution", error, version.ref, ref)
        self.outage = error
        return version
