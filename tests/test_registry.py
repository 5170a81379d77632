"""The adapter registry against real files and a real database: SQLite always, PostgreSQL when
$LORAOPS_TEST_POSTGRES_URL names a server (``.ci/run`` starts one and sets it)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from loraops.errors import LoraopsError
from loraops.registry import IntegrityError, Lineage, PromotionRefused, Registry, data_fingerprint, lower_is_better
from loraops.registry import db as registry_db
from loraops.registry.store import ArtifactStore, manifest_digest


@pytest.fixture
def registry(db_url, tmp_path) -> Registry:
    return Registry(db_url=db_url, artifact_uri=str(tmp_path / "store"), workspace=tmp_path / "ws")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- registering and reading -------------------------------------------------------------------


def test_register_numbers_versions_and_records_the_run(make_run, registry, tmp_path):
    adapter = make_run(tmp_path / "run1", seed=1, rouge_l=35.0)
    first = registry.register(adapter, "summarizer", metrics={"custom": {"score": 0.5}}, description="first try")
    second = registry.register(make_run(tmp_path / "run2", seed=2), "summarizer")

    assert (first.version, second.version) == (1, 2)
    assert first.base_model == "builtin:tiny-phi"
    assert first.quantization["bnb_4bit_quant_type"] == "nf4"
    assert first.lora["r"] == 4
    assert first.hyperparameters["learning_rate"] == 1e-3
    assert first.metrics == {"eval_loss": 2.0, "rouge1": 40.0, "rouge2": 25.0, "rougeL": 35.0, "rougeLsum": 35.0, "custom.score": 0.5}
    assert first.data_source == "builtin"
    assert first.data_fingerprint == data_fingerprint({"source": "builtin", "builtin_size": 300})
    assert first.source_path == str(adapter)
    assert first.description == "first try"
    assert first.created_by
    assert set(first.files) == {"adapter_config.json", "adapter_model.safetensors"}
    for rel, entry in first.files.items():
        assert entry == {"sha256": sha256(adapter / rel), "size": (adapter / rel).stat().st_size}
    assert not list((tmp_path / "store" / "summarizer").glob(".staging-*"))


def test_checkpoint_folder_gets_its_own_eval_loss_and_no_optimizer_state(make_run, registry, tmp_path):
    import shutil

    adapter = make_run(tmp_path / "run", eval_losses=(2.5, 2.0, 2.2))
    checkpoint = adapter.parent / "checkpoint-30"
    shutil.copytree(adapter, checkpoint)
    (checkpoint / "trainer_state.pt").write_bytes(b"optimizer state")
    version = registry.register(checkpoint, "ckpt")
    assert version.metrics["eval_loss"] == 2.2  # step 30's, not the run's best
    assert set(version.files) == {"adapter_config.json", "adapter_model.safetensors"}


def test_list_get_and_versions(make_run, registry, tmp_path):
    registry.register(make_run(tmp_path / "a1", seed=1), "alpha")
    registry.register(make_run(tmp_path / "a2", seed=2), "alpha")
    registry.register(make_run(tmp_path / "b1", seed=3), "beta")
    registry.promote("alpha", 1, alias="staging")

    listing = {info.name: info for info in registry.list_adapters()}
    assert set(listing) == {"alpha", "beta"}
    assert (listing["alpha"].versions, listing["alpha"].latest_version, listing["alpha"].aliases) == (2, 2, {"staging": 1})
    assert registry.get("alpha").version == 2  # a bare name is the latest version
    assert registry.get("alpha:v1").version == 1
    staged = registry.get("alpha@staging")
    assert (staged.version, staged.aliases) == (1, ["staging"])
    assert [v.version for v in registry.versions("alpha")] == [1, 2]
    assert registry.adapter("beta").latest_version == 1


def test_unknown_names_versions_and_aliases_are_clear_errors(make_run, registry, tmp_path):
    registry.register(make_run(tmp_path / "run", seed=1), "known")
    with pytest.raises(LoraopsError, match=r"unknown adapter 'missing'; registered: known"):
        registry.get("missing")
    with pytest.raises(LoraopsError, match=r"known has no version 5 \(versions: 1..1\)"):
        registry.get("known:5")
    with pytest.raises(LoraopsError, match=r"known has no alias 'production'"):
        registry.resolve("known@production")
    with pytest.raises(LoraopsError, match="no version 9"):
        registry.promote("known", 9)
    with pytest.raises(LoraopsError, match="unknown adapter"):
        registry.rollback("missing")
    with pytest.raises(LoraopsError, match="unknown adapter"):
        registry.audit_log("missing")


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "a..b", ".hidden", "-dash", "a\\b", "x" * 129, "sp ace"])
def test_bad_names_are_rejected(make_run, bad, tmp_path):
    registry = Registry(db_url=f"sqlite:///{tmp_path / 'r.db'}", artifact_uri=str(tmp_path / "store"), workspace=tmp_path)
    adapter = make_run(tmp_path / "run")
    with pytest.raises(LoraopsError, match="invalid adapter name"):
        registry.register(adapter, bad)
    with pytest.raises(LoraopsError, match="invalid"):
        registry.get(bad)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_not_an_adapter_folder(registry, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraopsError, match="missing adapter_config.json, adapter_model.safetensors"):
        registry.register(tmp_path / "empty", "x")
    with pytest.raises(LoraopsError, match="adapter folder not found"):
        registry.register(tmp_path / "nowhere", "x")


# --- aliases -----------------------------------------------------------------------------------


def test_promote_if_better_rollback_and_audit(make_run, registry, tmp_path):
    for version, (loss, rouge_l) in enumerate([(2.0, 30.0), (1.5, 35.0), (1.8, 40.0)], start=1):
        registry.register(make_run(tmp_path / f"run{version}", seed=version, eval_losses=(loss,), rouge_l=rouge_l), "sum")

    assert registry.promote("sum", 1, reason="first", actor="alice").changed
    change = registry.promote("sum", 2, if_better="eval_loss", actor="bob")
    assert (change.previous, change.version) == (1, 2)

    with pytest.raises(PromotionRefused) as refused:
        registry.promote("sum", 3, if_better="eval_loss")  # 1.8 is not below 1.5
    assert "1.8" in str(refused.value) and "1.5" in str(refused.value) and "lower is better" in str(refused.value)
    assert registry.get("sum@production").version == 2
    with pytest.raises(PromotionRefused, match="has no such metric"):
        registry.promote("sum", 3, if_better="accuracy")
    with pytest.raises(PromotionRefused, match="30.*35|35.*30"):
        registry.promote("sum", 1, if_better="rougeL")  # higher is better for ROUGE
    with pytest.raises(PromotionRefused, match="lower is better"):
        registry.promote("sum", 3, if_better="rougeL", higher_is_better=False)  # the override wins
    assert registry.promote("sum", 3, if_better="rougeL").changed  # 40 > 35
    assert not registry.promote("sum", 3).changed  # already there: no audit entry

    assert registry.rollback("sum", reason="bad outputs").version == 2
    assert registry.rollback("sum").version == 1
    with pytest.raises(LoraopsError, match="no earlier target"):
        registry.rollback("sum")
    assert registry.get("sum@production").version == 1

    log = registry.audit_log("sum")
    assert [(e.action, e.from_version, e.to_version) for e in log] == [
        ("promote", None, 1), ("promote", 1, 2), ("promote", 2, 3), ("rollback", 3, 2), ("rollback", 2, 1),
    ]
    assert (log[0].actor, log[0].reason, log[1].actor, log[3].reason) == ("alice", "first", "bob", "bad outputs")
    assert all(e.actor for e in log) and all(e.alias == "production" for e in log)
    assert [e.at for e in log] == sorted(e.at for e in log)


def test_rollback_after_a_hand_moved_alias_returns_to_the_version_that_served(make_run, registry, tmp_path):
    """The alias row changed in the database by hand (no audit entry): the history decides, so the
    rollback returns to the version the log last put there (2), not the one before it (1)."""
    from sqlalchemy import text

    for seed in (1, 2, 3):
        registry.register(make_run(tmp_path / f"run{seed}", seed=seed), "hand")
    registry.promote("hand", 1)
    registry.promote("hand", 2)
    with registry.engine.begin() as connection:
        connection.execute(text("UPDATE registry_aliases SET version = 3 WHERE alias = 'production'"))
    assert registry.get("hand@production").version == 3

    change = registry.rollback("hand")
    assert (change.previous, change.version) == (3, 2)
    assert registry.rollback("hand").version == 1  # then on down the history, as usual
    with pytest.raises(LoraopsError, match="no earlier target"):
        registry.rollback("hand")
    assert [(e.action, e.from_version, e.to_version) for e in registry.audit_log("hand")] == [
        ("promote", None, 1), ("promote", 1, 2), ("rollback", 3, 2), ("rollback", 2, 1),
    ]


def test_aliases_are_independent(make_run, registry, tmp_path):
    registry.register(make_run(tmp_path / "r1", seed=1), "m")
    registry.register(make_run(tmp_path / "r2", seed=2), "m")
    registry.promote("m", 1, alias="staging")
    registry.promote("m", 2, alias="staging")
    registry.promote("m", 1)
    assert registry.rollback("m", alias="staging").version == 1
    assert registry.get("m@production").version == 1
    assert [e.alias for e in registry.audit_log("m", alias="staging")] == ["staging"] * 3
    with pytest.raises(LoraopsError, match="no earlier target"):
        registry.rollback("m")  # production was set once only


def test_metric_direction_by_name():
    assert lower_is_better("eval_loss") and lower_is_better("val_perplexity") and lower_is_better("Loss")
    assert not lower_is_better("rougeL") and not lower_is_better("accuracy")


# --- artifacts and integrity -------------------------------------------------------------------


def test_artifacts_are_copied_and_verified(make_run, registry, tmp_path):
    adapter = make_run(tmp_path / "run", seed=1)
    expected = (adapter / "adapter_model.safetensors").read_bytes()
    version = registry.register(adapter, "copied")
    for path in sorted((tmp_path / "run").rglob("*"), reverse=True):  # the experiment folder goes away
        path.unlink() if path.is_file() else path.rmdir()

    folder = registry.resolve("copied:1")
    assert (folder / "adapter_model.safetensors").read_bytes() == expected
    assert folder == tmp_path / "store" / "copied" / "v1"
    assert version.artifact_uri == str(folder)


def test_failed_registration_leaves_no_version_and_no_files(make_run, registry, tmp_path, monkeypatch):
    adapter = make_run(tmp_path / "run", seed=1)
    real_fields = Lineage.version_fields
    # A value the database cannot store makes the insert fail after the files reached v1/.
    monkeypatch.setattr(Lineage, "version_fields", lambda *a: real_fields(*a) | {"metrics": {"bad": object()}})
    with pytest.raises(Exception, match="JSON serializable"):
        registry.register(adapter, "fragile")
    assert list((tmp_path / "store" / "fragile").iterdir()) == []
    with pytest.raises(LoraopsError, match="has no versions yet"):
        registry.get("fragile")
    monkeypatch.undo()
    assert registry.register(adapter, "fragile").version == 1  # the number was given back


def test_tampered_or_missing_file_is_detected_on_resolve(make_run, registry, tmp_path):
    registry.register(make_run(tmp_path / "run", seed=1), "guarded")
    registry.promote("guarded", 1)
    stored = registry.resolve("guarded@production")
    weights = stored / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="checksum mismatch for file adapter_model.safetensors"):
        registry.resolve("guarded@production")
    (stored / "adapter_config.json").unlink()
    with pytest.raises(IntegrityError, match="adapter_config.json is missing"):
        registry.resolve("guarded:1")


def corrupt(path: Path) -> None:
    """Flip the last byte, as a disk or a hand behind the registry's back would."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_rehashes_the_stored_files_and_names_the_bad_one(make_run, registry, tmp_path):
    registry.register(make_run(tmp_path / "run", seed=1), "checked")
    assert registry.verify("checked:1").version == 1
    stored = tmp_path / "store" / "checked" / "v1"
    corrupt(stored / "adapter_model.safetensors")
    with pytest.raises(IntegrityError, match=r"checked:1 .*checksum mismatch for file adapter_model.safetensors"):
        registry.verify("checked")
    (stored / "adapter_config.json").unlink()
    with pytest.raises(IntegrityError, match="file adapter_config.json is missing"):
        registry.verify("checked:1")


def test_promote_and_rollback_refuse_a_corrupt_version(make_run, registry, tmp_path):
    for seed in (1, 2, 3):
        registry.register(make_run(tmp_path / f"run{seed}", seed=seed), "careful")
    registry.promote("careful", 1)
    registry.promote("careful", 2)
    corrupt(tmp_path / "store" / "careful" / "v3" / "adapter_model.safetensors")
    with pytest.raises(IntegrityError, match="refusing to promote careful:3 to production: .*checksum mismatch for file adapter_model.safetensors"):
        registry.promote("careful", 3)
    corrupt(tmp_path / "store" / "careful" / "v1" / "adapter_config.json")
    with pytest.raises(IntegrityError, match="refusing to roll back careful@production to version 1: .*adapter_config.json"):
        registry.rollback("careful")
    assert registry.get("careful@production").version == 2  # nothing moved,
    assert [(e.action, e.to_version) for e in registry.audit_log("careful")] == [("promote", 1), ("promote", 2)]  # nothing logged
    with pytest.raises(IntegrityError, match="refusing to promote careful:1 to staging"):
        registry.promote("careful", 1, alias="staging")


def test_remote_store_downloads_into_a_verified_cache(make_run, db_url, tmp_path):
    """A non-local pyarrow filesystem takes the download path (SubTreeFileSystem stands in for S3)."""
    import pyarrow.fs as pafs

    remote_root = tmp_path / "bucket"
    remote_root.mkdir()
    store = ArtifactStore("/", filesystem=pafs.SubTreeFileSystem(str(remote_root), pafs.LocalFileSystem()))
    assert not store.is_local
    registry = Registry(db_url=db_url, workspace=tmp_path / "ws", store=store)
    registry.register(make_run(tmp_path / "run", seed=1), "remote")

    cached = registry.resolve("remote:1")
    assert cached == tmp_path / "ws" / "cache" / "registry" / f"sha256-{manifest_digest(registry.get('remote:1').files)}"
    assert sha256(cached / "adapter_model.safetensors") == sha256(remote_root / "remote" / "v1" / "adapter_model.safetensors")
    (cached / "adapter_config.json").write_text("{}")  # a damaged cache is fetched again
    assert json.loads((registry.resolve("remote:1") / "adapter_config.json").read_text())["r"] == 4
    assert registry.verify("remote:1").version == 1
    (remote_root / "remote" / "v1" / "adapter_model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(IntegrityError, match="checksum mismatch for file adapter_model.safetensors"):
        registry.verify("remote:1")  # the store itself is read, not the intact cache
    import shutil

    shutil.rmtree(cached)
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        registry.resolve("remote:1")


def test_object_store_without_folder_rename(make_run, tmp_path):
    """Object stores (S3, GCS) cannot rename a folder: publishing moves file by file instead."""
    import fsspec
    import pyarrow.fs as pafs

    memory = fsspec.filesystem("memory")

    class ObjectStoreHandler(pafs.FSSpecHandler):
        def move(self, src, dest):
            if memory.isdir(src):
                raise OSError("move of directories is not supported")
            return super().move(src, dest)

    root = f"/bucket-{uuid.uuid4().hex}"
    store = ArtifactStore(root, filesystem=pafs.PyFileSystem(ObjectStoreHandler(memory)))
    registry = Registry(db_url=f"sqlite:///{tmp_path / 'r.db'}", workspace=tmp_path / "ws", store=store)
    version = registry.register(make_run(tmp_path / "run", seed=1), "objects")
    assert sorted(memory.find(root)) == [f"{root}/objects/v1/adapter_config.json", f"{root}/objects/v1/adapter_model.safetensors"]
    assert version.artifact_uri == f"{root}/objects/v1"
    assert (registry.resolve("objects:1") / "adapter_config.json").is_file()


# --- experiments and data ----------------------------------------------------------------------


def test_register_from_experiment(make_run, registry, tmp_path):
    experiment = tmp_path / "exp"
    adapter = make_run(experiment / "trial_0003", seed=3, eval_losses=(1.9,))
    config = yaml.safe_load((adapter.parent / "config.yaml").read_text())
    config["training"]["learning_rate"] = 3e-4
    best = {
        "trial_id": "a1b2_00003",
        "experiment": "dialogsum-search",
        "adapter_path": "trial_0003/adapter",  # relative to the experiment folder
        "config": config,
        "metrics": {"eval_loss": 1.7, "training_iteration": 3, "date": "2026-01-01"},
        "params": {"training.learning_rate": 3e-4, "lora.r": 4},
    }
    (experiment / "best_trial.json").write_text(json.dumps(best))

    version = registry.register_from_experiment(experiment, "searched", metrics='{"rougeL": 41.0}')
    assert (version.experiment, version.trial_id) == ("dialogsum-search", "a1b2_00003")
    assert version.metrics == {"eval_loss": 1.7, "training_iteration": 3, "rougeL": 41.0}
    assert version.hyperparameters == {"training.learning_rate": 3e-4, "lora.r": 4}
    assert version.source_path == str(adapter)

    (tmp_path / "unfinished").mkdir()
    with pytest.raises(LoraopsError, match="best_trial.json not found"):
        registry.register_from_experiment(tmp_path / "unfinished", "x")


def test_best_trial_json_is_one_record_for_the_search_and_the_registry(tmp_path):
    """tune writes best_trial.json with BestTrial.to_json, the registry reads it with from_json: the same record back;
    a field of the wrong type reads as missing (older files), a file naming no adapter is one error naming the file."""
    from loraops.layout import BestTrial

    record = BestTrial("a1_00001", "exp", str(tmp_path / "exp"), str(tmp_path / "a"), "trial_1/checkpoint_000001", {"name": "x"},
                       {"eval_loss": 1.5, "step": 20}, "eval_loss", {"lora.r": 8})  # fmt: skip
    assert BestTrial.from_json(record.to_json(), "best_trial.json") == record
    assert json.loads(record.to_json())["checkpoint"] == "trial_1/checkpoint_000001"  # the file's keys are the fields
    old = BestTrial.from_json(json.dumps({"trial_id": 7, "adapter_path": "a", "config": "not a dict", "metrics": None}), "old.json")
    assert (old.trial_id, old.config, old.metrics, old.checkpoint) == ("7", None, {}, None)
    for text, message in [("{", "invalid JSON"), ('{"trial_id": "x"}', "expected an object with at least 'adapter_path'"), ("[]", "expected an object")]:
        with pytest.raises(LoraopsError, match=f"^somewhere/best_trial.json: {re.escape(message)}"):
            BestTrial.from_json(text, "somewhere/best_trial.json")


def test_user_metrics_must_be_numbers(make_run, registry, tmp_path):
    with pytest.raises(LoraopsError, match="metric 'note' must be a finite number"):
        registry.register(make_run(tmp_path / "run"), "x", metrics={"note": "good"})
    with pytest.raises(LoraopsError, match="neither a JSON object nor an existing file"):
        registry.register(make_run(tmp_path / "run2"), "x", metrics="nope.json")


# --- concurrency -------------------------------------------------------------------------------

_WORKER = """
import json, sys, time
from pathlib import Path
from loraops.registry import Registry
db_url, store, workspace, adapter, flags = sys.argv[1:6]
registry = Registry(db_url=db_url, artifact_uri=store, workspace=workspace)
registry.list_adapters()  # connect and create tables before the start line
Path(flags, f"ready-{Path(adapter).parent.name}").touch()
while not Path(flags, "go").exists():
    time.sleep(0.01)
print(json.dumps({"version": registry.register(adapter, "racer").version}))
"""


def test_concurrent_registrations_get_consecutive_versions(cli_env, make_run, db_url, tmp_path):
    count = 8
    flags = tmp_path / "flags"
    flags.mkdir()
    adapters = [make_run(tmp_path / f"run{i}", seed=i) for i in range(count)]
    env = cli_env(tmp_path / "ws")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, db_url, str(tmp_path / "store"), str(tmp_path / "ws"), str(a), str(flags)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for a in adapters
    ]
    deadline = time.monotonic() + 60
    while len(list(flags.glob("ready-*"))) < count and time.monotonic() < deadline and all(w.poll() is None for w in workers):
        time.sleep(0.05)
    (flags / "go").touch()  # all start registering at the same moment
    results = [w.communicate(timeout=120) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err for _, err in results]

    versions = sorted(json.loads(out)["version"] for out, _ in results)
    assert versions == list(range(1, count + 1))
    registry = Registry(db_url=db_url, artifact_uri=str(tmp_path / "store"), workspace=tmp_path / "ws")
    by_source = {v.source_path: v for v in registry.versions("racer")}
    assert set(by_source) == {str(a) for a in adapters}
    for adapter, version in ((a, by_source[str(a)]) for a in adapters):
        assert version.files["adapter_model.safetensors"]["sha256"] == sha256(adapter / "adapter_model.safetensors")
        assert registry.resolve(version.ref) == tmp_path / "store" / "racer" / f"v{version.version}"
    assert sorted(p.name for p in (tmp_path / "store" / "racer").iterdir()) == sorted(f"v{n}" for n in range(1, count + 1))


# --- command line ------------------------------------------------------------------------------


@pytest.mark.slow
def test_registry_keeps_the_training_config_and_upgrades_old_databases(serving_home, tmp_path):
    from sqlalchemy import create_engine, text

    from loraops.registry import Registry

    url = f"sqlite:///{tmp_path / 'old.db'}"
    Registry(db_url=url, artifact_uri=str(tmp_path / "store"), workspace=serving_home).list_adapters()  # creates the tables
    registry_db.dispose_engine(url)
    old = create_engine(url)
    with old.begin() as connection:  # the schema before the config column existed
        connection.execute(text("ALTER TABLE registry_versions DROP COLUMN config"))
    old.dispose()

    registry = Registry(db_url=url, artifact_uri=str(tmp_path / "store"), workspace=serving_home)
    version = registry.register(serving_home / "runs" / "serve-test" / "checkpoint-6", "upgraded")

    assert registry.get("upgraded:1").config == version.config
    assert version.config["model"]["name"] == "builtin:tiny-phi"
    assert version.config["data"]["prompt_template"].startswith("Instruct:")
    registry_db.dispose_engine(url)


def test_a_bare_name_means_what_its_reader_says():
    """One Ref type: the registry and the CLI read a bare NAME as the latest version, serving as NAME@production."""
    from loraops.registry.refs import Bare, Ref, normalize_ref, parse_ref

    assert Ref.parse("tiny", bare=Bare.LATEST) == Ref("tiny") and Ref("tiny").latest and str(Ref("tiny")) == "tiny"
    assert Ref.parse("tiny", bare=Bare.DEFAULT_ALIAS) == Ref("tiny", alias="production")
    pinned = Ref.parse("tiny:v3", bare=Bare.DEFAULT_ALIAS)
    assert pinned == Ref("tiny", version=3) and pinned.pinned and str(pinned) == "tiny:3"
    assert str(Ref.parse("tiny@staging", bare=Bare.LATEST)) == "tiny@staging"
    assert normalize_ref("tiny") == "tiny@production" and normalize_ref("tiny:v3") == "tiny:v3"  # serving keeps what was written
    assert parse_ref("tiny") == ("tiny", None, None)
    with pytest.raises(TypeError):
        Ref.parse("tiny")  # every caller says what a bare name means


def test_the_search_and_promotion_read_one_direction_table_and_urls_are_masked_once():
    from loraops import config
    from loraops.metrics import lower_is_better, mode_of
    from loraops.registry import db
    from loraops.tune import experiment, trainable

    assert (mode_of("eval_loss"), mode_of("rougeL")) == ("min", "max")
    assert mode_of(trainable.METRIC) == trainable.MODE and lower_is_better("eval_loss")
    assert db.display_url is config.display_url and experiment.display_url is config.display_url
    assert config.display_url("postgresql://loraops:secret@db.example/loraops") == "postgresql://loraops:***@db.example/loraops"
