"""Held-out evaluation: batched greedy summaries from the base and the tuned model, scored with ROUGE.

A row with several references (the official DialogSum test file has three) scores the best of
them, per metric, as the DialogSum papers do.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from loraops.config import Config, dump_config
from loraops.generate import generate_completions
from loraops.layout import EVALUATION_FILE, check_adapter_dir
from loraops.training.data import Example, load_split, prompt_ids
from loraops.training.model import attach_adapter, load_base_model, load_tokenizer

log = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE F1 x 100 per type; each row takes its best reference per type."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references, strict=False):
        scores = [scorer.score(ref, prediction) for ref in refs]
        for kind in ROUGE_TYPES:
            totals[kind] += max(score[kind].fmeasure for score in scores)
    count = max(len(predictions), 1)
    return {kind: round(100 * total / count, 2) for kind, total in totals.items()}


def generate_summaries(model, tokenizer, dialogues: Sequence[str], config: Config, progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy summaries, batched with left padding; the dialogue is cut to fit the context."""
    settings = config.evaluation
    budget = config.data.max_length - settings.max_new_tokens
    outputs: list[str] = []
    batches = range(0, len(dialogues), settings.batch_size)
    for start in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
        prompts = [prompt_ids(tokenizer, text, config.data, budget=max(budget, 8)) for text in dialogues[start:start + settings.batch_size]]
        outputs.extend(c.text for c in generate_completions(model, tokenizer, prompts, settings.max_new_tokens))
    return outputs


def evaluation_examples(config: Config) -> list[Example]:
    split = config.evaluation.split or config.data.test_split
    examples, _ = load_split(config.data, split)
    return examples[: config.evaluation.max_samples]


def evaluate(
    config: Config,
    adapter: str | os.PathLike,
    output: str | os.PathLike | None = None,
    include_base: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Score base and base + adapter on the held-out split; write and return the JSON report."""
    adapter_dir = check_adapter_dir(adapter)
    examples = evaluation_examples(config)
    dialogues = [example.dialogue for example in examples]
    references = [example.references for example in examples]
    tokenizer = load_tokenizer(config)
    model = load_base_model(config)
    model.config.use_cache = True
    model.eval()

    report: dict[str, Any] = {
        "adapter": str(adapter_dir),
        "split": config.evaluation.split or config.data.test_split,
        "samples": len(examples),
        "max_new_tokens": config.evaluation.max_new_tokens,
    }
    base_predictions = None
    if include_base:
        started = time.perf_counter()
        base_predictions = generate_summaries(model, tokenizer, dialogues, config, progress, desc="base")
        report["base"] = rouge(base_predictions, references) | {"seconds": round(time.perf_counter() - started, 2)}
    tuned = attach_adapter(model, adapter_dir)
    started = time.perf_counter()
    tuned_predictions = generate_summaries(tuned, tokenizer, dialogues, config, progress, desc="tuned")
    report["tuned"] = rouge(tuned_predictions, references) | {"seconds": round(time.perf_counter() - started, 2)}
    report["examples"] = [
        {"id": ex.id, "dialogue": ex.dialogue, "references": list(ex.references), "tuned": tuned_predictions[i]}
        | ({"base": base_predictions[i]} if base_predictions else {})
        for i, ex in enumerate(examples[:5])
    ]
    report["config"] = dump_config(config)
    target = Path(output) if output else adapter_dir.parent / EVALUATION_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2))
    report["report_file"] = str(target)
    log.info("evaluation report written to %s", target)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A short base-vs-tuned table."""
    columns = [name for name in ("base", "tuned") if name in report]
    lines = [f"ROUGE on {report['samples']} '{report['split']}' dialogues (F1 x 100)", f"{'metric':<10}" + "".join(f"{c:>10}" for c in columns)]
    for kind in ROUGE_TYPES:
        lines.append(f"{kind:<10}" + "".join(f"{report[c][kind]:>10.2f}" for c in columns))
    if "base" in report:
        lines.append(f"{'gain L':<10}{'':>10}{report['tuned']['rougeL'] - report['base']['rougeL']:>+10.2f}")
    return "\n".join(lines)
