"""Row-level queries on ``state_checkpoints`` for ``storage.blobs``: deletes that take every
checkpoint extending a deleted one along, the chain a checkpoint extends, and eviction order."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.orm import Session

from storage.models import StateCheckpoint

# Longest chain of checkpoints extending one another that ``chain`` follows (a guard, not a limit
# reached in practice: a chat adds one link per turn).
MAX_CHAIN = 10_000


def delete_where(session: Session, condition: ColumnElement[bool]) -> list[str]:
    """Delete matching rows and every row extending them; return their file names.

    (RETURNING is not portable to every backend, hence the select first.)
    """
    found = session.execute(select(StateCheckpoint.id, StateCheckpoint.key, StateCheckpoint.path)
                            .where(condition)).all()
    ids = {row.id for row in found}
    names = [row.path for row in found]
    keys = {row.key for row in found}
    while keys:
        extending = session.execute(
            select(StateCheckpoint.id, StateCheckpoint.key, StateCheckpoint.path)
            .where(StateCheckpoint.parent_key.in_(keys))
        ).all()
        extending = [row for row in extending if row.id not in ids]
        ids.update(row.id for row in extending)
        names += [row.path for row in extending]
        keys = {row.key for row in extending}
    if ids:
        session.execute(delete(StateCheckpoint).where(StateCheckpoint.id.in_(ids)))
    return names


def has_version(session: Session, key: str, checksum: str) -> bool:
    """Whether ``key`` exists with this checksum (locked until commit where the backend can)."""
    found = session.scalar(
        select(StateCheckpoint.id)
        .where(StateCheckpoint.key == key, StateCheckpoint.checksum == checksum)
        .with_for_update()
    )
    return found is not None


def chain(session: Session, row: StateCheckpoint) -> list[StateCheckpoint] | None:
    """``row`` and the checkpoints it extends, nearest first; None if one is gone or changed."""
    chain, seen = [row], {row.key}
    while row.parent_key is not None:
        parent = session.scalar(select(StateCheckpoint).where(StateCheckpoint.key == row.parent_key))
        if parent is None or parent.checksum != row.parent_checksum or parent.key in seen or len(chain) > MAX_CHAIN:
            return None
        chain.append(parent)
        seen.add(parent.key)
        row = parent
    return chain


def least_recent_over_budget(rows: Sequence, budget_bytes: int) -> set[int]:
    """Ids to evict from ``rows`` (id, key, parent_key, size_bytes; least recently used first) so
    the rest fit ``budget_bytes``; a checkpoint goes with every checkpoint extending it."""
    children: dict[str, list] = {}
    for row in rows:
        if row.parent_key is not None:
            children.setdefault(row.parent_key, []).append(row)
    total = sum(row.size_bytes for row in rows)
    doomed: set[int] = set()
    for row in rows:
        if total <= budget_bytes:
            break
        pending = [row]
        while pending:
            victim = pending.pop()
            if victim.id not in doomed:
                doomed.add(victim.id)
                total -= victim.size_bytes
                pending.extend(children.get(victim.key, ()))
    return doomed
