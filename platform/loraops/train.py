"""One QLoRA run, top to bottom: data -> 4-bit base + LoRA -> optimizer -> steps -> eval -> adapter.

:func:`train` is the whole recipe. It takes a config and an optional ``report`` callback, which
gets the metrics after every evaluation together with the checkpoint saved at that step (if any);
a Ray Tune trial calls exactly this function with a callback that forwards to ``tune.report``.

Run folder layout::

    adapter/              best adapter so far by eval loss (PEFT format)
    checkpoint-<step>/    adapter + trainer_state.pt (optimizer, scheduler, RNG) for resuming
    metrics.jsonl         one JSON object per logging/eval event
    loss.png              train and eval loss per step
    config.yaml           the resolved config of this run
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from loraops.config import Config, dump_config
from loraops.data import IGNORE_INDEX, batch_order, encode_all, load_split, make_batch, split_by_tokens
from loraops.errors import LoraopsError
from loraops.model import DTYPES, device, load_base_model, load_tokenizer, prepare_for_training

log = logging.getLogger(__name__)

#: Called after each evaluation with the metrics and the checkpoint folder written at that step.
Reporter = Callable[[dict[str, Any], Path | None], None]


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step did, for throughput measurements (``loraops bench train``)."""

    step: int
    rows: int
    tokens: int  # real tokens of the step's rows (no padding)
    computed_tokens: int  # tokens the model ran over, padding included
    micro_batches: int
    loss: float


#: Called after every optimizer step, before any evaluation or checkpoint of that step.
StepCallback = Callable[[StepStats], None]


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    best_eval_loss: float
    best_step: int
    steps: int
    metrics_file: Path
    plot_file: Path | None


def run_dir(config: Config, output_dir: str | os.PathLike | None = None) -> Path:
    return Path(output_dir).expanduser().resolve() if output_dir else config.workspace_path / "runs" / config.name


def train(
    config: Config,
    output_dir: str | os.PathLike | None = None,
    report: Reporter | None = None,
    resume_from: str | os.PathLike | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Fine-tune one LoRA adapter on the 4-bit base model described by ``config``."""
    out = run_dir(config, output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dump_config(config), sort_keys=False))
    settings = config.training
    if settings.attn_implementation == "flex_attention" and device().type != "cuda":
        # torch 2.13: "FlexAttention does not support backward on CPU"; fail before minutes of loading.
        raise LoraopsError("training.attn_implementation flex_attention trains only on a GPU (torch has no flex attention backward on CPU): use sdpa")
    seed_everything(settings.seed)

    # Data first: a bad source should fail before minutes of model loading.
    train_examples = load_split(config.data, config.data.train_split)[0][: config.data.max_train_samples]
    eval_examples = load_split(config.data, config.data.eval_split)[0][: settings.eval_max_samples]
    tokenizer = load_tokenizer(config)
    train_rows = encode_all(tokenizer, train_examples, config.data)
    eval_rows = encode_all(tokenizer, eval_examples, config.data)

    model = prepare_for_training(load_base_model(config, attn_implementation=settings.attn_implementation), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info("trainable parameters: %s of %s", f"{sum(p.numel() for p in trainable):,}", f"{sum(p.numel() for p in model.parameters()):,}")
    optimizer = build_optimizer(trainable, config)
    scheduler = build_scheduler(optimizer, config)
    state = TrainState()
    if resume_from:
        state = load_checkpoint(Path(resume_from), model, optimizer, scheduler)
        log.info("resumed from %s at step %d", resume_from, state.step)

    metrics = MetricsLog(out / "metrics.jsonl", config, fresh=not resume_from)
    batches = BatchStream(train_rows, config, tokenizer.pad_token_id, skip=state.step)
    autocast = autocast_context(config)
    model.train()
    bar = tqdm(total=settings.max_steps, initial=state.step, desc=f"train {config.name}", unit="step", disable=not progress, dynamic_ncols=True)
    window: list[float] = []
    started = time.perf_counter()
    while state.step < settings.max_steps:
        step = next(batches)
        loss = train_step(model, step.micro_batches, autocast)
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.samples += step.rows
        if on_step is not None:
            computed = sum(batch["input_ids"].numel() for batch in step.micro_batches)
            on_step(StepStats(state.step, step.rows, step.tokens, computed, len(step.micro_batches), loss))
        window.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {state.step}: lower training.learning_rate")

        last = state.step == settings.max_steps
        if state.step % settings.logging_steps == 0 or last:
            metrics.write(step=state.step, train_loss=sum(window) / len(window), learning_rate=scheduler.get_last_lr()[0], elapsed_s=round(time.perf_counter() - started, 2))
            window.clear()
        checkpoint = None
        if state.step % settings.save_steps == 0 or last:
            checkpoint = save_checkpoint(out, model, optimizer, scheduler, state, settings.save_total_limit)
        if state.step % settings.eval_steps == 0 or last:
            eval_loss = evaluate_loss(model, eval_rows, config, tokenizer.pad_token_id, autocast)
            model.train()
            improved = eval_loss < state.best_eval_loss
            if improved:
                state.best_eval_loss, state.best_step = eval_loss, state.step
                save_adapter(model, out / "adapter")
            event = metrics.write(step=state.step, eval_loss=eval_loss, best_eval_loss=state.best_eval_loss)
            bar.set_postfix(loss=f"{loss:.3f}", eval=f"{eval_loss:.3f}")
            if report is not None:
                report(event, checkpoint)
    bar.close()
    metrics.close()
    plot = plot_losses(out / "metrics.jsonl", out / "loss.png", title=config.name)
    log.info("best eval loss %.4f at step %d; adapter in %s", state.best_eval_loss, state.best_step, out / "adapter")
    return TrainResult(out, out / "adapter", state.best_eval_loss, state.best_step, state.step, out / "metrics.jsonl", plot)


# --- the pieces of a step ----------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0
    samples: int = 0
    best_eval_loss: float = math.inf
    best_step: int = 0


#: Attention that skips the work across packed rows (a block-sparse mask, varlen kernels): one sequence per micro-batch.
SPARSE_ATTENTION = ("flex_attention", "flash_attention_2", "flash_attention_3")


def packed_sequence_length(config: Config) -> int | None:
    """How long a packed sequence may be: unbounded where attention skips across-row work, else ``data.max_length``.

    SDPA and eager attention get a dense mask as long as the sequence squared; sequences no longer
    than the longest row keep that cost near the padded batch's. Flash attention's varlen path
    needs a single sequence (transformers only reads a batch of one as packed).
    """
    return None if config.training.attn_implementation in SPARSE_ATTENTION else config.data.max_length


@dataclass
class Step:
    """One optimizer step's data."""

    micro_batches: list[dict[str, torch.Tensor]]
    rows: int
    tokens: int  # tokens of the rows themselves, no padding or filler


class BatchStream:
    """Endless optimizer steps, epoch after epoch, reproducible from (seed, steps taken).

    A step draws ``per_device_train_batch_size x gradient_accumulation_steps`` rows at once
    (length-grouped when ``group_by_length``; the last step of an epoch may have fewer). Without a
    token budget they are cut into micro-batches of ``per_device_train_batch_size`` rows; with
    ``max_tokens_per_batch`` they are sorted by length and cut into micro-batches of at most that
    many tokens, so memory follows tokens, not the longest row times the row count. Either way a
    step trains on the same rows, so the token budget and packing change the speed, not what is learned.
    """

    def __init__(self, rows, config: Config, pad_id: int, skip: int = 0):
        self.rows, self.settings, self.pad_id = rows, config.training, pad_id
        self.sequence_length = packed_sequence_length(config)
        self.lengths = [len(row["input_ids"]) for row in rows]
        self.rng = random.Random(self.settings.seed)
        self.pending: list[list[int]] = []
        self.rows_per_step = self.settings.per_device_train_batch_size * self.settings.gradient_accumulation_steps
        for _ in range(skip):
            self.next_step_indices()

    def next_step_indices(self) -> list[list[int]]:
        """Row indices of the next step's micro-batches."""
        if not self.pending:
            self.pending = batch_order(self.lengths, self.rows_per_step, self.settings.group_by_length, self.rng)
        group = self.pending.pop(0)
        budget = self.settings.max_tokens_per_batch
        if budget is None:
            size = self.settings.per_device_train_batch_size
            return [group[start : start + size] for start in range(0, len(group), size)]
        group = sorted(group, key=lambda i: -self.lengths[i])
        return split_by_tokens(group, self.lengths, budget, self.settings.packing)

    def __next__(self) -> Step:
        indices = self.next_step_indices()
        batches = [make_batch([self.rows[i] for i in batch], self.pad_id, self.settings.packing, self.sequence_length) for batch in indices]
        return Step(batches, sum(len(batch) for batch in indices), sum(self.lengths[i] for batch in indices for i in batch))


def autocast_context(config: Config):
    """Mixed precision in the quantization compute dtype on GPU; plain fp32 on CPU."""
    dtype = DTYPES[config.quantization.bnb_4bit_compute_dtype]
    enabled = device().type == "cuda" and dtype != torch.float32
    return lambda: torch.autocast(device_type=device().type, dtype=dtype, enabled=enabled)


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss: those whose next token is labelled (summary and EOS)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def summed_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of the next-token losses of a micro-batch (packed or padded) and how many tokens it covers.

    Only positions that predict a labelled token reach the LM head (``logits_to_keep``), which
    spares the vocabulary-sized logits of every prompt token. ``use_cache=False`` matters for
    packing: transformers only derives the per-row attention from ``position_ids`` without a cache.
    """
    labels = batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][predicts[:, :-1]]
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    if _keeps_logits_by_mask(model):
        logits = model(**inputs, use_cache=False, logits_to_keep=predicts).logits
    else:
        logits = model(**inputs, use_cache=False).logits[predicts]
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"), targets.numel()


def _keeps_logits_by_mask(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def train_step(model, micro_batches: list[dict[str, torch.Tensor]], autocast) -> float:
    """Forward/backward over one step's micro-batches; returns the step's loss.

    The loss is the mean over every summary token of the step, whatever the micro-batches: each
    micro-batch's summed loss is divided by the step's token count before its backward pass.
    """
    target = device()
    count = max(sum(supervised_tokens(batch) for batch in micro_batches), 1)
    total = torch.zeros((), device=target)
    for batch in micro_batches:
        batch = {key: value.to(target) for key, value in batch.items()}
        with autocast():
            loss_sum, _ = summed_loss(model, batch)
        (loss_sum / count).backward()
        total += loss_sum.detach()
    return total.item() / count


def eval_batches(rows, config: Config, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The eval rows longest first, cut by the token budget (or ``per_device_eval_batch_size`` rows)."""
    settings = config.training
    lengths = [len(row["input_ids"]) for row in rows]
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])
    if settings.max_tokens_per_batch is not None:
        groups = split_by_tokens(order, lengths, settings.max_tokens_per_batch, settings.packing)
    else:
        size = settings.per_device_eval_batch_size
        groups = [order[start : start + size] for start in range(0, len(order), size)]
    sequence_length = packed_sequence_length(config)
    return [make_batch([rows[i] for i in group], pad_id, settings.packing, sequence_length) for group in groups]


@torch.no_grad()
def evaluate_loss(model, rows, config: Config, pad_id: int, autocast) -> float:
    """Mean loss per summary token over the eval rows (token-weighted, so the batching doesn't matter)."""
    model.eval()
    target = device()
    loss_sum, tokens = 0.0, 0
    for batch in eval_batches(rows, config, pad_id):
        with autocast():
            summed, count = summed_loss(model, {key: value.to(target) for key, value in batch.items()})
        loss_sum += summed.item()
        tokens += count
    return loss_sum / max(tokens, 1)


def build_optimizer(parameters, config: Config) -> torch.optim.Optimizer:
    settings = config.training
    kwargs = dict(lr=settings.learning_rate, weight_decay=settings.weight_decay)
    if settings.optim.startswith("paged_"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW32bit if settings.optim == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
        return cls(parameters, **kwargs)
    return torch.optim.AdamW(parameters, fused=settings.optim == "adamw_torch_fused", **kwargs)


def build_scheduler(optimizer, config: Config):
    from transformers import get_scheduler

    settings = config.training
    return get_scheduler(settings.lr_scheduler_type, optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=settings.max_steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --- saving ------------------------------------------------------------------------------------


def save_adapter(model, folder: Path) -> None:
    """Write the adapter next to ``folder`` and swap it in, so a reader never sees half of one."""
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out: Path, model, optimizer, scheduler, state: TrainState, keep: int | None) -> Path:
    folder = out / f"checkpoint-{state.step}"
    save_adapter(model, folder)
    torch.save(
        {
            "state": state.__dict__,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.random.get_rng_state(),
        },
        folder / "trainer_state.pt",
    )
    if keep:
        for stale in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return folder


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> TrainState:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(folder / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    saved = torch.load(folder / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.random.set_rng_state(saved["torch_rng"])
    known = TrainState.__dataclass_fields__
    return TrainState(**{key: value for key, value in saved["state"].items() if key in known})


class MetricsLog:
    """metrics.jsonl plus the optional TensorBoard / Weights & Biases reporters."""

    def __init__(self, path: Path, config: Config, fresh: bool):
        self.path = path
        if fresh:
            path.write_text("")
        self.sinks = []
        self.closers = []
        targets = set(config.training.report_to) - {"none"}
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(path.parent / "tensorboard"))
            self.sinks.append(lambda event: [writer.add_scalar(k, v, event["step"]) for k, v in event.items() if k != "step"])
            self.closers.append(writer.close)
        if "wandb" in targets:
            import wandb

            wandb.init(project="loraops", name=config.name, config=dump_config(config))
            self.closers.append(wandb.finish)
            self.sinks.append(lambda event: wandb.log({k: v for k, v in event.items() if k != "step"}, step=event["step"]))

    def write(self, **event: Any) -> dict[str, Any]:
        with self.path.open("a") as handle:
            handle.write(json.dumps(event) + "\n")
        for sink in self.sinks:
            sink(event)
        return event

    def close(self) -> None:
        for close in self.closers:
            close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_file: Path, png: Path, title: str) -> Path | None:
    """Train and eval loss per step, like the seed's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = read_metrics(metrics_file)
    train_points = [(e["step"], e["train_loss"]) for e in events if "train_loss" in e]
    eval_points = [(e["step"], e["eval_loss"]) for e in events if "eval_loss" in e]
    if not train_points and not eval_points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_points:
        ax.plot(*zip(*train_points), label="train loss")
    if eval_points:
        ax.plot(*zip(*eval_points), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
