"""How rows become micro-batches and optimizer steps: token budgets and padding-free packing.

A step draws ``per_device_train_batch_size x gradient_accumulation_steps`` rows; they are cut into
micro-batches by row count, or by ``training.max_tokens_per_batch`` tokens; each micro-batch is
right-padded or, with ``training.packing``, concatenated without padding (:func:`pack_rows`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraops.config import Config
from loraops.training.data import IGNORE_INDEX, batch_order, pad_batch


def pack_rows(rows: Sequence[dict[str, list[int]]], pad_id: int, sequence_length: int | None = None) -> dict[str, torch.Tensor]:
    """Concatenate rows padding-free: one sequence, or sequences of at most ``sequence_length`` tokens.

    ``position_ids`` restart at 0 for each row, and there is no ``attention_mask``: from that,
    transformers keeps attention inside each row (a block-diagonal causal mask for SDPA and flex
    attention, varlen kernels for flash attention). Any mask, even all ones, turns that detection
    off and lets rows attend to each other. The first token of every row gets no label, so the last
    token of a row never learns to predict the next row.

    With ``sequence_length`` rows are placed first-fit, longest first, into sequences of at most
    that many tokens, and shorter sequences end in a filler row (``pad_id``, no labels, positions of
    its own) so that they stack. Attention that builds a dense mask costs the square of a sequence's
    length, so bounded sequences keep it near the cost of the longest row.
    """
    sequences: list[list[dict[str, list[int]]]] = []
    if sequence_length is None:
        sequences = [list(rows)]
    else:
        room: list[int] = []
        for row in sorted(rows, key=lambda r: -len(r["input_ids"])):
            n = len(row["input_ids"])
            slot = next((i for i, free in enumerate(room) if free >= n), None)
            if slot is None:
                sequences.append([])
                room.append(max(sequence_length, n))
                slot = len(sequences) - 1
            sequences[slot].append(row)
            room[slot] -= n
    width = max(sum(len(row["input_ids"]) for row in sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        start = 0
        for row in sequence:
            n = len(row["input_ids"])
            input_ids[i, start : start + n] = torch.tensor(row["input_ids"])
            labels[i, start + 1 : start + n] = torch.tensor(row["labels"][1:])
            position_ids[i, start : start + n] = torch.arange(n)
            start += n
        position_ids[i, start:] = torch.arange(width - start)  # the filler is a row of its own
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def make_batch(rows: Sequence[dict[str, list[int]]], pad_id: int, packing: bool, sequence_length: int | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch: packed (padding-free, see :func:`pack_rows`) or right-padded."""
    return pack_rows(rows, pad_id, sequence_length) if packing else pad_batch(rows, pad_id)


def batch_cost(lengths: Sequence[int], packing: bool) -> int:
    """Tokens a micro-batch computes: the sum of its rows packed, rows x longest row padded."""
    return sum(lengths) if packing else len(lengths) * max(lengths, default=0)


def split_by_tokens(indices: Sequence[int], lengths: Sequence[int], max_tokens: int, packing: bool) -> list[list[int]]:
    """Cut ``indices`` (in order) into micro-batches of at most ``max_tokens`` computed tokens each.

    A row longer than the budget on its own still gets a micro-batch of its own.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for index in indices:
        if current and batch_cost([lengths[i] for i in current] + [lengths[index]], packing) > max_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


#: Attention that skips the work across packed rows (a block-sparse mask, varlen kernels): one sequence per micro-batch.
SPARSE_ATTENTION = ("flex_attention", "flash_attention_2", "flash_attention_3")


def packed_sequence_length(config: Config) -> int | None:
    """How long a packed sequence may be: unbounded where attention skips across-row work, else ``data.max_length``.

    SDPA and eager attention get a dense mask as long as the sequence squared; sequences no longer
    than the longest row keep that cost near the padded batch's. Flash attention's varlen path
    needs a single sequence (transformers only reads a batch of one as packed).
    """
    return None if config.training.attn_implementation in SPARSE_ATTENTION else config.data.max_length


@dataclass
class Step:
    """One optimizer step's data."""

    micro_batches: list[dict[str, torch.Tensor]]
    rows: int
    tokens: int  # tokens of the rows themselves, no padding or filler


class BatchStream:
    """Endless optimizer steps, epoch after epoch, reproducible from (seed, steps taken).

    A step draws ``per_device_train_batch_size x gradient_accumulation_steps`` rows at once
    (length-grouped when ``group_by_length``; the last step of an epoch may have fewer). Without a
    token budget they are cut into micro-batches of ``per_device_train_batch_size`` rows; with
    ``max_tokens_per_batch`` they are sorted by length and cut into micro-batches of at most that
    many tokens, so memory follows tokens, not the longest row times the row count. Either way a
    step trains on the same rows, so the token budget and packing change the speed, not what is learned.
    """

    def __init__(self, rows, config: Config, pad_id: int, skip: int = 0):
        self.rows, self.settings, self.pad_id = rows, config.training, pad_id
        self.sequence_length = packed_sequence_length(config)
        self.lengths = [len(row["input_ids"]) for row in rows]
        self.rng = random.Random(self.settings.seed)
        self.pending: list[list[int]] = []
        self.rows_per_step = self.settings.per_device_train_batch_size * self.settings.gradient_accumulation_steps
        for _ in range(skip):
            self.next_step_indices()

    def next_step_indices(self) -> list[list[int]]:
        """Row indices of the next step's micro-batches."""
        if not self.pending:
            self.pending = batch_order(self.lengths, self.rows_per_step, self.settings.group_by_length, self.rng)
        group = self.pending.pop(0)
        budget = self.settings.max_tokens_per_batch
        if budget is None:
            size = self.settings.per_device_train_batch_size
            return [group[start : start + size] for start in range(0, len(group), size)]
        group = sorted(group, key=lambda i: -self.lengths[i])
        return split_by_tokens(group, self.lengths, budget, self.settings.packing)

    def __next__(self) -> Step:
        indices = self.next_step_indices()
        batches = [make_batch([self.rows[i] for i in batch], self.pad_id, self.settings.packing, self.sequence_length) for batch in indices]
        return Step(batches, sum(len(batch) for batch in indices), sum(self.lengths[i] for batch in indices for i in batch))


def eval_batches(rows, config: Config, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The eval rows longest first, cut by the token budget (or ``per_device_eval_batch_size`` rows)."""
    settings = config.training
    lengths = [len(row["input_ids"]) for row in rows]
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])
    if settings.max_tokens_per_batch is not None:
        groups = split_by_tokens(order, lengths, settings.max_tokens_per_batch, settings.packing)
    else:
        size = settings.per_device_eval_batch_size
        groups = [order[start : start + size] for start in range(0, len(order), size)]
    sequence_length = packed_sequence_length(config)
    return [make_batch([rows[i] for i in group], pad_id, settings.packing, sequence_length) for group in groups]
