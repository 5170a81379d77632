"""``loraops bench train``: a training recipe against the seed's recipe, one process, the same data.

Both recipes run the same :func:`loraops.training.train.train` on the same model and data, one after the
other (the seed recipe first). The *seed recipe* of a config is that config with the seed's
batching and optimizer (:data:`SEED_RECIPE`): micro-batch 1 x gradient accumulation 4, gradient
checkpointing, paged AdamW 32-bit, no packing, no token budget, transformers' default attention,
and fp16 compute on a GPU (on a CPU the config's compute dtype stays: CPUs have no fast fp16, and
the seed recipe was a GPU recipe). Everything else (model, LoRA, learning rate, data) is the config's.

The configured recipe runs ``--steps`` optimizer steps; the seed recipe runs as many of its
4-row steps as it takes to see the same number of rows, so both eval losses come after the same
samples. Throughput counts optimizer steps only (not loading, evaluation or saving) and leaves out
the first tenth of the steps (at least one), which carry kernel start-up and compilation.

``--random-init phi-2`` builds ``microsoft/phi-2``'s architecture (its published config.json) with
random weights and the embedded tokenizer, for machines without the model hub: throughput and
memory are Phi-2's (less the vocabulary, resized to the tokenizer's), the eval loss says nothing
about Phi-2's quality.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loraops.config import Config, load_config
from loraops.errors import LoraopsError

#: The seed's recipe, applied on top of a config to get its baseline.
SEED_RECIPE = (
    "training.per_device_train_batch_size=1",
    "training.gradient_accumulation_steps=4",
    "training.gradient_checkpointing=true",
    "training.optim=paged_adamw_32bit",
    "training.packing=false",
    "training.max_tokens_per_batch=null",
    "training.attn_implementation=null",
)
#: Only on a GPU: the seed's compute dtype.
SEED_GPU_RECIPE = ("quantization.bnb_4bit_compute_dtype=float16",)

#: microsoft/phi-2's config.json (public): the architecture. Its vocabulary (51,200) is resized to the tokenizer's.
PHI2_ARCHITECTURE = {
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "partial_rotary_factor": 0.4,
    "rope_theta": 10000.0,
    "hidden_act": "gelu_new",
    "layer_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.1,
    "qk_layernorm": False,
    "tie_word_embeddings": False,
}
#: The published vocabulary of each random-init architecture, for the record: the model gets the embedded tokenizer's.
PUBLISHED_VOCAB_SIZE = {"phi-2": 51200}
RANDOM_INIT = {"phi-2": PHI2_ARCHITECTURE}

FLOPS_CONVENTION = (
    "model_tflops = 6 x N x tokens_per_s / 1e12: 6N FLOPs per trained token (2N forward + 4N backward), N = every parameter of "
    "the base model, embeddings and LM head included, 4-bit weights counted at their full shape, the LoRA adapter left out; "
    "attention's own FLOPs are not counted. A LoRA step computes no weight gradients for the frozen base, so fewer FLOPs run "
    "than 6N: this is the usual model-FLOPs convention for comparing recipes, not a count of executed FLOPs."
)


# --- the benchmark -----------------------------------------------------------------------------


def benchmark(
    config_path: str,
    overrides: list[str],
    steps: int,
    output: str | os.PathLike | None = None,
    random_init: str | None = None,
    eval_samples: int = 100,
    progress: bool = True,
    random_init_layers: int | None = None,
    configured: Config | None = None,
) -> dict[str, Any]:
    """Run the configured recipe and its seed recipe for the same samples; print a table, write JSON, return the report.

    ``random_init_layers`` shortens the random-init architecture (tests only: a full Phi-2 does not train on a CPU);
    ``configured`` is ``config_path`` with ``overrides`` when the caller loaded it already."""
    check_arguments(steps, eval_samples, random_init)
    on_gpu = torch.cuda.is_available()
    configured = configured or load_config(config_path, overrides)  # a bad config fails before any model is built
    load_at_start = round(os.getloadavg()[0], 2)
    model_overrides: list[str] = []
    model_label = configured.model.name
    if random_init is not None:
        folder = ensure_random_init_model(random_init, configured.workspace_path, random_init_layers)
        model_overrides = [f"model.name={folder}"]
        layers = f", {random_init_layers} layers instead of {RANDOM_INIT[random_init]['num_hidden_layers']}" if random_init_layers else ""
        model_label = f"random-init {random_init}: microsoft/{random_init} architecture, RANDOM weights, embedded tokenizer{layers}"

    rows_per_step = configured.training.per_device_train_batch_size * configured.training.gradient_accumulation_steps
    samples = steps * rows_per_step
    seed_steps = math.ceil(samples / 4)
    common = [f"training.eval_max_samples={eval_samples}", "training.report_to=[none]", "training.save_total_limit=1"]
    recipes = {
        "seed": bench_config(
            config_path, [*overrides, *SEED_RECIPE, *(SEED_GPU_RECIPE if on_gpu else ()), *model_overrides, *common, f"name={configured.name}-seed"], seed_steps
        ),
        "configured": bench_config(config_path, [*overrides, *model_overrides, *common], steps),
    }
    parameters = count_parameters(recipes["configured"])
    lengths = row_lengths(recipes["configured"])
    print(f"model: {model_label} ({parameters:,} parameters)", flush=True)
    print(f"device: {device_name()}; rows: mean {sum(lengths) / len(lengths):.0f} tokens, max {max(lengths)}; {samples} samples per recipe", flush=True)
    print(HEADER, flush=True)
    results = {}
    for name, config in recipes.items():
        results[name] = run_recipe(config, parameters, progress=progress)
        print(format_row(name, results[name]), flush=True)
    speedup = round(results["configured"]["samples_per_s"] / results["seed"]["samples_per_s"], 2)
    print(f"speedup vs seed: {speedup}x samples/s", flush=True)

    report = {
        "what": "training throughput of a recipe against the seed recipe, loraops.training.train.train, same model and data, one process",
        "config": str(config_path),
        "overrides": list(overrides),
        "steps": steps,
        "model": {
            "name": model_label,
            "random_init": random_init,
            "published_vocab_size": PUBLISHED_VOCAB_SIZE.get(random_init) if random_init else None,
            "parameters": parameters,
            "architecture": _architecture(recipes["configured"]),
        },
        "flops_convention": FLOPS_CONVENTION,
        "seed_recipe": [*SEED_RECIPE, *(SEED_GPU_RECIPE if on_gpu else ())],
        "device": device_facts(on_gpu, load_at_start),
        "versions": versions(),
        "data": {
            "source": recipes["configured"].data.source,
            "train_rows": len(lengths),
            "row_tokens_mean": round(sum(lengths) / len(lengths), 1),
            "row_tokens_max": max(lengths),
            "eval_max_samples": eval_samples,
        },
        "recipes": results,
        "speedup_vs_seed": speedup,
    }
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def check_arguments(steps: int, eval_samples: int, random_init: str | None) -> None:
    if steps < 2:
        raise LoraopsError("--steps must be at least 2: the first step is left out of the timing")
    if eval_samples < 1:
        raise LoraopsError("--eval-samples must be at least 1")
    if random_init is not None and random_init not in RANDOM_INIT:
        raise LoraopsError(f"--random-init {random_init!r}: expected one of {', '.join(RANDOM_INIT)}")


def device_facts(on_gpu: bool, load_at_start: float) -> dict[str, Any]:
    return {
        "kind": "cuda" if on_gpu else "cpu",
        "name": device_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other work on the machine skews the figures: the load average says how busy it was.
        "load_average_1m_at_start": load_at_start,
        "platform": platform.platform(),
    }


def bench_config(config_path: str, overrides: list[str], steps: int) -> Config:
    """The recipe's config for ``steps`` steps, with one evaluation and one checkpoint, both at the end."""
    every = [f"training.{key}={steps}" for key in ("max_steps", "eval_steps", "save_steps", "logging_steps")]
    return load_config(config_path, [*overrides, *every])


def run_recipe(config: Config, parameters: int, progress: bool = False) -> dict[str, Any]:
    """Train ``config`` in a throw-away folder and measure it."""
    from loraops.training.train import StepStats, train

    on_gpu = torch.cuda.is_available()
    release_memory()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    marks: list[float] = []
    stats: list[StepStats] = []

    def on_step(step: StepStats) -> None:
        if on_gpu:
            torch.cuda.synchronize()  # the optimizer step is asynchronous: count it in its own step
        marks.append(time.perf_counter())
        stats.append(step)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loraops-bench-") as folder:
        result = train(config, output_dir=folder, progress=progress, on_step=on_step)
    wall = time.perf_counter() - started
    warm = max(1, len(stats) // 10)
    timed = stats[warm:]
    seconds = marks[-1] - marks[warm - 1]
    rows = sum(s.rows for s in timed)
    tokens = sum(s.tokens for s in timed)
    computed = sum(s.computed_tokens for s in timed)
    tokens_per_s = tokens / seconds
    settings = config.training
    measured: dict[str, Any] = {
        "settings": {
            "per_device_train_batch_size": settings.per_device_train_batch_size,
            "gradient_accumulation_steps": settings.gradient_accumulation_steps,
            "max_tokens_per_batch": settings.max_tokens_per_batch,
            "packing": settings.packing,
            "gradient_checkpointing": settings.gradient_checkpointing,
            "optim": settings.optim,
            "compute_dtype": config.quantization.bnb_4bit_compute_dtype,
            "attn_implementation": settings.attn_implementation or "default (sdpa)",
        },
        "steps": len(stats),
        "samples": sum(s.rows for s in stats),
        "timed_steps": len(timed),
        "timed_seconds": round(seconds, 3),
        "micro_batches_per_step": round(sum(s.micro_batches for s in timed) / len(timed), 2),
        "samples_per_s": round(rows / seconds, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "padding_share": round(1 - tokens / computed, 4),
        "model_tflops": round(6 * parameters * tokens_per_s / 1e12, 4),
        "eval_loss": round(result.best_eval_loss, 4),
        "eval_after_samples": sum(s.rows for s in stats),
        "wall_s": round(wall, 1),
    }
    if on_gpu:
        measured["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        measured["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
    else:
        measured["peak_rss_gb"] = round(peak_rss_bytes() / 1e9, 3)
    return measured


HEADER = f"{'recipe':<11}{'steps':>6}{'samples':>9}{'samples/s':>11}{'tokens/s':>11}{'TFLOP/s':>9}{'peak GB':>9}{'eval loss':>11}"


def format_row(name: str, row: dict[str, Any]) -> str:
    peak = row.get("peak_gb", row.get("peak_rss_gb"))
    return (
        f"{name:<11}{row['steps']:>6}{row['samples']:>9}{row['samples_per_s']:>11.2f}{row['tokens_per_s']:>11.0f}"
        f"{row['model_tflops']:>9.3f}{peak:>9.2f}{row['eval_loss']:>11.4f}"
    )


# --- measurements ------------------------------------------------------------------------------


def count_parameters(config: Config) -> int:
    """N of the 6N convention: the base model's parameters at full shape (built on the meta device, no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraops.training.model import resolve_model_path

    model_config = AutoConfig.from_pretrained(resolve_model_path(config), trust_remote_code=config.model.trust_remote_code, revision=config.model.revision)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def _architecture(config: Config) -> dict[str, Any]:
    from transformers import AutoConfig

    from loraops.training.model import resolve_model_path

    model_config = AutoConfig.from_pretrained(resolve_model_path(config), trust_remote_code=config.model.trust_remote_code, revision=config.model.revision)
    keys = (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "partial_rotary_factor",
    )
    found = {key: getattr(model_config, key, None) for key in keys}
    if found["partial_rotary_factor"] is None:  # transformers 5 keeps it with the rotary settings
        found["partial_rotary_factor"] = (getattr(model_config, "rope_parameters", None) or {}).get("partial_rotary_factor")
    return found


def row_lengths(config: Config) -> list[int]:
    """Token lengths of the training rows the recipes train on."""
    from loraops.training.data import encode_all, load_split
    from loraops.training.model import load_tokenizer

    examples = load_split(config.data, config.data.train_split)[0][: config.data.max_train_samples]
    return [len(row["input_ids"]) for row in encode_all(load_tokenizer(config), examples, config.data)]


def release_memory() -> None:
    """Give freed memory back before the next recipe, so its peak is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif platform.system() == "Linux":
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> None:
    """Reset the process's peak resident memory (Linux: VmHWM), so the next recipe's peak is measured alone."""
    with contextlib.suppress(OSError):  # elsewhere the peak is the process's, since it started
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "loraops"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    found["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    return found


# --- random-init models ------------------------------------------------------------------------


def ensure_random_init_model(kind: str, workspace: Path, num_hidden_layers: int | None = None) -> Path:
    """A checkpoint folder of ``kind``'s architecture with random weights and the embedded tokenizer, built once.

    It is an ordinary Hugging Face folder, so training loads it through the same ``from_pretrained``
    + bitsandbytes path as the real model. Built atomically, like the tiny model.
    """
    suffix = f"-{num_hidden_layers}layers" if num_hidden_layers else ""
    target = workspace / "models" / f"random-init-{kind}{suffix}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".random-init-{kind}-", dir=target.parent))
    try:
        build_random_init_model(kind, staging, num_hidden_layers)
        with contextlib.suppress(OSError):  # another process finished first
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_random_init_model(kind: str, folder: Path, num_hidden_layers: int | None = None) -> None:
    from transformers import PhiConfig, PhiForCausalLM

    from loraops.training.builtin_data import corpus_texts, generate_splits
    from loraops.training.model import device
    from loraops.training.tiny_model import EOS, build_tokenizer

    tokenizer = build_tokenizer(corpus_texts(generate_splits()))  # the embedded tokenizer, as the tiny model builds it
    tokenizer.save_pretrained(folder)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    architecture = dict(RANDOM_INIT[kind])
    if num_hidden_layers:
        architecture["num_hidden_layers"] = num_hidden_layers
    config = PhiConfig(vocab_size=len(tokenizer), bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, **architecture)
    rng = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        with torch.device(device()):  # initialising 2.5B parameters is minutes on a CPU, seconds on a GPU
            model = PhiForCausalLM(config)
        model.to(torch.float16).save_pretrained(folder, safe_serialization=True)  # float16, like microsoft/phi-2's weights
    finally:
        torch.random.set_rng_state(rng)
