/* arrow_batch: a chunk of walked records as Arrow buffers, handed over through the Arrow C Data
 * Interface (https://arrow.apache.org/docs/format/CDataInterface.html): plain structs, no Arrow
 * library linked in.
 *
 * arrow_batch(chunk, value_kind) takes a chunk of (key, cid, value) tuples, as the walker gives
 * them with record CIDs (key and cid str; value bytes-like for value_kind 0, str for 1), and
 * returns the capsules ("arrow_schema", "arrow_array") of a struct array (a record batch) with
 * the columns key (utf8), collection (dictionary<int32, utf8>), rkey (utf8), cid (utf8) and
 * value (binary, or utf8 for JSON text). Collections are runs in key order (a collection's keys
 * are contiguous: '/' sorts apart from every NSID character), so the dictionary grows by one
 * entry whenever the collection changes and never needs a search.
 *
 * Every buffer is allocated once the sizes are known (a first pass sums them, each checked
 * against the int32 offsets Arrow's utf8/binary use); all of a batch's memory is one block
 * owned by the top-level array and freed by its release callback. */
#include "native.h"

#include <stdatomic.h>

/* An item is (key, cid, value) or a Record (key, collection, rkey, cid, value): where its cid and
 * value are. */
#define CID_AT(item) (PyTuple_GET_SIZE(item) == 5 ? 3 : 1)
#define VALUE_AT(item) (PyTuple_GET_SIZE(item) - 1)

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
        c->format = i == 1 ? "i" : i == 4 && value_kind == 0 ? "z" : "u"; /* 1 and 2: utf8 */
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
    uint8_t *block; /* every buffer below, in one allocation */
    atomic_int refs;
} Array;

static void array_unref(Array *all) {
    if (atomic_fetch_sub(&all->refs, 1) == 1) {
        PyMem_RawFree(all->block);
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

/* The UTF-8 of a str, or of a bytes-like value (value_kind 0: bytes only). NULL with an error. */
static const char *item_text(PyObject *o, Py_ssize_t *len, const char *what) {
    if (PyUnicode_Check(o)) return PyUnicode_AsUTF8AndSize(o, len);
    PyErr_Format(PyExc_TypeError, "arrow_batch: the %s of an item is %s, not str", what, Py_TYPE(o)->tp_name);
    return NULL;
}

static int fits(size_t total) {
    if (total > (size_t)INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError,
                        "arrow_batch: a column of the batch passes 2 GiB (Arrow's int32 offsets): ask for fewer records");
        return 0;
    }
    return 1;
}

static inline size_t up8(size_t n) { return (n + 7) & ~(size_t)7; }

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
    if (n > INT32_MAX / 2) {
        PyErr_SetString(PyExc_OverflowError, "arrow_batch: too many records for one batch");
        return NULL;
    }
    /* pass 1: check the items, sum the sizes */
    size_t key_bytes = 0, coll_bytes = 0, rkey_bytes = 0, cid_bytes = 0, value_bytes = 0;
    size_t n_coll = 0;
    RsJsonOut *json = NULL;     /* value_kind 2: the values' JSON texts, one after another */
    size_t *json_end = NULL;    /* value_kind 2: where each text ends in json */
    if (value_kind == 2) {
        json = rs_json_out_new((size_t)n * 128);
        json_end = json ? PyMem_Malloc(((size_t)n + 1) * sizeof *json_end) : NULL;
        if (json_end == NULL) {
            rs_json_out_free(json);
            return json ? PyErr_NoMemory() : NULL;
        }
    }
#define FAIL_PASS1 do { rs_json_out_free(json); PyMem_Free(json_end); return NULL; } while (0)
    const char *last = NULL;
    Py_ssize_t last_len = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(chunk, i);
        if (!PyTuple_Check(item) || (PyTuple_GET_SIZE(item) != 3 && PyTuple_GET_SIZE(item) != 5)) {
            PyErr_SetString(PyExc_TypeError,
                            "arrow_batch: items are (key, cid, value) tuples or Records (a walk with record CIDs)");
            FAIL_PASS1;
        }
        Py_ssize_t kl, cl;
        const char *key = item_text(PyTuple_GET_ITEM(item, 0), &kl, "key");
        if (key == NULL || item_text(PyTuple_GET_ITEM(item, CID_AT(item)), &cl, "cid") == NULL) FAIL_PASS1;
        const char *slash = memchr(key, '/', (size_t)kl);
        if (slash == NULL) {
            PyErr_Format(PyExc_ValueError, "arrow_batch: key %R has no '/'", PyTuple_GET_ITEM(item, 0));
            FAIL_PASS1;
        }
        Py_ssize_t coll = slash - key;
        if (last == NULL || coll != last_len || memcmp(key, last, (size_t)coll) != 0) {
            n_coll++;
            coll_bytes += (size_t)coll;
            last = key;
            last_len = coll;
        }
        key_bytes += (size_t)kl;
        rkey_bytes += (size_t)(kl - coll - 1);
        cid_bytes += (size_t)cl;
        PyObject *v = PyTuple_GET_ITEM(item, VALUE_AT(item));
        if (value_kind == 1) {
            Py_ssize_t vl;
            if (item_text(v, &vl, "value") == NULL) FAIL_PASS1;
            value_bytes += (size_t)vl;
        } else if (PyBytes_Check(v) && value_kind == 2) {
            if (rs_json_out_append(json, (const uint8_t *)PyBytes_AS_STRING(v), (size_t)PyBytes_GET_SIZE(v)) < 0) FAIL_PASS1;
            rs_json_out_data(json, &json_end[i]);
            value_bytes = json_end[i];
            if (!fits(value_bytes)) FAIL_PASS1;
        } else if (PyBytes_Check(v)) {
            value_bytes += (size_t)PyBytes_GET_SIZE(v);
        } else {
            PyErr_Format(PyExc_TypeError, "arrow_batch: the value of an item is %s, not bytes", Py_TYPE(v)->tp_name);
            FAIL_PASS1;
        }
    }
    if (!fits(key_bytes) || !fits(value_bytes) || !fits(cid_bytes)) FAIL_PASS1;
    /* one block: offsets of key, rkey, cid, value (n+1 each), indices (n), dictionary offsets
     * (n_coll+1), then the data of key, rkey, cid, value, dictionary; each part 8-aligned */
    size_t off_size = up8(((size_t)n + 1) * 4), idx_size = up8((size_t)n * 4 + 4), doff_size = up8((n_coll + 1) * 4);
    size_t total = 4 * off_size + idx_size + doff_size + up8(key_bytes) + up8(rkey_bytes) + up8(cid_bytes) + up8(value_bytes) +
                   up8(coll_bytes) + 8;
    Array *all = PyMem_RawCalloc(1, sizeof *all);
    uint8_t *block = all ? PyMem_RawMalloc(total) : NULL;
    if (block == NULL) {
        PyMem_RawFree(all);
        PyErr_NoMemory();
        FAIL_PASS1;
    }
    all->block = block;
    uint8_t *w = block;
    int32_t *off[4];
    for (int c = 0; c < 4; c++, w += off_size) off[c] = (int32_t *)w;
    int32_t *idx = (int32_t *)w;
    w += idx_size;
    int32_t *doff = (int32_t *)w;
    w += doff_size;
    char *data[5];
    size_t sizes[5] = {key_bytes, rkey_bytes, cid_bytes, value_bytes, coll_bytes};
    for (int c = 0; c < 5; c++) {
        data[c] = (char *)w;
        w += up8(sizes[c]);
    }
    /* pass 2: fill (the items were checked above and nothing ran in between) */
    size_t at[5] = {0, 0, 0, 0, 0};
    for (int c = 0; c < 4; c++) off[c][0] = 0;
    doff[0] = 0;
    int32_t dict_n = -1;
    last = NULL;
    last_len = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(chunk, i);
        Py_ssize_t kl, cl, vl;
        const char *key = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(item, 0), &kl);
        const char *cid = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(item, CID_AT(item)), &cl);
        PyObject *v = PyTuple_GET_ITEM(item, VALUE_AT(item));
        const char *value;
        if (value_kind == 2) {
            size_t from = i == 0 ? 0 : json_end[i - 1];
            size_t total_json;
            value = (const char *)rs_json_out_data(json, &total_json) + from;
            vl = (Py_ssize_t)(json_end[i] - from);
        } else if (value_kind == 1) {
            value = PyUnicode_AsUTF8AndSize(v, &vl);
        } else {
            value = PyBytes_AS_STRING(v);
            vl = PyBytes_GET_SIZE(v);
        }
        if (key == NULL || cid == NULL || value == NULL) { /* cannot happen: cached by pass 1 */
            PyMem_RawFree(all->block);
            PyMem_RawFree(all);
            FAIL_PASS1;
        }
        const char *slash = memchr(key, '/', (size_t)kl);
        Py_ssize_t coll = slash - key;
        if (last == NULL || coll != last_len || memcmp(key, last, (size_t)coll) != 0) {
            dict_n++;
            memcpy(data[4] + at[4], key, (size_t)coll);
            at[4] += (size_t)coll;
            doff[dict_n + 1] = (int32_t)at[4];
            last = key;
            last_len = coll;
        }
        idx[i] = dict_n;
        memcpy(data[0] + at[0], key, (size_t)kl);
        at[0] += (size_t)kl;
        off[0][i + 1] = (int32_t)at[0];
        memcpy(data[1] + at[1], slash + 1, (size_t)(kl - coll - 1));
        at[1] += (size_t)(kl - coll - 1);
        off[1][i + 1] = (int32_t)at[1];
        memcpy(data[2] + at[2], cid, (size_t)cl);
        at[2] += (size_t)cl;
        off[2][i + 1] = (int32_t)at[2];
        memcpy(data[3] + at[3], value, (size_t)vl);
        at[3] += (size_t)vl;
        off[3][i + 1] = (int32_t)at[3];
    }
    rs_json_out_free(json);
    PyMem_Free(json_end);
#undef FAIL_PASS1
    /* the structs */
    static const int col_of[N_COLUMNS] = {0, -1, 1, 2, 3}; /* column -> offsets/data slot */
    for (int c = 0; c < N_COLUMNS; c++) {
        struct ArrowArray *a = &all->col[c];
        a->length = n;
        a->release = array_child_release;
        a->private_data = all;
        a->buffers = all->col_buffers[c];
        all->col_buffers[c][0] = NULL;
        if (c == 1) {
            a->n_buffers = 2;
            all->col_buffers[c][1] = idx;
            a->dictionary = &all->dict;
        } else {
            a->n_buffers = 3;
            all->col_buffers[c][1] = off[col_of[c]];
            all->col_buffers[c][2] = data[col_of[c]];
        }
        all->children[c] = a;
    }
    all->dict.length = dict_n + 1;
    all->dict.n_buffers = 3;
    all->dict.buffers = all->dict_buffers;
    all->dict_buffers[0] = NULL;
    all->dict_buffers[1] = doff;
    all->dict_buffers[2] = data[4];
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
