"""Models: a causal LM loaded 4-bit through bitsandbytes, LoRA attached with PEFT, adapters loaded.

The same code loads ``microsoft/phi-2`` from the hub and the embedded tiny Phi from the workspace;
bitsandbytes runs 4-bit nf4 on both CPU and GPU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from loraops.config import TINY_MODEL, Config, LoraSettings, QuantizationConfig
from loraops.errors import LoraopsError
from loraops.layout import check_adapter_dir

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def cpu_threads(cpus: float | None) -> int:
    """torch intra-op threads for a process given ``cpus`` CPUs: their whole number, at least 1,
    never more than the machine has (a Ray cluster may declare more CPUs than there are cores)."""
    machine = os.cpu_count() or 1
    return machine if cpus is None else max(1, min(machine, int(cpus)))


def use_reserved_cpus(cpus: float | None = None) -> int | None:
    """In a Ray worker (a trial, a Serve replica), set torch's intra-op threads from ``cpus``, else
    from the CPUs Ray reserved for it: two torch processes that each take every core of a small
    machine slow each other 10x. Outside Ray (the CLI) nothing changes; returns the threads set."""
    import ray

    if cpus is None:
        if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
            return None
        # In a placement group the same CPUs appear under several names (CPU_group_0_ID, CPU_group_ID).
        assigned = ray.get_runtime_context().get_assigned_resources()
        cpus = max((amount for name, amount in assigned.items() if name.split("_group_")[0] == "CPU"), default=None)
    threads = cpu_threads(cpus)
    torch.set_num_threads(threads)
    return threads


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_model_path(config: Config) -> str:
    """Hub name or local folder; the embedded tiny model is built into the workspace on first use."""
    if config.model.name == TINY_MODEL:
        from loraops.training.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(config.workspace_path))
    name = config.model.name
    if _is_path(name):
        local = Path(name).expanduser()
        if not local.is_dir():
            # Without this check the hub client answers "Repo id must be in the form ...".
            raise LoraopsError(f"model.name {name!r}: no such local folder (a Hugging Face hub model is named like 'microsoft/phi-2')")
        return str(local)
    return name


def _is_path(name: str) -> bool:
    """True when ``name`` can only be a local path: hub ids are NAME or OWNER/NAME and never start with '.', '/' or '~'."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or Path(name).expanduser().is_dir()


def load_tokenizer(config: Config):
    from transformers import AutoTokenizer

    path = resolve_model_path(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.model.trust_remote_code, revision=config.model.revision)
    except OSError as exc:
        raise LoraopsError(f"model.name {config.model.name!r}: cannot load the tokenizer: {exc}") from None
    if tokenizer.pad_token_id is None:
        # Phi-2 has no pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bnb_config(quantization: QuantizationConfig):
    """The BitsAndBytesConfig for these settings, or None for an unquantized base."""
    if not quantization.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=DTYPES[quantization.bnb_4bit_compute_dtype],
        bnb_4bit_use_double_quant=quantization.bnb_4bit_use_double_quant,
    )


def load_base_model(config: Config, attn_implementation: str | None = None):
    """The base causal LM, 4-bit when configured, on the GPU if there is one.

    ``attn_implementation`` (``training.attn_implementation`` in training) picks the attention
    kernel; None leaves transformers' default (sdpa).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(config)
    target = device()
    precision = "4-bit " + config.quantization.bnb_4bit_quant_type if config.quantization.load_in_4bit else "unquantized"
    log.info("loading %s (%s) on %s", config.model.name, precision, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=bnb_config(config.quantization),
            dtype=DTYPES[config.quantization.bnb_4bit_compute_dtype],
            device_map={"": str(target)},
            trust_remote_code=config.model.trust_remote_code,
            revision=config.model.revision,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
    except OSError as exc:
        raise LoraopsError(f"model.name {config.model.name!r}: cannot load the model: {exc}") from None
    except ImportError as exc:
        raise LoraopsError(f"training.attn_implementation {attn_implementation!r} is not available here: {exc}") from None
    model.config.use_cache = False
    keep_one_cpu_4bit_kernel(model)
    return model


def keep_one_cpu_4bit_kernel(model) -> None:
    """Make bitsandbytes compute 4-bit layers the same way in training, evaluation and serving.

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weights for a bf16 inference
    kernel the first time it runs in eval mode without gradients, and keeps them repacked. The
    numbers change (eval loss of one tiny-model adapter: 4.14 through that kernel, 4.01 through
    the dequantize path it was trained with), and whether a layer was repacked depends on what ran
    before, so a resumed run no longer matches the uninterrupted one. One kernel everywhere.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def check_target_modules(model, lora: LoraSettings) -> None:
    """Every LoRA target must name modules of this model: a wrong name would train nothing there."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in lora.target_modules if target not in names]
    if missing:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if getattr(module, "weight", None) is not None and module.weight.dim() == 2}
        )
        raise LoraopsError(f"lora.target_modules: {missing} not found in the model; its linear modules are {linear}")


def lora_config(lora: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=lora.dropout,
        bias=lora.bias,
        task_type=lora.task_type,
    )


def prepare_for_training(model, config: Config):
    """k-bit preparation (fp32 norms, input grads, optional checkpointing), then LoRA."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_target_modules(model, config.lora)
    if config.quantization.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif config.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(config.lora))


def attach_adapter(base_model, adapter: str | Path):
    """Wrap a loaded base model with a saved adapter, ready for inference."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(check_adapter_dir(adapter)), is_trainable=False)
    model.eval()
    return model


def load_for_inference(config: Config, adapter: str | Path | None = None):
    """Base model (+ adapter when given) in eval mode, with its tokenizer."""
    tokenizer = load_tokenizer(config)
    model = load_base_model(config)
    model.config.use_cache = True
    if adapter is not None:
        model = attach_adapter(model, adapter)
    model.eval()
    return model, tokenizer
