"""The built-in DialogSum-format data set: deterministic, well formed, varied, and learnable only by reading."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from loraops.training.builtin_data import NAMES, TOPICS, corpus_texts, generate_splits

PLATFORM_DIR = Path(__file__).resolve().parents[1] / "platform"
TURN = re.compile(r"^#Person([12])#: \S")
# Values a summary can only have copied from its dialogue: days, clock times, amounts, ticket numbers.
COPIED_VALUE = re.compile(
    r"\b(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)\b|\d+:\d\d|\$[\d,]+|\b\d{4}\b"
)
Splits = dict[str, list[dict[str, str]]]


@pytest.fixture(scope="module")
def splits() -> Splits:
    return generate_splits()


@pytest.fixture(scope="module")
def rows(splits: Splits) -> list[dict[str, str]]:
    return [row for split_rows in splits.values() for row in split_rows]


def _words(text: str) -> set[str]:
    return {word.strip(".,!?:;").lower() for word in text.split()}


def test_same_seed_gives_same_data_and_another_seed_does_not() -> None:
    first = generate_splits(200, seed=7)
    assert generate_splits(200, seed=7) == first
    other = generate_splits(200, seed=8)
    assert [row["dialogue"] for row in other["train"]] != [row["dialogue"] for row in first["train"]]


def test_same_data_in_another_process_with_another_hash_seed() -> None:
    """No choice may depend on set or hash order, which changes between processes."""
    script = (
        "import hashlib, json; from loraops.training.builtin_data import generate_splits; "
        "print(hashlib.sha256(json.dumps(generate_splits(300, seed=3)).encode()).hexdigest())"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": str(PLATFORM_DIR), "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        digests.add(done.stdout.strip())
    here = hashlib.sha256(json.dumps(generate_splits(300, seed=3)).encode()).hexdigest()
    assert digests == {here}


def test_split_sizes(splits: Splits) -> None:
    assert list(splits) == ["train", "validation", "test"]
    assert [len(rows) for rows in splits.values()] == [1600, 200, 200]
    small = generate_splits(size=20, seed=1)
    assert all(len(rows) >= 10 for rows in small.values())
    assert [len(rows) for rows in generate_splits(size=500).values()] == [400, 50, 50]
    with pytest.raises(ValueError):
        generate_splits(size=0)


def test_ids_are_unique_and_name_their_split(splits: Splits, rows: list[dict[str, str]]) -> None:
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids))
    for split, split_rows in splits.items():
        assert all(row["id"].startswith(f"builtin_{split}_") for row in split_rows)


def test_held_out_dialogues_are_not_training_dialogues(splits: Splits) -> None:
    train = {row["dialogue"] for row in splits["train"]}
    for split in ("validation", "test"):
        held_out = [row["dialogue"] for row in splits[split]]
        assert not train.intersection(held_out)
        assert len(set(held_out)) == len(held_out)


def test_rows_are_in_dialogsum_format(rows: list[dict[str, str]]) -> None:
    for row in rows:
        assert set(row) == {"id", "dialogue", "summary", "topic"}
        lines = row["dialogue"].split("\n")
        speakers = [TURN.match(line) for line in lines]
        assert all(speakers), row["dialogue"]
        order = [match.group(1) for match in speakers]
        assert order[0] == "1" and {"1", "2"} <= set(order)
        # Speakers take turns, as in DialogSum.
        assert all(a != b for a, b in zip(order, order[1:], strict=False)), row["dialogue"]


def test_summaries_refer_to_speakers_like_dialogsum(rows: list[dict[str, str]]) -> None:
    by_name = 0
    for row in rows:
        summary, dialogue = row["summary"], row["dialogue"]
        tags = set(re.findall(r"#Person\d#", summary))
        assert tags <= {"#Person1#", "#Person2#"}
        names = {name for name in NAMES if re.search(rf"\b{name}\b", summary)}
        assert all(re.search(rf"\b{name}\b", dialogue) for name in names), row
        titled = re.findall(r"(?:Dr|Mr|Ms|Mrs)\. [A-Z]\w+", summary)
        assert all(title in dialogue for title in titled), row
        assert tags or names or titled or summary.startswith("The "), row
        by_name += bool(names or titled)
    # Names are used where the dialogue gave one, but #PersonN# stays the usual way.
    assert 0.1 * len(rows) < by_name < 0.6 * len(rows)


def test_at_least_eight_topics_in_every_split(splits: Splits) -> None:
    assert len(TOPICS) >= 8
    assert {row["topic"] for row in splits["train"]} == set(TOPICS)
    for split_rows in generate_splits(size=20, seed=5).values():
        assert len({row["topic"] for row in split_rows}) >= 8


def test_summary_values_are_copied_from_the_dialogue(rows: list[dict[str, str]]) -> None:
    with_values = 0
    for row in rows:
        values = COPIED_VALUE.findall(row["summary"])
        assert all(value in row["dialogue"] for value in values), row
        with_values += bool(values)
    assert with_values > 0.7 * len(rows)
    # Nearly every word of a summary is in its dialogue: the summary is read, not made up.
    overlaps = [len(_words(row["summary"]) & _words(row["dialogue"])) / len(_words(row["summary"])) for row in rows]
    assert sum(overlaps) / len(overlaps) > 0.6


def test_summaries_are_varied(rows: list[dict[str, str]]) -> None:
    assert len({row["summary"] for row in rows}) > 0.9 * len(rows)
    # A summary's shape: its words with everything taken from the dialogue masked out.
    shapes: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for row in rows:
        seen = _words(row["dialogue"])
        words = row["summary"].split()
        shape = tuple("_" if word.strip(".,").lower() in seen or word.startswith("#Person") else word for word in words)
        shapes[row["topic"]].add(shape)
    assert all(len(topic_shapes) >= 3 for topic_shapes in shapes.values()), {t: len(s) for t, s in shapes.items()}


def test_lengths(rows: list[dict[str, str]]) -> None:
    turns = [row["dialogue"].count("\n") + 1 for row in rows]
    dialogue_words = [len(row["dialogue"].split()) for row in rows]
    summary_words = [len(row["summary"].split()) for row in rows]
    assert min(turns) >= 4 and max(turns) <= 14
    assert min(turns) <= 5 and max(turns) >= 13, "lengths should spread over the range"
    assert min(dialogue_words) >= 40 and max(dialogue_words) <= 200
    assert min(summary_words) >= 10 and max(summary_words) <= 35
    for row in rows:
        untitled = re.sub(r"\b(?:Dr|Mr|Ms|Mrs)\. ", "", row["summary"])
        assert untitled.endswith(".") and untitled.count(". ") <= 1, row["summary"]


def test_corpus_texts_cover_every_dialogue_and_summary(rows: list[dict[str, str]], splits: Splits) -> None:
    texts = list(corpus_texts(splits))
    assert len(texts) == 2 * len(rows)
    assert set(texts) == {row["dialogue"] for row in rows} | {row["summary"] for row in rows}


def test_vocabulary_is_small(splits: Splits) -> None:
    words = {word for text in corpus_texts(splits) for word in re.findall(r"[a-z']+", text.lower())}
    assert 300 < len(words) < 1000
