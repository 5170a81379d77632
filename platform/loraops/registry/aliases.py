"""Alias bookkeeping inside one database session: row lookups, alias moves, the rollback stack, ``--if-better``.

The :class:`~loraops.registry.api.Registry` opens the sessions and transactions; these functions
only read and write rows of the session they are given, so a promotion or rollback stays one
transaction however many of them it calls.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from loraops.errors import LoraopsError
from loraops.metrics import lower_is_better
from loraops.registry import db
from loraops.registry.db import AdapterRow, AliasEventRow, AliasRow, VersionRow


class PromotionRefused(LoraopsError):
    """``--if-better`` found the candidate no better than the alias's current version."""


def adapter_row(session: Session, name: str, lock: bool = False) -> AdapterRow:
    """The adapter's row (locked for update when ``lock``); unknown names are an error listing the known ones."""
    query = select(AdapterRow).where(AdapterRow.name == name)
    adapter = session.scalars(query.with_for_update() if lock else query).one_or_none()
    if adapter is None:
        raise unknown_adapter(session, name)
    return adapter


def unknown_adapter(session: Session, name: str) -> LoraopsError:
    names = list(session.scalars(select(AdapterRow.name).order_by(AdapterRow.name).limit(11)))
    known = f"; registered: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}" if names else "; the registry is empty"
    return LoraopsError(f"unknown adapter {name!r}{known}")


def version_of(session: Session, adapter: AdapterRow, number: int | None) -> VersionRow:
    """Version ``number`` of the adapter, or its latest when None; a missing one is an error giving the range."""
    query = select(VersionRow).where(VersionRow.adapter_id == adapter.id)
    query = query.where(VersionRow.version == number) if number is not None else query.order_by(VersionRow.version.desc()).limit(1)
    row = session.scalars(query).first()
    if row is None:
        if number is None:
            raise LoraopsError(f"{adapter.name} has no versions yet")
        top = session.scalar(select(func.max(VersionRow.version)).where(VersionRow.adapter_id == adapter.id))
        raise LoraopsError(f"{adapter.name} has no version {number} (versions: {'1..' + str(top) if top else 'none'})")
    return row


def alias_target(session: Session, adapter: AdapterRow, alias: str) -> int:
    """The version ``NAME@alias`` points at."""
    row = session.get(AliasRow, (adapter.id, alias))
    if row is None:
        raise LoraopsError(f"{adapter.name} has no alias {alias!r}{known_aliases(session, adapter)}")
    return row.version


def known_aliases(session: Session, adapter: AdapterRow) -> str:
    names = list(session.scalars(select(AliasRow.alias).where(AliasRow.adapter_id == adapter.id).order_by(AliasRow.alias)))
    return f" (aliases: {', '.join(names)})" if names else " (it has no aliases yet: see `loraops promote`)"


def aliases_by_version(session: Session, adapter_id: int) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for row in session.scalars(select(AliasRow).where(AliasRow.adapter_id == adapter_id).order_by(AliasRow.alias)):
        found.setdefault(row.version, []).append(row.alias)
    return found


def rollback_target(session: Session, name: str, alias: str, lock: bool) -> tuple[int, int]:
    """(the version a rollback of NAME@alias goes to, the adapter's id), or the error saying why there is none.

    The audit log is read as a stack: a promotion pushes its version, a rollback pops one. The
    history decides, not the alias row: when the alias points to a version the log never moved it
    to (changed in the database by hand), the rollback returns it to the last version the log
    records, the one that served before the untracked change.
    """
    adapter = adapter_row(session, name, lock=lock)
    current = session.get(AliasRow, (adapter.id, alias))
    if current is None:
        raise LoraopsError(f"{name} has no alias {alias!r}{known_aliases(session, adapter)}")
    stack = _history_stack(session, adapter.id, alias)
    if stack and stack[-1] != current.version:
        return stack[-1], adapter.id
    if len(stack) < 2:
        raise LoraopsError(f"{name}@{alias} (version {current.version}) has no earlier target to roll back to")
    return stack[-2], adapter.id


def _history_stack(session: Session, adapter_id: int, alias: str) -> list[int]:
    """The versions the audit log put the alias on, oldest first, with rolled-back ones popped."""
    query = select(AliasEventRow).where(AliasEventRow.adapter_id == adapter_id, AliasEventRow.alias == alias)
    stack: list[int] = []
    for event_row in session.scalars(query.order_by(AliasEventRow.id)):
        if event_row.action != "rollback":
            if not stack or stack[-1] != event_row.to_version:  # back onto the version on top after an untracked move
                stack.append(event_row.to_version)
        elif not stack or stack[-1] != event_row.to_version:  # a rollback that undid an untracked move pops nothing
            stack = stack[:-1]
    return stack


def move_alias(session: Session, adapter_id: int, alias: str, to: int, previous: int | None, action: str, actor: str | None, reason: str | None) -> None:
    """Point the alias at ``to`` and append the change to the audit log, in the same transaction."""
    row = session.get(AliasRow, (adapter_id, alias))
    if row is None:
        session.add(AliasRow(adapter_id=adapter_id, alias=alias, version=to))
    else:
        row.version, row.updated_at = to, db.utcnow()
    session.add(AliasEventRow(adapter_id=adapter_id, alias=alias, actor=actor, action=action, from_version=previous, to_version=to, reason=reason))


def compare(session: Session, adapter: AdapterRow, candidate: VersionRow, previous: int, alias: str, metric: str, higher_is_better: bool | None) -> str:
    """The figures compared (a suffix for the promotion message) when the candidate is strictly better on ``metric``, else PromotionRefused."""
    incumbent = version_of(session, adapter, previous)
    new, old = _metric(candidate, metric, adapter.name), _metric(incumbent, metric, adapter.name)
    higher = (not lower_is_better(metric)) if higher_is_better is None else higher_is_better
    better = new > old if higher else new < old
    figures = f"{metric}: candidate v{candidate.version} = {new:g}, {alias} v{previous} = {old:g}; {'higher' if higher else 'lower'} is better"
    if not better:
        raise PromotionRefused(f"not promoted, {adapter.name} v{candidate.version} is not better than {alias}: {figures}")
    return f" ({figures})"


def _metric(row: VersionRow, metric: str, name: str) -> float:
    value = (row.metrics or {}).get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        known = ", ".join(sorted(row.metrics or {})) or "none"
        raise PromotionRefused(f"cannot compare on {metric!r}: {name} v{row.version} has no such metric (its metrics: {known})")
    return float(value)
