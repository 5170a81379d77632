"""pyproject's warning filters: a warning from loraops fails its test, only named third-party warnings are hidden."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = '''
import warnings


def test_loraops_user_warning():
    warnings.warn_explicit("a loraops warning", UserWarning, "loraops/fake.py", 1, module="loraops.fake")


def test_loraops_deprecation_warning():
    warnings.warn_explicit("a loraops deprecation", DeprecationWarning, "loraops/fake.py", 1, module="loraops.fake")


def test_named_third_party_warning():
    warnings.warn_explicit(
        "Paged optimizers are not supported on CPU. Falling back to non-paged optimizer behavior.",
        UserWarning, "bitsandbytes/optim/optimizer.py", 1, module="bitsandbytes.optim.optimizer",
    )


def test_unnamed_third_party_warning():
    warnings.warn_explicit("something else", DeprecationWarning, "somelib/x.py", 1, module="somelib.x")
'''


def test_loraops_warnings_fail_and_only_named_third_party_warnings_are_hidden(tmp_path):
    (tmp_path / "test_cases.py").write_text(textwrap.dedent(CASES))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    out = run.stdout + run.stderr
    assert "FAILED test_cases.py::test_loraops_user_warning" in out, out
    assert "FAILED test_cases.py::test_loraops_deprecation_warning" in out, out
    assert "PASSED test_cases.py::test_named_third_party_warning" in out, out
    assert "PASSED test_cases.py::test_unnamed_third_party_warning" in out, out
    assert "Paged optimizers" not in out, out  # named: hidden
    assert "DeprecationWarning: something else" in out, out  # not named: shown in the summary
