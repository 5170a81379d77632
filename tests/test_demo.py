"""The whole loop end to end at a minimal budget: search -> register -> promote -> serve -> HTTP."""

import socket

from conftest import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


MINIMAL = [
    "data.builtin_size=200",
    "training.max_steps=40",
    "training.eval_steps=20",
    "training.logging_steps=10",
    "training.eval_max_samples=16",
    "search.num_samples=2",
    "search.max_concurrent_trials=2",
    "search.scheduler.type=fifo",
    "evaluation.max_new_tokens=32",
]


def test_demo_runs_the_whole_loop(ray_address, workspace, capsys):
    from loraops.demo import run_demo
    from loraops.layout import RESULTS_FILE
    from loraops.registry import Registry

    result = run_demo(
        config_path=str(REPO / "tune" / "tiny.yaml"),
        overrides=MINIMAL,
        serve_config_path=str(REPO / "serve" / "tiny.yaml"),
        serve_overrides=[f"http_options.port={free_port()}", "deployments.SummarizerModel.autoscaling_config.max_replicas=1"],
        samples=8,
    )
    out = capsys.readouterr().out
    assert result.version == 1 and result.promoted
    assert result.served_versions == {1}, "every HTTP answer comes from the promoted version"
    assert Registry(workspace=workspace).get("tiny@production").version == 1
    assert result.tuned_rouge["rougeL"] > result.base_rouge["rougeL"], (result.base_rouge, result.tuned_rouge)
    assert (workspace / "experiments").is_dir() and any(workspace.glob(f"experiments/*/{RESULTS_FILE}"))
    for step in ("1/4 search", "2/4 register", "3/4 serve", "4/4 call the endpoint", "results table", "endpoint"):
        assert step in out
