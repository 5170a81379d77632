"""Shape buckets: the fixed batch sizes and KV-cache lengths every forward pass of the serving engine uses.

A compiled decode step compiles once per input shape. Serving traffic brings every batch size up to
the limit and every dialogue length, so the engine pads each pass up to the next bucket: a few shapes,
all compiled (and run) during a replica's warm-up, none on a request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Smallest default cache-length bucket: shorter windows save little and would add shapes.
MIN_LENGTH_BUCKET = 256


def batch_buckets(max_batch_size: int, buckets: Sequence[int] | None = None) -> tuple[int, ...]:
    """The batch sizes a step may run at: ``buckets`` (default 1, 2, 4, 8, ...) below ``max_batch_size``, then ``max_batch_size``.

    ``max_batch_size`` is validated where it is read (``args.max_batch_size``, at least 1)."""
    if buckets is None:
        buckets = [2**i for i in range(max_batch_size.bit_length())]
    return tuple(sorted({b for b in buckets if b < max_batch_size} | {max_batch_size}))


def length_buckets(context_tokens: int, buckets: Sequence[int] | None = None) -> tuple[int, ...]:
    """The cache lengths a step may attend over: ``buckets`` (default 256, 512, ...) below the context, then the context."""
    if context_tokens < 1:
        raise ValueError(f"context_tokens must be at least 1, got {context_tokens}")
    if buckets is None:
        buckets = [MIN_LENGTH_BUCKET * 2**i for i in range(max(context_tokens // MIN_LENGTH_BUCKET, 1).bit_length())]
    return tuple(sorted({b for b in buckets if b < context_tokens} | {context_tokens}))


@dataclass(frozen=True)
class Buckets:
    """The fixed shapes of an engine: batch sizes and cache lengths, each ascending.

    ``prefill_batch`` (default: the batch buckets) are the batch sizes of prefill passes: joining prompts
    are prefilled that many at a time. Prefill is compute-bound, so a few rows per pass already use the
    hardware, and fewer prefill shapes make warm-up shorter.
    """

    batch: tuple[int, ...]
    length: tuple[int, ...]
    prefill_batch: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.prefill_batch:
            object.__setattr__(self, "prefill_batch", self.batch)
        for name, values in (("batch", self.batch), ("length", self.length), ("prefill_batch", self.prefill_batch)):
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                raise ValueError(f"{name} buckets must be ascending positive integers without repeats, got {list(values)}")
        if not set(self.prefill_batch) <= set(self.batch):
            raise ValueError(f"prefill batch buckets {list(self.prefill_batch)} must be batch buckets ({list(self.batch)})")

    @classmethod
    def build(
        cls,
        max_batch_size: int,
        context_tokens: int,
        batch: Sequence[int] | None = None,
        length: Sequence[int] | None = None,
        prefill_batch_size: int | None = None,
    ) -> Buckets:
        """Buckets from settings: ``batch`` capped by ``max_batch_size``, ``length`` by the context, prefill passes of at most ``prefill_batch_size`` rows."""
        batches = batch_buckets(max_batch_size, batch)
        prefill = tuple(b for b in batches if b <= (prefill_batch_size or max_batch_size)) or batches[:1]
        return cls(batches, length_buckets(context_tokens, length), prefill)

    @property
    def max_batch(self) -> int:
        return self.batch[-1]

    @property
    def max_length(self) -> int:
        return self.length[-1]

    def batch_for(self, rows: int) -> int:
        return _bucket(rows, self.batch, "batch")

    def length_for(self, tokens: int) -> int:
        return _bucket(tokens, self.length, "length")

    def prefill_batch_for(self, rows: int) -> int:
        return _bucket(rows, self.prefill_batch, "prefill batch")

    def shapes(self) -> list[tuple[str, int, int]]:
        """Every (phase, batch, length) a forward pass of the engine can have."""
        prefill = [("prefill", b, n) for n in self.length for b in self.prefill_batch]
        return prefill + [("decode", b, n) for n in self.length for b in self.batch]


def _bucket(value: int, buckets: tuple[int, ...], name: str) -> int:
    for bucket in buckets:
        if bucket >= value:
            return bucket
    raise ValueError(f"{value} is over the largest {name} bucket ({buckets[-1]})")
