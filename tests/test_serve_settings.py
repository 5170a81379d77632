"""The serve config file and the application's settings (:mod:`loraops.serve.settings`): errors name the
key, and the shipped configs are valid for loraops and for Ray's own ``serve deploy`` schema."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("args.mode=fp8", "args: mode: Input should be 'nf4' or 'merged'"),
        ("args.adapter=a@@b", "args: adapter"),
        ("args.colour=blue", "args: colour: unknown key"),
        ("args.max_new_tokens_limit=8", "default_max_new_tokens (64) is above max_new_tokens_limit (8)"),
        ("deployments.Bogus.num_replicas=2", "unknown deployment 'Bogus'"),
        ("deployments.SummarizerModel.num_cpus=2", "(SummarizerModel).num_cpus: unknown deployment option"),
        ("deployments.SummarizerModel.autoscaling_config.max_replica=2", "autoscaling_config.max_replica: unknown key"),
        ("deployments.SummarizerModel.autoscaling_config.max_replicas=0", "autoscaling_config: max_replicas"),
        ("deployments.SummarizerModel.ray_actor_options.num_gpu=1", "ray_actor_options.num_gpu: unknown key"),
    ],
)
def test_serve_config_errors_name_the_key(override, message):
    from loraops.config import ConfigError
    from loraops.serve.settings import load_serve_config

    with pytest.raises(ConfigError) as caught:
        load_serve_config(REPO / "serve" / "tiny.yaml", [override])
    assert message in str(caught.value)


def test_shipped_serve_configs_are_valid_for_loraops_and_ray():
    from ray.serve.schema import ServeDeploySchema

    from loraops.serve.settings import load_serve_config

    for name in ("tiny.yaml", "phi2.yaml"):
        config = load_serve_config(REPO / "serve" / name)
        ServeDeploySchema.model_validate(config.raw)
        assert config.deployment_options["SummarizerModel"]["autoscaling_config"]["max_replicas"] >= 3
    assert load_serve_config(REPO / "serve" / "phi2.yaml").deployment_options["SummarizerModel"]["ray_actor_options"]["num_gpus"] > 0
