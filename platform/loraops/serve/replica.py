"""The model deployment: each replica holds the base model and the adapters of a set of registry references.

A replica serves the references of ``adapters`` (default ``[adapter]``: ``NAME@production`` or a pinned
``NAME:VERSION``) on one base model, rebuilt from the training config recorded with the first one, in
the configured mode (``nf4`` or ``merged``, see :func:`loraops.serve.model.load_for_serving`). A request
may name one in ``model`` (default: the first); one adapter loaded runs the fast path (merged mode:
merged into the dequantized base), several run unmerged with per-row adapters in shared batches
(:mod:`loraops.serve.adapters`, :meth:`loraops.serve.model.ServingModel.adapter_rows`).

Requests go to the replica's :class:`~loraops.serve.engine.core.Engine`: continuous batching (requests join and
leave the running batch between decode steps) over a KV cache whose shapes come from a fixed set of
buckets (``batch_buckets`` x ``length_buckets``). The constructor runs every bucket shape once before
the replica reports healthy (on a GPU in merged mode that compiles the decode step for each), so no
request waits for a compilation. Greedy answers are the tokens evaluation's
:func:`loraops.generate.generate_completions` produces. No request can fail its batch-mates: the
engine retries the requests of a failed forward pass one at a time and fails only a request that
fails alone, which is answered with a 422 when the model demonstrably works (:func:`reject_or_raise`).
:meth:`SummarizerModel.summarize_stream` hands out the text as it is generated.

A replica that cannot load an alias's target (a corrupt artifact, a refused training config)
serves the version the alias pointed to most recently before that still verifies
(:func:`~loraops.serve.adapters.fallback_order`) and reports the problem in ``info()`` (``/v1/models``, ``/healthz``
"degraded"), so a bad version never keeps capacity from coming back.

Adapter swaps without downtime: every ``registry_poll_s`` the replica asks the registry where its
alias references point; when one has moved it loads the new adapter and switches while no request is
decoding (:meth:`loraops.serve.engine.core.Engine.exclusive`), so no request fails and the base model is never
reloaded. Serve's ``user_config`` (``reconfigure``) can change the default reference, the batch
settings and the poll interval the same way (the set of ``adapters`` changes with a redeploy, or
one reference at a time with :meth:`SummarizerModel.load_extra`). Every response names the version
that generated it.

With ``load_on_demand`` a request may also name any other registered version: Serve's model
multiplexing routes it and the replica loads it on first use into an LRU of ``max_adapters`` minus
the configured references (:mod:`loraops.serve.on_demand`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ray import serve

from loraops.errors import LoraopsError
from loraops.registry.db import DatabaseError
from loraops.registry.refs import normalize_ref
from loraops.serve.adapters import AdapterSet
from loraops.serve.candidate import CandidateLoader
from loraops.serve.contract import AnsweredBy, Rejection, ReplicaInfo, SummaryRequest, SummaryResult, Usage
from loraops.serve.engine.params import GREEDY, SamplingParams
from loraops.serve.prompts import DialogueTooLong, PromptBuilder, prompt_of
from loraops.serve.public import public_model_name, without_paths
from loraops.serve.registry_health import RegistryHealth
from loraops.serve.remembered import RememberingRegistry, until_the_database_answers
from loraops.serve.settings import MODEL_DEPLOYMENT, LiveSettings, ServeSettings, validate_live

log = logging.getLogger("ray.serve")


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
    return Rejection(422, "generation_failed", f"no summary could be generated for this request ({type(error).__name__}); other requests were answered")


@serve.deployment(name=MODEL_DEPLOYMENT, max_ongoing_requests=32, health_check_period_s=10)
class SummarizerModel:
    """One model replica: base model + the adapters of its registry references, batched generation, live swaps."""

    def __init__(self, settings: dict[str, Any]):
        from loraops.training.model import use_reserved_cpus

        self.settings = ServeSettings.model_validate(settings)
        use_reserved_cpus(self.settings.torch_threads)  # default: ray_actor_options.num_cpus, at most the cores
        self.live = LiveSettings.model_validate(self.settings.live())
        self.registry = RememberingRegistry(self.settings.open_registry())
        self._switch_lock = asyncio.Lock()
        self.registry_health = RegistryHealth()
        self.engine = None
        self.adapters = AdapterSet(self.registry, self.settings)
        with self.registry.remembered():  # a replica started while the database is down serves what it last resolved
            until_the_database_answers(self._load_configured, self.settings.adapters)  # nothing recorded: wait for it
        self.served = self.adapters.served
        self._probe = prompt_of(self.served, "#Person1#: Hello.\n#Person2#: Hi.")
        self._prompts = PromptBuilder(self.served)
        self.candidate = CandidateLoader(self.registry, self.adapters, serve.get_replica_context().replica_id.unique_id)
        try:
            if self.registry.outage is None:
                self.candidate.follow(contextlib.nullcontext, self.live.registry_poll_s)  # a replica (re)started during a canary serves it at once
        except DatabaseError as exc:
            self.registry.outage = exc
        except Exception as exc:  # noqa: BLE001 - the watch retries; the default serves meanwhile
            log.warning("canary check for %s failed: %s", self.adapters.default.ref, exc)
        if self.registry.outage is not None:
            self.registry_health.checked(self.registry.outage)
            self.registry.outage = None
        self.on_demand = self._start_on_demand() if self.settings.load_on_demand else None
        self.engine = self._start_engine(self.live.max_batch_size)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_registry())

    def _load_configured(self) -> None:
        """Load the configured references, then catch up with an alias that moved while this replica was loading."""
        for ref in self.settings.adapters:
            self.adapters.load(ref)
        for reference in self.adapters.references:
            latest = self.registry.get(reference.ref)
            if reference.problem is None and latest.version != reference.version.version:
                try:
                    self.adapters.follow(reference, latest, contextlib.nullcontext)
                except LoraopsError as exc:
                    self.adapters.report(reference, f"cannot switch to {latest.ref}: {exc}; still serving {reference.version.ref}")

    @property
    def version(self):
        """The version the default reference serves."""
        return self.adapters.default.version

    @property
    def problem(self) -> str | None:
        outage = self.registry_health.problem(self.version.ref)
        return "; ".join(p for p in (outage, self.adapters.problem, self.candidate.problem) if p) or None

    def _hold(self):
        return self.engine.exclusive() if self.engine is not None else contextlib.nullcontext()

    def _hold_for(self, adding: bool):
        """The hold for adding (or removing) one adapter next to others: one step when the running rows compute as
        before (nf4, or several adapters stay unmerged), else the drain (merging or unmerging changes every row's weights)."""
        if self.engine is None:
            return contextlib.nullcontext()
        in_place = self.served.mode == "nf4" or len(self.served.adapters) > (1 if adding else 2)
        return self.engine.between_steps() if in_place else self.engine.exclusive()

    async def _change(self, change: Callable[[], Any]) -> Any:
        """Run ``change`` (a blocking change of the loaded adapters) in a thread, serialised with the other changes."""
        async with self._switch_lock:
            return await asyncio.to_thread(change)

    def _start_on_demand(self):
        """On-demand loading (``args.load_on_demand``): Serve's multiplexed loader and LRU, wired at start because its
        size, ``max_adapters`` minus the configured references, comes from the settings (Serve detects it on the instance)."""
        from loraops.serve.on_demand import OnDemand
        from loraops.serve.replica_board import BoardClient

        on_demand = OnDemand(self.settings, self.registry, self.adapters, self._change, self._hold_for)
        context = serve.get_replica_context()
        on_demand.board, on_demand.replica = BoardClient(context.app_name), context.replica_id.unique_id

        # A plain function, not a bound method: Serve keeps its LRU on the function object.
        async def load_registered_adapter(ref: str):
            return await on_demand.load(ref)

        self._load_on_demand = serve.multiplexed(max_num_models_per_replica=on_demand.capacity)(load_registered_adapter)
        on_demand.load_adapter = self._load_on_demand
        return on_demand

    def _start_engine(self, max_batch_size: int):
        """The decode engine for the served model: buckets from the settings, every shape run once (warm-up), its loop started."""
        from loraops.serve.engine.core import Engine

        engine = Engine.from_settings(
            self.served, self.settings, max_batch_size, batch_wait_s=self.live.batch_wait_timeout_s, resolve_adapter=self.adapters.adapter_of
        )
        self.warm_up_report = engine.warm_start()
        return engine

    # --- following aliases, changing the set ---------------------------------------------------

    async def _follow(self, reference, ref: str | None = None, strict: bool = False) -> None:
        """Make ``reference`` serve what ``ref`` (default: its own reference) names now; on success it is ``ref``."""
        ref = ref or reference.ref
        async with self._switch_lock:
            version = await asyncio.to_thread(self.registry.get, ref)
            try:
                await asyncio.to_thread(self.adapters.follow, reference, version, self._hold)
            except LoraopsError as exc:
                self.adapters.report(reference, f"cannot switch to {version.ref}: {exc}; still serving {reference.version.ref}")
                if strict:
                    raise
                return
            reference.ref = ref
            self.adapters.report(reference, None)
            if self.engine.compiled and self.served.mixed:
                log.info("several adapters are loaded: decode steps run uncompiled until one is left")

    async def _watch_registry(self) -> None:
        """Follow the alias references: poll the registry and switch a reference when its alias points elsewhere."""
        while True:
            await asyncio.sleep(self.live.registry_poll_s or 1.0)
            if self.on_demand is not None:  # the heartbeat that keeps this replica in every replica's /v1/models
                self.on_demand.poll_s = self.live.registry_poll_s or 1.0
                self.on_demand.publish_soon()  # not awaited: an unreachable board must not hold up the registry check
            if not self.live.registry_poll_s:
                continue  # watching is off
            try:
                await self._check_registry()
            except DatabaseError as exc:  # said at once (each call waited its bound); the next poll tries again
                self.registry_health.checked(exc)
                continue
            self.registry_health.checked(None)

    async def _check_registry(self) -> None:
        """One poll: follow each alias reference, then the canary; a database failure ends it (the rest would wait for it too)."""
        for reference in list(self.adapters.references):
            if reference.pinned:
                continue
            try:
                await self._follow(reference)
            except DatabaseError:
                raise
            except Exception as exc:  # noqa: BLE001 - a registry hiccup must not stop serving
                log.warning("registry check for %s failed: %s", reference.ref, exc)
        try:
            async with self._switch_lock:
                await asyncio.to_thread(self.candidate.follow, self._hold, self.live.registry_poll_s)
        except DatabaseError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.warning("canary check for %s failed: %s", self.adapters.default.ref, exc)

    async def load_extra(self, ref: str) -> dict[str, Any]:
        """Serve ``ref`` too (e.g. a canary candidate), next to the configured references, up to ``max_adapters``; its listing."""
        ref = normalize_ref(ref.strip())
        async with self._switch_lock:
            reference = await asyncio.to_thread(self.adapters.load, ref, self._hold, True)
        if self.engine.compiled and self.served.mixed:
            log.info("several adapters are loaded: decode steps run uncompiled until one is left")
        return reference.listing()

    async def unload_extra(self, ref: str) -> bool:
        """Stop serving a reference added with :meth:`load_extra` (requests waiting for it get the default); False if it was not served."""
        ref = normalize_ref(ref.strip())
        if ref in self.settings.adapters:
            raise LoraopsError(f"{ref} is one of the configured adapters: redeploy to stop serving it")
        async with self._switch_lock:
            return await asyncio.to_thread(self.adapters.unload, ref, self._hold)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's lightweight update: new default reference, batch settings or poll interval, in place.

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
            await self._follow(self.adapters.default, live.adapter, strict=True)

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

    async def summarize(self, request: SummaryRequest) -> SummaryResult | Rejection:
        """One summary of a request the API validated, or a :class:`Rejection`.

        ``usage.model_ms`` is the time the request spent in the model engine (waiting for a slot, which
        ``usage.queue_ms`` gives, plus generating): the rest of what a client measures is Serve's overhead.
        """
        from loraops.serve.engine.core import RowFailed

        prepared = await self._prepare(request)
        if isinstance(prepared, Rejection):
            return prepared
        try:
            generated = await self._generate(*prepared)  # releases an on-demand adapter's lease when it ends
        except RowFailed as exc:
            return await reject_or_raise(exc, lambda: self._generate(self._probe, 1, GREEDY, None))
        return self._answer(generated)

    async def summarize_stream(self, request: SummaryRequest):
        """:meth:`summarize` as events: ``{"model"}`` (the version that answers), ``{"text"}`` as tokens are generated,
        then ``{"done": True, ...the answer}``; or one ``{"rejection": {...}}``. Concatenated, the texts are the summary."""
        from loraops.generate import TextStream
        from loraops.serve.engine.core import RowFailed

        prepared = await self._prepare(request)
        if isinstance(prepared, Rejection):
            yield prepared.event()
            return
        loop, tokens, reference = asyncio.get_running_loop(), asyncio.Queue(), prepared[3]

        def on_token(token: int) -> None:
            # Read on the engine's thread while the request decodes, when no swap can happen: the adapter it runs with.
            loop.call_soon_threadsafe(tokens.put_nowait, (token, self.adapters.adapter_of(reference)))

        prompt, _, sampling, *_ = prepared
        # The OpenAI routes' requests (those with sampling parameters) count tokens in their events, for usage on every chunk.
        counted = request.sampling is not None
        future = self._submit(*prepared, on_token=on_token)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(tokens.put_nowait, None))
        text, named = TextStream(self.served.tokenizer, sampling.stop, until_eos=not sampling.ignore_eos), False
        try:
            while (item := await tokens.get()) is not None:
                token, slot = item
                if not named:  # first, the version that answers, so that every chunk can name it
                    version, named = self.adapters.versions[slot], True
                    yield {"model": {"name": version.name, "version": version.version}} | ({"prompt_tokens": len(prompt)} if counted else {})
                if piece := text.add(token):
                    yield {"text": piece} | ({"tokens": len(text.ids)} if counted else {})
            generated = future.result()
        except RowFailed as exc:
            yield (await reject_or_raise(exc, lambda: self._generate(self._probe, 1, GREEDY, None))).event()
            return
        finally:
            future.cancel()  # a caller that went away: the engine drops the request (no-op once it is done)
        answer = self._answer(generated)
        if rest := text.finish(answer.summary):
            yield {"text": rest}
        yield {"done": True, **answer.to_dict()}

    async def _prepare(self, request: SummaryRequest):
        """``(prompt, max_new_tokens, sampling parameters, reference, lease)`` for :meth:`_submit`, or a :class:`Rejection`.

        ``lease``: an on-demand adapter's, taken for this row (loaded first if it is not resident), else None."""
        reference, lease = self.adapters.find(request.model), None
        if self.on_demand is not None and request.model is not None and not request.canary and (reference is None or reference.on_demand):
            lease = await self.on_demand.lease(request.model)
            if isinstance(lease, Rejection):
                return lease
            reference = next((r for r in self.adapters.references if r.ref == lease.ref), None)  # the lease keeps it loaded
            if reference is None:  # removed by hand (unload_extra) meanwhile
                lease.release()
                return Rejection(503, "model_unavailable", f"model {lease.ref!r} was unloaded while this request waited; retry", "model")
        if reference is None and request.canary:  # the API routed it to a candidate this replica has not loaded (yet)
            reference = self.adapters.default
        if reference is None:
            return Rejection(404, "model_not_found", f"model {request.model!r} is not served here; loaded: {', '.join(self.adapters.refs())}", "model")
        max_new_tokens = request.max_new_tokens or self.settings.default_max_new_tokens
        sampling = request.sampling or SamplingParams(temperature=float(request.temperature or 0.0))
        vocabulary = self.served.model.config.vocab_size
        if unknown := [token for token, _ in sampling.logit_bias if token >= vocabulary]:
            return Rejection(400, "invalid_value", f"token id {unknown[0]} is not in the vocabulary (ids 0 to {vocabulary - 1})", "logit_bias")
        try:
            self._prompts.check_size(request.dialogue, max_new_tokens, self.context_tokens)
            prompt = await asyncio.to_thread(self._prompts.encode, request.dialogue, max_new_tokens, self.context_tokens)
        except BaseException as exc:  # the row never reaches the engine: give the lease back (a cancelled caller too)
            if lease is not None:
                lease.release()
            if isinstance(exc, DialogueTooLong):
                return Rejection(422, "context_length_exceeded", str(exc), "dialogue")
            raise
        return prompt, max_new_tokens, sampling, reference, lease

    def _answer(self, generated) -> SummaryResult:
        completion = generated.completion
        version = self.adapters.versions[generated.adapter]
        usage = Usage(completion.prompt_tokens, len(completion.token_ids), round(generated.model_s * 1000, 2), round(generated.queue_s * 1000, 2))
        return SummaryResult(completion.text, AnsweredBy(version.name, version.version), usage, generated.finish_reason, self._logprobs(generated))

    def _logprobs(self, generated) -> list[dict[str, Any]] | None:
        """The engine's log probabilities with each token's text."""
        if generated.logprobs is None:
            return None
        text = lambda token: self.served.tokenizer.decode([token])  # noqa: E731
        tokens = generated.completion.token_ids
        return [{"token": text(t), "logprob": lp, "top": [[text(i), v] for i, v in top]} for t, (lp, top) in zip(tokens, generated.logprobs, strict=True)]

    def _submit(self, prompt: list[int], max_new_tokens: int, sampling: SamplingParams, reference, lease=None, on_token=None):
        """Queue one request in the engine; an on-demand ``lease`` is released when it ends, however it ends."""
        try:
            future = self.engine.submit(prompt, max_new_tokens, adapter=reference, on_token=on_token, sampling=sampling)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        if lease is not None:
            future.add_done_callback(lambda _: lease.release())
        return future

    async def _generate(self, prompt: list[int], max_new_tokens: int, sampling: SamplingParams, reference, lease=None):
        """The engine's :class:`~loraops.serve.engine.core.Generated` for one request; a cancelled caller's request is dropped."""
        future = self._submit(prompt, max_new_tokens, sampling, reference, lease)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # the engine drops the request at its next step
            raise

    async def info(self) -> ReplicaInfo:
        """What this replica serves (``name``, ``version``, ``adapter``: the default reference; ``adapters``: every one)."""
        served = self.served
        return ReplicaInfo(
            replica=serve.get_replica_context().replica_id.unique_id,
            name=self.version.name,
            version=self.version.version,
            adapter=self.adapters.default.ref,
            adapters=[reference.listing() for reference in self.adapters.references],
            max_adapters=self.settings.max_adapters,
            mode=served.mode,
            base_model=public_model_name(served.config.model.name),
            dtype=str(served.dtype).removeprefix("torch."),
            device=str(next(served.model.parameters()).device),
            context_tokens=self.context_tokens,
            max_batch_size=self.live.max_batch_size,
            batch_wait_timeout_s=self.live.batch_wait_timeout_s,
            registry_poll_s=self.live.registry_poll_s,
            batching=self.engine.policy,
            buckets={name: list(getattr(self.engine.buckets, name)) for name in ("batch", "length", "prefill_batch")},
            warm_up=self.warm_up_report,
            canary=self.candidate.info(),
            problem=without_paths(self.problem) if self.problem else None,
            on_demand=self.on_demand.info() if self.on_demand is not None else None,
        )

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
