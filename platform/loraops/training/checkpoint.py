"""What a run folder holds for resuming: the adapter, and the trainer state that makes a resumed run
continue exactly where it stopped (optimizer, scheduler, loss scale, every random generator).

The trainer state holds only tensors and plain containers, so it is read with
``torch.load(weights_only=True)``: a checkpoint from shared storage cannot run code.
"""

from __future__ import annotations

import math
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraops.errors import LoraopsError
from loraops.layout import ADAPTER_WEIGHTS_FILE, CHECKPOINT_PREFIX, TRAINER_STATE_FILE, checkpoint_dir_name, checkpoint_step


@dataclass
class TrainState:
    step: int = 0
    samples: int = 0
    best_eval_loss: float = math.inf
    best_step: int = 0


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


def save_checkpoint(out: Path, model, optimizer, scheduler, scaler, state: TrainState, keep: int | None) -> Path:
    """The adapter plus the trainer state needed to resume bit-exactly; keeps the newest ``keep`` checkpoints."""
    folder = out / checkpoint_dir_name(state.step)
    save_adapter(model, folder)
    trainer_state = {
        "state": dict(state.__dict__),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),  # empty unless fp16 loss scaling is on
        "rng": rng_states(),
    }
    torch.save(trainer_state, folder / TRAINER_STATE_FILE)
    if keep:
        for stale in sorted(out.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: checkpoint_step(p.name) or 0)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return folder


def load_checkpoint(folder: Path, model, optimizer, scheduler, scaler) -> TrainState:
    """Restore what :func:`save_checkpoint` wrote; a trainer state that needs unpickling of code is refused."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state_file = folder / TRAINER_STATE_FILE
    if not state_file.is_file() or not (folder / ADAPTER_WEIGHTS_FILE).is_file():
        raise LoraopsError(f"{folder} is not a training checkpoint: it needs {ADAPTER_WEIGHTS_FILE} and {TRAINER_STATE_FILE}")
    try:
        saved = torch.load(state_file, weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoraopsError(f"{state_file} holds more than tensors and plain containers, refusing to load it ({first_line})") from None
    set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_WEIGHTS_FILE)))
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler"):  # absent in checkpoints without loss scaling and in those of loraops 0.1.0
        scaler.load_state_dict(saved["scaler"])
    restore_rng(saved.get("rng") or {"torch": saved["torch_rng"]})  # "torch_rng": checkpoints of loraops 0.1.0
    known = TrainState.__dataclass_fields__
    return TrainState(**{key: value for key, value in saved["state"].items() if key in known})


def rng_states() -> dict[str, Any]:
    """Every random generator a training step may draw from, as tensors and tuples of ints."""
    import numpy as np

    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "python": random.getstate(),  # (version, tuple of ints, None): plain data
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gauss)),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    import numpy as np

    torch.random.set_rng_state(states["torch"])
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))  # torch.save may hand back lists for tuples
    if "numpy" in states:
        kind, keys, position, has_gauss, cached_gauss = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
