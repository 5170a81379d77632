"""Text generation, shared by evaluation and serving: batched left-padded ``generate`` calls, and the
serving model (a base model with swappable adapters, 4-bit or dequantized and merged, several at once unmerged).

Evaluation (:mod:`loraops.training.evaluate`) and the serving replicas (:mod:`loraops.serve.replica`) both
generate through :func:`generate_completions`, so the endpoint answers what evaluation scored.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraops.config import Config
from loraops.errors import LoraopsError
from loraops.layout import check_adapter_dir
from loraops.training.model import DTYPES, device, load_base_model, load_tokenizer

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
    return [completion_from_ids(tokenizer, row[:limit], len(prompt)) for prompt, row, limit in zip(prompts, new_tokens, limits, strict=True)]


def completion_from_ids(tokenizer, ids: list[int], prompt_tokens: int, until_eos: bool = True) -> Completion:
    """The completion of generated ``ids``: cut after the first end-of-text token (unless not ``until_eos``: a request
    that ignores end-of-text), decoded without special tokens."""
    if until_eos and tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
    return Completion(text=tokenizer.decode(ids, skip_special_tokens=True).strip(), token_ids=list(ids), prompt_tokens=prompt_tokens)


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the first of the ``stop`` texts starts in ``text`` (the answer ends there), or None."""
    found = [index for index in (text.find(s) for s in stop) if index >= 0]
    return min(found) if found else None


def held_back(text: str, stop: Sequence[str]) -> str:
    """``text`` cut before its first stop text, or without an end that may be the start of one (not certain yet)."""
    if (index := find_stop(text, stop)) is not None:
        return text[:index]
    keep = len(text)
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:size]):
                keep = min(keep, len(text) - size)
                break
    return text[:keep]


class TextStream:
    """The text of tokens as they are generated, handed out in pieces whose concatenation is the completion's text.

    Each :meth:`add` decodes all tokens so far as :func:`completion_from_ids` does (up to end-of-text,
    special tokens skipped, stripped) and hands out only what can no longer change: trailing whitespace
    (the final text is stripped), an unfinished multi-byte character, and an end that may be the start of
    one of the ``stop`` texts wait for the next token. ``until_eos=False``: the request ignores end-of-text.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), until_eos: bool = True):
        self.tokenizer, self.stop, self.until_eos = tokenizer, tuple(stop), until_eos
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        """The new text after ``token`` ("" while nothing new is certain)."""
        if self.until_eos and self.ids and self.ids[-1] == self.tokenizer.eos_token_id:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        stable = (held_back(text, self.stop) if self.stop else text).strip().rstrip("\ufffd").rstrip()
        if not stable.startswith(self.sent):  # decoding more tokens changed earlier text: wait for the end
            return ""
        piece, self.sent = stable[len(self.sent) :], stable
        return piece

    def finish(self, text: str) -> str:
        """What is left of the final ``text`` after the pieces handed out."""
        if not text.startswith(self.sent):
            raise LoraopsError(f"streamed text {self.sent!r} is not a prefix of the completion {text!r}")
        rest, self.sent = text[len(self.sent) :], text
        return rest


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


@contextlib.contextmanager
def _expected_merge_warnings() -> Iterator[None]:
    """Silence PEFT's warnings about loading into a merged model (it unmerges first) and about nothing left to
    unmerge: expected when adapters change in merged mode, where the exact base weights are restored anyway."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Adapter cannot be set when the model is merged")
        warnings.filterwarnings("ignore", message="Already unmerged")
        yield


class ServingModel:
    """A base model plus one or more loaded adapters, ready to generate; adapters can be added, removed and swapped in place.

    ``nf4`` keeps the 4-bit base and runs the adapter unmerged, as training did. ``merged``
    dequantizes the base once and merges the adapter into the dequantized weights; before the
    first merge it keeps a copy of each touched base weight, so a swap restores those weights
    exactly and merges the next adapter into them: after any number of swaps the weights are
    bit-identical to a fresh load of the new adapter (PEFT's unmerge alone subtracts the delta,
    which drifts by rounding in 16-bit). The copies cost the dense size of the LoRA-targeted
    weights (for Phi-2 with q/k/v/dense: about 1.7 GB in 16-bit), kept in host memory.

    Several adapters (:meth:`add`): none is merged (a merged delta would apply to every row), so
    the base weights are the pristine ones (restored from the copies in merged mode) and each
    forward pass names the adapter of every row (:meth:`adapter_rows`, PEFT's mixed-batch LoRA
    forward). Back to one adapter (:meth:`remove`), merged mode merges it again. ``adapters[0]`` is
    the default adapter.

    Not thread-safe: the caller serialises :meth:`swap`, :meth:`add` and :meth:`remove` with generation.
    """

    def __init__(self, model, tokenizer, config: Config, mode: str, adapter_name: str, static_cache: bool = False):
        if mode not in SERVING_MODES:
            raise LoraopsError(f"mode {mode!r}: expected one of {', '.join(SERVING_MODES)}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.mode = mode
        self.adapters: list[str] = [adapter_name]
        self.static_cache = static_cache
        self._pristine: dict[str, torch.Tensor] = {}
        if mode == "merged":
            self._keep_pristine_weights()
            model.merge_adapter()

    @property
    def adapter_name(self) -> str:
        """The default adapter (the first loaded)."""
        return self.adapters[0]

    @property
    def mixed(self) -> bool:
        """Whether several adapters are loaded: every forward pass then names each row's adapter."""
        return len(self.adapters) > 1

    @property
    def context_tokens(self) -> int:
        """Positions the base model can attend over: prompt plus generated tokens must fit."""
        return int(self.model.config.max_position_embeddings)

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def generate_options(self) -> dict:
        """Extra ``generate`` arguments: on a GPU the merged model decodes with a static, compiled KV cache."""
        if self.mode == "merged" and not self.mixed and self.static_cache and device().type == "cuda":
            # transformers compiles the decoding step when the cache is static (see its
            # _valid_auto_compile_criteria); the 4-bit graph does not compile usefully.
            return {"cache_implementation": "static"}
        return {}

    def adapter_rows(self, names: Sequence[str | None] | None):
        """A context for forward passes of the base model whose row i uses adapter ``names[i]`` (None: the default).

        With one adapter loaded it does nothing (the adapter is active, or merged). With several, PEFT's
        forward hooks hand each LoRA layer the per-row names (its mixed-batch forward), the mechanism
        ``PeftModel.generate(adapter_names=...)`` uses.
        """
        if not self.mixed or names is None:
            return contextlib.nullcontext()
        unknown = sorted({name for name in names if name is not None} - set(self.adapters))
        if unknown:
            raise LoraopsError(f"adapter {unknown[0]} is not loaded (loaded: {', '.join(self.adapters)})")
        return self.model._enable_peft_forward_hooks(adapter_names=[name or self.adapters[0] for name in names])

    def swap(self, adapter_dir: str | Path, adapter_name: str, replace: str | None = None) -> None:
        """Load the adapter in ``adapter_dir`` (named ``adapter_name``) in place of ``replace`` (default: the default adapter); the base stays loaded."""
        with _expected_merge_warnings():
            self._swap(adapter_dir, adapter_name, replace)

    def _swap(self, adapter_dir: str | Path, adapter_name: str, replace: str | None) -> None:
        old = replace or self.adapters[0]
        if adapter_name == old:
            return
        if old not in self.adapters:
            raise LoraopsError(f"adapter {old} is not loaded (loaded: {', '.join(self.adapters)})")
        if adapter_name in self.adapters:
            raise LoraopsError(f"adapter {adapter_name} is already loaded")
        # Load first: a broken adapter folder fails here and leaves the served model untouched.
        self.model.load_adapter(str(check_adapter_dir(adapter_dir)), adapter_name=adapter_name, is_trainable=False)
        merge = self.mode == "merged" and not self.mixed
        if merge:
            self.model.unmerge_adapter()
            self._restore_pristine_weights()
            self._keep_pristine_weights()  # layers that only the new adapter targets
        self.adapters[self.adapters.index(old)] = adapter_name
        self.model.set_adapter(self.adapters[0])  # before merging: PEFT's set_adapter unmerges a merged model
        self.model.delete_adapter(old)
        if merge:
            self.model.merge_adapter()
        self.model.eval()

    def add(self, adapter_dir: str | Path, adapter_name: str) -> None:
        """Load one more adapter next to the loaded ones (merged mode unmerges: several adapters run unmerged)."""
        if adapter_name in self.adapters:
            return
        with _expected_merge_warnings():
            self._add(adapter_dir, adapter_name)

    def _add(self, adapter_dir: str | Path, adapter_name: str) -> None:
        self.model.load_adapter(str(check_adapter_dir(adapter_dir)), adapter_name=adapter_name, is_trainable=False)
        if self.mode == "merged" and not self.mixed:
            self.model.unmerge_adapter()
            self._restore_pristine_weights()  # exactly the dequantized base, not base + delta - delta
            self._keep_pristine_weights()
        self.adapters.append(adapter_name)
        self.model.set_adapter(self.adapters[0])
        self.model.eval()

    def remove(self, adapter_name: str) -> None:
        """Unload an adapter; with one left, merged mode merges it again (the fast path)."""
        if adapter_name not in self.adapters:
            return
        if not self.mixed:
            raise LoraopsError(f"adapter {adapter_name} is the only one loaded: swap it instead")
        self.model.delete_adapter(adapter_name)
        self.adapters.remove(adapter_name)
        self.model.set_adapter(self.adapters[0])
        if self.mode == "merged" and not self.mixed:
            self._keep_pristine_weights()
            self.model.merge_adapter()
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


def load_for_serving(
    config: Config, adapter_dir: str | Path, mode: str, adapter_name: str = "default", dtype: str = "auto", static_cache: bool = True
) -> ServingModel:
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
