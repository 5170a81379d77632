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
    from loraops import console

    config = load_config(args)
    # A config error is one line before anything starts; then the libraries' logs and warnings
    # (bitsandbytes', torch's) go to the log file, as for tune, from before they are imported.
    console.start_log(config.workspace_path, "train", args.verbose)
    from loraops.training.train import run_dir, train

    folder = run_dir(config, args.output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # before any data or model is loaded
        raise LoraopsError(f"cannot create the run folder {folder}: {exc.strerror}") from None
    result = train(config, output_dir=folder)
    print(f"adapter: {result.adapter_dir}")
    print(f"best eval loss: {result.best_eval_loss:.4f} (step {result.best_step}); metrics: {result.metrics_file}")
    return 0
