"""The model deployment: each replica holds the base model and the adapter a registry reference names.

A replica loads the version that ``adapter`` (``NAME@production`` by default, or a pinned
``NAME:VERSION``) points to, rebuilt from the training config recorded with that version, in the
configured mode (``nf4`` or ``merged``, see :func:`loraops.generate.load_for_serving`).

Requests go to the replica's :class:`~loraops.engine.Engine`: continuous batching (requests join and
leave the running batch between decode steps) over a KV cache whose shapes come from a fixed set of
buckets (``batch_buckets`` x ``length_buckets``). The constructor runs every bucket shape once before
the replica reports healthy (on a GPU in merged mode that compiles the decode step for each), so no
request waits for a compilation. Greedy answers are the tokens evaluation's
:func:`loraops.generate.generate_completions` produces. No request can fail its batch-mates: the
engine retries the requests of a failed forward pass one at a time and fails only a request that
fails alone, which is answered with a 422 when the model demonstrably works (:func:`reject_or_raise`).

A replica that cannot load its alias's target (a corrupt artifact, a refused training config)
starts on the version the alias pointed to most recently before that still verifies
(:func:`fallback_order`) and reports the problem in ``info()`` (``/v1/models``, ``/healthz``
"degraded"), so a bad version never keeps capacity from coming back.

Adapter swaps without downtime: every ``registry_poll_s`` the replica asks the registry where its
reference points; when the alias has moved it loads the new adapter next to the old one and
switches while no request is decoding (:meth:`loraops.engine.Engine.exclusive`,
:meth:`loraops.generate.ServingModel.swap`), so no request fails and the base model is never
reloaded. Serve's ``user_config`` (``reconfigure``) can change the reference, the batch settings
and the poll interval the same way. Every response names the version that generated it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ray import serve

from loraops.errors import LoraopsError
from loraops.registry.refs import parse_ref
from loraops.serve.settings import MODEL_DEPLOYMENT, LiveSettings, ServeSettings, validate_live

log = logging.getLogger("ray.serve")

#: Training-config sections a replica needs: the base model, how it was quantized, the prompt.
CONFIG_SECTIONS = ("model", "quantization", "data")


class DialogueTooLong(LoraopsError):
    """The prompt plus the requested summary does not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_tokens: int):
        # Positional args only, so the error pickles across the Ray handle unchanged.
        super().__init__(prompt_tokens, max_new_tokens, context_tokens)
        self.prompt_tokens, self.max_new_tokens, self.context_tokens = prompt_tokens, max_new_tokens, context_tokens

    def __str__(self) -> str:
        return (
            f"the dialogue is {self.prompt_tokens} tokens as a prompt; with max_new_tokens {self.max_new_tokens} that is "
            f"{self.prompt_tokens + self.max_new_tokens}, over the model's context of {self.context_tokens} tokens"
        )


@dataclass(frozen=True)
class Rejection:
    """A request the model deployment turns down because of its own input, answered as a 422.

    Returned instead of raised: Serve logs every exception a replica method raises with its
    traceback, and a client's mistake is not worth one.
    """

    type: str
    message: str


async def reject_or_raise(error: Exception, probe: Callable[[], Awaitable[Any]]) -> Rejection:
    """The answer to a request that failed on its own (the engine already kept it from failing its batch-mates).

    When the model demonstrably works (the known-good ``probe`` succeeds), the request's own input
    was the cause: a :class:`Rejection` (422). When even the probe fails, the model is broken, not
    the input: ``error`` is raised (a 500 for the request).
    """
    try:
        await probe()
    except Exception:  # noqa: BLE001
        raise error from None
    log.warning("a request failed on its own and is rejected: %s: %s", type(error).__name__, error)
    return Rejection("generation_failed", f"no summary could be generated for this request ({type(error).__name__}); other requests were answered")


def fallback_order(events: Sequence, failed: int) -> list[int]:
    """Versions an alias has pointed to (its audit log's ``AliasEvent`` s), most recent first, without ``failed``."""
    order: list[int] = []
    for event in reversed(events):
        for number in (event.to_version, event.from_version):
            if number is not None and number != failed and number not in order:
                order.append(number)
    return order


_PATH = re.compile(r"(?:\b[A-Za-z][A-Za-z0-9+.-]*://|(?<![\w.~])/)[^\s'\"(),;]+")


def without_paths(text: str) -> str:
    """``text`` with local paths and URIs replaced by ``<path>``: what API callers may see of a problem."""
    return _PATH.sub("<path>", text)


def training_config(version, workspace: str, allow_trust_remote_code: bool = False):
    """The loraops :class:`~loraops.config.Config` a registered version was trained with, for serving.

    Only the sections serving needs are taken (base model, quantization, prompt and lengths), so
    unrelated training keys never stop a replica; ``workspace`` is the serving workspace, where
    ``builtin:tiny-phi`` lives. Versions registered without a config fall back to the columns
    the registry always records and the default prompt. A version trained with
    ``model.trust_remote_code: true`` is refused unless ``allow_trust_remote_code``: the registry
    would otherwise decide what code every replica runs.
    """
    from loraops.config import Config, validate

    raw = version.config or {}
    data: dict[str, Any] = {key: raw[key] for key in CONFIG_SECTIONS if isinstance(raw.get(key), dict)}
    if "model" not in data and version.base_model:
        data["model"] = {"name": version.base_model}
    if "quantization" not in data and version.quantization:
        data["quantization"] = version.quantization
    if not raw:
        log.warning("%s was registered without its training config: assuming the default prompt template", version.ref)
    config = validate(Config, data | {"workspace": workspace}, origin=f"training config of {version.ref}")
    if config.model.trust_remote_code and not allow_trust_remote_code:
        raise LoraopsError(
            f"{version.ref} was trained with model.trust_remote_code: true, which runs code from the model repository "
            "in every replica; set args.allow_trust_remote_code: true in the serve config to serve it"
        )
    return config


def swap_blocker(current, new) -> str | None:
    """Why a replica serving ``current`` (a Config) cannot switch to an adapter trained as ``new``, or None."""
    if current.model != new.model:
        return f"base model {new.model.name!r} differs from the loaded {current.model.name!r}"
    if current.quantization != new.quantization:
        return "quantization settings differ from the loaded base model's"
    if current.data.prompt_template != new.data.prompt_template:
        return "its prompt template differs"
    return None


def adapter_slot(name: str, version: int) -> str:
    """The PEFT adapter name of a version (PEFT names may not contain dots)."""
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}_v{version}"


@serve.deployment(name=MODEL_DEPLOYMENT, max_ongoing_requests=32, health_check_period_s=10)
class SummarizerModel:
    """One model replica: base model + the adapter of a registry reference, batched generation, live swaps."""

    def __init__(self, settings: dict[str, Any]):
        import torch

        from loraops.registry import Registry

        self.settings = ServeSettings.model_validate(settings)
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self.live = LiveSettings.model_validate(self.settings.live())
        self.registry = Registry(db_url=self.settings.db_url, artifact_uri=self.settings.artifact_uri, workspace=self.settings.workspace)
        self._switch_lock = asyncio.Lock()
        self.problem: str | None = None
        self.engine = None
        target = self.registry.get(self.live.adapter)
        self.version, self.served = self._load_or_fall_back(target)
        self._probe = self._prompt("#Person1#: Hello.\n#Person2#: Hi.")
        latest = self.registry.get(self.live.adapter)
        if latest.version != target.version:  # the alias moved while this replica was loading
            try:
                self._switch(latest)
            except LoraopsError as exc:
                self._report(f"cannot switch to {latest.ref}: {exc}; still serving {self.version.ref}")
        self.engine = self._start_engine(self.live.max_batch_size)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_registry())

    # --- loading and switching -----------------------------------------------------------------

    def _load_or_fall_back(self, target):
        """``(version, served)`` for ``target``, or, when it cannot be loaded and the reference is an
        alias, for the version the alias pointed to most recently before that loads (checksums verified)."""
        try:
            return target, self._load(target)
        except Exception as exc:  # noqa: BLE001 - whatever stops the target, an earlier version may serve
            failure = exc
        _, alias, _ = parse_ref(self.live.adapter)
        if alias is None:  # a pinned NAME:VERSION means exactly that version
            raise failure
        for number in fallback_order(self.registry.audit_log(target.name, alias), target.version):
            candidate = self.registry.get(f"{target.name}:{number}")
            try:
                served = self._load(candidate)
            except Exception as exc:  # noqa: BLE001
                log.warning("cannot fall back to %s either: %s", candidate.ref, exc)
                continue
            self._report(
                f"cannot load {target.ref}, the target of {self.live.adapter}: {failure}; serving {candidate.ref} instead, "
                f"the version {alias} pointed to most recently before that loads (move the alias to a loadable version to recover)"
            )
            return candidate, served
        raise LoraopsError(f"cannot load {target.ref}, the target of {self.live.adapter}, nor any earlier target of {alias}: {failure}") from failure

    def _report(self, problem: str) -> None:
        """Record why this replica does not serve its reference's target (``info()``, /healthz); log each new one once."""
        if problem != self.problem:
            log.error(problem)
        self.problem = problem

    def _load(self, version):
        from loraops.generate import load_for_serving

        config = training_config(version, self.settings.workspace, self.settings.allow_trust_remote_code)
        path = self.registry.resolve(version.ref)  # checksums verified before anything is loaded
        served = load_for_serving(
            config,
            path,
            self.settings.mode,
            adapter_name=adapter_slot(version.name, version.version),
            dtype=self.settings.dtype,
        )
        log.info("serving %s (%s mode, %s) from %s", version.ref, self.settings.mode, served.dtype, path)
        return served

    def _start_engine(self, max_batch_size: int):
        """The decode engine for the served model: buckets from the settings, every shape run once (warm-up), its loop started."""
        from loraops.engine import Engine

        buckets = self.settings.buckets(max_batch_size, self.context_tokens)
        engine = Engine(
            self.served,
            buckets,
            policy=self.settings.batching,
            max_batch_size=max_batch_size,
            batch_wait_s=self.live.batch_wait_timeout_s,
            compile=self.settings.compiles(self.served),
            label=self.version,
        )
        shapes, seconds = engine.warm_up()
        self.warm_up_report = {"shapes": shapes, "seconds": round(seconds, 2), "compiled": engine.compiled}
        log.info(
            "warm-up: %d shapes (batch %s x cache length %s, prefill batch %s) in %.1f s%s",
            shapes, list(buckets.batch), list(buckets.length), list(buckets.prefill_batch), seconds, ", decode step compiled" if engine.compiled else "",
        )  # fmt: skip
        engine.start()
        return engine

    async def _follow(self, ref: str, strict: bool = False) -> None:
        """Switch to the version ``ref`` names now, if it is not the one being served."""
        async with self._switch_lock:
            version = await asyncio.to_thread(self.registry.get, ref)
            if (version.name, version.version) == (self.version.name, self.version.version):
                if self.problem:  # e.g. the alias was moved back to the version served here
                    log.info("recovered: %s, the target of %s, is served", version.ref, ref)
                    self.problem = None
                return
            try:
                await asyncio.to_thread(self._switch, version)
            except LoraopsError as exc:
                self._report(f"cannot switch to {version.ref}: {exc}; still serving {self.version.ref}")
                if strict:
                    raise

    def _switch(self, version) -> None:
        config = training_config(version, self.settings.workspace, self.settings.allow_trust_remote_code)
        blocker = swap_blocker(self.served.config, config)
        if blocker:
            raise LoraopsError(f"{blocker}: redeploy the application to serve it")
        path = self.registry.resolve(version.ref)  # verified checksums, before the engine is held
        with self.engine.exclusive() if self.engine is not None else contextlib.nullcontext():
            self.served.swap(path, adapter_slot(version.name, version.version))
            previous, self.version = self.version, version
            if self.engine is not None:
                self.engine.label = version  # requests admitted from now on carry the new version
        if self.problem:
            log.info("recovered: %s is served", version.ref)
        self.problem = None
        log.info("switched from %s to %s", previous.ref, version.ref)

    async def _watch_registry(self) -> None:
        """Follow the reference's alias: poll the registry and switch when it points elsewhere."""
        while True:
            await asyncio.sleep(self.live.registry_poll_s or 1.0)
            if not self.live.registry_poll_s or ":" in self.live.adapter:
                continue  # watching is off, or the reference is pinned to one version
            try:
                await self._follow(self.live.adapter)
            except Exception as exc:  # noqa: BLE001 - a registry hiccup must not stop serving
                log.warning("registry check for %s failed: %s", self.live.adapter, exc)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's lightweight update: new adapter reference, batch settings or poll interval, in place.

        A ``max_batch_size`` above the largest warmed batch bucket builds and warms a new engine first
        (requests wait meanwhile, then the new engine takes them), so no request meets an unwarmed shape.
        """
        live = validate_live(user_config, self.settings)
        moved = live.adapter != self.live.adapter
        self.live = live
        if live.max_batch_size > self.engine.buckets.max_batch:
            await asyncio.to_thread(self._replace_engine, live.max_batch_size)
        self.engine.set_limits(live.max_batch_size, live.batch_wait_timeout_s)
        if moved:
            await self._follow(live.adapter, strict=True)

    def _replace_engine(self, max_batch_size: int) -> None:
        old = self.engine
        with old.exclusive():  # the model is not thread-safe: the old engine idles while the new one warms
            self.engine = self._start_engine(max_batch_size)
            self.engine.adopt(old)
        old.stop()

    # --- requests ------------------------------------------------------------------------------

    @property
    def context_tokens(self) -> int:
        return self.settings.context_tokens or self.served.context_tokens

    async def summarize(self, request: dict[str, Any]) -> dict[str, Any] | Rejection:
        """One summary: ``{"dialogue", "max_new_tokens"?, "temperature"?}`` (validated by the API), or a :class:`Rejection`.

        ``usage.model_ms`` is the time the request spent in the model engine (waiting for a slot, which
        ``usage.queue_ms`` gives, plus generating): the rest of what a client measures is Serve's overhead.
        """
        from loraops.engine import RowFailed

        max_new_tokens = request.get("max_new_tokens") or self.settings.default_max_new_tokens
        try:
            prompt = await asyncio.to_thread(self._encode, request["dialogue"], max_new_tokens)
        except DialogueTooLong as exc:
            return Rejection("context_length_exceeded", str(exc))
        try:
            generated = await self._generate(prompt, max_new_tokens, float(request.get("temperature") or 0.0))
        except RowFailed as exc:
            return await reject_or_raise(exc, lambda: self._generate(self._probe, 1, 0.0))
        completion, version = generated.completion, generated.label
        return {
            "summary": completion.text,
            "model": {"name": version.name, "version": version.version},
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": len(completion.token_ids),
                "model_ms": round(generated.model_s * 1000, 2),
                "queue_ms": round(generated.queue_s * 1000, 2),
            },
        }

    async def _generate(self, prompt: list[int], max_new_tokens: int, temperature: float):
        """The engine's :class:`~loraops.engine.Generated` for one request; a cancelled caller's request is dropped."""
        future = self.engine.submit(prompt, max_new_tokens, temperature)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # the engine drops the request at its next step
            raise

    def _prompt(self, dialogue: str) -> list[int]:
        from loraops.data import prompt_ids

        return prompt_ids(self.served.tokenizer, dialogue, self.served.config.data, budget=sys.maxsize)

    def _encode(self, dialogue: str, max_new_tokens: int) -> list[int]:
        """The training prompt for ``dialogue``, uncut: a dialogue that does not fit is an error, not truncated."""
        ids = self._prompt(dialogue)
        if len(ids) + max_new_tokens > self.context_tokens:
            raise DialogueTooLong(len(ids), max_new_tokens, self.context_tokens)
        return ids

    async def info(self) -> dict[str, Any]:
        """What this replica serves."""
        served = self.served
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "name": self.version.name,
            "version": self.version.version,
            "adapter": self.live.adapter,
            "mode": served.mode,
            "base_model": served.config.model.name,
            "dtype": str(served.dtype).removeprefix("torch."),
            "device": str(next(served.model.parameters()).device),
            "context_tokens": self.context_tokens,
            "max_batch_size": self.live.max_batch_size,
            "batch_wait_timeout_s": self.live.batch_wait_timeout_s,
            "registry_poll_s": self.live.registry_poll_s,
            "batching": self.engine.policy,
            "buckets": {name: list(getattr(self.engine.buckets, name)) for name in ("batch", "length", "prefill_batch")},
            "warm_up": self.warm_up_report,
            "problem": without_paths(self.problem) if self.problem else None,
        }

    def check_health(self) -> None:
        """Serve's health check: a replica whose registry watch or engine died is restarted.

        A degraded replica (serving a fallback version) passes: restarting it would only load the
        same fallback again, and meanwhile serve nothing.
        """
        if self._watch_task.done():
            raise RuntimeError(f"the registry watch stopped: {self._watch_task.exception() if not self._watch_task.cancelled() else 'cancelled'}")
        if not self.engine.alive:
            raise RuntimeError(f"the model engine stopped: {self.engine.failure}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()
