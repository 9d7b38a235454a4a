/* transcode_json: one record block (strict DAG-CBOR) straight to its atproto JSON text.
 *
 * Mirrors repo_stream/records/json_text.py (the reference): the same checks in the same order,
 * the same errors (built by repo_stream/core/messages.py's record_not_dagcbor), and the text of
 * json.dumps(record_json(block), ensure_ascii=False, separators=(",", ":")) byte for byte: maps
 * in block order, links as {"$link":"b<base32 CID>"}, bytes as {"$bytes":"<base64, no padding>"},
 * floats as Python's repr, strings escaped as Python's json escapes them with ensure_ascii=False.
 *
 * Hostile input: every length is checked against the bytes left before use; nesting is kept on
 * an explicit stack of at most RS_JSON_MAX_DEPTH frames (no recursion); the output buffer starts
 * on the C stack and grows on the heap, bounded by a constant factor of the block's size. No
 * Python code runs between the start and the end, so the call cannot be re-entered. */
#include "native.h"

#define RS_JSON_MAX_DEPTH 256 /* repo_stream.records.values.MAX_DEPTH */
#define RS_JSON_STACK_OUT 4096

typedef struct {
    uint8_t *buf;
    size_t len, cap;
    int heap;
    int raw;   /* the heap buffer is PyMem_Raw (an Arrow batch's value buffer, rs_json_into) */
    int ascii; /* nothing >= 0x80 written yet */
    uint8_t small[RS_JSON_STACK_OUT];
} Out;

typedef struct {
    uint64_t left;          /* items (maps: entries) still to read */
    const uint8_t *key;     /* maps: the last key read (its bytes), NULL before the first */
    size_t key_len;
    int is_map;
} Frame;

/* The error: messages.record_not_dagcbor(size, offset, detail). Returns -1. */
static int bad(size_t size, size_t offset, const char *detail) {
    return rs_raise("record_not_dagcbor", "(nns)", (Py_ssize_t)size, (Py_ssize_t)offset, detail);
}

static int grow(Out *o, size_t more) {
    if (more <= o->cap - o->len) return 0;
    size_t need = o->len + more, cap = o->cap ? o->cap : 256;
    while (cap < need) {
        if (cap > ((size_t)1 << 40)) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    uint8_t *grown;
    if (o->heap) {
        grown = o->raw ? PyMem_RawRealloc(o->buf, cap) : PyMem_Realloc(o->buf, cap);
    } else {
        grown = PyMem_Malloc(cap);
        if (grown != NULL) memcpy(grown, o->buf, o->len);
    }
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->buf = grown;
    o->cap = cap;
    o->heap = 1;
    return 0;
}

static inline int put(Out *o, const char *s, size_t n) {
    if (grow(o, n) < 0) return -1;
    memcpy(o->buf + o->len, s, n);
    o->len += n;
    return 0;
}

static inline int put1(Out *o, char c) {
    if (o->len == o->cap && grow(o, 1) < 0) return -1;
    o->buf[o->len++] = (uint8_t)c;
    return 0;
}

static int put_u64(Out *o, uint64_t v) {
    char tmp[24];
    size_t n = 0;
    do {
        tmp[sizeof tmp - 1 - n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return put(o, tmp + sizeof tmp - n, n);
}

static const char B32[] = "abcdefghijklmnopqrstuvwxyz234567";
static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int put_b64(Out *o, const uint8_t *d, size_t n) {
    if (grow(o, n / 3 * 4 + 4) < 0) return -1;
    uint8_t *w = o->buf + o->len;
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)d[i] << 16 | (uint32_t)d[i + 1] << 8 | d[i + 2];
        *w++ = (uint8_t)B64[v >> 18];
        *w++ = (uint8_t)B64[(v >> 12) & 63];
        *w++ = (uint8_t)B64[(v >> 6) & 63];
        *w++ = (uint8_t)B64[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)d[i] << 16;
        *w++ = (uint8_t)B64[v >> 18];
        *w++ = (uint8_t)B64[(v >> 12) & 63];
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)d[i] << 16 | (uint32_t)d[i + 1] << 8;
        *w++ = (uint8_t)B64[v >> 18];
        *w++ = (uint8_t)B64[(v >> 12) & 63];
        *w++ = (uint8_t)B64[(v >> 6) & 63];
    }
    o->len = (size_t)(w - o->buf);
    return 0;
}

static int put_b32(Out *o, const uint8_t *d, size_t n) {
    if (grow(o, n / 5 * 8 + 8) < 0) return -1;
    uint8_t *w = o->buf + o->len;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        acc = (acc << 8) | d[i];
        bits += 8;
        while (bits >= 5) {
            bits -= 5;
            *w++ = (uint8_t)B32[(acc >> bits) & 31];
        }
    }
    if (bits > 0) *w++ = (uint8_t)B32[(acc << (5 - bits)) & 31];
    o->len = (size_t)(w - o->buf);
    return 0;
}

/* The length of the valid UTF-8 sequence at s[0] (s[0] >= 0x80; n bytes left), or 0 if invalid.
 * Valid is what Python's strict UTF-8 decoder accepts: no overlong forms, no surrogates, nothing
 * past U+10FFFF. */
static size_t utf8_seq(const uint8_t *s, size_t n) {
    uint8_t c = s[0];
    if (c >= 0xc2 && c <= 0xdf) return n >= 2 && (s[1] & 0xc0) == 0x80 ? 2 : 0;
    if (c >= 0xe0 && c <= 0xef) {
        if (n < 3 || (s[2] & 0xc0) != 0x80) return 0;
        uint8_t lo = c == 0xe0 ? 0xa0 : 0x80, hi = c == 0xed ? 0x9f : 0xbf;
        return s[1] >= lo && s[1] <= hi ? 3 : 0;
    }
    if (c >= 0xf0 && c <= 0xf4) {
        if (n < 4 || (s[2] & 0xc0) != 0x80 || (s[3] & 0xc0) != 0x80) return 0;
        uint8_t lo = c == 0xf0 ? 0x90 : 0x80, hi = c == 0xf4 ? 0x8f : 0xbf;
        return s[1] >= lo && s[1] <= hi ? 4 : 0;
    }
    return 0;
}

/* A JSON string of the UTF-8 text s[0:n], escaped as json.dumps(ensure_ascii=False) escapes it.
 * 0, 1 if the text is not valid UTF-8, -1 with an error set. */
static int put_text(Out *o, const uint8_t *s, size_t n) {
    if (grow(o, n + 2) < 0) return -1;
    o->buf[o->len++] = '"';
    size_t i = 0;
    while (i < n) {
        size_t start = i;
        while (i < n && s[i] >= 0x20 && s[i] < 0x80 && s[i] != '"' && s[i] != '\\') i++;
        /* n + 2 were reserved, plus 5 for each escape so far: the plain bytes fit */
        memcpy(o->buf + o->len, s + start, i - start);
        o->len += i - start;
        if (i == n) break;
        uint8_t c = s[i];
        if (c >= 0x80) {
            size_t k = utf8_seq(s + i, n - i);
            if (k == 0) return 1;
            memcpy(o->buf + o->len, s + i, k);
            o->len += k;
            o->ascii = 0;
            i += k;
            continue;
        }
        if (grow(o, 6 + (n - i)) < 0) return -1;
        uint8_t *w = o->buf + o->len;
        *w++ = '\\';
        switch (c) {
        case '"': *w++ = '"'; break;
        case '\\': *w++ = '\\'; break;
        case '\n': *w++ = 'n'; break;
        case '\r': *w++ = 'r'; break;
        case '\t': *w++ = 't'; break;
        case '\b': *w++ = 'b'; break;
        case '\f': *w++ = 'f'; break;
        default:
            *w++ = 'u';
            *w++ = '0';
            *w++ = '0';
            *w++ = (uint8_t)"0123456789abcdef"[c >> 4];
            *w++ = (uint8_t)"0123456789abcdef"[c & 15];
        }
        o->len = (size_t)(w - o->buf);
        i++;
    }
    o->buf[o->len++] = '"'; /* reserved above (escapes reserve their own room plus what is left) */
    return 0;
}

/* An unsigned LEB128 varint as repo_stream.records.values._varint reads it: at most 9 bytes,
 * minimal. 0 ok, -1 (*why set) not. */
static int varint(const uint8_t *d, size_t n, size_t *at, uint64_t *value, const char **why) {
    uint64_t v = 0;
    for (int shift = 0; shift < 63; shift += 7) {
        if (*at >= n) {
            *why = "a link's CID ends inside a varint";
            return -1;
        }
        uint8_t b = d[(*at)++];
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            if (shift && !b) {
                *why = "a link's CID has a varint that is not minimal";
                return -1;
            }
            *value = v;
            return 0;
        }
    }
    *why = "a link's CID has a varint longer than 9 bytes";
    return -1;
}

/* Whether cid[0:n] is a binary CIDv1 with a complete multihash; NULL if so, else why not. */
static const char *cid_problem(const uint8_t *cid, size_t n) {
    if (n == 36 && cid[0] == 0x01 && (cid[1] == 0x71 || cid[1] == 0x55) && cid[2] == 0x12 && cid[3] == 0x20) return NULL;
    if (n == 34 && cid[0] == 0x12 && cid[1] == 0x20) return "a link is a CIDv0 (atproto links are CIDv1)";
    size_t at = 0;
    uint64_t version, ignored, length;
    const char *why = NULL;
    if (varint(cid, n, &at, &version, &why) < 0) return why;
    if (version != 1) return "a link's CID is not version 1";
    if (varint(cid, n, &at, &ignored, &why) < 0 || varint(cid, n, &at, &ignored, &why) < 0 ||
        varint(cid, n, &at, &length, &why) < 0)
        return why;
    if (length != (uint64_t)(n - at)) return "a link's CID digest is not the length its multihash declares";
    return NULL;
}

/* Transcode block[0:n] into o. 0, or -1 with RecordDecodeError (or MemoryError) set. */
static int transcode(Out *o, const uint8_t *block, size_t n) {
    Frame stack[RS_JSON_MAX_DEPTH];
    size_t sp = 0;
    const uint8_t *p = block, *end = block + n;
#define BAD(at, why) return bad(n, (size_t)((at) - block), why)
    for (;;) {
        if (sp > 0 && stack[sp - 1].is_map) { /* a key */
            Frame *f = &stack[sp - 1];
            const uint8_t *at = p;
            int major, minimal;
            uint64_t len;
            if (rs_cbor_head(&p, end, &major, &len, &minimal) < 0) BAD(at, "truncated or reserved CBOR head");
            if (major != 3) BAD(at, "a map key is not a text string");
            if (!minimal) BAD(at, "a length is not minimally encoded");
            if (len > (uint64_t)(end - p)) BAD(at, "a map key runs past the end of the block");
            size_t kl = (size_t)len;
            if (f->key != NULL) {
                int order = kl != f->key_len ? (kl > f->key_len ? 1 : -1) : memcmp(p, f->key, kl);
                if (order == 0) BAD(at, "a map key is repeated");
                if (order < 0) BAD(at, "map keys are not in canonical order (shorter first, then bytewise)");
            }
            if ((kl == 5 && memcmp(p, "$link", 5) == 0) || (kl == 6 && memcmp(p, "$bytes", 6) == 0))
                BAD(at, "a map key '$link' or '$bytes' is reserved by the atproto data model's JSON form");
            f->key = p;
            f->key_len = kl;
            int r = put_text(o, p, kl);
            if (r < 0) return -1;
            if (r > 0) BAD(at, "a map key is not valid UTF-8");
            p += kl;
            if (put1(o, ':') < 0) return -1;
        }
        /* a value */
        const uint8_t *at = p;
        int major, minimal;
        uint64_t arg;
        if (p < end && *p == 0xfb) { /* the only float DAG-CBOR allows */
            if (end - p < 9) BAD(at, "truncated or reserved CBOR head");
            uint64_t bits = 0;
            for (int i = 1; i <= 8; i++) bits = (bits << 8) | p[i];
            p += 9;
            double d;
            memcpy(&d, &bits, sizeof d);
            if (d != d) BAD(at, "a float is NaN");
            if (d - d != 0) BAD(at, "a float is infinite");
            char *text = PyOS_double_to_string(d, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
            if (text == NULL) return -1;
            int r = put(o, text, strlen(text));
            PyMem_Free(text);
            if (r < 0) return -1;
            goto done_value;
        }
        if (rs_cbor_head(&p, end, &major, &arg, &minimal) < 0) BAD(at, "truncated or reserved CBOR head");
        if (major == 7 && (*at < 0xf4 || *at > 0xf6)) BAD(at, "a CBOR simple value or float DAG-CBOR does not allow");
        if (!minimal)
            BAD(at, major == 6 ? "a tag is not minimally encoded"
                    : major >= 2 ? "a length is not minimally encoded" : "an integer is not minimally encoded");
        switch (major) {
        case 0:
            if (put_u64(o, arg) < 0) return -1;
            break;
        case 1:
            if (put1(o, '-') < 0) return -1;
            if (arg == UINT64_MAX) {
                if (put(o, "18446744073709551616", 20) < 0) return -1;
            } else if (put_u64(o, arg + 1) < 0) {
                return -1;
            }
            break;
        case 2:
            if (arg > (uint64_t)(end - p)) BAD(at, "a byte string runs past the end of the block");
            if (put(o, "{\"$bytes\":\"", 11) < 0 || put_b64(o, p, (size_t)arg) < 0 || put(o, "\"}", 2) < 0) return -1;
            p += arg;
            break;
        case 3: {
            if (arg > (uint64_t)(end - p)) BAD(at, "a text string runs past the end of the block");
            int r = put_text(o, p, (size_t)arg);
            if (r < 0) return -1;
            if (r > 0) BAD(at, "a text string is not valid UTF-8");
            p += arg;
            break;
        }
        case 4:
        case 5:
            if (sp >= RS_JSON_MAX_DEPTH) BAD(at, "maps and lists nested more than 256 deep");
            if (major == 4 ? arg > (uint64_t)(end - p) : arg > (uint64_t)(end - p) / 2)
                BAD(at, major == 4 ? "a list claims more items than there are bytes left" : "a map claims more entries than there are bytes left");
            if (arg == 0) {
                if (put(o, major == 4 ? "[]" : "{}", 2) < 0) return -1;
                break;
            }
            if (put1(o, major == 4 ? '[' : '{') < 0) return -1;
            stack[sp].left = arg;
            stack[sp].key = NULL;
            stack[sp].key_len = 0;
            stack[sp].is_map = major == 5;
            sp++;
            continue;
        case 6: {
            if (arg != 42) BAD(at, "a CBOR tag other than 42 (link)");
            const uint8_t *s = p;
            uint64_t len;
            if (rs_cbor_head(&p, end, &major, &len, &minimal) < 0) BAD(s, "truncated or reserved CBOR head");
            if (major != 2) BAD(s, "a link (tag 42) is not over a byte string");
            if (!minimal) BAD(s, "a length is not minimally encoded");
            if (len > (uint64_t)(end - p)) BAD(s, "a byte string runs past the end of the block");
            if (len == 0 || p[0] != 0x00) BAD(s, "a link's bytes do not start with 0x00");
            const char *why = cid_problem(p + 1, (size_t)len - 1);
            if (why != NULL) BAD(s, why);
            if (put(o, "{\"$link\":\"b", 11) < 0 || put_b32(o, p + 1, (size_t)len - 1) < 0 || put(o, "\"}", 2) < 0) return -1;
            p += len;
            break;
        }
        default: /* 7: false, true, null (0xf4..0xf6, checked above); floats were read above */
            if (arg == 20) {
                if (put(o, "false", 5) < 0) return -1;
            } else if (arg == 21) {
                if (put(o, "true", 4) < 0) return -1;
            } else if (put(o, "null", 4) < 0) {
                return -1;
            }
        }
    done_value:
        for (;;) {
            if (sp == 0) {
                if (p != end) BAD(p, "bytes after the end of the item");
                return 0;
            }
            Frame *f = &stack[sp - 1];
            if (--f->left > 0) {
                if (put1(o, ',') < 0) return -1;
                break;
            }
            if (put1(o, f->is_map ? '}' : ']') < 0) return -1;
            sp--;
        }
    }
#undef BAD
}

PyObject *rs_transcode_json(PyObject *self, PyObject *arg) {
    (void)self;
    if (rs_messages == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "repo_stream._native.setup() was not called");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    Out out;
    Out *o = &out;
    o->buf = o->small;
    o->len = 0;
    o->cap = sizeof o->small;
    o->heap = 0;
    o->raw = 0;
    o->ascii = 1;
    PyObject *text = NULL;
    if (transcode(o, (const uint8_t *)view.buf, (size_t)view.len) == 0) {
        if (o->ascii) {
            text = PyUnicode_New((Py_ssize_t)o->len, 127);
            if (text != NULL) memcpy(PyUnicode_DATA(text), o->buf, o->len);
        } else {
            text = PyUnicode_DecodeUTF8((const char *)o->buf, (Py_ssize_t)o->len, "strict");
        }
    }
    if (o->heap) PyMem_Free(o->buf);
    PyBuffer_Release(&view);
    return text;
}

int rs_json_into(RsArrowBuilder *b, const uint8_t *block, size_t n) {
    if (rs_messages == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "repo_stream._native.setup() was not called");
        return -1;
    }
    RsArrowBuf *buf = &b->buf[RS_ARROW_VALUE];
    Out *o = PyMem_Malloc(sizeof *o); /* not on the C stack: its small buffer is not used */
    if (o == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->buf = buf->data;
    o->len = buf->len;
    o->cap = buf->cap;
    o->heap = 1;
    o->raw = 1;
    o->ascii = 1;
    int r = transcode(o, block, n);
    buf->data = o->buf; /* grown or not, the buffer is the batch's */
    buf->cap = o->cap;
    if (r == 0 && o->len > (size_t)INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError,
                        "arrow batch: a column of the batch passes 2 GiB (Arrow's int32 offsets): ask for fewer records");
        r = -1;
    }
    if (r == 0) buf->len = o->len;
    PyMem_Free(o);
    return r;
}

/* --- many blocks into one buffer (pg_copy_rows) ------------------------------------------------- */
struct RsJsonOut {
    Out out;
};

RsJsonOut *rs_json_out_new(size_t hint) {
    RsJsonOut *j = PyMem_Malloc(sizeof *j);
    if (j == NULL) return (RsJsonOut *)PyErr_NoMemory();
    Out *o = &j->out;
    o->len = 0;
    o->ascii = 1;
    o->raw = 0;
    o->cap = hint < 4096 ? 4096 : hint;
    o->buf = PyMem_Malloc(o->cap);
    o->heap = 1;
    if (o->buf == NULL) {
        PyMem_Free(j);
        return (RsJsonOut *)PyErr_NoMemory();
    }
    return j;
}

int rs_json_out_append(RsJsonOut *j, const uint8_t *block, size_t n) {
    if (rs_messages == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "repo_stream._native.setup() was not called");
        return -1;
    }
    return transcode(&j->out, block, n);
}

int rs_json_out_put(RsJsonOut *j, const void *data, size_t n) { return put(&j->out, data, n); }

uint8_t *rs_json_out_data(RsJsonOut *j, size_t *len) {
    *len = j->out.len;
    return j->out.buf;
}

void rs_json_out_free(RsJsonOut *j) {
    if (j == NULL) return;
    PyMem_Free(j->out.buf);
    PyMem_Free(j);
}

/* pg_copy_rows(chunk, did, rev, jsonb): the rows of PostgreSQL's binary COPY format (no header,
 * no trailer) of did, collection, rkey, cid, rev, value for each (key, cid, block) item of
 * chunk: value the block's JSON text as jsonb (version byte 1 then the text) when jsonb is true,
 * else the block's bytes (bytea). Strings as their UTF-8; every field length checked to fit
 * int32. Raises RecordDecodeError (a block that is not strict DAG-CBOR), TypeError, ValueError. */
static int put_be32(RsJsonOut *j, uint32_t v) {
    uint8_t b[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    return rs_json_out_put(j, b, 4);
}

static int put_field(RsJsonOut *j, const char *s, size_t n) {
    if (n > (size_t)INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "pg_copy_rows: a field passes 2 GiB");
        return -1;
    }
    if (put_be32(j, (uint32_t)n) < 0) return -1;
    return rs_json_out_put(j, s, n);
}

PyObject *rs_pg_copy_rows(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *chunk, *did_o, *rev_o;
    int jsonb;
    if (!PyArg_ParseTuple(args, "O!UUp:pg_copy_rows", &PyList_Type, &chunk, &did_o, &rev_o, &jsonb)) return NULL;
    Py_ssize_t dl, rl;
    const char *did = PyUnicode_AsUTF8AndSize(did_o, &dl);
    const char *rev = did ? PyUnicode_AsUTF8AndSize(rev_o, &rl) : NULL;
    if (rev == NULL) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(chunk);
    RsJsonOut *j = rs_json_out_new((size_t)n * 256);
    if (j == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(chunk, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3 || !PyUnicode_Check(PyTuple_GET_ITEM(item, 0)) ||
            !PyUnicode_Check(PyTuple_GET_ITEM(item, 1)) || !PyBytes_Check(PyTuple_GET_ITEM(item, 2))) {
            PyErr_SetString(PyExc_TypeError, "pg_copy_rows: items are (key: str, cid: str, block: bytes) tuples");
            goto fail;
        }
        Py_ssize_t kl, cl;
        const char *key = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(item, 0), &kl);
        const char *cid = key ? PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(item, 1), &cl) : NULL;
        if (cid == NULL) goto fail;
        const char *slash = memchr(key, '/', (size_t)kl);
        if (slash == NULL) {
            PyErr_Format(PyExc_ValueError, "pg_copy_rows: key %R has no '/'", PyTuple_GET_ITEM(item, 0));
            goto fail;
        }
        PyObject *v = PyTuple_GET_ITEM(item, 2);
        const uint8_t *block = (const uint8_t *)PyBytes_AS_STRING(v);
        size_t bl = (size_t)PyBytes_GET_SIZE(v);
        static const uint8_t six[2] = {0, 6};
        if (rs_json_out_put(j, six, 2) < 0 || put_field(j, did, (size_t)dl) < 0 ||
            put_field(j, key, (size_t)(slash - key)) < 0 || put_field(j, slash + 1, (size_t)(kl - (slash - key) - 1)) < 0 ||
            put_field(j, cid, (size_t)cl) < 0 || put_field(j, rev, (size_t)rl) < 0)
            goto fail;
        if (jsonb) {
            size_t at = j->out.len;
            static const uint8_t head[5] = {0, 0, 0, 0, 1};
            if (rs_json_out_put(j, head, 5) < 0 || rs_json_out_append(j, block, bl) < 0) goto fail;
            size_t len = j->out.len - at - 4;
            if (len > (size_t)INT32_MAX) {
                PyErr_SetString(PyExc_OverflowError, "pg_copy_rows: a field passes 2 GiB");
                goto fail;
            }
            uint8_t *p = j->out.buf + at;
            p[0] = (uint8_t)(len >> 24);
            p[1] = (uint8_t)(len >> 16);
            p[2] = (uint8_t)(len >> 8);
            p[3] = (uint8_t)len;
        } else if (put_field(j, (const char *)block, bl) < 0) {
            goto fail;
        }
    }
    PyObject *out = PyBytes_FromStringAndSize((const char *)j->out.buf, (Py_ssize_t)j->out.len);
    rs_json_out_free(j);
    return out;
fail:
    rs_json_out_free(j);
    return NULL;
}

/* --- record_line: a sync RecordEvent's JSON line ---------------------------------------------- */

/* The length of s if every character is printable ASCII other than '"' and '\\' (written as it
 * is in a JSON string), else -1 (the caller falls back to the Python way, which escapes). */
static Py_ssize_t plain_ascii(PyObject *s) {
    if (!PyUnicode_CheckExact(s) || !PyUnicode_IS_ASCII(s)) return -1;
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    const uint8_t *p = PyUnicode_1BYTE_DATA(s);
    for (Py_ssize_t i = 0; i < n; i++)
        if (p[i] < 0x20 || p[i] == 0x7f || p[i] == '"' || p[i] == '\\') return -1;
    return n;
}

/* record_line(did, rev, seq, action, collection, rkey, cid, value_text, live): the line
 * RecordEvent.to_json_line makes (repo_stream/sync/follow.py, the reference), or None when an
 * argument is not the usual kind (a str needing an escape, seq not an int of 64 bits or None, cid
 * not a str or None, value_text not a str, live not a bool): the caller then makes it in Python.
 * Only reads its arguments; runs no Python code. */
PyObject *rs_record_line(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 9) {
        PyErr_Format(PyExc_TypeError, "record_line() takes 9 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *did = args[0], *rev = args[1], *seq = args[2], *action = args[3], *collection = args[4], *rkey = args[5], *cid = args[6],
             *value = args[7], *live = args[8];
    Py_ssize_t n_did = plain_ascii(did), n_rev = plain_ascii(rev), n_action = plain_ascii(action), n_collection = plain_ascii(collection),
               n_rkey = plain_ascii(rkey), n_cid = cid == Py_None ? 0 : plain_ascii(cid);
    if (n_did < 0 || n_rev < 0 || n_action < 0 || n_collection < 0 || n_rkey < 0 || n_cid < 0) Py_RETURN_NONE;
    if (!PyUnicode_CheckExact(value) || !PyBool_Check(live)) Py_RETURN_NONE;
    char seq_text[24] = "null";
    if (seq != Py_None) {
        if (!PyLong_CheckExact(seq)) Py_RETURN_NONE;
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(seq, &overflow);
        if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        snprintf(seq_text, sizeof seq_text, "%lld", v);
    }
    /* The ASCII head up to "value": and the tail after the value, built in C buffers; each
     * piece's length is bounded by its str's (checked above), so the sums cannot overflow
     * Py_ssize_t by more than a constant: checked against PY_SSIZE_T_MAX / 2 below. */
    Py_ssize_t n_value = PyUnicode_GET_LENGTH(value);
    if (n_did > PY_SSIZE_T_MAX / 16 || n_rev > PY_SSIZE_T_MAX / 16 || n_action > PY_SSIZE_T_MAX / 16 || n_collection > PY_SSIZE_T_MAX / 16 ||
        n_rkey > PY_SSIZE_T_MAX / 16 || n_cid > PY_SSIZE_T_MAX / 16 || n_value > PY_SSIZE_T_MAX / 16)
        Py_RETURN_NONE;
    const char *tail = live == Py_True ? ",\"live\":true}\n" : ",\"live\":false}\n";
    Py_ssize_t n_tail = (Py_ssize_t)strlen(tail), n_seq = (Py_ssize_t)strlen(seq_text);
    /* {"did":"D","rev":"R","seq":S,"action":"A","collection":"C","rkey":"K","cid":"X"|null,"value": */
    Py_ssize_t n_head = 8 + n_did + 9 + n_rev + 8 + n_seq + 11 + n_action + 16 + n_collection + 10 + n_rkey + 8 + (cid == Py_None ? 4 : n_cid + 2) + 9;
    Py_UCS4 maxchar = PyUnicode_MAX_CHAR_VALUE(value);
    if (maxchar < 127) maxchar = 127;
    PyObject *line = PyUnicode_New(n_head + n_value + n_tail, maxchar);
    if (line == NULL) return NULL;
    int kind = PyUnicode_KIND(line);
    void *data = PyUnicode_DATA(line);
    Py_ssize_t at = 0;
    /* ASCII pieces: copied as they are into a one-byte string, widened one by one otherwise */
#define PUT_N(p, n)                                                                                \
    do {                                                                                           \
        const uint8_t *s_ = (const uint8_t *)(p);                                                  \
        Py_ssize_t n_ = (n);                                                                       \
        if (kind == PyUnicode_1BYTE_KIND)                                                          \
            memcpy((uint8_t *)data + at, s_, (size_t)n_);                                          \
        else                                                                                       \
            for (Py_ssize_t i_ = 0; i_ < n_; i_++) PyUnicode_WRITE(kind, data, at + i_, (Py_UCS4)s_[i_]); \
        at += n_;                                                                                  \
    } while (0)
#define PUT_C(text) PUT_N(text, (Py_ssize_t)strlen(text))
#define PUT_S(obj, n) PUT_N(PyUnicode_1BYTE_DATA(obj), n)
    PUT_C("{\"did\":\"");
    PUT_S(did, n_did);
    PUT_C("\",\"rev\":\"");
    PUT_S(rev, n_rev);
    PUT_C("\",\"seq\":");
    PUT_C(seq_text);
    PUT_C(",\"action\":\"");
    PUT_S(action, n_action);
    PUT_C("\",\"collection\":\"");
    PUT_S(collection, n_collection);
    PUT_C("\",\"rkey\":\"");
    PUT_S(rkey, n_rkey);
    if (cid == Py_None) {
        PUT_C("\",\"cid\":null,\"value\":");
    } else {
        PUT_C("\",\"cid\":\"");
        PUT_S(cid, n_cid);
        PUT_C("\",\"value\":");
    }
    if (PyUnicode_CopyCharacters(line, at, value, 0, n_value) < 0) {
        Py_DECREF(line);
        return NULL;
    }
    at += n_value;
    PUT_C(tail);
#undef PUT_N
#undef PUT_C
#undef PUT_S
    assert(at == n_head + n_value + n_tail);
    return line;
}
