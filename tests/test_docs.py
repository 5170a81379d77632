"""The documentation stays true to the code: the generated configuration reference is fresh, and
every relative link in README.md and docs/*.md reaches an existing file and heading."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "tools" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def without_code_blocks(text: str) -> str:
    """``text`` without fenced code blocks, whose ``# comments`` are not headings."""
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)


def prose(text: str) -> str:
    """``text`` without code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", without_code_blocks(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in without_code_blocks(page.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{page.relative_to(root)}: {target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{page.relative_to(root)}: {target}: no heading #{anchor} in {file.relative_to(root)}")
    return problems


def test_the_configuration_reference_is_fresh():
    generator = load_generator()
    current = generator.PAGE.read_text()
    assert generator.render(current) == current, "docs/configuration.md is stale: run `make docs`"


def leaf_keys(model, prefix: str) -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        if hasattr(field.annotation, "model_fields"):
            keys |= leaf_keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_the_configuration_reference_names_every_key():
    """Each field of both schemas is a row, so a new setting cannot go undocumented."""
    generator = load_generator()
    rows = set(re.findall(r"^\| `([^`]+)` \|", generator.PAGE.read_text(), re.M))
    expected = leaf_keys(generator.Config, "") | leaf_keys(generator.ServeSettings, "args.")
    assert "training.learning_rate" in expected and "search.scheduler.grace_period" in expected
    assert sorted(expected - rows) == []


def test_a_stale_reference_is_caught(tmp_path):
    """The freshness check compares the rendered tables, not just the markers."""
    generator = load_generator()
    stale = generator.PAGE.read_text().replace("| `args.max_batch_size` | int |", "| `args.max_batch_size` | str |")
    assert generator.render(stale) != stale


def test_slug_follows_github():
    assert slug("Scaling out: the same loop on a Ray cluster") == "scaling-out-the-same-loop-on-a-ray-cluster"
    assert slug("Modes: `nf4` vs `merged`") == "modes-nf4-vs-merged"
    assert slug("API (OpenAPI docs at `/docs`)") == "api-openapi-docs-at-docs"
    assert slug("Does the search pay? `loraops bench search`") == "does-the-search-pay-loraops-bench-search"


def test_the_link_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title `x`\n\n[ok](#title-x) [gone](missing.md) [bad anchor](#nowhere)\n\n```\n[not a link](nope.md)\n```\n")
    assert broken_links(page, tmp_path) == ["page.md: missing.md: no such file", "page.md: #nowhere: no heading #nowhere in page.md"]


@pytest.mark.parametrize("page", PAGES, ids=[page.relative_to(ROOT).as_posix() for page in PAGES])
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []
