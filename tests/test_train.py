"""The real QLoRA path on the tiny model: bitsandbytes 4-bit nf4 base + PEFT LoRA, on the CPU."""

import json

import pytest
import torch

from conftest import REPO
from loraops.config import load_config
from loraops.errors import LoraopsError
from loraops.evaluate import evaluate, format_report, rouge
from loraops.model import load_base_model, load_for_inference, load_tokenizer, prepare_for_training

QUICK = [
    "data.builtin_size=200",
    "training.max_steps=30",
    "training.eval_steps=10",
    "training.save_steps=10",
    "training.logging_steps=5",
    "training.eval_max_samples=16",
    "training.per_device_train_batch_size=8",
    "evaluation.max_samples=8",
    "evaluation.max_new_tokens=12",
]


def quick_config(*extra):
    return load_config(REPO / "tune" / "tiny.yaml", QUICK + list(extra))


@pytest.fixture(scope="module")
def trained(tiny_model_home, tmp_path_factory):
    """One short real training run shared by the tests below."""
    from loraops.train import train

    config = quick_config(f"workspace={tiny_model_home}")
    return config, train(config, output_dir=tmp_path_factory.mktemp("run"), progress=False)


def test_base_is_4bit_and_lora_on_the_phi_targets(workspace):
    import bitsandbytes as bnb

    config = quick_config()
    model = prepare_for_training(load_base_model(config), config)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    trainable = {name.split(".")[-4] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj", "k_proj", "v_proj", "dense"}


def test_unknown_target_module_is_an_error(workspace):
    config = quick_config("lora.target_modules=[query_key_value]")
    with pytest.raises(LoraopsError, match="lora.target_modules.*query_key_value"):
        prepare_for_training(load_base_model(config), config)


def test_training_lowers_eval_loss_and_writes_artifacts(trained):
    config, result = trained
    events = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    eval_losses = [e["eval_loss"] for e in events if "eval_loss" in e]
    assert len(eval_losses) == 3
    assert eval_losses[-1] < eval_losses[0] - 0.3, eval_losses
    assert result.best_eval_loss == min(eval_losses)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in result.adapter_dir.iterdir()}
    assert result.plot_file.stat().st_size > 10_000
    assert sorted(p.name for p in result.output_dir.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]  # save_total_limit 2


def test_saved_adapter_on_a_fresh_4bit_base_reproduces_logits(workspace, tmp_path):
    from loraops.data import encode_all, load_split, pad_batch
    from loraops.train import BatchStream, accumulate_gradients, autocast_context, build_optimizer, save_adapter

    config = quick_config()
    tokenizer = load_tokenizer(config)
    rows = encode_all(tokenizer, load_split(config.data, "train")[0][:32], config.data)
    model = prepare_for_training(load_base_model(config), config)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], config)
    batches = BatchStream(rows, 8, True, 0, tokenizer.pad_token_id)
    for _ in range(5):
        accumulate_gradients(model, batches, 1, autocast_context(config))
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


def test_resume_from_checkpoint_matches_an_uninterrupted_run(trained, tmp_path):
    from safetensors.torch import load_file

    from loraops.train import train

    config, full = trained
    resumed = train(config, output_dir=tmp_path / "resumed", resume_from=full.output_dir / "checkpoint-20", progress=False)
    assert resumed.steps == 30
    a = load_file(str(full.output_dir / "checkpoint-30" / "adapter_model.safetensors"))
    b = load_file(str(resumed.output_dir / "checkpoint-30" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_rouge_takes_the_best_reference():
    prediction = ["#Person1# books a table for two on Friday."]
    single = rouge(prediction, [["#Person2# asks about the weather."]])
    several = rouge(prediction, [["#Person2# asks about the weather.", "#Person1# books a table for two on Friday."]])
    assert several["rougeL"] == pytest.approx(100.0)
    assert single["rougeL"] < 40
    assert set(several) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}


def test_evaluate_writes_report_with_base_and_tuned(trained, tmp_path):
    config, result = trained
    report = evaluate(config, adapter=result.adapter_dir, output=tmp_path / "eval.json", progress=False)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["samples"] == 8 and set(saved) >= {"base", "tuned", "examples"}
    assert all(0 <= saved[side]["rougeL"] <= 100 for side in ("base", "tuned"))
    assert "gain L" in format_report(report)
