"""Adapters loaded on demand (:mod:`loraops.serve.on_demand`): any registered version a request names is
served, loaded on first use, kept in a per-replica LRU by Ray Serve's model multiplexing.

The in-process tests check the allow-list, the settings and the lease's reference count. One real
Serve application (2 model replicas, ``max_adapters: 3``, 8 registered versions from two adapter
files) takes the rest: answers per version equal to that version served alone, evictions, one load
for a burst of first requests, refused references, a corrupted version, a promotion.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import helpers
from helpers import wait_until

DIALOGUE = "#Person1#: Are you coming to the picnic on Sunday?\n#Person2#: Yes, I will bring some water and fruit."
TOKENS = 16
#: The 8 versions the application serves: the default tiny@production (tiny:1) and 7 on demand,
#: registered from the two checkpoints of the serving_home run (checkpoint-6 is tiny:1's file, checkpoint-12 tiny:2's).
ON_DEMAND = {"tiny:2": 12, "od-a:1": 6, "od-b:1": 12, "od-c:1": 6, "od-d:1": 12, "od-e:1": 6, "od-f:1": 12}


# --- in-process: allow-list, settings, leases ------------------------------------------------------


def test_the_allow_list_takes_names_and_prefix_patterns():
    from loraops.serve.on_demand import allowed

    assert allowed("anything", None)
    assert allowed("team-a", ["team-*"]) and allowed("tiny", ["team-*", "tiny"])
    assert not allowed("tiny2", ["tiny"]) and not allowed("other", ["team-*"])


def test_on_demand_settings_are_checked_and_name_the_key():
    from loraops.config import ConfigError
    from loraops.serve.settings import validate_settings

    assert validate_settings({"load_on_demand": True, "on_demand_names": ["od-*"]}).on_demand_names == ["od-*"]
    assert validate_settings({}).load_on_demand is False
    with pytest.raises(ConfigError, match="load_on_demand: max_adapters \\(1\\) leaves no room"):
        validate_settings({"load_on_demand": True, "max_adapters": 1})
    with pytest.raises(ConfigError, match="on_demand_names: set load_on_demand: true"):
        validate_settings({"on_demand_names": ["od-*"]})
    with pytest.raises(ConfigError, match="on_demand_names.0: .*prefix pattern"):
        validate_settings({"load_on_demand": True, "on_demand_names": ["../x"]})


def test_a_lease_unloads_its_adapter_on_eviction_only_after_its_last_row():
    from loraops.errors import LoraopsError
    from loraops.serve.on_demand import Lease

    async def scenario() -> tuple[list, list]:
        unloaded: list[str] = []

        async def unload(ref: str) -> None:
            unloaded.append(ref)

        loop = asyncio.get_running_loop()
        busy, idle = Lease("a:1", unload, loop), Lease("b:1", unload, loop)
        busy.acquire()
        busy.acquire()
        # Serve evicts from an executor thread and waits for the unload: the idle one goes at once.
        await loop.run_in_executor(None, busy.__del__)
        await loop.run_in_executor(None, idle.__del__)
        seen = [list(unloaded)]
        busy.release()  # one row left: still loaded
        await asyncio.sleep(0)
        seen.append(list(unloaded))
        await loop.run_in_executor(None, busy.release)  # the last row ends on the engine's thread
        await wait_for(lambda: "a:1" in unloaded)
        busy.__del__()  # the garbage collector's call: nothing more
        with pytest.raises(LoraopsError, match="unloaded"):
            busy.acquire()
        return seen, unloaded

    seen, unloaded = asyncio.run(scenario())
    assert seen == [["b:1"], ["b:1"]]
    assert unloaded == ["b:1", "a:1"]


def test_the_board_lists_replicas_that_beat_and_drops_those_that_stopped():
    """/v1/models' ``replicas`` (:mod:`loraops.serve.replica_board`): a replica silent for STALE_POLLS of its polls is dropped;
    the answering replica's own state, current, replaces what it last published."""
    from loraops.serve.replica_board import MIN_STALE_S, STALE_POLLS, Board, listing

    now = [0.0]
    board = Board(clock=lambda: now[0])
    board.publish("r1", {"resident": ["a:1"], "evictions": 0}, poll_s=2.0)
    board.publish("r2", {"resident": [], "evictions": 0}, poll_s=0.0)  # watching off: it still beats every second
    now[0] = MIN_STALE_S + 0.5
    assert [(r["replica"], r["seen_s_ago"]) for r in board.read()] == [("r1", MIN_STALE_S + 0.5)]  # r2 stopped
    now[0] = STALE_POLLS * 2.0 + 0.5
    assert board.read() == []
    board.publish("r1", {"resident": ["a:1"], "evictions": 0}, poll_s=2.0)
    board.publish("r3", {"resident": ["b:1"], "evictions": 1}, poll_s=2.0)
    merged = listing(board.read(), "r1", {"resident": ["c:1"], "evictions": 1})
    assert [(r["replica"], r["resident"], r["seen_s_ago"]) for r in merged] == [("r1", ["c:1"], 0.0), ("r3", ["b:1"], 0.0)]
    assert listing(None, "r1", {"resident": []}) == [{"replica": "r1", "seen_s_ago": 0.0, "resident": []}]  # board unreadable


def test_a_reference_asked_for_again_while_its_evicted_lease_runs_stays_loaded_until_its_last_lease_ends(serving_home):
    """Serve evicts a lease with a row running, then a request asks for the reference again: the loader hands out a
    second lease of the same loaded adapter, and the first one's end must not unload it under the second."""
    import contextlib

    from loraops.registry import Registry
    from loraops.serve.adapters import AdapterSet
    from loraops.serve.on_demand import OnDemand
    from loraops.serve.settings import validate_settings

    settings = validate_settings({"workspace": str(serving_home), "load_on_demand": True, "max_adapters": 3})
    registry = Registry(workspace=serving_home)
    adapters = AdapterSet(registry, settings)
    adapters.load("tiny@production")

    async def change(fn):
        return await asyncio.to_thread(fn)

    async def scenario() -> list[list[str]]:
        on_demand = OnDemand(settings, registry, adapters, change, lambda adding: contextlib.nullcontext())
        seen = []
        first = await on_demand.load("tiny:2")
        first.acquire()  # a row of it runs
        await asyncio.to_thread(first.__del__)  # Serve's LRU evicts it (from an executor thread): the row keeps it
        second = await on_demand.load("tiny:2")  # asked for again: Serve calls the loader
        second.acquire()
        await asyncio.to_thread(first.release)  # the first lease's last row ends (on the engine's thread)
        await wait_for(lambda: on_demand.evictions == 1)
        seen.append(adapters.refs())
        second.release()
        await asyncio.to_thread(second.__del__)  # the last lease goes: now the adapter does
        seen.append(adapters.refs())
        return seen

    assert asyncio.run(scenario()) == [["tiny@production", "tiny:2"], ["tiny@production"]]


def test_an_adapter_added_between_steps_keeps_the_running_rows(serving_home):
    """The engine's between_steps(): the running pass ends, the rows stay (not drained), and they go on after it."""
    import threading

    from loraops.generate import generate_completions
    from loraops.registry import Registry
    from loraops.serve.engine.buckets import Buckets
    from loraops.serve.engine.core import Engine
    from loraops.serve.model import load_registered, prepare_version
    from loraops.training.data import prompt_ids

    registry = Registry(workspace=serving_home)
    served = load_registered(registry, "tiny:1", "nf4")
    prompt = prompt_ids(served.tokenizer, DIALOGUE, served.config.data, budget=10**9)
    engine = Engine(served, Buckets((1, 2), (256,), (1,)))
    engine.warm_start()
    at_second_token, go_on, seen, tokens = threading.Event(), threading.Event(), {}, []

    def on_token(token: int) -> None:  # the engine's thread, inside a pass
        tokens.append(token)
        if len(tokens) == 2:
            at_second_token.set()
            go_on.wait(60)  # the pass ends only once a holder waits for it

    def hold() -> None:
        with engine.between_steps():
            seen["rows"], seen["done"] = len(engine.scheduler.rows), future.done()
            prepared = prepare_version(registry, registry.get("tiny:2"), served=served)
            served.add(prepared.path, prepared.slot)

    try:
        future = engine.submit(prompt, TOKENS, on_token=on_token)
        assert at_second_token.wait(60)
        holder = threading.Thread(target=hold)
        holder.start()
        wait_until(lambda: engine.scheduler.held == 1, 30, "the holder waiting for the pass")
        go_on.set()
        holder.join(60)
        generated = future.result(60)
    finally:
        engine.stop()
    alone = generate_completions(load_registered(registry, "tiny:1", "nf4").model, served.tokenizer, [prompt], TOKENS)[0]
    assert (seen["rows"], seen["done"]) == (1, False)  # held with the row in place, not drained
    assert served.adapters == ["tiny_v1", "tiny_v2"] and generated.completion.token_ids == alone.token_ids


async def wait_for(condition, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- a real application: 2 replicas, max_adapters 3 -------------------------------------------------


@pytest.fixture(scope="module")
def home(serving_home, tmp_path_factory) -> Path:
    """A copy of serving_home (its registry is shared by other modules) with the on-demand versions registered."""
    from loraops.registry import Registry

    home = tmp_path_factory.mktemp("on-demand") / "home"
    shutil.copytree(serving_home, home, ignore=shutil.ignore_patterns("cache"))
    registry = Registry(workspace=home)
    run = next((home / "runs").glob("*/checkpoint-6")).parent
    for ref, step in ON_DEMAND.items():
        name = ref.split(":")[0]
        if name != "tiny":
            registry.register(run / f"checkpoint-{step}", name)
    for name in ("burst", "broken", "promo", "other"):
        registry.register(run / "checkpoint-6", name)
    registry.register(run / "checkpoint-12", "promo")
    registry.promote("promo", 1)
    return home


@pytest.fixture(scope="module")
def url(home, deploy_tiny_app):

    try:
        yield deploy_tiny_app(
            [
                f"args.workspace={home}",
                "args.load_on_demand=true",
                "args.on_demand_names=[tiny, od-*, burst, broken, promo]",
                "args.max_adapters=3",
                "args.registry_poll_s=1",
                "args.default_max_new_tokens=16",
                "deployments.SummarizerModel.num_replicas=2",
            ]
        )
    finally:
        helpers.remove_applications()


@pytest.fixture(scope="module")
def alone(home) -> dict[int, str]:
    """The greedy summary of each checkpoint's version served alone (checkpoint step -> text), in-process."""
    from loraops.generate import generate_completions
    from loraops.registry import Registry
    from loraops.serve.model import load_registered
    from loraops.training.data import prompt_ids

    texts = {}
    for step, ref in ((6, "tiny:1"), (12, "tiny:2")):
        served = load_registered(Registry(workspace=home), ref, "merged")
        prompt = prompt_ids(served.tokenizer, DIALOGUE, served.config.data, budget=10**9)
        texts[step] = generate_completions(served.model, served.tokenizer, [prompt], TOKENS)[0].text
    return texts


def _ask(url: str, model: str | None) -> httpx.Response:
    body = {"dialogue": DIALOGUE, "max_new_tokens": TOKENS} | ({"model": model} if model else {})
    return httpx.post(url + "/v1/summarize", json=body, timeout=180)


def _exported(metric: str) -> float:
    """The sum over replicas of ``metric`` on Ray's Prometheus endpoint (Serve tags each sample with its replica)."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(metric + "{") and 'replica="' in line)


def _replicas(url: str) -> dict[str, dict]:
    """Each model replica's on-demand state, from one /v1/models answer (polled until both replicas have published)."""

    def both() -> dict | None:
        body = _listing(url)
        return body if len(body["replicas"]) == 2 else None

    listing = wait_until(both, 60, "both replicas in /v1/models", 0.1)
    return {entry["replica"]: entry for entry in listing["replicas"]}


def _listing(url: str) -> dict:
    return httpx.get(url + "/v1/models", timeout=60).json()


@pytest.mark.ray
@pytest.mark.slow
def test_every_version_is_answered_by_itself_and_the_lru_evicts(url, alone):
    started = time.perf_counter()
    cold = _ask(url, "od-f:1")
    cold_s, started = time.perf_counter() - started, time.perf_counter()
    warm = _ask(url, "od-f:1")
    print(f"\nod-f:1 over HTTP: first (cold) request {cold_s:.2f} s, the next (resident) {time.perf_counter() - started:.2f} s")
    refs = [None, *ON_DEMAND] * 2
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda ref: _ask(url, ref), refs))

    assert [a.status_code for a in answers] == [200] * len(refs), [a.text for a in answers if a.status_code != 200]
    assert alone[6] != alone[12]  # the two files answer differently, so a wrong adapter would show
    for ref, answer in zip(refs, answers, strict=True):
        model = answer.json()["model"]
        assert f"{model['name']}:{model['version']}" == (ref or "tiny:1")
        assert answer.json()["summary"] == alone[ON_DEMAND.get(ref, 6)], ref
    # The other routes name versions the same way: OpenAI's chat completions and the batch route.
    messages = [{"role": "user", "content": DIALOGUE}]
    chat = httpx.post(url + "/v1/chat/completions", json={"model": "od-c:1", "messages": messages, "max_tokens": TOKENS}, timeout=180)
    batch = httpx.post(url + "/v1/summarize/batch", json={"model": "od-d:1", "dialogues": [DIALOGUE] * 2, "max_new_tokens": TOKENS}, timeout=180)
    assert chat.status_code == 200 and chat.json()["model"] == "od-c:1" and chat.json()["choices"][0]["message"]["content"] == alone[6], chat.text
    assert batch.status_code == 200 and [(s["model"]["name"], s["summary"]) for s in batch.json()] == [("od-d", alone[12])] * 2, batch.text
    replicas = _replicas(url).values()
    print(json.dumps(list(replicas)))
    assert cold.status_code == warm.status_code == 200 and cold.json()["summary"] == warm.json()["summary"]
    assert sum(r["evictions"] for r in replicas) > 0
    assert all(len(r["resident"]) <= r["capacity"] == 2 and set(r["resident"]) <= set(ON_DEMAND) for r in replicas)
    assert sum(r["loads"] for r in replicas) >= len(ON_DEMAND)  # each version loaded somewhere at least once
    wait_until(lambda: _exported("ray_loraops_adapter_evictions_total") > 0, 90, "Ray's metrics endpoint to export the evictions per replica", 0.5)
    # One answer lists both replicas (not only the one that answered, whose own entry matches its details).
    listing = _listing(url)
    answered, entries = listing["models"][0], {r["replica"]: r for r in listing["replicas"]}
    assert len(entries) == 2 and answered["replica"] in entries and entries[answered["replica"]]["resident"] == answered["on_demand"]["resident"]
    assert all("evictions" in r and "load when a request names them" in r["note"] and r["seen_s_ago"] < 5 for r in entries.values())


@pytest.mark.ray
@pytest.mark.slow
def test_a_burst_of_first_requests_loads_the_version_once(url):
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: _ask(url, "burst:1"), range(12)))

    assert [a.status_code for a in answers] == [200] * 12
    assert {a.json()["model"]["name"] for a in answers} == {"burst"}
    loads = [r["loads_by_ref"].get("burst:1", 0) for r in _replicas(url).values()]
    assert sum(loads) >= 1 and max(loads) == 1  # at most one load per replica (Serve routes the rest to it)


@pytest.mark.ray
@pytest.mark.slow
def test_unknown_malformed_path_like_and_refused_references_load_nothing(url):
    before = {replica: r["loads"] for replica, r in _replicas(url).items()}
    cases = {"nope:1": 404, "od-z@production": 404, "other:1": 404, "tiny:0": 422, "../tiny": 422, "/etc/passwd": 422, "s3://bucket/tiny": 422}
    answers = {ref: _ask(url, ref) for ref in cases}
    after = _replicas(url)

    assert {ref: a.status_code for ref, a in answers.items()} == cases
    for ref, answer in answers.items():
        error = answer.json()["error"]
        assert error["field"] == "model" and "Traceback" not in answer.text, (ref, error)
    assert "not in args.on_demand_names" in answers["other:1"].json()["error"]["message"]
    assert {replica: r["loads"] for replica, r in after.items()} == before


@pytest.mark.ray
@pytest.mark.slow
def test_a_corrupted_version_fails_alone_and_loads_once_restored(url, home):
    stored = home / "registry" / "broken" / "v1" / "adapter_model.safetensors"
    original = stored.read_bytes()
    stored.write_bytes(original[: len(original) // 2] + bytes(256) + original[len(original) // 2 + 256 :])
    try:
        with ThreadPoolExecutor(4) as pool:
            bad, good = pool.submit(_ask, url, "broken:1"), [pool.submit(_ask, url, None) for _ in range(3)]
            bad, good = bad.result(), [g.result() for g in good]
    finally:
        stored.write_bytes(original)

    assert bad.status_code in (422, 503) and "broken:1" in bad.json()["error"]["message"], bad.text
    assert "Traceback" not in bad.text and str(home) not in bad.text
    assert [g.status_code for g in good] == [200] * 3
    restored = wait_until(lambda: (a := _ask(url, "broken:1")).status_code == 200 and a, 90, "broken:1 served once restored", 0.5)
    assert restored.json()["model"] == {"name": "broken", "version": 1}


@pytest.mark.ray
@pytest.mark.slow
def test_a_promotion_reaches_the_replica_that_holds_the_alias_and_the_one_that_does_not(url, home):
    from loraops.registry import Registry

    assert _ask(url, "promo").json()["model"]["version"] == 1  # a bare NAME is NAME@production
    holders = [r for r in _replicas(url).values() if "promo@production" in r["resident"]]
    assert len(holders) >= 1
    Registry(workspace=home).promote("promo", 2)

    def answered_by_v2() -> bool:  # several requests in a row, so both replicas are asked
        return all(_ask(url, "promo@production").json()["model"]["version"] == 2 for _ in range(4))

    wait_until(answered_by_v2, 90, "promo@production answered by v2 everywhere", 0.5)
