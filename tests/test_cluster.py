"""The one Ray helper (:mod:`loraops.cluster`): join what is there, leave a caller's Ray running, stop on Ctrl-C."""

from __future__ import annotations

import pytest

from loraops import cluster


def test_the_address_is_the_argument_else_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster.cluster_address("10.0.0.2:6379") == "10.0.0.2:6379"
    assert cluster.cluster_address(None) == "10.0.0.1:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster.cluster_address(None) is None


@pytest.mark.ray
def test_a_connected_process_is_left_as_it_is(ray_address):
    import ray

    owned = cluster.connect(num_cpus=64)  # already connected: no new instance, the option is unused
    with cluster.session() as owned_in_block:
        assert ray.is_initialized()
    cluster.shutdown(owned)
    assert (owned, owned_in_block) == (False, False)
    assert ray.is_initialized(), "the session's Ray must survive a helper that did not start it"
    assert ray.cluster_resources()["CPU"] == 2


def test_wait_until_interrupted_returns_on_ctrl_c(monkeypatch, capsys):
    def interrupted(_seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster.time, "sleep", interrupted)
    cluster.wait_until_interrupted("serving; press Ctrl-C to stop")
    assert capsys.readouterr().out.splitlines() == ["serving; press Ctrl-C to stop", "shutting down"]
