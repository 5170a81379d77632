import json
from pathlib import Path

import pytest

from loraops.config import DataConfig
from loraops.errors import LoraopsError
from loraops.training.data import IGNORE_INDEX, Example, batch_order, encode_example, load_split, pad_batch

REPO = Path(__file__).resolve().parents[1]

ROWS = [
    {"fname": "train_0", "dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet.", "topic": "greeting"},
    {"fname": "train_1", "dialogue": "#Person1#: Bye.\n#Person2#: See you.", "summary": "They part.", "topic": "farewell"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_builtin_source_has_three_splits():
    config = DataConfig(builtin_size=100)
    sizes = {split: len(load_split(config, split)[0]) for split in ("train", "validation", "test")}
    assert sizes == {"train": 80, "validation": 10, "test": 10}


def test_official_release_folder_and_dev_alias(tmp_path):
    write_jsonl(tmp_path / "dialogsum.train.jsonl", ROWS)
    write_jsonl(tmp_path / "dialogsum.dev.jsonl", ROWS[:1])
    examples, report = load_split(DataConfig(source=str(tmp_path)), "validation")
    assert [e.id for e in examples] == ["train_0"] and report.origin.endswith("dialogsum.dev.jsonl")
    assert load_split(DataConfig(source=str(tmp_path)), "train")[0][1].summary == "They part."


def test_official_test_layout_keeps_three_references(tmp_path):
    row = {
        "fname": "test_0",
        "dialogue": "#Person1#: Hi.",
        **{"summary1": "A greets.", "topic1": "t", "summary2": "Person1 says hi.", "topic2": "t", "summary3": "A greeting.", "topic3": "t"},
    }
    write_jsonl(tmp_path / "dialogsum.test.jsonl", [row])
    (example,), _ = load_split(DataConfig(source=str(tmp_path)), "test")
    assert example.references == ("A greets.", "Person1 says hi.", "A greeting.")


def test_split_placeholder_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"conv": r["dialogue"], "abstract": r["summary"], "key": r["fname"]} for r in ROWS])
    pq.write_table(table, tmp_path / "train.parquet")
    (tmp_path / "test.csv").write_text('key,conv,abstract\nk1,"#Person1#: Hi, there.",A greeting.\n')
    columns = dict(id_column="key", dialogue_column="conv", summary_column="abstract")
    examples, _ = load_split(DataConfig(source=str(tmp_path / "{split}.parquet"), **columns), "train")
    assert [e.summary for e in examples] == ["They greet.", "They part."]
    (csv_example,), _ = load_split(DataConfig(source=str(tmp_path / "test.csv"), **columns), "test")
    assert csv_example == Example(id="k1", dialogue="#Person1#: Hi, there.", references=("A greeting.",))


def test_bad_rows_are_counted_not_silently_dropped(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    blank_dialogue, blank_summary = json.dumps({"dialogue": "  ", "summary": "x"}), json.dumps({"dialogue": "d", "summary": ""})
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n" + blank_dialogue + "\n" + blank_summary + "\n")
    examples, report = load_split(DataConfig(source=str(path)), "train")
    assert len(examples) == 1 and report.rows == 4 and report.usable == 1
    assert report.skipped == {"malformed rows": 1, "rows without 'dialogue'": 1, "rows without 'summary'": 1}
    assert "skipped" in caplog.text


def test_zero_usable_rows_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "no dialogue column"}])
    with pytest.raises(LoraopsError, match="no usable rows"):
        load_split(DataConfig(source=str(path)), "train")


def test_missing_local_source_is_an_error(tmp_path):
    with pytest.raises(LoraopsError, match="no such file or folder"):
        load_split(DataConfig(source=str(tmp_path / "missing.jsonl")), "train")


def test_real_dialogsum_sample(dialogsum_sample):
    examples, report = load_split(DataConfig(source=str(dialogsum_sample)), "validation")
    assert report.usable == report.rows == 500
    assert examples[0].dialogue.startswith("#Person1#:") and examples[0].id == "dev_0"


def test_loss_only_on_summary_and_truncation_keeps_summary(workspace):
    from loraops.config import load_config
    from loraops.training.model import load_tokenizer

    config = load_config(REPO / "tune" / "tiny.yaml", ["data.max_length=64", "data.max_summary_length=20"])
    tokenizer = load_tokenizer(config)
    long_dialogue = "\n".join(f"#Person{1 + i % 2}#: sentence number {i} about the flat." for i in range(40))
    example = Example(id="x", dialogue=long_dialogue, references=("#Person1# rents the flat for $900.",))
    row = encode_example(tokenizer, example, config.data)
    summary_ids = tokenizer.encode(example.summary, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert len(row["input_ids"]) <= 64
    assert row["input_ids"][-len(summary_ids):] == summary_ids, "summary must survive truncation"
    supervised = [label for label in row["labels"] if label != IGNORE_INDEX]
    assert supervised == summary_ids, "labels only on summary + EOS"
    prompt_text = tokenizer.decode(row["input_ids"][: len(row["input_ids"]) - len(summary_ids)])
    assert prompt_text.startswith("Instruct: Summarize the following conversation.\n") and prompt_text.endswith("\nOutput:\n")


def test_length_grouped_batches_cover_every_row_once():
    import random

    lengths = [random.Random(i).randint(5, 500) for i in range(1000)]
    batches = batch_order(lengths, 16, group_by_length=True, rng=random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    plain = batch_order(lengths, 16, group_by_length=False, rng=random.Random(0))
    plain_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain) / len(plain)
    assert spread < plain_spread / 3


def test_pad_batch_masks_the_padding():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_data_fingerprint(tmp_path):
    from loraops.training.data import data_fingerprint

    builtin = data_fingerprint({"source": "builtin", "builtin_size": 300})
    assert builtin == data_fingerprint({"source": "builtin", "builtin_size": 300, "train_split": "train"})  # defaults filled in
    assert builtin != data_fingerprint({"source": "builtin", "builtin_size": 400})
    assert builtin != data_fingerprint({"source": "builtin", "builtin_size": 300, "summary_column": "gist"})

    first, second = tmp_path / "a" / "data.jsonl", tmp_path / "b" / "data.jsonl"
    for path in (first, second):
        path.parent.mkdir()
        path.write_text('{"id": "1", "dialogue": "#Person1#: hi", "summary": "greeting"}\n')
    assert data_fingerprint({"source": str(first)}) == data_fingerprint({"source": str(second)})  # content, not location
    assert data_fingerprint({"source": str(first.parent)}) == data_fingerprint({"source": str(second.parent)})
    second.write_text(second.read_text().replace("greeting", "a greeting"))
    assert data_fingerprint({"source": str(first)}) != data_fingerprint({"source": str(second)})
    assert data_fingerprint({"source": "knkarthick/dialogsum"}) != builtin
