"""What API callers may see of the server's state: names and messages without local paths.

``/v1/models``, ``/healthz`` and error bodies go to clients, who must learn nothing of the servers'
file system, whatever a registered training config or an exception message holds.
"""

from __future__ import annotations

import re
from pathlib import PurePath

#: A URI or an absolute path, up to a space, quote, bracket, comma or semicolon; never ending in a colon
#: (in "s3://bucket/x: cannot connect" the colon belongs to the message).
_PATH = re.compile(r"(?:\b[A-Za-z][A-Za-z0-9+.-]*://|(?<![\w.~])/)[^\s'\"(),;]*[^\s'\"(),;:]")


def without_paths(text: str) -> str:
    """``text`` with local paths and URIs replaced by ``<path>``: what API callers may see of a problem."""
    return _PATH.sub("<path>", text)


def public_model_name(name: str) -> str:
    """A base model's name as API callers may see it: a hub id or ``builtin:...`` as it is, a local folder as ``local:FOLDER``."""
    from loraops.training.model import _is_path  # not at import time: it loads torch

    return f"local:{PurePath(name.rstrip('/')).name or 'model'}" if _is_path(name) else without_paths(name)
