"""Models (:mod:`loraops.training.model`) on the tiny Phi: a bitsandbytes 4-bit nf4 base with PEFT LoRA on the CPU,
and an adapter saved and loaded back onto a fresh 4-bit base."""

from __future__ import annotations

import pytest
import torch

from loraops.errors import LoraopsError
from loraops.training.model import load_base_model, load_for_inference, load_tokenizer, prepare_for_training


def test_base_is_4bit_and_lora_on_the_phi_targets(quick_config, workspace):
    import bitsandbytes as bnb

    config = quick_config()
    model = prepare_for_training(load_base_model(config), config)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    trainable = {name.split(".")[-4] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj", "k_proj", "v_proj", "dense"}


def test_unknown_target_module_is_an_error(quick_config, workspace):
    config = quick_config("lora.target_modules=[query_key_value]")
    with pytest.raises(LoraopsError, match="lora.target_modules.*query_key_value"):
        prepare_for_training(load_base_model(config), config)


@pytest.mark.slow
def test_saved_adapter_on_a_fresh_4bit_base_reproduces_logits(quick_config, workspace, tmp_path):
    from loraops.training.batching import BatchStream
    from loraops.training.checkpoint import save_adapter
    from loraops.training.data import encode_all, load_split, pad_batch
    from loraops.training.train import autocast_context, build_optimizer, train_step

    config = quick_config()
    tokenizer = load_tokenizer(config)
    rows = encode_all(tokenizer, load_split(config.data, "train")[0][:32], config.data)
    model = prepare_for_training(load_base_model(config), config)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], config)
    batches = BatchStream(rows, config, tokenizer.pad_token_id)
    for _ in range(5):
        train_step(model, next(batches).micro_batches, autocast_context(config))
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    probe = pad_batch(rows[:4], tokenizer.pad_token_id)
    with torch.no_grad():
        trained_logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    save_adapter(model, tmp_path / "adapter")

    reloaded, _ = load_for_inference(config, adapter=tmp_path / "adapter")
    base_only, _ = load_for_inference(config)
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        base_logits = base_only(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert torch.allclose(trained_logits, reloaded_logits, atol=1e-4)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-2), "the adapter must change the model"
