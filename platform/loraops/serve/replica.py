"""The model deployment: each replica holds the base model and the adapter a registry reference names.

A replica loads the version that ``adapter`` (``NAME@production`` by default, or a pinned
``NAME:VERSION``) points to, rebuilt from the training config recorded with that version, in the
configured mode (``nf4`` or ``merged``, see :func:`loraops.generate.load_for_serving`).

Requests go to the replica's :class:`~loraops.engine.Engine`: continuous batching (requests join and
leave the running batch between decode steps) over a KV cache whose shapes come from a fixed set of
buckets (``batch_buckets`` x ``length_buckets``). The constructor runs every bucket shape once before
the replica reports healthy (on a GPU in merged mode that compiles the decode step for each), so no
request waits for a compilation. Greedy answers are the tokens evaluation's
:func:`loraops.generate.generate_completions` produces.

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
from typing import Any

from ray import serve

from loraops.errors import LoraopsError
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


def training_config(version, workspace: str):
    """The loraops :class:`~loraops.config.Config` a registered version was trained with, for serving.

    Only the sections serving needs are taken (base model, quantization, prompt and lengths), so
    unrelated training keys never stop a replica; ``workspace`` is the serving workspace, where
    ``builtin:tiny-phi`` lives. Versions registered without a config fall back to the columns
    the registry always records and the default prompt.
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
    return validate(Config, data | {"workspace": workspace}, origin=f"training config of {version.ref}")


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
        self.version = self.registry.get(self.live.adapter)
        self.served = self._load(self.version)
        latest = self.registry.get(self.live.adapter)
        if latest.version != self.version.version:  # the alias moved while this replica was loading
            self._switch(latest)
        self.engine = self._start_engine(self.live.max_batch_size)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_registry())

    # --- loading and switching -----------------------------------------------------------------

    def _load(self, version):
        from loraops.generate import load_for_serving

        config = training_config(version, self.settings.workspace)
        path = self.registry.resolve(version.ref)
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
        )
        engine.start()
        return engine

    async def _follow(self, ref: str, strict: bool = False) -> None:
        """Switch to the version ``ref`` names now, if it is not the one being served."""
        async with self._switch_lock:
            version = await asyncio.to_thread(self.registry.get, ref)
            if (version.name, version.version) == (self.version.name, self.version.version):
                return
            try:
                await asyncio.to_thread(self._switch, version)
            except LoraopsError as exc:
                self.problem = f"cannot switch to {version.ref}: {exc}; still serving {self.version.ref}"
                log.error(self.problem)
                if strict:
                    raise

    def _switch(self, version) -> None:
        config = training_config(version, self.settings.workspace)
        blocker = swap_blocker(self.served.config, config)
        if blocker:
            raise LoraopsError(f"{blocker}: redeploy the application to serve it")
        path = self.registry.resolve(version.ref)  # verified checksums, before the engine is held
        with self.engine.exclusive() if self.engine is not None else contextlib.nullcontext():
            self.served.swap(path, adapter_slot(version.name, version.version))
            previous, self.version = self.version, version
            if self.engine is not None:
                self.engine.label = version  # requests admitted from now on carry the new version
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

    async def summarize(self, request: dict[str, Any]) -> dict[str, Any]:
        """One summary: ``{"dialogue", "max_new_tokens"?, "temperature"?}`` (validated by the API).

        ``usage.model_ms`` is the time the request spent in the model engine (waiting for a slot, which
        ``usage.queue_ms`` gives, plus generating): the rest of what a client measures is Serve's overhead.
        """
        max_new_tokens = request.get("max_new_tokens") or self.settings.default_max_new_tokens
        prompt = await asyncio.to_thread(self._encode, request["dialogue"], max_new_tokens)
        future = self.engine.submit(prompt, max_new_tokens, float(request.get("temperature") or 0.0))
        try:
            generated = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # the engine drops the request at its next step
            raise
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

    def _encode(self, dialogue: str, max_new_tokens: int) -> list[int]:
        """The training prompt for ``dialogue``, uncut: a dialogue that does not fit is an error, not truncated."""
        from loraops.data import prompt_ids

        served = self.served
        ids = prompt_ids(served.tokenizer, dialogue, served.config.data, budget=sys.maxsize)
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
            "problem": self.problem,
        }

    def check_health(self) -> None:
        """Serve's health check: a replica whose registry watch or engine died is restarted."""
        if self._watch_task.done():
            raise RuntimeError(f"the registry watch stopped: {self._watch_task.exception() if not self._watch_task.cancelled() else 'cancelled'}")
        if not self.engine.alive:
            raise RuntimeError(f"the model engine stopped: {self.engine.failure}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()

