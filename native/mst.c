/* Partial MSTs for sync 1.1 verification (spec: atproto repository, "Merkle Search Tree"; atproto
 * sync, "Commit Validation"): the C twin of repo_stream/sync/partial.py, edit.py and invert.py.
 *
 * - load_node(): one node decoded and checked as repo_stream.sync.partial.load_node does (the
 *   strict decoder and the entry key rules are walk.c's, shared with the walker).
 * - encode_node(): a node block and its CID, as repo_stream.sync.partial.encode_node.
 * - lookup_and_invert(): a commit's whole tree work, as repo_stream.sync.invert.lookup_and_invert:
 *   the partial tree is held here (nodes in an arena, no Python object per node), keys looked up,
 *   the inverse ops applied with the exact layer rules (split, merge, wrap: the same steps as
 *   edit.py, reading the same nodes in the same order, so the same first error), the changed
 *   nodes re-encoded and hashed to the new root CID.
 *
 * Same results, same errors and messages (built by repo_stream/core/messages.py). The input is
 * hostile: nothing recurses (explicit stacks, bounded by the layers: a loaded child is exactly one
 * layer below its parent, a layer is 0..128), every length is checked (the decoder reads only
 * inside a block), and the arena is counted against ARENA_LIMIT. A call's state is its own (see
 * Tree): calls made while another runs (another thread, while a message is built) are safe. */
#include "native.h"

#define ARENA_CHUNK (64 * 1024)
#define ARENA_LIMIT ((size_t)512 << 20) /* bytes: far over what a 2 MB CAR slice can need */
#define MAX_PATH 136                    /* > 129 layers (0..128) and the empty root's -1 */

/* --- guard ------------------------------------------------------------------------------------- */

static int ready(void) {
    if (rs_messages == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "repo_stream._native.setup() was not called");
        return -1;
    }
    return 0;
}

/* --- the arena ------------------------------------------------------------------------------------ */

typedef struct Chunk {
    struct Chunk *next;
    size_t used, size;
    max_align_t data[];
} Chunk;

typedef struct {
    Chunk *head;
    size_t total; /* bytes allocated from the heap, counted against ARENA_LIMIT */
} Arena;

static void *arena_alloc(Arena *a, size_t n) {
    n = (n + 15) & ~(size_t)15;
    if (n == 0) n = 16;
    Chunk *c = a->head;
    if (c == NULL || c->size - c->used < n) {
        size_t size = n > ARENA_CHUNK ? n : ARENA_CHUNK;
        if (size > ARENA_LIMIT || a->total > ARENA_LIMIT - size) {
            PyErr_NoMemory();
            return NULL;
        }
        c = PyMem_Malloc(sizeof(Chunk) + size);
        if (c == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        c->used = 0;
        c->size = size;
        c->next = a->head;
        a->head = c;
        a->total += size;
    }
    void *p = (uint8_t *)c->data + c->used;
    c->used += n;
    return p;
}

static void arena_free(Arena *a) {
    Chunk *c = a->head;
    while (c != NULL) {
        Chunk *next = c->next;
        PyMem_Free(c);
        c = next;
    }
    a->head = NULL;
    a->total = 0;
}

/* --- nodes ---------------------------------------------------------------------------------------- */

typedef RsBytes Bytes;

typedef struct TNode TNode;

/* A subtree link: none, a CID not loaded yet (its block may be absent), or a node. */
enum { KID_NONE = 0, KID_CID = 1, KID_NODE = 2 };
typedef struct {
    int kind;
    Bytes cid;
    TNode *node;
} Kid;

/* keys[i], vals[i] for i < n; kids[0..n]. cid.p is NULL once an edit changed the node. layer is -1
 * only for the empty tree's root. */
struct TNode {
    int layer;
    size_t n, cap;
    Bytes *keys, *vals;
    Kid *kids;
    Bytes cid;
};

/* One call's state. Nothing is shared between calls (a message builder runs Python code, which
 * may switch threads: another call may run meanwhile), so no call can disturb another. */
typedef struct {
    Arena arena;
    PyObject *blocks; /* dict: raw CID bytes -> block bytes (when slice is NULL) */
    const RsSliceBlock *slice; /* or the blocks of a buffer the caller holds, sorted by CID, distinct */
    size_t n_slice;
    Bytes root_cid;
    TNode *root;
    int check_keys, max_depth;
    RsNodeEntry *entries; /* scratch: the node being decoded (grown as needed, bounded by its block) */
    size_t cap_entries;
    RsKeys keys; /* scratch: its keys */
} Tree;

static void tree_free(Tree *t) {
    arena_free(&t->arena);
    PyMem_Free(t->entries);
    t->entries = NULL;
    t->cap_entries = 0;
    rs_keys_free(&t->keys);
}

static const uint8_t EMPTY_NODE[] = {0xa2, 0x61, 'e', 0x80, 0x61, 'l', 0xf6}; /* {"e": [], "l": null} */

static int copy_bytes(Tree *t, Bytes *to, const uint8_t *p, size_t n) {
    uint8_t *q = arena_alloc(&t->arena, n);
    if (q == NULL) return -1;
    if (n) memcpy(q, p, n);
    to->p = q;
    to->n = n;
    return 0;
}

/* A node with room for cap entries; n set, arrays uninitialised. */
static TNode *new_node(Tree *t, int layer, size_t n, size_t cap) {
    if (cap < n) cap = n;
    if (cap > (SIZE_MAX / 4) / sizeof(Kid)) {
        PyErr_NoMemory();
        return NULL;
    }
    TNode *x = arena_alloc(&t->arena, sizeof(TNode));
    if (x == NULL) return NULL;
    x->layer = layer;
    x->n = n;
    x->cap = cap;
    x->keys = arena_alloc(&t->arena, cap * sizeof(Bytes));
    x->vals = arena_alloc(&t->arena, cap * sizeof(Bytes));
    x->kids = arena_alloc(&t->arena, (cap + 1) * sizeof(Kid));
    if (x->keys == NULL || x->vals == NULL || x->kids == NULL) return NULL;
    x->cid.p = NULL;
    x->cid.n = 0;
    return x;
}

static int bytes_cmp(const uint8_t *a, size_t an, const uint8_t *b, size_t bn) {
    int c = an && bn ? memcmp(a, b, an < bn ? an : bn) : 0;
    if (c) return c;
    return an < bn ? -1 : an > bn ? 1 : 0;
}

static int bcmp_(Bytes a, Bytes b) { return bytes_cmp(a.p, a.n, b.p, b.n); }

static int bytes_eq(Bytes a, Bytes b) { return a.n == b.n && (a.n == 0 || memcmp(a.p, b.p, a.n) == 0); }

/* The first i with keys[i] >= key (bisect_left). */
static size_t bisect(const TNode *x, Bytes key) {
    size_t lo = 0, hi = x->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (bcmp_(x->keys[mid], key) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int key_layer_of(Bytes key) {
    uint8_t d[32];
    rs_sha256(key.p, key.n, d);
    return rs_digest_layer(d);
}

/* --- loading a node ---------------------------------------------------------------------------- */

/* KeyOrderError(key, last): each decoded strictly, or with "replace" when asked (a bound from the
 * caller). -1. */
static int key_order(const uint8_t *key, size_t key_len, int replace_key, const uint8_t *last, size_t last_len, int replace_last) {
    PyObject *k = PyUnicode_DecodeUTF8((const char *)key, (Py_ssize_t)key_len, replace_key ? "replace" : "strict");
    if (k == NULL) return -1;
    PyObject *l = PyUnicode_DecodeUTF8((const char *)last, (Py_ssize_t)last_len, replace_last ? "replace" : "strict");
    if (l == NULL) {
        Py_DECREF(k);
        return -1;
    }
    return rs_raise("key_order", "(NN)", k, l);
}

/* Decode and check the node `block` (its CID `cid`, `expected` layer or -1 for the root, keys
 * strictly between lo and hi when given) into a new node, as partial.load_node. NULL with the
 * error. */
static TNode *decode_checked(Tree *t, const uint8_t *cid, size_t cid_len, const uint8_t *block, size_t len, int expected, const Bytes *lo,
                             const Bytes *hi) {
    const uint8_t *left;
    size_t left_len, count;
    if (rs_decode_node(&t->entries, &t->cap_entries, 1, cid, cid_len, block, len, &left, &left_len, &count) < 0) return NULL;
    int is_root = expected < 0;
    TNode *x;
    if (count == 0) {
        if (left == NULL) {
            if (!is_root) {
                rs_raise("empty_node", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
                return NULL;
            }
            if ((x = new_node(t, -1, 0, 0)) == NULL) return NULL; /* the empty repo */
            x->kids[0].kind = KID_NONE;
        } else {
            if (is_root) {
                rs_raise("empty_root", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
                return NULL;
            }
            if (expected == 0) {
                rs_raise("left_at_layer0", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
                return NULL;
            }
            if ((x = new_node(t, expected, 0, 0)) == NULL) return NULL;
            x->kids[0].kind = KID_CID;
            x->kids[0].node = NULL;
            if (copy_bytes(t, &x->kids[0].cid, left, left_len) < 0) return NULL;
        }
        return copy_bytes(t, &x->cid, cid, cid_len) < 0 ? NULL : x;
    }
    if ((x = new_node(t, expected, count, count)) == NULL) return NULL;
    x->kids[0].kind = left ? KID_CID : KID_NONE;
    x->kids[0].node = NULL;
    if (left && copy_bytes(t, &x->kids[0].cid, left, left_len) < 0) return NULL;
    RsKeys *r = &t->keys;
    rs_keys_start(r, expected, t->check_keys);
    for (size_t j = 0; j < count; j++) {
        const RsNodeEntry *e = &t->entries[j];
        if (rs_node_key(r, cid, cid_len, e, -1) < 0) return NULL;
        if (j > 0 && bytes_cmp(r->key, r->key_len, r->prev, r->prev_len) <= 0) {
            key_order(r->key, r->key_len, 0, r->prev, r->prev_len, 0);
            return NULL;
        }
        Kid *k = &x->kids[j + 1];
        k->kind = e->has_t ? KID_CID : KID_NONE;
        k->node = NULL;
        if (copy_bytes(t, &x->keys[j], r->key, r->key_len) < 0 || copy_bytes(t, &x->vals[j], e->v, e->v_len) < 0 ||
            (e->has_t && copy_bytes(t, &k->cid, e->t, e->t_len) < 0))
            return NULL;
        rs_keys_advance(r);
    }
    int layer = r->layer;
    if (layer != expected && !is_root) {
        rs_raise("wrong_layer", "(y#ii)", (const char *)cid, (Py_ssize_t)cid_len, layer, expected);
        return NULL;
    }
    if (left != NULL && layer == 0) {
        rs_raise("left_at_layer0", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
        return NULL;
    }
    Bytes first = x->keys[0], final = x->keys[count - 1];
    if (lo && bcmp_(first, *lo) <= 0) {
        key_order(first.p, first.n, 0, lo->p, lo->n, 1);
        return NULL;
    }
    if (hi && bcmp_(final, *hi) >= 0) {
        key_order(hi->p, hi->n, 1, final.p, final.n, 0);
        return NULL;
    }
    x->layer = layer;
    return copy_bytes(t, &x->cid, cid, cid_len) < 0 ? NULL : x;
}

/* PartialTree._load: the node `cid` from the slice, decoded and checked. */
static TNode *load(Tree *t, Bytes cid, int expected, const Bytes *lo, const Bytes *hi) {
    if (cid.n < 2 || cid.p[0] != 0x01 || cid.p[1] != 0x71) {
        rs_raise("node_link_codec", "(y#)", (const char *)cid.p, (Py_ssize_t)cid.n);
        return NULL;
    }
    if (t->slice != NULL) {
        const RsSliceBlock *found = rs_slice_find(t->slice, t->n_slice, cid.p, cid.n);
        if (found == NULL) {
            rs_raise("unknown_subtree", "(y#i)", (const char *)cid.p, (Py_ssize_t)cid.n, expected);
            return NULL;
        }
        /* the caller holds the buffer (a message builder may run Python code meanwhile) */
        return decode_checked(t, cid.p, cid.n, found->block, found->len, expected, lo, hi);
    }
    PyObject *key = PyBytes_FromStringAndSize((const char *)cid.p, (Py_ssize_t)cid.n);
    if (key == NULL) return NULL;
    PyObject *block = PyDict_GetItemWithError(t->blocks, key); /* borrowed */
    Py_DECREF(key);
    if (block == NULL) {
        if (!PyErr_Occurred()) rs_raise("unknown_subtree", "(y#i)", (const char *)cid.p, (Py_ssize_t)cid.n, expected);
        return NULL;
    }
    if (!PyBytes_Check(block)) {
        PyErr_SetString(PyExc_TypeError, "lookup_and_invert(): blocks must map bytes to bytes");
        return NULL;
    }
    Py_INCREF(block); /* a message builder runs Python code: keep the bytes while reading them */
    TNode *x = decode_checked(t, cid.p, cid.n, (const uint8_t *)PyBytes_AS_STRING(block), (size_t)PyBytes_GET_SIZE(block), expected, lo, hi);
    Py_DECREF(block);
    return x;
}

static TNode *root_node(Tree *t) {
    if (t->root == NULL) {
        TNode *x = load(t, t->root_cid, -1, NULL, NULL);
        if (x == NULL) return NULL;
        if (x->layer + 1 > t->max_depth) {
            rs_raise("partial_too_deep", "(y#ii)", (const char *)t->root_cid.p, (Py_ssize_t)t->root_cid.n, x->layer, t->max_depth);
            return NULL;
        }
        t->root = x;
    }
    return t->root;
}

/* PartialTree.kid: the subtree in slot i of x (loaded if needed) in *out (NULL: none). lo and hi
 * bound x's own keys. 0, or -1 with the error. */
static int kid(Tree *t, TNode *x, size_t i, const Bytes *lo, const Bytes *hi, TNode **out) {
    Kid *k = &x->kids[i];
    if (k->kind == KID_NONE) {
        *out = NULL;
        return 0;
    }
    if (k->kind == KID_NODE) {
        *out = k->node;
        return 0;
    }
    const Bytes *sub_lo = i ? &x->keys[i - 1] : lo;
    const Bytes *sub_hi = i < x->n ? &x->keys[i] : hi;
    TNode *loaded = load(t, k->cid, x->layer - 1, sub_lo, sub_hi);
    if (loaded == NULL) return -1;
    k->kind = KID_NODE;
    k->node = loaded;
    *out = loaded;
    return 0;
}

/* After descending into slot i of x: the bounds of the child (keys[i-1], keys[i]). */
static void narrow(const TNode *x, size_t i, const Bytes **lo, const Bytes **hi) {
    if (i) *lo = &x->keys[i - 1];
    if (i < x->n) *hi = &x->keys[i];
}

static Kid kid_node(TNode *x) {
    Kid k = {x ? KID_NODE : KID_NONE, {NULL, 0}, x};
    return k;
}

/* --- reading ------------------------------------------------------------------------------------- */

/* PartialTree.get_bytes: *found 1 and *val set, or *found 0 (proven absent). */
static int get(Tree *t, Bytes key, int layer, int *found, Bytes *val) {
    *found = 0;
    TNode *x = root_node(t);
    if (x == NULL) return -1;
    const Bytes *lo = NULL, *hi = NULL;
    while (x != NULL) {
        if (x->layer < layer) return 0;
        size_t i = bisect(x, key);
        if (i < x->n && bytes_eq(x->keys[i], key)) {
            *found = 1;
            *val = x->vals[i];
            return 0;
        }
        if (x->layer == layer) return 0;
        TNode *child;
        if (kid(t, x, i, lo, hi, &child) < 0) return -1;
        narrow(x, i, &lo, &hi);
        x = child;
    }
    return 0;
}

/* --- edits (edit.py) ------------------------------------------------------------------------------ */

/* _wrap: hang k (of layer) under nodes with only l up to to_layer. */
static int wrap(Tree *t, Kid *k, int layer, int to_layer) {
    if (k->kind == KID_NONE) return 0;
    while (layer < to_layer) {
        layer++;
        TNode *w = new_node(t, layer, 0, 0);
        if (w == NULL) return -1;
        w->kids[0] = *k;
        *k = kid_node(w);
    }
    return 0;
}

/* A node of entries [from, to) of x; its kids are the caller's to set. */
static TNode *slice_node(Tree *t, int layer, const TNode *x, size_t from, size_t to) {
    TNode *y = new_node(t, layer, to - from, to - from);
    if (y == NULL) return NULL;
    for (size_t j = from; j < to; j++) {
        y->keys[j - from] = x->keys[j];
        y->vals[j - from] = x->vals[j];
    }
    return y;
}

static int has_content(const TNode *x) { return x->n > 0 || x->kids[0].kind != KID_NONE; }

/* _split: the subtree top (keys within (lo, hi)), which does not hold key, into its parts left
 * and right of key (NULL when empty). */
static int split(Tree *t, TNode *top, Bytes key, const Bytes *lo, const Bytes *hi, TNode **left_out, TNode **right_out) {
    TNode *frames[MAX_PATH];
    size_t slots[MAX_PATH];
    size_t nf = 0;
    TNode *x = top;
    while (x != NULL) {
        size_t i = bisect(x, key);
        if (i < x->n && bytes_eq(x->keys[i], key)) {
            rs_raise("key_exists", "(y#O)", (const char *)key.p, (Py_ssize_t)key.n, Py_True);
            return -1;
        }
        if (nf == MAX_PATH) { /* unreachable: each step goes one layer down */
            PyErr_SetString(PyExc_RuntimeError, "MST split deeper than the layers allow");
            return -1;
        }
        frames[nf] = x;
        slots[nf++] = i;
        TNode *child;
        if (kid(t, x, i, lo, hi, &child) < 0) return -1;
        narrow(x, i, &lo, &hi);
        x = child;
    }
    TNode *left = NULL, *right = NULL;
    while (nf > 0) {
        nf--;
        x = frames[nf];
        size_t i = slots[nf];
        TNode *l = slice_node(t, x->layer, x, 0, i);
        TNode *r = slice_node(t, x->layer, x, i, x->n);
        if (l == NULL || r == NULL) return -1;
        for (size_t j = 0; j < i; j++) l->kids[j] = x->kids[j];
        l->kids[i] = kid_node(left);
        r->kids[0] = kid_node(right);
        for (size_t j = i + 1; j <= x->n; j++) r->kids[j - i] = x->kids[j];
        left = has_content(l) ? l : NULL;
        right = has_content(r) ? r : NULL;
    }
    *left_out = left;
    *right_out = right;
    return 0;
}

/* _merge: the subtrees in slots i and i+1 of x (keys within (lo, hi)), whose separating entry i is
 * being deleted, merged into *out. */
static int merge(Tree *t, TNode *x, size_t i, const Bytes *lo, const Bytes *hi, Kid *out) {
    if (x->kids[i].kind == KID_NONE) {
        *out = x->kids[i + 1];
        return 0;
    }
    if (x->kids[i + 1].kind == KID_NONE) {
        *out = x->kids[i];
        return 0;
    }
    TNode *a, *b;
    if (kid(t, x, i, lo, hi, &a) < 0 || kid(t, x, i + 1, lo, hi, &b) < 0) return -1;
    const Bytes *a_lo = i ? &x->keys[i - 1] : lo;
    const Bytes *mid = &x->keys[i];
    const Bytes *b_hi = i + 1 < x->n ? &x->keys[i + 1] : hi;
    TNode *fa[MAX_PATH], *fb[MAX_PATH];
    size_t nf = 0;
    Kid rest;
    for (;;) {
        if (nf == MAX_PATH) {
            PyErr_SetString(PyExc_RuntimeError, "MST merge deeper than the layers allow");
            return -1;
        }
        fa[nf] = a;
        fb[nf++] = b;
        Kid a_last = a->kids[a->n], b_first = b->kids[0];
        if (a_last.kind == KID_NONE || b_first.kind == KID_NONE) {
            rest = a_last.kind == KID_NONE ? b_first : a_last;
            break;
        }
        TNode *next_a, *next_b;
        if (kid(t, a, a->n, a_lo, mid, &next_a) < 0 || kid(t, b, 0, mid, b_hi, &next_b) < 0) return -1;
        if (a->n) a_lo = &a->keys[a->n - 1];
        if (b->n) b_hi = &b->keys[0];
        a = next_a;
        b = next_b;
    }
    Kid merged = rest;
    while (nf > 0) {
        nf--;
        a = fa[nf];
        b = fb[nf];
        TNode *m = new_node(t, a->layer, a->n + b->n, a->n + b->n);
        if (m == NULL) return -1;
        for (size_t j = 0; j < a->n; j++) {
            m->keys[j] = a->keys[j];
            m->vals[j] = a->vals[j];
            m->kids[j] = a->kids[j];
        }
        m->kids[a->n] = merged;
        for (size_t j = 0; j < b->n; j++) {
            m->keys[a->n + j] = b->keys[j];
            m->vals[a->n + j] = b->vals[j];
            m->kids[a->n + 1 + j] = b->kids[j + 1];
        }
        merged = kid_node(m);
    }
    *out = merged;
    return 0;
}

/* Room for one more entry in x (its arrays moved to a bigger place in the arena when full). */
static int grow(Tree *t, TNode *x) {
    if (x->n < x->cap) return 0;
    size_t cap = x->cap * 2 + 4;
    Bytes *keys = arena_alloc(&t->arena, cap * sizeof(Bytes));
    Bytes *vals = arena_alloc(&t->arena, cap * sizeof(Bytes));
    Kid *kids = arena_alloc(&t->arena, (cap + 1) * sizeof(Kid));
    if (keys == NULL || vals == NULL || kids == NULL) return -1;
    if (x->n) {
        memcpy(keys, x->keys, x->n * sizeof(Bytes));
        memcpy(vals, x->vals, x->n * sizeof(Bytes));
    }
    memcpy(kids, x->kids, (x->n + 1) * sizeof(Kid));
    x->keys = keys;
    x->vals = vals;
    x->kids = kids;
    x->cap = cap;
    return 0;
}

static int insert(Tree *t, Bytes key, int layer, Bytes cid) {
    TNode *root = root_node(t);
    if (root == NULL) return -1;
    if (root->layer < 0) { /* the empty tree */
        TNode *x = new_node(t, layer, 1, 1);
        if (x == NULL) return -1;
        x->keys[0] = key;
        x->vals[0] = cid;
        x->kids[0] = x->kids[1] = kid_node(NULL);
        t->root = x;
        return 0;
    }
    if (layer > root->layer) {
        TNode *left, *right;
        if (split(t, root, key, NULL, NULL, &left, &right) < 0) return -1;
        TNode *x = new_node(t, layer, 1, 1);
        if (x == NULL) return -1;
        x->keys[0] = key;
        x->vals[0] = cid;
        x->kids[0] = kid_node(left);
        x->kids[1] = kid_node(right);
        if (wrap(t, &x->kids[0], root->layer, layer - 1) < 0 || wrap(t, &x->kids[1], root->layer, layer - 1) < 0) return -1;
        t->root = x;
        return 0;
    }
    TNode *x = root;
    const Bytes *lo = NULL, *hi = NULL;
    TNode *path[MAX_PATH];
    size_t np = 0;
    for (;;) {
        if (np == MAX_PATH) {
            PyErr_SetString(PyExc_RuntimeError, "MST path deeper than the layers allow");
            return -1;
        }
        path[np++] = x;
        size_t i = bisect(x, key);
        if (i < x->n && bytes_eq(x->keys[i], key)) {
            rs_raise("key_exists", "(y#O)", (const char *)key.p, (Py_ssize_t)key.n, Py_False);
            return -1;
        }
        if (x->layer == layer) {
            TNode *sub, *left, *right;
            if (kid(t, x, i, lo, hi, &sub) < 0) return -1;
            const Bytes *sub_lo = i ? &x->keys[i - 1] : lo;
            const Bytes *sub_hi = i < x->n ? &x->keys[i] : hi;
            if (split(t, sub, key, sub_lo, sub_hi, &left, &right) < 0 || grow(t, x) < 0) return -1;
            memmove(&x->keys[i + 1], &x->keys[i], (x->n - i) * sizeof(Bytes));
            memmove(&x->vals[i + 1], &x->vals[i], (x->n - i) * sizeof(Bytes));
            memmove(&x->kids[i + 2], &x->kids[i + 1], (x->n - i) * sizeof(Kid));
            x->keys[i] = key;
            x->vals[i] = cid;
            x->kids[i] = kid_node(left);
            x->kids[i + 1] = kid_node(right);
            x->n++;
            break;
        }
        TNode *child;
        if (kid(t, x, i, lo, hi, &child) < 0) return -1;
        if (child == NULL) {
            TNode *leaf = new_node(t, layer, 1, 1);
            if (leaf == NULL) return -1;
            leaf->keys[0] = key;
            leaf->vals[0] = cid;
            leaf->kids[0] = leaf->kids[1] = kid_node(NULL);
            Kid k = kid_node(leaf);
            if (wrap(t, &k, layer, x->layer - 1) < 0) return -1;
            x->kids[i] = k;
            break;
        }
        narrow(x, i, &lo, &hi);
        x = child;
    }
    for (size_t j = 0; j < np; j++) path[j]->cid.p = NULL;
    return 0;
}

/* _find: the path to the node holding key (nodes and slots), and that node's bounds. */
static int find(Tree *t, Bytes key, int layer, TNode **path, size_t *slots, size_t *np, const Bytes **lo_out, const Bytes **hi_out) {
    TNode *x = root_node(t);
    if (x == NULL) return -1;
    const Bytes *lo = NULL, *hi = NULL;
    *np = 0;
    while (x != NULL && x->layer >= layer) {
        size_t i = bisect(x, key);
        if (*np == MAX_PATH) {
            PyErr_SetString(PyExc_RuntimeError, "MST path deeper than the layers allow");
            return -1;
        }
        path[*np] = x;
        slots[(*np)++] = i;
        if (i < x->n && bytes_eq(x->keys[i], key)) {
            *lo_out = lo;
            *hi_out = hi;
            return 0;
        }
        if (x->layer == layer) break;
        TNode *child;
        if (kid(t, x, i, lo, hi, &child) < 0) return -1;
        narrow(x, i, &lo, &hi);
        x = child;
    }
    rs_raise("key_absent", "(y#)", (const char *)key.p, (Py_ssize_t)key.n);
    return -1;
}

static int update(Tree *t, Bytes key, int layer, Bytes cid, Bytes *old) {
    TNode *path[MAX_PATH];
    size_t slots[MAX_PATH], np;
    const Bytes *lo, *hi;
    if (find(t, key, layer, path, slots, &np, &lo, &hi) < 0) return -1;
    TNode *x = path[np - 1];
    size_t i = slots[np - 1];
    *old = x->vals[i];
    x->vals[i] = cid;
    for (size_t j = 0; j < np; j++) path[j]->cid.p = NULL;
    return 0;
}

static int delete(Tree *t, Bytes key, int layer, Bytes *old) {
    TNode *path[MAX_PATH];
    size_t slots[MAX_PATH], np;
    const Bytes *lo, *hi;
    if (find(t, key, layer, path, slots, &np, &lo, &hi) < 0) return -1;
    TNode *x = path[np - 1];
    size_t i = slots[np - 1];
    *old = x->vals[i];
    Kid merged;
    if (merge(t, x, i, lo, hi, &merged) < 0) return -1;
    memmove(&x->keys[i], &x->keys[i + 1], (x->n - i - 1) * sizeof(Bytes));
    memmove(&x->vals[i], &x->vals[i + 1], (x->n - i - 1) * sizeof(Bytes));
    x->kids[i] = merged;
    memmove(&x->kids[i + 1], &x->kids[i + 2], (x->n - i - 1) * sizeof(Kid));
    x->n--;
    for (size_t j = 0; j < np; j++) path[j]->cid.p = NULL;
    /* A node left with neither entries nor l becomes a null link in its parent. */
    for (size_t j = np - 1; j > 0; j--) {
        if (has_content(path[j])) break;
        path[j - 1]->kids[slots[j - 1]] = kid_node(NULL);
    }
    /* The root: the highest layer present. A root with only l gives way to it. */
    TNode *root = root_node(t);
    if (root == NULL) return -1;
    while (root->n == 0 && root->kids[0].kind != KID_NONE) {
        TNode *sub;
        if (kid(t, root, 0, NULL, NULL, &sub) < 0) return -1;
        root = sub;
    }
    if (root->n == 0 && root->kids[0].kind == KID_NONE) {
        if ((root = new_node(t, -1, 0, 0)) == NULL) return -1;
        root->kids[0] = kid_node(NULL);
    }
    t->root = root;
    return 0;
}

/* --- encoding ------------------------------------------------------------------------------------- */

typedef struct {
    uint8_t *buf;
    size_t len, cap;
} Out;

static int put(Out *o, const void *p, size_t n) {
    if (n > o->cap - o->len) { /* grow (rarely: the buffer is kept for the whole call) */
        if (n > ((size_t)1 << 40) - o->len) {
            PyErr_NoMemory();
            return -1;
        }
        if (rs_reserve((void **)&o->buf, &o->cap, o->len + n, 1) < 0) return -1;
    }
    if (n) memcpy(o->buf + o->len, p, n);
    o->len += n;
    return 0;
}

static int put_head(Out *o, int major, uint64_t n) {
    uint8_t h[9];
    size_t len;
    uint8_t m = (uint8_t)(major << 5);
    if (n < 24) {
        h[0] = m | (uint8_t)n;
        len = 1;
    } else if (n < 0x100) {
        h[0] = m | 24;
        h[1] = (uint8_t)n;
        len = 2;
    } else if (n < 0x10000) {
        h[0] = m | 25;
        h[1] = (uint8_t)(n >> 8);
        h[2] = (uint8_t)n;
        len = 3;
    } else if (n < 0x100000000ULL) {
        h[0] = m | 26;
        for (int i = 0; i < 4; i++) h[1 + i] = (uint8_t)(n >> (24 - 8 * i));
        len = 5;
    } else {
        h[0] = m | 27;
        for (int i = 0; i < 8; i++) h[1 + i] = (uint8_t)(n >> (56 - 8 * i));
        len = 9;
    }
    return put(o, h, len);
}

/* A link (tag 42, bytes 0x00 + CID), or null when cid is NULL. */
static int put_link(Out *o, const Bytes *cid) {
    if (cid == NULL) return put(o, "\xf6", 1);
    if (put(o, "\xd8\x2a", 2) < 0 || put_head(o, 2, (uint64_t)cid->n + 1) < 0 || put(o, "", 1) < 0) return -1;
    return put(o, cid->p, cid->n);
}

/* encode_tree_node into o (emptied first): {e: [{k, p, t, v}...], l}, maximal prefix compression. */
static int encode(Out *o, const Bytes *left, size_t n, const Bytes *keys, const Bytes *vals, const Bytes *const *rights) {
    o->len = 0;
    if (put(o, "\xa2\x61\x65", 3) < 0 || put_head(o, 4, (uint64_t)n) < 0) return -1;
    for (size_t i = 0; i < n; i++) {
        Bytes key = keys[i];
        size_t p = 0;
        if (i > 0) {
            Bytes prev = keys[i - 1];
            size_t m = prev.n < key.n ? prev.n : key.n;
            while (p < m && prev.p[p] == key.p[p]) p++;
        }
        if (put(o, "\xa4\x61k", 3) < 0 || put_head(o, 2, key.n - p) < 0 || put(o, key.p + p, key.n - p) < 0 || put(o, "\x61p", 2) < 0 ||
            put_head(o, 0, p) < 0 || put(o, "\x61t", 2) < 0 || put_link(o, rights[i]) < 0 || put(o, "\x61v", 2) < 0 || put_link(o, &vals[i]) < 0)
            return -1;
    }
    if (put(o, "\x61l", 2) < 0 || put_link(o, left) < 0) return -1;
    return 0;
}

static const Bytes *kid_link(const Kid *k) {
    if (k->kind == KID_NONE) return NULL;
    if (k->kind == KID_CID) return &k->cid;
    return &k->node->cid;
}

/* PartialTree.root: the root CID, the changed nodes re-encoded in post-order (explicit stack). */
static int tree_root(Tree *t, Bytes *out) {
    TNode *root = t->root;
    if (root == NULL) {
        *out = t->root_cid;
        return 0;
    }
    if (root->cid.p != NULL) {
        *out = root->cid;
        return 0;
    }
    /* Stack items: a node and whether its children are done. The changed nodes are those on the
     * edit paths and those the edits made: each layer's at most once per op on a path, so the
     * stack is bounded by the nodes made (all in the arena); it grows as needed. */
    typedef struct {
        TNode *x;
        int ready;
    } Item;
    Item *stack = NULL;
    size_t n = 0, cap = 0;
    Out o = {NULL, 0, 0};
    const Bytes **rights = NULL;
    size_t cap_rights = 0;
    int rc = -1;
    if (rs_reserve((void **)&stack, &cap, 1, sizeof(Item)) < 0) goto done;
    stack[n++] = (Item){root, 0};
    while (n > 0) {
        Item it = stack[--n];
        TNode *x = it.x;
        if (x->cid.p != NULL) continue;
        if (!it.ready) {
            if (rs_reserve((void **)&stack, &cap, n + x->n + 2, sizeof(Item)) < 0) goto done;
            stack[n++] = (Item){x, 1};
            for (size_t j = 0; j <= x->n; j++)
                if (x->kids[j].kind == KID_NODE && x->kids[j].node->cid.p == NULL) stack[n++] = (Item){x->kids[j].node, 0};
            continue;
        }
        uint8_t cid[36];
        memcpy(cid, RS_CID_PREFIX, 4);
        if (x->layer < 0) {
            rs_sha256(EMPTY_NODE, sizeof EMPTY_NODE, cid + 4);
        } else {
            if (rs_reserve((void **)&rights, &cap_rights, x->n + 1, sizeof(Bytes *)) < 0) goto done;
            for (size_t j = 0; j < x->n; j++) rights[j] = kid_link(&x->kids[j + 1]);
            if (encode(&o, kid_link(&x->kids[0]), x->n, x->keys, x->vals, rights) < 0) goto done;
            rs_sha256(o.buf, o.len, cid + 4);
        }
        if (copy_bytes(t, &x->cid, cid, 36) < 0) goto done;
    }
    *out = root->cid;
    rc = 0;
done:
    PyMem_Free(stack);
    PyMem_Free(o.buf);
    PyMem_Free(rights);
    return rc;
}

/* --- entry points ----------------------------------------------------------------------------------- */

static PyObject *bytes_of(Bytes b) { return PyBytes_FromStringAndSize((const char *)b.p, (Py_ssize_t)b.n); }

static PyObject *kid_object(const Kid *k) {
    if (k->kind == KID_NONE) Py_RETURN_NONE;
    return bytes_of(k->cid);
}

/* A bound argument: None or bytes. */
static int bound_arg(PyObject *o, const char *name, Bytes *b, const Bytes **out) {
    if (o == Py_None) {
        *out = NULL;
        return 0;
    }
    if (!PyBytes_Check(o)) {
        PyErr_Format(PyExc_TypeError, "load_node() argument '%s' must be bytes or None", name);
        return -1;
    }
    b->p = (const uint8_t *)PyBytes_AS_STRING(o);
    b->n = (size_t)PyBytes_GET_SIZE(o);
    *out = b;
    return 0;
}

static PyObject *node_tuple(const TNode *x) {
    PyObject *keys = PyList_New((Py_ssize_t)x->n), *vals = PyList_New((Py_ssize_t)x->n), *kids = PyList_New((Py_ssize_t)x->n + 1);
    if (keys == NULL || vals == NULL || kids == NULL) goto fail;
    for (size_t j = 0; j <= x->n; j++) {
        PyObject *k = kid_object(&x->kids[j]);
        if (k == NULL) goto fail;
        PyList_SET_ITEM(kids, (Py_ssize_t)j, k);
    }
    for (size_t j = 0; j < x->n; j++) {
        PyObject *k = bytes_of(x->keys[j]);
        if (k == NULL) goto fail;
        PyList_SET_ITEM(keys, (Py_ssize_t)j, k);
        PyObject *v = bytes_of(x->vals[j]);
        if (v == NULL) goto fail;
        PyList_SET_ITEM(vals, (Py_ssize_t)j, v);
    }
    return Py_BuildValue("(iNNN)", x->layer, keys, vals, kids);
fail:
    /* a list's unset slots are NULL: Py_DECREF of a list skips them */
    Py_XDECREF(keys);
    Py_XDECREF(vals);
    Py_XDECREF(kids);
    return NULL;
}

PyObject *rs_load_node(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer cid, block;
    int expected, check_keys;
    PyObject *lo_o, *hi_o;
    if (!PyArg_ParseTuple(args, "y*y*iOOp:load_node", &cid, &block, &expected, &lo_o, &hi_o, &check_keys)) return NULL;
    PyObject *out = NULL;
    Bytes lo_b, hi_b;
    const Bytes *lo, *hi;
    if (bound_arg(lo_o, "lo", &lo_b, &lo) < 0 || bound_arg(hi_o, "hi", &hi_b, &hi) < 0) {
        /* error set */
    } else if (expected < -1 || expected > 128) {
        PyErr_Format(PyExc_ValueError, "load_node(): layer %d is outside -1..128", expected);
    } else if (ready() == 0) {
        Tree t = {{NULL, 0}, NULL, NULL, 0, {NULL, 0}, NULL, check_keys, 0, NULL, 0, {0}};
        TNode *x = decode_checked(&t, (const uint8_t *)cid.buf, (size_t)cid.len, (const uint8_t *)block.buf, (size_t)block.len, expected, lo, hi);
        if (x != NULL) out = node_tuple(x);
        tree_free(&t);
    }
    PyBuffer_Release(&cid);
    PyBuffer_Release(&block);
    return out;
}

/* The ValueError zip(keys, vals, rights, strict=True) raises for these lengths, or 0 if equal. */
static int zip_lengths(Py_ssize_t nk, Py_ssize_t nv, Py_ssize_t nr) {
    Py_ssize_t m = nk < nv ? nk : nv;
    if (nr < m) m = nr;
    const char *why = NULL;
    if (nk == m)
        why = nv > m ? "zip() argument 2 is longer than argument 1" : nr > m ? "zip() argument 3 is longer than arguments 1-2" : NULL;
    else
        why = nv == m ? "zip() argument 2 is shorter than argument 1" : "zip() argument 3 is shorter than arguments 1-2";
    if (why == NULL) return 0;
    PyErr_SetString(PyExc_ValueError, why);
    return -1;
}

static Bytes bytes_obj(PyObject *o) {
    Bytes b = {(const uint8_t *)PyBytes_AS_STRING(o), (size_t)PyBytes_GET_SIZE(o)};
    return b;
}

PyObject *rs_encode_node(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *left, *keys, *vals, *rights;
    if (!PyArg_ParseTuple(args, "OO!O!O!:encode_node", &left, &PyList_Type, &keys, &PyList_Type, &vals, &PyList_Type, &rights)) return NULL;
    if (left != Py_None && !PyBytes_Check(left)) {
        PyErr_SetString(PyExc_TypeError, "encode_node(): left must be bytes or None");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(keys);
    if (zip_lengths(n, PyList_GET_SIZE(vals), PyList_GET_SIZE(rights)) < 0) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *r = PyList_GET_ITEM(rights, i);
        if (!PyBytes_Check(PyList_GET_ITEM(keys, i)) || !PyBytes_Check(PyList_GET_ITEM(vals, i)) || !(r == Py_None || PyBytes_Check(r))) {
            PyErr_Format(PyExc_TypeError, "encode_node(): entry %zd: keys and vals must be bytes, rights bytes or None", i);
            return NULL;
        }
    }
    /* the lists are only read below: nothing here runs Python code */
    Bytes *kb = PyMem_Malloc(((size_t)n + 1) * sizeof(Bytes));
    Bytes *vb = PyMem_Malloc(((size_t)n + 1) * sizeof(Bytes));
    Bytes *rb = PyMem_Malloc(((size_t)n + 1) * sizeof(Bytes));
    const Bytes **rp = PyMem_Malloc(((size_t)n + 1) * sizeof(Bytes *));
    Out o = {NULL, 0, 0};
    PyObject *out = NULL;
    if (kb == NULL || vb == NULL || rb == NULL || rp == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        kb[i] = bytes_obj(PyList_GET_ITEM(keys, i));
        vb[i] = bytes_obj(PyList_GET_ITEM(vals, i));
        PyObject *r = PyList_GET_ITEM(rights, i);
        if (r == Py_None) {
            rp[i] = NULL;
        } else {
            rb[i] = bytes_obj(r);
            rp[i] = &rb[i];
        }
    }
    Bytes lb;
    if (left != Py_None) lb = bytes_obj(left);
    if (encode(&o, left == Py_None ? NULL : &lb, (size_t)n, kb, vb, rp) < 0) goto done;
    uint8_t cid[36];
    memcpy(cid, RS_CID_PREFIX, 4);
    rs_sha256(o.buf, o.len, cid + 4);
    out = Py_BuildValue("(y#y#)", (const char *)cid, (Py_ssize_t)36, (const char *)o.buf, (Py_ssize_t)o.len);
done:
    PyMem_Free(kb);
    PyMem_Free(vb);
    PyMem_Free(rb);
    PyMem_Free(rp);
    PyMem_Free(o.buf);
    return out;
}

/* The error set now, as a value, if it is a RepoStreamError (cleared); NULL (error kept) if not. */
static PyObject *take_error(void) {
    if (!PyErr_ExceptionMatches(rs_base_error)) return NULL;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    if (value == NULL) PyErr_SetString(PyExc_RuntimeError, "lookup_and_invert(): an error without a value");
    return value;
}

/* One op: (code, path, key, cid, prev); code 0 create, 1 update, 2 delete. Checked by the caller
 * (repo_stream.sync.invert.lookup_and_invert) for the CIDs each needs; checked again here for types. */
typedef RsTreeOp Op;

static int parse_op(PyObject *item, Op *op) {
    PyObject *key, *cid, *prev;
    if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "iUSOO", &op->code, &op->path, &key, &cid, &prev)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "lookup_and_invert(): an op is (code, path, key, cid, prev)");
        return -1;
    }
    if ((cid != Py_None && !PyBytes_Check(cid)) || (prev != Py_None && !PyBytes_Check(prev)) || op->code < 0 || op->code > 2) {
        PyErr_SetString(PyExc_TypeError, "lookup_and_invert(): an op's code is 0..2, its cid and prev bytes or None");
        return -1;
    }
    op->key = bytes_obj(key);
    op->has_cid = cid != Py_None;
    op->has_prev = prev != Py_None;
    if (op->has_cid) op->cid = bytes_obj(cid);
    if (op->has_prev) op->prev = bytes_obj(prev);
    if ((op->code != 2 && !op->has_cid) || (op->code != 0 && !op->has_prev)) {
        PyErr_SetString(PyExc_ValueError, "lookup_and_invert(): an op lacks the CID its action needs");
        return -1;
    }
    return 0;
}

/* The tree work on parsed arguments: keys[0..nk) looked up, ops[0..no) undone, the root. Each
 * key's layer is hashed once: op i reuses keys[i]'s when it is the same bytes (rs_tree_work's). */
static PyObject *run_parsed(Tree *t, const Bytes *keys, size_t nk, const Op *parsed, size_t no) {
    int *layers = PyMem_Malloc((nk + 1) * sizeof(int));
    if (layers == NULL) return PyErr_NoMemory();
    PyObject *held = PyList_New(0);
    if (held == NULL) {
        PyMem_Free(layers);
        return NULL;
    }
    PyObject *result = NULL;
    for (size_t i = 0; i < nk; i++) {
        int found;
        Bytes val;
        PyObject *v;
        layers[i] = key_layer_of(keys[i]);
        if (get(t, keys[i], layers[i], &found, &val) < 0) {
            PyObject *err = take_error();
            if (err == NULL) goto done;
            int bad = PyList_Append(held, err);
            Py_DECREF(err);
            if (bad < 0) goto done;
            result = Py_BuildValue("(OO)", held, Py_None);
            goto done;
        }
        if (found) {
            v = bytes_of(val);
            if (v == NULL) goto done;
        } else {
            v = Py_NewRef(Py_None);
        }
        int bad = PyList_Append(held, v);
        Py_DECREF(v);
        if (bad < 0) goto done;
    }
    for (size_t i = no; i-- > 0;) {
        const Op *op = &parsed[i];
        Bytes old = {NULL, 0};
        int rc;
        const char *action = op->code == 0 ? "create" : "update";
        int layer = i < nk && keys[i].p == op->key.p && keys[i].n == op->key.n ? layers[i] : key_layer_of(op->key);
        if (op->code == 0)
            rc = delete(t, op->key, layer, &old);
        else if (op->code == 1)
            rc = update(t, op->key, layer, op->prev, &old);
        else
            rc = insert(t, op->key, layer, op->prev);
        if (rc == 0 && op->code != 2 && !bytes_eq(old, op->cid))
            rc = rs_raise("inverse_mismatch", "(sOy#y#)", action, op->path, (const char *)old.p, (Py_ssize_t)old.n, (const char *)op->cid.p,
                          (Py_ssize_t)op->cid.n);
        if (rc < 0) {
            PyObject *err = take_error();
            if (err == NULL) goto done;
            result = Py_BuildValue("(ON)", held, err);
            goto done;
        }
    }
    Bytes root;
    if (tree_root(t, &root) < 0) {
        PyObject *err = take_error();
        if (err != NULL) result = Py_BuildValue("(ON)", held, err);
        goto done;
    }
    result = Py_BuildValue("(Oy#)", held, (const char *)root.p, (Py_ssize_t)root.n);
done:
    Py_DECREF(held);
    PyMem_Free(layers);
    return result;
}

static PyObject *run(Tree *t, PyObject *keys, PyObject *ops) {
    Py_ssize_t nk = PyList_GET_SIZE(keys), no = PyList_GET_SIZE(ops);
    /* the ops' and keys' bytes are the caller's (kept alive by the lists, which the caller holds) */
    Op *parsed = PyMem_Calloc((size_t)no + 1, sizeof(Op));
    Bytes *kb = PyMem_Calloc((size_t)nk + 1, sizeof(Bytes));
    PyObject *result = NULL;
    if (parsed == NULL || kb == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < no; i++)
        if (parse_op(PyList_GET_ITEM(ops, i), &parsed[i]) < 0) goto done;
    for (Py_ssize_t i = 0; i < nk; i++) {
        PyObject *k = PyList_GET_ITEM(keys, i);
        if (!PyBytes_Check(k)) {
            PyErr_SetString(PyExc_TypeError, "lookup_and_invert(): keys must be bytes");
            goto done;
        }
        kb[i] = bytes_obj(k);
    }
    result = run_parsed(t, kb, (size_t)nk, parsed, (size_t)no);
done:
    PyMem_Free(parsed);
    PyMem_Free(kb);
    return result;
}

const RsSliceBlock *rs_slice_find(const RsSliceBlock *slice, size_t n, const uint8_t *cid, size_t cid_len) {
    if (cid_len != RS_SLICE_CID) return NULL;
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = memcmp(slice[mid].cid, cid, RS_SLICE_CID);
        if (c == 0) return &slice[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

PyObject *rs_tree_work(const uint8_t *root, size_t root_len, const RsSliceBlock *slice, size_t n_slice, const RsTreeOp *ops, size_t n_ops,
                       int check_keys, int max_depth) {
    if (ready() < 0) return NULL;
    Bytes *keys = PyMem_Calloc(n_ops + 1, sizeof(Bytes));
    if (keys == NULL) return PyErr_NoMemory();
    for (size_t i = 0; i < n_ops; i++) keys[i] = ops[i].key;
    Tree t = {{NULL, 0}, NULL, slice, n_slice, {root, root_len}, NULL, check_keys, max_depth, NULL, 0, {0}};
    PyObject *out = run_parsed(&t, keys, n_ops, ops, n_ops);
    tree_free(&t);
    PyMem_Free(keys);
    return out;
}

PyObject *rs_lookup_and_invert(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *root, *blocks, *keys, *ops;
    int check_keys, max_depth;
    if (!PyArg_ParseTuple(args, "SO!O!O!pi:lookup_and_invert", &root, &PyDict_Type, &blocks, &PyList_Type, &keys, &PyList_Type, &ops,
                          &check_keys, &max_depth))
        return NULL;
    if (ready() < 0) return NULL;
    /* hold the arguments: a message builder runs Python code */
    Py_INCREF(root);
    Py_INCREF(blocks);
    Py_INCREF(keys);
    Py_INCREF(ops);
    Tree t = {{NULL, 0}, blocks, NULL, 0, bytes_obj(root), NULL, check_keys, max_depth, NULL, 0, {0}};
    PyObject *out = run(&t, keys, ops);
    tree_free(&t);
    Py_DECREF(root);
    Py_DECREF(blocks);
    Py_DECREF(keys);
    Py_DECREF(ops);
    return out;
}
