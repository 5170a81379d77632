"""``loraops train``: one QLoRA fine-tuning run."""

from __future__ import annotations

import argparse

from loraops.commands.common import SubParsers, add_config_arguments, load_config


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
    from loraops.train import train

    result = train(load_config(args), output_dir=args.output_dir)
    print(f"adapter: {result.adapter_dir}")
    print(f"best eval loss: {result.best_eval_loss:.4f} (step {result.best_step}); metrics: {result.metrics_file}")
    return 0
