"""Canaries: a candidate version takes a slice of an alias's traffic and is promoted or aborted on the evidence.

A canary of ``NAME:V`` against ``NAME@production`` records the alias's version when it started
(the baseline), the share of traffic the candidate gets (``percent``) and the automatic-abort
settings. At most one canary runs per adapter. Its row in ``registry_canaries`` is its audit
record (who started and ended it, when and why); a promotion also moves the alias with an
``canary-promote`` entry in the alias audit log, through the same alias code as ``promote``.

Statistics: every serving process (a *reporter*) keeps cumulative totals per version (requests,
errors, completion tokens, a latency histogram over the fixed buckets :data:`LATENCY_BOUNDS_S`)
and upserts them into ``registry_canary_stats``; a flush overwrites that reporter's row, so
flushing twice never counts twice. The status merges the rows of all reporters.

Only the requests the split routed count in those figures; requests that named a version
explicitly (``NAME@ALIAS``, ``NAME:VERSION``) are kept apart (a reporter row with the
:data:`NAMED` suffix), shown but never judged, so no client can move the decision. Requests the
split sent to the candidate that a replica answered with the baseline because it had not loaded the
candidate are counted too (:data:`MISSED`). Every model replica records whether it loaded the
candidate, or why not (``registry_canary_loads``).

Automatic abort (:func:`judge`): once both versions have at least ``min_requests`` requests, the
canary is aborted when the candidate's error rate exceeds the baseline's by more than
``max_error_margin`` (0.05 = 5 percentage points). It is also aborted when no replica could load the
candidate while the split routed ``min_requests`` requests to it (every one answered by the baseline).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from loraops.errors import LoraopsError
from loraops.registry import aliases, db
from loraops.registry.db import AdapterRow, AliasRow, CanaryLoadRow, CanaryRow, CanaryStatsRow
from loraops.registry.records import AliasChange, utc
from loraops.registry.refs import DEFAULT_MAX_ERROR_MARGIN, DEFAULT_MIN_REQUESTS

RUNNING, PROMOTED, ABORTED = "running", "promoted", "aborted"
#: Upper bounds (seconds) of the latency buckets: log-spaced, 4 per doubling from 1 ms to ~131 s
#: (each bucket spans 19%), plus an overflow bucket above the last. Quantiles are read as the
#: upper bound of the bucket they fall in, so p50/p99 are at most 19% above the true figure.
LATENCY_BOUNDS_S: tuple[float, ...] = tuple(round(0.001 * 2 ** (i / 4), 6) for i in range(69))
#: Reporter suffixes of the rows kept apart from the split's figures: requests that named a version
#: explicitly, and the split's candidate requests a replica answered with the baseline (as the candidate's version).
NAMED, MISSED = "|named", "|missed"


@dataclass
class CanaryState:
    """One canary. ``reason`` is why it was started; ``end_reason`` why it was promoted or aborted."""

    id: int
    name: str
    candidate: int
    baseline: int
    alias: str
    percent: float
    started_at: datetime
    state: str
    reason: str | None
    max_error_margin: float = DEFAULT_MAX_ERROR_MARGIN
    min_requests: int = DEFAULT_MIN_REQUESTS
    actor: str | None = None
    ended_at: datetime | None = None
    ended_by: str | None = None
    end_reason: str | None = None

    @classmethod
    def from_row(cls, row: CanaryRow, name: str) -> CanaryState:
        return cls(
            id=row.id,
            name=name,
            candidate=row.candidate,
            baseline=row.baseline,
            alias=row.alias,
            percent=row.percent,
            started_at=utc(row.started_at),
            state=row.state,
            reason=row.reason,
            max_error_margin=row.max_error_margin,
            min_requests=row.min_requests,
            actor=row.actor,
            ended_at=utc(row.ended_at) if row.ended_at else None,
            ended_by=row.ended_by,
            end_reason=row.end_reason,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat()
        data["ended_at"] = self.ended_at.isoformat() if self.ended_at else None
        return data


@dataclass
class Totals:
    """Cumulative figures of one version in one process: what a reporter upserts."""

    requests: int = 0
    errors: int = 0
    completion_tokens: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_S) + 1))

    def add(self, seconds: float, error: bool, completion_tokens: int) -> None:
        self.requests += 1
        self.errors += int(error)
        self.completion_tokens += max(0, int(completion_tokens))
        self.latency_counts[bisect.bisect_left(LATENCY_BOUNDS_S, max(0.0, seconds))] += 1

    def merge(self, other: Totals) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.completion_tokens += other.completion_tokens
        self.latency_counts = [a + b for a, b in zip(self.latency_counts, _padded(other.latency_counts), strict=True)]

    def copy(self) -> Totals:
        return Totals(self.requests, self.errors, self.completion_tokens, list(self.latency_counts))


@dataclass
class VersionStats:
    """One version's figures over a canary, merged over every reporter."""

    version: int
    role: str  # "baseline" or "candidate"
    requests: int
    errors: int
    error_rate: float | None
    p50_s: float | None
    p99_s: float | None
    mean_completion_tokens: float | None
    reporters: int

    @classmethod
    def of(cls, version: int, role: str, totals: Totals, reporters: int) -> VersionStats:
        n = totals.requests
        return cls(
            version=version,
            role=role,
            requests=n,
            errors=totals.errors,
            error_rate=totals.errors / n if n else None,
            p50_s=quantile(totals.latency_counts, 0.50),
            p99_s=quantile(totals.latency_counts, 0.99),
            mean_completion_tokens=totals.completion_tokens / n if n else None,
            reporters=reporters,
        )


@dataclass
class ReplicaLoad:
    """Whether one model replica loaded the candidate (``error`` None), else why not at its last of ``attempts``;
    ``gone``: not seen for :data:`GONE_AFTER_POLLS` of its poll intervals (dead, or cut off): it counts as neither."""

    replica: str
    error: str | None
    attempts: int
    updated_at: datetime
    seen_at: datetime | None = None
    gone: bool = False

    @property
    def loaded(self) -> bool:
        return self.error is None and not self.gone

    def to_dict(self) -> dict[str, Any]:
        seen = self.seen_at.isoformat() if self.seen_at else None
        return asdict(self) | {"loaded": self.loaded, "updated_at": self.updated_at.isoformat(), "seen_at": seen}


#: Poll intervals without a heartbeat after which a replica is shown as gone (a poll may wait for the database's bound).
GONE_AFTER_POLLS = 3
#: The least time without a heartbeat that makes a replica gone, whatever its poll interval.
GONE_AFTER_MIN_S = 15.0


def replica_load(row: CanaryLoadRow, now: datetime) -> ReplicaLoad:
    seen = utc(row.seen_at) if row.seen_at is not None else None
    # Rows written before heartbeats existed (no poll interval) are never judged gone.
    gone = seen is not None and row.poll_s is not None and (now - seen).total_seconds() > max(GONE_AFTER_POLLS * row.poll_s, GONE_AFTER_MIN_S)
    return ReplicaLoad(row.replica, row.error, row.attempts, utc(row.updated_at), seen, gone)


@dataclass
class CanaryStatus:
    """A canary and its two versions' figures (baseline first); ``named``: the requests that named a version
    (not judged); ``missed``: split requests for the candidate answered by the baseline; ``replicas``: who loaded it."""

    canary: CanaryState
    baseline: VersionStats
    candidate: VersionStats
    named: list[VersionStats] = field(default_factory=list)
    missed: int = 0
    replicas: list[ReplicaLoad] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "canary": self.canary.to_dict(),
            "versions": [asdict(self.baseline), asdict(self.candidate)],
            "named": [asdict(v) for v in self.named],
            "missed": self.missed,
            "replicas": [r.to_dict() for r in self.replicas],
        }


def quantile(counts: list[int], q: float) -> float | None:
    """The upper bound of the bucket holding the ``q`` quantile (``inf`` in the overflow bucket); None without data."""
    total = sum(counts)
    if not total:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return LATENCY_BOUNDS_S[index] if index < len(LATENCY_BOUNDS_S) else math.inf
    return math.inf


def judge(status: CanaryStatus) -> str | None:
    """Why the canary should be aborted automatically, or None: the candidate's error rate exceeds the
    baseline's by more than the margin, once both versions have ``min_requests`` requests; or no replica
    could load the candidate while the split routed ``min_requests`` requests to it."""
    canary, base, cand = status.canary, status.baseline, status.candidate
    present = [r for r in status.replicas if not r.gone]
    failed = [r for r in present if r.error]
    if cand.requests == 0 and status.missed >= canary.min_requests and failed and len(failed) == len(present):
        return (
            f"candidate v{cand.version} could not be loaded by any replica ({len(failed)} tried: {failed[-1].error}); "
            f"the {status.missed} requests the split routed to it were answered by v{base.version}"
        )
    if min(base.requests, cand.requests) < canary.min_requests:
        return None
    if cand.error_rate <= base.error_rate + canary.max_error_margin:
        return None
    return (
        f"candidate v{cand.version} error rate {cand.error_rate:.1%} ({cand.errors}/{cand.requests}) exceeds baseline "
        f"v{base.version}'s {base.error_rate:.1%} ({base.errors}/{base.requests}) by more than {canary.max_error_margin * 100:g} points"
    )


# --- inside one session (the Registry opens them) -----------------------------------------------


def check_settings(percent: float, max_error_margin: float, min_requests: int) -> None:
    if not (isinstance(percent, (int, float)) and 0 < percent <= 100):
        raise LoraopsError(f"percent must be above 0 and at most 100, got {percent!r}")
    if not (isinstance(max_error_margin, (int, float)) and 0 <= max_error_margin <= 1):
        raise LoraopsError(f"max_error_margin must be between 0 and 1 (0.05 = 5 points), got {max_error_margin!r}")
    if not (isinstance(min_requests, int) and min_requests >= 1):
        raise LoraopsError(f"min_requests must be a whole number of at least 1, got {min_requests!r}")


def start(session: Session, name: str, candidate: int, alias: str, percent: float, max_error_margin: float, min_requests: int, actor, reason) -> CanaryState:
    """Insert a running canary; the adapter row is locked so that two starts cannot both succeed."""
    adapter = aliases.adapter_row(session, name, lock=True)
    aliases.version_of(session, adapter, candidate)
    running = _running(session, adapter.id)
    if running is not None:
        raise LoraopsError(
            f"{name} already has a running canary (v{running.candidate} at {running.percent:g}% against v{running.baseline}): promote or abort it first"
        )
    current = session.get(AliasRow, (adapter.id, alias))
    if current is None:
        raise LoraopsError(f"{name} has no alias {alias!r} to compare against{aliases.known_aliases(session, adapter)}")
    if current.version == candidate:
        raise LoraopsError(f"{name}@{alias} already points to version {candidate}: a canary needs a different candidate")
    row = CanaryRow(
        adapter_id=adapter.id,
        candidate=candidate,
        baseline=current.version,
        alias=alias,
        percent=float(percent),
        max_error_margin=float(max_error_margin),
        min_requests=min_requests,
        state=RUNNING,
        actor=actor,
        reason=reason,
    )
    session.add(row)
    session.flush()
    return CanaryState.from_row(row, name)


def current(session: Session, name: str, include_ended: bool = False) -> CanaryState | None:
    """The running canary of ``name``; with ``include_ended``, else the last one that ended."""
    adapter = aliases.adapter_row(session, name)
    row = _running(session, adapter.id)
    if row is None and include_ended:
        row = session.scalars(select(CanaryRow).where(CanaryRow.adapter_id == adapter.id).order_by(CanaryRow.id.desc()).limit(1)).first()
    return CanaryState.from_row(row, name) if row is not None else None


def all_running(session: Session) -> list[CanaryState]:
    """The running canaries of every adapter, oldest first."""
    query = select(CanaryRow, AdapterRow.name).join(AdapterRow, CanaryRow.adapter_id == AdapterRow.id).where(CanaryRow.state == RUNNING)
    return [CanaryState.from_row(row, name) for row, name in session.execute(query.order_by(CanaryRow.id))]


def status(session: Session, name: str, now: datetime | None = None) -> CanaryStatus:
    """The running canary of ``name`` (else its last one) with both versions' figures merged over every reporter;
    replicas without a heartbeat for a few poll intervals before ``now`` (default: the clock) are gone."""
    canary = current(session, name, include_ended=True)
    if canary is None:
        raise LoraopsError(f"{name} has had no canary (start one with `loraops canary start {name}:VERSION --percent P`)")
    split, named = ({v: Totals() for v in (canary.baseline, canary.candidate)} for _ in range(2))
    reporters, missed = {canary.baseline: 0, canary.candidate: 0}, 0
    for row in session.scalars(select(CanaryStatsRow).where(CanaryStatsRow.canary_id == canary.id)):
        totals = Totals(row.requests, row.errors, row.completion_tokens, list(row.latency_counts))
        if row.reporter.endswith(MISSED):
            missed += row.requests
        elif row.version in split:
            (named if row.reporter.endswith(NAMED) else split)[row.version].merge(totals)
            reporters[row.version] += not row.reporter.endswith(NAMED)
    roles = {canary.baseline: "baseline", canary.candidate: "candidate"}
    loads = session.scalars(select(CanaryLoadRow).where(CanaryLoadRow.canary_id == canary.id).order_by(CanaryLoadRow.updated_at))
    return CanaryStatus(
        canary,
        *(VersionStats.of(v, roles[v], split[v], reporters[v]) for v in (canary.baseline, canary.candidate)),
        named=[VersionStats.of(v, roles[v], named[v], 0) for v in (canary.baseline, canary.candidate)],
        missed=missed,
        replicas=[replica_load(row, now or db.utcnow()) for row in loads],
    )


def promote(session: Session, running: CanaryState, actor: str | None, reason: str | None, force: bool = False) -> AliasChange:
    """Move the alias to the candidate (the alias code of ``promote``, audited as ``canary-promote``) and end the canary.

    A candidate that has answered none of the split's requests is refused unless ``force``: nothing was tested.
    """
    adapter, row = _running_for_update(session, running.name, running.id)
    if row is None:
        raise LoraopsError(f"the canary of {running.name}:{running.candidate} ended meanwhile (see `loraops canary status {running.name}`)")
    if not force and status(session, running.name).candidate.requests == 0:
        raise LoraopsError(
            f"{running.name}:{running.candidate} has answered no requests of its canary, so nothing was compared "
            f"(see `loraops canary status {running.name}`); promote with --force to move the alias anyway"
        )
    current = session.get(AliasRow, (adapter.id, row.alias))
    previous = current.version if current else None
    aliases.move_alias(session, adapter.id, row.alias, row.candidate, previous, "canary-promote", actor, reason or f"canary {row.id}")
    _end(row, PROMOTED, actor, reason)
    moved = f"{running.name}@{row.alias}: version {previous if previous is not None else '(none)'} -> {row.candidate}"
    return AliasChange(running.name, row.alias, row.candidate, previous, previous != row.candidate, f"{moved} (canary promoted)")


def abort(session: Session, name: str, actor: str | None, reason: str | None, canary_id: int | None) -> CanaryState | None:
    """End the running canary as aborted; with ``canary_id``, only that one (None when it is no longer running)."""
    _, row = _running_for_update(session, name, canary_id)
    if row is None:
        if canary_id is None:
            raise no_running_canary(name)
        return None
    _end(row, ABORTED, actor, reason)
    return CanaryState.from_row(row, name)


def no_running_canary(name: str) -> LoraopsError:
    return LoraopsError(f"{name} has no running canary (see `loraops canary status {name}`)")


def _running_for_update(session: Session, name: str, canary_id: int | None) -> tuple[AdapterRow, CanaryRow | None]:
    """The adapter (locked) and its running canary; None when there is none or it is not ``canary_id``."""
    adapter = aliases.adapter_row(session, name, lock=True)
    row = _running(session, adapter.id)
    if row is None or (canary_id is not None and row.id != canary_id):
        return adapter, None
    return adapter, row


def _end(row: CanaryRow, state: str, actor: str | None, reason: str | None) -> None:
    row.state, row.ended_at, row.ended_by, row.end_reason = state, db.utcnow(), actor, reason


def upsert_stats(session: Session, canary_id: int, reporter: str, version: int, totals: Totals) -> None:
    """Write a reporter's cumulative totals for a version, replacing what it wrote before."""
    if session.get(CanaryRow, canary_id) is None:
        raise LoraopsError(f"no canary with id {canary_id}")
    row = session.get(CanaryStatsRow, (canary_id, reporter, version))
    if row is None:
        row = CanaryStatsRow(canary_id=canary_id, reporter=reporter, version=version)
        session.add(row)
    row.requests, row.errors, row.completion_tokens = totals.requests, totals.errors, totals.completion_tokens
    row.latency_counts, row.updated_at = list(_padded(totals.latency_counts)), db.utcnow()


def upsert_load(session: Session, canary_id: int, replica: str, error: str | None, poll_s: float | None = None, beat: bool = False) -> None:
    """Record that ``replica`` loaded the candidate (``error`` None) or failed to, counting its attempts since it last loaded;
    ``beat``: only its heartbeat (it polled, nothing changed). Either way it was seen now, polling every ``poll_s``."""
    if session.get(CanaryRow, canary_id) is None:
        raise LoraopsError(f"no canary with id {canary_id}")
    row = session.get(CanaryLoadRow, (canary_id, replica))
    if row is None:
        row = CanaryLoadRow(canary_id=canary_id, replica=replica, attempts=0, error=error, updated_at=db.utcnow())
        session.add(row)
        beat = False
    if not beat:
        row.attempts = row.attempts + 1 if error else 0
        row.error, row.updated_at = error, db.utcnow()
    row.seen_at, row.poll_s = db.utcnow(), poll_s or None  # 0: the replica's watch is off, no heartbeat to expect


def _running(session: Session, adapter_id: int) -> CanaryRow | None:
    query = select(CanaryRow).where(CanaryRow.adapter_id == adapter_id, CanaryRow.state == RUNNING).order_by(CanaryRow.id.desc())
    return session.scalars(query.limit(1)).first()


def _padded(counts: list[int]) -> list[int]:
    """A histogram with exactly one count per bucket (rows written with fewer buckets get zeros)."""
    size = len(LATENCY_BOUNDS_S) + 1
    if len(counts) > size:
        raise LoraopsError(f"a latency histogram has {len(counts)} buckets, expected {size}")
    return list(counts) + [0] * (size - len(counts))
