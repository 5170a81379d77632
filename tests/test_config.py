import subprocess
import sys

import pytest

from conftest import REPO, cli_env
from loraops.config import Config, ConfigError, load_config

SEED_RECIPE = {
    ("model", "name"): "microsoft/phi-2",
    ("model", "trust_remote_code"): False,
    ("quantization", "load_in_4bit"): True,
    ("quantization", "bnb_4bit_quant_type"): "nf4",
    ("quantization", "bnb_4bit_compute_dtype"): "float16",
    ("quantization", "bnb_4bit_use_double_quant"): False,
    ("lora", "r"): 32,
    ("lora", "alpha"): 32,
    ("lora", "target_modules"): ["q_proj", "k_proj", "v_proj", "dense"],
    ("lora", "dropout"): 0.05,
    ("lora", "task_type"): "CAUSAL_LM",
    ("training", "warmup_steps"): 1,
    ("training", "per_device_train_batch_size"): 1,
    ("training", "gradient_accumulation_steps"): 4,
    ("training", "max_steps"): 1000,
    ("training", "learning_rate"): 2e-4,
    ("training", "optim"): "paged_adamw_32bit",
    ("training", "logging_steps"): 25,
    ("training", "eval_steps"): 25,
    ("training", "save_steps"): 25,
    ("training", "gradient_checkpointing"): True,
    ("training", "group_by_length"): True,
    ("training", "report_to"): ["none"],
}


def test_phi2_config_is_the_seed_recipe():
    config = load_config(REPO / "tune" / "phi2-dialogsum.yaml")
    for (section, key), expected in SEED_RECIPE.items():
        assert getattr(getattr(config, section), key) == expected, f"{section}.{key}"
    assert config.data.prompt_template == "Instruct: Summarize the following conversation.\n{dialogue}\nOutput:\n"
    assert config.data.source == "knkarthick/dialogsum"


def test_defaults_are_the_seed_quantization_and_lora():
    config = Config()
    assert config.quantization.bnb_4bit_quant_type == "nf4" and config.quantization.bnb_4bit_compute_dtype == "float16"
    assert config.lora.r == 32 and config.training.optim == "paged_adamw_32bit"


def test_overrides_are_typed_and_nested():
    config = load_config(REPO / "tune" / "tiny.yaml", ["training.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]", "training.report_to=tensorboard"])
    assert config.training.learning_rate == pytest.approx(1e-4)
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.training.report_to == ["tensorboard"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.learnin_rate=1e-4", "training.learnin_rate"),
        ("training.learning_rate=-1", "training.learning_rate"),
        ("training.max_steps=many", "training.max_steps"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("quantization.bnb_4bit_quant_type=int3", "quantization.bnb_4bit_quant_type"),
        ("data.prompt_template=no slot", "data.prompt_template"),
        ("modle.name=x", "modle"),
    ],
)
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as caught:
        load_config(REPO / "tune" / "tiny.yaml", [override])
    assert key in str(caught.value)


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML.*line"):
        load_config(bad)


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["training.max_steps"])


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "training.lerning_rate=1"], "training.lerning_rate: unknown key"),
        (["--set", "training.max_steps=0"], "training.max_steps"),
        (["--set", "data.source=./missing.jsonl"], "no such file or folder: ./missing.jsonl"),
    ],
)
def test_train_cli_exits_2_with_one_line(tmp_path, args, expected):
    run = subprocess.run(
        [sys.executable, "-m", "loraops", "train", "--config", str(REPO / "tune" / "tiny.yaml"), *args],
        capture_output=True, text=True, env=cli_env(tmp_path), cwd=tmp_path, timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert expected in run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("loraops: error:")]
    assert len(errors) == 1 and expected in errors[0]


def test_missing_config_file_exits_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "loraops", "train", "--config", "nope.yaml"], capture_output=True, text=True, env=cli_env(tmp_path), cwd=tmp_path)
    assert run.returncode == 2 and "config file not found: nope.yaml" in run.stderr
