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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from loraops.config import Config, dump_config
from loraops.data import Example, left_pad, load_split, prompt_ids
from loraops.model import attach_adapter, check_adapter_dir, device, load_base_model, load_tokenizer

log = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE F1 x 100 per type; each row takes its best reference per type."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references):
        scores = [scorer.score(ref, prediction) for ref in refs]
        for kind in ROUGE_TYPES:
            totals[kind] += max(score[kind].fmeasure for score in scores)
    count = max(len(predictions), 1)
    return {kind: round(100 * total / count, 2) for kind, total in totals.items()}


@dataclass(frozen=True)
class Completion:
    """One generated continuation of a prompt."""

    text: str
    #: The generated token ids, cut after the first end-of-text token (which is included).
    token_ids: list[int]
    prompt_tokens: int


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    **generate_options: Any,
) -> list[Completion]:
    """One ``generate`` call for a batch of tokenized prompts, left-padded so every row continues at the same position.

    ``max_new_tokens`` may differ per row: the batch generates up to the largest and each row is cut
    to its own limit (a row's tokens do not depend on how long the call runs). ``temperature`` 0
    is greedy decoding; above 0 it samples. ``generate_options`` go to ``model.generate`` as they are.
    """
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} max_new_tokens for {len(prompts)} prompts")
    target = device()
    batch = {key: value.to(target) for key, value in left_pad(prompts, tokenizer.pad_token_id).items()}
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    generated = model.generate(
        **batch,
        max_new_tokens=max(limits),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
        **generate_options,
    )
    new_tokens = generated[:, batch["input_ids"].shape[1]:].tolist()
    completions = []
    for prompt, row, limit in zip(prompts, new_tokens, limits, strict=True):
        ids = row[:limit]
        if tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        completions.append(Completion(text=text, token_ids=ids, prompt_tokens=len(prompt)))
    return completions


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
    target = Path(output) if output else adapter_dir.parent / "evaluation.json"
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
