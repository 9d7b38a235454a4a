/* The module: its three types, setup() and the helpers they share (errors, CID text). */
#include "native.h"

PyObject *rs_messages = NULL;
PyObject *rs_not_a_node = NULL;
PyObject *rs_cid_text = NULL;
PyObject *rs_verify = NULL;
PyObject *rs_base_error = NULL;
PyObject *rs_len = NULL;

int rs_raise(const char *name, const char *fmt, ...) {
    if (rs_messages == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "repo_stream._native.setup() was not called");
        return -1;
    }
    va_list va;
    va_start(va, fmt);
    PyObject *args = Py_VaBuildValue(fmt, va);
    va_end(va);
    if (args == NULL) return -1;
    if (!PyTuple_Check(args)) {
        PyObject *one = PyTuple_Pack(1, args);
        Py_DECREF(args);
        if (one == NULL) return -1;
        args = one;
    }
    PyObject *fn = PyObject_GetAttrString(rs_messages, name);
    if (fn == NULL) {
        Py_DECREF(args);
        return -1;
    }
    PyObject *exc = PyObject_Call(fn, args, NULL);
    Py_DECREF(fn);
    Py_DECREF(args);
    if (exc == NULL) return -1;
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return -1;
}

int rs_init_twice(const char *type) {
    PyErr_Format(PyExc_RuntimeError, "%s.__init__ called twice", type);
    return -1;
}

int rs_not_initialised(const char *type) {
    PyErr_Format(PyExc_RuntimeError, "%s is not initialised (its __init__ did not run)", type);
    return -1;
}

int rs_reentered(const char *type) {
    PyErr_Format(PyExc_RuntimeError, "%s is already running (called again from a callback)", type);
    return -1;
}

PyObject *rs_cid_text_of(const uint8_t *cid, size_t len) {
    if (len == 0 || cid[0] != 0x01 || len > 256) {
        PyObject *raw = PyBytes_FromStringAndSize((const char *)cid, (Py_ssize_t)len);
        if (raw == NULL) return NULL;
        PyObject *text = PyObject_CallOneArg(rs_cid_text, raw);
        Py_DECREF(raw);
        return text;
    }
    char out[RS_CID_TEXT_MAX];
    size_t n = rs_cid_b32(out, cid, len); /* a CIDv1 of at most 256 bytes: never 0 here */
    return PyUnicode_FromStringAndSize(out, (Py_ssize_t)n);
}

/* cid_text(raw): repo_stream.core.cid.cid_text in C (base32 for a CIDv1 of at most 256 bytes,
 * that function itself for anything else). Guarded: setup() must have run (the fallback). */
static PyObject *cid_text(PyObject *self, PyObject *arg) {
    (void)self;
    if (rs_cid_text == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "repo_stream._native.setup() was not called");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *text = rs_cid_text_of((const uint8_t *)view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return text;
}

static PyObject *setup(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *names[] = {"messages", "not_a_node", "cid_text", NULL};
    PyObject *messages, *not_a_node, *cid_text;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOO", names, &messages, &not_a_node, &cid_text)) return NULL;
    PyObject *base = PyObject_GetAttrString(messages, "RepoStreamError");
    if (base == NULL) return NULL;
    PyObject *car = PyImport_ImportModule("repo_stream.core.car");
    if (car == NULL) {
        Py_DECREF(base);
        return NULL;
    }
    PyObject *verify = PyObject_GetAttrString(car, "_verify");
    Py_DECREF(car);
    if (verify == NULL) {
        Py_DECREF(base);
        return NULL;
    }
    PyObject *len = PyDict_GetItemString(PyEval_GetBuiltins(), "len");
    if (len == NULL) {
        Py_DECREF(base);
        Py_DECREF(verify);
        PyErr_SetString(PyExc_RuntimeError, "builtins.len is missing");
        return NULL;
    }
    Py_INCREF(len);
    Py_XSETREF(rs_len, len);
    Py_XSETREF(rs_base_error, base);
    Py_XSETREF(rs_verify, verify);
    Py_INCREF(messages);
    Py_XSETREF(rs_messages, messages);
    Py_INCREF(not_a_node);
    Py_XSETREF(rs_not_a_node, not_a_node);
    Py_INCREF(cid_text);
    Py_XSETREF(rs_cid_text, cid_text);
    Py_RETURN_NONE;
}

static PyObject *sha256(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    uint8_t out[32];
    rs_sha256((const uint8_t *)view.buf, (size_t)view.len, out);
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

static PyObject *sha256_portable(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    uint8_t out[32];
    rs_sha256_portable((const uint8_t *)view.buf, (size_t)view.len, out);
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

static PyObject *sha256_x2(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer a, b;
    if (!PyArg_ParseTuple(args, "y*y*:sha256_x2", &a, &b)) return NULL;
    uint8_t out_a[32], out_b[32];
    rs_sha256_x2((const uint8_t *)a.buf, (size_t)a.len, (const uint8_t *)b.buf, (size_t)b.len, out_a, out_b);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return Py_BuildValue("(y#y#)", (const char *)out_a, (Py_ssize_t)32, (const char *)out_b, (Py_ssize_t)32);
}

static PyObject *sha256_many(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *seq;
    int lanes = 0;
    if (!PyArg_ParseTuple(args, "O|i:sha256_many", &seq, &lanes)) return NULL;
    PyObject *fast = PySequence_Fast(seq, "sha256_many() takes a sequence of bytes");
    if (fast == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject *out = NULL;
    const uint8_t **data = PyMem_Calloc((size_t)n + 1, sizeof *data);
    size_t *len = PyMem_Calloc((size_t)n + 1, sizeof *len);
    uint8_t(*digests)[32] = PyMem_Calloc((size_t)n + 1, 32);
    if (data == NULL || len == NULL || digests == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyBytes_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "sha256_many() takes a sequence of bytes");
            goto done;
        }
        data[i] = (const uint8_t *)PyBytes_AS_STRING(item);
        len[i] = (size_t)PyBytes_GET_SIZE(item);
    }
    rs_sha256_many((size_t)n, data, len, digests, lanes);
    out = PyList_New(n);
    if (out == NULL) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *d = PyBytes_FromStringAndSize((const char *)digests[i], 32);
        if (d == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, d);
    }
done:
    PyMem_Free(data);
    PyMem_Free(len);
    PyMem_Free(digests);
    Py_DECREF(fast);
    return out;
}

static PyObject *sha256_lanes(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromLong(rs_sha256_lanes());
}

static PyObject *trim_memory(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    rs_trim(0, 1);
    Py_RETURN_NONE;
}

PyObject *rs_transcode_json(PyObject *self, PyObject *block); /* json.c */
PyObject *rs_arrow_batch(PyObject *self, PyObject *args);      /* arrow.c */
PyObject *rs_pg_copy_rows(PyObject *self, PyObject *args);     /* json.c */
PyObject *rs_record_line(PyObject *self, PyObject *const *args, Py_ssize_t nargs); /* json.c */
PyObject *rs_record_events(PyObject *self, PyObject *const *args, Py_ssize_t nargs); /* record_event.c */

static PyMethodDef methods[] = {
    {"setup", (PyCFunction)(void (*)(void))setup, METH_VARARGS | METH_KEYWORDS,
     "setup(*, messages, not_a_node, cid_text)\n--\n\nConnect the core to repo_stream's Python side (done by "
     "repo_stream.core.implementation)."},
    {"pack_run", rs_pack_run, METH_VARARGS,
     "pack_run(rows, next_large)\n--\n\nPack spill rows into one sorted run: (run, large) (see repo_stream.core.runs.pack_run)."},
    {"cid_text", cid_text, METH_O,
     "cid_text(raw)\n--\n\nThe usual text of a binary CID, as repo_stream.core.cid.cid_text (base32 for CIDv1)."},
    {"sha256", sha256, METH_O, "sha256(data)\n--\n\nThe core's SHA-256 digest of a bytes-like object (for tests)."},
    {"sha256_portable", sha256_portable, METH_O,
     "sha256_portable(data)\n--\n\nThe same with the portable rounds only, not the CPU's SHA extensions (for tests)."},
    {"sha256_x2", sha256_x2, METH_VARARGS,
     "sha256_x2(a, b)\n--\n\nThe core's SHA-256 digests of two bytes-like objects hashed at once, as a pair (for tests)."},
    {"sha256_many", sha256_many, METH_VARARGS,
     "sha256_many(messages, lanes=0)\n--\n\nThe core's SHA-256 digests of a sequence of bytes, hashed side by side "
     "in up to `lanes` vector lanes (0: the widest this CPU has; for tests)."},
    {"sha256_lanes", sha256_lanes, METH_NOARGS,
     "sha256_lanes()\n--\n\nThe most messages the core hashes side by side on this CPU: 16, 8 or 1."},
    {"trim_memory", trim_memory, METH_NOARGS,
     "trim_memory()\n--\n\nHand freed heap memory back to the OS now (glibc's malloc_trim; nothing elsewhere)."},
    {"record_events", (PyCFunction)(void (*)(void))rs_record_events, METH_FASTCALL,
     "record_events(cls, unset, did, rev, seq, ops)\n--\n\nA verified commit's record events, as "
     "repo_stream.sync.service.record_events makes them: (deliveries, records), deliveries a list of (cls instance, "
     "None), records of (path, CID text or None); cls a class with RecordEvent's slots (set, its __init__ not "
     "called), unset the marker of a value not decoded yet."},
    {"record_line", (PyCFunction)(void (*)(void))rs_record_line, METH_FASTCALL,
     "record_line(did, rev, seq, action, collection, rkey, cid, value_text, live)\n--\n\nA sync RecordEvent's JSON line, "
     "as repo_stream.sync.follow.RecordEvent.to_json_line makes it, or None when an argument is not the usual kind (a "
     "string needing an escape, a seq beyond 64 bits...): the caller makes it in Python then."},
    {"transcode_json", rs_transcode_json, METH_O,
     "transcode_json(block)\n--\n\nA record block (strict DAG-CBOR) as its atproto JSON text (see "
     "repo_stream.records.json_text.transcode_json)."},
    {"load_node", rs_load_node, METH_VARARGS,
     "load_node(cid, block, expected, lo, hi, check_keys)\n--\n\nDecode and check one MST node of a partial tree: "
     "(layer, keys, vals, kids) (see repo_stream.sync.partial.load_node)."},
    {"encode_node", rs_encode_node, METH_VARARGS,
     "encode_node(left, keys, vals, rights)\n--\n\nAn MST node block and its CID: (cid, block) (see "
     "repo_stream.sync.partial.encode_node)."},
    {"lookup_and_invert", rs_lookup_and_invert, METH_VARARGS,
     "lookup_and_invert(root, blocks, keys, ops, check_keys, max_depth)\n--\n\nA commit's tree work held in C: (held, "
     "inverted) (see repo_stream.sync.invert.lookup_and_invert; ops are (code, path, key, cid, prev), code 0 create, 1 "
     "update, 2 delete)."},
    {"commit_event", rs_commit_event, METH_VARARGS,
     "commit_event(message, check_keys, link, max_ops, max_blocks, max_block, max_depth)\n--\n\nThe usual #commit message "
     "read in one pass: (did, rev, since, commit, prevData, seq, time, items, record blocks, data, sig, unsigned, (held, "
     "inverted) or None, the rev's TID timestamp or None), or None for any other message (see "
     "repo_stream.sync.verify.verify_commit, whose reference path then decides). A link that is a Python class made by "
     "object.__new__ gets its instances so made, cid_bytes set, without __init__."},
    {"commit_peek", rs_commit_peek, METH_VARARGS,
     "commit_peek(message, max_ops)\n--\n\nWhat a firehose client needs of the usual #commit message without decoding "
     "the rest: (seq, repo, rev, time, [(action, path), ...]), the values decode_frame gives, or None for any other "
     "message (see repo_stream.firehose.items.parse_message, which then decodes it)."},
    {"arrow_batch", rs_arrow_batch, METH_VARARGS,
     "arrow_batch(chunk, value_kind)\n--\n\nA chunk of (key, cid, value) as the Arrow C Data Interface capsules "
     "(schema, array) of a record batch (see repo_stream.read.arrow)."},
    {"pg_copy_rows", rs_pg_copy_rows, METH_VARARGS,
     "pg_copy_rows(chunk, did, rev, jsonb)\n--\n\nPostgreSQL binary COPY rows (did, collection, rkey, cid, rev, value) "
     "of (key, cid, block) items (see repo_stream.backfill.stores)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "repo_stream._native",
    "The C core of repo-stream: CarParser, BlockTable, Walker, and the spill store's runs (see repo_stream.core.implementation).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&RsCarParser_Type) < 0 || PyType_Ready(&RsBlockTable_Type) < 0 || PyType_Ready(&RsWalker_Type) < 0 ||
        rs_runs_ready() < 0 || rs_table_keys_init() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "CarParser", (PyObject *)&RsCarParser_Type) < 0 ||
        PyModule_AddObjectRef(m, "BlockTable", (PyObject *)&RsBlockTable_Type) < 0 ||
        PyModule_AddObjectRef(m, "Walker", (PyObject *)&RsWalker_Type) < 0 ||
        PyModule_AddObjectRef(m, "RunMerge", (PyObject *)&RsRunMerge_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
