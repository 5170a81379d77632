"""``loraops train``: one QLoRA fine-tuning run."""

from __future__ import annotations

import argparse

from loraops.commands.common import SubParsers, add_config_arguments, load_config
from loraops.errors import LoraopsError


def add_commands(sub: SubParsers) -> None:
    """Add ``train``."""
    parser = sub.add_parser(
        "train",
        help="run one QLoRA fine-tuning run",
        description="Fine-tune one LoRA adapter on a 4-bit base model. Writes adapter checkpoints "
        "(PEFT format), metrics.jsonl and loss.png into the run folder.",
    )
    add_config_arguments(parser)
    parser.add_argument("--output-dir", metavar="DIR", help="run folder (default: WORKSPACE/runs/NAME)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from loraops.training.train import run_dir, train

    config = load_config(args)
    folder = run_dir(config, args.output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # before any data or model is loaded
        raise LoraopsError(f"cannot create the run folder {folder}: {exc.strerror}") from None
    result = train(config, output_dir=folder)
    print(f"adapter: {result.adapter_dir}")
    print(f"best eval loss: {result.best_eval_loss:.4f} (step {result.best_step}); metrics: {result.metrics_file}")
    return 0
