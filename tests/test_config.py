from pathlib import Path

import pytest

from loraops.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]

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




@pytest.mark.parametrize("bad", ["a..b", "-dash", "x" * 129, "a/b", "sp ace"])
def test_config_names_follow_the_one_name_rule(bad):
    """A config name becomes a run folder, an experiment and an adapter name: the registry's rule."""
    from loraops.layout import NAME_RULE, is_valid_name

    with pytest.raises(ConfigError, match=r": name: .*1-128 characters"):
        load_config(REPO / "tune" / "tiny.yaml", [f"name={bad}"])
    assert not is_valid_name(bad) and "1-128 characters" in NAME_RULE
    assert load_config(REPO / "tune" / "tiny.yaml", ["name=phi2-dialogsum.v2_a"]).name == "phi2-dialogsum.v2_a"


@pytest.mark.parametrize(
    ("given", "resolved"),
    [
        ("postgresql://u:pw@db.example/loraops", "postgresql+psycopg2://u:pw@db.example/loraops"),
        ("postgres://u@db.example:5433/loraops", "postgresql+psycopg2://u@db.example:5433/loraops"),
        ("postgresql+psycopg2://u@db/x", "postgresql+psycopg2://u@db/x"),
        ("sqlite:////tmp/loraops.db", "sqlite:////tmp/loraops.db"),
    ],
)
def test_postgresql_urls_get_the_installed_driver(given, resolved, monkeypatch):
    from loraops.config import DATABASE_ENV, database_url

    assert database_url(given) == resolved
    monkeypatch.setenv(DATABASE_ENV, given)
    assert database_url() == resolved


def test_set_reaches_an_entry_of_the_search_space():
    """Search-space keys are dotted config keys themselves: --set addresses them like any other key."""
    overrides = ["search.space.lora.dropout={uniform: [0.0, 0.2]}", "search.space.training.warmup_steps={choice: [0, 5]}"]
    config = load_config(REPO / "tune" / "tiny.yaml", overrides)

    assert config.search.space["lora.dropout"].uniform == (0.0, 0.2)
    assert config.search.space["training.warmup_steps"].choice == [0, 5]
    assert "lora" not in config.search.space
