"""The registry references a model replica serves on its one base model, and which version each one serves.

A replica serves the references of ``adapters`` (``adapters[0]`` is the default, what a request that
names no ``model`` gets) plus any loaded later (:meth:`AdapterSet.load` with ``extra``, e.g. a canary
candidate), at most ``max_adapters`` in all. Each reference serves one registry version; two references
naming the same version share its adapter. An alias reference follows its alias
(:meth:`AdapterSet.follow`); one whose target cannot be loaded at start falls back to the version the
alias pointed to most recently before that which loads (:func:`fallback_order`), and says so in
:attr:`AdapterSet.problem`.

Every change of the loaded adapters happens while the engine holds no request (``hold``, the engine's
:meth:`~loraops.serve.engine.core.Engine.exclusive`), after the new version's files are fetched and verified, so
running requests never fail; requests still waiting for a reference's adapter run with whatever it serves when they start
(the engine resolves the adapter then, :meth:`AdapterSet.adapter_of`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from loraops.errors import LoraopsError
from loraops.registry.refs import Bare, Ref, normalize_ref
from loraops.serve.model import adapter_slot, load_for_serving, prepare_version

log = logging.getLogger("ray.serve")


def fallback_order(events: Sequence, failed: int) -> list[int]:
    """Versions an alias has pointed to (its audit log's ``AliasEvent`` s), most recent first, without ``failed``."""
    order: list[int] = []
    for event in reversed(events):
        for number in (event.to_version, event.from_version):
            if number is not None and number != failed and number not in order:
                order.append(number)
    return order


@dataclass
class Reference:
    """One served reference: as configured (normalized), the version it serves now, and why not its target, if so."""

    ref: str
    version: Any
    extra: bool = False
    problem: str | None = None
    #: Loaded because a request named it (:mod:`loraops.serve.on_demand`): Serve's LRU may evict it.
    on_demand: bool = False

    @property
    def slot(self) -> str:
        return adapter_slot(self.version.name, self.version.version)

    @property
    def pinned(self) -> bool:
        return Ref.parse(self.ref, bare=Bare.DEFAULT_ALIAS).pinned

    def listing(self) -> dict[str, Any]:
        return {"ref": self.ref, "name": self.version.name, "version": self.version.version}


Hold = Callable[[], contextlib.AbstractContextManager]


class AdapterSet:
    """The served references of one replica and its :class:`~loraops.serve.model.ServingModel` (created by the first load).

    ``hold`` holds the engine idle while the loaded adapters change. Not thread-safe: the replica serialises changes.
    """

    def __init__(self, registry, settings):
        self.registry, self.settings = registry, settings
        self.served = None
        self.references: list[Reference] = []
        #: Every version this replica has loaded, by adapter name: what an answer's adapter was.
        self.versions: dict[str, Any] = {}

    # --- lookups -------------------------------------------------------------------------------

    @property
    def default(self) -> Reference:
        return self.references[0]

    def find(self, model: str | None) -> Reference | None:
        """The reference serving ``model`` (None: the default): the same reference, else a ``NAME:VERSION`` whose version is served."""
        if model is None:
            return self.default
        if not isinstance(model, str):
            return None
        try:
            ref = normalize_ref(model.strip())
        except LoraopsError:
            return None
        for reference in self.references:
            if reference.ref == ref:
                return reference
        wanted = Ref.parse(ref, bare=Bare.DEFAULT_ALIAS)
        return next((r for r in self.references if wanted.pinned and (r.version.name, r.version.version) == (wanted.name, wanted.version)), None)

    def adapter_of(self, reference: Reference) -> str:
        """The adapter a request for ``reference`` runs with when it starts: the version it serves then, or the default's once it is unloaded."""
        return reference.slot if any(r is reference for r in self.references) else self.default.slot

    def refs(self) -> list[str]:
        return [reference.ref for reference in self.references]

    @property
    def problem(self) -> str | None:
        return "; ".join(r.problem for r in self.references if r.problem) or None

    def report(self, reference: Reference, problem: str | None) -> None:
        """Record why ``reference`` does not serve its target (None: it does again); log each new problem once."""
        if problem and problem != reference.problem:
            log.error(problem)
        elif reference.problem and not problem:
            log.info("recovered: %s, the target of %s, is served", reference.version.ref, reference.ref)
        reference.problem = problem

    # --- loading -------------------------------------------------------------------------------

    def load(self, ref: str, hold: Hold = contextlib.nullcontext, extra: bool = False, on_demand: bool = False) -> Reference:
        """Start serving ``ref``: its target, or for an alias whose target does not load, an earlier target (with a problem).

        ``on_demand``: a request named it; Serve's LRU bounds those (outside the ``max_adapters`` count of the others),
        and a target that does not load fails the load (the request named that version, not an earlier one)."""
        known = next((r for r in self.references if r.ref == ref), None)
        if known is not None:
            return known
        fixed = [r.ref for r in self.references if not r.on_demand]
        if not on_demand and len(fixed) >= self.settings.max_adapters:
            raise LoraopsError(f"{ref}: this replica already serves max_adapters ({self.settings.max_adapters}) references: {', '.join(fixed)}")
        target = self.registry.get(ref)
        try:
            self._attach(target, hold)
            reference = Reference(ref, target, extra=extra, on_demand=on_demand)
        except Exception as exc:  # noqa: BLE001 - whatever stops the target, an earlier version may serve
            if on_demand:
                raise
            reference = self._fall_back(ref, target, exc, hold, extra)
        self.references.append(reference)
        return reference

    def _fall_back(self, ref: str, target, failure: Exception, hold: Hold, extra: bool) -> Reference:
        alias = Ref.parse(ref, bare=Bare.DEFAULT_ALIAS).alias
        if alias is None:  # a pinned NAME:VERSION means exactly that version
            raise failure
        for number in fallback_order(self.registry.audit_log(target.name, alias), target.version):
            candidate = self.registry.get(f"{target.name}:{number}")
            try:
                self._attach(candidate, hold)
            except Exception as exc:  # noqa: BLE001
                log.warning("cannot fall back to %s either: %s", candidate.ref, exc)
                continue
            reference = Reference(ref, candidate, extra=extra)
            self.report(
                reference,
                f"cannot load {target.ref}, the target of {ref}: {failure}; serving {candidate.ref} instead, "
                f"the version {alias} pointed to most recently before that loads (move the alias to a loadable version to recover)",
            )
            return reference
        raise LoraopsError(f"cannot load {target.ref}, the target of {ref}, nor any earlier target of {alias}: {failure}") from failure

    def _prepare(self, version):
        return prepare_version(self.registry, version, self.settings.allow_trust_remote_code, self.served)

    def _attach(self, version, hold: Hold) -> None:
        """Load ``version``'s adapter on the base (the first load creates the serving model)."""
        prepared = self._prepare(version)
        if prepared.path is None:
            return
        if self.served is None:
            self.served = load_for_serving(prepared.config, prepared.path, self.settings.mode, adapter_name=prepared.slot, dtype=self.settings.dtype)
        else:
            with hold():
                self.served.add(prepared.path, prepared.slot)
        self.versions[prepared.slot] = version
        log.info("serving %s (%s mode, %s) from %s", version.ref, self.settings.mode, self.served.dtype, prepared.path)

    # --- changing the set ----------------------------------------------------------------------

    def follow(self, reference: Reference, version, hold: Hold) -> bool:
        """Make ``reference`` serve ``version`` (its alias moved); True if it changed. Raises LoraopsError when it cannot load."""
        if (version.name, version.version) == (reference.version.name, reference.version.version):
            return False
        old, prepared = reference.slot, self._prepare(version)
        new, path = prepared.slot, prepared.path
        shared = any(r is not reference and r.slot == old for r in self.references)  # another reference still serves the old version
        with hold():  # the swap and the re-pointing happen while no request runs
            if path is not None:
                if shared:
                    self.served.add(path, new)
                else:
                    self.served.swap(path, new, replace=old)
                self.versions[new] = version
            elif not shared:
                self.served.remove(old)
            previous, reference.version = reference.version, version
        log.info("%s: switched from %s to %s", reference.ref, previous.ref, version.ref)
        return True

    def unload(self, ref: str, hold: Hold) -> bool:
        """Stop serving ``ref`` (the default reference cannot go); requests waiting for it go to the default (:meth:`adapter_of`). True if it was served."""
        reference = next((r for r in self.references if r.ref == ref), None)
        if reference is None:
            return False
        if reference is self.default:
            raise LoraopsError(f"{ref} is the default reference of this deployment: it cannot be unloaded")
        with hold():
            self.references.remove(reference)
            if all(r.slot != reference.slot for r in self.references):
                self.served.remove(reference.slot)
        log.info("stopped serving %s (%s)", ref, reference.version.ref)
        return True
