/* repo_stream._native: the C core of repo-stream (CAR sections, the block table, the MST walk).
 *
 * The pure-Python modules repo_stream/car.py, blocks.py and walk.py are the reference: this code
 * does what they do, checks in the same order, and raises the same errors with the same messages
 * (built by calling repo_stream/messages.py, so the texts live in one place).
 *
 * Input is hostile network data: every length is checked before use, nothing recurses, and
 * every allocation is bounded by the block-size limit or counted against the memory limit.
 */
#ifndef REPO_STREAM_NATIVE_H
#define REPO_STREAM_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The first 4 bytes of the usual repo CID: v1, dag-cbor, sha2-256, a 32-byte digest. */
static const uint8_t RS_CID_PREFIX[4] = {0x01, 0x71, 0x12, 0x20};

/* --- module state (set once by _native.setup) ------------------------------------------------ */
extern PyObject *rs_messages;   /* the repo_stream.core.messages module */
extern PyObject *rs_not_a_node; /* repo_stream.core.blocks.NOT_A_NODE */
extern PyObject *rs_cid_text;   /* repo_stream.core.cid.cid_text */
extern PyObject *rs_verify;     /* repo_stream.core.car._verify (CIDs other than v1 dag-cbor sha2-256) */
extern PyObject *rs_base_error; /* repo_stream.errors.RepoStreamError */
extern PyObject *rs_len;        /* builtins.len: as a block processor it needs no bytes object */

/* Build an exception with messages.<name>(*args) (args from Py_BuildValue(fmt, ...)) and set it.
 * Always returns -1. If the call itself fails, that error is set instead. */
int rs_raise(const char *name, const char *fmt, ...);

/* json.c: many record blocks' JSON texts appended into one growing buffer (PyMem, the GIL held). */
typedef struct RsJsonOut RsJsonOut;
RsJsonOut *rs_json_out_new(size_t hint);                                  /* NULL with an error */
int rs_json_out_append(RsJsonOut *j, const uint8_t *block, size_t n);      /* 0, or -1 with an error */
int rs_json_out_put(RsJsonOut *j, const void *data, size_t n);             /* 0, or -1 with an error */
uint8_t *rs_json_out_data(RsJsonOut *j, size_t *len);
void rs_json_out_free(RsJsonOut *j);

/* Grow *buf (PyMem) to hold at least `need` items of `elem` bytes, doubling; 0, or -1 with
 * MemoryError set (past 1 TiB, or realloc failing). In walk.c. */
int rs_reserve(void **buf, size_t *cap, size_t need, size_t elem);

/* Hand freed heap memory back to the OS (glibc's malloc_trim; nothing elsewhere): glibc keeps the
 * chunks it frees below its mmap threshold, and each thread's arena, in the process. Trimming
 * after every repo costs more in page faults (the next repo touches the same memory again) than
 * it saves, so it runs once `released` bytes add up to 16 MiB since the last, or when `force`d
 * (a spill store closed: its SQLite page cache, freed in a worker thread's arena). In table.c. */
void rs_trim(size_t released, int force);

/* --- guards of the C types' entry points (module.c) ------------------------------------------
 * A type's __init__ runs once (a second call, even after a failed first, raises); every method
 * checks that it ran; and a method that may call back into Python (a processor, a codec, a store)
 * marks the object busy, so that a callback calling into the same object is refused instead of
 * finding its buffers moved or freed. Each sets RuntimeError and returns -1. */
int rs_init_twice(const char *type);   /* "<type>.__init__ called twice" */
int rs_not_initialised(const char *type); /* "<type> is not initialised (its __init__ did not run)" */
int rs_reentered(const char *type);   /* "<type> is already running (called again from a callback)" */

/* --- sha256.c -------------------------------------------------------------------------------- */
void rs_sha256(const uint8_t *data, size_t len, uint8_t out[32]);
/* The same with the portable rounds only (rs_sha256 uses the SHA extensions where the CPU has them). */
void rs_sha256_portable(const uint8_t *data, size_t len, uint8_t out[32]);
/* Two messages' digests at once (their rounds interleaved where the CPU has the SHA extensions: two
 * 1-block messages in ~0.7x the time of two rs_sha256 calls, two of 1 KB in ~0.55x); the same
 * digests as rs_sha256 of each. */
void rs_sha256_x2(const uint8_t *data_a, size_t len_a, const uint8_t *data_b, size_t len_b, uint8_t out_a[32], uint8_t out_b[32]);
/* The digests of n messages (out[i] of data[i], len[i] bytes), hashed side by side in vector lanes
 * where the CPU has them (AVX-512: 16, AVX2: 8). `lanes` caps the width (0: the widest; 1: one
 * at a time), for tests and for callers with few messages. */
void rs_sha256_many(size_t n, const uint8_t *const *data, const size_t *len, uint8_t (*out)[32], int lanes);
/* The widest lane count rs_sha256_many uses on this CPU: 16, 8 or 1. */
int rs_sha256_lanes(void);

/* --- verify.c: blocks checked against their CIDs, hashed ahead on a second core --------------- */
typedef struct RsVerifier RsVerifier;
/* For the section at buf[start] whose block is buf[ce:end] after the usual 36-byte CID prefix
 * (buf: n bytes, buf[0] at stream offset `offset`): 1 if the block's SHA-256 is its CID's digest,
 * 0 if not, 2 if no batch covers it (the caller hashes it), -1 with an error set. *v is made on
 * first use (NULL before). Until rs_verifier_quiesce(), a thread may read buf[start:n]. */
int rs_verifier_check(RsVerifier **v, const uint8_t *buf, Py_ssize_t n, long long offset, Py_ssize_t start,
                      Py_ssize_t ce, Py_ssize_t end, Py_ssize_t max_block);
/* Wait until the verifier's thread reads nothing the caller may move or free (v may be NULL). */
void rs_verifier_quiesce(RsVerifier *v);
/* End the thread and free the verifier (v may be NULL). */
void rs_verifier_free(RsVerifier *v);

/* --- CBOR heads (shared by the CAR header check and the node decoder) ------------------------ */
/* Read a CBOR head at *p (< end). Returns 0 and sets major/arg/minimal, or -1 if the bytes end
 * first or the additional info is reserved (28..30) or indefinite (31). */
static inline int rs_cbor_head(const uint8_t **p, const uint8_t *end, int *major, uint64_t *arg, int *minimal) {
    const uint8_t *q = *p;
    if (q >= end) return -1;
    uint8_t first = *q++;
    int info = first & 0x1f;
    *major = first >> 5;
    *minimal = 1;
    if (info < 24) {
        *arg = (uint64_t)info;
    } else if (info <= 27) {
        size_t width = (size_t)1 << (info - 24);
        if ((size_t)(end - q) < width) return -1;
        uint64_t v = 0;
        for (size_t i = 0; i < width; i++) v = (v << 8) | q[i];
        q += width;
        *arg = v;
        if ((info == 24 && v < 24) || (info == 25 && v < 0x100) || (info == 26 && v < 0x10000) ||
            (info == 27 && v < 0x100000000ULL))
            *minimal = 0;
    } else {
        return -1;
    }
    *p = q;
    return 0;
}

/* --- table.c: the block table ----------------------------------------------------------------- */
extern PyTypeObject RsBlockTable_Type;
typedef struct RsBlockTable RsBlockTable;

/* Look up a block. Returns 0 (absent), 1 (raw: data and len set), 2 (processed: value borrowed). */
int rs_table_get(RsBlockTable *t, const uint8_t *cid, size_t cid_len, const uint8_t **data, size_t *len,
                 PyObject **value);
/* Keep a block (first wins); process it if it cannot be a node. 0 on success, -1 with an error. */
int rs_table_add(RsBlockTable *t, const uint8_t *cid, size_t cid_len, const uint8_t *block, size_t block_len);
/* The same, with the CID's table hash already computed by rs_table_hash. */
int rs_table_get_hashed(RsBlockTable *t, const uint8_t *cid, size_t cid_len, uint64_t hash, const uint8_t **data,
                        size_t *len, PyObject **value);
/* The CID's table hash; also starts fetching its slot into the cache (a later get is quicker). */
uint64_t rs_table_hash(RsBlockTable *t, const uint8_t *cid, size_t cid_len);
/* Start fetching the record a hash's first slot points at, if its tag matches (a hint, no check). */
void rs_table_prefetch_record(RsBlockTable *t, uint64_t hash);
Py_ssize_t rs_table_used(RsBlockTable *t);
/* Whether cid is the table's root (the commit's CID). */
int rs_table_is_root(RsBlockTable *t, const uint8_t *cid, size_t cid_len);
PyObject *rs_table_process(RsBlockTable *t); /* borrowed; Py_None when there is no processor */
/* Draw the table hash's keys from the operating system (at import): 0, or -1 with OSError. */
int rs_table_keys_init(void);
/* Guards for callers holding a table across a callback: rs_table_enter checks it is initialised and
 * not busy, then marks it busy (0), or sets RuntimeError (-1); rs_table_leave unmarks it. */
int rs_table_enter(RsBlockTable *t);
void rs_table_leave(RsBlockTable *t);

/* --- car.c / walk.c --------------------------------------------------------------------------- */
extern PyTypeObject RsCarParser_Type;
extern PyTypeObject RsWalker_Type;

/* The record CID's text form: "b" + base32 for CIDv1, else repo_stream.core.cid.cid_text(). */
PyObject *rs_cid_text_of(const uint8_t *cid, size_t len);

/* --- runs.c: sorted runs of spilled blocks, their merge and index ------------------------------ */
extern PyTypeObject RsRunMerge_Type;
/* One entry of a run being packed: its CID and payload (p, or small when p is NULL), kind K_*. */
typedef struct {
    uint64_t k0, k1; /* the CID's first 16 bytes, big-endian, zero-padded: most comparisons end there */
    const uint8_t *cid, *p;
    size_t cid_len, len;
    Py_ssize_t seq; /* a repeated CID keeps the entry of the lowest seq */
    int kind;
    uint8_t small[8];
} RsEntry;
void rs_entry_cid(RsEntry *e, const uint8_t *cid, size_t cid_len, Py_ssize_t seq);
/* Set e's payload to a processed value as it is (kind 2 to 6): 1; 0 if it is not plain (an int
 * past 64 bits, or a container: it must be encoded); -1 with an error (a str that is not UTF-8). */
int rs_entry_plain(RsEntry *e, PyObject *value);
/* Sort e[0..n) by CID and pack it into a run: a new (run, large), large numbered from next_large. */
PyObject *rs_pack_entries(RsEntry *e, Py_ssize_t n, unsigned long long next_large);
PyObject *rs_pack_run(PyObject *self, PyObject *args);
int rs_runs_ready(void); /* PyType_Ready of RunMerge and RunIndex: 0, or -1 with an error */

/* --- arrow.c: Arrow record batches (Arrow C Data Interface) ---------------------------------- */
typedef struct {
    uint8_t *data; /* PyMem_Raw: freed by the batch's release callback, in any thread */
    size_t len, cap;
} RsArrowBuf;

/* A record batch being built, row by row: rs_arrow_key, then rs_arrow_cid or rs_arrow_cid_text,
 * then the value (rs_arrow_value, rs_arrow_value_str, or bytes written into buf[RS_ARROW_VALUE]
 * after rs_arrow_grow, then rs_arrow_value_done). Each returns 0, or -1 with an error set
 * (MemoryError; OverflowError once a column passes Arrow's 2 GiB). Zeroed by rs_arrow_init. */
typedef struct {
    RsArrowBuf buf[11];
    int64_t n, n_dict;   /* rows; dictionary entries (collections) */
    size_t last_len;     /* the last collection's length (at the end of the dictionary's data) */
    size_t value_start;  /* where the current row's value starts */
    size_t bytes;        /* the rows' bytes: their data, plus RS_ARROW_ROW_BYTES per row */
    int started;
} RsArrowBuilder;
#define RS_ARROW_VALUE 7        /* the value column's data buffer in buf[] */
#define RS_ARROW_ROW_BYTES 16   /* bytes counted per row for its offsets and index */
void rs_arrow_init(RsArrowBuilder *b);
void rs_arrow_free(RsArrowBuilder *b);
int rs_arrow_grow(RsArrowBuilder *b, int buf, size_t more);
int rs_arrow_key(RsArrowBuilder *b, const uint8_t *key, size_t key_len); /* key, rkey, collection */
int rs_arrow_cid(RsArrowBuilder *b, const uint8_t *cid, size_t len);     /* a raw CID, as its text */
int rs_arrow_cid_text(RsArrowBuilder *b, const char *text, size_t len);
int rs_arrow_value(RsArrowBuilder *b, const uint8_t *value, size_t len);
int rs_arrow_value_str(RsArrowBuilder *b, PyObject *text); /* a str's UTF-8 */
int rs_arrow_value_done(RsArrowBuilder *b);
/* JSON lines (value_kind 2, `repo-stream dump`'s lines), in buf[RS_ARROW_VALUE] alone: the head
 * {"key":"<key>","cid":"<cid>","value": (key and CID text need no escaping: the walk checks the
 * key's characters, and a CID's text is base32 or base58), the value's JSON text written after
 * it, then rs_arrow_line_done ("}\n"; counts the row and its bytes). */
int rs_arrow_line_head(RsArrowBuilder *b, const uint8_t *key, size_t key_len, const char *cid, size_t cid_len);
int rs_arrow_line_done(RsArrowBuilder *b);
/* A CIDv1's text ("b" + base32) into out: its length; 0 for another CID (rs_cid_text_of's). */
#define RS_CID_TEXT_MAX (1 + (256 * 8 + 4) / 5)
size_t rs_cid_b32(char out[RS_CID_TEXT_MAX], const uint8_t *cid, size_t len);
/* The batch as the pair (schema capsule, array capsule); the buffers move into it (b is freed). */
PyObject *rs_arrow_finish(RsArrowBuilder *b, int value_kind);

/* --- json.c ----------------------------------------------------------------------------------- */
/* Append the atproto JSON text of the record block[0:n] to buf[RS_ARROW_VALUE] (grown as needed):
 * 0; or -1 with RecordDecodeError (or MemoryError) set, the buffer's length as it was. */
int rs_json_into(RsArrowBuilder *b, const uint8_t *block, size_t n);

/* --- walk.c / mst.c: MST nodes ------------------------------------------------------------------- */
#define RS_MAX_KEY_BYTES 1024
/* One decoded node entry: p (negative: -1 - p, neg set), k, v and t (CID bytes after the 0x00). */
typedef struct {
    int neg;
    uint64_t p;
    const uint8_t *k, *v, *t;
    size_t k_len, v_len, t_len;
    int has_t;
} RsNodeEntry;
/* Decode a node block (strict: canonical DAG-CBOR too) into *entries (grown as needed); sets
 * *left (NULL if none) and *count. 0, or -1 with NodeDecodeError (repo_stream.core.walk.decode_node). */
int rs_decode_node(RsNodeEntry **entries, size_t *cap, int strict, const uint8_t *cid, size_t cid_len, const uint8_t *block,
                   size_t len, const uint8_t **left, size_t *left_len, size_t *count);
/* The key rules of a node's entries, one entry at a time (repo_stream.core.walk.node_keys): start
 * with rs_keys_start, then per entry rs_node_key (builds the key in `key`, checks it) and
 * rs_keys_advance (the key becomes `prev`). `layer` is the node's (its first key's), `child` its
 * subtrees' layer. Buffers grow as needed (keys are at most RS_MAX_KEY_BYTES once checked). */
typedef struct {
    uint8_t *key, *prev;
    size_t key_len, prev_len, cap_key, cap_prev;
    int layer;
    int32_t expected, child;
    int check_keys, has_collection;
    size_t collection_len;
    uint8_t collection[320];
} RsKeys;
/* A key's MST layer from its SHA-256 digest: leading zero bits, halved (two bits a layer). */
int rs_digest_layer(const uint8_t d[32]);
void rs_keys_start(RsKeys *r, int32_t expected, int check_keys);
/* known_layer: the key's layer if already hashed, else -1. 0, or -1 with the rule's error. */
int rs_node_key(RsKeys *r, const uint8_t *cid, size_t cid_len, const RsNodeEntry *e, int known_layer);
void rs_keys_advance(RsKeys *r);
void rs_keys_free(RsKeys *r);
/* A repo key <collection>/<rkey>, as repo_stream.core.mst.is_valid_key: 1 or 0. In walk.c. */
int rs_valid_key(const uint8_t *key, size_t n);
/* mst.c: a commit's tree work (lookup_and_invert) over blocks held in a buffer the caller keeps
 * alive, indexed by their 36-byte CIDs (sorted, distinct), for event.c. */
typedef struct {
    const uint8_t *p;
    size_t n;
} RsBytes;
#define RS_SLICE_CID 36
typedef struct {
    const uint8_t *cid; /* RS_SLICE_CID bytes */
    const uint8_t *block;
    size_t len;
} RsSliceBlock;
/* One op: code 0 create, 1 update, 2 delete; path (a str, for messages); the key; cid and prev
 * (set when has_cid, has_prev: a create has a cid, an update both, a delete a prev). */
typedef struct {
    int code;
    PyObject *path;
    RsBytes key, cid, prev;
    int has_cid, has_prev;
} RsTreeOp;
/* The block of cid in slice[0..n) (sorted by CID), or NULL. */
const RsSliceBlock *rs_slice_find(const RsSliceBlock *slice, size_t n, const uint8_t *cid, size_t cid_len);
/* lookup_and_invert(root, slice, [op keys], ops, check_keys, max_depth): (held, inverted), errors
 * of the tree as values; NULL with any other error set. */
PyObject *rs_tree_work(const uint8_t *root, size_t root_len, const RsSliceBlock *slice, size_t n_slice, const RsTreeOp *ops, size_t n_ops,
                       int check_keys, int max_depth);
PyObject *rs_load_node(PyObject *self, PyObject *args);   /* mst.c */
PyObject *rs_encode_node(PyObject *self, PyObject *args); /* mst.c */
PyObject *rs_lookup_and_invert(PyObject *self, PyObject *args); /* mst.c */
PyObject *rs_commit_event(PyObject *self, PyObject *args);     /* event.c */
PyObject *rs_commit_peek(PyObject *self, PyObject *args);      /* event.c */

#endif
