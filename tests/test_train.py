"""Training (:mod:`loraops.training.train`, :mod:`loraops.training.checkpoint`) for real on the tiny model: eval loss goes
down, the run folder is complete, a resumed run matches an uninterrupted one, and float16 loss scaling."""

import json

import pytest
import torch

from loraops.errors import LoraopsError


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_from_checkpoint_matches_an_uninterrupted_run(trained, tmp_path):
    from safetensors.torch import load_file

    from loraops.training.train import train

    config, full = trained
    resumed = train(config, output_dir=tmp_path / "resumed", resume_from=full.output_dir / "checkpoint-20", progress=False)
    assert resumed.steps == 30
    a = load_file(str(full.output_dir / "checkpoint-30" / "adapter_model.safetensors"))
    b = load_file(str(resumed.output_dir / "checkpoint-30" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.slow
def test_trainer_state_loads_weights_only(trained):
    _, full = trained
    saved = torch.load(full.output_dir / "checkpoint-30" / "trainer_state.pt", weights_only=True)
    assert saved["state"]["step"] == 30 and {"torch", "python", "numpy"} <= set(saved["rng"])
    assert saved["optimizer"]["state"] and saved["scheduler"]["last_epoch"] == 30


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    import random

    import numpy as np

    from loraops.training.checkpoint import restore_rng, rng_states

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    torch.save(rng_states(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.standard_normal()), torch.rand(1).item())
    random.seed(4), np.random.seed(5), torch.manual_seed(6)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.standard_normal()), torch.rand(1).item()) == expected


class _RunsCode:
    """What a hostile trainer_state.pt in shared experiment storage could hold: unpickling it runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_checkpoint_that_needs_unpickling_code_is_refused(trained, tmp_path):
    import shutil

    from loraops.training.checkpoint import load_checkpoint

    _, full = trained
    folder = tmp_path / "checkpoint-20"
    shutil.copytree(full.output_dir / "checkpoint-20", folder)
    marker = tmp_path / "code-ran"
    torch.save({"state": {"step": 20}, "optimizer": _RunsCode(marker)}, folder / "trainer_state.pt")
    with pytest.raises(LoraopsError, match="trainer_state.pt holds more than tensors and plain containers, refusing to load it"):
        load_checkpoint(folder, None, None, None, None)
    assert not marker.exists()
    (folder / "trainer_state.pt").unlink()
    with pytest.raises(LoraopsError, match="is not a training checkpoint"):
        load_checkpoint(folder, None, None, None, None)


@pytest.mark.parametrize(
    ("device_type", "compute_dtype", "expected"),
    [("cuda", "float16", True), ("cuda", "bfloat16", False), ("cuda", "float32", False), ("cpu", "float16", False)],
)
def test_loss_is_scaled_only_for_float16_on_a_gpu(device_type, compute_dtype, expected):
    from loraops.training.train import needs_loss_scaling

    assert needs_loss_scaling(device_type, compute_dtype) is expected


def test_a_scaled_step_unscales_to_the_plain_gradients_and_the_scale_survives_a_checkpoint(quick_config, workspace, tmp_path):
    """float16 loss scaling runs only on a GPU; torch's CPU GradScaler does the same arithmetic, so the
    loop's use of it (scaled backward, unscale before clipping, scale state in the checkpoint) is checked here."""
    from loraops.training.batching import BatchStream
    from loraops.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from loraops.training.data import encode_all, load_split
    from loraops.training.model import load_base_model, load_tokenizer, prepare_for_training
    from loraops.training.train import autocast_context, build_optimizer, build_scheduler, train_step

    config = quick_config("lora.dropout=0.0")  # the same forward pass twice
    tokenizer = load_tokenizer(config)
    rows = encode_all(tokenizer, load_split(config.data, "train")[0][:16], config.data)
    model = prepare_for_training(load_base_model(config), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    micro_batches = next(BatchStream(rows, config, tokenizer.pad_token_id)).micro_batches

    def gradients(scaler):
        model.zero_grad(set_to_none=True)
        loss = train_step(model, micro_batches, autocast_context(config), scaler)
        return loss, [p.grad.clone() for p in trainable if p.grad is not None]

    plain_loss, plain = gradients(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled_loss, scaled = gradients(scaler)
    optimizer = build_optimizer(trainable, config)
    scaler.unscale_(optimizer)
    unscaled = [p.grad for p in trainable if p.grad is not None]

    assert plain and scaled_loss == pytest.approx(plain_loss)  # the reported loss is the true one
    assert all(torch.allclose(s, g * 2.0**10, rtol=1e-4, atol=1e-9) for s, g in zip(scaled, plain, strict=True))
    assert all(torch.allclose(u, g, rtol=1e-4, atol=1e-9) for u, g in zip(unscaled, plain, strict=True))

    scaler.step(optimizer)
    scaler.update(new_scale=123.0)  # a scale the defaults could not give
    scheduler = build_scheduler(optimizer, config)
    folder = save_checkpoint(tmp_path, model, optimizer, scheduler, scaler, TrainState(step=1), keep=None)
    restored = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    load_checkpoint(folder, model, build_optimizer(trainable, config), build_scheduler(optimizer, config), restored)
    assert restored.get_scale() == 123.0


def test_a_failed_run_leaves_the_previous_runs_folder_as_it_was(quick_config, workspace, make_run, tmp_path):
    """A run that fails validation (no train split) writes nothing into the folder: its config.yaml,
    metrics and evaluation still describe the adapter in it, which `loraops register` would record."""
    from loraops.training.train import train

    run = tmp_path / "runs" / "tiny"
    make_run(run, rouge_l=30.0)
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    empty = tmp_path / "no-train-file"
    empty.mkdir()
    (empty / "test.jsonl").write_text('{"id": "t0", "dialogue": "#Person1#: Hi.", "summary": "Hi."}\n')

    with pytest.raises(LoraopsError, match="train"):
        train(quick_config(f"data.source={empty}", "training.max_steps=2"), output_dir=run, progress=False)

    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before


@pytest.mark.slow
def test_a_new_run_retires_the_previous_runs_adapter_evaluation_and_checkpoints(quick_config, workspace, make_run, tmp_path):
    """Once a new run in the same folder has loaded, the previous run's files go: an evaluation.json
    or checkpoint left behind would be registered as the lineage of the new adapter."""
    import yaml

    from loraops.training.train import train

    run = tmp_path / "runs" / "tiny"
    make_run(run, rouge_l=30.0)
    (run / "checkpoint-300").mkdir()

    result = train(quick_config("training.max_steps=4", "training.eval_steps=4", "training.save_steps=4"), output_dir=run, progress=False)

    assert not (run / "evaluation.json").exists() and not (run / "checkpoint-300").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["max_steps"] == 4
    assert result.adapter_dir.is_dir() and (run / "checkpoint-4").is_dir()
