/* Sorted runs: the spill store's format, their merge and their index (spec of the format and the
 * reference: repo_stream/runs.py; this file makes the same bytes and finds the same entries).
 *
 * pack_run sorts a batch of spill rows by CID into one run; RunMerge merges runs fed to it a
 * piece at a time (sans-IO) into one, recording index points; RunIndex finds a CID's entry by
 * reading one short range of the merged run. Runs are read back from the store's own file, but
 * every entry head is still checked before use: a damaged file gives a DiskError, not a crash. */
#include "native.h"

#define HEAD 6
#define LARGE 0x80
#define LARGE_PAYLOAD 8192
enum { K_RAW, K_ENCODED, K_INT, K_FLOAT, K_STR, K_BYTES, K_NONE };

static int cid_cmp(const uint8_t *a, size_t al, const uint8_t *b, size_t bl) {
    int c = memcmp(a, b, al < bl ? al : bl);
    if (c) return c;
    return (al > bl) - (al < bl);
}

static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t rd64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}
static inline void wr64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* The length of the entry at buf[0..avail): 0 if not all of it is there yet, -1 (DiskError set)
 * if its head is not an entry head. */
static Py_ssize_t entry_len(const uint8_t *buf, size_t avail, const char *where, long long offset) {
    if (avail < HEAD) return 0;
    unsigned cid_len = buf[0], kind = buf[1];
    uint32_t size = rd32(buf + 2);
    if (cid_len == 0 || (kind & ~LARGE) > K_NONE || size > LARGE_PAYLOAD || ((kind & LARGE) && size != 8)) {
        rs_raise("store_corrupt", "(sL)", where, offset);
        return -1;
    }
    size_t n = HEAD + cid_len + size;
    return n <= avail ? (Py_ssize_t)n : 0;
}

/* --- pack_run ---------------------------------------------------------------------------------- */

static uint64_t be64_padded(const uint8_t *p, size_t len) {
    uint64_t v = 0;
    for (size_t i = 0; i < 8; i++) v = v << 8 | (i < len ? p[i] : 0);
    return v;
}

static int entry_cmp(const void *pa, const void *pb) {
    const RsEntry *a = pa, *b = pb;
    if (a->k0 != b->k0) return a->k0 < b->k0 ? -1 : 1;
    if (a->k1 != b->k1) return a->k1 < b->k1 ? -1 : 1;
    int c = cid_cmp(a->cid, a->cid_len, b->cid, b->cid_len);
    if (c) return c;
    return (a->seq > b->seq) - (a->seq < b->seq);
}

void rs_entry_cid(RsEntry *e, const uint8_t *cid, size_t cid_len, Py_ssize_t seq) {
    e->cid = cid;
    e->cid_len = cid_len;
    e->k0 = be64_padded(cid, cid_len);
    e->k1 = cid_len > 8 ? be64_padded(cid + 8, cid_len - 8) : 0;
    e->seq = seq;
}

int rs_entry_plain(RsEntry *e, PyObject *value) {
    if (PyLong_CheckExact(value)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (v == -1 && PyErr_Occurred()) return -1;
        if (overflow) return 0;
        wr64(e->small, (uint64_t)v);
        e->kind = K_INT, e->p = NULL, e->len = 8;
    } else if (PyFloat_CheckExact(value)) {
        double d = PyFloat_AS_DOUBLE(value);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        wr64(e->small, bits);
        e->kind = K_FLOAT, e->p = NULL, e->len = 8;
    } else if (PyUnicode_CheckExact(value)) {
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(value, &len);
        if (s == NULL) return -1;
        e->kind = K_STR, e->p = (const uint8_t *)s, e->len = (size_t)len;
    } else if (PyBytes_CheckExact(value)) {
        e->kind = K_BYTES, e->p = (const uint8_t *)PyBytes_AS_STRING(value), e->len = (size_t)PyBytes_GET_SIZE(value);
    } else if (value == Py_None) {
        e->kind = K_NONE, e->p = NULL, e->len = 0;
    } else {
        return 0;
    }
    return 1;
}

PyObject *rs_pack_entries(RsEntry *e, Py_ssize_t n, unsigned long long next_large) {
    qsort(e, (size_t)n, sizeof(RsEntry), entry_cmp);
    PyObject *large = PyList_New(0), *run = NULL, *result = NULL;
    if (large == NULL) return NULL;
    /* first pass: the size; second: the bytes */
    for (int pass = 0; pass < 2; pass++) {
        uint8_t *out = pass ? (uint8_t *)PyBytes_AS_STRING(run) : NULL;
        size_t at = 0;
        unsigned long long id = next_large;
        for (Py_ssize_t j = 0; j < n; j++) {
            if (j > 0 && cid_cmp(e[j].cid, e[j].cid_len, e[j - 1].cid, e[j - 1].cid_len) == 0) continue;
            const uint8_t *p = e[j].p ? e[j].p : e[j].small;
            size_t size = e[j].len;
            int is_large = size > LARGE_PAYLOAD;
            size_t stored = is_large ? 8 : size;
            if (pass) {
                out[at] = (uint8_t)e[j].cid_len;
                out[at + 1] = (uint8_t)(e[j].kind | (is_large ? LARGE : 0));
                uint32_t s32 = (uint32_t)stored;
                out[at + 2] = (uint8_t)s32, out[at + 3] = (uint8_t)(s32 >> 8), out[at + 4] = 0, out[at + 5] = 0;
                memcpy(out + at + HEAD, e[j].cid, e[j].cid_len);
                if (is_large) {
                    wr64(out + at + HEAD + e[j].cid_len, id);
                    PyObject *data = PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)size);
                    PyObject *pair = data ? Py_BuildValue("(KN)", id, data) : NULL;
                    if (pair == NULL || PyList_Append(large, pair) < 0) {
                        Py_XDECREF(pair);
                        goto done;
                    }
                    Py_DECREF(pair);
                } else if (size) {
                    memcpy(out + at + HEAD + e[j].cid_len, p, size);
                }
            }
            if (is_large) id++;
            at += HEAD + e[j].cid_len + stored;
        }
        if (!pass) {
            run = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)at);
            if (run == NULL) goto done;
        }
    }
    result = PyTuple_Pack(2, run, large);
done:
    Py_XDECREF(run);
    Py_DECREF(large);
    return result;
}

/* An entry's kind and payload for one spill row (the reference: runs._payload). */
static int row_payload(RsEntry *e, PyObject *cid, long kind, PyObject *data) {
    if ((kind == 0 || kind == 1) && PyBytes_CheckExact(data)) {
        e->kind = (int)kind;
        e->p = (const uint8_t *)PyBytes_AS_STRING(data);
        e->len = (size_t)PyBytes_GET_SIZE(data);
        return 0;
    }
    if (kind == 2) {
        int plain = rs_entry_plain(e, data);
        if (plain < 0) return -1;
        if (plain) return 0;
    }
    /* the row cannot be stored: the reference's messages */
    PyObject *hex = PyObject_CallMethod(cid, "hex", NULL);
    if (hex == NULL) return -1;
    if (kind == 0 || kind == 1)
        PyErr_Format(PyExc_TypeError, "block %U: a row of kind %ld holds bytes, not %s", hex, kind, Py_TYPE(data)->tp_name);
    else if (kind != 2)
        PyErr_Format(PyExc_ValueError, "block %U: row kind %ld is not 0, 1 or 2", hex, kind);
    else if (PyLong_CheckExact(data))
        PyErr_Format(PyExc_ValueError, "block %U: the int %S does not fit in 64 bits", hex, data);
    else
        PyErr_Format(PyExc_TypeError, "block %U: a value of type %s cannot be stored as it is", hex, Py_TYPE(data)->tp_name);
    Py_DECREF(hex);
    return -1;
}

PyObject *rs_pack_run(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *rows;
    unsigned long long next_large;
    if (!PyArg_ParseTuple(args, "OK", &rows, &next_large)) return NULL;
    PyObject *seq = PySequence_Fast(rows, "pack_run() takes a sequence of spill rows");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    RsEntry *e = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(RsEntry));
    PyObject *result = NULL;
    if (e == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) { /* every row's shape first, then each one's payload, as the reference */
        PyObject *row = items[i];
        if (!PyTuple_CheckExact(row) || PyTuple_GET_SIZE(row) != 3 || !PyBytes_CheckExact(PyTuple_GET_ITEM(row, 0))) {
            PyErr_SetString(PyExc_TypeError, "a spill row is a tuple (cid: bytes, kind: int, data)");
            goto done;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(row, 0));
        if (len < 1 || len > 255) {
            PyErr_Format(PyExc_ValueError, "a CID of %zd bytes cannot be stored (1 to 255)", len);
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *cid = PyTuple_GET_ITEM(items[i], 0), *kind_obj = PyTuple_GET_ITEM(items[i], 1);
        long kind = PyLong_Check(kind_obj) ? PyLong_AsLong(kind_obj) : -1;
        if (kind == -1 && PyErr_Occurred()) goto done;
        rs_entry_cid(&e[i], (const uint8_t *)PyBytes_AS_STRING(cid), (size_t)PyBytes_GET_SIZE(cid), i);
        if (row_payload(&e[i], cid, kind, PyTuple_GET_ITEM(items[i], 2)) < 0) goto done;
    }
    result = rs_pack_entries(e, n, next_large);
done:
    PyMem_Free(e);
    Py_DECREF(seq);
    return result;
}
/* --- RunIndex ---------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    uint64_t *offsets;  /* n points */
    uint64_t *keys;     /* n: each point's CID's first 8 bytes, big-endian (a binary search reads these) */
    size_t *cid_at;     /* n: where each point's CID is in cids */
    uint8_t *cids;      /* each point's CID: its length byte, then the bytes */
    size_t n, cids_len;
    uint64_t total;
    PyObject *segments; /* a list, or NULL before attach() */
    uint64_t segment_size;
} RunIndex;

static PyTypeObject RunIndex_Type;

/* The bytes of the run in [start, end): a new bytes object, or NULL with an error. */
static PyObject *index_read(RunIndex *x, uint64_t start, uint64_t end) {
    if (x->segments == NULL || end < start) return (rs_raise("store_corrupt", "(sK)", "the merged run", (unsigned long long)start), NULL);
    PyObject *parts = NULL, *one = NULL;
    uint64_t pos = start;
    Py_ssize_t nseg = PyList_GET_SIZE(x->segments);
    while (pos < end) {
        uint64_t seg = pos / x->segment_size, at = pos % x->segment_size;
        if (seg >= (uint64_t)nseg) break;
        uint64_t n = end - pos < x->segment_size - at ? end - pos : x->segment_size - at;
        PyObject *slice = Py_BuildValue("(KK)", (unsigned long long)at, (unsigned long long)(at + n));
        PyObject *sl = slice ? PySlice_New(PyTuple_GET_ITEM(slice, 0), PyTuple_GET_ITEM(slice, 1), NULL) : NULL;
        Py_XDECREF(slice);
        PyObject *got = sl ? PyObject_GetItem(PyList_GET_ITEM(x->segments, (Py_ssize_t)seg), sl) : NULL;
        Py_XDECREF(sl);
        if (got == NULL) goto fail;
        if (!PyBytes_Check(got) || (uint64_t)PyBytes_GET_SIZE(got) != n) {
            Py_DECREF(got);
            break;
        }
        if (one == NULL && parts == NULL) {
            one = got;
        } else {
            if (parts == NULL) {
                parts = PyList_New(0);
                if (parts == NULL || PyList_Append(parts, one) < 0) {
                    Py_DECREF(got);
                    goto fail;
                }
                Py_CLEAR(one);
            }
            int r = PyList_Append(parts, got);
            Py_DECREF(got);
            if (r < 0) goto fail;
        }
        pos += n;
    }
    if (pos != end) {
        rs_raise("store_corrupt", "(sK)", "the merged run", (unsigned long long)start);
        goto fail;
    }
    if (parts != NULL) {
        PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
        PyObject *joined = empty ? _PyBytes_Join(empty, parts) : NULL;
        Py_XDECREF(empty);
        Py_DECREF(parts);
        return joined;
    }
    return one ? one : PyBytes_FromStringAndSize(NULL, 0);
fail:
    Py_XDECREF(parts);
    Py_XDECREF(one);
    return NULL;
}

/* The (kind, data) of an entry (the reference: runs._value). */
static PyObject *entry_value(const uint8_t *e, uint64_t offset) {
    unsigned cid_len = e[0], kind = e[1];
    uint32_t size = rd32(e + 2);
    const uint8_t *p = e + HEAD + cid_len;
    if (kind & LARGE) return Py_BuildValue("(iK)", (int)kind, (unsigned long long)rd64(p));
    switch (kind) {
    case K_RAW:
    case K_ENCODED:
        return Py_BuildValue("(iy#)", (int)kind, (const char *)p, (Py_ssize_t)size);
    case K_INT:
        if (size == 8) return Py_BuildValue("(iL)", 2, (long long)rd64(p));
        break;
    case K_FLOAT:
        if (size == 8) {
            uint64_t bits = rd64(p);
            double d;
            memcpy(&d, &bits, 8);
            return Py_BuildValue("(id)", 2, d);
        }
        break;
    case K_STR: {
        PyObject *s = PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)size, NULL);
        if (s == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) return NULL;
            PyErr_Clear();
            break;
        }
        return Py_BuildValue("(iN)", 2, s);
    }
    case K_BYTES:
        return Py_BuildValue("(iy#)", 2, (const char *)p, (Py_ssize_t)size);
    case K_NONE:
        if (size == 0) return Py_BuildValue("(iO)", 2, Py_None);
        break;
    }
    rs_raise("store_corrupt", "(sK)", "the merged run", (unsigned long long)offset);
    return NULL;
}

/* The entry of cid: a new (kind, data), Py_None (absent), or NULL with an error. `cache`/`cache_at`
 * hold the last range read, reused when the next CID falls in it. */
static PyObject *index_find(RunIndex *x, const uint8_t *cid, size_t cid_len, PyObject **cache, uint64_t *cache_at) {
    size_t lo = 0, hi = x->n; /* the last point whose CID <= cid */
    uint64_t key = be64_padded(cid, cid_len);
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int le;
        if (x->keys[mid] != key) {
            le = x->keys[mid] < key;
        } else {
            const uint8_t *pc = x->cids + x->cid_at[mid];
            le = cid_cmp(pc + 1, pc[0], cid, cid_len) <= 0;
        }
        if (le)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0) Py_RETURN_NONE;
    size_t i = lo - 1;
    uint64_t start = x->offsets[i], end = i + 1 < x->n ? x->offsets[i + 1] : x->total;
    if (*cache == NULL || *cache_at != start) {
        Py_CLEAR(*cache);
        *cache = index_read(x, start, end);
        if (*cache == NULL) return NULL;
        *cache_at = start;
    }
    const uint8_t *data = (const uint8_t *)PyBytes_AS_STRING(*cache);
    size_t avail = (size_t)PyBytes_GET_SIZE(*cache), pos = 0;
    while (pos < avail) {
        Py_ssize_t len = entry_len(data + pos, avail - pos, "the merged run", (long long)(start + pos));
        if (len < 0) return NULL;
        if (len == 0) {
            rs_raise("store_corrupt", "(sK)", "the merged run", (unsigned long long)(start + pos));
            return NULL;
        }
        int c = cid_cmp(data + pos + HEAD, data[pos], cid, cid_len);
        if (c == 0) return entry_value(data + pos, start + pos);
        if (c > 0) break;
        pos += (size_t)len;
    }
    Py_RETURN_NONE;
}

static PyObject *RunIndex_get(RunIndex *self, PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "get() takes a CID as bytes");
        return NULL;
    }
    PyObject *cache = NULL;
    uint64_t at = 0;
    PyObject *r = index_find(self, (const uint8_t *)PyBytes_AS_STRING(arg), (size_t)PyBytes_GET_SIZE(arg), &cache, &at);
    Py_XDECREF(cache);
    return r;
}

static PyObject *RunIndex_get_many(RunIndex *self, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "get_many() takes a list of CIDs");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyList_New(n);
    PyObject *cache = NULL;
    uint64_t at = 0;
    long n_large = 0, n_plain = 0;
    if (out == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *cid = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyBytes_Check(cid)) {
            PyErr_SetString(PyExc_TypeError, "get_many() takes a list of CIDs as bytes");
            goto fail;
        }
        PyObject *r = index_find(self, (const uint8_t *)PyBytes_AS_STRING(cid), (size_t)PyBytes_GET_SIZE(cid), &cache, &at);
        if (r == NULL) goto fail;
        if (r != Py_None) {
            long kind = PyLong_AsLong(PyTuple_GET_ITEM(r, 0));
            n_large += (kind & LARGE) != 0;
            n_plain += kind == 2;
        }
        PyList_SET_ITEM(out, i, r);
    }
    Py_XDECREF(cache);
    Py_DECREF(seq);
    return Py_BuildValue("(Nll)", out, n_large, n_plain);
fail:
    Py_XDECREF(cache);
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *RunIndex_attach(RunIndex *self, PyObject *args) {
    PyObject *segments;
    unsigned long long size;
    if (!PyArg_ParseTuple(args, "OK", &segments, &size)) return NULL;
    if (size < 1) {
        PyErr_SetString(PyExc_ValueError, "segment_size must be at least 1");
        return NULL;
    }
    PyObject *list = PySequence_List(segments);
    if (list == NULL) return NULL;
    Py_XSETREF(self->segments, list);
    self->segment_size = size;
    Py_RETURN_NONE;
}

static Py_ssize_t RunIndex_len(RunIndex *self) { return (Py_ssize_t)self->n; }

static PyObject *RunIndex_get_total(RunIndex *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->total);
}

static int RunIndex_traverse(RunIndex *self, visitproc visit, void *arg) {
    Py_VISIT(self->segments);
    return 0;
}

static int RunIndex_clear_refs(RunIndex *self) {
    Py_CLEAR(self->segments);
    return 0;
}

static void RunIndex_dealloc(RunIndex *self) {
    PyObject_GC_UnTrack(self);
    RunIndex_clear_refs(self);
    PyMem_Free(self->offsets);
    PyMem_Free(self->keys);
    PyMem_Free(self->cid_at);
    PyMem_Free(self->cids);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef RunIndex_methods[] = {
    {"attach", (PyCFunction)RunIndex_attach, METH_VARARGS,
     "attach(segments, segment_size)\n--\n\nRead the run from segments (each segment_size bytes but the last)."},
    {"get", (PyCFunction)RunIndex_get, METH_O, "get(cid)\n--\n\n(kind, data) of cid's entry, or None."},
    {"get_many", (PyCFunction)RunIndex_get_many, METH_O,
     "get_many(cids)\n--\n\n(list of get(cid), how many are large ids, how many are plain values)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef RunIndex_getset[] = {
    {"total", (getter)RunIndex_get_total, NULL, "The merged run's length, bytes.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods RunIndex_as_sequence = {.sq_length = (lenfunc)RunIndex_len};

static PyTypeObject RunIndex_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "repo_stream._native.RunIndex",
    .tp_basicsize = sizeof(RunIndex),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Finds entries in a merged run (see repo_stream.core.runs.RunIndex); made by RunMerge.index().",
    .tp_dealloc = (destructor)RunIndex_dealloc,
    .tp_traverse = (traverseproc)RunIndex_traverse,
    .tp_clear = (inquiry)RunIndex_clear_refs,
    .tp_methods = RunIndex_methods,
    .tp_getset = RunIndex_getset,
    .tp_as_sequence = &RunIndex_as_sequence,
};

/* --- RunMerge ---------------------------------------------------------------------------------- */

typedef struct {
    uint8_t *buf;
    size_t len, pos, cap;
    int ended;
} Input;

typedef struct {
    uint8_t *buf;
    size_t len, cap;
    uint64_t written, next_point;
    uint64_t *offsets, *keys; /* the index points: offset and CID key of each */
    size_t *cid_at;
    size_t n_points, cap_points;
    uint8_t *cids;
    size_t cids_len, cids_cap;
} Output;

static void output_free(Output *o) {
    PyMem_Free(o->buf);
    PyMem_Free(o->offsets);
    PyMem_Free(o->keys);
    PyMem_Free(o->cid_at);
    PyMem_Free(o->cids);
    memset(o, 0, sizeof *o);
}

typedef struct {
    PyObject_HEAD
    Input *in;
    Py_ssize_t n;
    Py_ssize_t *pending, n_pending; /* runs whose next entry is not in memory yet (a stack) */
    Py_ssize_t *heap, n_heap;       /* runs whose next entry is, by (CID, run) */
    Output out[2]; /* 0: everything, or with split the MST nodes; 1: with split, the rest */
    int split;
    uint8_t last[256]; /* the last CID output: its length, then the bytes */
    int has_last;
    uint64_t every;
    int index_taken;
} RunMerge;

/* Run i's next entry length: > 0 if it is all in memory, 0 if more must be fed (or the run is
 * over), -1 with an error (a damaged run, or bytes left after its end). */
static Py_ssize_t head_len(RunMerge *m, Py_ssize_t i) {
    Input *r = &m->in[i];
    size_t avail = r->len - r->pos;
    if (avail >= HEAD) { /* the usual case, checked as entry_len does, without naming the run */
        const uint8_t *e = r->buf + r->pos;
        size_t size = rd32(e + 2);
        if (e[0] != 0 && (e[1] & ~LARGE) <= K_NONE && size <= LARGE_PAYLOAD && (!(e[1] & LARGE) || size == 8)) {
            size_t n = HEAD + e[0] + size;
            if (n <= avail) return (Py_ssize_t)n;
            if (!r->ended) return 0;
        }
    } else if (!r->ended || avail == 0) {
        return 0;
    }
    char where[48];
    snprintf(where, sizeof where, "run %zd", i);
    rs_raise("store_corrupt", "(sL)", where, (long long)r->pos);
    return -1;
}

static inline int run_less(RunMerge *m, Py_ssize_t a, Py_ssize_t b) {
    const uint8_t *ea = m->in[a].buf + m->in[a].pos, *eb = m->in[b].buf + m->in[b].pos;
    int c = cid_cmp(ea + HEAD, ea[0], eb + HEAD, eb[0]);
    return c < 0 || (c == 0 && a < b);
}

static void heap_push(RunMerge *m, Py_ssize_t i) {
    Py_ssize_t k = m->n_heap++;
    m->heap[k] = i;
    while (k > 0) {
        Py_ssize_t parent = (k - 1) / 2;
        if (!run_less(m, m->heap[k], m->heap[parent])) break;
        Py_ssize_t t = m->heap[k];
        m->heap[k] = m->heap[parent];
        m->heap[parent] = t;
        k = parent;
    }
}

static Py_ssize_t heap_pop(RunMerge *m) {
    Py_ssize_t top = m->heap[0];
    m->heap[0] = m->heap[--m->n_heap];
    Py_ssize_t k = 0;
    for (;;) {
        Py_ssize_t l = 2 * k + 1, r = l + 1, best = k;
        if (l < m->n_heap && run_less(m, m->heap[l], m->heap[best])) best = l;
        if (r < m->n_heap && run_less(m, m->heap[r], m->heap[best])) best = r;
        if (best == k) break;
        Py_ssize_t t = m->heap[k];
        m->heap[k] = m->heap[best];
        m->heap[best] = t;
        k = best;
    }
    return top;
}

static int RunMerge_init(RunMerge *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"n", "index_every", "split", NULL};
    Py_ssize_t n;
    unsigned long long every = 0;
    int split = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n|Kp", names, &n, &every, &split)) return -1;
    if (n < 0 || n > 1000000) {
        PyErr_SetString(PyExc_ValueError, "RunMerge needs 0 <= n <= 1000000 runs");
        return -1;
    }
    if (self->in != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "RunMerge is initialised once");
        return -1;
    }
    size_t count = n ? (size_t)n : 1;
    self->in = PyMem_Calloc(count, sizeof(Input));
    self->pending = PyMem_Malloc(count * sizeof(Py_ssize_t));
    self->heap = PyMem_Malloc(count * sizeof(Py_ssize_t));
    if (self->in == NULL || self->pending == NULL || self->heap == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->n = n;
    for (Py_ssize_t i = 0; i < n; i++) self->pending[i] = n - 1 - i;
    self->n_pending = n;
    self->every = every;
    self->split = split;
    return 0;
}

static PyObject *RunMerge_feed(RunMerge *self, PyObject *args) {
    Py_ssize_t i;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "ny*", &i, &data)) return NULL;
    PyObject *result = NULL;
    if (i < 0 || i >= self->n) {
        PyErr_Format(PyExc_IndexError, "no run %zd", i);
        goto done;
    }
    Input *r = &self->in[i];
    if (r->ended) {
        PyErr_Format(PyExc_ValueError, "run %zd has ended", i);
        goto done;
    }
    if (data.len == 0) {
        r->ended = 1;
    } else {
        if (r->pos) {
            memmove(r->buf, r->buf + r->pos, r->len - r->pos);
            r->len -= r->pos;
            r->pos = 0;
        }
        if (rs_reserve((void **)&r->buf, &r->cap, r->len + (size_t)data.len, 1) < 0) goto done;
        memcpy(r->buf + r->len, data.buf, (size_t)data.len);
        r->len += (size_t)data.len;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&data);
    return result;
}

static int add_point(Output *m, const uint8_t *cid, size_t cid_len, uint64_t offset) {
    if (m->n_points == m->cap_points) {
        size_t cap = m->cap_points ? 2 * m->cap_points : 64;
        uint64_t *offsets = PyMem_Realloc(m->offsets, cap * sizeof(uint64_t));
        if (offsets == NULL) return (PyErr_NoMemory(), -1);
        m->offsets = offsets;
        uint64_t *keys = PyMem_Realloc(m->keys, cap * sizeof(uint64_t));
        if (keys == NULL) return (PyErr_NoMemory(), -1);
        m->keys = keys;
        size_t *cid_at = PyMem_Realloc(m->cid_at, cap * sizeof(size_t));
        if (cid_at == NULL) return (PyErr_NoMemory(), -1);
        m->cid_at = cid_at;
        m->cap_points = cap;
    }
    if (rs_reserve((void **)&m->cids, &m->cids_cap, m->cids_len + 1 + cid_len, 1) < 0) return -1;
    m->offsets[m->n_points] = offset;
    m->keys[m->n_points] = be64_padded(cid, cid_len);
    m->cid_at[m->n_points] = m->cids_len;
    m->cids[m->cids_len] = (uint8_t)cid_len;
    memcpy(m->cids + m->cids_len + 1, cid, cid_len);
    m->cids_len += 1 + cid_len;
    m->n_points++;
    return 0;
}

/* The bytes an output holds, handed out (with its number when the merge splits); NULL if none. */
static PyObject *take_out(RunMerge *m, int k) {
    Output *o = &m->out[k];
    PyObject *data = PyBytes_FromStringAndSize((const char *)o->buf, (Py_ssize_t)o->len);
    if (data == NULL) return NULL;
    o->written += o->len;
    o->len = 0;
    return m->split ? Py_BuildValue("(iN)", k, data) : data;
}

/* Whether a run entry is a raw block shaped like an MST node (runs.is_node_entry). */
static int is_node_entry(const uint8_t *e, size_t len) {
    size_t at = HEAD + e[0];
    return e[1] == K_RAW && len > at + 3 && e[at] == 0xa2 && e[at + 1] == 0x61 && e[at + 2] == 0x65 &&
           (e[at + 3] & 0xe0) == 0x80;
}

static PyObject *RunMerge_step(RunMerge *self, PyObject *arg) {
    Py_ssize_t out_max = PyLong_AsSsize_t(arg);
    if (out_max == -1 && PyErr_Occurred()) return NULL;
    if (out_max < 1) out_max = 1;
    int outs = self->split ? 2 : 1;
    while (self->n_pending > 0) {
        Py_ssize_t i = self->pending[self->n_pending - 1];
        Py_ssize_t len = head_len(self, i);
        if (len < 0) return NULL;
        if (len > 0)
            heap_push(self, i);
        else if (!self->in[i].ended)
            return PyLong_FromSsize_t(i);
        self->n_pending--;
    }
    while (self->n_heap > 0) {
        for (int k = 0; k < outs; k++)
            if (self->out[k].len >= (size_t)out_max) return take_out(self, k);
        Py_ssize_t i = heap_pop(self);
        Input *r = &self->in[i];
        const uint8_t *e = r->buf + r->pos;
        Py_ssize_t len = head_len(self, i); /* > 0: it was pushed so */
        if (len <= 0) return len < 0 ? NULL : (rs_raise("store_corrupt", "(sL)", "a run", (long long)r->pos), NULL);
        size_t cid_len = e[0];
        if (!self->has_last || cid_cmp(e + HEAD, cid_len, self->last + 1, self->last[0]) != 0) {
            Output *o = &self->out[self->split && !is_node_entry(e, (size_t)len) ? 1 : 0];
            uint64_t offset = o->written + o->len;
            if (self->every && (o->n_points == 0 || offset >= o->next_point)) {
                if (add_point(o, e + HEAD, cid_len, offset) < 0) return NULL;
                o->next_point = offset + self->every;
            }
            if (rs_reserve((void **)&o->buf, &o->cap, o->len + (size_t)len, 1) < 0) return NULL;
            memcpy(o->buf + o->len, e, (size_t)len);
            o->len += (size_t)len;
            self->last[0] = (uint8_t)cid_len;
            memcpy(self->last + 1, e + HEAD, cid_len);
            self->has_last = 1;
        }
        r->pos += (size_t)len;
        Py_ssize_t next = head_len(self, i);
        if (next < 0) return NULL;
        if (next > 0) {
            heap_push(self, i);
        } else if (!r->ended) {
            self->pending[self->n_pending++] = i;
            return PyLong_FromSsize_t(i);
        }
    }
    for (int k = 0; k < outs; k++)
        if (self->out[k].len) return take_out(self, k);
    Py_RETURN_NONE;
}

static PyObject *index_of(Output *o) {
    RunIndex *x = PyObject_GC_New(RunIndex, &RunIndex_Type);
    if (x == NULL) return NULL;
    x->offsets = o->offsets;
    x->keys = o->keys;
    x->cid_at = o->cid_at;
    x->cids = o->cids;
    x->n = o->n_points;
    x->cids_len = o->cids_len;
    x->total = o->written;
    x->segments = NULL;
    x->segment_size = 1;
    o->offsets = o->keys = NULL;
    o->cid_at = NULL;
    o->cids = NULL;
    o->n_points = o->cap_points = o->cids_len = o->cids_cap = 0;
    PyObject_GC_Track((PyObject *)x);
    return (PyObject *)x;
}

static PyObject *RunMerge_index(RunMerge *self, PyObject *unused) {
    (void)unused;
    if (self->n_pending || self->n_heap || self->out[0].len || self->out[1].len || (!self->every && self->n) ||
        self->index_taken) {
        PyErr_SetString(PyExc_ValueError, "the merge is not over, or keeps no index");
        return NULL;
    }
    PyObject *first = index_of(&self->out[0]);
    if (first == NULL) return NULL;
    self->index_taken = 1;
    if (!self->split) return first;
    PyObject *second = index_of(&self->out[1]);
    if (second == NULL) {
        Py_DECREF(first);
        return NULL;
    }
    return Py_BuildValue("(NN)", first, second);
}

static void RunMerge_dealloc(RunMerge *self) {
    if (self->in != NULL)
        for (Py_ssize_t i = 0; i < self->n; i++) PyMem_Free(self->in[i].buf);
    PyMem_Free(self->in);
    PyMem_Free(self->pending);
    PyMem_Free(self->heap);
    output_free(&self->out[0]);
    output_free(&self->out[1]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef RunMerge_methods[] = {
    {"feed", (PyCFunction)RunMerge_feed, METH_VARARGS, "feed(i, data)\n--\n\nAppend data to run i (b'': it has no more)."},
    {"step", (PyCFunction)RunMerge_step, METH_O,
     "step(out_max)\n--\n\nOutput bytes, the run to feed next (int), or None when done."},
    {"index", (PyCFunction)RunMerge_index, METH_NOARGS, "index()\n--\n\nThe merged run's RunIndex, once the merge is over."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject RsRunMerge_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "repo_stream._native.RunMerge",
    .tp_basicsize = sizeof(RunMerge),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "RunMerge(n, index_every=0, split=False): merges n sorted runs fed a piece at a time (see repo_stream.core.runs.RunMerge).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RunMerge_init,
    .tp_dealloc = (destructor)RunMerge_dealloc,
    .tp_methods = RunMerge_methods,
};

int rs_runs_ready(void) { return PyType_Ready(&RunIndex_Type) < 0 || PyType_Ready(&RsRunMerge_Type) < 0 ? -1 : 0; }
