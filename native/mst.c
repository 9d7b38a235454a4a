/* MST nodes of a partial tree (sync 1.1 verification): load_node() decodes one node and checks it
 * as repo_stream.sync.partial.load_node does (the strict decoder and the key rules are walk.c's,
 * shared with the walker); encode_node() makes a node block and its CID as
 * repo_stream.sync.partial.encode_node does. Same results, same errors and messages.
 *
 * Both are plain functions over their arguments: no recursion, every length checked (the decoder
 * reads only inside the block), scratch buffers bounded by the block's size (entries, keys of at
 * most RS_MAX_KEY_BYTES) and freed when over SCRATCH_KEEP bytes. A call holds the scratch: a call
 * made while another runs (from an error's message formatting, say) is refused. */
#include "native.h"

#define SCRATCH_KEEP (64 * 1024)

static RsNodeEntry *scratch_entries = NULL;
static size_t scratch_cap = 0;
static RsKeys scratch_keys;
static int busy = 0;

static void release_scratch(void) {
    if (scratch_cap * sizeof(RsNodeEntry) > SCRATCH_KEEP) {
        PyMem_Free(scratch_entries);
        scratch_entries = NULL;
        scratch_cap = 0;
    }
    if (scratch_keys.cap_key > SCRATCH_KEEP || scratch_keys.cap_prev > SCRATCH_KEEP) rs_keys_free(&scratch_keys);
    busy = 0;
}

static int bytes_cmp(const uint8_t *a, size_t an, const uint8_t *b, size_t bn) {
    int c = an && bn ? memcmp(a, b, an < bn ? an : bn) : 0;
    if (c) return c;
    return an < bn ? -1 : an > bn ? 1 : 0;
}

/* KeyOrderError(key, last): `key` decoded strictly (checked UTF-8), `last` with "replace" when
 * replace_last (a bound from the caller), else strictly. */
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

static PyObject *bytes_or_none(const uint8_t *p, size_t n, int present) {
    if (!present) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n);
}

/* A bound argument: None (has = 0) or bytes. 0, or -1 with TypeError. */
static int bound_arg(PyObject *o, const char *name, const uint8_t **p, size_t *n, int *has) {
    if (o == Py_None) {
        *has = 0;
        *p = NULL;
        *n = 0;
        return 0;
    }
    if (!PyBytes_Check(o)) {
        PyErr_Format(PyExc_TypeError, "load_node() argument '%s' must be bytes or None", name);
        return -1;
    }
    *has = 1;
    *p = (const uint8_t *)PyBytes_AS_STRING(o);
    *n = (size_t)PyBytes_GET_SIZE(o);
    return 0;
}

static PyObject *load(const uint8_t *cid, size_t cid_len, const uint8_t *block, size_t len, int expected, PyObject *lo_o, PyObject *hi_o,
                      int check_keys) {
    const uint8_t *lo, *hi, *left;
    size_t lo_len, hi_len, left_len, count;
    int has_lo, has_hi;
    if (bound_arg(lo_o, "lo", &lo, &lo_len, &has_lo) < 0 || bound_arg(hi_o, "hi", &hi, &hi_len, &has_hi) < 0) return NULL;
    if (rs_decode_node(&scratch_entries, &scratch_cap, 1, cid, cid_len, block, len, &left, &left_len, &count) < 0) return NULL;
    int is_root = expected < 0;
    if (count == 0) {
        if (left == NULL) {
            if (is_root) return Py_BuildValue("(i[][][O])", -1, Py_None); /* the empty repo */
            rs_raise("empty_node", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
            return NULL;
        }
        if (is_root) {
            rs_raise("empty_root", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
            return NULL;
        }
        if (expected == 0) {
            rs_raise("left_at_layer0", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
            return NULL;
        }
        return Py_BuildValue("(i[][][y#])", expected, (const char *)left, (Py_ssize_t)left_len);
    }
    PyObject *keys = PyList_New((Py_ssize_t)count);
    PyObject *vals = PyList_New((Py_ssize_t)count);
    PyObject *kids = PyList_New((Py_ssize_t)count + 1);
    if (keys == NULL || vals == NULL || kids == NULL) goto fail;
    /* PyList_New leaves NULL slots: fill every one before anything can see the lists */
    for (size_t j = 0; j <= count; j++) {
        if (j < count) {
            PyList_SET_ITEM(keys, (Py_ssize_t)j, Py_NewRef(Py_None));
            PyList_SET_ITEM(vals, (Py_ssize_t)j, Py_NewRef(Py_None));
        }
        PyList_SET_ITEM(kids, (Py_ssize_t)j, Py_NewRef(Py_None));
    }
    PyObject *l = bytes_or_none(left, left_len, left != NULL);
    if (l == NULL) goto fail;
    PyList_SetItem(kids, 0, l);
    RsKeys *r = &scratch_keys;
    rs_keys_start(r, expected, check_keys);
    for (size_t j = 0; j < count; j++) {
        const RsNodeEntry *e = &scratch_entries[j];
        if (rs_node_key(r, cid, cid_len, e, -1) < 0) goto fail;
        if (j > 0 && bytes_cmp(r->key, r->key_len, r->prev, r->prev_len) <= 0) {
            key_order(r->key, r->key_len, 0, r->prev, r->prev_len, 0);
            goto fail;
        }
        PyObject *k = PyBytes_FromStringAndSize((const char *)r->key, (Py_ssize_t)r->key_len);
        if (k == NULL) goto fail;
        PyList_SetItem(keys, (Py_ssize_t)j, k);
        PyObject *v = PyBytes_FromStringAndSize((const char *)e->v, (Py_ssize_t)e->v_len);
        if (v == NULL) goto fail;
        PyList_SetItem(vals, (Py_ssize_t)j, v);
        PyObject *t = bytes_or_none(e->t, e->t_len, e->has_t);
        if (t == NULL) goto fail;
        PyList_SetItem(kids, (Py_ssize_t)j + 1, t);
        rs_keys_advance(r);
    }
    int layer = r->layer;
    if (layer != expected && !is_root) {
        rs_raise("wrong_layer", "(y#ii)", (const char *)cid, (Py_ssize_t)cid_len, layer, expected);
        goto fail;
    }
    if (left != NULL && layer == 0) {
        rs_raise("left_at_layer0", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
        goto fail;
    }
    PyObject *first = PyList_GET_ITEM(keys, 0);
    PyObject *final = PyList_GET_ITEM(keys, (Py_ssize_t)count - 1);
    const uint8_t *fk = (const uint8_t *)PyBytes_AS_STRING(first), *lk = (const uint8_t *)PyBytes_AS_STRING(final);
    size_t fn = (size_t)PyBytes_GET_SIZE(first), ln = (size_t)PyBytes_GET_SIZE(final);
    if (has_lo && bytes_cmp(fk, fn, lo, lo_len) <= 0) {
        key_order(fk, fn, 0, lo, lo_len, 1);
        goto fail;
    }
    if (has_hi && bytes_cmp(lk, ln, hi, hi_len) >= 0) {
        key_order(hi, hi_len, 1, lk, ln, 0);
        goto fail;
    }
    return Py_BuildValue("(iNNN)", layer, keys, vals, kids);
fail:
    Py_XDECREF(keys);
    Py_XDECREF(vals);
    Py_XDECREF(kids);
    return NULL;
}

PyObject *rs_load_node(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer cid, block;
    int expected, check_keys;
    PyObject *lo, *hi;
    if (!PyArg_ParseTuple(args, "y*y*iOOp:load_node", &cid, &block, &expected, &lo, &hi, &check_keys)) return NULL;
    PyObject *out = NULL;
    if (rs_messages == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "repo_stream._native.setup() was not called");
    } else if (busy) {
        rs_reentered("load_node");
    } else if (expected < -1 || expected > 128) {
        PyErr_Format(PyExc_ValueError, "load_node(): layer %d is outside -1..128", expected);
    } else {
        busy = 1;
        out = load((const uint8_t *)cid.buf, (size_t)cid.len, (const uint8_t *)block.buf, (size_t)block.len, expected, lo, hi, check_keys);
        release_scratch();
    }
    PyBuffer_Release(&cid);
    PyBuffer_Release(&block);
    return out;
}

/* --- encoding ------------------------------------------------------------------------------------- */

typedef struct {
    uint8_t *buf;
    size_t len, cap;
} Out;

static int put(Out *o, const void *p, size_t n) {
    if (n > ((size_t)1 << 40) - o->len) {
        PyErr_NoMemory();
        return -1;
    }
    if (rs_reserve((void **)&o->buf, &o->cap, o->len + n, 1) < 0) return -1;
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

/* A link (tag 42, bytes 0x00 + CID), or null for None. */
static int put_link(Out *o, PyObject *cid) {
    if (cid == Py_None) return put(o, "\xf6", 1);
    size_t n = (size_t)PyBytes_GET_SIZE(cid);
    if (put(o, "\xd8\x2a", 2) < 0 || put_head(o, 2, (uint64_t)n + 1) < 0 || put(o, "", 1) < 0) return -1;
    return put(o, PyBytes_AS_STRING(cid), n);
}

/* The ValueError zip(keys, vals, rights, strict=True) raises for these lengths, or 0 if equal. */
static int zip_lengths(Py_ssize_t nk, Py_ssize_t nv, Py_ssize_t nr) {
    Py_ssize_t m = nk < nv ? nk : nv;
    if (nr < m) m = nr;
    if (nk == m) {
        if (nv > m) goto longer2;
        if (nr > m) goto longer3;
        return 0;
    }
    if (nv == m) {
        PyErr_SetString(PyExc_ValueError, "zip() argument 2 is shorter than argument 1");
        return -1;
    }
    PyErr_SetString(PyExc_ValueError, "zip() argument 3 is shorter than arguments 1-2");
    return -1;
longer2:
    PyErr_SetString(PyExc_ValueError, "zip() argument 2 is longer than argument 1");
    return -1;
longer3:
    PyErr_SetString(PyExc_ValueError, "zip() argument 3 is longer than arguments 1-2");
    return -1;
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
    Out o = {NULL, 0, 0};
    PyObject *out = NULL;
    if (put(&o, "\xa2\x61\x65", 3) < 0 || put_head(&o, 4, (uint64_t)n) < 0) goto done;
    const uint8_t *prev = NULL;
    size_t prev_len = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *ko = PyList_GET_ITEM(keys, i);
        const uint8_t *key = (const uint8_t *)PyBytes_AS_STRING(ko);
        size_t key_len = (size_t)PyBytes_GET_SIZE(ko);
        size_t p = 0;
        if (prev != NULL) {
            size_t m = prev_len < key_len ? prev_len : key_len;
            while (p < m && prev[p] == key[p]) p++;
        }
        if (put(&o, "\xa4\x61k", 3) < 0 || put_head(&o, 2, key_len - p) < 0 || put(&o, key + p, key_len - p) < 0 ||
            put(&o, "\x61p", 2) < 0 || put_head(&o, 0, p) < 0 || put(&o, "\x61t", 2) < 0 || put_link(&o, PyList_GET_ITEM(rights, i)) < 0 ||
            put(&o, "\x61v", 2) < 0 || put_link(&o, PyList_GET_ITEM(vals, i)) < 0)
            goto done;
        prev = key;
        prev_len = key_len;
    }
    if (put(&o, "\x61l", 2) < 0 || put_link(&o, left) < 0) goto done;
    uint8_t cid[36];
    memcpy(cid, RS_CID_PREFIX, 4);
    rs_sha256(o.buf, o.len, cid + 4);
    out = Py_BuildValue("(y#y#)", (const char *)cid, (Py_ssize_t)36, (const char *)o.buf, (Py_ssize_t)o.len);
done:
    PyMem_Free(o.buf);
    return out;
}
