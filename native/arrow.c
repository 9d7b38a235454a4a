/* Arrow record batches of walked records, handed over through the Arrow C Data Interface
 * (https://arrow.apache.org/docs/format/CDataInterface.html): plain structs, no Arrow library
 * linked in.
 *
 * A batch is a struct array (a record batch) with the columns key (utf8), collection
 * (dictionary<int32, utf8>), rkey (utf8), cid (utf8) and value (binary, or utf8 for JSON text).
 * Collections are runs in key order (a collection's keys are contiguous: '/' sorts apart from
 * every NSID character), so the dictionary grows by one entry whenever the collection changes and
 * never needs a search.
 *
 * RsArrowBuilder (native.h) holds the columns' growing buffers: the walker (walk.c,
 * Walker.next_batch) writes each record's key, rkey, CID text and value into them itself, the
 * value straight from the block table (or transcoded to JSON text into the buffer, json.c), with
 * no Python object per record; rs_arrow_finish hands the buffers over as the capsules
 * ("arrow_schema", "arrow_array"). arrow_batch(chunk, value_kind) builds the same from a list of
 * (key, cid, value) tuples or Records (repo_stream.read.arrow.record_batch).
 *
 * Buffers are PyMem_Raw (a consumer may release a batch in any thread, without the GIL), every
 * length is checked against the int32 offsets Arrow's utf8/binary use, and the buffers are owned
 * by the top-level array, freed by the last release callback of it, a column or the dictionary. */
#include "native.h"

#include <stdatomic.h>

/* An item is (key, cid, value) or a Record (key, collection, rkey, cid, value): where its cid and
 * value are. */
#define CID_AT(item) (PyTuple_GET_SIZE(item) == 5 ? 3 : 1)
#define VALUE_AT(item) (PyTuple_GET_SIZE(item) - 1)
#define N_BUFS 11 /* RsArrowBuilder: offsets x4, data x4, indices, dictionary offsets and data */

/* --- the C Data Interface's structs (from the specification) --------------------------------- */
#define ARROW_FLAG_NULLABLE 2

struct ArrowSchema {
    const char *format;
    const char *name;
    const char *metadata;
    int64_t flags;
    int64_t n_children;
    struct ArrowSchema **children;
    struct ArrowSchema *dictionary;
    void (*release)(struct ArrowSchema *);
    void *private_data;
};

struct ArrowArray {
    int64_t length;
    int64_t null_count;
    int64_t offset;
    int64_t n_buffers;
    int64_t n_children;
    const void **buffers;
    struct ArrowArray **children;
    struct ArrowArray *dictionary;
    void (*release)(struct ArrowArray *);
    void *private_data;
};

#define N_COLUMNS 5

/* --- the schema ------------------------------------------------------------------------------- */
/* The top-level struct, each column's and the dictionary's can be released on their own (a
 * consumer may move a child out and release the parent): the block goes when the last one is. */
#define N_REFS (N_COLUMNS + 2)

typedef struct {
    struct ArrowSchema top, col[N_COLUMNS], dict;
    struct ArrowSchema *children[N_COLUMNS];
    atomic_int refs;
} Schema;

static void schema_unref(Schema *all) {
    if (atomic_fetch_sub(&all->refs, 1) == 1) PyMem_RawFree(all);
}

static void schema_child_release(struct ArrowSchema *s) {
    if (s->release == NULL) return;
    s->release = NULL;
    schema_unref(s->private_data);
}

static void schema_release(struct ArrowSchema *s) {
    if (s->release == NULL) return;
    Schema *all = s->private_data;
    for (int i = 0; i < N_COLUMNS; i++)
        if (all->col[i].release != NULL) all->col[i].release(&all->col[i]);
    if (all->dict.release != NULL) all->dict.release(&all->dict);
    s->release = NULL;
    schema_unref(all);
}

static const char *COLUMN_NAMES[N_COLUMNS] = {"key", "collection", "rkey", "cid", "value"};

/* A capsule owns its own top-level struct: a consumer moves the struct's contents out (and marks
 * it released), so the struct must outlive what it described. */
static void schema_capsule_free(PyObject *capsule) {
    struct ArrowSchema *s = PyCapsule_GetPointer(capsule, "arrow_schema");
    if (s != NULL) {
        if (s->release != NULL) s->release(s);
        PyMem_RawFree(s);
    }
    PyErr_Clear();
}

static PyObject *new_schema(int value_kind) {
    Schema *all = PyMem_RawCalloc(1, sizeof *all);
    if (all == NULL) return PyErr_NoMemory();
    for (int i = 0; i < N_COLUMNS; i++) {
        struct ArrowSchema *c = &all->col[i];
        c->format = i == 1 ? "i" : i == 4 && value_kind == 0 ? "z" : "u";
        c->name = COLUMN_NAMES[i];
        c->release = schema_child_release;
        c->private_data = all;
        all->children[i] = c;
    }
    atomic_init(&all->refs, N_REFS);
    all->dict.format = "u";
    all->dict.name = "";
    all->dict.release = schema_child_release;
    all->dict.private_data = all;
    all->col[1].dictionary = &all->dict;
    all->top.format = "+s";
    all->top.name = "";
    all->top.n_children = N_COLUMNS;
    all->top.children = all->children;
    all->top.release = schema_release;
    all->top.private_data = all;
    struct ArrowSchema *base = PyMem_RawMalloc(sizeof *base);
    if (base == NULL) {
        schema_release(&all->top);
        return PyErr_NoMemory();
    }
    *base = all->top;
    PyObject *capsule = PyCapsule_New(base, "arrow_schema", schema_capsule_free);
    if (capsule == NULL) {
        schema_release(base);
        PyMem_RawFree(base);
    }
    return capsule;
}

/* --- the array -------------------------------------------------------------------------------- */
typedef struct {
    struct ArrowArray top, col[N_COLUMNS], dict;
    struct ArrowArray *children[N_COLUMNS];
    const void *top_buffers[1];
    const void *col_buffers[N_COLUMNS][3];
    const void *dict_buffers[3];
    void *bufs[N_BUFS]; /* every buffer below (PyMem_Raw) */
    atomic_int refs;
} Array;

static void array_unref(Array *all) {
    if (atomic_fetch_sub(&all->refs, 1) == 1) {
        for (int i = 0; i < N_BUFS; i++) PyMem_RawFree(all->bufs[i]);
        PyMem_RawFree(all);
    }
}

static void array_child_release(struct ArrowArray *a) {
    if (a->release == NULL) return;
    a->release = NULL;
    array_unref(a->private_data);
}

static void array_release(struct ArrowArray *a) {
    if (a->release == NULL) return;
    Array *all = a->private_data;
    for (int i = 0; i < N_COLUMNS; i++)
        if (all->col[i].release != NULL) all->col[i].release(&all->col[i]);
    if (all->dict.release != NULL) all->dict.release(&all->dict);
    a->release = NULL;
    array_unref(all);
}

static void array_capsule_free(PyObject *capsule) {
    struct ArrowArray *a = PyCapsule_GetPointer(capsule, "arrow_array");
    if (a != NULL) {
        if (a->release != NULL) a->release(a);
        PyMem_RawFree(a);
    }
    PyErr_Clear();
}

/* --- the builder ------------------------------------------------------------------------------ */
/* Buffers of RsArrowBuilder, in b->buf[] order. */
enum { B_KEY_OFF, B_RKEY_OFF, B_CID_OFF, B_VALUE_OFF, B_KEY, B_RKEY, B_CID, B_VALUE, B_IDX, B_DICT_OFF, B_DICT };

static int overflow(void) {
    PyErr_SetString(PyExc_OverflowError,
                    "arrow batch: a column of the batch passes 2 GiB (Arrow's int32 offsets): ask for fewer records");
    return -1;
}

/* Room for `more` further bytes in buffer i: 0, or -1 with MemoryError (past 2 GiB: OverflowError). */
int rs_arrow_grow(RsArrowBuilder *b, int i, size_t more) {
    RsArrowBuf *buf = &b->buf[i];
    if (more <= buf->cap - buf->len) return 0;
    if (more > (size_t)INT32_MAX - buf->len) return overflow();
    size_t need = buf->len + more, cap = buf->cap ? buf->cap : 256;
    while (cap < need) cap *= 2; /* need <= 2 GiB: no wrap */
    uint8_t *grown = PyMem_RawRealloc(buf->data, cap);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    buf->data = grown;
    buf->cap = cap;
    return 0;
}

static int put_bytes(RsArrowBuilder *b, int i, const void *s, size_t n) {
    if (rs_arrow_grow(b, i, n) < 0) return -1;
    if (n) memcpy(b->buf[i].data + b->buf[i].len, s, n);
    b->buf[i].len += n;
    return 0;
}

/* The end offset of the current row in offsets buffer `off` of data buffer `data`. */
static int put_offset(RsArrowBuilder *b, int off, int data) {
    int32_t end = (int32_t)b->buf[data].len; /* <= INT32_MAX: checked as it grew */
    return put_bytes(b, off, &end, 4);
}

void rs_arrow_init(RsArrowBuilder *b) { memset(b, 0, sizeof *b); }

void rs_arrow_free(RsArrowBuilder *b) {
    for (int i = 0; i < N_BUFS; i++) PyMem_RawFree(b->buf[i].data);
    memset(b, 0, sizeof *b);
}

/* The first offset (0) of each offsets buffer, once. */
static int start(RsArrowBuilder *b) {
    if (b->started) return 0;
    static const int offs[] = {B_KEY_OFF, B_RKEY_OFF, B_CID_OFF, B_VALUE_OFF, B_DICT_OFF};
    int32_t zero = 0;
    for (size_t i = 0; i < sizeof offs / sizeof offs[0]; i++)
        if (put_bytes(b, offs[i], &zero, 4) < 0) return -1;
    b->started = 1;
    return 0;
}

int rs_arrow_key(RsArrowBuilder *b, const uint8_t *key, size_t key_len) {
    if (start(b) < 0) return -1;
    if (b->n >= INT32_MAX / 2) {
        PyErr_SetString(PyExc_OverflowError, "arrow batch: too many records for one batch");
        return -1;
    }
    const uint8_t *slash = memchr(key, '/', key_len);
    if (slash == NULL) {
        PyObject *k = PyUnicode_DecodeUTF8((const char *)key, (Py_ssize_t)key_len, "replace");
        if (k != NULL) PyErr_Format(PyExc_ValueError, "arrow batch: key %R has no '/'", k);
        Py_XDECREF(k);
        return -1;
    }
    size_t coll = (size_t)(slash - key);
    RsArrowBuf *dict = &b->buf[B_DICT];
    if (b->n_dict == 0 || coll != b->last_len || memcmp(dict->data + dict->len - b->last_len, key, coll) != 0) {
        if (put_bytes(b, B_DICT, key, coll) < 0 || put_offset(b, B_DICT_OFF, B_DICT) < 0) return -1;
        b->n_dict++;
        b->last_len = coll;
    }
    int32_t index = (int32_t)(b->n_dict - 1);
    if (put_bytes(b, B_IDX, &index, 4) < 0 || put_bytes(b, B_KEY, key, key_len) < 0 || put_offset(b, B_KEY_OFF, B_KEY) < 0 ||
        put_bytes(b, B_RKEY, slash + 1, key_len - coll - 1) < 0 || put_offset(b, B_RKEY_OFF, B_RKEY) < 0)
        return -1;
    b->bytes += key_len * 2 - coll - 1 + RS_ARROW_ROW_BYTES;
    return 0;
}

int rs_arrow_cid_text(RsArrowBuilder *b, const char *text, size_t len) {
    if (put_bytes(b, B_CID, text, len) < 0 || put_offset(b, B_CID_OFF, B_CID) < 0) return -1;
    b->bytes += len;
    return 0;
}

static const char B32[] = "abcdefghijklmnopqrstuvwxyz234567";

size_t rs_cid_b32(char out[RS_CID_TEXT_MAX], const uint8_t *cid, size_t len) {
    if (len == 0 || cid[0] != 0x01 || len > 256) return 0;
    size_t n = 0;
    out[n++] = 'b';
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        acc = (acc << 8) | cid[i];
        bits += 8;
        while (bits >= 5) {
            bits -= 5;
            out[n++] = B32[(acc >> bits) & 31];
        }
    }
    if (bits > 0) out[n++] = B32[(acc << (5 - bits)) & 31];
    return n;
}

int rs_arrow_cid(RsArrowBuilder *b, const uint8_t *cid, size_t len) {
    char out[RS_CID_TEXT_MAX];
    size_t n = rs_cid_b32(out, cid, len);
    if (n > 0) return rs_arrow_cid_text(b, out, n);
    PyObject *text = rs_cid_text_of(cid, len); /* not v1: repo_stream.core.cid.cid_text's form */
    if (text == NULL) return -1;
    Py_ssize_t tl;
    const char *s = PyUnicode_AsUTF8AndSize(text, &tl);
    int r = s == NULL ? -1 : rs_arrow_cid_text(b, s, (size_t)tl);
    Py_DECREF(text);
    return r;
}

int rs_arrow_line_head(RsArrowBuilder *b, const uint8_t *key, size_t key_len, const char *cid, size_t cid_len) {
    if (rs_arrow_grow(b, RS_ARROW_VALUE, key_len + cid_len + 32) < 0) return -1;
    RsArrowBuf *v = &b->buf[RS_ARROW_VALUE];
    b->value_start = v->len;
    uint8_t *w = v->data + v->len;
    memcpy(w, "{\"key\":\"", 8);
    w += 8;
    memcpy(w, key, key_len);
    w += key_len;
    memcpy(w, "\",\"cid\":\"", 9);
    w += 9;
    memcpy(w, cid, cid_len);
    w += cid_len;
    memcpy(w, "\",\"value\":", 10);
    w += 10;
    v->len = (size_t)(w - v->data);
    return 0;
}

int rs_arrow_line_done(RsArrowBuilder *b) {
    if (put_bytes(b, B_VALUE, "}\n", 2) < 0) return -1;
    b->bytes += b->buf[B_VALUE].len - b->value_start;
    b->value_start = b->buf[B_VALUE].len;
    b->n++;
    return 0;
}

int rs_arrow_value(RsArrowBuilder *b, const uint8_t *value, size_t len) {
    if (put_bytes(b, B_VALUE, value, len) < 0) return -1;
    return rs_arrow_value_done(b);
}

int rs_arrow_value_done(RsArrowBuilder *b) {
    if (put_offset(b, B_VALUE_OFF, B_VALUE) < 0) return -1;
    b->bytes += b->buf[B_VALUE].len - b->value_start;
    b->value_start = b->buf[B_VALUE].len;
    b->n++;
    return 0;
}

int rs_arrow_value_str(RsArrowBuilder *b, PyObject *text) {
    if (PyUnicode_IS_ASCII(text)) /* compact ASCII: its characters are its UTF-8 */
        return rs_arrow_value(b, PyUnicode_DATA(text), (size_t)PyUnicode_GET_LENGTH(text));
    /* not PyUnicode_AsUTF8AndSize: that keeps a UTF-8 copy inside a str the table may hold */
    PyObject *utf8 = PyUnicode_AsUTF8String(text);
    if (utf8 == NULL) return -1;
    int r = rs_arrow_value(b, (const uint8_t *)PyBytes_AS_STRING(utf8), (size_t)PyBytes_GET_SIZE(utf8));
    Py_DECREF(utf8);
    return r;
}

PyObject *rs_arrow_finish(RsArrowBuilder *b, int value_kind) {
    if (start(b) < 0) return NULL;
    for (int i = 0; i < N_BUFS; i++) /* every buffer allocated, even for an empty batch */
        if (rs_arrow_grow(b, i, 8) < 0) return NULL;
    Array *all = PyMem_RawCalloc(1, sizeof *all);
    if (all == NULL) return PyErr_NoMemory();
    for (int i = 0; i < N_BUFS; i++) {
        all->bufs[i] = b->buf[i].data;
        b->buf[i].data = NULL;
    }
    int64_t n = b->n, n_dict = b->n_dict;
    rs_arrow_free(b);
    static const int col_off[N_COLUMNS] = {B_KEY_OFF, -1, B_RKEY_OFF, B_CID_OFF, B_VALUE_OFF};
    static const int col_data[N_COLUMNS] = {B_KEY, -1, B_RKEY, B_CID, B_VALUE};
    for (int c = 0; c < N_COLUMNS; c++) {
        struct ArrowArray *a = &all->col[c];
        a->length = n;
        a->release = array_child_release;
        a->private_data = all;
        a->buffers = all->col_buffers[c];
        all->col_buffers[c][0] = NULL;
        if (c == 1) {
            a->n_buffers = 2;
            all->col_buffers[c][1] = all->bufs[B_IDX];
            a->dictionary = &all->dict;
        } else {
            a->n_buffers = 3;
            all->col_buffers[c][1] = all->bufs[col_off[c]];
            all->col_buffers[c][2] = all->bufs[col_data[c]];
        }
        all->children[c] = a;
    }
    all->dict.length = n_dict;
    all->dict.n_buffers = 3;
    all->dict.buffers = all->dict_buffers;
    all->dict_buffers[0] = NULL;
    all->dict_buffers[1] = all->bufs[B_DICT_OFF];
    all->dict_buffers[2] = all->bufs[B_DICT];
    all->dict.release = array_child_release;
    all->dict.private_data = all;
    atomic_init(&all->refs, N_REFS);
    all->top.length = n;
    all->top.n_buffers = 1;
    all->top_buffers[0] = NULL;
    all->top.buffers = all->top_buffers;
    all->top.n_children = N_COLUMNS;
    all->top.children = all->children;
    all->top.release = array_release;
    all->top.private_data = all;
    struct ArrowArray *base = PyMem_RawMalloc(sizeof *base);
    if (base == NULL) {
        array_release(&all->top);
        return PyErr_NoMemory();
    }
    *base = all->top;
    PyObject *array = PyCapsule_New(base, "arrow_array", array_capsule_free);
    if (array == NULL) {
        array_release(base);
        PyMem_RawFree(base);
        return NULL;
    }
    PyObject *schema = new_schema(value_kind);
    if (schema == NULL) {
        Py_DECREF(array);
        return NULL;
    }
    PyObject *pair = PyTuple_Pack(2, schema, array);
    Py_DECREF(schema);
    Py_DECREF(array);
    return pair;
}

/* --- arrow_batch(chunk, value_kind) ----------------------------------------------------------- */

/* The UTF-8 of a str. NULL with an error. */
static const char *item_text(PyObject *o, Py_ssize_t *len, const char *what) {
    if (PyUnicode_Check(o)) return PyUnicode_AsUTF8AndSize(o, len);
    PyErr_Format(PyExc_TypeError, "arrow_batch: the %s of an item is %s, not str", what, Py_TYPE(o)->tp_name);
    return NULL;
}

PyObject *rs_arrow_batch(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *chunk;
    int value_kind;
    if (!PyArg_ParseTuple(args, "O!i:arrow_batch", &PyList_Type, &chunk, &value_kind)) return NULL;
    if (value_kind < 0 || value_kind > 2) {
        PyErr_SetString(PyExc_ValueError,
                        "arrow_batch: value_kind is 0 (binary), 1 (JSON text) or 2 (blocks transcoded to JSON text)");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(chunk);
    /* check every item first (a TypeError before any work), then fill */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(chunk, i);
        if (!PyTuple_Check(item) || (PyTuple_GET_SIZE(item) != 3 && PyTuple_GET_SIZE(item) != 5)) {
            PyErr_SetString(PyExc_TypeError,
                            "arrow_batch: items are (key, cid, value) tuples or Records (a walk with record CIDs)");
            return NULL;
        }
        Py_ssize_t len;
        PyObject *v = PyTuple_GET_ITEM(item, VALUE_AT(item));
        if (item_text(PyTuple_GET_ITEM(item, 0), &len, "key") == NULL ||
            item_text(PyTuple_GET_ITEM(item, CID_AT(item)), &len, "cid") == NULL)
            return NULL;
        if (value_kind == 1 ? !PyUnicode_Check(v) : !PyBytes_Check(v)) {
            PyErr_Format(PyExc_TypeError, "arrow_batch: the value of an item is %s, not %s", Py_TYPE(v)->tp_name,
                         value_kind == 1 ? "str" : "bytes");
            return NULL;
        }
    }
    RsArrowBuilder b;
    rs_arrow_init(&b);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(chunk, i);
        Py_ssize_t kl, cl;
        const char *key = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(item, 0), &kl);
        const char *cid = key ? PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(item, CID_AT(item)), &cl) : NULL;
        PyObject *v = PyTuple_GET_ITEM(item, VALUE_AT(item));
        const uint8_t *block = value_kind == 1 ? NULL : (const uint8_t *)PyBytes_AS_STRING(v);
        size_t block_len = value_kind == 1 ? 0 : (size_t)PyBytes_GET_SIZE(v);
        if (cid == NULL || rs_arrow_key(&b, (const uint8_t *)key, (size_t)kl) < 0 || rs_arrow_cid_text(&b, cid, (size_t)cl) < 0 ||
            (value_kind == 1   ? rs_arrow_value_str(&b, v)
             : value_kind == 2 ? (rs_json_into(&b, block, block_len) < 0 ? -1 : rs_arrow_value_done(&b))
                               : rs_arrow_value(&b, block, block_len)) < 0) {
            rs_arrow_free(&b);
            return NULL;
        }
    }
    PyObject *pair = rs_arrow_finish(&b, value_kind == 2 ? 1 : value_kind); /* 2 gives a JSON text column */
    rs_arrow_free(&b);
    return pair;
}
