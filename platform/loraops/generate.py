"""Text generation, shared by evaluation and serving: batched left-padded ``generate`` calls, and the
serving model (a base model with one swappable adapter, 4-bit or dequantized and merged).

Evaluation (:mod:`loraops.evaluate`) and the serving replicas (:mod:`loraops.serve.replica`) both
generate through :func:`generate_completions`, so the endpoint answers what evaluation scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraops.config import Config
from loraops.errors import LoraopsError
from loraops.layout import check_adapter_dir
from loraops.model import DTYPES, device, load_base_model, load_tokenizer

# --- batched generation ------------------------------------------------------------------------


def left_pad(sequences: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation, so every row continues at the same position."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, width - len(seq):] = torch.tensor(seq)
        attention[i, width - len(seq):] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


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


# --- the serving model -------------------------------------------------------------------------

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
