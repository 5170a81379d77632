"""What reaches the terminal: by default only loraops' warnings next to the commands' own lines;
library logs (Ray's own handlers included) and Python warnings go to the log file; -v shows all."""

from __future__ import annotations

import logging
import warnings

import pytest

LIBRARIES = ("", "ray", "ray.serve", "optuna", "transformers")


@pytest.fixture
def restored_logging():
    """Undo what the console module does to the process's loggers."""
    import optuna

    saved = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate, logging.getLogger(name).level) for name in LIBRARIES}
    # A search run earlier in this process lowers Optuna's verbosity to WARNING; start from its default.
    optuna.logging.set_verbosity(optuna.logging.INFO)
    yield
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if handler not in handlers:
                logger.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.propagate, logger.level = propagate, level
    logging.captureWarnings(False)


def emit_everything() -> None:
    logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
    logging.getLogger("ray.serve").info("Started Serve in namespace")
    logging.getLogger("optuna.storages").info("A new study created")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("No module named 'kernels'")
    warnings.warn("a library's FutureWarning", FutureWarning, stacklevel=1)
    logging.getLogger("loraops.tune.experiment").info("experiment started")
    logging.getLogger("loraops.tune.experiment").warning("the cluster has no GPU")


@pytest.mark.parametrize("verbose", [False, True])
def test_the_log_file_takes_the_library_noise_and_the_terminal_keeps_loraops_warnings(tmp_path, capfd, restored_logging, verbose):
    from loraops import console

    console.setup(verbose)
    path = console.log_to_file(tmp_path / "logs" / "tune.log", verbose)
    capfd.readouterr()
    emit_everything()
    for handler in logging.getLogger().handlers:
        handler.flush()

    terminal = capfd.readouterr().err
    log = path.read_text()
    noise = ("Started a local Ray instance", "Started Serve", "A new study created", "No module named 'kernels'", "FutureWarning", "experiment started")
    for text in (*noise, "the cluster has no GPU"):
        assert text in log, text
    assert "the cluster has no GPU" in terminal
    for text in noise:
        assert (text in terminal) == verbose, text


def test_what_is_printed_inside_the_block_goes_to_the_log(tmp_path, capfd, restored_logging):
    import sys

    from loraops import console

    console.setup(False)
    path = console.log_to_file(tmp_path / "demo.log", verbose=False)
    capfd.readouterr()
    with console.printed_to_log(True):
        print("(raylet) Task ServeController.graceful_shutdown failed")
        print("a partial line", end="", file=sys.stderr)
    print("the demo's own line")
    assert capfd.readouterr().out == "the demo's own line\n"
    log = path.read_text()
    assert "graceful_shutdown failed" in log and "a partial line" in log
