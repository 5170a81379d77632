"""The serving model: one base model with LoRA adapters, and the one way a registered version is loaded for serving.

:class:`ServingModel` holds the base (4-bit ``nf4``, or dequantized with the adapter ``merged``) and
swaps, adds and removes adapters in place. :func:`prepare_version` is the one place a registered
version is checked for serving (its training config rebuilt once, compared with the loaded base,
its files fetched and sha256-verified); :func:`load_registered` turns a registry reference into a
:class:`ServingModel`. Replicas (:mod:`loraops.serve.adapters`), ``loraops bench serve`` and the tests
all load through these two, so what a benchmark or a test measures is what a replica serves.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraops.config import Config
from loraops.errors import LoraopsError
from loraops.layout import check_adapter_dir

if TYPE_CHECKING:
    import torch

# torch and the model code are imported where a model is loaded: the deploying driver imports this
# module (through the replica's) for the registry checks and must not pay for torch.

log = logging.getLogger("ray.serve")

#: Training-config sections a replica needs: the base model, how it was quantized, the prompt.
CONFIG_SECTIONS = ("model", "quantization", "data")


def adapter_slot(name: str, version: int) -> str:
    """The PEFT adapter name of a version (PEFT names may not contain dots)."""
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}_v{version}"


def training_config(version, workspace: str, allow_trust_remote_code: bool = False):
    """The loraops :class:`~loraops.config.Config` a registered version was trained with, for serving.

    Only the sections serving needs are taken (base model, quantization, prompt and lengths), so
    unrelated training keys never stop a replica; ``workspace`` is the serving workspace, where
    ``builtin:tiny-phi`` lives. Versions registered without a config fall back to the columns
    the registry always records and the default prompt. A version trained with
    ``model.trust_remote_code: true`` is refused unless ``allow_trust_remote_code``: the registry
    would otherwise decide what code every replica runs.
    """
    from loraops.config import validate

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


#: How a serving replica holds the model: ``nf4`` is the training graph (4-bit base + unmerged
#: adapter, least memory); ``merged`` dequantizes the 4-bit base and merges the adapter into it.
SERVING_MODES = ("nf4", "merged")


def dequantize_base(model, dtype: torch.dtype):
    """Replace every bitsandbytes 4-bit linear layer with an ordinary one holding its dequantized weights.

    The result computes with exactly the weights the 4-bit layers computed with in training (nf4 codes
    times their block scales), so an adapter merged into it reproduces the trained model. Merging
    into the original full-precision weights instead would not: the adapter learned to correct the
    quantized weights, not the original ones.
    """
    if not getattr(model, "is_quantized", False):
        raise LoraopsError("dequantize_base needs a model loaded in 4-bit (quantization.load_in_4bit: true)")
    model = model.dequantize(dtype=dtype)
    return model.to(dtype)  # embeddings, norms and head were never quantized: same dtype everywhere


@contextlib.contextmanager
def _expected_merge_warnings() -> Iterator[None]:
    """Silence PEFT's warnings about loading into a merged model (it unmerges first) and about nothing left to
    unmerge: expected when adapters change in merged mode, where the exact base weights are restored anyway."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Adapter cannot be set when the model is merged")
        warnings.filterwarnings("ignore", message="Already unmerged")
        yield


class ServingModel:
    """A base model plus one or more loaded adapters, ready to generate; adapters can be added, removed and swapped in place.

    ``nf4`` keeps the 4-bit base and runs the adapter unmerged, as training did. ``merged``
    dequantizes the base once and merges the adapter into the dequantized weights; before the
    first merge it keeps a copy of each touched base weight, so a swap restores those weights
    exactly and merges the next adapter into them: after any number of swaps the weights are
    bit-identical to a fresh load of the new adapter (PEFT's unmerge alone subtracts the delta,
    which drifts by rounding in 16-bit). The copies cost the dense size of the LoRA-targeted
    weights (for Phi-2 with q/k/v/dense: about 1.7 GB in 16-bit), kept in host memory.

    Several adapters (:meth:`add`): none is merged (a merged delta would apply to every row), so
    the base weights are the pristine ones (restored from the copies in merged mode) and each
    forward pass names the adapter of every row (:meth:`adapter_rows`, PEFT's mixed-batch LoRA
    forward). Back to one adapter (:meth:`remove`), merged mode merges it again. ``adapters[0]`` is
    the default adapter.

    Not thread-safe: the caller serialises :meth:`swap`, :meth:`add` and :meth:`remove` with generation.
    """

    def __init__(self, model, tokenizer, config: Config, mode: str, adapter_name: str, static_cache: bool = False):
        if mode not in SERVING_MODES:
            raise LoraopsError(f"mode {mode!r}: expected one of {', '.join(SERVING_MODES)}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.mode = mode
        self.adapters: list[str] = [adapter_name]
        self.static_cache = static_cache
        self._pristine: dict[str, torch.Tensor] = {}
        if mode == "merged":
            self._keep_pristine_weights()
            model.merge_adapter()

    @property
    def adapter_name(self) -> str:
        """The default adapter (the first loaded)."""
        return self.adapters[0]

    @property
    def mixed(self) -> bool:
        """Whether several adapters are loaded: every forward pass then names each row's adapter."""
        return len(self.adapters) > 1

    @property
    def context_tokens(self) -> int:
        """Positions the base model can attend over: prompt plus generated tokens must fit."""
        return int(self.model.config.max_position_embeddings)

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def generate_options(self) -> dict:
        """Extra ``generate`` arguments: on a GPU the merged model decodes with a static, compiled KV cache."""
        from loraops.training.model import device

        if self.mode == "merged" and not self.mixed and self.static_cache and device().type == "cuda":
            # transformers compiles the decoding step when the cache is static (see its
            # _valid_auto_compile_criteria); the 4-bit graph does not compile usefully.
            return {"cache_implementation": "static"}
        return {}

    def adapter_rows(self, names: Sequence[str | None] | None):
        """A context for forward passes of the base model whose row i uses adapter ``names[i]`` (None: the default).

        With one adapter loaded it does nothing (the adapter is active, or merged). With several, PEFT's
        forward hooks hand each LoRA layer the per-row names (its mixed-batch forward), the mechanism
        ``PeftModel.generate(adapter_names=...)`` uses.
        """
        if not self.mixed or names is None:
            return contextlib.nullcontext()
        unknown = sorted({name for name in names if name is not None} - set(self.adapters))
        if unknown:
            raise LoraopsError(f"adapter {unknown[0]} is not loaded (loaded: {', '.join(self.adapters)})")
        return self.model._enable_peft_forward_hooks(adapter_names=[name or self.adapters[0] for name in names])

    def swap(self, adapter_dir: str | Path, adapter_name: str, replace: str | None = None) -> None:
        """Load the adapter in ``adapter_dir`` (named ``adapter_name``) in place of ``replace`` (default: the default adapter); the base stays loaded."""
        with _expected_merge_warnings():
            self._swap(adapter_dir, adapter_name, replace)

    def _swap(self, adapter_dir: str | Path, adapter_name: str, replace: str | None) -> None:
        old = replace or self.adapters[0]
        if adapter_name == old:
            return
        if old not in self.adapters:
            raise LoraopsError(f"adapter {old} is not loaded (loaded: {', '.join(self.adapters)})")
        if adapter_name in self.adapters:
            raise LoraopsError(f"adapter {adapter_name} is already loaded")
        # Load first: a broken adapter folder fails here and leaves the served model untouched.
        self.model.load_adapter(str(check_adapter_dir(adapter_dir)), adapter_name=adapter_name, is_trainable=False)
        merge = self.mode == "merged" and not self.mixed
        if merge:
            self.model.unmerge_adapter()
            self._restore_pristine_weights()
            self._keep_pristine_weights()  # layers that only the new adapter targets
        self.adapters[self.adapters.index(old)] = adapter_name
        self.model.set_adapter(self.adapters[0])  # before merging: PEFT's set_adapter unmerges a merged model
        self.model.delete_adapter(old)
        if merge:
            self.model.merge_adapter()
        self.model.eval()

    def add(self, adapter_dir: str | Path, adapter_name: str) -> None:
        """Load one more adapter next to the loaded ones (merged mode unmerges: several adapters run unmerged)."""
        if adapter_name in self.adapters:
            return
        with _expected_merge_warnings():
            self._add(adapter_dir, adapter_name)

    def _add(self, adapter_dir: str | Path, adapter_name: str) -> None:
        self.model.load_adapter(str(check_adapter_dir(adapter_dir)), adapter_name=adapter_name, is_trainable=False)
        if self.mode == "merged" and not self.mixed:
            self.model.unmerge_adapter()
            self._restore_pristine_weights()  # exactly the dequantized base, not base + delta - delta
            self._keep_pristine_weights()
        self.adapters.append(adapter_name)
        self.model.set_adapter(self.adapters[0])
        self.model.eval()

    def remove(self, adapter_name: str) -> None:
        """Unload an adapter; with one left, merged mode merges it again (the fast path)."""
        if adapter_name not in self.adapters:
            return
        if not self.mixed:
            raise LoraopsError(f"adapter {adapter_name} is the only one loaded: swap it instead")
        self.model.delete_adapter(adapter_name)
        self.adapters.remove(adapter_name)
        self.model.set_adapter(self.adapters[0])
        if self.mode == "merged" and not self.mixed:
            self._keep_pristine_weights()
            self.model.merge_adapter()
        self.model.eval()

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [(name, module) for name, module in self.model.named_modules() if isinstance(module, LoraLayer)]

    def _keep_pristine_weights(self) -> None:
        for name, layer in self._lora_layers():
            if name not in self._pristine:
                self._pristine[name] = layer.get_base_layer().weight.detach().to("cpu", copy=True)

    def _restore_pristine_weights(self) -> None:
        for name, layer in self._lora_layers():
            if name in self._pristine:
                weight = layer.get_base_layer().weight
                weight.data.copy_(self._pristine[name].to(weight.device))


def load_for_serving(
    config: Config, adapter_dir: str | Path, mode: str, adapter_name: str = "default", dtype: str = "auto", static_cache: bool = True
) -> ServingModel:
    """The base model of ``config`` with the adapter attached for serving, in ``mode`` (nf4 or merged).

    Both modes load the base exactly as training did (4-bit nf4). ``merged`` then dequantizes it to
    ``dtype`` (``auto``: the quantization compute dtype, what the 4-bit layers computed in) and
    merges the adapter into the dequantized weights, never into original or 4-bit weights.
    """
    if mode not in SERVING_MODES:
        raise LoraopsError(f"mode {mode!r}: expected one of {', '.join(SERVING_MODES)}")
    if mode == "merged" and not config.quantization.load_in_4bit:
        raise LoraopsError("mode merged dequantizes a 4-bit base, but this adapter was trained on an unquantized base: use mode nf4")
    from peft import PeftModel

    from loraops.training.model import DTYPES, load_base_model, load_tokenizer

    tokenizer = load_tokenizer(config)
    base = load_base_model(config)  # on CPU it keeps bitsandbytes on training's kernel: nf4 serves what was trained
    if mode == "merged":
        target = DTYPES[config.quantization.bnb_4bit_compute_dtype if dtype == "auto" else dtype]
        base = dequantize_base(base, target)
    base.config.use_cache = True
    model = PeftModel.from_pretrained(base, str(check_adapter_dir(adapter_dir)), adapter_name=adapter_name, is_trainable=False)
    model.eval()
    return ServingModel(model, tokenizer, config, mode, adapter_name, static_cache=static_cache)


@dataclass(frozen=True)
class PreparedVersion:
    """A registered version checked for serving: its PEFT adapter name, the training config it needs, its verified folder.

    ``path`` is None when the serving model it was checked against holds that version already.
    """

    version: Any
    slot: str
    config: Config
    path: Path | None


def prepare_version(registry, version, allow_trust_remote_code: bool = False, served: ServingModel | None = None) -> PreparedVersion:
    """Check ``version`` (a registry ``ModelVersion``) for serving on ``served`` (None: a new serving model).

    Raises LoraopsError when its training config is refused or its base differs from ``served``'s;
    the files are fetched and verified (checksums) before anything is loaded or held.
    """
    slot = adapter_slot(version.name, version.version)
    config = training_config(version, str(registry.workspace), allow_trust_remote_code)
    if served is not None:
        blocker = swap_blocker(served.config, config)
        if blocker:
            raise LoraopsError(f"{blocker}: redeploy the application to serve it")
        if slot in served.adapters:
            return PreparedVersion(version, slot, config, None)
    return PreparedVersion(version, slot, config, registry.resolve(version.ref))


def load_registered(registry, ref, mode: str, dtype: str = "auto", allow_trust_remote_code: bool = False, static_cache: bool = True) -> ServingModel:
    """A new serving model of the registered version ``ref`` (a reference, or a ``ModelVersion``), in ``mode``, as a replica loads it."""
    version = registry.get(ref) if isinstance(ref, str) else ref
    prepared = prepare_version(registry, version, allow_trust_remote_code)
    return load_for_serving(prepared.config, prepared.path, mode, adapter_name=prepared.slot, dtype=dtype, static_cache=static_cache)
