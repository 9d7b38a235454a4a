/* BlockTable: the in-memory block table of the C core (repo_stream/blocks.py's MemoryBlocks).
 *
 * Blocks are packed into an arena of chunks as records [flags:1][cid_len:1][data_len:4][cid][data]
 * (data is the raw block, or, for a processed block, a PyObject* it owns). An open-addressing hash
 * table of tagged pointers (the record's address in the low 48 bits, 16 bits of the CID's hash
 * above) finds them. The hash is NH keyed from the operating system's randomness at import (not
 * from CPython's hash secret, which PYTHONHASHSEED fixes), so forged CIDs cannot make it degrade.
 *
 * `used` counts the real bytes: records written to the arena, the slot array, and the processed
 * values' sizes as the reference counts them (8 for a number or None, len of bytes/str, what a
 * container costs as Python objects: value_size). */
#include "native.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#define FIRST_CHUNK (64 * 1024)
#define MAX_CHUNK (8 * 1024 * 1024)
#define HUGE_PAGE (2 * 1024 * 1024)
#define HEADER_BYTES 6
#define F_PROCESSED 1 /* data holds a PyObject* (a processed value) */
#define PTR_MASK ((1ULL << 48) - 1)
#define ROW_RAW 0
#define ROW_ENCODED 1
#define ROW_PLAIN 2
#define REHASH_AHEAD 8

typedef struct Chunk {
    struct Chunk *next;
    size_t used, cap;
    uint8_t data[];
} Chunk;

struct RsBlockTable {
    PyObject_HEAD
    Chunk *head, *tail;     /* records in insertion order */
    size_t next_chunk;      /* the size of the next chunk: doubling up to MAX_CHUNK */
    uint64_t *slots;        /* 0: empty */
    size_t nslots, count;
    Py_ssize_t used;        /* counted bytes */
    Py_ssize_t values_bytes;
    size_t arena_bytes;
    PyObject *root;         /* bytes */
    PyObject *process;      /* callable or None */
    PyObject *encode;       /* callable */
    Chunk *take_chunk;      /* take_rows cursor */
    size_t take_off;
    uint8_t init_called;    /* __init__ has run (once: a second call is refused) */
    uint8_t ready;          /* __init__ succeeded */
    uint8_t busy;           /* a method (or a parser or walker using the table) is running */
    uint8_t has_values;     /* a processed value was ever kept (else clearing need not read the records) */
};

/* NH keys, drawn from the operating system's randomness (getrandom, else /dev/urandom) when the
 * module is imported: independent of PYTHONHASHSEED, which a deployment may fix (the benchmarks do),
 * and with it the keys, so that anyone could forge CIDs that all land in one slot. Words 0-9 key
 * the usual 36-byte CIDs; words 10-75 key the others (up to 255 bytes, zero-padded to 64 words, then
 * their length), and nh_tail[i] is what the zero pairs from pair i on add. */
#define NH_LONG 66
static uint32_t nh_key[10 + NH_LONG];
static uint64_t nh_tail[NH_LONG / 2 + 1];

static int random_bytes(void *out, size_t n) {
    uint8_t *p = out;
#ifdef SYS_getrandom
    while (n > 0) {
        long got = syscall(SYS_getrandom, p, n, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            break; /* ENOSYS (an old kernel) or a seccomp filter: read /dev/urandom */
        }
        p += got;
        n -= (size_t)got;
    }
    if (n == 0) return 0;
#endif
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    while (n > 0) {
        ssize_t got = read(fd, p, n);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            close(fd);
            return -1;
        }
        p += got;
        n -= (size_t)got;
    }
    close(fd);
    return 0;
}

int rs_table_keys_init(void) {
    if (random_bytes(nh_key, sizeof nh_key) < 0) {
        PyErr_SetString(PyExc_OSError, "repo_stream._native: no randomness from the operating system (getrandom, /dev/urandom)");
        return -1;
    }
    const uint32_t *k = nh_key + 10;
    nh_tail[NH_LONG / 2] = 0;
    for (size_t i = NH_LONG / 2 - 1; i-- > 0;) nh_tail[i] = nh_tail[i + 1] + (uint64_t)k[2 * i] * k[2 * i + 1];
    return 0;
}

static inline uint64_t fmix64(uint64_t h) {
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

/* NH over a CID of any length up to 255 bytes, as if zero-padded to 64 words and followed by its
 * length: two different CIDs differ in some word, so they collide with probability 2^-32. */
static uint64_t hash_long(const uint8_t *cid, size_t len) {
    const uint32_t *k = nh_key + 10;
    uint32_t m[64] = {0};
    if (len > 255) len = 255; /* never: the table refuses longer CIDs before hashing */
    memcpy(m, cid, len);
    size_t pairs = (len + 7) / 8;
    uint64_t h = 0;
    for (size_t i = 0; i < pairs; i++) h += (uint64_t)(uint32_t)(m[2 * i] + k[2 * i]) * (uint32_t)(m[2 * i + 1] + k[2 * i + 1]);
    h += nh_tail[pairs] - nh_tail[32]; /* the zero pairs after the CID, up to pair 31 */
    h += (uint64_t)(uint32_t)((uint32_t)len + k[64]) * k[65];
    return fmix64(h);
}

/* The CID's table hash. A 36-byte CID (v1, sha2-256) takes NH (the universal hash of UMAC:
 * the sum of (m[2i] + k[2i]) * (m[2i+1] + k[2i+1]) over 32-bit words, two different inputs
 * colliding with probability 2^-32 under random keys), then a bijective mixer (MurmurHash3's
 * fmix64) so that the low bits, the slot index, depend on every bit: about 5x faster than SipHash
 * on 36 bytes. Other CIDs take hash_long. */
static inline uint64_t hash_cid(const uint8_t *cid, size_t len) {
    if (len != 36) return hash_long(cid, len);
    uint32_t m[10] = {0};
    memcpy(m, cid, 36);
    uint64_t h = 0;
    for (int i = 0; i < 10; i += 2) h += (uint64_t)(uint32_t)(m[i] + nh_key[i]) * (uint32_t)(m[i + 1] + nh_key[i + 1]);
    return fmix64(h);
}

static inline uint8_t *rec_of(uint64_t slot) { return (uint8_t *)(uintptr_t)(slot & PTR_MASK); }

static inline uint32_t rec_data_len(const uint8_t *rec) {
    uint32_t n;
    memcpy(&n, rec + 2, 4);
    return n;
}

static inline PyObject *rec_value(const uint8_t *rec) {
    PyObject *v;
    memcpy(&v, rec + HEADER_BYTES + rec[1], sizeof v);
    return v;
}

static inline size_t rec_size(const uint8_t *rec) {
    return HEADER_BYTES + rec[1] + ((rec[0] & F_PROCESSED) ? sizeof(PyObject *) : rec_data_len(rec));
}

static uint8_t *find(RsBlockTable *t, const uint8_t *cid, size_t cid_len, uint64_t h, size_t *slot_out) {
    if (t->nslots == 0) {
        *slot_out = 0;
        return NULL;
    }
    size_t mask = t->nslots - 1;
    size_t i = (size_t)h & mask;
    uint64_t tag = h >> 48;
    for (;;) {
        uint64_t s = t->slots[i];
        if (s == 0) {
            *slot_out = i;
            return NULL;
        }
        if ((s >> 48) == tag) {
            uint8_t *rec = rec_of(s);
            if (rec[1] == cid_len && memcmp(rec + HEADER_BYTES, cid, cid_len) == 0) {
                *slot_out = i;
                return rec;
            }
        }
        i = (i + 1) & mask;
    }
}

/* Memory for a chunk or a slot array; 2 MiB-aligned with transparent huge pages when that big (the
 * walk's look-ups are random: huge pages spare a TLB miss on most of them). Release with free(). */
static void *big_alloc(size_t size) {
    void *p = NULL;
    if (size >= HUGE_PAGE) {
        if (posix_memalign(&p, HUGE_PAGE, size) != 0) return NULL;
#ifdef MADV_HUGEPAGE
        madvise(p, size, MADV_HUGEPAGE);
#endif
        return p;
    }
    return malloc(size);
}

static int grow_slots(RsBlockTable *t) {
    size_t n = t->nslots ? t->nslots * 2 : 1024;
    uint64_t *slots = big_alloc(n * sizeof(uint64_t));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(slots, 0, n * sizeof(uint64_t));
    /* Every record is re-read for its CID's hash, in slot order, so at random: fetch a few ahead
     * so that the misses overlap instead of queueing. */
    for (size_t j = 0; j < t->nslots; j++) {
        if (j + REHASH_AHEAD < t->nslots && t->slots[j + REHASH_AHEAD]) __builtin_prefetch(rec_of(t->slots[j + REHASH_AHEAD]));
        uint64_t s = t->slots[j];
        if (s == 0) continue;
        uint8_t *rec = rec_of(s);
        size_t i = (size_t)hash_cid(rec + HEADER_BYTES, rec[1]) & (n - 1);
        while (slots[i]) i = (i + 1) & (n - 1);
        slots[i] = s;
    }
    free(t->slots);
    t->used += (Py_ssize_t)((n - t->nslots) * sizeof(uint64_t));
    t->slots = slots;
    t->nslots = n;
    return 0;
}

static uint8_t *arena_alloc(RsBlockTable *t, size_t size) {
    Chunk *c = t->tail;
    if (c == NULL || c->cap - c->used < size) {
        if (t->next_chunk < FIRST_CHUNK) t->next_chunk = FIRST_CHUNK;
        size_t cap = t->next_chunk - sizeof(Chunk);
        if (cap < size) cap = size;
        if (t->next_chunk < MAX_CHUNK) t->next_chunk *= 2;
        c = big_alloc(sizeof(Chunk) + cap);
        if (c == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        c->next = NULL;
        c->used = 0;
        c->cap = cap;
        if (t->tail) t->tail->next = c;
        else t->head = c;
        t->tail = c;
    }
    uint8_t *p = c->data + c->used;
    c->used += size;
    t->arena_bytes += size;
    t->used += (Py_ssize_t)size;
    return p;
}

/* What one object costs, as sys.getsizeof gives it (its own bytes, and the GC header of a type
 * the collector tracks): computed from its type and length, except a dict's, which is asked. */
static PyObject *sizeof_name;

static Py_ssize_t object_size(PyObject *o) {
    PyTypeObject *type = Py_TYPE(o);
    Py_ssize_t gc = PyType_IS_GC(type) ? 16 : 0;
    if (PyUnicode_CheckExact(o)) {
        Py_ssize_t n = PyUnicode_GET_LENGTH(o);
        if (PyUnicode_IS_COMPACT_ASCII(o)) return (Py_ssize_t)sizeof(PyASCIIObject) + n + 1;
        return (Py_ssize_t)sizeof(PyCompactUnicodeObject) + (n + 1) * (Py_ssize_t)PyUnicode_KIND(o);
    }
    if (PyBytes_CheckExact(o)) return (Py_ssize_t)offsetof(PyBytesObject, ob_sval) + 1 + PyBytes_GET_SIZE(o);
    if (PyList_CheckExact(o)) return (Py_ssize_t)sizeof(PyListObject) + ((PyListObject *)o)->allocated * (Py_ssize_t)sizeof(PyObject *) + gc;
    if (PyLong_CheckExact(o)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow) return 64;
        unsigned long long m = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
        return m < (1ULL << 30) ? 28 : m < (1ULL << 60) ? 32 : 36;
    }
    if (PyDict_CheckExact(o)) {
        if (sizeof_name == NULL && (sizeof_name = PyUnicode_InternFromString("__sizeof__")) == NULL) return -1;
        PyObject *r = PyObject_CallMethodNoArgs(o, sizeof_name);
        if (r == NULL) return -1;
        Py_ssize_t n = PyLong_AsSsize_t(r);
        Py_DECREF(r);
        return n < 0 ? -1 : n + gc;
    }
    Py_ssize_t n = type->tp_basicsize + gc;
    if (type->tp_itemsize) {
        Py_ssize_t items = Py_SIZE(o);
        n += (items < 0 ? -items : items) * type->tp_itemsize;
    }
    return n;
}

/* The size a processed value is counted for (blocks.value_size in the reference): 8 for a number
 * or None, the length of bytes or str; for anything else what it costs as Python objects, every
 * object it holds through dicts, lists and tuples (a decoded record is ~4-5x its block).
 * Iterative; -1 with an error set. */
static Py_ssize_t value_size(PyObject *v) {
    if (PyLong_CheckExact(v) || PyBool_Check(v) || PyFloat_CheckExact(v) || v == Py_None) return 8;
    if (PyBytes_CheckExact(v)) return PyBytes_GET_SIZE(v);
    if (PyUnicode_CheckExact(v)) return PyUnicode_GET_LENGTH(v);
    PyObject *small[64];
    PyObject **stack = small;
    size_t n = 0, cap = 64;
    Py_ssize_t total = 0;
    stack[n++] = v; /* borrowed: nothing runs that could drop them (a dict's own __sizeof__ only) */
    while (n > 0) {
        PyObject *o = stack[--n];
        Py_ssize_t size = object_size(o);
        if (size < 0) goto fail;
        total += size;
        Py_ssize_t more = PyDict_CheckExact(o) ? 2 * PyDict_GET_SIZE(o)
                          : PyList_CheckExact(o) ? PyList_GET_SIZE(o)
                          : PyTuple_CheckExact(o) ? PyTuple_GET_SIZE(o) : 0;
        if (more == 0) continue;
        if (n + (size_t)more > cap) {
            size_t want = cap;
            while (want < n + (size_t)more) want *= 2;
            PyObject **grown = stack == small ? PyMem_Malloc(want * sizeof *grown) : PyMem_Realloc(stack, want * sizeof *grown);
            if (grown == NULL) {
                PyErr_NoMemory();
                goto fail;
            }
            if (stack == small) memcpy(grown, small, n * sizeof *grown);
            stack = grown;
            cap = want;
        }
        if (PyDict_CheckExact(o)) {
            Py_ssize_t pos = 0;
            PyObject *key, *value;
            while (PyDict_Next(o, &pos, &key, &value)) {
                stack[n++] = key;
                stack[n++] = value;
            }
        } else {
            PyObject **items = PyList_CheckExact(o) ? ((PyListObject *)o)->ob_item : ((PyTupleObject *)o)->ob_item;
            for (Py_ssize_t i = 0; i < more; i++) stack[n++] = items[i];
        }
    }
    if (stack != small) PyMem_Free(stack);
    return total;
fail:
    if (stack != small) PyMem_Free(stack);
    return -1;
}

static int node_shaped(const uint8_t *block, size_t len) {
    return len > 3 && block[0] == 0xa2 && block[1] == 0x61 && block[2] == 0x65 && (block[3] & 0xe0) == 0x80;
}

int rs_table_add(RsBlockTable *t, const uint8_t *cid, size_t cid_len, const uint8_t *block, size_t block_len) {
    if (cid_len > 255 || block_len > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "CID or block too long for the block table");
        return -1;
    }
    uint64_t h = hash_cid(cid, cid_len);
    size_t slot;
    if (find(t, cid, cid_len, h, &slot) != NULL) return 0; /* a repeated CID: the first block wins */
    if ((t->count + 1) * 4 > t->nslots * 3) {
        if (grow_slots(t) < 0) return -1;
        find(t, cid, cid_len, h, &slot);
    }
    PyObject *value = NULL;
    int flags = 0;
    Py_ssize_t vsize = 0;
    if (t->process != Py_None && !node_shaped(block, block_len) && !rs_table_is_root(t, cid, cid_len)) {
        if (t->process == rs_len) { /* len(block), without making the bytes object */
            value = PyLong_FromSize_t(block_len);
        } else {
            PyObject *raw = PyBytes_FromStringAndSize((const char *)block, (Py_ssize_t)block_len);
            if (raw == NULL) return -1;
            value = PyObject_CallOneArg(t->process, raw);
            Py_DECREF(raw);
        }
        if (value == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
            PyErr_Clear(); /* kept raw: processed again, and the error raised, only if emitted */
        } else {
            vsize = value_size(value);
            if (vsize < 0) {
                Py_DECREF(value);
                return -1;
            }
            flags = F_PROCESSED;
        }
    }
    size_t size = HEADER_BYTES + cid_len + (flags ? sizeof(PyObject *) : block_len);
    uint8_t *rec = arena_alloc(t, size);
    if (rec == NULL) {
        Py_XDECREF(value);
        return -1;
    }
    uint32_t n32 = flags ? 0 : (uint32_t)block_len;
    rec[0] = (uint8_t)flags;
    rec[1] = (uint8_t)cid_len;
    memcpy(rec + 2, &n32, 4);
    memcpy(rec + HEADER_BYTES, cid, cid_len);
    if (flags) {
        memcpy(rec + HEADER_BYTES + cid_len, &value, sizeof value);
        t->has_values = 1;
        t->values_bytes += vsize;
        t->used += vsize;
    } else if (block_len) {
        memcpy(rec + HEADER_BYTES + cid_len, block, block_len);
    }
    t->slots[slot] = ((uint64_t)(uintptr_t)rec & PTR_MASK) | ((h >> 48) << 48);
    t->count += 1;
    return 0;
}

int rs_table_is_root(RsBlockTable *t, const uint8_t *cid, size_t cid_len) {
    return PyBytes_GET_SIZE(t->root) == (Py_ssize_t)cid_len && memcmp(PyBytes_AS_STRING(t->root), cid, cid_len) == 0;
}

uint64_t rs_table_hash(RsBlockTable *t, const uint8_t *cid, size_t cid_len) {
    uint64_t h = hash_cid(cid, cid_len);
    if (t->nslots) __builtin_prefetch(&t->slots[(size_t)h & (t->nslots - 1)]);
    return h;
}

void rs_table_prefetch_record(RsBlockTable *t, uint64_t hash) {
    if (t->nslots == 0) return;
    uint64_t s = t->slots[(size_t)hash & (t->nslots - 1)];
    if (s != 0 && (s >> 48) == (hash >> 48)) __builtin_prefetch(rec_of(s));
}

int rs_table_get(RsBlockTable *t, const uint8_t *cid, size_t cid_len, const uint8_t **data, size_t *len,
                 PyObject **value) {
    return rs_table_get_hashed(t, cid, cid_len, hash_cid(cid, cid_len), data, len, value);
}

int rs_table_get_hashed(RsBlockTable *t, const uint8_t *cid, size_t cid_len, uint64_t hash, const uint8_t **data,
                        size_t *len, PyObject **value) {
    size_t slot;
    uint8_t *rec = find(t, cid, cid_len, hash, &slot);
    if (rec == NULL) return 0;
    if (rec[0] & F_PROCESSED) {
        *value = rec_value(rec);
        return 2;
    }
    *data = rec + HEADER_BYTES + rec[1];
    *len = rec_data_len(rec);
    return 1;
}

Py_ssize_t rs_table_used(RsBlockTable *t) { return t->used; }

PyObject *rs_table_process(RsBlockTable *t) { return t->process; }

int rs_table_enter(RsBlockTable *t) {
    if (!t->ready) return rs_not_initialised("BlockTable");
    if (t->busy) return rs_reentered("BlockTable");
    t->busy = 1;
    return 0;
}

void rs_table_leave(RsBlockTable *t) { t->busy = 0; }

/* Block tables released between two malloc_trim calls (see rs_trim). */
#define TRIM_BYTES ((size_t)16 << 20)

void rs_trim(size_t released, int force) {
#ifdef __GLIBC__
    static size_t untrimmed; /* guarded by the GIL, which every caller holds */
    untrimmed += released;
    if (force || untrimmed >= TRIM_BYTES) {
        malloc_trim(0);
        untrimmed = 0;
    }
#else
    (void)released;
    (void)force;
#endif
}

static void clear_blocks(RsBlockTable *t) {
    size_t released = t->arena_bytes + t->nslots * sizeof(uint64_t);
    for (Chunk *c = t->head; c != NULL;) {
        /* Only processed values need a visit (their references); raw blocks go with their chunk,
         * unread: a table of raw blocks is freed without touching its CAR-sized arena again. */
        for (size_t off = 0; t->has_values && off < c->used;) {
            uint8_t *rec = c->data + off;
            if (rec[0] & F_PROCESSED) Py_XDECREF(rec_value(rec));
            off += rec_size(rec);
        }
        Chunk *next = c->next;
        free(c);
        c = next;
    }
    t->head = t->tail = NULL;
    t->next_chunk = FIRST_CHUNK;
    free(t->slots);
    t->slots = NULL;
    t->nslots = t->count = 0;
    t->used = t->values_bytes = 0;
    t->has_values = 0;
    t->arena_bytes = 0;
    t->take_chunk = NULL;
    t->take_off = 0;
    rs_trim(released, 0);
}

static int BlockTable_init(RsBlockTable *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"root", "process", "encode", NULL};
    PyObject *root, *process, *encode;
    if (self->init_called) return rs_init_twice("BlockTable");
    self->init_called = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "SOO", names, &root, &process, &encode)) return -1;
    if (process != Py_None && !PyCallable_Check(process)) {
        PyErr_SetString(PyExc_TypeError, "process must be callable or None");
        return -1;
    }
    Py_INCREF(root);
    Py_XSETREF(self->root, root);
    Py_INCREF(process);
    Py_XSETREF(self->process, process);
    Py_INCREF(encode);
    Py_XSETREF(self->encode, encode);
    self->ready = 1;
    return 0;
}

static int BlockTable_traverse(RsBlockTable *self, visitproc visit, void *arg) {
    Py_VISIT(self->process);
    Py_VISIT(self->encode);
    return 0;
}

static int BlockTable_clear_refs(RsBlockTable *self) {
    Py_CLEAR(self->process);
    Py_CLEAR(self->encode);
    return 0;
}

static void BlockTable_dealloc(RsBlockTable *self) {
    PyObject_GC_UnTrack(self);
    clear_blocks(self);
    Py_CLEAR(self->root);
    BlockTable_clear_refs(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *BlockTable_add(RsBlockTable *self, PyObject *args) {
    Py_buffer cid, block;
    if (!PyArg_ParseTuple(args, "y*y*:add", &cid, &block)) return NULL;
    int r = rs_table_enter(self);
    if (r == 0) {
        r = rs_table_add(self, cid.buf, (size_t)cid.len, block.buf, (size_t)block.len);
        rs_table_leave(self);
    }
    PyBuffer_Release(&cid);
    PyBuffer_Release(&block);
    if (r < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *BlockTable_raw_block(RsBlockTable *self, PyObject *arg) {
    if (!self->ready) return rs_not_initialised("BlockTable"), NULL;
    if (self->busy) return rs_reentered("BlockTable"), NULL;
    Py_buffer cid;
    if (PyObject_GetBuffer(arg, &cid, PyBUF_SIMPLE) < 0) return NULL;
    const uint8_t *data = NULL;
    size_t len = 0;
    PyObject *value = NULL;
    int kind = rs_table_get(self, cid.buf, (size_t)cid.len, &data, &len, &value);
    PyBuffer_Release(&cid);
    if (kind != 1) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)len);
}

static PyObject *BlockTable_node(RsBlockTable *self, PyObject *arg) {
    if (!self->ready) return rs_not_initialised("BlockTable"), NULL;
    if (self->busy) return rs_reentered("BlockTable"), NULL;
    Py_buffer cid;
    if (PyObject_GetBuffer(arg, &cid, PyBUF_SIMPLE) < 0) return NULL;
    const uint8_t *data = NULL;
    size_t len = 0;
    PyObject *value = NULL;
    int kind = rs_table_get(self, cid.buf, (size_t)cid.len, &data, &len, &value);
    PyBuffer_Release(&cid);
    if (kind == 0) Py_RETURN_NONE;
    if (kind == 2) return Py_NewRef(rs_not_a_node);
    return PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)len);
}

/* One spill row for a record; adds its byte count to *size. */
static PyObject *row_of(RsBlockTable *t, const uint8_t *rec, Py_ssize_t *size) {
    const char *cid = (const char *)rec + HEADER_BYTES;
    Py_ssize_t cid_len = rec[1];
    if (!(rec[0] & F_PROCESSED)) {
        Py_ssize_t n = rec_data_len(rec);
        *size += cid_len + n;
        return Py_BuildValue("(y#iy#)", cid, cid_len, ROW_RAW, cid + cid_len, n);
    }
    PyObject *v = rec_value(rec);
    int plain = 0;
    Py_ssize_t n = 8;
    if (PyLong_CheckExact(v)) {
        int overflow;
        PyLong_AsLongLongAndOverflow(v, &overflow);
        plain = !overflow;
    } else if (PyFloat_CheckExact(v) || v == Py_None) {
        plain = 1;
    } else if (PyBytes_CheckExact(v)) {
        plain = 1;
        n = PyBytes_GET_SIZE(v);
    } else if (PyUnicode_CheckExact(v)) {
        plain = 1;
        n = PyUnicode_GET_LENGTH(v);
    }
    if (plain) {
        *size += cid_len + n;
        return Py_BuildValue("(y#iO)", cid, cid_len, ROW_PLAIN, v);
    }
    PyObject *data = PyObject_CallOneArg(t->encode, v);
    if (data == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
        PyObject *type, *exc, *tb;
        PyErr_Fetch(&type, &exc, &tb);
        PyErr_NormalizeException(&type, &exc, &tb);
        if (exc && tb) PyException_SetTraceback(exc, tb);
        Py_XDECREF(type);
        Py_XDECREF(tb);
        if (exc == NULL) return NULL;
        rs_raise("codec_failed", "(y#N)", cid, cid_len, exc);
        return NULL;
    }
    Py_ssize_t dn = PyObject_Length(data);
    if (dn < 0) {
        Py_DECREF(data);
        return NULL;
    }
    *size += cid_len + dn;
    return Py_BuildValue("(y#iN)", cid, cid_len, ROW_ENCODED, data);
}

/* The take cursor (take_rows, take_run): from the first record, unless a take is under way. */
static void take_start(RsBlockTable *self) {
    if (self->take_chunk == NULL && self->take_off == 0) self->take_chunk = self->head;
}

/* The record under the take cursor, past any chunk it has used up; NULL once all are taken. The
 * caller moves take_off past the record it takes. */
static uint8_t *take_next(RsBlockTable *self) {
    while (self->take_chunk != NULL) {
        Chunk *c = self->take_chunk;
        if (self->take_off < c->used) return c->data + self->take_off;
        self->take_chunk = c->next;
        self->take_off = 0;
    }
    return NULL;
}

static PyObject *take_rows(RsBlockTable *self, Py_ssize_t max_bytes);

static PyObject *BlockTable_take_rows(RsBlockTable *self, PyObject *arg) {
    Py_ssize_t max_bytes = PyLong_AsSsize_t(arg);
    if (max_bytes == -1 && PyErr_Occurred()) return NULL;
    if (rs_table_enter(self) < 0) return NULL;
    PyObject *out = take_rows(self, max_bytes);
    rs_table_leave(self);
    return out;
}

static PyObject *take_rows(RsBlockTable *self, Py_ssize_t max_bytes) {
    PyObject *rows = PyList_New(0);
    if (rows == NULL) return NULL;
    Py_ssize_t size = 0;
    uint8_t *rec;
    take_start(self);
    while (size < max_bytes && (rec = take_next(self)) != NULL) {
        PyObject *row = row_of(self, rec, &size);
        if (row == NULL || PyList_Append(rows, row) < 0) {
            Py_XDECREF(row);
            Py_DECREF(rows);
            return NULL;
        }
        Py_DECREF(row);
        self->take_off += rec_size(rec);
    }
    if (self->take_chunk == NULL) clear_blocks(self); /* all taken */
    return Py_BuildValue("(Nn)", rows, size);
}

/* take_rows, then pack_run of those rows (repo_stream.core.blocks.MemoryBlocks.take_run), without making
 * a Python object per row: raw blocks and plain values are packed from where they are. */
static PyObject *take_run(RsBlockTable *self, Py_ssize_t max_bytes, unsigned long long next_large);

static PyObject *BlockTable_take_run(RsBlockTable *self, PyObject *args) {
    Py_ssize_t max_bytes;
    unsigned long long next_large;
    if (!PyArg_ParseTuple(args, "nK", &max_bytes, &next_large)) return NULL;
    if (rs_table_enter(self) < 0) return NULL;
    PyObject *out = take_run(self, max_bytes, next_large);
    rs_table_leave(self);
    return out;
}

static PyObject *take_run(RsBlockTable *self, Py_ssize_t max_bytes, unsigned long long next_large) {
    size_t cap = 1024, n = 0;
    RsEntry *e = PyMem_Malloc(cap * sizeof(RsEntry));
    PyObject *keep = PyList_New(0); /* the encoded values, alive until packed */
    PyObject *packed = NULL, *not_utf8 = NULL;
    int looped = 0;
    if (e == NULL || keep == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t size = 0;
    uint8_t *rec;
    take_start(self);
    while (size < max_bytes && (rec = take_next(self)) != NULL) {
        if (n == cap) {
            RsEntry *bigger = cap < ((size_t)PY_SSIZE_T_MAX / sizeof(RsEntry)) / 2 ? PyMem_Realloc(e, 2 * cap * sizeof(RsEntry)) : NULL;
            if (bigger == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            e = bigger;
            cap *= 2;
        }
        RsEntry *x = &e[n];
        size_t cid_len = rec[1];
        rs_entry_cid(x, rec + HEADER_BYTES, cid_len, (Py_ssize_t)n);
        if (!(rec[0] & F_PROCESSED)) {
            x->kind = ROW_RAW;
            x->p = rec + HEADER_BYTES + cid_len;
            x->len = rec_data_len(rec);
            size += (Py_ssize_t)(cid_len + x->len);
        } else {
            PyObject *v = rec_value(rec);
            int plain = rs_entry_plain(x, v);
            if (plain < 0) { /* a str that is not UTF-8: raised once the take is over, as the reference's pack */
                if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) goto done;
                PyErr_Clear();
                if (not_utf8 == NULL) not_utf8 = Py_NewRef(v);
                x->kind = 4, x->p = NULL, x->len = 0, plain = 1;
            }
            if (plain) { /* counted as row_of counts it */
                Py_ssize_t counted = PyBytes_CheckExact(v) ? PyBytes_GET_SIZE(v) : PyUnicode_CheckExact(v) ? PyUnicode_GET_LENGTH(v) : 8;
                size += (Py_ssize_t)cid_len + counted;
            } else {
                Py_ssize_t ignored = 0;
                PyObject *row = row_of(self, rec, &ignored); /* (cid, ROW_ENCODED, data), or the codec's error */
                if (row == NULL) goto done;
                PyObject *data = PyTuple_GET_ITEM(row, 2);
                if (!PyBytes_CheckExact(data)) {
                    PyErr_Format(PyExc_TypeError, "the codec's encoder returned %s, not bytes", Py_TYPE(data)->tp_name);
                    Py_DECREF(row);
                    goto done;
                }
                int r = PyList_Append(keep, data);
                Py_DECREF(row);
                if (r < 0) goto done;
                x->kind = ROW_ENCODED;
                x->p = (const uint8_t *)PyBytes_AS_STRING(data);
                x->len = (size_t)PyBytes_GET_SIZE(data);
                size += (Py_ssize_t)(cid_len + x->len);
            }
        }
        n++;
        self->take_off += rec_size(rec);
    }
    looped = 1;
    if (not_utf8 != NULL) {
        Py_ssize_t ignored;
        if (PyUnicode_AsUTF8AndSize(not_utf8, &ignored) == NULL) goto done;
    }
    packed = rs_pack_entries(e, (Py_ssize_t)n, next_large);
done:
    PyMem_Free(e);
    Py_XDECREF(keep);
    Py_XDECREF(not_utf8);
    if (looped && self->take_chunk == NULL) clear_blocks(self); /* all taken (packed, or failed to) */
    if (packed == NULL) return NULL;
    PyObject *result = Py_BuildValue("(OOn)", PyTuple_GET_ITEM(packed, 0), PyTuple_GET_ITEM(packed, 1), size);
    Py_DECREF(packed);
    return result;
}

static PyObject *BlockTable_clear(RsBlockTable *self, PyObject *unused) {
    (void)unused;
    if (rs_table_enter(self) < 0) return NULL;
    clear_blocks(self);
    rs_table_leave(self);
    Py_RETURN_NONE;
}

static Py_ssize_t BlockTable_len(RsBlockTable *self) { return (Py_ssize_t)self->count; }

static PyObject *BlockTable_get_used(RsBlockTable *self, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(self->used);
}

/* The longest run of slots a look-up of a kept CID walks past its home slot (0: every CID in its
 * own). Computed when asked, for tests: forged colliding CIDs would make it as long as their count. */
static PyObject *BlockTable_get_longest_probe(RsBlockTable *self, void *closure) {
    (void)closure;
    size_t longest = 0;
    for (size_t i = 0; i < self->nslots; i++) {
        uint64_t s = self->slots[i];
        if (s == 0) continue;
        const uint8_t *rec = rec_of(s);
        size_t home = (size_t)hash_cid(rec + HEADER_BYTES, rec[1]) & (self->nslots - 1);
        size_t distance = (i - home) & (self->nslots - 1);
        if (distance > longest) longest = distance;
    }
    return PyLong_FromSize_t(longest);
}

static PyObject *BlockTable_get_process(RsBlockTable *self, void *closure) {
    (void)closure;
    return Py_NewRef(self->process ? self->process : Py_None);
}

static PyObject *BlockTable_get_root(RsBlockTable *self, void *closure) {
    (void)closure;
    return Py_NewRef(self->root ? self->root : Py_None);
}

static PyMethodDef BlockTable_methods[] = {
    {"add", (PyCFunction)BlockTable_add, METH_VARARGS,
     "add(cid, block)\n--\n\nKeep a block (processed if it cannot be a node); a repeated CID keeps its first."},
    {"raw_block", (PyCFunction)BlockTable_raw_block, METH_O, "raw_block(cid)\n--\n\nThe raw bytes kept for cid, else None."},
    {"node", (PyCFunction)BlockTable_node, METH_O,
     "node(cid)\n--\n\nRaw bytes of a block kept raw; None if absent; NOT_A_NODE if processed."},
    {"take_rows", (PyCFunction)BlockTable_take_rows, METH_O,
     "take_rows(max_bytes)\n--\n\nRemove and return about max_bytes of blocks as (rows, byte count)."},
    {"take_run", (PyCFunction)BlockTable_take_run, METH_VARARGS,
     "take_run(max_bytes, next_large)\n--\n\ntake_rows(max_bytes), packed as one run: (run, large, byte count)."},
    {"clear", (PyCFunction)BlockTable_clear, METH_NOARGS, "clear()\n--\n\nDrop every block."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef BlockTable_getset[] = {
    {"used", (getter)BlockTable_get_used, NULL, "Bytes counted (the table's real bytes).", NULL},
    {"process", (getter)BlockTable_get_process, NULL, "The block processor, or None.", NULL},
    {"longest_probe", (getter)BlockTable_get_longest_probe, NULL,
     "Slots the longest look-up of a kept CID walks past its home slot (for tests).", NULL},
    {"root", (getter)BlockTable_get_root, NULL, "The commit's raw CID.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods BlockTable_as_sequence = {.sq_length = (lenfunc)BlockTable_len};

PyTypeObject RsBlockTable_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "repo_stream._native.BlockTable",
    .tp_basicsize = sizeof(RsBlockTable),
    .tp_dealloc = (destructor)BlockTable_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "BlockTable(root, process, encode)\n--\n\n"
              "The C in-memory block table; the same behaviour as repo_stream.core.blocks.MemoryBlocks.",
    .tp_traverse = (traverseproc)BlockTable_traverse,
    .tp_clear = (inquiry)BlockTable_clear_refs,
    .tp_methods = BlockTable_methods,
    .tp_getset = BlockTable_getset,
    .tp_as_sequence = &BlockTable_as_sequence,
    .tp_init = (initproc)BlockTable_init,
    .tp_new = PyType_GenericNew,
};
