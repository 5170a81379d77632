"""``loraops bench train`` on the CPU with the tiny model, the random-init Phi-2 architecture, and the fast Phi-2 recipe."""

import json
from pathlib import Path

import pytest
import torch

from helpers import run_cli
from loraops.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_train_compares_the_recipe_with_the_seed_recipe(workspace, tmp_path, cli_env):
    """Without --output the figures go to the workspace, never into the repository's benchmarks/results/ (cwd here)."""
    output = workspace / "benchmarks" / "train.json"
    run = run_cli(
        "bench", "train", "--config", str(REPO / "tune" / "tiny.yaml"), "--steps", "10",
        "--set", "data.builtin_size=300", "--set", "training.packing=true", "--set", "training.max_tokens_per_batch=2048", "--eval-samples", "12",
        env=cli_env(workspace), cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("recipe"))
    assert lines[header + 1].split()[0] == "seed" and lines[header + 2].split()[0] == "configured"
    assert any(line.startswith("speedup vs seed: ") for line in lines)
    assert f"results: {output}" in lines and not (tmp_path / "benchmarks").exists()

    report = json.loads(output.read_text())
    seed, configured = report["recipes"]["seed"], report["recipes"]["configured"]
    assert configured["steps"] == 10 and configured["samples"] == 10 * 16
    assert seed["steps"] == 40 and seed["eval_after_samples"] == configured["eval_after_samples"] == 160
    assert seed["settings"] | {"compute_dtype": None} == {
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "max_tokens_per_batch": None, "packing": False,
        "gradient_checkpointing": True, "optim": "paged_adamw_32bit", "compute_dtype": None, "attn_implementation": "default (sdpa)",
    }  # fmt: skip
    assert configured["settings"]["packing"] is True and seed["padding_share"] == 0.0  # the seed's micro-batches are single rows
    assert 0.0 <= configured["padding_share"] < 0.1  # packed: only the filler that evens out the sequences
    for recipe in (seed, configured):
        assert recipe["samples_per_s"] > 0 and recipe["tokens_per_s"] > recipe["samples_per_s"] and recipe["model_tflops"] > 0
        assert recipe["peak_rss_gb"] > 0 and 0 < recipe["eval_loss"] < 20
        assert recipe["model_tflops"] == round(6 * report["model"]["parameters"] * recipe["tokens_per_s"] / 1e12, 4)
    assert report["speedup_vs_seed"] == round(configured["samples_per_s"] / seed["samples_per_s"], 2)
    assert report["device"]["kind"] == "cpu" and report["device"]["name"]
    assert report["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert all(report["versions"][package] for package in ("transformers", "peft", "bitsandbytes"))
    assert report["data"]["row_tokens_max"] >= report["data"]["row_tokens_mean"] > 0
    assert report["model"]["random_init"] is None and "6 x N" in report["flops_convention"]


@pytest.mark.slow
def test_random_init_phi2_has_phi2s_architecture_and_trains_through_the_4bit_path(workspace):
    """The real architecture at one layer of 32 (a whole Phi-2 is no CPU job): built, loaded 4-bit with LoRA, packed forward and backward."""
    from loraops.bench.train import PHI2_ARCHITECTURE, count_parameters, ensure_random_init_model
    from loraops.training.batching import pack_rows
    from loraops.training.model import load_base_model, load_tokenizer, prepare_for_training
    from loraops.training.train import summed_loss

    folder = ensure_random_init_model("phi-2", workspace, num_hidden_layers=1)
    saved = json.loads((folder / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "max_position_embeddings", "hidden_act", "resid_pdrop"):
        assert saved[key] == PHI2_ARCHITECTURE[key], key
    assert saved["rope_parameters"]["partial_rotary_factor"] == 0.4 and saved["num_hidden_layers"] == 1

    config = load_config(REPO / "tune" / "tiny.yaml", [f"model.name={folder}", "lora.dropout=0.0"])
    tokenizer = load_tokenizer(config)
    assert len(tokenizer) == saved["vocab_size"] == 1500  # the embedded tokenizer
    model = prepare_for_training(load_base_model(config), config)
    row = tokenizer.encode("#Person1#: Hello.\n#Person2#: Hi, how are you?", add_special_tokens=False)
    batch = pack_rows([{"input_ids": row, "labels": row}, {"input_ids": row[:5], "labels": row[:5]}], tokenizer.pad_token_id)
    loss, count = summed_loss(model, batch)
    loss.backward()
    assert count == (len(row) - 1) + (5 - 1) and torch.isfinite(loss)  # each row predicts all its tokens but the first
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for name, p in model.named_parameters() if "lora_" in name)
    layer = 12 * 2560 * 2560 + 11 * 2560  # q, k, v, dense, fc1 (4x wide), fc2 (4x wide), their biases, the layer norm
    assert count_parameters(config) == 1 * layer + 2 * 1500 * 2560 + 1500 + 2 * 2560  # + embeddings, LM head (+ bias), final norm


def test_the_fast_phi2_recipe_keeps_the_seed_model_data_and_lora():
    from loraops.tune.space import SearchSpace

    seed = load_config(REPO / "tune" / "phi2-dialogsum.yaml")
    fast = load_config(REPO / "tune" / "phi2-dialogsum-fast.yaml")
    assert fast.model == seed.model and fast.lora == seed.lora and fast.data == seed.data
    assert fast.training.packing and fast.training.max_tokens_per_batch and fast.quantization.bnb_4bit_compute_dtype == "bfloat16"
    rows_per_step = fast.training.per_device_train_batch_size * fast.training.gradient_accumulation_steps
    assert fast.training.max_steps * rows_per_step == seed.training.max_steps * 4  # the seed's samples
    assert SearchSpace.from_config(fast).keys
