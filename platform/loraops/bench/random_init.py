"""Random-init models for benchmarks: a published architecture with random weights and the embedded tokenizer.

Speed depends on the architecture, not on the weights, so a benchmark can measure Phi-2's serving
speed on a machine that cannot download it. The folder is an ordinary Hugging Face checkpoint, loaded
through the same ``from_pretrained`` + bitsandbytes path as the real model. Random weights never
learned to stop, so every request generates its full ``max_new_tokens``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

#: microsoft/phi-2's config.json (public). Its vocabulary (51,200) becomes the embedded tokenizer's.
PHI2_ARCHITECTURE = dict(
    hidden_size=2560,
    intermediate_size=10240,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=2048,
    partial_rotary_factor=0.4,
    rope_theta=10000.0,
    hidden_act="gelu_new",
    layer_norm_eps=1e-5,
    initializer_range=0.02,
    attention_dropout=0.0,
    embd_pdrop=0.0,
    resid_pdrop=0.1,
    qk_layernorm=False,
    tie_word_embeddings=False,
)
RANDOM_INIT = {"phi-2": PHI2_ARCHITECTURE}


def ensure_random_init_model(kind: str, workspace: Path, num_hidden_layers: int | None = None) -> Path:
    """The checkpoint folder of ``kind`` (a key of :data:`RANDOM_INIT`), built once into ``WORKSPACE/models``.

    ``num_hidden_layers`` shortens the architecture (tests: a full Phi-2 is minutes to build on a CPU).
    Built in a temporary folder and renamed into place, so concurrent builders never see half a model.
    """
    from loraops.errors import LoraopsError

    if kind not in RANDOM_INIT:
        raise LoraopsError(f"--random-init {kind!r}: expected one of {', '.join(RANDOM_INIT)}")
    suffix = f"-{num_hidden_layers}layers" if num_hidden_layers else ""
    target = Path(workspace) / "models" / f"random-init-{kind}{suffix}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".random-init-{kind}-", dir=target.parent))
    try:
        _build(kind, staging, num_hidden_layers)
        with contextlib.suppress(OSError):  # another process finished first: same seed, same model
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build(kind: str, folder: Path, num_hidden_layers: int | None) -> None:
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    from loraops.builtin_data import corpus_texts, generate_splits
    from loraops.model import device
    from loraops.tiny_model import EOS, build_tokenizer

    tokenizer = build_tokenizer(corpus_texts(generate_splits()))
    tokenizer.save_pretrained(folder)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    architecture = dict(RANDOM_INIT[kind], **({"num_hidden_layers": num_hidden_layers} if num_hidden_layers else {}))
    config = PhiConfig(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **architecture)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        with torch.device(device()):  # initialising billions of parameters: seconds on a GPU, minutes on a CPU
            model = PhiForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.to("cpu", dtype=torch.bfloat16).save_pretrained(folder)  # half the bytes; loading casts to the compute dtype


def random_init_config(folder: Path, workspace: Path):
    """The loraops config of a random-init model: the default recipe (4-bit nf4, LoRA r32 on q/k/v/dense, Phi-2 prompt),
    computing in bfloat16 on a GPU and float32 on a CPU (CPUs have no fast 16-bit matmul)."""
    from loraops.config import Config
    from loraops.model import device

    compute = "bfloat16" if device().type == "cuda" else "float32"
    return Config.model_validate({"model": {"name": str(folder)}, "quantization": {"bnb_4bit_compute_dtype": compute}, "workspace": str(workspace)})


def ensure_random_init_adapter(folder: Path, config) -> Path:
    """A fresh (untrained) LoRA adapter of ``config.lora`` for the model in ``folder``, saved once beside it.

    LoRA's B matrices start at zero, so the adapter changes no output; the nf4 mode still runs its
    matmuls, and merged mode merges it: what serving costs, which is what the benchmark measures.
    """
    from peft import get_peft_model

    from loraops.model import load_base_model, lora_config

    target = folder.parent / f"{folder.name}-adapter-r{config.lora.r}"
    if (target / "adapter_config.json").is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        get_peft_model(load_base_model(config), lora_config(config.lora)).save_pretrained(staging)
        with contextlib.suppress(OSError):
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
