"""MST inversion: undo a commit's ops on its new tree to get back the root it started from.

Spec: atproto sync, "Commit Validation" (https://atproto.com/specs/sync; proposal 0006): each op's
inverse is applied in reverse order (a create is deleted, an update restores its ``prev``, a
delete re-inserts its ``prev``); the resulting root must equal the event's ``prevData``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from ..core import implementation, messages
from ..core.walk import DEFAULT_MAX_DEPTH
from ..errors import RepoStreamError
from . import edit
from .partial import PartialTree

try:
    from .. import _native
except ImportError:  # the C core is not built: the reference runs
    _native = None  # type: ignore[assignment]

__all__ = ["ACTIONS", "Op", "invert", "lookup_and_invert"]

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
                raise messages.inverse_mismatch("create", op.path, old, op.cid)
        elif op.action == "update":
            if op.cid is None or op.prev is None:
                raise ValueError(f"update of {op.path!r} needs cid and prev")
            old = edit.update(tree, key, op.prev)
            if old != op.cid:
                raise messages.inverse_mismatch("update", op.path, old, op.cid)
        elif op.action == "delete":
            if op.prev is None:
                raise ValueError(f"delete of {op.path!r} has no prev")
            edit.insert(tree, key, op.prev)
        else:
            raise ValueError(f"unknown op action {op.action!r} for {op.path!r}")
    return tree.root()


_CODES = {"create": 0, "update": 1, "delete": 2}


def _check_op(op: Op) -> None:
    if op.action == "create":
        if op.cid is None:
            raise ValueError(f"create of {op.path!r} has no cid")
    elif op.action == "update":
        if op.cid is None or op.prev is None:
            raise ValueError(f"update of {op.path!r} needs cid and prev")
    elif op.action == "delete":
        if op.prev is None:
            raise ValueError(f"delete of {op.path!r} has no prev")
    else:
        raise ValueError(f"unknown op action {op.action!r} for {op.path!r}")


def lookup_and_invert(
    root: bytes,
    blocks: Mapping[bytes, bytes],
    keys: Sequence[bytes],
    ops: Sequence[Op],
    *,
    check_keys: bool = True,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> tuple[list[bytes | RepoStreamError | None], bytes | RepoStreamError | None]:
    """Look ``keys`` up in the partial tree of ``root``, then invert ``ops`` on it: what
    :func:`~repo_stream.sync.verify.verify_commit` does with a commit's new tree, in the C core
    when it is in use (the whole tree held in C: no Python object per node), else with
    :class:`PartialTree` and :func:`invert` (the reference: same results, same errors).

    Args:
        root: the tree's root CID (raw bytes).
        blocks: the CAR slice's blocks by raw CID (their CIDs checked already).
        keys: the keys to look up (UTF-8 bytes), in order.
        ops: the ops to invert (see :func:`invert`).
        check_keys, max_depth: as :class:`PartialTree`.

    Returns:
        ``(held, inverted)``: ``held`` has each key's record CID (``None``: proven absent) in
        order; a lookup that fails ends it with its error (a
        :class:`~repo_stream.errors.RepoStreamError`, not raised) and ``inverted`` is then
        ``None``. Otherwise ``inverted`` is the root CID the inverse ops reach, or the error
        inverting raised (not raised either): the caller raises them in its own order.

    Raises:
        ValueError: an op lacks the CID its action needs, or has an unknown action (checked
            first, for all ops).
    """
    for op in ops:
        _check_op(op)
    if _native is not None and implementation.backend().name == "c" and type(blocks) is dict:
        return _native.lookup_and_invert(
            root, blocks, list(keys), [(_CODES[op.action], op.path, op.path.encode(), op.cid, op.prev) for op in ops], check_keys, max_depth
        )
    tree = PartialTree(root, blocks, check_keys=check_keys, max_depth=max_depth)
    held: list[bytes | RepoStreamError | None] = []
    for key in keys:
        try:
            held.append(tree.get_bytes(key))
        except RepoStreamError as exc:
            held.append(exc)
            return held, None
    try:
        return held, invert(tree, ops)
    except RepoStreamError as exc:
        return held, exc
