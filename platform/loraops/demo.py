"""`loraops demo`: the whole loop on the embedded default, on any machine, in one command.

search (Ray Tune + Optuna, ASHA) -> register the best trial -> promote it to production ->
serve it (Ray Serve, autoscaling) -> call the endpoint over HTTP with held-out dialogues ->
base vs tuned summaries side by side and the ROUGE gain.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from loraops import cluster, console
from loraops.config import Config, load_config
from loraops.errors import LoraopsError
from loraops.registry.refs import DEFAULT_ALIAS

log = logging.getLogger(__name__)

DEFAULT_TUNE_CONFIG = Path("tune") / "tiny.yaml"
DEFAULT_SERVE_CONFIG = Path("serve") / "tiny.yaml"
ADAPTER_NAME = "tiny"


@dataclass
class DemoResult:
    experiment: str
    version: int
    promoted: bool
    url: str
    base_rouge: dict[str, float]
    tuned_rouge: dict[str, float]
    served_versions: set[int]


def run_demo(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    serve_config_path: str | None = None,
    serve_overrides: list[str] | None = None,
    samples: int = 40,
    keep_serving: bool = False,
    verbose: bool = False,
) -> DemoResult:
    """Search, register, promote, serve and call the endpoint; print what happened and where.
    Logs go to WORKSPACE/logs/demo-*.log; ``verbose`` shows them on the terminal too."""
    config = load_config(_existing(config_path, DEFAULT_TUNE_CONFIG), overrides)
    serve_path = _existing(serve_config_path, DEFAULT_SERVE_CONFIG)
    started = time.perf_counter()
    _banner(f"loraops demo: {config.model.name} on {config.data.source}; workspace {config.workspace_path}")
    log_file = console.start_log(config.workspace_path, "demo", verbose)

    # Join the Ray instance a caller (or RAY_ADDRESS) provides; else start one and stop it after.
    own_ray = cluster.connect(num_cpus=os.cpu_count() or 2, configure_logging=False, log_to_driver=verbose)
    try:
        outcome = _search(config, verbose)
        version, promoted = _register_and_promote(config, outcome)
        url = _serve(config, serve_path, serve_overrides)
        result = _compare(config, outcome, version, promoted, url, samples)
        _where(config, outcome, url, started, log_file)
        if keep_serving:
            _wait_forever(url)
        return result
    finally:
        with console.printed_to_log(not verbose):  # Ray prints Serve's shutdown errors to stdout
            _shutdown(own_ray)


def _existing(path: str | None, default: Path) -> Path:
    chosen = Path(path) if path else default
    if not chosen.is_file():
        raise LoraopsError(f"config not found: {chosen} (run from the repository root or pass the path)")
    return chosen


# --- the steps ---------------------------------------------------------------------------------


def _search(config: Config, verbose: bool):
    from loraops.tune.experiment import run_experiment
    from loraops.tune.results import best_line, format_table, summary_line

    name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    _banner(f"1/4 search: {config.search.num_samples} QLoRA trials, {config.search.max_concurrent_trials} at a time (Optuna TPE + ASHA)")
    outcome = run_experiment(config, name=name, worker_logs=verbose)
    print()
    print(format_table(outcome.rows))
    print(summary_line(outcome.rows))
    if not outcome.best:
        raise LoraopsError(f"the search {outcome.location.uri} finished without a usable trial")
    print(f"best trial {best_line(outcome.best)}")
    return outcome


def _register_and_promote(config: Config, outcome) -> tuple[int, bool]:
    from loraops.registry import PromotionRefused, Registry

    _banner("2/4 register the best trial and promote it to production")
    registry = Registry(workspace=config.workspace_path)
    version = registry.register_from_experiment(outcome.location.uri, ADAPTER_NAME)
    print(f"registered {ADAPTER_NAME}:{version.version} (sha256-checked copy in the registry)")
    try:
        metric = config.search.metric  # the search's selection metric, with its direction
        registry.promote(ADAPTER_NAME, version.version, alias=DEFAULT_ALIAS, if_better=metric, reason="loraops demo: best trial of the search")
        print(f"promoted {ADAPTER_NAME}:{version.version} to {ADAPTER_NAME}@{DEFAULT_ALIAS}")
        return version.version, True
    except PromotionRefused as refused:
        # An earlier demo left a better production version: it stays, and is what gets served.
        print(f"kept the current production version: {refused}")
        return registry.get(f"{ADAPTER_NAME}@{DEFAULT_ALIAS}").version, False


def _serve(config: Config, serve_path: Path, overrides: list[str] | None) -> str:
    from loraops.serve.deploy import deploy
    from loraops.serve.settings import load_serve_config

    _banner("3/4 serve the production adapter (Ray Serve, autoscaling)")
    adapter = f"args.adapter={ADAPTER_NAME}@{DEFAULT_ALIAS}"
    serve_config = load_serve_config(serve_path, [adapter, f"args.workspace={config.workspace_path}", *(overrides or [])])
    url = deploy(serve_config)
    print(f"serving at {url} (API docs: {url}/docs)")
    return url


def _compare(config: Config, outcome, version: int, promoted: bool, url: str, samples: int) -> DemoResult:
    """Tuned summaries over HTTP from the endpoint, base summaries from the base model in-process."""
    from loraops.serve.client import SummarizerClient
    from loraops.training.evaluate import evaluation_examples, generate_summaries, rouge
    from loraops.training.model import load_for_inference

    _banner(f"4/4 call the endpoint with {samples} held-out dialogues over HTTP")
    served_config = Config.model_validate(outcome.best.config) if promoted else config
    examples = evaluation_examples(served_config)[:samples]
    dialogues = [example.dialogue for example in examples]
    references = [example.references for example in examples]
    with SummarizerClient(url) as client:
        # Requests of a few dialogues each, as an app would send them; the replicas batch them.
        answers = [answer for start in range(0, len(dialogues), 8) for answer in client.summarize_batch(dialogues[start:start + 8])]
    tuned = [answer["summary"] for answer in answers]
    versions = {answer["model"]["version"] for answer in answers}
    base_model, tokenizer = load_for_inference(served_config)
    base = generate_summaries(base_model, tokenizer, dialogues, served_config, progress=False)
    base_scores, tuned_scores = rouge(base, references), rouge(tuned, references)
    for example, before, after in list(zip(examples, base, tuned, strict=True))[:3]:
        print(f"\n{_excerpt(example.dialogue)}\n  reference: {_one_line(example.references[0])}")
        print(f"  base:      {_one_line(before)}\n  tuned:     {_one_line(after)}")
    print(f"\nROUGE on {len(examples)} held-out dialogues (F1 x 100); tuned = {ADAPTER_NAME}:{sorted(versions)} over HTTP")
    print(f"{'metric':<10}{'base':>10}{'tuned':>10}{'gain':>10}")
    for kind in base_scores:
        print(f"{kind:<10}{base_scores[kind]:>10.2f}{tuned_scores[kind]:>10.2f}{tuned_scores[kind] - base_scores[kind]:>+10.2f}")
    return DemoResult(outcome.location.uri, version, promoted, url, base_scores, tuned_scores, versions)


def _where(config: Config, outcome, url: str, started: float, log_file: Path) -> None:
    from loraops.config import artifact_uri, database_url
    from loraops.layout import BEST_TRIAL_FILE, RESULTS_FILE, SEARCH_PLOT_FILE

    _banner(f"done in {time.perf_counter() - started:.0f} s; where things are")
    rows = [
        ("results table", outcome.folder / RESULTS_FILE),
        ("search plot", outcome.folder / SEARCH_PLOT_FILE),
        ("best trial", outcome.folder / BEST_TRIAL_FILE),
        ("experiment (Tune)", outcome.location.uri),
        ("registry database", database_url(workspace=config.workspace_path)),
        ("registry artifacts", artifact_uri(workspace=config.workspace_path)),
        ("log file", log_file),
        ("Ray logs", "/tmp/ray/session_latest/logs"),
        ("endpoint", url),
    ]
    for label, value in rows:
        print(f"  {label:<20}{value}")


def _wait_forever(url: str) -> None:
    cluster.wait_until_interrupted(
        f"\nthe endpoint stays up; try:\n  curl -s -X POST {url}/v1/summarize -H 'Content-Type: application/json' "
        "-d '{\"dialogue\": \"#Person1#: Can I book a table for two on Friday at 7:00?\\n#Person2#: Yes, see you on Friday.\"}'\n"
        "press Ctrl-C to stop"
    )


def _shutdown(own_ray: bool) -> None:
    try:
        from ray import serve

        serve.shutdown()
    except Exception as exc:  # noqa: BLE001 - shutting down whatever is there; never mask the real error
        log.debug("serve shutdown: %s", exc)
    cluster.shutdown(own_ray)


def _excerpt(dialogue: str, turns: int = 8) -> str:
    """The first ``turns`` turns of a dialogue and how many more there are (the whole output of
    the demo fits on about two screens)."""
    lines = dialogue.splitlines()
    return "\n".join(lines[:turns] + ([f"  ... {len(lines) - turns} more turns"] if len(lines) > turns else []))


def _one_line(text: str) -> str:
    """A summary on one line (an untuned model may continue the dialogue instead)."""
    return " / ".join(line.strip() for line in text.splitlines() if line.strip())


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)

