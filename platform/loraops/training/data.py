"""Dialogues in, token rows out.

Sources (``data.source``):

* ``builtin`` - the generated DialogSum-format data set (no network).
* a local file or folder: ``.jsonl``/``.json``/``.csv``/``.parquet``. A path containing ``{split}``
  is filled in with the split name; a folder is searched for a file whose name contains the split
  name (``dev`` and ``val`` also match ``validation``), like the official release's
  ``dialogsum.train.jsonl``/``dialogsum.dev.jsonl``/``dialogsum.test.jsonl``.
* anything else is a Hugging Face hub data set name (e.g. ``knkarthick/dialogsum``).

A row's references are its ``summary`` column plus any ``summary1``, ``summary2``, ... columns
(the official test file has three). Rows without a usable dialogue or reference are counted and
reported; a split with no usable row is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraops.config import BUILTIN_DATA, DataConfig
from loraops.errors import LoraopsError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SPLIT_ALIASES = {"validation": ("validation", "dev", "val"), "dev": ("dev", "validation", "val")}


@dataclass(frozen=True)
class Example:
    id: str
    dialogue: str
    references: tuple[str, ...]

    @property
    def summary(self) -> str:
        """The first reference: the training target."""
        return self.references[0]


@dataclass
class SplitReport:
    """What happened to the rows of one split: nothing is dropped without being counted."""

    split: str
    origin: str
    rows: int = 0
    usable: int = 0
    skipped: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        return f"{self.split} ({self.origin}): {self.usable}/{self.rows} usable" + (f"; skipped {skipped}" if skipped else "")


# --- reading -----------------------------------------------------------------------------------


def load_split(config: DataConfig, split: str) -> tuple[list[Example], SplitReport]:
    """Read one split from the configured source and keep the usable rows."""
    rows, origin = _read_rows(config, split)
    report = SplitReport(split=split, origin=origin)
    examples = []
    for index, row in enumerate(rows):
        report.rows += 1
        example, problem = _to_example(row, index, config, split)
        if problem:
            report.skipped[problem] += 1
        else:
            examples.append(example)
    report.usable = len(examples)
    if report.skipped:
        log.warning("data %s", report.describe())
    else:
        log.info("data %s", report.describe())
    if not examples:
        raise LoraopsError(f"data.source {config.source!r}: split {split!r} has no usable rows ({report.describe()})")
    return examples, report


def _to_example(row: Any, index: int, config: DataConfig, split: str) -> tuple[Example | None, str | None]:
    if not isinstance(row, dict):
        return None, "malformed rows"
    dialogue = row.get(config.dialogue_column)
    if not isinstance(dialogue, str) or not dialogue.strip():
        return None, f"rows without {config.dialogue_column!r}"
    references = tuple(text.strip() for text in _reference_texts(row, config.summary_column) if text.strip())
    if not references:
        return None, f"rows without {config.summary_column!r}"
    row_id = row.get(config.id_column) or row.get("fname") or f"{split}_{index}"
    return Example(id=str(row_id), dialogue=clean_dialogue(dialogue), references=references), None


def _reference_texts(row: dict, column: str) -> Iterator[str]:
    """``summary`` then ``summary1``, ``summary2``, ... in numeric order."""
    value = row.get(column)
    if isinstance(value, str):
        yield value
    numbered = re.compile(rf"^{re.escape(column)}(\d+)$")
    extra = sorted((int(m.group(1)), key) for key in row if (m := numbered.match(str(key))))
    for _, key in extra:
        if isinstance(row[key], str):
            yield row[key]


def _read_rows(config: DataConfig, split: str) -> tuple[list[Any], str]:
    if config.source == BUILTIN_DATA:
        return _builtin_rows(config, split), "builtin"
    path = _local_path(config.source, split)
    if path is not None:
        return read_table_file(path), str(path)
    if _looks_local(config.source):
        raise LoraopsError(f"data.source: no such file or folder: {config.source}")
    return _hub_rows(config.source, split), f"hub:{config.source}"


def _builtin_rows(config: DataConfig, split: str) -> list[dict]:
    from loraops.training.builtin_data import generate_splits

    splits = generate_splits(size=config.builtin_size)
    if split not in splits:
        raise LoraopsError(f"data: the built-in data set has splits {sorted(splits)}, not {split!r}")
    return splits[split]


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith(DATA_SUFFIXES) or "{split}" in source


def _local_path(source: str, split: str) -> Path | None:
    if "{split}" in source:
        path = Path(source.replace("{split}", split)).expanduser()
        if not path.is_file():
            raise LoraopsError(f"data.source: no file for split {split!r}: {path}")
        return path
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _find_split_file(path, split)
    return None


def _find_split_file(folder: Path, split: str) -> Path:
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    for alias in SPLIT_ALIASES.get(split, (split,)):
        pattern = re.compile(rf"(^|[._-]){re.escape(alias)}([._-]|$)")
        matches = [p for p in candidates if pattern.search(p.stem)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise LoraopsError(f"data.source: several files match split {split!r} in {folder}: {[m.name for m in matches]}")
    raise LoraopsError(f"data.source: no file for split {split!r} in {folder} (have {[p.name for p in candidates]})")


def read_table_file(path: Path) -> list[Any]:
    """Rows of a JSONL/JSON/CSV/Parquet file as dicts; malformed JSONL lines become None (counted)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [_parse_json_line(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise LoraopsError(f"data.source: {path} is not valid JSON: {exc}") from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise LoraopsError(f"data.source: {path} must hold a JSON list of rows")
        return data
    import pyarrow as pa

    try:
        if suffix == ".csv":
            from pyarrow import csv

            table = csv.read_csv(path)
        elif suffix == ".parquet":
            from pyarrow import parquet

            table = parquet.read_table(path)
        else:
            raise LoraopsError(f"data.source: unsupported file type {suffix!r} (use {', '.join(DATA_SUFFIXES)})")
    except pa.ArrowInvalid as exc:
        raise LoraopsError(f"data.source: cannot read {path}: {exc}") from None
    return table.to_pylist()


def _parse_json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _hub_rows(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise LoraopsError("reading hub data sets needs the 'datasets' package") from exc
    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as exc:  # noqa: BLE001 - the hub raises many types; the message says enough
        raise LoraopsError(f"data.source {name!r}: cannot load split {split!r} from the hub: {exc}") from None


# --- prompts and tokens ------------------------------------------------------------------------


def prompt_parts(template: str) -> tuple[str, str]:
    """The template's text before and after ``{dialogue}``."""
    before, _, after = template.partition("{dialogue}")
    return before, after


def clean_dialogue(dialogue: str) -> str:
    """The dialogue as the model sees it: Windows and old-Mac line endings become ``\\n``, the ends are stripped.

    Training, evaluation and every serving route (and so the CLI) pass through here, so a pasted
    file's CRLF or trailing newline cannot change the prompt and the summary."""
    return dialogue.replace("\r\n", "\n").replace("\r", "\n").strip()


def prompt_ids(tokenizer, dialogue: str, config: DataConfig, budget: int) -> list[int]:
    """Token ids of the prompt, with the dialogue cut (from the end) so the prompt fits ``budget``.

    The one function that turns a dialogue into a prompt: training, evaluation and serving use it."""
    before, after = prompt_parts(config.prompt_template)
    head = tokenizer.encode(before, add_special_tokens=False) if before else []
    tail = tokenizer.encode(after, add_special_tokens=False) if after else []
    body = tokenizer.encode(clean_dialogue(dialogue), add_special_tokens=False)
    room = budget - len(head) - len(tail)
    if room < 1:
        raise LoraopsError(f"data.max_length {config.max_length} leaves no room for the dialogue after the prompt template")
    return head + body[:room] + tail


def encode_example(tokenizer, example: Example, config: DataConfig) -> dict[str, list[int]]:
    """Prompt + summary + EOS; labels only on summary and EOS, never on the prompt.

    Truncation shortens the dialogue, never the summary (beyond ``max_summary_length``).
    """
    summary = tokenizer.encode(example.summary, add_special_tokens=False)[: config.max_summary_length]
    summary = summary + [tokenizer.eos_token_id]
    prompt = prompt_ids(tokenizer, example.dialogue, config, budget=config.max_length - len(summary))
    return {"input_ids": prompt + summary, "labels": [IGNORE_INDEX] * len(prompt) + summary}


def encode_all(tokenizer, examples: Sequence[Example], config: DataConfig) -> list[dict[str, list[int]]]:
    return [encode_example(tokenizer, example, config) for example in examples]


def pad_batch(rows: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a training batch; padded positions get no loss and no attention."""
    import torch  # here: the registry reads this module for the data fingerprint and never needs torch

    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def batch_order(lengths: Sequence[int], batch_size: int, group_by_length: bool, rng: random.Random) -> list[list[int]]:
    """One epoch of batches (lists of row indices).

    With ``group_by_length`` rows of similar length share a batch (less padding): shuffle, cut into
    mega-batches of 50 batches, sort each by length, then shuffle the batches.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        mega = batch_size * 50
        order = [i for start in range(0, len(order), mega) for i in sorted(order[start:start + mega], key=lambda j: -lengths[j])]
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


# --- fingerprint -------------------------------------------------------------------------------

_DATA_KEYS = ("source", "train_split", "eval_split", "test_split", "id_column", "dialogue_column", "summary_column")


def data_fingerprint(data_config: dict[str, Any]) -> str:
    """sha256 identifying the training data of a ``data`` config section.

    It covers the source, the split names and the column names (defaults filled in, so an
    omitted key and its default give the same fingerprint), and:

    - for ``builtin``: ``builtin_size`` (the built-in set is generated deterministically from it);
    - for a local file or folder: the name, size and bytes of every file in it, in place of the
      path itself, so the same data copied elsewhere keeps its fingerprint and an edited file
      changes it;
    - for a hub data set: nothing more (the hub name is all that is known without a download).
    """
    merged = DataConfig().model_dump() | dict(data_config)
    described: dict[str, Any] = {key: merged.get(key) for key in _DATA_KEYS}
    digest = hashlib.sha256()
    source = str(merged.get("source") or "")
    if source == BUILTIN_DATA:
        described["builtin_size"] = merged.get("builtin_size")
    else:
        local = Path(source).expanduser()
        if local.exists():
            described["source"] = {"local": sorted(_data_files(local))}
            for rel in described["source"]["local"]:
                _hash_file_into(digest, local / rel if local.is_dir() else local)
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _data_files(local: Path) -> list[str]:
    if local.is_file():
        return [local.name]
    return [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]


def _hash_file_into(digest: Any, path: Path) -> None:
    digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * 1024 * 1024):
            digest.update(chunk)
