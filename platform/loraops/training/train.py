"""One QLoRA run, top to bottom: data -> 4-bit base + LoRA -> optimizer -> steps -> eval -> adapter.

:func:`train` is the whole recipe. It takes a config and an optional ``report`` callback, which
gets the metrics after every evaluation together with the checkpoint saved at that step (if any);
a Ray Tune trial calls exactly this function with a callback that forwards to ``tune.report``.

It writes a run folder (see :mod:`loraops.layout`): the best adapter, step checkpoints with the
trainer state for resuming, ``metrics.jsonl``, ``loss.png`` and the resolved ``config.yaml``.
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
from loraops.errors import LoraopsError
from loraops.layout import ADAPTER_DIR, CHECKPOINT_PREFIX, EVALUATION_FILE, LOSS_PLOT_FILE, METRICS_FILE, RUN_CONFIG_FILE
from loraops.training.batching import BatchStream, eval_batches
from loraops.training.checkpoint import TrainState, load_checkpoint, save_adapter, save_checkpoint
from loraops.training.data import IGNORE_INDEX, encode_all, load_split
from loraops.training.model import DTYPES, device, load_base_model, load_tokenizer, prepare_for_training

log = logging.getLogger(__name__)

#: Called after each evaluation with the metrics and the checkpoint folder written at that step.
Reporter = Callable[[dict[str, Any], Path | None], None]
#: Extra metrics of the final model, computed once at the last evaluation: (model, tokenizer) -> metrics.
FinalEvaluation = Callable[[Any, Any], dict[str, float]]


class DivergenceError(LoraopsError, FloatingPointError):
    """The training loss became NaN or infinite: a setting to change, not a bug (the CLI prints one line, exit 2).

    Raised inside a Tune trial too, so the trial ends as ERROR with this message in the results table."""


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


#: What a run folder holds that describes its adapter (and registration's lineage reads) besides
#: ``config.yaml`` and ``metrics.jsonl``: a new run retires the previous run's copies, and its
#: ``checkpoint-*`` folders (registrable adapters too).
PREVIOUS_RUN_FILES = (ADAPTER_DIR, EVALUATION_FILE, LOSS_PLOT_FILE)


def start_run_folder(out: Path, config: Config, fresh: bool) -> None:
    """Make ``out`` this run's folder, once its data, tokenizer and model have loaded.

    Nothing is written before that, so a run that fails validation leaves the previous run's folder
    as it was. A fresh run then removes the previous run's adapter, evaluation and plot before
    writing its own config: the folder's files always describe the adapter in it (or there is
    none yet), so `loraops register` never records one run's lineage for another's adapter."""
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        previous = [out / name for name in PREVIOUS_RUN_FILES] + list(out.glob(f"{CHECKPOINT_PREFIX}*"))
        for path in previous:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    staged = out / f".{RUN_CONFIG_FILE}.partial"
    staged.write_text(yaml.safe_dump(dump_config(config), sort_keys=False))
    staged.replace(out / RUN_CONFIG_FILE)  # atomic: a reader sees the old file or the new one, never half


def train(
    config: Config,
    output_dir: str | os.PathLike | None = None,
    report: Reporter | None = None,
    resume_from: str | os.PathLike | None = None,
    progress: bool = True,
    final_evaluation: FinalEvaluation | None = None,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Fine-tune one LoRA adapter on the 4-bit base model described by ``config``.

    ``final_evaluation`` adds metrics of the final model to the last evaluation's event (a search
    that selects by ROUGE scores only there, so that early stopping decisions stay cheap)."""
    out = run_dir(config, output_dir)
    settings = config.training
    if settings.attn_implementation == "flex_attention" and device().type != "cuda":
        # torch 2.13: "FlexAttention does not support backward on CPU"; fail before minutes of loading.
        raise LoraopsError("training.attn_implementation flex_attention trains only on a GPU (torch has no flex attention backward on CPU): use sdpa")
    seed_everything(settings.seed)

    tokenizer, train_rows, eval_rows = encode_splits(config)  # data first: a bad source fails before minutes of model loading
    trainer = build_trainer(config, resume_from)
    model, optimizer, scheduler, scaler, state = trainer.model, trainer.optimizer, trainer.scheduler, trainer.scaler, trainer.state

    start_run_folder(out, config, fresh=not resume_from)
    metrics = MetricsLog(out / METRICS_FILE, config, fresh=not resume_from)
    batches = BatchStream(train_rows, config, tokenizer.pad_token_id, skip=state.step)
    autocast = autocast_context(config)
    model.train()
    bar = tqdm(total=settings.max_steps, initial=state.step, desc=f"train {config.name}", unit="step", disable=not progress, dynamic_ncols=True)
    window: list[float] = []
    started = time.perf_counter()
    while state.step < settings.max_steps:
        step = next(batches)
        loss = train_step(model, step.micro_batches, autocast, scaler)
        optimizer_step(optimizer, scheduler, scaler, trainer.trainable, settings.max_grad_norm)
        state.step += 1
        state.samples += step.rows
        if on_step is not None:
            computed = sum(batch["input_ids"].numel() for batch in step.micro_batches)
            on_step(StepStats(state.step, step.rows, step.tokens, computed, len(step.micro_batches), loss))
        window.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if not math.isfinite(loss):
            bar.close()  # the progress line ends before the error line starts
            raise DivergenceError(divergence_message(loss, state.step, settings))

        last = state.step == settings.max_steps
        if state.step % settings.logging_steps == 0 or last:
            elapsed = round(time.perf_counter() - started, 2)
            metrics.write(step=state.step, train_loss=sum(window) / len(window), learning_rate=scheduler.get_last_lr()[0], elapsed_s=elapsed)
            window.clear()
        checkpoint = None
        if state.step % settings.save_steps == 0 or last:
            checkpoint = save_checkpoint(out, model, optimizer, scheduler, scaler, state, settings.save_total_limit)
        if state.step % settings.eval_steps == 0 or last:
            eval_loss = evaluate_loss(model, eval_rows, config, tokenizer.pad_token_id, autocast)
            extra = final_evaluation(model, tokenizer) if last and final_evaluation is not None else {}
            model.train()
            improved = eval_loss < state.best_eval_loss
            if improved:
                state.best_eval_loss, state.best_step = eval_loss, state.step
                save_adapter(model, out / ADAPTER_DIR)
            event = metrics.write(step=state.step, eval_loss=eval_loss, best_eval_loss=state.best_eval_loss, **extra)
            bar.set_postfix(loss=f"{loss:.3f}", eval=f"{eval_loss:.3f}")
            if report is not None:
                report(event, checkpoint)
    bar.close()
    metrics.close()
    plot = plot_losses(out / METRICS_FILE, out / LOSS_PLOT_FILE, title=config.name)
    log.info("best eval loss %.4f at step %d; adapter in %s", state.best_eval_loss, state.best_step, out / ADAPTER_DIR)
    return TrainResult(out, out / ADAPTER_DIR, state.best_eval_loss, state.best_step, state.step, out / METRICS_FILE, plot)


def encode_splits(config: Config) -> tuple[Any, list, list]:
    """The tokenizer and the encoded train and eval rows of ``config``'s data."""
    train_examples = load_split(config.data, config.data.train_split)[0][: config.data.max_train_samples]
    eval_examples = load_split(config.data, config.data.eval_split)[0][: config.training.eval_max_samples]
    tokenizer = load_tokenizer(config)
    return tokenizer, encode_all(tokenizer, train_examples, config.data), encode_all(tokenizer, eval_examples, config.data)


@dataclass
class Trainer:
    """What a run trains with (:func:`build_trainer`): the model prepared for training, its trainable
    parameters, the optimizer, its learning-rate schedule, the loss scaler and the run's counters."""

    model: torch.nn.Module
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    state: TrainState


def build_trainer(config: Config, resume_from: str | os.PathLike | None) -> Trainer:
    """The :class:`Trainer` of ``config``, its state loaded from the checkpoint ``resume_from`` when given."""
    model = prepare_for_training(load_base_model(config, attn_implementation=config.training.attn_implementation), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info("trainable parameters: %s of %s", f"{sum(p.numel() for p in trainable):,}", f"{sum(p.numel() for p in model.parameters()):,}")
    optimizer = build_optimizer(trainable, config)
    scheduler = build_scheduler(optimizer, config)
    scaler = grad_scaler(config)
    state = TrainState()
    if resume_from:
        state = load_checkpoint(Path(resume_from), model, optimizer, scheduler, scaler)
        log.info("resumed from %s at step %d", resume_from, state.step)
    return Trainer(model, trainable, optimizer, scheduler, scaler, state)


# --- the pieces of a step ----------------------------------------------------------------------


def autocast_context(config: Config):
    """Mixed precision in the quantization compute dtype on GPU; plain fp32 on CPU."""
    dtype = DTYPES[config.quantization.bnb_4bit_compute_dtype]
    enabled = device().type == "cuda" and dtype != torch.float32
    return lambda: torch.autocast(device_type=device().type, dtype=dtype, enabled=enabled)


def needs_loss_scaling(device_type: str, compute_dtype: str) -> bool:
    """float16 autocast on a GPU: gradients below float16's range would flush to zero without a scaled loss
    (bfloat16 has float32's range; on a CPU training runs in float32)."""
    return device_type == "cuda" and compute_dtype == "float16"


def grad_scaler(config: Config) -> torch.amp.GradScaler:
    """The loss scaler of a run: dynamic scaling where :func:`needs_loss_scaling`, else a pass-through."""
    kind = device().type
    return torch.amp.GradScaler(kind, enabled=needs_loss_scaling(kind, config.quantization.bnb_4bit_compute_dtype))


def divergence_message(loss: float, step: int, settings) -> str:
    decay = f" or training.weight_decay (now {settings.weight_decay:g})" if settings.weight_decay else ""
    return f"training diverged: the loss became {loss} at step {step}; lower training.learning_rate (now {settings.learning_rate:g}){decay}"


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


def optimizer_step(optimizer, scheduler, scaler: torch.amp.GradScaler, parameters, max_grad_norm: float) -> None:
    """Clip, step, advance the schedule and clear the gradients after one step's backward passes."""
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    scaler.step(optimizer)  # skipped when a scaled gradient overflowed; the scale then shrinks
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(model, micro_batches: list[dict[str, torch.Tensor]], autocast, scaler: torch.amp.GradScaler | None = None) -> float:
    """Forward/backward over one step's micro-batches; returns the step's loss.

    The loss is the mean over every summary token of the step, whatever the micro-batches: each
    micro-batch's summed loss is divided by the step's token count before its backward pass.
    With a ``scaler``, the gradients are left scaled: the caller unscales them before the step.
    """
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    target = device()
    count = max(sum(supervised_tokens(batch) for batch in micro_batches), 1)
    total = torch.zeros((), device=target)
    for batch in micro_batches:
        batch = {key: value.to(target) for key, value in batch.items()}
        with autocast():
            loss_sum, _ = summed_loss(model, batch)
        scale(loss_sum / count).backward()
        total += loss_sum.detach()
    return total.item() / count


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
        ax.plot(*zip(*train_points, strict=False), label="train loss")
    if eval_points:
        ax.plot(*zip(*eval_points, strict=False), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
