"""The model deployment: each replica holds the base model and the adapter a registry reference names.

A replica loads the version that ``adapter`` (``NAME@production`` by default, or a pinned
``NAME:VERSION``) points to, rebuilt from the training config recorded with that version, in the
configured mode (``nf4`` or ``merged``, see :func:`loraops.generate.load_for_serving`).

Requests are batched with ``@serve.batch``: concurrent requests share one left-padded ``generate``
call, exactly the evaluation path (:func:`loraops.generate.generate_completions`). No request can
fail its batch-mates: a batch that fails is rerun row by row (:func:`run_isolated`), and the row
that fails alone is answered with a 422, the others with their summaries.

A replica that cannot load its alias's target (a corrupt artifact, a refused training config)
starts on the version the alias pointed to most recently before that still verifies
(:func:`fallback_order`) and reports the problem in ``info()`` (``/v1/models``, ``/healthz``
"degraded"), so a bad version never keeps capacity from coming back.

Adapter swaps without downtime: every ``registry_poll_s`` the replica asks the registry where its
reference points; when the alias has moved it loads the new adapter next to the old one and
switches between two batches (:meth:`loraops.generate.ServingModel.swap`), so no request fails and
the base model is never reloaded. Serve's ``user_config`` (``reconfigure``) can change the
reference, the batch settings and the poll interval the same way. Every response names the
version that generated it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

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


@dataclass(frozen=True)
class _Job:
    prompt: list[int]
    max_new_tokens: int
    temperature: float


Job = TypeVar("Job")


def run_isolated(generate: Callable[[list[Job]], list[Any]], jobs: list[Job], probe: Job) -> list[Any]:
    """``generate(jobs)``; if that fails, each job alone, so that one request's input cannot fail the others.

    A job that fails alone is answered with a :class:`Rejection` when the model demonstrably works:
    another job of the batch succeeded, or else the known-good ``probe`` does. When even the probe
    fails the model is broken, not the input: the batch's error is raised (a 500 for every request).
    """
    try:
        return generate(jobs)
    except Exception as exc:  # noqa: BLE001 - any failure: find out whether one row caused it
        batch_error = exc
        if len(jobs) > 1:
            log.warning("a batch of %d failed (%s: %s); running its requests one by one", len(jobs), type(exc).__name__, exc)
    results: list[Any] = []
    for job in jobs if len(jobs) > 1 else []:
        try:
            results.append(generate([job])[0])
        except Exception as exc:  # noqa: BLE001
            results.append(exc)
    if all(isinstance(result, Exception) for result in results):
        try:
            generate([probe])
        except Exception:  # noqa: BLE001
            raise batch_error from None
        results = results or [batch_error]
    for result in results:
        if isinstance(result, Exception):
            log.warning("a request failed on its own and is rejected: %s: %s", type(result).__name__, result)
    return [
        Rejection("generation_failed", f"no summary could be generated for this request ({type(r).__name__}); other requests were answered")
        if isinstance(r, Exception)
        else r
        for r in results
    ]


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
        # Generation and adapter swaps both run in worker threads: this lock keeps them apart.
        self._model_lock = threading.Lock()
        self._switch_lock = asyncio.Lock()
        self.problem: str | None = None
        target = self.registry.get(self.live.adapter)
        self.version, self.served = self._load_or_fall_back(target)
        self._probe = _Job(self._prompt("#Person1#: Hello.\n#Person2#: Hi."), 1, 0.0)
        latest = self.registry.get(self.live.adapter)
        if latest.version != target.version:  # the alias moved while this replica was loading
            try:
                self._switch(latest)
            except LoraopsError as exc:
                self._report(f"cannot switch to {latest.ref}: {exc}; still serving {self.version.ref}")
        self._warm_up()
        self._apply_batch_settings()
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
            static_cache=self.settings.static_cache,
        )
        log.info("serving %s (%s mode, %s) from %s", version.ref, self.settings.mode, served.dtype, path)
        return served

    def _warm_up(self) -> None:
        """Compile before the first request: with a static cache on GPU the first generate call compiles
        the decoding step, which would otherwise land on a user's request (eager mode needs nothing)."""
        if not self.served.generate_options():
            return
        started = time.perf_counter()
        self._generate([_Job(self._probe.prompt, self.settings.default_max_new_tokens, 0.0)])
        log.info("warm-up (compiled decoding) took %.1f s", time.perf_counter() - started)

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
        path = self.registry.resolve(version.ref)  # verified checksums, outside the model lock
        with self._model_lock:
            self.served.swap(path, adapter_slot(version.name, version.version))
            previous, self.version = self.version, version
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
        """Serve's lightweight update: new adapter reference, batch settings or poll interval, in place."""
        live = validate_live(user_config, self.settings)
        moved = live.adapter != self.live.adapter
        self.live = live
        self._apply_batch_settings()
        if moved:
            await self._follow(live.adapter, strict=True)

    def _apply_batch_settings(self) -> None:
        self._generate_batch.set_max_batch_size(self.live.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.live.batch_wait_timeout_s)

    # --- requests ------------------------------------------------------------------------------

    @property
    def context_tokens(self) -> int:
        return self.settings.context_tokens or self.served.context_tokens

    async def summarize(self, request: dict[str, Any]) -> dict[str, Any] | Rejection:
        """One summary: ``{"dialogue", "max_new_tokens"?, "temperature"?}`` (validated by the API), or a :class:`Rejection`."""
        max_new_tokens = request.get("max_new_tokens") or self.settings.default_max_new_tokens
        try:
            prompt = await asyncio.to_thread(self._encode, request["dialogue"], max_new_tokens)
        except DialogueTooLong as exc:
            return Rejection("context_length_exceeded", str(exc))
        return await self._generate_batch(_Job(prompt, max_new_tokens, float(request.get("temperature") or 0.0)))

    def _prompt(self, dialogue: str) -> list[int]:
        from loraops.data import prompt_ids

        return prompt_ids(self.served.tokenizer, dialogue, self.served.config.data, budget=sys.maxsize)

    def _encode(self, dialogue: str, max_new_tokens: int) -> list[int]:
        """The training prompt for ``dialogue``, uncut: a dialogue that does not fit is an error, not truncated."""
        ids = self._prompt(dialogue)
        if len(ids) + max_new_tokens > self.context_tokens:
            raise DialogueTooLong(len(ids), max_new_tokens, self.context_tokens)
        return ids

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, jobs: list[_Job]) -> list[dict[str, Any] | Rejection]:
        # generate releases the GIL: in a thread it leaves the replica's event loop responsive.
        return await asyncio.to_thread(run_isolated, self._generate, jobs, self._probe)

    def _generate(self, jobs: list[_Job]) -> list[dict[str, Any]]:
        """One generate call per temperature in the batch (normally one), under the model lock."""
        from loraops.generate import generate_completions

        results: list[dict[str, Any] | None] = [None] * len(jobs)
        with self._model_lock:
            served, version = self.served, self.version
            for temperature in sorted({job.temperature for job in jobs}):
                group = [i for i, job in enumerate(jobs) if job.temperature == temperature]
                completions = generate_completions(
                    served.model,
                    served.tokenizer,
                    [jobs[i].prompt for i in group],
                    [jobs[i].max_new_tokens for i in group],
                    temperature=temperature,
                    **served.generate_options(),
                )
                for i, completion in zip(group, completions, strict=True):
                    results[i] = {
                        "summary": completion.text,
                        "model": {"name": version.name, "version": version.version},
                        "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": len(completion.token_ids)},
                    }
        return results  # type: ignore[return-value]

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
            "problem": without_paths(self.problem) if self.problem else None,
        }

    def check_health(self) -> None:
        """Serve's health check: a replica whose registry watch died is restarted.

        A degraded replica (serving a fallback version) passes: restarting it would only load the
        same fallback again, and meanwhile serve nothing.
        """
        if self._watch_task.done():
            raise RuntimeError(f"the registry watch stopped: {self._watch_task.exception() if not self._watch_task.cancelled() else 'cancelled'}")
