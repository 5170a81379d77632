"""pyproject's dependency floors and tools/floors.txt, the constraints file that installs them all, agree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def declared_floors() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()  # tomllib is 3.11+, and the project supports 3.10
    runtime = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    dev = re.search(r"^dev = \[(.*?)\]", text, re.M).group(1)
    requirements = re.findall(r'"([^"]+)"', runtime + dev)
    floors = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9][0-9.]*)", requirement)
        assert match, f"{requirement}: every dependency needs a floor (NAME>=VERSION)"
        floors[match.group(1).lower()] = match.group(2)
    return floors


def pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "tools" / "floors.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    return pins


def same_release(floor: str, pin: str) -> bool:
    """``>=2.12`` is pinned as ``2.12.0``: trailing zeros do not change a version."""
    parts = lambda text: [int(part) for part in text.split(".")]  # noqa: E731
    a, b = parts(floor), parts(pin)
    width = max(len(a), len(b))
    return a + [0] * (width - len(a)) == b + [0] * (width - len(b))


def test_floors_file_pins_every_declared_floor():
    floors, pins = declared_floors(), pinned()
    assert sorted(floors) == sorted(pins)
    different = {name: (floors[name], pins[name]) for name in floors if not same_release(floors[name], pins[name])}
    assert different == {}
