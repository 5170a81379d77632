"""What reaches the terminal, and the log file that takes the rest.

Every command logs to the terminal as usual (:func:`setup`). The long-running ones (``loraops
tune``, ``loraops demo``) call :func:`log_to_file`: from then on the terminal shows their own lines
(the steps, one line per trial event, the result tables) and loraops' warnings, while log records
of loraops and of the libraries (Ray, Ray Tune and Serve, Optuna, transformers, bitsandbytes...),
Python warnings and Tune's status table go to a log file whose path the command prints. Ray's
worker processes (trials, Serve replicas) keep their output in Ray's session log folder instead
of streaming it to the terminal (the commands start Ray with ``log_to_driver`` off). With ``-v``
the terminal shows all of it as well.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path

#: The names of the handlers this module installs on the root logger.
CONSOLE_HANDLER, FILE_HANDLER = "loraops-console", "loraops-file"
#: Libraries that log through a terminal handler of their own instead of the root logger's.
SELF_HANDLED = ("ray", "ray.serve")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(verbose: bool) -> None:
    """Log records to the terminal (stderr): INFO and above, everything with ``verbose``. Replaces
    what an earlier call (an earlier command in the same process) installed."""
    root = logging.getLogger()
    for old in [handler for handler in root.handlers if handler.get_name() in (CONSOLE_HANDLER, FILE_HANDLER)]:
        root.removeHandler(old)
        old.close()
    handler = logging.StreamHandler()
    handler.set_name(CONSOLE_HANDLER)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def start_log(workspace: Path, command: str, verbose: bool) -> Path:
    """:func:`log_to_file` into ``WORKSPACE/logs/COMMAND-YYYYmmdd-HHMMSS.log``, and say where."""
    path = log_to_file(workspace / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log", verbose)
    print(f"log: {path}" + ("" if verbose else " (Ray and library logs, warnings, Tune's status table; -v shows them here)"), flush=True)
    return path


def log_to_file(path: Path, verbose: bool) -> Path:
    """Send every log record and Python warning to ``path`` from now on; unless ``verbose``, the
    terminal keeps only loraops' warnings and errors. Returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.set_name(FILE_HANDLER)
    file_handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(file_handler)
    route_library_logs()
    if not verbose:
        import transformers

        root.setLevel(logging.INFO)
        for handler in root.handlers:
            if handler.get_name() == CONSOLE_HANDLER:
                handler.addFilter(_own_warnings)
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of every model load
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the file
    return path


@contextlib.contextmanager
def printed_to_log(enabled: bool, name: str = "loraops.printed") -> Iterator[None]:
    """Inside the block, what anything prints to stdout or stderr (Ray prints its shutdown errors
    there, from a thread of its own) becomes records of the logger ``name``. A no-op unless
    ``enabled``."""
    if not enabled:
        yield
        return
    stream = _LogStream(logging.getLogger(name))
    with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        try:
            yield
        finally:
            stream.flush()


class _LogStream(io.TextIOBase):
    """A text stream that logs each complete line."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.pending = logger, ""

    def write(self, text: str) -> int:
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            if line.strip():
                self.logger.info(line)
        return len(text)

    def flush(self) -> None:
        if self.pending.strip():
            self.logger.info(self.pending)
        self.pending = ""


def route_library_logs() -> None:
    """Make the libraries that print through their own handlers log through the root logger
    (so through the file, and the terminal only when it shows everything)."""
    import optuna
    import ray.serve  # noqa: F401 - importing Ray and Serve installs their own terminal handlers, replaced below
    import transformers

    for name in SELF_HANDLED:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            if type(handler) is not logging.FileHandler:
                library.removeHandler(handler)
        library.propagate = True
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()


def _own_warnings(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] == "loraops" and record.levelno >= logging.WARNING
