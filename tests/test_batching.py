"""Token-budget micro-batches and padding-free packing: the batching changes speed, never what is learned.

CPU, fp32, the embedded tiny model (4-bit nf4 base + LoRA), as in training.
"""

from pathlib import Path

import pytest
import torch

from loraops.config import ConfigError, load_config
from loraops.training.batching import batch_cost, pack_rows, split_by_tokens
from loraops.training.data import IGNORE_INDEX, encode_all, load_split, pad_batch
from loraops.training.model import load_base_model, load_tokenizer, prepare_for_training

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.builtin_size=200", "lora.dropout=0.0", "training.eval_max_samples=24"]


def tiny_config(*extra):
    return load_config(REPO / "tune" / "tiny.yaml", SMALL + list(extra))


@pytest.fixture(scope="module")
def rows(tiny_model_home):
    config = tiny_config(f"workspace={tiny_model_home}")
    tokenizer = load_tokenizer(config)
    return encode_all(tokenizer, load_split(config.data, "train")[0][:12], config.data), tokenizer.pad_token_id


@pytest.fixture(scope="module")
def lora_model(tiny_model_home):
    """The training model (4-bit base + LoRA), with LoRA weights moved off zero so the adapter takes part."""
    config = tiny_config(f"workspace={tiny_model_home}")
    model = with_nonzero_lora(prepare_for_training(load_base_model(config), config))
    model.eval()
    return model


def with_nonzero_lora(model):
    """LoRA starts with B = 0, which leaves A without gradient; move B off zero so that both take part."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


# --- batching without a model ------------------------------------------------------------------


def test_pack_rows_restarts_positions_and_never_labels_across_rows():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    packed = pack_rows(rows, pad_id=0)
    assert set(packed) == {"input_ids", "labels", "position_ids"}  # no attention_mask: it would switch the per-row attention off
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]  # row 1's last token predicts nothing of row 2


def test_pack_rows_fills_bounded_sequences_longest_first():
    rows = [{"input_ids": [1] * n, "labels": [2] * n} for n in (2, 5, 3, 4)]
    packed = pack_rows(rows, pad_id=0, sequence_length=7)
    # 5 and 2 share the first sequence, 4 and 3 the second; each 7 tokens, so no filler is needed
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    packed = pack_rows(rows[:3], pad_id=0, sequence_length=7)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 0, 1, 2, 3]]  # 3, then a filler row of 4
    assert packed["input_ids"][1, 3:].tolist() == [0, 0, 0, 0] and (packed["labels"][1, 3:] == IGNORE_INDEX).all()


def test_split_by_tokens_keeps_every_micro_batch_within_the_budget():
    lengths = [300, 290, 200, 120, 110, 100, 40, 30]
    order = list(range(len(lengths)))
    for packing in (False, True):
        batches = split_by_tokens(order, lengths, 600, packing)
        assert [i for batch in batches for i in batch] == order
        assert all(batch_cost([lengths[i] for i in batch], packing) <= 600 for batch in batches)
    assert split_by_tokens(order, lengths, 600, packing=False)[0] == [0, 1]  # padded: 3 rows of 300 would cost 900
    assert split_by_tokens(order, lengths, 600, packing=True)[0] == [0, 1]  # packed: 300 + 290 + 200 > 600
    assert split_by_tokens([0, 1], [900, 10], 600, packing=True) == [[0], [1]]  # a row over the budget goes alone


def test_a_token_budget_below_the_row_length_is_a_config_error():
    with pytest.raises(ConfigError, match=r"training.max_tokens_per_batch \(100\) must be at least data.max_length \(384\)"):
        tiny_config("training.max_tokens_per_batch=100")


def test_budgeted_steps_hold_the_same_rows_and_resume_at_the_same_place(rows):
    from loraops.training.batching import BatchStream

    rows, pad_id = rows
    config = tiny_config(
        "training.per_device_train_batch_size=6", "training.gradient_accumulation_steps=2", "training.max_tokens_per_batch=900", "training.packing=true"
    )
    stream = BatchStream(rows, config, pad_id)
    steps = [stream.next_step_indices() for _ in range(3)]
    lengths = [len(row["input_ids"]) for row in rows]
    for step in steps:
        assert sum(len(batch) for batch in step) == 12  # per_device_train_batch_size x gradient_accumulation_steps
        assert all(sum(lengths[i] for i in batch) <= 900 for batch in step)
        assert len(step) > 1
    assert sorted(i for batch in steps[0] for i in batch) == list(range(12))  # 12 rows: one epoch per step
    assert BatchStream(rows, config, pad_id, skip=2).next_step_indices() == steps[2]


# --- the model ---------------------------------------------------------------------------------


def packed_logits(model, rows):
    """Logits of each row, the rows packed into one sequence."""
    batch = pack_rows(rows, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    return list(torch.split(logits, [len(row["input_ids"]) for row in rows]))


def test_packed_rows_do_not_see_each_other(lora_model, rows):
    rows, _ = rows
    before = packed_logits(lora_model, rows[:3])
    changed = {"input_ids": rows[1]["input_ids"][::-1], "labels": rows[1]["labels"]}  # same length, other tokens
    after = packed_logits(lora_model, [rows[0], changed, rows[2]])
    assert (before[1] - after[1]).abs().max() > 1e-1
    assert (before[0] - after[0]).abs().max() < 1e-5
    assert (before[2] - after[2]).abs().max() < 1e-5
    # Another length moves the next row to other offsets, and alone it runs in other shapes: float
    # rounding differs (about 1e-5 on logits of magnitude 5), what it sees does not.
    shifted = packed_logits(lora_model, [rows[0], rows[5], rows[2]])[2]
    alone = packed_logits(lora_model, [rows[2]])[0]
    assert (before[2] - shifted).abs().max() < 1e-4
    assert (before[2] - alone).abs().max() < 1e-4


def test_an_all_ones_attention_mask_would_let_packed_rows_attend_across(lora_model, rows):
    """Why packed batches never carry an attention_mask: transformers then stops deriving rows from position_ids."""
    rows, _ = rows
    batch = pack_rows(rows[:2], pad_id=0)
    with torch.no_grad():
        masked = lora_model(**{k: v for k, v in batch.items() if k != "labels"}, attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits[0]
    second = packed_logits(lora_model, rows[:2])[1]
    assert (masked[len(rows[0]["input_ids"]) :] - second).abs().max() > 1e-2


def test_packed_loss_equals_padded_loss(lora_model, rows):
    from loraops.training.train import summed_loss

    rows, pad_id = rows
    padded = pad_batch(rows[:6], pad_id)
    with torch.no_grad():
        reference = lora_model(**padded, use_cache=False).loss  # transformers' own mean over labelled tokens
        total, count = summed_loss(lora_model, pack_rows(rows[:6], pad_id))
        bounded_total, bounded_count = summed_loss(lora_model, pack_rows(rows[:6], pad_id, sequence_length=384))
        padded_total, padded_count = summed_loss(lora_model, padded)
    assert count == padded_count == bounded_count == sum(sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows[:6])
    assert abs(total.item() / count - reference.item()) / reference.item() < 1e-5
    assert abs(padded_total.item() / padded_count - reference.item()) / reference.item() < 1e-5
    assert abs(bounded_total.item() / count - reference.item()) / reference.item() < 1e-5


def test_bounded_packed_sequences_keep_rows_apart(lora_model, rows):
    """Two rows share each sequence of at most 384 tokens, the last one ends in a filler row: every row's logits are its own."""
    rows, pad_id = rows
    batch = pack_rows(rows[:5], pad_id, sequence_length=384)
    assert batch["input_ids"].shape[0] < 5
    with torch.no_grad():
        logits = lora_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    starts = (batch["position_ids"] == 0).nonzero().tolist()
    for row in rows[:5]:
        n = len(row["input_ids"])
        i, j = next((i, j) for i, j in starts if batch["input_ids"][i, j : j + n].tolist() == row["input_ids"])
        assert (logits[i, j : j + n] - packed_logits(lora_model, [row])[0]).abs().max() < 1e-4


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_and_budgeted_steps_give_the_padded_gradients(tiny_model_home, rows, checkpointing):
    """One optimizer step's gradients: 12 rows padded in 2 micro-batches of 6 vs packed under a token budget (sequences of <= 384 tokens)."""
    from loraops.training.batching import BatchStream
    from loraops.training.train import autocast_context, train_step

    rows, pad_id = rows
    base = [
        "training.per_device_train_batch_size=6",
        "training.gradient_accumulation_steps=2",
        f"training.gradient_checkpointing={checkpointing}",
        f"workspace={tiny_model_home}",
    ]
    padded_config = tiny_config(*base)
    packed_config = tiny_config(*base, "training.max_tokens_per_batch=1500", "training.packing=true")
    model = with_nonzero_lora(prepare_for_training(load_base_model(padded_config), padded_config))
    model.train()
    results = []
    for config in (padded_config, packed_config):
        step = next(BatchStream(rows, config, pad_id))
        model.zero_grad(set_to_none=True)
        loss = train_step(model, step.micro_batches, autocast_context(config))
        results.append((len(step.micro_batches), loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}))
    (padded_batches, padded_loss, padded), (packed_batches, packed_loss, packed) = results
    assert padded_batches == 2 and packed_batches > 1  # the same 12 rows, batched differently
    assert abs(packed_loss - padded_loss) / padded_loss < 1e-5
    assert all(gradient.abs().max() > 0 for gradient in padded.values())
    worst = max(((packed[name] - padded[name]).abs().max() / padded[name].abs().max()).item() for name in padded)
    assert worst < 1e-4, worst


def test_packed_eval_loss_equals_padded_eval_loss(lora_model, rows):
    from loraops.training.train import autocast_context, evaluate_loss

    rows, pad_id = rows
    config = tiny_config("training.per_device_eval_batch_size=5")
    padded = evaluate_loss(lora_model, rows, config, pad_id, autocast_context(config))
    packed = evaluate_loss(lora_model, rows, tiny_config("training.packing=true", "training.max_tokens_per_batch=1000"), pad_id, autocast_context(config))
    assert abs(packed - padded) / padded < 1e-5


@pytest.mark.slow
def test_a_packed_run_learns_like_the_padded_run_and_resumes_exactly(tiny_model_home, tmp_path):
    """Same samples, same eval loss (within 2%); a packed, budgeted run resumes from a checkpoint exactly."""
    from safetensors.torch import load_file

    from loraops.training.train import train

    short = [
        f"workspace={tiny_model_home}",
        "training.max_steps=12",
        "training.eval_steps=12",
        "training.save_steps=6",
        "training.logging_steps=6",
        "training.warmup_steps=2",
    ]
    padded = train(tiny_config(*short), output_dir=tmp_path / "padded", progress=False)
    packed_config = tiny_config(*short, "training.packing=true", "training.max_tokens_per_batch=2048")
    packed = train(packed_config, output_dir=tmp_path / "packed", progress=False)
    assert abs(packed.best_eval_loss - padded.best_eval_loss) / padded.best_eval_loss < 0.02, (packed.best_eval_loss, padded.best_eval_loss)

    resumed = train(packed_config, output_dir=tmp_path / "resumed", resume_from=packed.output_dir / "checkpoint-6", progress=False)
    a = load_file(str(packed.output_dir / "checkpoint-12" / "adapter_model.safetensors"))
    b = load_file(str(resumed.output_dir / "checkpoint-12" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_flex_attention_training_on_a_cpu_is_a_clear_error(workspace, tmp_path):
    from loraops.errors import LoraopsError
    from loraops.training.train import train

    with pytest.raises(LoraopsError, match="training.attn_implementation flex_attention trains only on a GPU"):
        train(tiny_config("training.attn_implementation=flex_attention"), output_dir=tmp_path, progress=False)
