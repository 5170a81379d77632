"""torch threads of the processes loraops starts: the CPUs Ray reserved for them, never more than the
machine has (two torch processes that each take every core of a small machine slow each other 10x)."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.ray


def test_threads_are_the_whole_reserved_cpus_capped_at_the_machine():
    from loraops.training.model import cpu_threads

    machine = os.cpu_count()
    assert cpu_threads(0.25) == 1 and cpu_threads(1) == 1 and cpu_threads(None) == machine
    assert cpu_threads(machine + 64) == machine


def test_a_ray_worker_takes_the_cpus_ray_gave_it_not_what_the_environment_says(ray_address):
    """A cluster-wide OMP_NUM_THREADS=64 (or a node declaring more CPUs than cores) must not give a
    1-CPU replica or trial 64 threads."""
    import ray

    @ray.remote(num_cpus=1, runtime_env={"env_vars": {"OMP_NUM_THREADS": "64"}})
    def threads() -> tuple[int | None, int]:
        import torch

        from loraops.training.model import use_reserved_cpus

        return use_reserved_cpus(), torch.get_num_threads()

    assert ray.get(threads.remote(), timeout=300) == (1, 1)
