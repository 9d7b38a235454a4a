"""MST inversion: undo a commit's ops on its new tree to get back the root it started from.

Spec: atproto sync, "Commit Validation" (https://atproto.com/specs/sync; proposal 0006): each op's
inverse is applied in reverse order (a create is deleted, an update restores its ``prev``, a
delete re-inserts its ``prev``); the resulting root must equal the event's ``prevData``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from ..core.cid import cid_str
from ..errors import KeyAbsentError, KeyExistsError
from . import edit
from .partial import PartialTree

__all__ = ["ACTIONS", "Op", "invert"]

#: The op actions of a ``#commit`` event.
ACTIONS = ("create", "update", "delete")


class Op(NamedTuple):
    """One op of a commit, CIDs as raw bytes.

    Attributes:
        action: ``"create"``, ``"update"`` or ``"delete"``.
        path: the repo key ``collection/rkey``.
        cid: the record CID after the commit (``None`` for a delete).
        prev: the record CID before the commit (``None`` for a create).
    """

    action: str
    path: str
    cid: bytes | None
    prev: bytes | None


def invert(tree: PartialTree, ops: Sequence[Op]) -> bytes:
    """Apply the inverse of each op to ``tree`` (the commit's new tree), last op first; return the
    root CID reached (raw bytes), which a valid commit has as ``prevData``.

    Args:
        tree: the partial tree of the commit's ``data`` root; it is changed in place.
        ops: the commit's ops. A create needs ``cid``; an update ``cid`` and ``prev``; a delete
            ``prev``.

    Raises:
        KeyAbsentError: a create's or update's key is not in the tree.
        KeyExistsError: a delete's key is in the tree.
        MstEditError: a create's key holds another CID than the op says (a
            :class:`KeyExistsError` subclass is not used: the message names both CIDs).
        ValueError: an op lacks the CID its action needs, or has an unknown action.
        UnknownSubtreeError: an inverse needs a node the tree does not hold (a missing proof block).
        MstError: a node read on the way breaks an MST rule.
    """
    for op in reversed(ops):
        key = op.path.encode()
        if op.action == "create":
            if op.cid is None:
                raise ValueError(f"create of {op.path!r} has no cid")
            old = edit.delete(tree, key)
            if old != op.cid:
                raise KeyExistsError(f"create of {op.path!r}: the tree holds {cid_str(old)}, not {cid_str(op.cid)}")
        elif op.action == "update":
            if op.cid is None or op.prev is None:
                raise ValueError(f"update of {op.path!r} needs cid and prev")
            old = edit.update(tree, key, op.prev)
            if old != op.cid:
                raise KeyAbsentError(f"update of {op.path!r}: the tree holds {cid_str(old)}, not {cid_str(op.cid)}")
        elif op.action == "delete":
            if op.prev is None:
                raise ValueError(f"delete of {op.path!r} has no prev")
            edit.insert(tree, key, op.prev)
        else:
            raise ValueError(f"unknown op action {op.action!r} for {op.path!r}")
    return tree.root()
