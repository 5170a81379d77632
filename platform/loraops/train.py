"""One QLoRA run, top to bottom: data -> 4-bit base + LoRA -> optimizer -> steps -> eval -> adapter.

:func:`train` is the whole recipe. It takes a config and an optional ``report`` callback, which
gets the metrics after every evaluation together with the checkpoint saved at that step (if any);
a Ray Tune trial calls exactly this function with a callback that forwards to ``tune.report``.

It writes a run folder (see :mod:`loraops.layout`): the best adapter, step checkpoints with the
trainer state for resuming, ``metrics.jsonl``, ``loss.png`` and the resolved ``config.yaml``.
"""

from __future__ import annotations

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
from loraops.data import batch_order, encode_all, load_split, pad_batch
from loraops.layout import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS_FILE,
    CHECKPOINT_PREFIX,
    LOSS_PLOT_FILE,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    TRAINER_STATE_FILE,
    checkpoint_dir_name,
    checkpoint_step,
)
from loraops.model import DTYPES, device, load_base_model, load_tokenizer, prepare_for_training

log = logging.getLogger(__name__)

#: Called after each evaluation with the metrics and the checkpoint folder written at that step.
Reporter = Callable[[dict[str, Any], Path | None], None]


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
) -> TrainResult:
    """Fine-tune one LoRA adapter on the 4-bit base model described by ``config``."""
    out = run_dir(config, output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_CONFIG_FILE).write_text(yaml.safe_dump(dump_config(config), sort_keys=False))
    settings = config.training
    seed_everything(settings.seed)

    # Data first: a bad source should fail before minutes of model loading.
    train_examples = load_split(config.data, config.data.train_split)[0][: config.data.max_train_samples]
    eval_examples = load_split(config.data, config.data.eval_split)[0][: settings.eval_max_samples]
    tokenizer = load_tokenizer(config)
    train_rows = encode_all(tokenizer, train_examples, config.data)
    eval_rows = encode_all(tokenizer, eval_examples, config.data)

    model = prepare_for_training(load_base_model(config), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info("trainable parameters: %s of %s", f"{sum(p.numel() for p in trainable):,}", f"{sum(p.numel() for p in model.parameters()):,}")
    optimizer = build_optimizer(trainable, config)
    scheduler = build_scheduler(optimizer, config)
    state = TrainState()
    if resume_from:
        state = load_checkpoint(Path(resume_from), model, optimizer, scheduler)
        log.info("resumed from %s at step %d", resume_from, state.step)

    metrics = MetricsLog(out / METRICS_FILE, config, fresh=not resume_from)
    batches = BatchStream(train_rows, settings.per_device_train_batch_size, settings.group_by_length, settings.seed, tokenizer.pad_token_id, skip=state.micro_batches)
    autocast = autocast_context(config)
    model.train()
    bar = tqdm(total=settings.max_steps, initial=state.step, desc=f"train {config.name}", unit="step", disable=not progress, dynamic_ncols=True)
    window: list[float] = []
    started = time.perf_counter()
    while state.step < settings.max_steps:
        loss = accumulate_gradients(model, batches, settings.gradient_accumulation_steps, autocast)
        state.micro_batches += settings.gradient_accumulation_steps
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
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
            eval_loss = evaluate_loss(model, eval_rows, settings.per_device_eval_batch_size, tokenizer.pad_token_id, autocast)
            model.train()
            improved = eval_loss < state.best_eval_loss
            if improved:
                state.best_eval_loss, state.best_step = eval_loss, state.step
                save_adapter(model, out / ADAPTER_DIR)
            event = metrics.write(step=state.step, eval_loss=eval_loss, best_eval_loss=state.best_eval_loss)
            bar.set_postfix(loss=f"{loss:.3f}", eval=f"{eval_loss:.3f}")
            if report is not None:
                report(event, checkpoint)
    bar.close()
    metrics.close()
    plot = plot_losses(out / METRICS_FILE, out / LOSS_PLOT_FILE, title=config.name)
    log.info("best eval loss %.4f at step %d; adapter in %s", state.best_eval_loss, state.best_step, out / ADAPTER_DIR)
    return TrainResult(out, out / ADAPTER_DIR, state.best_eval_loss, state.best_step, state.step, out / METRICS_FILE, plot)


# --- the pieces of a step ----------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0
    micro_batches: int = 0
    best_eval_loss: float = math.inf
    best_step: int = 0


class BatchStream:
    """Endless micro-batches, epoch after epoch, reproducible from (seed, position)."""

    def __init__(self, rows, batch_size: int, group_by_length: bool, seed: int, pad_id: int, skip: int = 0):
        self.rows, self.batch_size, self.group_by_length, self.pad_id = rows, batch_size, group_by_length, pad_id
        self.lengths = [len(row["input_ids"]) for row in rows]
        self.rng = random.Random(seed)
        self.pending: list[list[int]] = []
        for _ in range(skip):
            self._next_indices()

    def _next_indices(self) -> list[int]:
        if not self.pending:
            self.pending = batch_order(self.lengths, self.batch_size, self.group_by_length, self.rng)
        return self.pending.pop(0)

    def __next__(self) -> dict[str, torch.Tensor]:
        return pad_batch([self.rows[i] for i in self._next_indices()], self.pad_id)


def autocast_context(config: Config):
    """Mixed precision in the quantization compute dtype on GPU; plain fp32 on CPU."""
    dtype = DTYPES[config.quantization.bnb_4bit_compute_dtype]
    enabled = device().type == "cuda" and dtype != torch.float32
    return lambda: torch.autocast(device_type=device().type, dtype=dtype, enabled=enabled)


def accumulate_gradients(model, batches: BatchStream, accumulation: int, autocast) -> float:
    """Forward/backward over ``accumulation`` micro-batches; returns their mean loss."""
    total = 0.0
    target = device()
    for _ in range(accumulation):
        batch = {key: value.to(target) for key, value in next(batches).items()}
        with autocast():
            loss = model(**batch).loss / accumulation
        loss.backward()
        total += loss.item()
    return total


@torch.no_grad()
def evaluate_loss(model, rows, batch_size: int, pad_id: int, autocast) -> float:
    """Mean loss per summary token over the eval rows (token-weighted, so batch size doesn't matter)."""
    model.eval()
    target = device()
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {key: value.to(target) for key, value in pad_batch(rows[start:start + batch_size], pad_id).items()}
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="sum")
        loss_sum += losses.item()
        tokens += int((labels != -100).sum())
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
    folder = out / checkpoint_dir_name(state.step)
    save_adapter(model, folder)
    torch.save(
        {
            "state": state.__dict__,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.random.get_rng_state(),
        },
        folder / TRAINER_STATE_FILE,
    )
    if keep:
        for stale in sorted(out.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: checkpoint_step(p.name) or 0)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return folder


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> TrainState:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(folder / ADAPTER_WEIGHTS_FILE))
    set_peft_model_state_dict(model, weights)
    saved = torch.load(folder / TRAINER_STATE_FILE, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.random.set_rng_state(saved["torch_rng"])
    return TrainState(**saved["state"])


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
