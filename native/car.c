/* CarParser: the sans-IO CAR v1 parser (spec: IPLD CARv1; atproto repository, "CAR File
 * Serialization"). Mirrors repo_stream/car.py's CarParser: feed() bytes, `want` says how many
 * more are needed, read_header() / next_sections() / load_into(table, limit) take what is complete.
 * load_into() copies sections straight into a BlockTable: no Python object per section. */
#include "native.h"

#define MAX_DIGEST_BYTES 64
#define MAX_CID_BYTES 128

typedef struct {
    PyObject_HEAD
    uint8_t *buf;
    Py_ssize_t len, cap, pos; /* unparsed bytes are buf[pos:len] */
    long long offset;          /* stream offset of buf[0] */
    Py_ssize_t need;           /* bytes (from pos) needed before going on */
    int header_done;
    Py_ssize_t max_block_size;
    int verify;
    long long bytes_fed, blocks_read;
    RsVerifier *verifier; /* verify_cids: blocks hashed ahead, on a second core (verify.c) */
    uint8_t init_called, ready, busy; /* see rs_init_twice in native.h */
} CarParser;

/* Enter a method: initialised and not running (a callback such as a block processor calling back
 * into the parser would find its buffer moved). 0 (now busy), or -1 with RuntimeError. */
static int enter(CarParser *self) {
    if (!self->ready) return rs_not_initialised("CarParser");
    if (self->busy) return rs_reentered("CarParser");
    self->busy = 1;
    return 0;
}

/* Varint as repo_stream.core.car.read_varint: returns 1 (value, *next set), 0 (ends before `end`),
 * -1 (error set). `offset` is the stream offset of buf[0]. */
static int read_varint(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, long long offset, uint64_t *value,
                       Py_ssize_t *next) {
    uint64_t v = 0;
    int shift = 0;
    Py_ssize_t start = pos;
    for (;;) {
        if (pos >= end) {
            if (pos - start >= 9) return rs_raise("varint_too_long", "(L)", offset + start);
            return 0;
        }
        uint8_t byte = buf[pos++];
        v |= (uint64_t)(byte & 0x7f) << shift;
        if (byte < 0x80) {
            if (byte == 0 && pos - start > 1) return rs_raise("varint_not_minimal", "(L)", offset + start);
            *value = v;
            *next = pos;
            return 1;
        }
        shift += 7;
        if (pos - start >= 9) return rs_raise("varint_too_long", "(L)", offset + start);
    }
}

/* CidError with the text of the VarintError just raised. */
static int cid_varint_error(long long at) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *text = value ? PyObject_Str(value) : NULL;
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    if (text == NULL) return -1;
    rs_raise("cid_bad", "(LN)", at, text);
    return -1;
}

/* As repo_stream.core.car._cid_end: where the CID at buf[pos] ends (it must fit before `end`), or -1. */
static Py_ssize_t cid_end(const uint8_t *buf, Py_ssize_t pos, Py_ssize_t end, long long offset) {
    long long at = offset + pos;
    if (end - pos >= 2 && buf[pos] == 0x12 && buf[pos + 1] == 0x20) {
        if (pos + 34 > end) return rs_raise("cid_bad", "(Ls)", at, "multihash runs past the end of its section");
        return pos + 34;
    }
    uint64_t fields[4];
    Py_ssize_t p = pos;
    for (int i = 0; i < 4; i++) {
        int got = read_varint(buf, p, end, offset, &fields[i], &p);
        if (got < 0) return cid_varint_error(at);
        if (got == 0) return rs_raise("cid_bad", "(Ls)", at, "runs past the end of its section");
    }
    if (fields[0] != 1) {
        PyObject *detail = PyUnicode_FromFormat("unsupported CID version %llu", (unsigned long long)fields[0]);
        if (detail == NULL) return -1;
        return rs_raise("cid_bad", "(LN)", at, detail);
    }
    if (fields[3] > MAX_DIGEST_BYTES) {
        PyObject *detail = PyUnicode_FromFormat("a %llu-byte digest is longer than any supported hash (%d)",
                                                (unsigned long long)fields[3], MAX_DIGEST_BYTES);
        if (detail == NULL) return -1;
        return rs_raise("cid_bad", "(LN)", at, detail);
    }
    if (p + (Py_ssize_t)fields[3] > end) {
        PyObject *detail = PyUnicode_FromFormat("multihash digest of %llu bytes runs past the end of its section",
                                                (unsigned long long)fields[3]);
        if (detail == NULL) return -1;
        return rs_raise("cid_bad", "(LN)", at, detail);
    }
    return p + (Py_ssize_t)fields[3];
}

#define SMALL_STREAM (256 * 1024)

static int block_too_large(const uint8_t *cid, Py_ssize_t cid_len, long long at, Py_ssize_t size, Py_ssize_t limit) {
    return rs_raise("block_too_large", "(y#Lnn)", (const char *)cid, cid_len, at, size, limit);
}

/* Whether the block of the section at buf[start] (CID prefix at buf[pos], block buf[ce:end]) has
 * the SHA-256 its CID names: 1 or 0, -1 with an error set. */
static int block_matches(CarParser *self, Py_ssize_t start, Py_ssize_t pos, Py_ssize_t ce, Py_ssize_t end) {
    /* The first SMALL_STREAM bytes of a stream (all of a firehose event's CAR) are hashed here,
     * one block at a time: the batches and their helper thread cost more than they save there. */
    if (self->offset + (long long)self->len > SMALL_STREAM) {
        int ok = rs_verifier_check(&self->verifier, self->buf, self->len, self->offset, start, ce, end, self->max_block_size);
        if (ok != 2) return ok;
    }
    uint8_t digest[32]; /* a section no batch covers */
    rs_sha256(self->buf + ce, (size_t)(end - ce), digest);
    return memcmp(digest, self->buf + pos + 4, 32) == 0;
}

/* The next complete section: 1 (cid/block set, consumed), 0 (need more), -1 (error). */
static int next_section(CarParser *self, const uint8_t **cid, Py_ssize_t *cid_len, const uint8_t **block,
                        Py_ssize_t *block_len) {
    const uint8_t *buf = self->buf;
    Py_ssize_t start = self->pos, pos = self->pos, n = self->len;
    if (pos >= n) return 0;
    long long offset = self->offset;
    Py_ssize_t limit = self->max_block_size;
    uint64_t length = buf[pos];
    if (length < 0x80) {
        pos += 1;
    } else if (pos + 1 < n && buf[pos + 1] > 0 && buf[pos + 1] < 0x80) {
        length = (length & 0x7f) | ((uint64_t)buf[pos + 1] << 7);
        pos += 2;
    } else {
        int got = read_varint(buf, pos, n, offset, &length, &pos);
        if (got < 0) return -1;
        if (got == 0) {
            self->need = n - start + 1;
            return 0;
        }
    }
    if (length > (uint64_t)limit + MAX_CID_BYTES)
        return rs_raise("section_too_large", "(LKn)", offset + start, (unsigned long long)length, limit);
    Py_ssize_t end = pos + (Py_ssize_t)length;
    int has_prefix = n - pos >= 4 && memcmp(buf + pos, RS_CID_PREFIX, 4) == 0;
    if (end > n) {
        if ((Py_ssize_t)length > limit && (has_prefix || n - pos >= MAX_CID_BYTES)) {
            /* Possibly over the limit by less than a CID: decide now, not after buffering it. */
            Py_ssize_t ce = has_prefix ? pos + 36 : cid_end(buf, pos, end, offset);
            if (ce < 0) return -1;
            if (end - ce > limit) {
                Py_ssize_t shown = (ce < n ? ce : n) - pos;
                return block_too_large(buf + pos, shown, offset + start, end - ce, limit);
            }
        }
        self->need = end - start;
        return 0;
    }
    if (length == 0) return rs_raise("empty_section", "(L)", offset + start);
    Py_ssize_t ce;
    if (has_prefix && pos + 36 <= end) {
        ce = pos + 36;
    } else {
        ce = cid_end(buf, pos, end, offset);
        if (ce < 0) return -1;
    }
    if (end - ce > limit) return block_too_large(buf + pos, ce - pos, offset + start, end - ce, limit);
    if (self->verify) {
        int fast = ce - pos == 36 && has_prefix;
        int ok = fast ? block_matches(self, start, pos, ce, end) : 0;
        if (ok < 0) return -1;
        if (!ok) {
            /* Another kind of CID, or a mismatch: the reference reports it. */
            PyObject *r = PyObject_CallFunction(rs_verify, "(y#y#)", (const char *)buf + pos, (Py_ssize_t)(ce - pos),
                                                (const char *)buf + ce, (Py_ssize_t)(end - ce));
            if (r == NULL) return -1;
            Py_DECREF(r);
        }
    }
    *cid = buf + pos;
    *cid_len = ce - pos;
    *block = buf + ce;
    *block_len = end - ce;
    self->pos = end;
    self->blocks_read += 1;
    return 1;
}

static int CarParser_init(CarParser *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"max_block_size", "verify_cids", NULL};
    Py_ssize_t max_block_size = 2 * 1024 * 1024;
    int verify = 0;
    if (self->init_called) return rs_init_twice("CarParser");
    self->init_called = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|np", names, &max_block_size, &verify)) return -1;
    if (max_block_size < 1 || max_block_size > ((Py_ssize_t)1 << 40)) {
        PyErr_Format(PyExc_ValueError, "max_block_size must be from 1 to 2**40 bytes, got %zd", max_block_size);
        return -1;
    }
    PyMem_Free(self->buf);
    self->buf = NULL;
    self->len = self->cap = self->pos = 0;
    self->offset = 0;
    self->need = 0;
    self->header_done = 0;
    self->max_block_size = max_block_size;
    self->verify = verify;
    self->bytes_fed = self->blocks_read = 0;
    rs_verifier_free(self->verifier);
    self->verifier = NULL;
    self->ready = 1;
    return 0;
}

static void CarParser_dealloc(CarParser *self) {
    rs_verifier_free(self->verifier);
    PyMem_Free(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *parser_feed(CarParser *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t n = view.len;
    rs_verifier_quiesce(self->verifier); /* nothing reads the buffer while it moves */
    if (self->pos > 0) { /* drop what was parsed */
        Py_ssize_t rest = self->len - self->pos;
        if (rest > 0) memmove(self->buf, self->buf + self->pos, (size_t)rest);
        self->offset += self->pos;
        self->len = rest;
        self->pos = 0;
    }
    if (self->len + n > self->cap) {
        Py_ssize_t cap = self->cap + self->cap / 2;
        if (cap < self->len + n) cap = self->len + n;
        uint8_t *grown = PyMem_Realloc(self->buf, (size_t)cap);
        if (grown == NULL) {
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
        self->buf = grown;
        self->cap = cap;
    }
    if (n) memcpy(self->buf + self->len, view.buf, (size_t)n);
    self->len += n;
    self->bytes_fed += n;
    self->need = 0;
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *parser_read_header(CarParser *self, PyObject *unused) {
    (void)unused;
    uint64_t length;
    Py_ssize_t start;
    int got = read_varint(self->buf, self->pos, self->len, self->offset, &length, &start);
    if (got < 0) return NULL;
    if (got == 0) {
        self->need = self->len - self->pos + 1;
        Py_RETURN_NONE;
    }
    if (length == 0) return rs_raise("header_length_zero", "()"), NULL;
    if (length > (uint64_t)self->max_block_size)
        return rs_raise("header_too_large", "(Kn)", (unsigned long long)length, self->max_block_size), NULL;
    if (start + (Py_ssize_t)length > self->len) {
        self->need = start + (Py_ssize_t)length - self->pos;
        Py_RETURN_NONE;
    }
    self->pos = start + (Py_ssize_t)length;
    self->header_done = 1;
    return PyBytes_FromStringAndSize((const char *)self->buf + start, (Py_ssize_t)length);
}

static PyObject *parser_finish(CarParser *self, PyObject *unused) {
    (void)unused;
    if (!self->header_done) {
        if (self->bytes_fed == 0) return rs_raise("empty_input", "()"), NULL;
        return rs_raise("truncated_header", "(L)", self->bytes_fed), NULL;
    }
    Py_ssize_t left = self->len - self->pos;
    if (left) return rs_raise("truncated_section", "(Ln)", self->offset + self->pos, left), NULL;
    Py_RETURN_NONE;
}

static PyObject *next_sections(CarParser *self) {
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    for (;;) {
        const uint8_t *cid, *block;
        Py_ssize_t cid_len, block_len;
        int got = next_section(self, &cid, &cid_len, &block, &block_len);
        if (got < 0) {
            Py_DECREF(out);
            return NULL;
        }
        if (got == 0) return out;
        PyObject *pair = Py_BuildValue("(y#y#)", (const char *)cid, cid_len, (const char *)block, block_len);
        if (pair == NULL || PyList_Append(out, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(pair);
    }
}

/* Every complete section buffered put into `blocks` (a dict: raw CID bytes -> block bytes; a CID
 * given twice keeps its first block, as dict.setdefault): read_car_slice's loop over
 * next_sections() without a list and a tuple per section. The number of sections read, or NULL. */
static PyObject *sections_into(CarParser *self, PyObject *blocks) {
    Py_ssize_t read = 0;
    for (;;) {
        const uint8_t *cid, *block;
        Py_ssize_t cid_len, block_len;
        int got = next_section(self, &cid, &cid_len, &block, &block_len);
        if (got < 0) return NULL;
        if (got == 0) return PyLong_FromSsize_t(read);
        read++;
        PyObject *key = PyBytes_FromStringAndSize((const char *)cid, cid_len);
        if (key == NULL) return NULL;
        int has = PyDict_Contains(blocks, key);
        if (has < 0) {
            Py_DECREF(key);
            return NULL;
        }
        if (has) { /* the first block stays (both hash to the CID when CIDs are checked) */
            Py_DECREF(key);
            continue;
        }
        PyObject *value = PyBytes_FromStringAndSize((const char *)block, block_len);
        if (value == NULL) {
            Py_DECREF(key);
            return NULL;
        }
        int failed = PyDict_SetItem(blocks, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (failed < 0) return NULL;
    }
}

/* A hint, no check: start fetching the table slot of the next section's CID if it is buffered
 * and plain (a varint of 1 or 2 bytes, then the usual 36-byte CID), so that its look-up overlaps
 * this section's copy into the table. */
static void prefetch_next_slot(CarParser *self, RsBlockTable *t) {
    const uint8_t *p = self->buf + self->pos;
    Py_ssize_t left = self->len - self->pos;
    if (left < 2 + 36) return;
    Py_ssize_t at = p[0] < 0x80 ? 1 : p[1] < 0x80 ? 2 : 0;
    if (at && memcmp(p + at, RS_CID_PREFIX, 4) == 0) (void)rs_table_hash(t, p + at, 36);
}

static PyObject *load_into(CarParser *self, RsBlockTable *t, Py_ssize_t limit) {
    for (;;) {
        const uint8_t *cid, *block;
        Py_ssize_t cid_len, block_len;
        int got = next_section(self, &cid, &cid_len, &block, &block_len);
        if (got < 0) return NULL;
        if (got == 0) Py_RETURN_FALSE;
        prefetch_next_slot(self, t);
        if (rs_table_add(t, cid, (size_t)cid_len, block, (size_t)block_len) < 0) return NULL;
        /* at the limit, or just after the commit (decoded before anything after it is read) */
        if (rs_table_used(t) >= limit || rs_table_is_root(t, cid, (size_t)cid_len)) Py_RETURN_TRUE;
    }
}

/* The buffer may move once control is back in Python: the verifier's thread must be done with it
 * (and, in a process forked since, the verifier starts afresh: see verify.c). */
static PyObject *parser_next_sections(CarParser *self, PyObject *unused) {
    (void)unused;
    rs_verifier_quiesce(self->verifier);
    PyObject *out = next_sections(self);
    rs_verifier_quiesce(self->verifier);
    return out;
}

static PyObject *parser_sections_into(CarParser *self, PyObject *blocks) {
    if (!PyDict_CheckExact(blocks)) {
        PyErr_SetString(PyExc_TypeError, "sections_into(blocks): blocks must be a dict");
        return NULL;
    }
    rs_verifier_quiesce(self->verifier);
    PyObject *out = sections_into(self, blocks);
    rs_verifier_quiesce(self->verifier);
    return out;
}

static PyObject *parser_load_into(CarParser *self, PyObject *args) {
    PyObject *table;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "O!n:load_into", &RsBlockTable_Type, &table, &limit)) return NULL;
    if (rs_table_enter((RsBlockTable *)table) < 0) return NULL;
    rs_verifier_quiesce(self->verifier);
    PyObject *out = load_into(self, (RsBlockTable *)table, limit);
    rs_verifier_quiesce(self->verifier);
    rs_table_leave((RsBlockTable *)table);
    return out;
}

static PyObject *CarParser_get_want(CarParser *self, void *closure) {
    (void)closure;
    Py_ssize_t want = self->need - (self->len - self->pos);
    return PyLong_FromSsize_t(want > 1 ? want : 1);
}

static PyObject *CarParser_get_offset(CarParser *self, void *closure) {
    (void)closure;
    return PyLong_FromLongLong(self->offset + self->pos);
}

static PyObject *CarParser_get_bytes_fed(CarParser *self, void *closure) {
    (void)closure;
    return PyLong_FromLongLong(self->bytes_fed);
}

static PyObject *CarParser_get_blocks_read(CarParser *self, void *closure) {
    (void)closure;
    return PyLong_FromLongLong(self->blocks_read);
}

static PyObject *CarParser_get_max_block_size(CarParser *self, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(self->max_block_size);
}

static PyObject *CarParser_get_verify(CarParser *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->verify);
}

static PyObject *CarParser_feed(CarParser *self, PyObject *arg) {
    if (enter(self) < 0) return NULL;
    PyObject *out = parser_feed(self, arg);
    self->busy = 0;
    return out;
}

static PyObject *CarParser_read_header(CarParser *self, PyObject *unused) {
    if (enter(self) < 0) return NULL;
    PyObject *out = parser_read_header(self, unused);
    self->busy = 0;
    return out;
}

static PyObject *CarParser_finish(CarParser *self, PyObject *unused) {
    if (enter(self) < 0) return NULL;
    PyObject *out = parser_finish(self, unused);
    self->busy = 0;
    return out;
}

static PyObject *CarParser_next_sections(CarParser *self, PyObject *unused) {
    if (enter(self) < 0) return NULL;
    PyObject *out = parser_next_sections(self, unused);
    self->busy = 0;
    return out;
}

static PyObject *CarParser_sections_into(CarParser *self, PyObject *blocks) {
    if (enter(self) < 0) return NULL;
    PyObject *out = parser_sections_into(self, blocks);
    self->busy = 0;
    return out;
}

static PyObject *CarParser_load_into(CarParser *self, PyObject *args) {
    if (enter(self) < 0) return NULL;
    PyObject *out = parser_load_into(self, args);
    self->busy = 0;
    return out;
}

static PyMethodDef CarParser_methods[] = {
    {"feed", (PyCFunction)CarParser_feed, METH_O, "feed(data)\n--\n\nAppend the next bytes of the CAR."},
    {"read_header", (PyCFunction)CarParser_read_header, METH_NOARGS,
     "read_header()\n--\n\nThe CAR header's DAG-CBOR bytes once all fed, else None."},
    {"finish", (PyCFunction)CarParser_finish, METH_NOARGS,
     "finish()\n--\n\nThe input has ended: raise TruncatedCarError inside the header or a section."},
    {"next_sections", (PyCFunction)CarParser_next_sections, METH_NOARGS,
     "next_sections()\n--\n\nEvery complete (cid, block) section buffered, as a list."},
    {"sections_into", (PyCFunction)CarParser_sections_into, METH_O,
     "sections_into(blocks)\n--\n\nPut every complete section buffered into the dict blocks (raw CID -> block; "
     "a CID already there keeps its block); the number of sections read."},
    {"load_into", (PyCFunction)CarParser_load_into, METH_VARARGS,
     "load_into(table, limit)\n--\n\nMove complete sections into a BlockTable until table.used reaches limit "
     "or just after the table's root block (True), or until no complete section is left (False)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef CarParser_getset[] = {
    {"want", (getter)CarParser_get_want, NULL, "Bytes needed before progress (at least 1).", NULL},
    {"offset", (getter)CarParser_get_offset, NULL, "Stream offset of the first unparsed byte.", NULL},
    {"bytes_fed", (getter)CarParser_get_bytes_fed, NULL, "Bytes fed so far.", NULL},
    {"blocks_read", (getter)CarParser_get_blocks_read, NULL, "Sections parsed so far.", NULL},
    {"max_block_size", (getter)CarParser_get_max_block_size, NULL, "The largest block accepted, in bytes.", NULL},
    {"verify_cids", (getter)CarParser_get_verify, NULL, "Whether blocks are checked against their CIDs.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject RsCarParser_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "repo_stream._native.CarParser",
    .tp_basicsize = sizeof(CarParser),
    .tp_dealloc = (destructor)CarParser_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "CarParser(max_block_size=2097152, verify_cids=False)\n--\n\n"
              "The C sans-IO CAR v1 parser; the same methods and errors as repo_stream.core.car.CarParser.",
    .tp_methods = CarParser_methods,
    .tp_getset = CarParser_getset,
    .tp_init = (initproc)CarParser_init,
    .tp_new = PyType_GenericNew,
};
