"""Insert, update and delete on a :class:`~repo_stream.sync.partial.PartialTree`, with the exact
MST layer rules, so that the new root CID is the one the canonical tree of the new key set has.

Spec: atproto repository, "Merkle Search Tree": a key of layer L sits in the node of layer L on
its search path; keys of lower layers between two neighbouring layer-L keys form the subtree of
layer L-1 hung between them (a node with only ``l`` when it holds no key of layer L-1 itself);
empty ranges are null links; the root is the node of the highest layer present.

* **insert** of a key of layer L: down the search path to the node of layer L (creating the
  missing nodes of a null link's chain, or lifting the root when L is above it); there, the
  subtree that spans the key is *split* at the key, down its whole search path, into the parts
  left and right of it, which become the new entry's neighbours.
* **delete**: the key's entry is removed and its two neighbouring subtrees are *merged*, down
  the right spine of the left one and the left spine of the right one (as far as both exist).
  Nodes left with nothing become null links; a root left with only ``l`` gives way to it.
* **update**: the entry's record CID changes.

Only the nodes on those paths are read: a path through an unknown subtree raises
:class:`~repo_stream.errors.UnknownSubtreeError` naming it (for inversion: a missing proof block).
Everything is iterative; the changed nodes are re-encoded by :meth:`PartialTree.root`.
"""

from __future__ import annotations

from bisect import bisect_left

from ..core import messages
from .partial import Node, PartialTree, key_layer_of

__all__ = ["delete", "insert", "update"]


def _wrap(node: Node | bytes | None, layer: int, to_layer: int) -> Node | bytes | None:
    """Hang ``node`` (of ``layer``) under nodes with only ``l`` up to ``to_layer``."""
    if node is None:
        return None
    while layer < to_layer:
        layer += 1
        node = Node(layer, [], [], [node])
    return node


def _split(tree: PartialTree, top: Node | None, key: bytes, lo: bytes | None, hi: bytes | None) -> tuple[Node | None, Node | None]:
    """Split the subtree ``top`` (keys within ``(lo, hi)``) at ``key``, which it does not hold:
    return the subtrees of its keys below and above ``key`` (``None`` when empty)."""
    frames: list[tuple[Node, int]] = []
    node = top
    while node is not None:
        keys = node.keys
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:  # only in a forged tree: its layer says otherwise
            raise messages.key_exists(key, True)
        frames.append((node, i))
        child = tree.kid(node, i, lo, hi)
        if i:
            lo = keys[i - 1]
        if i < len(keys):
            hi = keys[i]
        node = child
    left: Node | None = None
    right: Node | None = None
    for node, i in reversed(frames):
        keys, vals, kids = node.keys, node.vals, node.kids
        lnode = Node(node.layer, keys[:i], vals[:i], [*kids[:i], left])
        rnode = Node(node.layer, keys[i:], vals[i:], [right, *kids[i + 1 :]])
        left = lnode if lnode.keys or lnode.kids[0] is not None else None
        right = rnode if rnode.keys or rnode.kids[0] is not None else None
    return left, right


def _merge(
    tree: PartialTree, node: Node, i: int, lo: bytes | None, hi: bytes | None
) -> Node | bytes | None:
    """Merge the subtrees in slots ``i`` and ``i + 1`` of ``node`` (keys within ``(lo, hi)``),
    whose separating entry ``i`` is being deleted; return the merged subtree."""
    keys = node.keys
    a_kid = node.kids[i]
    b_kid = node.kids[i + 1]
    if a_kid is None:
        return b_kid
    if b_kid is None:
        return a_kid
    a = tree.kid(node, i, lo, hi)
    b = tree.kid(node, i + 1, lo, hi)
    assert a is not None and b is not None
    # Bounds of a and b: a within (keys[i-1] or lo, keys[i]); b within (keys[i], keys[i+1] or hi).
    a_lo = keys[i - 1] if i else lo
    mid = keys[i]
    b_hi = keys[i + 1] if i + 1 < len(keys) else hi
    frames: list[tuple[Node, Node]] = []
    rest: Node | bytes | None = None
    while True:
        frames.append((a, b))
        a_last = a.kids[-1]
        b_first = b.kids[0]
        if a_last is None or b_first is None:
            rest = b_first if a_last is None else a_last
            break
        next_a = tree.kid(a, len(a.keys), a_lo, mid)
        next_b = tree.kid(b, 0, mid, b_hi)
        assert next_a is not None and next_b is not None
        if a.keys:
            a_lo = a.keys[-1]
        if b.keys:
            b_hi = b.keys[0]
        a, b = next_a, next_b
    merged: Node | bytes | None = rest
    for a, b in reversed(frames):
        merged = Node(a.layer, a.keys + b.keys, a.vals + b.vals, [*a.kids[:-1], merged, *b.kids[1:]])
    return merged


def insert(tree: PartialTree, key: bytes, cid: bytes) -> None:
    """Insert ``key`` (UTF-8 bytes) with record CID ``cid`` (raw bytes).

    Raises:
        KeyExistsError: the tree holds ``key`` already.
        UnknownSubtreeError: a node the insert must split is not in the slice.
        MstError: a node read on the way breaks an MST rule.
    """
    layer = key_layer_of(key)
    root = tree.root_node()
    if root.layer < 0:  # the empty tree
        tree.set_root_node(Node(layer, [key], [cid], [None, None]))
        return
    if layer > root.layer:
        left, right = _split(tree, root, key, None, None)
        tree.set_root_node(Node(layer, [key], [cid], [_wrap(left, root.layer, layer - 1), _wrap(right, root.layer, layer - 1)]))
        return
    node = root
    lo: bytes | None = None
    hi: bytes | None = None
    path: list[Node] = []
    while True:
        path.append(node)
        keys = node.keys
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            raise messages.key_exists(key, False)
        if node.layer == layer:
            left, right = _split(tree, tree.kid(node, i, lo, hi), key, keys[i - 1] if i else lo, keys[i] if i < len(keys) else hi)
            keys.insert(i, key)
            node.vals.insert(i, cid)
            node.kids[i] = left
            node.kids.insert(i + 1, right)
            break
        child = tree.kid(node, i, lo, hi)
        if child is None:
            node.kids[i] = _wrap(Node(layer, [key], [cid], [None, None]), layer, node.layer - 1)
            break
        if i:
            lo = keys[i - 1]
        if i < len(keys):
            hi = keys[i]
        node = child
    for changed in path:
        changed.cid = None


def _find(tree: PartialTree, key: bytes) -> tuple[list[tuple[Node, int]], bytes | None, bytes | None]:
    """The path from the root to the node holding ``key``: ``[(node, slot index)]`` (the last
    pair is the holding node and the entry's index) and that node's key bounds.

    Raises:
        KeyAbsentError: the tree does not hold ``key``.
    """
    layer = key_layer_of(key)
    node: Node | None = tree.root_node()
    lo: bytes | None = None
    hi: bytes | None = None
    path: list[tuple[Node, int]] = []
    while node is not None and node.layer >= layer:
        keys = node.keys
        i = bisect_left(keys, key)
        path.append((node, i))
        if i < len(keys) and keys[i] == key:
            return path, lo, hi
        if node.layer == layer:
            break
        child = tree.kid(node, i, lo, hi)
        if i:
            lo = keys[i - 1]
        if i < len(keys):
            hi = keys[i]
        node = child
    raise messages.key_absent(key)


def update(tree: PartialTree, key: bytes, cid: bytes) -> bytes:
    """Point ``key`` at record CID ``cid``; return the CID it had.

    Raises:
        KeyAbsentError: the tree does not hold ``key``. UnknownSubtreeError, MstError: as :func:`insert`.
    """
    path, _, _ = _find(tree, key)
    node, i = path[-1]
    old = node.vals[i]
    node.vals[i] = cid
    for changed, _ in path:
        changed.cid = None
    return old


def delete(tree: PartialTree, key: bytes) -> bytes:
    """Remove ``key``; return the record CID it had.

    Raises:
        KeyAbsentError: the tree does not hold ``key``.
        UnknownSubtreeError: a node the delete must merge is not in the slice (or, when the root
            is left with only ``l``, that subtree's root).
        MstError: as :func:`insert`.
    """
    path, lo, hi = _find(tree, key)
    node, i = path[-1]
    old = node.vals[i]
    merged = _merge(tree, node, i, lo, hi)
    del node.keys[i]
    del node.vals[i]
    node.kids[i] = merged
    del node.kids[i + 1]
    for changed, _ in path:
        changed.cid = None
    # A node left with neither entries nor ``l`` becomes a null link in its parent.
    for j in range(len(path) - 1, 0, -1):
        child, _ = path[j]
        if child.keys or child.kids[0] is not None:
            break
        parent, slot = path[j - 1]
        parent.kids[slot] = None
    # The root: the highest layer present. A root with only ``l`` gives way to it.
    root = tree.root_node()
    while not root.keys and root.kids[0] is not None:
        sub = tree.kid(root, 0, None, None)
        assert sub is not None
        root = sub
    if not root.keys and root.kids[0] is None:
        root = Node(-1, [], [], [None])
    tree.set_root_node(root)
    return old
