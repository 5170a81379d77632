"""The model deployment: each replica holds the base model and the adapter a registry reference names.

A replica loads the version that ``adapter`` (``NAME@production`` by default, or a pinned
``NAME:VERSION``) points to, rebuilt from the training config recorded with that version, in the
configured mode (``nf4`` or ``merged``, see :func:`loraops.generate.load_for_serving`).

Requests are batched with ``@serve.batch``: concurrent requests share one left-padded ``generate``
call, exactly the evaluation path (:func:`loraops.generate.generate_completions`).

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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Job:
    prompt: list[int]
    max_new_tokens: int
    temperature: float


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
        # Generation and adapter swaps both run in worker threads: this lock keeps them apart.
        self._model_lock = threading.Lock()
        self._switch_lock = asyncio.Lock()
        self.problem: str | None = None
        self.version = self.registry.get(self.live.adapter)
        self.served = self._load(self.version)
        latest = self.registry.get(self.live.adapter)
        if latest.version != self.version.version:  # the alias moved while this replica was loading
            self._switch(latest)
        self._warm_up()
        self._apply_batch_settings()
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
            static_cache=self.settings.static_cache,
        )
        log.info("serving %s (%s mode, %s) from %s", version.ref, self.settings.mode, served.dtype, path)
        return served

    def _warm_up(self) -> None:
        """Compile before the first request: with a static cache on GPU the first generate call compiles
        the decoding step, which would otherwise land on a user's request (eager mode needs nothing)."""
        if not self.served.generate_options():
            return
        from loraops.data import prompt_ids

        prompt = prompt_ids(self.served.tokenizer, "#Person1#: Hello.\n#Person2#: Hi.", self.served.config.data, budget=sys.maxsize)
        started = time.perf_counter()
        self._generate([_Job(prompt, self.settings.default_max_new_tokens, 0.0)])
        log.info("warm-up (compiled decoding) took %.1f s", time.perf_counter() - started)

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
        path = self.registry.resolve(version.ref)  # verified checksums, outside the model lock
        with self._model_lock:
            self.served.swap(path, adapter_slot(version.name, version.version))
            previous, self.version = self.version, version
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

    async def summarize(self, request: dict[str, Any]) -> dict[str, Any]:
        """One summary: ``{"dialogue", "max_new_tokens"?, "temperature"?}`` (validated by the API)."""
        max_new_tokens = request.get("max_new_tokens") or self.settings.default_max_new_tokens
        prompt = await asyncio.to_thread(self._encode, request["dialogue"], max_new_tokens)
        return await self._generate_batch(_Job(prompt, max_new_tokens, float(request.get("temperature") or 0.0)))

    def _encode(self, dialogue: str, max_new_tokens: int) -> list[int]:
        """The training prompt for ``dialogue``, uncut: a dialogue that does not fit is an error, not truncated."""
        from loraops.data import prompt_ids

        served = self.served
        ids = prompt_ids(served.tokenizer, dialogue, served.config.data, budget=sys.maxsize)
        if len(ids) + max_new_tokens > self.context_tokens:
            raise DialogueTooLong(len(ids), max_new_tokens, self.context_tokens)
        return ids

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, jobs: list[_Job]) -> list[dict[str, Any]]:
        # generate releases the GIL: in a thread it leaves the replica's event loop responsive.
        return await asyncio.to_thread(self._generate, jobs)

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
            "problem": self.problem,
        }

    def check_health(self) -> None:
        """Serve's health check: a replica whose registry watch died is restarted."""
        if self._watch_task.done():
            raise RuntimeError(f"the registry watch stopped: {self._watch_task.exception() if not self._watch_task.cancelled() else 'cancelled'}")
