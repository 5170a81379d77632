"""Training (:mod:`loraops.train`) for real on the tiny model: eval loss goes down, the run folder is
complete, and a resumed run matches an uninterrupted one."""

import json

import pytest
import torch


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

    from loraops.train import train

    config, full = trained
    resumed = train(config, output_dir=tmp_path / "resumed", resume_from=full.output_dir / "checkpoint-20", progress=False)
    assert resumed.steps == 30
    a = load_file(str(full.output_dir / "checkpoint-30" / "adapter_model.safetensors"))
    b = load_file(str(resumed.output_dir / "checkpoint-30" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
