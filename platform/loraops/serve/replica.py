"""The model deployment: each replica holds the base model and the adapters of a set of registry references.

A replica serves the references of ``adapters`` (default ``[adapter]``: ``NAME@production`` or a pinned
``NAME:VERSION``) on one base model, rebuilt from the training config recorded with the first one, in
the configured mode (``nf4`` or ``merged``, see :func:`loraops.generate.load_for_serving`). A request
may name one in ``model`` (default: the first); one adapter loaded runs the fast path (merged mode:
merged into the dequantized base), several run unmerged with per-row adapters in shared batches
(:mod:`loraops.serve.adapters`, :meth:`loraops.generate.ServingModel.adapter_rows`).

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
(:func:`fallback_order`) and reports the problem in ``info()`` (``/v1/models``, ``/healthz``
"degraded"), so a bad version never keeps capacity from coming back.

Adapter swaps without downtime: every ``registry_poll_s`` the replica asks the registry where its
alias references point; when one has moved it loads the new adapter and switches while no request is
decoding (:meth:`loraops.serve.engine.core.Engine.exclusive`), so no request fails and the base model is never
reloaded. Serve's ``user_config`` (``reconfigure``) can change the default reference, the batch
settings and the poll interval the same way (the set of ``adapters`` changes with a redeploy, or
one reference at a time with :meth:`SummarizerModel.load_extra`). Every response names the version
that generated it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from ray import serve

from loraops.errors import LoraopsError
from loraops.registry.refs import normalize_ref
from loraops.serve.adapters import AdapterSet, adapter_slot, fallback_order, swap_blocker, training_config
from loraops.serve.candidate import CandidateLoader
from loraops.serve.contract import AnsweredBy, Rejection, SummaryRequest, SummaryResult, Usage
from loraops.serve.engine.params import GREEDY, SamplingParams
from loraops.serve.public import public_model_name, without_paths
from loraops.serve.settings import MODEL_DEPLOYMENT, LiveSettings, ServeSettings, validate_live

# The serving helpers moved to loraops.serve.adapters stay importable from here.
__all__ = [
    "DialogueTooLong",
    "Rejection",
    "SummarizerModel",
    "adapter_slot",
    "fallback_order",
    "reject_or_raise",
    "swap_blocker",
    "training_config",
    "public_model_name",
    "without_paths",
]

log = logging.getLogger("ray.serve")


class DialogueTooLong(LoraopsError):
    """The prompt plus the requested summary does not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_tokens: int, at_least: bool = False):
        # Positional args only, so the error pickles across the Ray handle unchanged.
        super().__init__(prompt_tokens, max_new_tokens, context_tokens, at_least)
        self.prompt_tokens, self.max_new_tokens, self.context_tokens, self.at_least = prompt_tokens, max_new_tokens, context_tokens, at_least

    def __str__(self) -> str:
        bound = "at least " if self.at_least else ""  # a bound from the dialogue's size, not a count: it was never tokenized
        return (
            f"the dialogue is {bound}{self.prompt_tokens} tokens as a prompt; with max_new_tokens {self.max_new_tokens} that is "
            f"{bound}{self.prompt_tokens + self.max_new_tokens}, over the model's context of {self.context_tokens} tokens"
        )


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


def max_token_bytes(tokenizer) -> int:
    """The longest token of the vocabulary in UTF-8 bytes (an overestimate for byte-level vocabularies, which keeps the bound safe)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max(1, *(len(piece.encode("utf-8", "replace")) for piece in pieces if isinstance(piece, str)))


@serve.deployment(name=MODEL_DEPLOYMENT, max_ongoing_requests=32, health_check_period_s=10)
class SummarizerModel:
    """One model replica: base model + the adapters of its registry references, batched generation, live swaps."""

    def __init__(self, settings: dict[str, Any]):
        from loraops.training.model import use_reserved_cpus

        self.settings = ServeSettings.model_validate(settings)
        use_reserved_cpus(self.settings.torch_threads)  # default: ray_actor_options.num_cpus, at most the cores
        self.live = LiveSettings.model_validate(self.settings.live())
        self.registry = self.settings.open_registry()
        self._switch_lock = asyncio.Lock()
        self.engine = None
        self.adapters = AdapterSet(self.registry, self.settings)
        for ref in self.settings.adapters:
            self.adapters.load(ref)
        self.served = self.adapters.served
        self._probe = self._prompt("#Person1#: Hello.\n#Person2#: Hi.")
        self._max_token_bytes = max_token_bytes(self.served.tokenizer)
        for reference in self.adapters.references:
            latest = self.registry.get(reference.ref)
            if reference.problem is None and latest.version != reference.version.version:  # the alias moved while this replica was loading
                try:
                    self.adapters.follow(reference, latest, contextlib.nullcontext)
                except LoraopsError as exc:
                    self.adapters.report(reference, f"cannot switch to {latest.ref}: {exc}; still serving {reference.version.ref}")
        self.candidate = CandidateLoader(self.registry, self.adapters, serve.get_replica_context().replica_id.unique_id)
        try:
            self.candidate.follow(contextlib.nullcontext, self.live.registry_poll_s)  # a replica (re)started during a canary serves it at once
        except Exception as exc:  # noqa: BLE001 - the watch retries; the default serves meanwhile
            log.warning("canary check for %s failed: %s", self.adapters.default.ref, exc)
        self.engine = self._start_engine(self.live.max_batch_size)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_registry())

    @property
    def version(self):
        """The version the default reference serves."""
        return self.adapters.default.version

    @property
    def problem(self) -> str | None:
        return "; ".join(p for p in (self.adapters.problem, self.candidate.problem) if p) or None

    def _hold(self):
        return self.engine.exclusive() if self.engine is not None else contextlib.nullcontext()

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
            if not self.live.registry_poll_s:
                continue  # watching is off
            for reference in list(self.adapters.references):
                if reference.pinned:
                    continue
                try:
                    await self._follow(reference)
                except Exception as exc:  # noqa: BLE001 - a registry hiccup must not stop serving
                    log.warning("registry check for %s failed: %s", reference.ref, exc)
            try:
                async with self._switch_lock:
                    await asyncio.to_thread(self.candidate.follow, self._hold, self.live.registry_poll_s)
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
            generated = await self._generate(*prepared)
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

        prompt, max_new_tokens, sampling, _ = prepared
        # The OpenAI routes' requests (those with sampling parameters) count tokens in their events, for usage on every chunk.
        counted = request.sampling is not None
        future = self.engine.submit(prompt, max_new_tokens, adapter=reference, on_token=on_token, sampling=sampling)
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
        """``(prompt, max_new_tokens, sampling parameters, reference)`` for the engine, or a :class:`Rejection`."""
        reference = self.adapters.find(request.model)
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
            self._check_size(request.dialogue, max_new_tokens)
            prompt = await asyncio.to_thread(self._encode, request.dialogue, max_new_tokens)
        except DialogueTooLong as exc:
            return Rejection(422, "context_length_exceeded", str(exc), "dialogue")
        return prompt, max_new_tokens, sampling, reference

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

    async def _generate(self, prompt: list[int], max_new_tokens: int, sampling: SamplingParams, reference):
        """The engine's :class:`~loraops.serve.engine.core.Generated` for one request; a cancelled caller's request is dropped."""
        future = self.engine.submit(prompt, max_new_tokens, adapter=reference, sampling=sampling)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # the engine drops the request at its next step
            raise

    def _prompt(self, dialogue: str) -> list[int]:
        from loraops.training.data import prompt_ids

        return prompt_ids(self.served.tokenizer, dialogue, self.served.config.data, budget=sys.maxsize)

    def _check_size(self, dialogue: str, max_new_tokens: int) -> None:
        """Refuse a dialogue that cannot fit before tokenizing it (a megabyte takes the tokenizer most of a second).

        No token spans more than ``max_token_bytes`` bytes, so a text of B bytes is at least B / max_token_bytes
        tokens; whitespace is not counted, since the prompt may drop some of it.
        """
        budget = self.context_tokens - max_new_tokens
        if len(dialogue) <= budget * self._max_token_bytes:  # characters <= bytes: it might fit, tokenize it
            return
        least = -(-len(re.sub(r"\s+", "", dialogue).encode("utf-8", "replace")) // self._max_token_bytes)
        if least > budget:
            raise DialogueTooLong(least, max_new_tokens, self.context_tokens, True)

    def _encode(self, dialogue: str, max_new_tokens: int) -> list[int]:
        """The training prompt for ``dialogue``, uncut: a dialogue that does not fit is an error, not truncated."""
        ids = self._prompt(dialogue)
        if len(ids) + max_new_tokens > self.context_tokens:
            raise DialogueTooLong(len(ids), max_new_tokens, self.context_tokens)
        return ids

    async def info(self) -> dict[str, Any]:
        """What this replica serves (``name``, ``version``, ``adapter``: the default reference; ``adapters``: every one)."""
        served = self.served
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "name": self.version.name,
            "version": self.version.version,
            "adapter": self.adapters.default.ref,
            "adapters": [reference.listing() for reference in self.adapters.references],
            "max_adapters": self.settings.max_adapters,
            "mode": served.mode,
            "base_model": public_model_name(served.config.model.name),
            "dtype": str(served.dtype).removeprefix("torch."),
            "device": str(next(served.model.parameters()).device),
            "context_tokens": self.context_tokens,
            "max_batch_size": self.live.max_batch_size,
            "batch_wait_timeout_s": self.live.batch_wait_timeout_s,
            "registry_poll_s": self.live.registry_poll_s,
            "batching": self.engine.policy,
            "buckets": {name: list(getattr(self.engine.buckets, name)) for name in ("batch", "length", "prefill_batch")},
            "warm_up": self.warm_up_report,
            "canary": self.candidate.info(),
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
