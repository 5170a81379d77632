"""The serving model called only at bucket shapes, over a KV cache of fixed slots (one row each).

:class:`SlotModel` owns the cache buffers (``[max batch bucket, heads, max length bucket, head size]``
per layer) and the two kinds of forward pass the engine (:mod:`loraops.serve.engine.core`) runs:

- **prefill**: joining prompts, left-padded to ``(prefill batch bucket, length bucket)``, into a scratch
  cache; :meth:`SlotModel.store` copies a row's keys and values into its slot;
- **decode**: one token for each of the first ``n`` slots, padded to ``(batch bucket, 1)``, attending over
  the first ``length bucket`` columns; every row writes at the same ``column``.

Each row's positions count from its own first token, whatever column it sits at, and the attention mask
lets a row see only its own columns: a row computes exactly what it computes alone. Moving rows between
slots and shifting columns therefore changes no numbers. Decode steps are compiled (``compile=True``),
one graph per (batch, length) bucket, all during :meth:`SlotModel.warm_up`.

With several adapters loaded (:attr:`~loraops.serve.model.ServingModel.mixed`) both passes take each row's
adapter name and run eagerly: the per-row names are Python data that a compiled graph would guard on
(a recompilation per mix of adapters), so compiled decode steps are used only while one adapter is loaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from loraops.errors import LoraopsError
from loraops.serve.engine.buckets import Buckets


class _Window:
    """The part of the slot cache a decode step uses: the first ``rows`` slots, the first ``length`` columns, writing at ``column``."""

    def __init__(self, device: torch.device):
        self.rows = 1
        self.length = 1
        self.column = torch.zeros(1, dtype=torch.long, device=device)


class SlotLayer(CacheLayerMixin):
    """One layer's slot buffers as a transformers cache layer: writes one column, returns the window.

    A module-level class, so every engine's cache has the same type: a compiled step guards on it.
    """

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, window: _Window):
        super().__init__()
        self.keys, self.values, self.window, self.is_initialized = keys, values, window, True
        self.device = keys.device

    def lazy_initialization(self, key_states, value_states) -> None:  # the buffers exist from the start
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        keys = self.keys[: self.window.rows, :, : self.window.length]
        values = self.values[: self.window.rows, :, : self.window.length]
        keys.index_copy_(2, self.window.column, key_states)
        values.index_copy_(2, self.window.column, value_states)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window.length, 0

    def get_seq_length(self) -> int:
        return self.window.column

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotModel:
    """A :class:`~loraops.serve.model.ServingModel` run at bucket shapes over slot buffers. ``observer(phase, batch, length)`` sees every pass."""

    def __init__(self, served, buckets: Buckets, compile: bool = False, observer: Callable[[str, int, int], None] | None = None):
        attention = getattr(served.model.config, "_attn_implementation", "sdpa")
        if attention not in ("sdpa", "eager"):
            raise LoraopsError(f"the engine passes explicit attention masks: attention implementation {attention!r} is not supported (use sdpa or eager)")
        self.served, self.buckets, self.compiled, self.observer = served, buckets, compile, observer
        self.pad = served.tokenizer.pad_token_id if served.tokenizer.pad_token_id is not None else served.tokenizer.eos_token_id
        # PEFT's wrapper adds nothing at inference: the LoRA layers live inside the base model's modules.
        self._model = served.model.get_base_model() if hasattr(served.model, "get_base_model") else served.model
        self._additive_mask = attention == "eager"
        self._device = next(self._model.parameters()).device
        self._decode_forward = self._compiled_forward() if compile else self._model
        self._window = _Window(self._device)
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._cache = None

    def warm_up(self) -> tuple[int, float]:
        """Run every bucket shape once (compiling each decode shape, when compiling); returns (shapes, seconds). The slots hold nothing after."""
        started = time.perf_counter()
        shapes = self.buckets.shapes()
        for phase, batch, length in shapes:
            if phase == "prefill":
                self.prefill([[self.pad] * length] * batch)  # dummy prompts of the bucket's full width
            else:
                self.decode([self.pad] * batch, [0] * batch, [length - 1] * batch, column=length - 1)
        return len(shapes), time.perf_counter() - started

    # --- prefill -------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None] | None = None):
        """One pass over left-padded ``prompts`` at their bucket shape; returns (next-token logits per prompt, its cache, its width).

        ``adapters``: each prompt's adapter name (None or absent: the default adapter), used when several are loaded."""
        from transformers import DynamicCache

        rows, width = self.buckets.prefill_batch_for(len(prompts)), self.buckets.length_for(max(len(p) for p in prompts))
        input_ids = torch.full((rows, width), self.pad, dtype=torch.long)
        valid = torch.zeros((rows, width), dtype=torch.bool)
        for i in range(rows):
            prompt = prompts[i] if i < len(prompts) else [self.pad]  # padding rows: one token each
            input_ids[i, width - len(prompt) :] = torch.tensor(list(prompt))
            valid[i, width - len(prompt) :] = True
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.tril(torch.ones((width, width), dtype=torch.bool))
        # A padding position attends to itself only: no fully masked row (softmax over nothing is NaN),
        # and no real position attends to a padding one, so real rows compute what they compute alone.
        allowed = (causal[None] & valid[:, None, :]) | torch.eye(width, dtype=torch.bool)[None]
        self._observe("prefill", rows, width)
        cache = DynamicCache()
        with self.served.adapter_rows(_pad_rows(adapters, len(prompts), rows)):
            out = self._model(
                input_ids=input_ids.to(self._device),
                attention_mask=self._mask(allowed[:, None]),
                position_ids=positions.to(self._device),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        if not self._keys:
            self._allocate(cache)
        return out.logits[: len(prompts), -1].float(), cache, width

    def store(self, slot: int, scratch, index: int, width: int, tokens: int, end: int) -> None:
        """Copy the keys and values of prompt ``index`` of a prefill (its last ``tokens`` columns) into ``slot``, ending before column ``end``."""
        for layer, scratch_layer in enumerate(scratch.layers):
            self._keys[layer][slot, :, end - tokens : end] = scratch_layer.keys[index, :, width - tokens :]
            self._values[layer][slot, :, end - tokens : end] = scratch_layer.values[index, :, width - tokens :]

    def _allocate(self, cache) -> None:
        """The slot buffers, shaped like the model's own cache (heads, head size, dtype), for the largest buckets."""
        for layer in cache.layers:
            _, heads, _, head_size = layer.keys.shape
            shape = (self.buckets.max_batch, heads, self.buckets.max_length, head_size)
            self._keys.append(torch.zeros(shape, dtype=layer.keys.dtype, device=self._device))
            self._values.append(torch.zeros((*shape[:3], layer.values.shape[-1]), dtype=layer.values.dtype, device=self._device))
        if self.compiled:
            for tensor in [*self._keys, *self._values, self._window.column]:
                torch._dynamo.mark_static_address(tensor)  # fixed addresses: CUDA graphs replay without copying the cache
        self._cache = Cache(layers=[SlotLayer(k, v, self._window) for k, v in zip(self._keys, self._values, strict=True)])

    # --- decode --------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], starts: Sequence[int], column: int, adapters: Sequence[str | None] | None = None
    ) -> torch.Tensor:
        """One step for the first ``len(tokens)`` slots: slot i feeds ``tokens[i]`` at ``positions[i]`` with adapter ``adapters[i]``, sees
        columns ``starts[i]..column`` and writes at ``column``. Returns their next-token logits."""
        if not self._keys:
            raise LoraopsError("decode before any prefill: the slot buffers are sized from the first prefill")
        rows = len(tokens)
        batch, length = self.buckets.batch_for(rows), self.buckets.length_for(column + 1)
        columns = torch.arange(length)
        allowed = (columns == column).expand(batch, length).clone()  # padding slots attend to their own column only
        allowed[:rows] = (columns[None, :] >= torch.tensor(list(starts))[:, None]) & (columns[None, :] <= column)
        input_ids = torch.full((batch, 1), self.pad, dtype=torch.long)
        input_ids[:rows, 0] = torch.tensor(list(tokens))
        position_ids = torch.zeros((batch, 1), dtype=torch.long)
        position_ids[:rows, 0] = torch.tensor(list(positions))
        self._window.rows, self._window.length = batch, length
        self._window.column.fill_(column)
        self._observe("decode", batch, length)
        forward = self._model if self.served.mixed else self._decode_forward  # compiled graphs serve one adapter only
        with self.served.adapter_rows(_pad_rows(adapters, rows, batch)):
            out = forward(
                input_ids=input_ids.to(self._device),
                attention_mask=self._mask(allowed[:, None, None, :]),
                position_ids=position_ids.to(self._device),
                cache=self._cache,
                use_cache=True,
            )
        return out.logits[:rows, -1].float()

    def _compiled_forward(self):
        """The model's forward compiled for decode steps: one graph per (batch, length) bucket, each compiled during warm-up."""
        import torch._dynamo

        shapes = len(self.buckets.batch) * len(self.buckets.length)
        # One graph per decode shape and per engine (each has its own cache): beyond dynamo's limit
        # (8 graphs per function by default) calls would fall back to eager, so each engine adds its own.
        torch._dynamo.config.recompile_limit += shapes
        torch._dynamo.config.accumulated_recompile_limit += shapes
        mode = "reduce-overhead" if self._device.type == "cuda" else None  # CUDA graphs: one launch per step
        return torch.compile(self._model.__call__, mode=mode, dynamic=False, fullgraph=False)

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean mask in the form the model's attention takes (sdpa: boolean; eager: additive)."""
        allowed = allowed.to(self._device)
        if not self._additive_mask:
            return allowed
        dtype = self.served.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=self._device).masked_fill(~allowed, torch.finfo(dtype).min)

    # --- moving rows and columns ---------------------------------------------------------------

    def move_slot(self, source: int, target: int, columns: int) -> None:
        """Copy slot ``source``'s first ``columns`` columns into slot ``target``."""
        for tensor in (*self._keys, *self._values):
            tensor[target, :, :columns] = tensor[source, :, :columns]

    def shift_columns(self, rows: int, first: int, end: int, delta: int) -> None:
        """Move columns ``first..end`` of the first ``rows`` slots by ``delta`` (negative: left)."""
        for tensor in (*self._keys, *self._values):
            tensor[:rows, :, first + delta : end + delta] = tensor[:rows, :, first:end].clone()

    def _observe(self, phase: str, batch: int, length: int) -> None:
        if self.observer is not None:
            self.observer(phase, batch, length)


def _pad_rows(adapters: Sequence[str | None] | None, rows: int, batch: int) -> list[str | None]:
    """Per-row adapter names for a pass of ``batch`` rows whose first ``rows`` are real: padding rows take the default adapter."""
    names = list(adapters) if adapters is not None else [None] * rows
    if len(names) != rows:
        raise LoraopsError(f"{len(names)} adapter names for {rows} rows")
    return names + [None] * (batch - rows)
