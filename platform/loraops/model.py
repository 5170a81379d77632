"""Models: a causal LM loaded 4-bit through bitsandbytes, LoRA attached with PEFT, adapters loaded.

The same code loads ``microsoft/phi-2`` from the hub and the embedded tiny Phi from the workspace;
bitsandbytes runs 4-bit nf4 on both CPU and GPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from loraops.config import TINY_MODEL, Config, LoraSettings, QuantizationConfig
from loraops.errors import LoraopsError

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_model_path(config: Config) -> str:
    """Hub name or local folder; the embedded tiny model is built into the workspace on first use."""
    if config.model.name == TINY_MODEL:
        from loraops.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(config.workspace_path))
    return config.model.name


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
    log.info("loading %s (%s) on %s", config.model.name, "4-bit " + config.quantization.bnb_4bit_quant_type if config.quantization.load_in_4bit else "unquantized", target)
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
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 2})
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


def check_adapter_dir(adapter: str | Path) -> Path:
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise LoraopsError(f"adapter folder not found: {path}")
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise LoraopsError(f"{path} is not a PEFT adapter folder: missing {', '.join(missing)}")
    return path


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


# --- serving -----------------------------------------------------------------------------------

#: How a serving replica holds the model: ``nf4`` is the training graph (4-bit base + unmerged
#: adapter, least memory); ``merged`` dequantizes the 4-bit base and merges the adapter into it.
SERVING_MODES = ("nf4", "merged")


def dequantize_base(model, dtype: torch.dtype):
    """Replace every bitsandbytes 4-bit linear layer with an ordinary one holding its dequantized weights.

    The result computes with exactly the weights the 4-bit layers computed with in training (nf4 codes
    times their block scales), so an adapter merged into it reproduces the trained model. Merging
    into the original full-precision weights instead would not: the adapter learned to correct the
    quantized weights, not the original ones.
    """
    if not getattr(model, "is_quantized", False):
        raise LoraopsError("dequantize_base needs a model loaded in 4-bit (quantization.load_in_4bit: true)")
    model = model.dequantize(dtype=dtype)
    return model.to(dtype)  # embeddings, norms and head were never quantized: same dtype everywhere


class ServingModel:
    """A base model plus one active adapter, ready to generate, whose adapter can be swapped in place.

    ``nf4`` keeps the 4-bit base and runs the adapter unmerged, as training did. ``merged``
    dequantizes the base once and merges the adapter into the dequantized weights; before the
    first merge it keeps a copy of each touched base weight, so a swap restores those weights
    exactly and merges the next adapter into them: after any number of swaps the weights are
    bit-identical to a fresh load of the new adapter (PEFT's unmerge alone subtracts the delta,
    which drifts by rounding in 16-bit). The copies cost the dense size of the LoRA-targeted
    weights (for Phi-2 with q/k/v/dense: about 1.7 GB in 16-bit), kept in host memory.

    Not thread-safe: the caller serialises :meth:`swap` with generation.
    """

    def __init__(self, model, tokenizer, config: Config, mode: str, adapter_name: str, static_cache: bool = False):
        if mode not in SERVING_MODES:
            raise LoraopsError(f"mode {mode!r}: expected one of {', '.join(SERVING_MODES)}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.mode = mode
        self.adapter_name = adapter_name
        self.static_cache = static_cache
        self._pristine: dict[str, torch.Tensor] = {}
        if mode == "merged":
            self._keep_pristine_weights()
            model.merge_adapter()

    @property
    def context_tokens(self) -> int:
        """Positions the base model can attend over: prompt plus generated tokens must fit."""
        return int(self.model.config.max_position_embeddings)

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def generate_options(self) -> dict:
        """Extra ``generate`` arguments: on a GPU the merged model decodes with a static, compiled KV cache."""
        if self.mode == "merged" and self.static_cache and device().type == "cuda":
            # transformers compiles the decoding step when the cache is static (see its
            # _valid_auto_compile_criteria); the 4-bit graph does not compile usefully (DESIGN.md).
            return {"cache_implementation": "static"}
        return {}

    def swap(self, adapter_dir: str | Path, adapter_name: str) -> None:
        """Make the adapter in ``adapter_dir`` (named ``adapter_name``) the active one; the base stays loaded."""
        if adapter_name == self.adapter_name:
            return
        old = self.adapter_name
        # Load first: a broken adapter folder fails here and leaves the served model untouched.
        self.model.load_adapter(str(check_adapter_dir(adapter_dir)), adapter_name=adapter_name, is_trainable=False)
        if self.mode == "merged":
            self.model.unmerge_adapter()
            self._restore_pristine_weights()
            self._keep_pristine_weights()  # layers that only the new adapter targets
            self.model.set_adapter(adapter_name)
            self.model.merge_adapter()
        else:
            self.model.set_adapter(adapter_name)
        self.model.delete_adapter(old)
        self.adapter_name = adapter_name
        self.model.eval()

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [(name, module) for name, module in self.model.named_modules() if isinstance(module, LoraLayer)]

    def _keep_pristine_weights(self) -> None:
        for name, layer in self._lora_layers():
            if name not in self._pristine:
                self._pristine[name] = layer.get_base_layer().weight.detach().to("cpu", copy=True)

    def _restore_pristine_weights(self) -> None:
        for name, layer in self._lora_layers():
            if name in self._pristine:
                weight = layer.get_base_layer().weight
                weight.data.copy_(self._pristine[name].to(weight.device))


def load_for_serving(config: Config, adapter_dir: str | Path, mode: str, adapter_name: str = "default", dtype: str = "auto", static_cache: bool = True) -> ServingModel:
    """The base model of ``config`` with the adapter attached for serving, in ``mode`` (nf4 or merged).

    Both modes load the base exactly as training did (4-bit nf4). ``merged`` then dequantizes it to
    ``dtype`` (``auto``: the quantization compute dtype, what the 4-bit layers computed in) and
    merges the adapter into the dequantized weights, never into original or 4-bit weights.
    """
    if mode not in SERVING_MODES:
        raise LoraopsError(f"mode {mode!r}: expected one of {', '.join(SERVING_MODES)}")
    if mode == "merged" and not config.quantization.load_in_4bit:
        raise LoraopsError("mode merged dequantizes a 4-bit base, but this adapter was trained on an unquantized base: use mode nf4")
    from peft import PeftModel

    tokenizer = load_tokenizer(config)
    base = load_base_model(config)  # on CPU it keeps bitsandbytes on training's kernel: nf4 serves what was trained
    if mode == "merged":
        target = DTYPES[config.quantization.bnb_4bit_compute_dtype if dtype == "auto" else dtype]
        base = dequantize_base(base, target)
    base.config.use_cache = True
    model = PeftModel.from_pretrained(base, str(check_adapter_dir(adapter_dir)), adapter_name=adapter_name, is_trainable=False)
    model.eval()
    return ServingModel(model, tokenizer, config, mode, adapter_name, static_cache=static_cache)
