"""`loraops demo`: the main job on the embedded default, start to finish, on any machine."""

from __future__ import annotations

import logging
from pathlib import Path

from loraops.config import load_config
from loraops.errors import LoraopsError

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("tune") / "tiny.yaml"


def run_demo(config_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Train the tiny model's adapter, evaluate base vs tuned, print the ROUGE table."""
    from loraops.evaluate import evaluate, format_report
    from loraops.train import train

    path = Path(config_path) if config_path else DEFAULT_CONFIG
    if not path.is_file():
        raise LoraopsError(f"demo config not found: {path} (run from the repository root or pass --config)")
    config = load_config(path, overrides)
    print(f"== loraops demo: QLoRA on {config.model.name}, data {config.data.source}, workspace {config.workspace_path}")
    result = train(config)
    print(f"== trained: best eval loss {result.best_eval_loss:.4f} at step {result.best_step}; loss curve {result.plot_file}")
    report = evaluate(config, adapter=result.adapter_dir)
    print(format_report(report))
    example = report["examples"][0]
    print("\n== one held-out dialogue")
    print(example["dialogue"])
    print(f"-- reference: {example['references'][0]}")
    print(f"-- base:      {example.get('base', '')}")
    print(f"-- tuned:     {example['tuned']}")
    print(f"\nreport: {report['report_file']}\nrun folder: {result.output_dir}")
    return report
