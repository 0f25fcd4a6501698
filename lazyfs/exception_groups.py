"""One rule for reporting a nursery's failure: the error that caused it, not its echoes.

When one task of a nursery fails, trio cancels the others and raises an exception group that
may hold the real error, the `Cancelled` of its siblings and further groups nested inside.
"""

from __future__ import annotations

import trio


def leaf_errors(group: BaseExceptionGroup) -> list[BaseException]:
    """Every exception inside `group` (nested groups flattened), cancellations left out."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending[:0] = list(error.exceptions)
        elif not isinstance(error, trio.Cancelled):
            leaves.append(error)
    return leaves


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first real error inside `group`, or `group` itself when it holds only
    cancellations."""
    leaves = leaf_errors(group)
    return leaves[0] if leaves else group


def sole_error(group: BaseExceptionGroup) -> BaseException:
    """The one real error inside `group`, or `group` itself when several tasks failed (or
    none did)."""
    leaves = leaf_errors(group)
    return leaves[0] if len(leaves) == 1 else group
