"""Held-out evaluation (:mod:`loraops.training.evaluate`): ROUGE against the best reference, and the JSON report
of base vs. tuned summaries."""

from __future__ import annotations

import json

import pytest

from loraops.training.evaluate import evaluate, format_report, rouge


def test_rouge_takes_the_best_reference():
    prediction = ["#Person1# books a table for two on Friday."]
    single = rouge(prediction, [["#Person2# asks about the weather."]])
    several = rouge(prediction, [["#Person2# asks about the weather.", "#Person1# books a table for two on Friday."]])
    assert several["rougeL"] == pytest.approx(100.0)
    assert single["rougeL"] < 40
    assert set(several) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}


@pytest.mark.slow
def test_evaluate_writes_report_with_base_and_tuned(trained, tmp_path):
    config, result = trained
    report = evaluate(config, adapter=result.adapter_dir, output=tmp_path / "eval.json", progress=False)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["samples"] == 8 and set(saved) >= {"base", "tuned", "examples"}
    assert all(0 <= saved[side]["rougeL"] <= 100 for side in ("base", "tuned"))
    assert "gain L" in format_report(report)
