"""What ``loraops bench serve --model-only`` serves: the registry's adapter, loaded as a replica loads it, or a
random-init architecture (:func:`loraops.bench.train.ensure_random_init_model`) with a fresh LoRA adapter.

Speed depends on the architecture, not on the weights, so the benchmark can measure Phi-2's serving
speed on a machine that cannot download it. Random weights never learned to stop: every request
generates its full ``max_new_tokens``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from loraops.layout import ADAPTER_CONFIG_FILE


def load_served(settings, mode: str, random_init: str | None, random_init_layers: int | None):
    """The served model: the settings' registered adapter (as a replica loads it), or a random-init architecture with a fresh adapter."""
    from loraops.serve.model import load_for_serving, load_registered

    if random_init:
        from loraops.bench.train import ensure_random_init_model

        workspace = Path(settings.workspace)
        folder = ensure_random_init_model(random_init, workspace, random_init_layers)
        config = random_init_config(folder, workspace)
        adapter = ensure_random_init_adapter(folder, config)
        layers = f", {random_init_layers} layers" if random_init_layers else ""
        label = f"random-init {random_init} (its architecture, RANDOM weights, embedded tokenizer{layers}) + a fresh LoRA adapter"
        return load_for_serving(config, adapter, mode, dtype=settings.dtype), label
    registry = settings.open_registry()
    version = registry.get(settings.adapter)
    served = load_registered(registry, version, mode, settings.dtype, settings.allow_trust_remote_code)
    return served, f"{served.config.model.name} + {version.ref}"


def random_init_config(folder: Path, workspace: Path):
    """The loraops config of a random-init model: the default recipe (4-bit nf4, LoRA r32 on q/k/v/dense, Phi-2 prompt),
    computing in bfloat16 on a GPU and float32 on a CPU (CPUs have no fast 16-bit matmul)."""
    from loraops.config import Config
    from loraops.training.model import device

    compute = "bfloat16" if device().type == "cuda" else "float32"
    return Config.model_validate({"model": {"name": str(folder)}, "quantization": {"bnb_4bit_compute_dtype": compute}, "workspace": str(workspace)})


def ensure_random_init_adapter(folder: Path, config) -> Path:
    """A fresh (untrained) LoRA adapter of ``config.lora`` for the model in ``folder``, saved once beside it.

    LoRA's B matrices start at zero, so the adapter changes no output; the nf4 mode still runs its
    matmuls, and merged mode merges it: what serving costs, which is what the benchmark measures.
    """
    from peft import get_peft_model

    from loraops.training.model import load_base_model, lora_config

    target = folder.parent / f"{folder.name}-adapter-r{config.lora.r}"
    if (target / ADAPTER_CONFIG_FILE).is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        get_peft_model(load_base_model(config), lora_config(config.lora)).save_pretrained(staging)
        with contextlib.suppress(OSError):
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
