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
        ("args.batching=dynamic", "args: batching: Input should be 'continuous' or 'static'"),
        ("args.batch_buckets=[4, 2]", "args: batch_buckets: Value error, expected ascending positive integers without repeats, got [4, 2]"),
        ("args.length_buckets=[256, 256]", "args: length_buckets: Value error, expected ascending"),
        ("args.prefill_batch_size=0", "args: prefill_batch_size"),
        ("args.compile=yes", "args: compile: Input should be 'auto', 'on' or 'off'"),
        ("http_options.prot=8001", "http_options.prot: unknown key"),
        ("args.body_timeout_s=0", "args: body_timeout_s: Input should be greater than 0"),
    ],
)
def test_serve_config_errors_name_the_key(override, message):
    from loraops.config import ConfigError
    from loraops.serve.settings import load_serve_config

    with pytest.raises(ConfigError) as caught:
        load_serve_config(REPO / "serve" / "tiny.yaml", [override])
    assert message in str(caught.value)


@pytest.mark.parametrize(("where", "key"), [("application", "route_prefx"), ("top", "proxy_locaton")])
def test_serve_config_file_with_an_unknown_key_that_ray_would_drop(tmp_path, where, key):
    import yaml

    from loraops.config import ConfigError
    from loraops.serve.settings import load_serve_config

    raw = yaml.safe_load((REPO / "serve" / "tiny.yaml").read_text())
    (raw["applications"][0] if where == "application" else raw)[key] = "x"
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))

    with pytest.raises(ConfigError) as caught:
        load_serve_config(path)
    assert f"{'applications.0.' if where == 'application' else ''}{key}: unknown key" in str(caught.value)


def test_shipped_serve_configs_are_valid_for_loraops_and_ray():
    from ray.serve.schema import ServeDeploySchema

    from loraops.serve.settings import load_serve_config

    for name in ("tiny.yaml", "phi2.yaml"):
        config = load_serve_config(REPO / "serve" / name)
        ServeDeploySchema.model_validate(config.raw)
        assert config.deployment_options["SummarizerModel"]["autoscaling_config"]["max_replicas"] >= 3
    assert load_serve_config(REPO / "serve" / "phi2.yaml").deployment_options["SummarizerModel"]["ray_actor_options"]["num_gpus"] > 0


def test_engine_buckets_come_from_the_settings_and_stay_within_the_context():
    from loraops.config import ConfigError
    from loraops.serve.settings import ServeSettings

    settings = ServeSettings(batch_buckets=[1, 4, 16], length_buckets=[300, 600], prefill_batch_size=4)
    buckets = settings.buckets(max_batch_size=8, context_tokens=1024)

    assert (buckets.batch, buckets.length, buckets.prefill_batch) == ((1, 4, 8), (300, 600, 1024), (1, 4))
    assert ServeSettings().buckets(16, 2048).batch == (1, 2, 4, 8, 16)
    with pytest.raises(ConfigError, match="args.length_buckets: 2048 is over the context of 1024 tokens"):
        ServeSettings(length_buckets=[512, 2048]).buckets(8, 1024)
