/* Walker: the ordered, iterative MST walk (spec: atproto repository, "Merkle Search Tree").
 * Mirrors repo_stream/walk.py: the same stack discipline, the same checks in the same order, the
 * same errors (built by repo_stream/messages.py). A node is decoded whole (strict DAG-CBOR: one
 * map {e, l}, entries {p, k, v, t}, no repeated key, no tag but 42; canonical when `strict`)
 * before any tree rule is checked on it.
 *
 * With a BlockTable as `nodes` and `values`, nodes are read in place and each emitted record
 * becomes its Python item right here; otherwise `nodes.node(cid)` / `nodes.prefetch(cids)` and
 * `values.values(pairs, record_cids, record_type)` are called (the disk store). */
#include "native.h"

#define MAX_KEY_BYTES RS_MAX_KEY_BYTES
/* Keys whose layers are hashed together (side by side in SHA-256 lanes), and their byte budget. */
#define LAYERS_AHEAD 32
#define LAYERS_AHEAD_BYTES 8192
#define RECORD_AHEAD 4 /* items: how far ahead the walk fetches records into the cache */

/* The walk's stack holds two kinds of items. A node still to expand: its CID, then (with a
 * collection filter) its subtree's key bounds, on the byte stack. An expanded node, a frame: its
 * entries kept as compressed as in the node (a key is its prefix length and suffix), each key built
 * again only when its record is emitted, so the stack costs about the bytes of the nodes on the
 * current path, never their keys spelled out (an entry of ~22 bytes can stand for a key of ~830).
 * A frame's region on the byte stack (8-byte aligned): a FrameHead, the last key built (key_cap
 * bytes), the entries (FRAME_ENTRY header, k, v, t), then the node's bounds and its left CID. */
typedef struct {
    uint64_t hash;    /* nodes: the CID's table hash (with a C table), computed when pushed */
    uint32_t off;     /* into the byte stack: a node's CID then bounds, or a frame's region */
    uint32_t cid_len; /* nodes */
    int32_t layer;    /* nodes: the expected layer, -1 for the root */
    uint32_t depth;
    uint32_t lo_len, hi_len; /* nodes, with a collection filter: the subtree's key bounds, stored after the CID */
    uint8_t is_frame;
    uint8_t bounds; /* nodes: 1 has lo, 2 has hi */
} Item;

typedef struct {
    uint32_t next;                    /* the next entry to emit (an offset in the region) */
    uint32_t end;                     /* where the entries end */
    uint32_t ahead_rec, ahead_n;      /* records fetched into the cache up to there: ahead_n entries after next */
    uint32_t key_len, key_cap;        /* the last key built (after the head) */
    uint32_t lo_off, lo_len, hi_off, hi_len; /* the node's bounds (filter only), in the region */
    uint32_t left_off, left_len;      /* the left subtree still to walk (0: none, dropped, or pushed) */
    uint32_t sub_off, sub_len;        /* the last emitted entry's subtree, next to walk (0: none) */
    int32_t child;                    /* the subtrees' layer */
    uint32_t depth;                   /* the node's depth */
    uint8_t has_lo, has_hi;
} FrameHead;

/* An entry in a frame: p (u16), k_len (u16), v_len (u32), t_len (u32, 0: no subtree or dropped),
 * the record CID's table hash (u64), then k, v and t. p and k_len are checked keys: at most 1024. */
#define FRAME_ENTRY 20
#define FRAME_ALIGN 8

typedef struct {
    uint8_t *name; /* the collection, then "/" at [len]; "0" replaces it for the range's end */
    size_t len;
} Wanted;

typedef RsNodeEntry Entry;

typedef struct {
    PyObject_HEAD
    Item *items;
    size_t n_items, cap_items;
    uint8_t *bytes;
    size_t n_bytes, cap_bytes;
    uint8_t *last; /* the last emitted key */
    size_t last_len, cap_last;
    PyObject *nodes, *values;
    RsBlockTable *table; /* nodes and values are this C table */
    int max_depth, strict, record_cids;
    PyObject *record_type; /* a tuple subclass: items are record_type(key, collection, rkey, cid, value); or NULL */
    PyObject *collection; /* the last emitted record's collection str, reused while it repeats */
    Wanted *wanted; /* with_collections: the collections, or NULL for all */
    size_t n_wanted;
    long long nodes_visited;
    PyObject *failed;
    long long records;
    long long value_bytes; /* next_batch: the bytes of the values it took (blocks before transcoding) */
    /* scratch for one node */
    Entry *entries;
    size_t cap_entries;
    uint8_t *cid;
    size_t cap_cid;
    RsKeys k; /* the key rules' state for the node being expanded */
    uint8_t *nbuf; /* the bounds of the node being expanded (copied off the stack), then a child's */
    size_t cap_nbuf;
    uint8_t *ahead; /* LAYERS_AHEAD_BYTES: the keys layers_ahead() hashes */
    int8_t layers[LAYERS_AHEAD];
    uint8_t init_called, running; /* see rs_init_twice in native.h */
    /* next_batch over the C table: the batch each emitted record is written into (else NULL) */
    RsArrowBuilder *batch;
    int value_kind;   /* 0: the raw block (binary); 1: its JSON text (utf8) */
    size_t max_bytes; /* the batch ends once its rows hold this many bytes (RsArrowBuilder.bytes) */
    size_t per_row[11]; /* the last batch's bytes per row in each buffer, x16: the next one's reserve */
    size_t row_bytes;   /* the last batch's budget bytes per row */
    PyObject *carry_pairs, *carry_items; /* next_batch over a store: the window's records not yet in a batch */
    Py_ssize_t carry_at;
} Walker;

/* --- growable buffers ------------------------------------------------------------------------- */

int rs_reserve(void **buf, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t n = *cap ? *cap : 64;
    while (n < need) {
        if (n > ((size_t)1 << 40) / elem) {
            PyErr_NoMemory();
            return -1;
        }
        n *= 2;
    }
    void *grown = PyMem_Realloc(*buf, n * elem);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *buf = grown;
    *cap = n;
    return 0;
}

/* --- errors --------------------------------------------------------------------------------- */

static int node_error(const uint8_t *cid, size_t cid_len, const char *detail) {
    return rs_raise("node_decode", "(y#s)", (const char *)cid, (Py_ssize_t)cid_len, detail);
}

/* The same, about entry j of the node: "entry <j><detail>". */
static int entry_error(const uint8_t *cid, size_t cid_len, uint64_t j, const char *detail) {
    char text[96];
    PyOS_snprintf(text, sizeof text, "entry %llu%s", (unsigned long long)j, detail);
    return node_error(cid, cid_len, text);
}

static PyObject *p_object(int neg, uint64_t p) {
    PyObject *v = PyLong_FromUnsignedLongLong(p);
    if (v == NULL || !neg) return v;
    PyObject *minus = PyNumber_Negative(v); /* -p - 1 */
    Py_DECREF(v);
    if (minus == NULL) return NULL;
    PyObject *one = PyLong_FromLong(1);
    if (one == NULL) {
        Py_DECREF(minus);
        return NULL;
    }
    PyObject *r = PyNumber_Subtract(minus, one);
    Py_DECREF(minus);
    Py_DECREF(one);
    return r;
}

/* --- strict node decoding --------------------------------------------------------------------- */

typedef struct {
    const uint8_t *p, *end;
    int strict;
} Cursor;

/* A head of the given major type; its argument in *arg. 0 ok, -1 not that (or malformed). In
 * strict mode a non-minimal head counts as malformed and sets *noncanon. */
static int expect_head(Cursor *c, int major, uint64_t *arg, int *noncanon) {
    int m, minimal;
    const uint8_t *q = c->p;
    if (rs_cbor_head(&q, c->end, &m, arg, &minimal) < 0 || m != major) return -1;
    if (!minimal && c->strict) {
        *noncanon = 1;
        return -1;
    }
    c->p = q;
    return 0;
}

/* A one-character text key; returns the character, or -1. */
static int text_key(Cursor *c, int *noncanon) {
    uint64_t n;
    if (expect_head(c, 3, &n, noncanon) < 0 || n != 1 || c->p >= c->end) return -1;
    return *c->p++;
}

/* A link: tag 42 over bytes 0x00 + CID. Sets cid and len (after the 0x00). 0 ok, -1 not a link. */
static int cbor_link(Cursor *c, const uint8_t **cid, size_t *len, int *noncanon) {
    uint64_t tag, n;
    if (expect_head(c, 6, &tag, noncanon) < 0 || tag != 42) return -1;
    if (expect_head(c, 2, &n, noncanon) < 0 || n < 2 || n > (uint64_t)(c->end - c->p) || c->p[0] != 0) return -1;
    *cid = c->p + 1;
    *len = (size_t)n - 1;
    c->p += n;
    return 0;
}

/* Decode a node block into *entries; sets *left (NULL if none). 0, or -1 with NodeDecodeError. */
int rs_decode_node(RsNodeEntry **entries_out, size_t *cap_entries, int strict, const uint8_t *cid, size_t cid_len,
                   const uint8_t *block, size_t len, const uint8_t **left, size_t *left_len, size_t *count) {
    Cursor c = {block, block + len, strict};
    int noncanon = 0;
    uint64_t n;
    const char *canon = "not canonical DAG-CBOR (minimal integers and lengths, sorted map keys, no repeated key)";
    *left = NULL;
    *left_len = 0;
    *count = 0;
    int got_e = 0, got_l = 0;
    if (expect_head(&c, 5, &n, &noncanon) < 0 || n != 2)
        return node_error(cid, cid_len, noncanon ? canon : "not a map of exactly 'e' and 'l'");
    for (int i = 0; i < 2; i++) {
        int key = text_key(&c, &noncanon);
        if (key != 'e' && key != 'l') return node_error(cid, cid_len, noncanon ? canon : "not a map of exactly 'e' and 'l'");
        if ((key == 'e' && got_e) || (key == 'l' && got_l)) return node_error(cid, cid_len, "map key 'e' or 'l' is repeated");
        if (strict && i == 0 && key != 'e') return node_error(cid, cid_len, canon);
        if (key == 'e') {
            got_e = 1;
            uint64_t entries;
            if (expect_head(&c, 4, &entries, &noncanon) < 0)
                return node_error(cid, cid_len, noncanon ? canon : "'e' is not a list");
            if (entries > (uint64_t)(c.end - c.p)) return node_error(cid, cid_len, "'e' claims more entries than there are bytes");
            for (uint64_t j = 0; j < entries; j++) {
                /* sized by the entries decoded, not by the count the node claims */
                if (rs_reserve((void **)entries_out, cap_entries, (size_t)j + 1, sizeof(Entry)) < 0) return -1;
                Entry *e = &(*entries_out)[j];
                memset(e, 0, sizeof *e);
                uint64_t fields;
                if (expect_head(&c, 5, &fields, &noncanon) < 0 || fields != 4)
                    return noncanon ? node_error(cid, cid_len, canon) : entry_error(cid, cid_len, j, " is not a map of exactly p, k, v, t");
                int seen = 0, previous = 0;
                for (int f = 0; f < 4; f++) {
                    int fk = text_key(&c, &noncanon);
                    int bit = fk == 'p' ? 1 : fk == 'k' ? 2 : fk == 'v' ? 4 : fk == 't' ? 8 : 0;
                    if (bit == 0) return noncanon ? node_error(cid, cid_len, canon) : entry_error(cid, cid_len, j, " is not a map of exactly p, k, v, t");
                    if (seen & bit) return entry_error(cid, cid_len, j, " repeats a map key");
                    if (strict && fk <= previous) return node_error(cid, cid_len, canon);
                    previous = fk;
                    seen |= bit;
                    if (fk == 'p') {
                        int m, minimal;
                        const uint8_t *q = c.p;
                        if (rs_cbor_head(&q, c.end, &m, &e->p, &minimal) < 0 || (m != 0 && m != 1))
                            return entry_error(cid, cid_len, j, ": 'p' must be an int and 'k' bytes");
                        if (!minimal && strict) return node_error(cid, cid_len, canon);
                        e->neg = m == 1;
                        c.p = q;
                    } else if (fk == 'k') {
                        uint64_t kn;
                        if (expect_head(&c, 2, &kn, &noncanon) < 0 || kn > (uint64_t)(c.end - c.p))
                            return noncanon ? node_error(cid, cid_len, canon) : entry_error(cid, cid_len, j, ": 'p' must be an int and 'k' bytes");
                        e->k = c.p;
                        e->k_len = (size_t)kn;
                        c.p += kn;
                    } else if (fk == 'v') {
                        if (cbor_link(&c, &e->v, &e->v_len, &noncanon) < 0)
                            return noncanon ? node_error(cid, cid_len, canon) : entry_error(cid, cid_len, j, ": 'v' is not a CID link");
                    } else {
                        if (c.p < c.end && *c.p == 0xf6) {
                            c.p++;
                        } else if (cbor_link(&c, &e->t, &e->t_len, &noncanon) < 0) {
                            return noncanon ? node_error(cid, cid_len, canon) : entry_error(cid, cid_len, j, ": 't' is neither a CID link nor null");
                        } else {
                            e->has_t = 1;
                        }
                    }
                }
            }
            *count = (size_t)entries;
        } else {
            got_l = 1;
            if (c.p < c.end && *c.p == 0xf6) {
                c.p++;
            } else if (cbor_link(&c, left, left_len, &noncanon) < 0) {
                return node_error(cid, cid_len, noncanon ? canon : "'l' is neither a CID link nor null");
            }
        }
    }
    if (c.p != c.end) return node_error(cid, cid_len, "bytes after the node's CBOR item");
    return 0;
}

/* --- key rules ---------------------------------------------------------------------------------- */

/* A key's MST layer from its SHA-256: leading zero bits, halved (atproto repository, "Merkle
 * Search Tree": two bits per layer). */
int rs_digest_layer(const uint8_t d[32]) {
    int zeros = 0;
    for (int i = 0; i < 32; i++) {
        if (d[i] == 0) {
            zeros += 8;
            continue;
        }
        zeros += __builtin_clz((unsigned)d[i]) - 24;
        break;
    }
    return zeros >> 1;
}

static int key_layer(const uint8_t *key, size_t len) {
    uint8_t d[32];
    rs_sha256(key, len, d);
    return rs_digest_layer(d);
}

/* The layers of entries j, j+1, ... of the node being expanded, hashed side by side into
 * w->layers[0...]: as many entries as LAYERS_AHEAD and LAYERS_AHEAD_BYTES allow, stopping
 * before one whose key expand() refuses on the way (its prefix, its length). Keys are built
 * exactly as expand() builds them, from w->k.prev (the key before entry j). Returns the index of
 * the first entry not done (j: none; expand() then hashes that one alone). */
static size_t layers_ahead(Walker *w, size_t j, size_t count) {
    if (w->ahead == NULL && (w->ahead = PyMem_Malloc(LAYERS_AHEAD_BYTES)) == NULL) return j;
    const uint8_t *data[LAYERS_AHEAD];
    size_t lens[LAYERS_AHEAD];
    const uint8_t *prev = w->k.prev;
    size_t prev_len = w->k.prev_len, used = 0, n = 0;
    for (; n < LAYERS_AHEAD && j + n < count; n++) {
        const Entry *e = &w->entries[j + n];
        if (e->neg || e->p > prev_len) break;
        size_t key_len = (size_t)e->p + e->k_len;
        if (key_len > MAX_KEY_BYTES || key_len > LAYERS_AHEAD_BYTES - used) break;
        uint8_t *key = w->ahead + used;
        if (e->p) memcpy(key, prev, (size_t)e->p);
        if (e->k_len) memcpy(key + e->p, e->k, e->k_len);
        data[n] = key;
        lens[n] = key_len;
        prev = key;
        prev_len = key_len;
        used += key_len;
    }
    uint8_t digests[LAYERS_AHEAD][32];
    rs_sha256_many(n, data, lens, digests, 0);
    for (size_t i = 0; i < n; i++) w->layers[i] = (int8_t)rs_digest_layer(digests[i]);
    return j + n;
}

static int valid_utf8(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t b = s[i];
        if (b < 0x80) {
            i++;
            continue;
        }
        size_t need;
        uint32_t cp, min;
        if (b >= 0xc2 && b <= 0xdf) {
            need = 1;
            cp = b & 0x1f;
            min = 0x80;
        } else if (b >= 0xe0 && b <= 0xef) {
            need = 2;
            cp = b & 0x0f;
            min = 0x800;
        } else if (b >= 0xf0 && b <= 0xf4) {
            need = 3;
            cp = b & 0x07;
            min = 0x10000;
        } else {
            return 0;
        }
        if (n - i - 1 < need) return 0;
        for (size_t j = 1; j <= need; j++) {
            uint8_t cb = s[i + j];
            if ((cb & 0xc0) != 0x80) return 0;
            cp = (cp << 6) | (cb & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
        i += need + 1;
    }
    return 1;
}

static inline int is_alpha(uint8_t c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static inline int is_alnum(uint8_t c) { return is_alpha(c) || (c >= '0' && c <= '9'); }

/* NSID (https://atproto.com/specs/nsid), as repo_stream.core.mst.is_valid_collection. */
static int valid_collection(const uint8_t *s, size_t n) {
    if (n == 0 || n > 317) return 0;
    size_t segments = 0, start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && s[i] != '.') continue;
        size_t len = i - start;
        if (len < 1 || len > 63) return 0;
        const uint8_t *seg = s + start;
        int last = i == n;
        if (last) { /* the name: a letter, then letters and digits */
            if (!is_alpha(seg[0])) return 0;
            for (size_t j = 1; j < len; j++)
                if (!is_alnum(seg[j])) return 0;
        } else {
            if (segments == 0 ? !is_alpha(seg[0]) : !is_alnum(seg[0])) return 0;
            if (!is_alnum(seg[len - 1])) return 0;
            for (size_t j = 1; j + 1 < len; j++)
                if (!is_alnum(seg[j]) && seg[j] != '-') return 0;
        }
        segments++;
        start = i + 1;
    }
    return segments >= 3;
}

/* The characters of a record key: A-Z a-z 0-9 . - _ : ~ */
static const uint8_t RKEY_CHARS[256] = {
    ['-'] = 1, ['.'] = 1, ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1, ['8'] = 1, ['9'] = 1,
    [':'] = 1, ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1, ['H'] = 1, ['I'] = 1, ['J'] = 1, ['K'] = 1,
    ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1, ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1,
    ['X'] = 1, ['Y'] = 1, ['Z'] = 1, ['_'] = 1, ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1,
    ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1, ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1,
    ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1, ['y'] = 1, ['z'] = 1, ['~'] = 1,
};

/* Record key (https://atproto.com/specs/record-key), as the walker's rkey pattern. */
static int valid_rkey(const uint8_t *s, size_t n) {
    if (n < 1 || n > 512) return 0;
    if ((n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.')) return 0;
    for (size_t i = 0; i < n; i++)
        if (!RKEY_CHARS[s[i]]) return 0;
    return 1;
}

/* A repo key <collection NSID>/<record key> of at most RS_MAX_KEY_BYTES bytes, as
 * repo_stream.core.mst.is_valid_key (the NSID before the only "/": a record key holds none). */
int rs_valid_key(const uint8_t *key, size_t n) {
    if (n > RS_MAX_KEY_BYTES) return 0;
    const uint8_t *slash = memchr(key, '/', n);
    if (slash == NULL) return 0;
    size_t clen = (size_t)(slash - key);
    return valid_collection(key, clen) && valid_rkey(slash + 1, n - clen - 1);
}

/* --- the key rules of a node's entries (shared with mst.c) ------------------------------------- */

void rs_keys_start(RsKeys *r, int32_t expected, int check_keys) {
    r->key_len = 0;
    r->prev_len = 0;
    r->layer = -1;
    r->expected = expected;
    r->child = expected - 1;
    r->check_keys = check_keys;
    r->has_collection = 0;
    r->collection_len = 0;
}

void rs_keys_free(RsKeys *r) {
    PyMem_Free(r->key);
    PyMem_Free(r->prev);
    r->key = r->prev = NULL;
    r->cap_key = r->cap_prev = r->key_len = r->prev_len = 0;
}

/* The key becomes the previous key (the buffers swap). */
void rs_keys_advance(RsKeys *r) {
    uint8_t *t = r->prev;
    size_t cap = r->cap_prev;
    r->prev = r->key;
    r->cap_prev = r->cap_key;
    r->prev_len = r->key_len;
    r->key = t;
    r->cap_key = cap;
    r->key_len = 0;
}

int rs_node_key(RsKeys *r, const uint8_t *cid, size_t cid_len, const RsNodeEntry *e, int known_layer) {
    size_t key_len;
    if (e->neg || e->p > r->prev_len) {
        PyObject *p = p_object(e->neg, e->p);
        if (p == NULL) return -1;
        /* before the first key the previous key is b"" (its buffer not yet made: y# of NULL is None) */
        return rs_raise("prefix_outside", "(y#Ny#)", (const char *)cid, (Py_ssize_t)cid_len, p, r->prev ? (const char *)r->prev : "",
                        (Py_ssize_t)r->prev_len);
    }
    key_len = (size_t)e->p + e->k_len;
    if (rs_reserve((void **)&r->key, &r->cap_key, key_len + 1, 1) < 0) return -1;
    if (e->p) memcpy(r->key, r->prev, (size_t)e->p);
    if (e->k_len) memcpy(r->key + e->p, e->k, e->k_len);
    r->key_len = key_len;
    const uint8_t *key = r->key;
    if (e->p < r->prev_len && e->k_len && e->k[0] == r->prev[e->p])
        return rs_raise("prefix_not_maximal", "(y#y#Ky#)", (const char *)cid, (Py_ssize_t)cid_len, (const char *)key,
                        (Py_ssize_t)key_len, (unsigned long long)e->p, (const char *)r->prev, (Py_ssize_t)r->prev_len);
    int kl = known_layer >= 0 ? known_layer : key_layer(key, key_len);
    if (kl != r->layer) {
        if (r->layer >= 0)
            return rs_raise("layer_mismatch", "(y#y#ii)", (const char *)cid, (Py_ssize_t)cid_len, (const char *)key, (Py_ssize_t)key_len,
                            kl, r->layer);
        r->layer = kl;
        if (r->expected < 0) r->child = kl - 1;
    }
    if (key_len > MAX_KEY_BYTES) return rs_raise("key_too_long", "(y#n)", (const char *)cid, (Py_ssize_t)cid_len, (Py_ssize_t)key_len);
    if (!valid_utf8(key, key_len))
        return rs_raise("key_not_utf8", "(y#y#)", (const char *)cid, (Py_ssize_t)cid_len, (const char *)key, (Py_ssize_t)key_len);
    if (r->check_keys) {
        const uint8_t *slash = memchr(key, '/', key_len);
        size_t clen = slash ? (size_t)(slash - key) : key_len;
        if (!(r->has_collection && clen == r->collection_len && memcmp(key, r->collection, clen) == 0)) {
            if (!(slash && valid_collection(key, clen)))
                return rs_raise("invalid_key", "(y#s#)", (const char *)cid, (Py_ssize_t)cid_len, (const char *)key, (Py_ssize_t)key_len);
            memcpy(r->collection, key, clen); /* valid: at most 317 bytes */
            r->collection_len = clen;
            r->has_collection = 1;
        }
        const uint8_t *rkey = slash ? slash + 1 : key + key_len;
        if (!valid_rkey(rkey, (size_t)(key + key_len - rkey)))
            return rs_raise("invalid_key", "(y#s#)", (const char *)cid, (Py_ssize_t)cid_len, (const char *)key, (Py_ssize_t)key_len);
    }
    if (e->has_t && r->child < 0)
        return rs_raise("subtree_at_layer0", "(y#s#)", (const char *)cid, (Py_ssize_t)cid_len, (const char *)key, (Py_ssize_t)key_len);
    return 0;
}

/* --- the stack ---------------------------------------------------------------------------------- */

/* Push a node item: its CID and (flags in `bounds`) its bounds, copied from anywhere but the byte
 * stack (which may move). 0, or -1 with an error. */
static int push_node(Walker *w, const uint8_t *cid, size_t cid_len, int32_t layer, uint32_t depth, const uint8_t *lo,
                     size_t lo_len, const uint8_t *hi, size_t hi_len, int bounds) {
    size_t need = cid_len + lo_len + hi_len;
    if (w->n_bytes + need > UINT32_MAX) {
        PyErr_NoMemory();
        return -1;
    }
    if (rs_reserve((void **)&w->items, &w->cap_items, w->n_items + 1, sizeof(Item)) < 0 ||
        rs_reserve((void **)&w->bytes, &w->cap_bytes, w->n_bytes + need + 1, 1) < 0)
        return -1;
    Item it = {0};
    it.off = (uint32_t)w->n_bytes;
    it.cid_len = (uint32_t)cid_len;
    it.layer = layer;
    it.depth = depth;
    it.lo_len = (uint32_t)lo_len;
    it.hi_len = (uint32_t)hi_len;
    it.bounds = (uint8_t)bounds;
    uint8_t *to = w->bytes + w->n_bytes;
    memcpy(to, cid, cid_len);
    if (lo_len) memcpy(to + cid_len, lo, lo_len);
    if (hi_len) memcpy(to + cid_len + lo_len, hi, hi_len);
    /* start fetching the node's table slot now: the look-up overlaps what comes before it */
    if (w->table) it.hash = rs_table_hash(w->table, cid, cid_len);
    w->n_bytes += need;
    w->items[w->n_items++] = it;
    return 0;
}

/* A frame entry's fields. */
static inline void entry_at(const uint8_t *e, size_t *p, size_t *k_len, size_t *v_len, size_t *t_len, uint64_t *hash) {
    uint16_t p16, k16;
    uint32_t v32, t32;
    memcpy(&p16, e, 2);
    memcpy(&k16, e + 2, 2);
    memcpy(&v32, e + 4, 4);
    memcpy(&t32, e + 8, 4);
    memcpy(hash, e + 12, 8);
    *p = p16, *k_len = k16, *v_len = v32, *t_len = t32;
}

static inline size_t entry_size(const uint8_t *e) {
    size_t p, k, v, t;
    uint64_t h;
    entry_at(e, &p, &k, &v, &t, &h);
    return FRAME_ENTRY + k + v + t;
}

/* --- with_collections ------------------------------------------------------------------------ */

static int bytes_cmp(const uint8_t *a, size_t an, const uint8_t *b, size_t bn) {
    int c = memcmp(a, b, an < bn ? an : bn);
    if (c) return c;
    return an < bn ? -1 : an > bn ? 1 : 0;
}

/* Whether keys strictly between lo and hi (each absent or present) can belong to a wanted
 * collection C: its keys run from C + "/" up to C + "0". Always true without a filter. */
static int may_hold(Walker *w, const uint8_t *lo, size_t lo_len, int has_lo, const uint8_t *hi, size_t hi_len, int has_hi) {
    if (w->wanted == NULL) return 1;
    for (size_t i = 0; i < w->n_wanted; i++) {
        Wanted *c = &w->wanted[i];
        c->name[c->len] = '/';
        int ok_hi = !has_hi || bytes_cmp(hi, hi_len, c->name, c->len + 1) > 0;
        c->name[c->len] = '0';
        int ok_lo = !has_lo || bytes_cmp(lo, lo_len, c->name, c->len + 1) < 0;
        if (ok_hi && ok_lo) return 1;
    }
    return 0;
}

static int wanted_key(Walker *w, const uint8_t *key, size_t key_len) {
    if (w->wanted == NULL) return 1;
    const uint8_t *slash = memchr(key, '/', key_len);
    size_t n = slash ? (size_t)(slash - key) : key_len;
    for (size_t i = 0; i < w->n_wanted; i++)
        if (w->wanted[i].len == n && memcmp(w->wanted[i].name, key, n) == 0) return 1;
    return 0;
}

static int add_subtree(PyObject *subtrees, const uint8_t *cid, size_t len) {
    if (subtrees == NULL) return 0;
    PyObject *b = PyBytes_FromStringAndSize((const char *)cid, (Py_ssize_t)len);
    if (b == NULL || PyList_Append(subtrees, b) < 0) {
        Py_XDECREF(b);
        return -1;
    }
    Py_DECREF(b);
    return 0;
}

/* --- expanding one node ---------------------------------------------------------------------- */

/* Decode a node, check its rules, push its items; collect its subtree CIDs into `subtrees` (a
 * list, or NULL). 0, or -1 with an error. */
typedef struct {
    const uint8_t *lo, *hi;
    size_t lo_len, hi_len;
    int has_lo, has_hi;
} Bounds;

static int expand(Walker *w, const uint8_t *cid, size_t cid_len, const uint8_t *block, size_t len, int32_t expected,
                  uint32_t depth, Bounds nb, PyObject *subtrees) {
    const uint8_t *left;
    size_t left_len, count;
    if (rs_decode_node(&w->entries, &w->cap_entries, w->strict, cid, cid_len, block, len, &left, &left_len, &count) < 0) return -1;
    int is_root = expected < 0;
    if (count == 0) {
        if (left == NULL) {
            if (is_root) return 0; /* the empty repo */
            return rs_raise("empty_node", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
        }
        if (is_root) return rs_raise("empty_root", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
        if (expected == 0) return rs_raise("left_at_layer0", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
        if (!may_hold(w, nb.lo, nb.lo_len, nb.has_lo, nb.hi, nb.hi_len, nb.has_hi)) return 0;
        if (add_subtree(subtrees, left, left_len) < 0) return -1;
        return push_node(w, left, left_len, expected - 1, depth + 1, nb.lo, nb.lo_len, nb.hi, nb.hi_len,
                         (nb.has_lo ? 1 : 0) | (nb.has_hi ? 2 : 0));
    }
    RsKeys *r = &w->k;
    rs_keys_start(r, expected, 1);
    size_t key_cap = 1, entry_bytes = 0;
    /* entries [ahead_from, ahead_to) have their layers in w->layers, hashed side by side */
    size_t ahead_from = 0, ahead_to = 0;
    int many = rs_sha256_lanes() > 1;
    for (size_t j = 0; j < count; j++) {
        if (many && j >= ahead_to && count - j >= 3) {
            ahead_from = j;
            ahead_to = layers_ahead(w, j, count);
        }
        Entry *e = &w->entries[j];
        if (rs_node_key(r, cid, cid_len, e, j < ahead_to ? w->layers[j - ahead_from] : -1) < 0) return -1;
        /* with a filter, the previous entry's subtree lies between the previous key and this one */
        if (j > 0 && w->entries[j - 1].has_t && !may_hold(w, r->prev, r->prev_len, 1, r->key, r->key_len, 1)) w->entries[j - 1].has_t = 0;
        if (r->key_len > key_cap) key_cap = r->key_len;
        rs_keys_advance(r);
    }
    int layer = r->layer;
    int32_t child = r->child;
    if (layer != expected && !is_root) return rs_raise("wrong_layer", "(y#ii)", (const char *)cid, (Py_ssize_t)cid_len, layer, (int)expected);
    if (left != NULL && child < 0) return rs_raise("left_at_layer0", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
    Entry *final = &w->entries[count - 1];
    if (final->has_t && !may_hold(w, r->prev, r->prev_len, 1, nb.hi, nb.hi_len, nb.has_hi)) final->has_t = 0;
    /* the first key is the first entry's k (its p is 0: nothing comes before it) */
    int keep_left = left != NULL && may_hold(w, nb.lo, nb.lo_len, nb.has_lo, w->entries[0].k, w->entries[0].k_len, 1);
    for (size_t j = 0; j < count; j++) {
        Entry *e = &w->entries[j];
        entry_bytes += FRAME_ENTRY + e->k_len + e->v_len + (e->has_t ? e->t_len : 0);
        if (e->has_t && add_subtree(subtrees, e->t, e->t_len) < 0) return -1;
    }
    if (keep_left && add_subtree(subtrees, left, left_len) < 0) return -1;

    /* The frame: head, key buffer, entries, bounds, left CID. */
    size_t start = (w->n_bytes + FRAME_ALIGN - 1) & ~(size_t)(FRAME_ALIGN - 1);
    size_t size = sizeof(FrameHead) + key_cap + entry_bytes + nb.lo_len + nb.hi_len + (keep_left ? left_len : 0);
    if (start + size > UINT32_MAX) {
        PyErr_NoMemory();
        return -1;
    }
    if (rs_reserve((void **)&w->items, &w->cap_items, w->n_items + 1, sizeof(Item)) < 0 ||
        rs_reserve((void **)&w->bytes, &w->cap_bytes, start + size, 1) < 0)
        return -1;
    uint8_t *region = w->bytes + start;
    FrameHead *f = (FrameHead *)region;
    memset(f, 0, sizeof *f);
    size_t at = sizeof(FrameHead) + key_cap;
    f->key_cap = (uint32_t)key_cap;
    f->next = (uint32_t)at;
    for (size_t j = 0; j < count; j++) {
        Entry *e = &w->entries[j];
        uint16_t p16 = (uint16_t)e->p, k16 = (uint16_t)e->k_len;
        uint32_t v32 = (uint32_t)e->v_len, t32 = e->has_t ? (uint32_t)e->t_len : 0;
        uint64_t hash = w->table ? rs_table_hash(w->table, e->v, e->v_len) : 0;
        uint8_t *to = region + at;
        memcpy(to, &p16, 2);
        memcpy(to + 2, &k16, 2);
        memcpy(to + 4, &v32, 4);
        memcpy(to + 8, &t32, 4);
        memcpy(to + 12, &hash, 8);
        to += FRAME_ENTRY;
        if (e->k_len) memcpy(to, e->k, e->k_len);
        memcpy(to + e->k_len, e->v, e->v_len);
        if (t32) memcpy(to + e->k_len + e->v_len, e->t, t32);
        at += FRAME_ENTRY + e->k_len + e->v_len + t32;
    }
    f->end = (uint32_t)at;
    f->ahead_rec = f->next;
    if (nb.has_lo) {
        f->has_lo = 1;
        f->lo_off = (uint32_t)at;
        f->lo_len = (uint32_t)nb.lo_len;
        if (nb.lo_len) memcpy(region + at, nb.lo, nb.lo_len);
        at += nb.lo_len;
    }
    if (nb.has_hi) {
        f->has_hi = 1;
        f->hi_off = (uint32_t)at;
        f->hi_len = (uint32_t)nb.hi_len;
        if (nb.hi_len) memcpy(region + at, nb.hi, nb.hi_len);
        at += nb.hi_len;
    }
    if (keep_left) {
        f->left_off = (uint32_t)at;
        f->left_len = (uint32_t)left_len;
        memcpy(region + at, left, left_len);
    }
    f->child = child;
    f->depth = depth;
    Item it = {0};
    it.off = (uint32_t)start;
    it.is_frame = 1;
    w->items[w->n_items++] = it;
    w->n_bytes = start + size;
    return 0;
}

/* --- emitting ----------------------------------------------------------------------------------- */

/* record_type(key, collection, rkey, cid text or None, value), as repo_stream.core.blocks.make_item
 * makes it: the key split at its first '/' (keys are checked to have one). The collection str is
 * the previous record's while it repeats (records come in key order, so collection by
 * collection). Steals `k` and `value`; NULL with an error set. */
static PyObject *record_item(Walker *w, PyObject *k, const uint8_t *key, size_t key_len, const uint8_t *cid,
                             size_t cid_len, PyObject *value) {
    PyObject *coll = NULL, *rkey = NULL, *text = NULL, *item = NULL;
    const uint8_t *slash = memchr(key, '/', key_len);
    size_t clen = slash ? (size_t)(slash - key) : key_len;
    const uint8_t *rest = slash ? slash + 1 : key + key_len;
    Py_ssize_t prev_len = w->collection ? PyUnicode_GET_LENGTH(w->collection) : -1;
    /* keys are valid UTF-8 and collections ASCII (NSIDs), so lengths in code points are bytes */
    if (prev_len == (Py_ssize_t)clen && PyUnicode_IS_ASCII(w->collection) &&
        memcmp(PyUnicode_DATA(w->collection), key, clen) == 0) {
        coll = Py_NewRef(w->collection);
    } else {
        coll = PyUnicode_FromStringAndSize((const char *)key, (Py_ssize_t)clen);
        if (coll == NULL) goto error;
        Py_XSETREF(w->collection, Py_NewRef(coll));
    }
    rkey = PyUnicode_FromStringAndSize((const char *)rest, (Py_ssize_t)(key + key_len - rest));
    if (rkey == NULL) goto error;
    text = w->record_cids ? rs_cid_text_of(cid, cid_len) : Py_NewRef(Py_None);
    if (text == NULL) goto error;
    PyTypeObject *type = (PyTypeObject *)w->record_type;
    item = type->tp_alloc(type, 5);
    if (item == NULL) goto error;
    PyTuple_SET_ITEM(item, 0, k);
    PyTuple_SET_ITEM(item, 1, coll);
    PyTuple_SET_ITEM(item, 2, rkey);
    PyTuple_SET_ITEM(item, 3, text);
    PyTuple_SET_ITEM(item, 4, value);
    return item;
error:
    Py_DECREF(k);
    Py_DECREF(value);
    Py_XDECREF(coll);
    Py_XDECREF(rkey);
    Py_XDECREF(text);
    return NULL;
}

/* The item for one record, resolved in the C table: 1 (appended), 0 (failed: *error set to the
 * exception to raise after the walk part), -1 (an error to raise now). */
static int emit_resolved(Walker *w, PyObject *out, const uint8_t *key, size_t key_len, const uint8_t *cid,
                         size_t cid_len, uint64_t hash, PyObject **error) {
    const uint8_t *data = NULL;
    size_t len = 0;
    PyObject *value = NULL;
    int kind = rs_table_get_hashed(w->table, cid, cid_len, hash, &data, &len, &value);
    if (kind == 0) {
        rs_raise("missing_record", "(y#s#)", (const char *)cid, (Py_ssize_t)cid_len, (const char *)key, (Py_ssize_t)key_len);
        goto failed;
    }
    if (kind == 2) {
        Py_INCREF(value);
    } else {
        value = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)len);
        if (value == NULL) return -1;
        PyObject *process = rs_table_process(w->table);
        if (process == rs_len) {
            Py_DECREF(value);
            value = PyLong_FromSize_t(len);
            if (value == NULL) return -1;
        } else if (process != NULL && process != Py_None) {
            PyObject *processed = PyObject_CallOneArg(process, value);
            Py_DECREF(value);
            if (processed == NULL) {
                if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
                PyObject *type, *exc, *tb;
                PyErr_Fetch(&type, &exc, &tb);
                PyErr_NormalizeException(&type, &exc, &tb);
                if (tb) PyException_SetTraceback(exc, tb);
                Py_XDECREF(type);
                Py_XDECREF(tb);
                rs_raise("processor_failed", "(s#y#N)", (const char *)key, (Py_ssize_t)key_len, (const char *)cid,
                         (Py_ssize_t)cid_len, exc);
                goto failed;
            }
            value = processed;
        }
    }
    PyObject *k = PyUnicode_FromStringAndSize((const char *)key, (Py_ssize_t)key_len);
    if (k == NULL) {
        Py_DECREF(value);
        return -1;
    }
    PyObject *item;
    if (w->record_type != NULL) {
        item = record_item(w, k, key, key_len, cid, cid_len, value); /* steals k and value */
        if (item == NULL) return -1;
    } else if (w->record_cids) {
        PyObject *text = rs_cid_text_of(cid, cid_len);
        if (text == NULL) {
            Py_DECREF(k);
            Py_DECREF(value);
            return -1;
        }
        item = PyTuple_New(3);
        if (item == NULL) {
            Py_DECREF(k);
            Py_DECREF(text);
            Py_DECREF(value);
            return -1;
        }
        PyTuple_SET_ITEM(item, 0, k);
        PyTuple_SET_ITEM(item, 1, text);
        PyTuple_SET_ITEM(item, 2, value);
    } else {
        item = PyTuple_New(2);
        if (item == NULL) {
            Py_DECREF(k);
            Py_DECREF(value);
            return -1;
        }
        PyTuple_SET_ITEM(item, 0, k);
        PyTuple_SET_ITEM(item, 1, value);
    }
    /* Like CPython's own lazy untracking: a tuple of a str, a str and an atom cannot be in a cycle,
     * so the cyclic GC need not visit the chunk's items again and again. */
    if (!PyObject_IS_GC(PyTuple_GET_ITEM(item, PyTuple_GET_SIZE(item) - 1)) ||
        !PyObject_GC_IsTracked(PyTuple_GET_ITEM(item, PyTuple_GET_SIZE(item) - 1)))
        PyObject_GC_UnTrack(item);
    int r = PyList_Append(out, item);
    Py_DECREF(item);
    return r < 0 ? -1 : 1;
failed: {
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (exc == NULL) return -1;
    if (tb) PyException_SetTraceback(exc, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    *error = exc;
    return 0;
}
}

/* --- emitting into an Arrow batch --------------------------------------------------------------- */

/* The TypeError of a value a batch cannot hold (as repo_stream.core.walk.Walker.next_batch's). */
static int value_type_error(const uint8_t *key, size_t key_len, PyObject *value, int value_kind) {
    PyObject *k = PyUnicode_FromStringAndSize((const char *)key, (Py_ssize_t)key_len);
    if (k == NULL) return -1;
    PyErr_Format(PyExc_TypeError, "next_batch: the value of record %R is %s, not %s", k, Py_TYPE(value)->tp_name,
                 value_kind ? "str or bytes" : "bytes");
    Py_DECREF(k);
    return -1;
}

/* The current error, raised as ProcessorError(key, cid, error) if it is an Exception. Returns -1. */
static int processor_failed(const uint8_t *key, size_t key_len, const uint8_t *cid, size_t cid_len) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (exc == NULL) return -1;
    if (tb) PyException_SetTraceback(exc, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return rs_raise("processor_failed", "(s#y#N)", (const char *)key, (Py_ssize_t)key_len, (const char *)cid,
                    (Py_ssize_t)cid_len, exc);
}

/* A record's value into the batch (its key and CID, or its line's head, are in): bytes are the
 * raw block, or with value_kind 1 or 2 transcoded to JSON text (a failure: ProcessorError, as the
 * transcoder as a block processor gives); a str is JSON text. 0, or -1 with an error. */
static int batch_value(Walker *w, const uint8_t *key, size_t key_len, const uint8_t *cid, size_t cid_len,
                       const uint8_t *data, size_t len, PyObject *value) {
    RsArrowBuilder *b = w->batch;
    PyObject *utf8 = NULL;
    int is_text = 0;
    if (value != NULL) {
        if (w->value_kind >= 1 && PyUnicode_CheckExact(value)) {
            is_text = 1;
            if (PyUnicode_IS_ASCII(value)) { /* compact ASCII: its characters are its UTF-8 */
                data = PyUnicode_DATA(value);
                len = (size_t)PyUnicode_GET_LENGTH(value);
            } else { /* not PyUnicode_AsUTF8AndSize: that keeps a UTF-8 copy inside the table's str */
                utf8 = PyUnicode_AsUTF8String(value);
                if (utf8 == NULL) return -1;
                data = (const uint8_t *)PyBytes_AS_STRING(utf8);
                len = (size_t)PyBytes_GET_SIZE(utf8);
            }
        } else if (!PyBytes_CheckExact(value)) {
            return value_type_error(key, key_len, value, w->value_kind);
        } else {
            data = (const uint8_t *)PyBytes_AS_STRING(value);
            len = (size_t)PyBytes_GET_SIZE(value);
        }
    }
    int r;
    if (w->value_kind == 0 || is_text) {
        r = rs_arrow_grow(b, RS_ARROW_VALUE, len);
        if (r == 0 && len) {
            memcpy(b->buf[RS_ARROW_VALUE].data + b->buf[RS_ARROW_VALUE].len, data, len);
            b->buf[RS_ARROW_VALUE].len += len;
        }
    } else if ((r = rs_json_into(b, data, len)) < 0) {
        r = processor_failed(key, key_len, cid, cid_len);
    }
    Py_XDECREF(utf8);
    if (r < 0) return -1;
    w->value_bytes += (long long)len;
    return w->value_kind == 2 ? rs_arrow_line_done(b) : rs_arrow_value_done(b);
}

/* The record's key and CID into the batch: its columns, or its JSON line's head. */
static int batch_head(Walker *w, const uint8_t *key, size_t key_len, const uint8_t *cid, size_t cid_len) {
    if (w->value_kind != 2) {
        if (rs_arrow_key(w->batch, key, key_len) < 0) return -1;
        return rs_arrow_cid(w->batch, cid, cid_len);
    }
    char text[RS_CID_TEXT_MAX];
    size_t n = rs_cid_b32(text, cid, cid_len);
    if (n > 0) return rs_arrow_line_head(w->batch, key, key_len, text, n);
    PyObject *other = rs_cid_text_of(cid, cid_len);
    if (other == NULL) return -1;
    Py_ssize_t len;
    const char *s = PyUnicode_AsUTF8AndSize(other, &len);
    int r = s == NULL ? -1 : rs_arrow_line_head(w->batch, key, key_len, s, (size_t)len);
    Py_DECREF(other);
    return r;
}

/* One record, resolved in the C table, into the batch: 0, or -1 with an error (raised at once:
 * a batch's errors come in record order). */
static int emit_arrow(Walker *w, const uint8_t *key, size_t key_len, const uint8_t *cid, size_t cid_len, uint64_t hash) {
    const uint8_t *data = NULL;
    size_t len = 0;
    PyObject *value = NULL, *made = NULL;
    int kind = rs_table_get_hashed(w->table, cid, cid_len, hash, &data, &len, &value);
    if (kind == 0)
        return rs_raise("missing_record", "(y#s#)", (const char *)cid, (Py_ssize_t)cid_len, (const char *)key, (Py_ssize_t)key_len);
    PyObject *process = rs_table_process(w->table);
    if (kind == 1 && process != NULL && process != Py_None) { /* kept raw (node-shaped): processed now */
        PyObject *raw = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)len);
        if (raw == NULL) return -1;
        made = PyObject_CallOneArg(process, raw);
        Py_DECREF(raw);
        if (made == NULL) return processor_failed(key, key_len, cid, cid_len);
        value = made;
    }
    int r = -1;
    if (batch_head(w, key, key_len, cid, cid_len) == 0) r = batch_value(w, key, key_len, cid, cid_len, data, len, value);
    Py_XDECREF(made);
    return r;
}

/* Walk until n records (or the end); the items (or pairs) in `out`. 0, or -1 with an error. */
static int step(Walker *w, Py_ssize_t n, PyObject *out, PyObject **deferred) {
    int in_table = w->table != NULL;
    PyObject *prefetch = NULL;
    if (!in_table) {
        prefetch = PyObject_GetAttrString(w->nodes, "prefetch");
        if (prefetch == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
            PyErr_Clear();
        }
    }
    int status = 0;
    while (w->n_items > 0 && (w->batch ? w->batch->n < n && w->batch->bytes < w->max_bytes : PyList_GET_SIZE(out) < n)) {
        Item *top = &w->items[w->n_items - 1];
        if (top->is_frame) {
            size_t base = top->off;
            FrameHead *f = (FrameHead *)(w->bytes + base);
            if (f->left_len) { /* walked first: between the node's lower bound and its first key */
                const uint8_t *first = w->bytes + base + f->next + FRAME_ENTRY;
                size_t p, k_len, v_len, t_len;
                uint64_t h;
                entry_at(w->bytes + base + f->next, &p, &k_len, &v_len, &t_len, &h);
                /* copied off the stack first: pushing may move it */
                size_t need = f->left_len + f->lo_len + k_len;
                if (rs_reserve((void **)&w->nbuf, &w->cap_nbuf, need + 1, 1) < 0) {
                    status = -1;
                    break;
                }
                memcpy(w->nbuf, w->bytes + base + f->left_off, f->left_len);
                if (f->lo_len) memcpy(w->nbuf + f->left_len, w->bytes + base + f->lo_off, f->lo_len);
                if (k_len) memcpy(w->nbuf + f->left_len + f->lo_len, first, k_len);
                size_t left_len = f->left_len, lo_len = f->lo_len;
                int bounds = (f->has_lo ? 1 : 0) | 2;
                int32_t child = f->child;
                uint32_t depth = f->depth;
                f->left_len = 0;
                if (push_node(w, w->nbuf, left_len, child, depth + 1, w->nbuf + left_len, w->wanted ? lo_len : 0,
                              w->nbuf + left_len + lo_len, w->wanted ? k_len : 0, w->wanted ? bounds : 0) < 0) {
                    status = -1;
                    break;
                }
                continue;
            }
            uint8_t *key = w->bytes + base + sizeof(FrameHead);
            if (f->sub_len) { /* the last record's subtree: between its key and the next */
                size_t sub_len = f->sub_len, key_len = f->key_len, hi_len = 0;
                int has_hi = 0;
                size_t need = sub_len + key_len + MAX_KEY_BYTES + f->hi_len;
                if (rs_reserve((void **)&w->nbuf, &w->cap_nbuf, need + 1, 1) < 0) {
                    status = -1;
                    break;
                }
                f = (FrameHead *)(w->bytes + base);
                memcpy(w->nbuf, w->bytes + base + f->sub_off, sub_len);
                memcpy(w->nbuf + sub_len, key, key_len);
                uint8_t *hi = w->nbuf + sub_len + key_len;
                if (f->next < f->end) { /* the next key: this one's first p bytes, then its k */
                    size_t p, k_len, v_len, t_len;
                    uint64_t h;
                    entry_at(w->bytes + base + f->next, &p, &k_len, &v_len, &t_len, &h);
                    memcpy(hi, key, p);
                    if (k_len) memcpy(hi + p, w->bytes + base + f->next + FRAME_ENTRY, k_len);
                    hi_len = p + k_len;
                    has_hi = 1;
                } else if (f->has_hi) {
                    if (f->hi_len) memcpy(hi, w->bytes + base + f->hi_off, f->hi_len);
                    hi_len = f->hi_len;
                    has_hi = 1;
                }
                int32_t child = f->child;
                uint32_t depth = f->depth;
                f->sub_len = 0;
                if (f->next >= f->end) { /* the frame is done: the subtree takes its place */
                    w->n_items--;
                    w->n_bytes = base;
                }
                if (push_node(w, w->nbuf, sub_len, child, depth + 1, w->nbuf + sub_len, w->wanted ? key_len : 0, hi,
                              w->wanted ? hi_len : 0, w->wanted ? (1 | (has_hi ? 2 : 0)) : 0) < 0) {
                    status = -1;
                    break;
                }
                continue;
            }
            /* the next record: its key is the last key's first p bytes, then its k */
            const uint8_t *e = w->bytes + base + f->next;
            size_t p, k_len, v_len, t_len;
            uint64_t hash;
            entry_at(e, &p, &k_len, &v_len, &t_len, &hash);
            if (k_len) memcpy(key + p, e + FRAME_ENTRY, k_len);
            size_t key_len = p + k_len;
            f->key_len = (uint32_t)key_len;
            const uint8_t *cid = e + FRAME_ENTRY + k_len;
            if (t_len) {
                f->sub_off = (uint32_t)(f->next + FRAME_ENTRY + k_len + v_len);
                f->sub_len = (uint32_t)t_len;
            }
            f->next += (uint32_t)(FRAME_ENTRY + k_len + v_len + t_len);
            if (in_table) { /* fetch the records a few entries on into the cache (their slots were, at expand) */
                if (f->ahead_n > 0) f->ahead_n--;
                if (f->ahead_rec < f->next) f->ahead_rec = f->next, f->ahead_n = 0;
                while (f->ahead_n < RECORD_AHEAD && f->ahead_rec < f->end) {
                    uint64_t h;
                    memcpy(&h, w->bytes + base + f->ahead_rec + 12, 8);
                    rs_table_prefetch_record(w->table, h);
                    f->ahead_rec += (uint32_t)entry_size(w->bytes + base + f->ahead_rec);
                    f->ahead_n++;
                }
            }
            size_t common = key_len < w->last_len ? key_len : w->last_len;
            int cmp = memcmp(key, w->last, common);
            if (cmp < 0 || (cmp == 0 && key_len <= w->last_len)) {
                status = rs_raise("key_order", "(s#s#)", (const char *)key, (Py_ssize_t)key_len, (const char *)w->last,
                                  (Py_ssize_t)w->last_len);
                break;
            }
            if (!wanted_key(w, key, key_len)) {
                /* not a wanted collection: checked for order, not emitted */
            } else if (in_table && w->values == (PyObject *)w->table && w->batch != NULL) {
                if (emit_arrow(w, key, key_len, cid, v_len, hash) < 0) {
                    status = -1;
                    break;
                }
            } else if (in_table && w->values == (PyObject *)w->table) {
                /* After a record fails to resolve, the walk part still runs to n records (its own
                 * errors come first, as in the reference); placeholders keep the count. */
                int got = *deferred == NULL ? emit_resolved(w, out, key, key_len, cid, v_len, hash, deferred) : 0;
                if (got < 0 || (got == 0 && PyList_Append(out, Py_None) < 0)) {
                    status = -1;
                    break;
                }
            } else {
                PyObject *pair = Py_BuildValue("(s#y#)", (const char *)key, (Py_ssize_t)key_len, (const char *)cid,
                                               (Py_ssize_t)v_len);
                if (pair == NULL || PyList_Append(out, pair) < 0) {
                    Py_XDECREF(pair);
                    status = -1;
                    break;
                }
                Py_DECREF(pair);
            }
            /* the frame's bytes may have moved (a processor can allocate; the stack does not) */
            f = (FrameHead *)(w->bytes + base);
            key = w->bytes + base + sizeof(FrameHead);
            if (rs_reserve((void **)&w->last, &w->cap_last, key_len + 1, 1) < 0) {
                status = -1;
                break;
            }
            memcpy(w->last, key, key_len);
            w->last_len = key_len;
            if (f->sub_len == 0 && f->next >= f->end) { /* done */
                w->n_items--;
                w->n_bytes = base;
            }
            continue;
        }
        Item it = w->items[--w->n_items];
        /* a node: copy its CID out of the byte stack, which may move while children are pushed */
        if (rs_reserve((void **)&w->cid, &w->cap_cid, (size_t)it.cid_len + 1, 1) < 0) {
            status = -1;
            break;
        }
        memcpy(w->cid, w->bytes + it.off, it.cid_len);
        const uint8_t *cid = w->cid;
        size_t cid_len = it.cid_len;
        /* the subtree's bounds, copied off the byte stack: the node's frame takes its place there */
        if (rs_reserve((void **)&w->nbuf, &w->cap_nbuf, (size_t)it.lo_len + it.hi_len + 1, 1) < 0) {
            status = -1;
            break;
        }
        memcpy(w->nbuf, w->bytes + it.off + it.cid_len, (size_t)it.lo_len + it.hi_len);
        w->n_bytes = it.off;
        Bounds nb = {w->nbuf, w->nbuf + it.lo_len, it.lo_len, it.hi_len, it.bounds & 1, (it.bounds & 2) != 0};
        if ((int64_t)it.depth > (int64_t)w->max_depth) {
            status = rs_raise("depth_limit", "(y#Ii)", (const char *)cid, (Py_ssize_t)cid_len, (unsigned int)it.depth, w->max_depth);
            break;
        }
        if (cid_len < 2 || cid[0] != 0x01 || cid[1] != 0x71) {
            status = rs_raise("node_link_codec", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
            break;
        }
        if (in_table) {
            const uint8_t *data = NULL;
            size_t len = 0;
            PyObject *value = NULL;
            int kind = rs_table_get_hashed(w->table, cid, cid_len, it.hash, &data, &len, &value);
            if (kind == 0) {
                status = rs_raise("missing_node", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
                break;
            }
            if (kind == 2) {
                status = rs_raise("not_a_node", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
                break;
            }
            w->nodes_visited += 1;
            if (expand(w, cid, cid_len, data, len, it.layer, it.depth, nb, NULL) < 0) {
                status = -1;
                break;
            }
        } else {
            PyObject *block = PyObject_CallMethod(w->nodes, "node", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
            if (block == NULL) {
                status = -1;
                break;
            }
            if (block == Py_None) {
                Py_DECREF(block);
                status = rs_raise("missing_node", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
                break;
            }
            if (block == rs_not_a_node || !PyBytes_Check(block)) {
                Py_DECREF(block);
                status = rs_raise("not_a_node", "(y#)", (const char *)cid, (Py_ssize_t)cid_len);
                break;
            }
            PyObject *subtrees = prefetch ? PyList_New(0) : NULL;
            if (prefetch && subtrees == NULL) {
                Py_DECREF(block);
                status = -1;
                break;
            }
            w->nodes_visited += 1;
            int r = expand(w, cid, cid_len, (const uint8_t *)PyBytes_AS_STRING(block), (size_t)PyBytes_GET_SIZE(block),
                           it.layer, it.depth, nb, subtrees);
            Py_DECREF(block);
            if (r == 0 && subtrees && PyList_GET_SIZE(subtrees) > 0) {
                PyObject *done = PyObject_CallOneArg(prefetch, subtrees);
                if (done == NULL) r = -1;
                Py_XDECREF(done);
            }
            Py_XDECREF(subtrees);
            if (r < 0) {
                status = -1;
                break;
            }
        }
    }
    Py_XDECREF(prefetch);
    return status;
}

/* --- the type ---------------------------------------------------------------------------------- */

static int Walker_init(Walker *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"root", "nodes", "values", "max_depth", "strict", "record_cids", "collections", "record_type", NULL};
    Py_buffer root;
    PyObject *nodes, *values = Py_None, *collections = Py_None, *record_type = Py_None;
    int max_depth = 32, strict = 0, record_cids = 0;
    if (self->init_called) return rs_init_twice("Walker");
    self->init_called = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*O|O$ippOO", names, &root, &nodes, &values, &max_depth, &strict,
                                     &record_cids, &collections, &record_type))
        return -1;
    if (record_type != Py_None && !(PyType_Check(record_type) && PyType_IsSubtype((PyTypeObject *)record_type, &PyTuple_Type))) {
        PyBuffer_Release(&root);
        PyErr_SetString(PyExc_TypeError, "record_type must be a tuple subclass (a NamedTuple of five fields) or None");
        return -1;
    }
    if (PyObject_TypeCheck(nodes, &RsBlockTable_Type) && rs_table_enter((RsBlockTable *)nodes) < 0) {
        PyBuffer_Release(&root); /* not initialised: refused now, not when walked */
        return -1;
    }
    if (PyObject_TypeCheck(nodes, &RsBlockTable_Type)) rs_table_leave((RsBlockTable *)nodes);
    if (collections != Py_None) {
        PyObject *seq = PySequence_Fast(collections, "collections must be an iterable of str");
        if (seq == NULL) {
            PyBuffer_Release(&root);
            return -1;
        }
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        self->wanted = PyMem_Calloc((size_t)n + 1, sizeof(Wanted));
        if (self->wanted == NULL) {
            Py_DECREF(seq);
            PyBuffer_Release(&root);
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t len;
            const char *name = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(seq, i), &len);
            uint8_t *copy = name ? PyMem_Malloc((size_t)len + 1) : NULL;
            if (copy == NULL) {
                Py_DECREF(seq);
                PyBuffer_Release(&root);
                if (!PyErr_Occurred()) PyErr_NoMemory();
                return -1;
            }
            memcpy(copy, name, (size_t)len);
            self->wanted[self->n_wanted].name = copy;
            self->wanted[self->n_wanted].len = (size_t)len;
            self->n_wanted++;
        }
        Py_DECREF(seq);
    }
    /* the scratch key buffers are never NULL, so an empty one is b"" / "" in messages */
    if (root.len > UINT32_MAX / 4 || rs_reserve((void **)&self->items, &self->cap_items, 1, sizeof(Item)) < 0 ||
        rs_reserve((void **)&self->bytes, &self->cap_bytes, (size_t)root.len + 1, 1) < 0 ||
        rs_reserve((void **)&self->last, &self->cap_last, 64, 1) < 0 || rs_reserve((void **)&self->k.prev, &self->k.cap_prev, 64, 1) < 0 ||
        rs_reserve((void **)&self->k.key, &self->k.cap_key, 64, 1) < 0) {
        PyBuffer_Release(&root);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return -1;
    }
    memcpy(self->bytes, root.buf, (size_t)root.len);
    self->n_bytes = (size_t)root.len;
    Item it = {0};
    it.cid_len = (uint32_t)root.len;
    it.layer = -1;
    it.depth = 1;
    self->items[0] = it;
    self->n_items = 1;
    PyBuffer_Release(&root);
    Py_INCREF(nodes);
    self->nodes = nodes;
    Py_INCREF(values);
    self->values = values;
    self->table = PyObject_TypeCheck(nodes, &RsBlockTable_Type) ? (RsBlockTable *)nodes : NULL;
    if (self->table) self->items[0].hash = rs_table_hash(self->table, self->bytes, self->n_bytes);
    self->max_depth = max_depth;
    self->strict = strict;
    self->record_cids = record_cids;
    if (record_type != Py_None) self->record_type = Py_NewRef(record_type);
    return 0;
}

static int Walker_traverse(Walker *self, visitproc visit, void *arg) {
    Py_VISIT(self->nodes);
    Py_VISIT(self->values);
    Py_VISIT(self->failed);
    Py_VISIT(self->record_type);
    Py_VISIT(self->collection);
    Py_VISIT(self->carry_pairs);
    Py_VISIT(self->carry_items);
    return 0;
}

static int Walker_clear(Walker *self) {
    Py_CLEAR(self->nodes);
    Py_CLEAR(self->values);
    Py_CLEAR(self->failed);
    Py_CLEAR(self->record_type);
    Py_CLEAR(self->collection);
    Py_CLEAR(self->carry_pairs);
    Py_CLEAR(self->carry_items);
    self->table = NULL;
    self->n_items = 0;
    return 0;
}

static void Walker_dealloc(Walker *self) {
    PyObject_GC_UnTrack(self);
    Walker_clear(self);
    PyMem_Free(self->items);
    PyMem_Free(self->bytes);
    PyMem_Free(self->last);
    PyMem_Free(self->entries);
    rs_keys_free(&self->k);
    PyMem_Free(self->cid);
    PyMem_Free(self->nbuf);
    PyMem_Free(self->ahead);
    for (size_t i = 0; i < self->n_wanted; i++) PyMem_Free(self->wanted[i].name);
    PyMem_Free(self->wanted);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Keep a RepoStreamError as the walker's failure; re-raise it. Returns NULL. */
static PyObject *fail(Walker *self) {
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (exc && tb) PyException_SetTraceback(exc, tb);
    if (exc && rs_base_error && PyObject_IsInstance(exc, rs_base_error) == 1) {
        Py_INCREF(exc);
        Py_XSETREF(self->failed, exc);
    }
    PyErr_Restore(type, exc, tb);
    return NULL;
}

/* Records walked by next_batch through a store and not yet in a batch. */
static int carried(Walker *self) { return self->carry_items != NULL && self->carry_at < PyList_GET_SIZE(self->carry_items); }

static PyObject *Walker_next_chunk(Walker *self, PyObject *arg) {
    if (self->failed) {
        PyErr_SetObject((PyObject *)Py_TYPE(self->failed), self->failed);
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1) return PyErr_Format(PyExc_ValueError, "chunk size must be at least 1, got %zd", n);
    if (self->nodes == NULL) return rs_not_initialised("Walker"), NULL;
    if (carried(self)) {
        PyErr_SetString(PyExc_RuntimeError, "next_chunk after next_batch: finish the walk with next_batch");
        return NULL;
    }
    if (self->running) return rs_reentered("Walker"), NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    PyObject *deferred = NULL;
    /* the walk reads its stack and the table's blocks in place: nothing may call into either meanwhile */
    if (self->table && rs_table_enter(self->table) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    self->running = 1;
    int stepped = step(self, n, out, &deferred);
    self->running = 0;
    if (self->table) rs_table_leave(self->table);
    if (stepped < 0) {
        Py_XDECREF(deferred);
        Py_DECREF(out);
        return fail(self);
    }
    if (deferred != NULL) {
        Py_DECREF(out);
        PyErr_SetObject((PyObject *)Py_TYPE(deferred), deferred);
        Py_DECREF(deferred);
        return fail(self);
    }
    if (!(self->table != NULL && self->values == (PyObject *)self->table) && self->values != Py_None) {
        self->running = 1;
        PyObject *items = PyObject_CallMethod(self->values, "values", "(OOO)", out, self->record_cids ? Py_True : Py_False,
                                              self->record_type ? self->record_type : Py_None);
        self->running = 0;
        Py_DECREF(out);
        if (items == NULL) return fail(self);
        out = items;
    }
    Py_ssize_t got = PyObject_Length(out);
    if (got < 0) {
        Py_DECREF(out);
        return NULL;
    }
    if (got == 0 && self->n_items == 0) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    self->records += got;
    return out;
}

/* The UTF-8 of a str (a record's CID text), or NULL with TypeError. */
static const char *item_text_of(PyObject *o, Py_ssize_t *len) {
    if (PyUnicode_Check(o)) return PyUnicode_AsUTF8AndSize(o, len);
    PyErr_Format(PyExc_TypeError, "next_batch: a record's CID text is %s, not str", Py_TYPE(o)->tp_name);
    return NULL;
}

/* next_batch through a store that is not the C table (the disk store): records are walked
 * STORE_WINDOW at a time (at most as many as the batch still wants), their values fetched by one
 * values.values(pairs, True, None) call, and put into the batch one by one until it ends (n
 * records or the byte budget); the window's rest is carried over to the next batch. So a window's
 * walk errors come before its records' store errors, and the batch ends at the same record as
 * over the table. 0, or -1 with an error. */
#define STORE_WINDOW 64
static int batch_from_store(Walker *self, Py_ssize_t n, RsArrowBuilder *b) {
    PyObject *deferred = NULL;
    while (b->n < n && b->bytes < self->max_bytes) {
        if (self->carry_items == NULL || self->carry_at >= PyList_GET_SIZE(self->carry_items)) {
            Py_CLEAR(self->carry_pairs);
            Py_CLEAR(self->carry_items);
            self->carry_at = 0;
            PyObject *out = PyList_New(0);
            if (out == NULL) return -1;
            Py_ssize_t want = n - (Py_ssize_t)b->n < STORE_WINDOW ? n - (Py_ssize_t)b->n : STORE_WINDOW;
            self->running = 1;
            int stepped = step(self, want, out, &deferred);
            self->running = 0;
            if (stepped < 0 || deferred != NULL) { /* deferred: only over the C table */
                Py_XDECREF(deferred);
                Py_DECREF(out);
                return -1;
            }
            if (PyList_GET_SIZE(out) == 0) { /* the end */
                Py_DECREF(out);
                return 0;
            }
            self->running = 1;
            PyObject *items = PyObject_CallMethod(self->values, "values", "(OOO)", out, Py_True, Py_None);
            self->running = 0;
            if (items == NULL) {
                Py_DECREF(out);
                return -1;
            }
            if (!PyList_Check(items) || PyList_GET_SIZE(items) != PyList_GET_SIZE(out)) {
                Py_DECREF(items);
                Py_DECREF(out);
                PyErr_SetString(PyExc_TypeError, "next_batch: values.values() must give one (key, cid, value) per pair");
                return -1;
            }
            self->carry_pairs = out;
            self->carry_items = items;
        }
        PyObject *pair = PyList_GET_ITEM(self->carry_pairs, self->carry_at);
        PyObject *item = PyList_GET_ITEM(self->carry_items, self->carry_at);
        self->carry_at++;
        Py_INCREF(pair);
        Py_INCREF(item);
        int r = -1;
        Py_ssize_t key_len, text_len;
        const char *key, *text;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3 || !PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_SetString(PyExc_TypeError, "next_batch: values.values() must give one (key, cid, value) per pair");
        } else if ((key = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(pair, 0), &key_len)) != NULL &&
                   (text = item_text_of(PyTuple_GET_ITEM(item, 1), &text_len)) != NULL) {
            PyObject *cid = PyTuple_GET_ITEM(pair, 1);
            PyObject *value = PyTuple_GET_ITEM(item, 2);
            self->running = 1; /* a transcoder error builds its exception in Python */
            if (self->value_kind == 2 ? rs_arrow_line_head(b, (const uint8_t *)key, (size_t)key_len, text, (size_t)text_len) == 0
                                      : rs_arrow_key(b, (const uint8_t *)key, (size_t)key_len) == 0 &&
                                            rs_arrow_cid_text(b, text, (size_t)text_len) == 0) {
                self->batch = b;
                r = batch_value(self, (const uint8_t *)key, (size_t)key_len, (const uint8_t *)PyBytes_AS_STRING(cid),
                                (size_t)PyBytes_GET_SIZE(cid), NULL, 0, value);
                self->batch = NULL;
            }
            self->running = 0;
        }
        Py_DECREF(pair);
        Py_DECREF(item);
        if (r < 0) return -1;
    }
    return 0;
}

static PyObject *Walker_next_batch(Walker *self, PyObject *args) {
    Py_ssize_t n, max_bytes;
    int value_kind;
    if (!PyArg_ParseTuple(args, "nin:next_batch", &n, &value_kind, &max_bytes)) return NULL;
    if (self->failed) {
        PyErr_SetObject((PyObject *)Py_TYPE(self->failed), self->failed);
        return NULL;
    }
    if (n < 1) return PyErr_Format(PyExc_ValueError, "batch size must be at least 1, got %zd", n);
    if (max_bytes < 1) return PyErr_Format(PyExc_ValueError, "a batch's byte budget must be at least 1, got %zd", max_bytes);
    if (value_kind < 0 || value_kind > 2)
        return PyErr_Format(PyExc_ValueError, "value_kind is 0 (raw blocks), 1 (JSON text) or 2 (JSON lines), got %d", value_kind);
    if (self->nodes == NULL) return rs_not_initialised("Walker"), NULL;
    if (self->running) return rs_reentered("Walker"), NULL;
    RsArrowBuilder b;
    rs_arrow_init(&b);
    self->value_kind = value_kind;
    self->max_bytes = (size_t)max_bytes;
    int status;
    /* Reserve what the last batch needed per row, for n rows (within the byte budget): buffers
     * grown by doubling copy themselves over and over once past the mmap threshold. */
    size_t rows = (size_t)n; /* the rows the batch is likely to hold: n, or fewer by the byte budget */
    if (self->row_bytes > 0 && self->max_bytes / self->row_bytes + 1 < rows) rows = self->max_bytes / self->row_bytes + 1;
    for (int i = 0; i < 11; i++) {
        size_t want = rows > SIZE_MAX / 16 / (self->per_row[i] + 1) ? self->max_bytes : self->per_row[i] * rows / 16 + 64;
        if (want > self->max_bytes) want = self->max_bytes;
        if (want > (size_t)1 << 30) want = (size_t)1 << 30; /* a reserve: a larger batch grows on */
        if (self->per_row[i] && rs_arrow_grow(&b, i, want) < 0) {
            rs_arrow_free(&b);
            return NULL;
        }
    }
    if (self->table != NULL && self->values == (PyObject *)self->table) {
        PyObject *out = PyList_New(0);
        if (out == NULL) return NULL;
        PyObject *deferred = NULL;
        if (rs_table_enter(self->table) < 0) {
            Py_DECREF(out);
            return NULL;
        }
        self->running = 1;
        self->batch = &b;
        status = step(self, n, out, &deferred);
        self->batch = NULL;
        self->running = 0;
        rs_table_leave(self->table);
        Py_XDECREF(deferred); /* never set with a batch: its errors are raised at once */
        Py_DECREF(out);
    } else if (self->values == Py_None) {
        PyErr_SetString(PyExc_TypeError, "next_batch needs a store of record values (the walker's values)");
        status = -1;
    } else {
        status = batch_from_store(self, n, &b);
    }
    if (status < 0) {
        rs_arrow_free(&b);
        return fail(self);
    }
    if (b.n == 0 && self->n_items == 0 && !carried(self)) {
        rs_arrow_free(&b);
        Py_RETURN_NONE;
    }
    self->records += b.n;
    if (b.n > 0) {
        for (int i = 0; i < 11; i++) self->per_row[i] = b.buf[i].len * 16 / (size_t)b.n + (b.buf[i].len ? 1 : 0);
        self->row_bytes = b.bytes / (size_t)b.n + 1;
    }
    if (value_kind == 2) { /* the lines, as one bytes object */
        PyObject *lines = PyBytes_FromStringAndSize((const char *)b.buf[RS_ARROW_VALUE].data, (Py_ssize_t)b.buf[RS_ARROW_VALUE].len);
        rs_arrow_free(&b);
        return lines;
    }
    return rs_arrow_finish(&b, value_kind);
}

static PyObject *Walker_abandon(Walker *self, PyObject *unused) {
    (void)unused;
    if (self->running) return rs_reentered("Walker"), NULL;
    self->n_items = 0;
    self->n_bytes = 0;
    Py_CLEAR(self->carry_pairs);
    Py_CLEAR(self->carry_items);
    Py_RETURN_NONE;
}

static PyObject *Walker_get_done(Walker *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->n_items == 0 && !carried(self));
}

static PyObject *Walker_get_nodes_visited(Walker *self, void *closure) {
    (void)closure;
    return PyLong_FromLongLong(self->nodes_visited);
}

static PyObject *Walker_get_records(Walker *self, void *closure) {
    (void)closure;
    return PyLong_FromLongLong(self->records);
}

static PyObject *Walker_get_value_bytes(Walker *self, void *closure) {
    (void)closure;
    return PyLong_FromLongLong(self->value_bytes);
}

static PyMethodDef Walker_methods[] = {
    {"next_chunk", (PyCFunction)Walker_next_chunk, METH_O,
     "next_chunk(n)\n--\n\nUp to n further items in key order; None when the walk is over."},
    {"next_batch", (PyCFunction)Walker_next_batch, METH_VARARGS,
     "next_batch(n, value_kind, max_bytes)\n--\n\nUp to n further records in key order as the Arrow C Data Interface "
     "capsules (schema, array) of a record batch (repo_stream.read.arrow), or with value_kind 2 as JSON lines (bytes), "
     "fewer once the batch holds max_bytes; None when the walk is over (see repo_stream.core.walk.Walker.next_batch)."},
    {"abandon", (PyCFunction)Walker_abandon, METH_NOARGS, "abandon()\n--\n\nStop the walk."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Walker_getset[] = {
    {"done", (getter)Walker_get_done, NULL, "True once every record has been emitted.", NULL},
    {"records", (getter)Walker_get_records, NULL, "Records emitted so far.", NULL},
    {"value_bytes", (getter)Walker_get_value_bytes, NULL,
     "Bytes of the values next_batch took so far (each block's length before transcoding; a str value's UTF-8).", NULL},
    {"nodes_visited", (getter)Walker_get_nodes_visited, NULL, "MST nodes expanded so far.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject RsWalker_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "repo_stream._native.Walker",
    .tp_basicsize = sizeof(Walker),
    .tp_dealloc = (destructor)Walker_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Walker(root, nodes, values=None, *, max_depth=32, strict=False, record_cids=False, collections=None, record_type=None)\n--\n\n"
              "The C MST walker; the same behaviour and errors as repo_stream.core.walk.Walker.",
    .tp_traverse = (traverseproc)Walker_traverse,
    .tp_clear = (inquiry)Walker_clear,
    .tp_methods = Walker_methods,
    .tp_getset = Walker_getset,
    .tp_init = (initproc)Walker_init,
    .tp_new = PyType_GenericNew,
};
