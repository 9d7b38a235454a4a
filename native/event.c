/* The usual #commit message read in one pass: the fast path of repo_stream.sync.verify.verify_commit
 * (atproto sync, "Commit Validation"; lexicon com.atproto.sync.subscribeRepos#commit).
 *
 * commit_event() reads a message that is exactly: the header {op: 1, t: "#commit"}; a body map of
 * the known #commit fields only, in canonical DAG-CBOR (minimal heads, keys in canonical order,
 * UTF-8 text, links to 36-byte dag-cbor sha2-256 CIDv1s); at most max_ops well-formed ops with
 * distinct paths; blocks of at most max_blocks bytes that are a CAR with the usual one-root header
 * whose root is the commit, every section a dag-cbor sha2-256 CID whose block hashes to it; the
 * commit block a canonical v3 commit of the six usual fields whose did and rev are the event's.
 * For such a message it returns what the reference's steps 1 to 3 give; for anything else None,
 * and verify_commit takes the reference path, which gives the result or the error. It accepts a
 * subset of what the reference accepts, and gives the same values for it: it decides nothing the
 * reference could decide otherwise (tests/test_sync_native.py and the fuzz target compare them).
 *
 * Hostile input: every length is checked against the bytes left before use; nothing recurses (the
 * shape is fixed: body, ops, op); the op table is bounded by max_ops, the rest are Python objects
 * bounded by the message. All state is the call's own. */
#include "native.h"

typedef struct {
    const uint8_t *p, *end;
} Cur;

/* A canonical (minimal) CBOR head: 0, or -1 if there is none. */
static int head(Cur *c, int *major, uint64_t *arg) {
    int minimal;
    if (rs_cbor_head(&c->p, c->end, major, arg, &minimal) < 0 || !minimal) return -1;
    return 0;
}

/* A string of major type `want` (2 bytes, 3 text; text is checked as UTF-8 by its user). */
static int string(Cur *c, int want, const uint8_t **s, size_t *n) {
    int major;
    uint64_t arg;
    if (head(c, &major, &arg) < 0 || major != want || arg > (uint64_t)(c->end - c->p)) return -1;
    *s = c->p;
    *n = (size_t)arg;
    c->p += arg;
    return 0;
}

/* A link to a 36-byte dag-cbor sha2-256 CIDv1: tag 42, 37 bytes 0x00 + CID. *cid is the CID. */
static int read_link(Cur *c, const uint8_t **cid) {
    static const uint8_t HEAD[5] = {0xd8, 0x2a, 0x58, 0x25, 0x00};
    if (c->end - c->p < 41 || memcmp(c->p, HEAD, 5) != 0 || memcmp(c->p + 5, RS_CID_PREFIX, 4) != 0) return -1;
    *cid = c->p + 5;
    c->p += 41;
    return 0;
}

/* null (*cid NULL) or a link. */
static int null_or_link(Cur *c, const uint8_t **cid) {
    if (c->p < c->end && *c->p == 0xf6) {
        c->p++;
        *cid = NULL;
        return 0;
    }
    return read_link(c, cid);
}

/* The next map key, which must come after the previous one in canonical order (shorter first,
 * then bytewise): 0, or -1. */
static int map_key(Cur *c, const uint8_t **k, size_t *n, const uint8_t **prev, size_t *prev_n) {
    if (string(c, 3, k, n) < 0) return -1;
    if (*prev != NULL && (*n < *prev_n || (*n == *prev_n && memcmp(*k, *prev, *n) <= 0))) return -1;
    *prev = *k;
    *prev_n = *n;
    return 0;
}

static int is_key(const uint8_t *k, size_t n, const char *name) { return n == strlen(name) && memcmp(k, name, n) == 0; }

/* A varint as the CAR parser reads it (at most 9 bytes), minimal: 0, or -1. */
static int varint(Cur *c, uint64_t *value) {
    uint64_t v = 0;
    for (int i = 0; i < 9 && c->p < c->end; i++) {
        uint8_t byte = *c->p++;
        v |= (uint64_t)(byte & 0x7f) << (7 * i);
        if (byte < 0x80) {
            if (byte == 0 && i > 0) return -1;
            *value = v;
            return 0;
        }
    }
    return -1;
}

typedef struct {
    int code; /* 0 create, 1 update, 2 delete */
    const uint8_t *path, *cid, *prev;
    size_t path_n;
} EventOp;

/* One op map {cid?, path, prev?, action}: 0, or -1. */
static int read_op(Cur *c, EventOp *op) {
    int major;
    uint64_t count;
    if (head(c, &major, &count) < 0 || major != 5 || count > 4) return -1;
    const uint8_t *prev_key = NULL, *k, *action = NULL;
    size_t prev_n = 0, n, action_n = 0;
    op->path = op->cid = op->prev = NULL;
    op->path_n = 0;
    for (uint64_t i = 0; i < count; i++) {
        if (map_key(c, &k, &n, &prev_key, &prev_n) < 0) return -1;
        if (is_key(k, n, "cid")) {
            if (null_or_link(c, &op->cid) < 0) return -1;
        } else if (is_key(k, n, "path")) {
            if (string(c, 3, &op->path, &op->path_n) < 0) return -1;
        } else if (is_key(k, n, "prev")) {
            if (null_or_link(c, &op->prev) < 0) return -1;
        } else if (is_key(k, n, "action")) {
            if (string(c, 3, &action, &action_n) < 0) return -1;
        } else {
            return -1;
        }
    }
    if (op->path == NULL || action == NULL) return -1;
    if (is_key(action, action_n, "create"))
        op->code = 0;
    else if (is_key(action, action_n, "update"))
        op->code = 1;
    else if (is_key(action, action_n, "delete"))
        op->code = 2;
    else
        return -1;
    return 0;
}

typedef struct {
    const uint8_t *repo, *rev, *since, *time, *blocks, *commit, *prev_data;
    size_t repo_n, rev_n, since_n, time_n, blocks_n;
    int has_seq;
    uint64_t seq;
    EventOp *ops;
    size_t n_ops;
} Body;

static const uint8_t HEADER[] = {0xa2, 0x61, 't', 0x67, '#', 'c', 'o', 'm', 'm', 'i', 't', 0x62, 'o', 'p', 0x01};

/* The body map of known fields. 0, or -1. b->ops is allocated (up to max_ops) when there are ops. */
static int read_body(Cur *c, Body *b, Py_ssize_t max_ops) {
    int major;
    uint64_t count;
    if (head(c, &major, &count) < 0 || major != 5 || count > 12) return -1;
    const uint8_t *prev_key = NULL, *k;
    size_t prev_n = 0, n;
    int has_ops = 0;
    for (uint64_t i = 0; i < count; i++) {
        if (map_key(c, &k, &n, &prev_key, &prev_n) < 0) return -1;
        if (is_key(k, n, "ops")) {
            uint64_t m;
            if (head(c, &major, &m) < 0 || major != 4 || m > (uint64_t)max_ops) return -1;
            if (m > 0) {
                b->ops = PyMem_Malloc((size_t)m * sizeof(EventOp));
                if (b->ops == NULL) return -1;
            }
            for (uint64_t j = 0; j < m; j++)
                if (read_op(c, &b->ops[j]) < 0) return -1;
            b->n_ops = (size_t)m;
            has_ops = 1;
        } else if (is_key(k, n, "rev")) {
            if (string(c, 3, &b->rev, &b->rev_n) < 0) return -1;
        } else if (is_key(k, n, "seq")) {
            if (head(c, &major, &b->seq) < 0 || major != 0) return -1;
            b->has_seq = 1;
        } else if (is_key(k, n, "repo")) {
            if (string(c, 3, &b->repo, &b->repo_n) < 0) return -1;
        } else if (is_key(k, n, "time")) {
            if (string(c, 3, &b->time, &b->time_n) < 0) return -1;
        } else if (is_key(k, n, "blobs")) {
            uint64_t m;
            const uint8_t *cid;
            if (head(c, &major, &m) < 0 || major != 4 || m > (uint64_t)(c->end - c->p)) return -1;
            for (uint64_t j = 0; j < m; j++)
                if (read_link(c, &cid) < 0) return -1;
        } else if (is_key(k, n, "since")) {
            if (c->p < c->end && *c->p == 0xf6)
                c->p++;
            else if (string(c, 3, &b->since, &b->since_n) < 0)
                return -1;
        } else if (is_key(k, n, "blocks")) {
            if (string(c, 2, &b->blocks, &b->blocks_n) < 0) return -1;
        } else if (is_key(k, n, "commit")) {
            if (read_link(c, &b->commit) < 0) return -1;
        } else if (is_key(k, n, "rebase") || is_key(k, n, "tooBig")) {
            /* false only for tooBig (true is an error); either for rebase */
            if (c->p >= c->end || !(*c->p == 0xf4 || (*c->p == 0xf5 && k[0] == 'r'))) return -1;
            c->p++;
        } else if (is_key(k, n, "prevData")) {
            if (null_or_link(c, &b->prev_data) < 0) return -1;
        } else {
            return -1;
        }
    }
    if (c->p != c->end || b->repo == NULL || b->rev == NULL || b->blocks == NULL || !has_ops || b->commit == NULL) return -1;
    return 0;
}

/* The ops' checks of the reference (verify_commit, step 2): 0 if each passes, -1 if not. */
static int check_ops(const Body *b, int check_keys) {
    for (size_t i = 0; i < b->n_ops; i++) {
        const EventOp *op = &b->ops[i];
        if (check_keys ? !rs_valid_key(op->path, op->path_n) : op->path_n > RS_MAX_KEY_BYTES) return -1;
        for (size_t j = 0; j < i; j++)
            if (b->ops[j].path_n == op->path_n && memcmp(b->ops[j].path, op->path, op->path_n) == 0) return -1;
        if (op->code == 2 ? op->cid != NULL : op->cid == NULL) return -1;
        if (op->code == 0 ? op->prev != NULL : op->prev == NULL && b->prev_data != NULL) return -1;
    }
    return 0;
}

/* The CAR's sections in CID order, the earlier first among equal CIDs (then dropped). */
static int by_cid(const void *a, const void *b) {
    const RsSliceBlock *x = a, *y = b;
    int c = memcmp(x->cid, y->cid, RS_SLICE_CID);
    if (c) return c;
    return x->cid < y->cid ? -1 : x->cid > y->cid ? 1 : 0;
}

/* Blocks x[0] and x[1] against their CIDs (hashed at once): 0, or -1 if either differs. */
static int check_pair(const RsSliceBlock *x) {
    uint8_t digest[2][32];
    rs_sha256_x2(x[0].block, x[0].len, x[1].block, x[1].len, digest[0], digest[1]);
    return memcmp(digest[0], x[0].cid + 4, 32) != 0 || memcmp(digest[1], x[1].cid + 4, 32) != 0 ? -1 : 0;
}

/* The CAR in blocks: its sections indexed in *slice (PyMem, sorted by CID, a CID given twice
 * keeping its first block, as read_car_slice does), *n set. 0, or -1 (not the usual CAR, or an
 * error set). */
static int read_car(const Body *b, Py_ssize_t max_block, RsSliceBlock **slice, size_t *n_slice) {
    static const uint8_t ROOTS[13] = {0xa2, 0x65, 'r', 'o', 'o', 't', 's', 0x81, 0xd8, 0x2a, 0x58, 0x25, 0x00};
    static const uint8_t VERSION[9] = {0x67, 'v', 'e', 'r', 's', 'i', 'o', 'n', 0x01};
    Cur c = {b->blocks, b->blocks + b->blocks_n};
    uint64_t n;
    size_t count = 0, cap = 0;
    if (varint(&c, &n) < 0 || n != 58 || c.end - c.p < 58) return -1;
    if (memcmp(c.p, ROOTS, 13) != 0 || memcmp(c.p + 13, b->commit, 36) != 0 || memcmp(c.p + 49, VERSION, 9) != 0) return -1;
    c.p += 58;
    while (c.p < c.end) {
        /* each section takes at least 37 bytes: count <= blocks_n / 37, the index is bounded */
        if (varint(&c, &n) < 0 || n < 36 || n > (uint64_t)(c.end - c.p) || n - 36 > (uint64_t)max_block) return -1;
        const uint8_t *cid = c.p, *block = c.p + 36;
        size_t block_n = (size_t)n - 36;
        c.p += n;
        if (memcmp(cid, RS_CID_PREFIX, 4) != 0) return -1;
        if (rs_reserve((void **)slice, &cap, count + 1, sizeof(RsSliceBlock)) < 0) return -1;
        (*slice)[count++] = (RsSliceBlock){cid, block, block_n};
        /* Blocks checked against their CIDs two at a time (their rounds interleaved): this one
         * and the one before it. */
        if (count % 2 == 0 && check_pair(&(*slice)[count - 2]) < 0) return -1;
    }
    if (count % 2 == 1) {
        const RsSliceBlock *x = &(*slice)[count - 1];
        uint8_t digest[32];
        rs_sha256(x->block, x->len, digest);
        if (memcmp(digest, x->cid + 4, 32) != 0) return -1;
    }
    if (count > 1) qsort(*slice, count, sizeof(RsSliceBlock), by_cid);
    size_t kept = 0;
    for (size_t i = 0; i < count; i++)
        if (kept == 0 || memcmp((*slice)[kept - 1].cid, (*slice)[i].cid, RS_SLICE_CID) != 0) (*slice)[kept++] = (*slice)[i];
    *n_slice = kept;
    return 0;
}

/* The commit block {did, rev, sig, data, prev, version: 3}, exactly, canonical, its did and rev
 * the event's: its sig, data CID and the unsigned bytes (the map without sig) set. 0, or -1. */
static int read_commit(const Body *b, const uint8_t *block, size_t len, PyObject **sig, const uint8_t **data, PyObject **unsigned_bytes) {
    Cur c = {block, block + len};
    const uint8_t *s, *prev;
    size_t n;
    if (len < 1 || *c.p++ != 0xa6) return -1;
    if (c.end - c.p < 4 || memcmp(c.p, "\x63" "did", 4) != 0) return -1;
    c.p += 4;
    if (string(&c, 3, &s, &n) < 0 || n != b->repo_n || memcmp(s, b->repo, n) != 0) return -1;
    if (c.end - c.p < 4 || memcmp(c.p, "\x63" "rev", 4) != 0) return -1;
    c.p += 4;
    if (string(&c, 3, &s, &n) < 0 || n != b->rev_n || memcmp(s, b->rev, n) != 0) return -1;
    const uint8_t *sig_at = c.p;
    if (c.end - c.p < 4 || memcmp(c.p, "\x63" "sig", 4) != 0) return -1;
    c.p += 4;
    const uint8_t *sig_p;
    size_t sig_n;
    if (string(&c, 2, &sig_p, &sig_n) < 0) return -1;
    const uint8_t *sig_end = c.p;
    if (c.end - c.p < 5 || memcmp(c.p, "\x64" "data", 5) != 0) return -1;
    c.p += 5;
    if (read_link(&c, data) < 0) return -1;
    if (c.end - c.p < 5 || memcmp(c.p, "\x64" "prev", 5) != 0) return -1;
    c.p += 5;
    if (null_or_link(&c, &prev) < 0) return -1;
    if (c.end - c.p != 9 || memcmp(c.p, "\x67" "version" "\x03", 9) != 0) return -1;
    size_t before = (size_t)(sig_at - (block + 1)), after = (size_t)(c.end - sig_end);
    PyObject *u = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(1 + before + after));
    if (u == NULL) return -1;
    uint8_t *w = (uint8_t *)PyBytes_AS_STRING(u);
    w[0] = 0xa5;
    memcpy(w + 1, block + 1, before);
    memcpy(w + 1 + before, sig_end, after);
    *sig = PyBytes_FromStringAndSize((const char *)sig_p, (Py_ssize_t)sig_n);
    if (*sig == NULL) {
        Py_DECREF(u);
        return -1;
    }
    *unsigned_bytes = u;
    return 0;
}

static PyObject *text(const uint8_t *s, size_t n) { return PyUnicode_DecodeUTF8((const char *)s, (Py_ssize_t)n, NULL); }

static PyObject *raw_cid(const uint8_t *cid) {
    if (cid == NULL) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)cid, 36);
}

static PyObject *CID_BYTES; /* "cid_bytes", interned once */

/* A link to a CID read here (read_link: 36 bytes, a dag-cbor sha2-256 CIDv1), or None for None;
 * steals nothing. For a Python class made by object.__new__ (repo_stream's Link: a cbrrr CID
 * whose __init__ takes such a CID as it is, checking nothing more), the instance is made as
 * object.__new__ makes it and its cid_bytes set, without the call of __init__ (which costs more
 * than the rest); any other callable is called with the bytes. */
static PyObject *make_link(PyObject *link_type, PyObject *cid) {
    if (cid == Py_None) Py_RETURN_NONE;
    PyTypeObject *type = (PyTypeObject *)link_type;
    if (!PyType_Check(link_type) || !PyType_HasFeature(type, Py_TPFLAGS_HEAPTYPE) || type->tp_new != PyBaseObject_Type.tp_new ||
        type->tp_alloc == NULL)
        return PyObject_CallOneArg(link_type, cid);
    PyObject *link = type->tp_alloc(type, 0);
    if (link == NULL) return NULL;
    if (PyObject_SetAttr(link, CID_BYTES, cid) < 0) {
        Py_DECREF(link);
        return NULL;
    }
    return link;
}

/* The microseconds since the Unix epoch in a rev that is a TID (13 characters of
 * base32-sortable, the first one of 234567abcdefghij), as repo_stream.sync.verify.tid_timestamp;
 * None for any other rev. */
static PyObject *tid_stamp(const uint8_t *s, size_t n) {
    static const char DIGITS[] = "234567abcdefghijklmnopqrstuvwxyz";
    if (n != 13) Py_RETURN_NONE;
    uint64_t value = 0;
    for (size_t i = 0; i < 13; i++) {
        const char *at = s[i] != 0 ? memchr(DIGITS, s[i], 32) : NULL;
        if (at == NULL || (i == 0 && at - DIGITS >= 16)) Py_RETURN_NONE;
        value = value << 5 | (uint64_t)(at - DIGITS);
    }
    return PyLong_FromUnsignedLongLong(value >> 10);
}

static PyObject *ACTIONS[3];

/* (action, path, key, cid, prev, cid link, prev link), as verify_commit's items. */
static PyObject *op_item(const EventOp *op, PyObject *link_type) {
    PyObject *path = text(op->path, op->path_n);
    PyObject *key = PyBytes_FromStringAndSize((const char *)op->path, (Py_ssize_t)op->path_n);
    PyObject *cid = raw_cid(op->cid), *prev = raw_cid(op->prev);
    PyObject *cid_link = NULL, *prev_link = NULL, *item = NULL;
    if (path == NULL || key == NULL || cid == NULL || prev == NULL) goto done;
    if ((cid_link = make_link(link_type, cid)) == NULL || (prev_link = make_link(link_type, prev)) == NULL) goto done;
    item = PyTuple_Pack(7, ACTIONS[op->code], path, key, cid, prev, cid_link, prev_link);
done:
    Py_XDECREF(path);
    Py_XDECREF(key);
    Py_XDECREF(cid);
    Py_XDECREF(prev);
    Py_XDECREF(cid_link);
    Py_XDECREF(prev_link);
    return item;
}

static PyObject *event(const uint8_t *msg, size_t len, int check_keys, PyObject *link_type, Py_ssize_t max_ops, Py_ssize_t max_blocks,
                       Py_ssize_t max_block, int max_depth) {
    if (len < sizeof HEADER || memcmp(msg, HEADER, sizeof HEADER) != 0) Py_RETURN_NONE;
    Cur c = {msg + sizeof HEADER, msg + len};
    Body b;
    memset(&b, 0, sizeof b);
    RsSliceBlock *slice = NULL;
    RsTreeOp *tree_ops = NULL;
    size_t n_slice = 0;
    PyObject *out = NULL, *did = NULL, *rev = NULL, *since = NULL, *when = NULL, *seq = NULL, *items = NULL, *blocks = NULL;
    PyObject *commit = NULL, *commit_link = NULL, *prev_data = NULL, *prev_data_link = NULL, *sig = NULL, *unsigned_bytes = NULL;
    PyObject *data_cid = NULL, *tree = NULL, *stamp = NULL;
    const uint8_t *data;
    if (read_body(&c, &b, max_ops) < 0 || b.repo_n > 2048 || b.rev_n > 200 || b.blocks_n > (size_t)max_blocks || check_ops(&b, check_keys) < 0)
        goto fallback;
    if (read_car(&b, max_block, &slice, &n_slice) < 0) goto fallback;
    const RsSliceBlock *commit_block = rs_slice_find(slice, n_slice, b.commit, 36);
    if (commit_block == NULL || read_commit(&b, commit_block->block, commit_block->len, &sig, &data, &unsigned_bytes) < 0) goto fallback;
    if ((did = text(b.repo, b.repo_n)) == NULL || (rev = text(b.rev, b.rev_n)) == NULL) goto fallback;
    if (b.since == NULL)
        since = Py_NewRef(Py_None);
    else if ((since = text(b.since, b.since_n)) == NULL)
        goto fallback;
    if (b.time == NULL)
        when = Py_NewRef(Py_None);
    else if ((when = text(b.time, b.time_n)) == NULL)
        goto fallback;
    if ((seq = b.has_seq ? PyLong_FromUnsignedLongLong(b.seq) : Py_NewRef(Py_None)) == NULL) goto fallback;
    if ((commit = raw_cid(b.commit)) == NULL || (commit_link = make_link(link_type, commit)) == NULL) goto fallback;
    if ((prev_data = raw_cid(b.prev_data)) == NULL || (prev_data_link = make_link(link_type, prev_data)) == NULL) goto fallback;
    if ((data_cid = raw_cid(data)) == NULL) goto fallback;
    if ((items = PyList_New((Py_ssize_t)b.n_ops)) == NULL || (blocks = PyDict_New()) == NULL) goto fallback;
    for (size_t i = 0; i < b.n_ops; i++) {
        PyObject *item = op_item(&b.ops[i], link_type);
        if (item == NULL) goto fallback;
        PyList_SET_ITEM(items, (Py_ssize_t)i, item);
        /* the record blocks the ops name (the only blocks verify_commit reads from Python) */
        const RsSliceBlock *record = b.ops[i].cid ? rs_slice_find(slice, n_slice, b.ops[i].cid, 36) : NULL;
        if (record != NULL) {
            PyObject *block = PyBytes_FromStringAndSize((const char *)record->block, (Py_ssize_t)record->len);
            if (block == NULL) goto fallback;
            int bad = PyDict_SetItem(blocks, PyTuple_GET_ITEM(item, 3), block);
            Py_DECREF(block);
            if (bad < 0) goto fallback;
        }
    }
    if (b.prev_data == NULL) {
        tree = Py_NewRef(Py_None);
    } else {
        /* the tree work, its errors as values (raised by verify_commit in the order of the checks) */
        if ((tree_ops = PyMem_Calloc(b.n_ops + 1, sizeof(RsTreeOp))) == NULL) goto fallback;
        for (size_t i = 0; i < b.n_ops; i++) {
            const EventOp *op = &b.ops[i];
            RsTreeOp *t = &tree_ops[i];
            t->code = op->code;
            t->path = PyTuple_GET_ITEM(PyList_GET_ITEM(items, (Py_ssize_t)i), 1);
            t->key = (RsBytes){op->path, op->path_n};
            t->has_cid = op->cid != NULL;
            t->has_prev = op->prev != NULL;
            t->cid = (RsBytes){op->cid, t->has_cid ? 36 : 0};
            t->prev = (RsBytes){op->prev, t->has_prev ? 36 : 0};
        }
        if ((tree = rs_tree_work(data, 36, slice, n_slice, tree_ops, b.n_ops, check_keys, max_depth)) == NULL) goto fallback;
    }
    if ((stamp = tid_stamp(b.rev, b.rev_n)) == NULL) goto fallback;
    out = PyTuple_Pack(14, did, rev, since, commit_link, prev_data_link, seq, when, items, blocks, data_cid, sig, unsigned_bytes, tree, stamp);
    goto done;
fallback:
    /* Not the usual message (or an error making its values, such as text that is not UTF-8): the
     * reference path decides, raising what it raises. */
    if (PyErr_Occurred()) PyErr_Clear();
    out = Py_NewRef(Py_None);
done:
    PyMem_Free(b.ops);
    PyMem_Free(slice);
    PyMem_Free(tree_ops);
    Py_XDECREF(did);
    Py_XDECREF(rev);
    Py_XDECREF(since);
    Py_XDECREF(when);
    Py_XDECREF(seq);
    Py_XDECREF(items);
    Py_XDECREF(blocks);
    Py_XDECREF(commit);
    Py_XDECREF(commit_link);
    Py_XDECREF(prev_data);
    Py_XDECREF(prev_data_link);
    Py_XDECREF(data_cid);
    Py_XDECREF(sig);
    Py_XDECREF(unsigned_bytes);
    Py_XDECREF(tree);
    Py_XDECREF(stamp);
    return out;
}

/* The interned action names and "cid_bytes" (once): 0, or -1 with an error set. */
static int init_actions(void) {
    static const char *names[3] = {"create", "update", "delete"};
    for (int i = 0; i < 3; i++)
        if (ACTIONS[i] == NULL && (ACTIONS[i] = PyUnicode_InternFromString(names[i])) == NULL) return -1;
    if (CID_BYTES == NULL && (CID_BYTES = PyUnicode_InternFromString("cid_bytes")) == NULL) return -1;
    return 0;
}

PyObject *rs_commit_event(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *message, *link_type;
    int check_keys;
    Py_ssize_t max_ops, max_blocks, max_block;
    int max_depth;
    if (!PyArg_ParseTuple(args, "SpOnnni:commit_event", &message, &check_keys, &link_type, &max_ops, &max_blocks, &max_block, &max_depth))
        return NULL;
    if (max_ops < 0 || max_ops > 100000 || max_blocks < 0 || max_block < 1) {
        PyErr_SetString(PyExc_ValueError, "commit_event(): max_ops is 0..100000, max_blocks >= 0, max_block >= 1");
        return NULL;
    }
    if (!PyCallable_Check(link_type)) {
        PyErr_SetString(PyExc_TypeError, "commit_event(): link must be callable");
        return NULL;
    }
    if (init_actions() < 0) return NULL;
    /* hold the arguments: making a link runs Python code */
    Py_INCREF(message);
    Py_INCREF(link_type);
    PyObject *out = event((const uint8_t *)PyBytes_AS_STRING(message), (size_t)PyBytes_GET_SIZE(message), check_keys, link_type, max_ops,
                          max_blocks, max_block, max_depth);
    Py_DECREF(message);
    Py_DECREF(link_type);
    return out;
}

/* The fields a firehose client needs of a #commit before verifying it, without decoding the rest
 * (repo_stream.firehose.items.parse_message with raw_commits): for a message read_body accepts
 * (the same subset as above: canonical DAG-CBOR, the known fields only, at most max_ops
 * well-formed ops) whose seq is at most 2^63 - 1 and whose text fields (repo, rev, since, time,
 * paths) are UTF-8, (seq, repo, rev, time or None, [(action, path), ...]), the values
 * decode_frame gives; None for any other message, which the caller decodes the usual way. Every
 * message it accepts is one decode_frame accepts (cbrrr's rules are a superset of read_body's). */
static PyObject *peek(const uint8_t *msg, size_t len, Py_ssize_t max_ops) {
    if (len < sizeof HEADER || memcmp(msg, HEADER, sizeof HEADER) != 0) Py_RETURN_NONE;
    Cur c = {msg + sizeof HEADER, msg + len};
    Body b;
    memset(&b, 0, sizeof b);
    PyObject *out = NULL, *did = NULL, *rev = NULL, *when = NULL, *since = NULL, *seq = NULL, *ops = NULL;
    if (read_body(&c, &b, max_ops) < 0 || !b.has_seq || b.seq > (uint64_t)INT64_MAX) goto fallback;
    if ((did = text(b.repo, b.repo_n)) == NULL || (rev = text(b.rev, b.rev_n)) == NULL) goto fallback;
    if (b.since != NULL && (since = text(b.since, b.since_n)) == NULL) goto fallback; /* checked as UTF-8 only */
    if (b.time == NULL)
        when = Py_NewRef(Py_None);
    else if ((when = text(b.time, b.time_n)) == NULL)
        goto fallback;
    if ((seq = PyLong_FromUnsignedLongLong(b.seq)) == NULL || (ops = PyList_New((Py_ssize_t)b.n_ops)) == NULL) goto fallback;
    for (size_t i = 0; i < b.n_ops; i++) {
        PyObject *path = text(b.ops[i].path, b.ops[i].path_n);
        if (path == NULL) goto fallback;
        PyObject *pair = PyTuple_Pack(2, ACTIONS[b.ops[i].code], path);
        Py_DECREF(path);
        if (pair == NULL) goto fallback;
        PyList_SET_ITEM(ops, (Py_ssize_t)i, pair);
    }
    out = PyTuple_Pack(5, seq, did, rev, when, ops);
    if (out != NULL) goto done;
fallback:
    if (PyErr_Occurred()) PyErr_Clear();
    out = Py_NewRef(Py_None);
done:
    PyMem_Free(b.ops);
    Py_XDECREF(did);
    Py_XDECREF(rev);
    Py_XDECREF(when);
    Py_XDECREF(since);
    Py_XDECREF(seq);
    Py_XDECREF(ops);
    return out;
}

PyObject *rs_commit_peek(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *message;
    Py_ssize_t max_ops;
    if (!PyArg_ParseTuple(args, "Sn:commit_peek", &message, &max_ops)) return NULL;
    if (max_ops < 0 || max_ops > 100000) {
        PyErr_SetString(PyExc_ValueError, "commit_peek(): max_ops is 0..100000");
        return NULL;
    }
    if (init_actions() < 0) return NULL;
    /* nothing here runs Python code, but hold the message as commit_event does */
    Py_INCREF(message);
    PyObject *out = peek((const uint8_t *)PyBytes_AS_STRING(message), (size_t)PyBytes_GET_SIZE(message), max_ops);
    Py_DECREF(message);
    return out;
}
