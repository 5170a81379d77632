"""ray_cluster.yaml is checked with Ray's own cluster-launcher schema (what `ray up` validates)."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def load():
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def validate(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_config_passes_rays_schema():
    validate(load())


def test_cluster_config_has_a_cpu_head_and_autoscaling_gpu_workers():
    config = load()
    head = config["available_node_types"][config["head_node_type"]]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    assert workers and all(t["node_config"]["InstanceType"].startswith("g5") and t["min_workers"] == 0 and t["max_workers"] > 1 for t in workers)
    assert any("pip install" in command and "loraops" in command for command in config["setup_commands"])


def test_schema_check_catches_a_typo():
    config = load()
    config["available_node_types"]["gpu_a10g"]["min_wrkers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_wrkers"):
        validate(config)


def test_every_node_and_login_shell_runs_with_the_clusters_token():
    """Ray 2.60: a worker joins a token-auth head only with RAY_AUTH_MODE=token and the head's token."""
    config = load()
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [command for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in command]
    assert len(starts) == 2 and all(command.startswith("export RAY_AUTH_MODE=token;") for command in starts)
    assert any("export RAY_AUTH_MODE=token" in command for command in config["initialization_commands"])
