/* Block verification for CarParser's verify_cids (spec: atproto data model, "Link and CID
 * formats": a block's CID names the sha2-256 of its bytes), on a second core.
 *
 * Blocks are hashed in batches of the sections that follow in the parser's buffer, side by side
 * in SHA-256 lanes (rs_sha256_many). While the parser consumes one batch, a helper thread (a
 * plain pthread: it touches no Python object and never takes the GIL) hashes the next, so
 * verification mostly costs the parser nothing but the wait for a batch that is not done yet.
 *
 * Results are kept by stream offset, so they stay valid when the parser's buffer moves; the
 * thread reads the buffer, so the parser calls rs_verifier_quiesce() before anything that may move
 * or free it (every return to Python). A batch covers only sections with the usual 36-byte CID
 * prefix and stops at anything else; the parser hashes alone what no batch covers, and checks
 * every section's framing itself, so errors and their order do not depend on this file. */
#include "native.h"

#include <pthread.h>
#include <sys/types.h>
#include <unistd.h>

#define BATCH 1024
#define BATCH_BYTES (4 << 20)
/* The first batch after a pause (a feed moved the buffer) is hashed here, at once: a short one. */
#define FIRST_BATCH 32
#define THREAD_STACK (1024 * 1024)


typedef struct {
    int used;      /* holds sections not yet asked about (the parser's thread only) */
    int submitted; /* handed to the thread and not yet waited for (the parser's thread only) */
    int hashed;    /* the thread is done with it (under the mutex) */
    int count, next;   /* sections in the batch; the next one the parser will ask about */
    long long next_at; /* stream offset just after the batch's last section */
    long long at[BATCH];
    Py_ssize_t block_len[BATCH];
    uint8_t ok[BATCH];
    const uint8_t *data[BATCH], *want[BATCH]; /* into the parser's buffer: used while hashing only */
    size_t lens[BATCH];
} Batch;

struct RsVerifier {
    Batch slot[2];
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    int job;  /* the slot the thread is to hash, or -1 */
    int stop; /* the thread is to end */
    int has_thread;
    pid_t pid; /* the process that started the thread (a forked child has none) */
    pthread_t thread;
};

/* Fill `b` with up to `most` complete usual sections from buf[from] on (the scan stops at anything else). */
static void scan(Batch *b, const uint8_t *buf, Py_ssize_t n, long long offset, Py_ssize_t from, Py_ssize_t max_block,
                 int most) {
    Py_ssize_t pos = from;
    size_t total = 0;
    int count = 0;
    while (count < most && pos < n && total < BATCH_BYTES) {
        Py_ssize_t start = pos;
        uint64_t length = 0;
        int shift = 0;
        for (;;) {
            if (pos >= n || shift > 56) goto scanned;
            uint8_t byte = buf[pos++];
            length |= (uint64_t)(byte & 0x7f) << shift;
            if (byte < 0x80) break;
            shift += 7;
        }
        if (length < 36 || length > (uint64_t)(n - pos) || length - 36 > (uint64_t)max_block ||
            memcmp(buf + pos, RS_CID_PREFIX, 4) != 0)
            break;
        b->at[count] = offset + start;
        b->block_len[count] = (Py_ssize_t)length - 36;
        b->data[count] = buf + pos + 36;
        b->lens[count] = (size_t)length - 36;
        b->want[count] = buf + pos + 4;
        total += b->lens[count];
        count++;
        pos += (Py_ssize_t)length;
    }
scanned:
    b->count = count;
    b->next = 0;
    b->next_at = offset + pos;
}

static void hash_batch(Batch *b) {
    uint8_t digests[BATCH][32];
    rs_sha256_many((size_t)b->count, b->data, b->lens, digests, 0);
    for (int i = 0; i < b->count; i++) b->ok[i] = memcmp(digests[i], b->want[i], 32) == 0;
}

static void *worker(void *arg) {
    RsVerifier *v = arg;
    pthread_mutex_lock(&v->mu);
    for (;;) {
        while (v->job < 0 && !v->stop) pthread_cond_wait(&v->work, &v->mu);
        if (v->stop) break;
        Batch *b = &v->slot[v->job];
        pthread_mutex_unlock(&v->mu);
        hash_batch(b);
        pthread_mutex_lock(&v->mu);
        b->hashed = 1;
        v->job = -1;
        pthread_cond_broadcast(&v->done);
    }
    pthread_mutex_unlock(&v->mu);
    return NULL;
}

static void init_sync(RsVerifier *v) {
    pthread_mutex_init(&v->mu, NULL);
    pthread_cond_init(&v->work, NULL);
    pthread_cond_init(&v->done, NULL);
    v->job = -1;
    v->stop = 0;
    v->has_thread = 0;
    v->pid = getpid();
}

/* After a fork the child has the parent's memory but not its thread (and maybe a held lock). */
static void after_fork(RsVerifier *v) {
    if (v->pid == getpid()) return;
    init_sync(v);
    for (int i = 0; i < 2; i++) v->slot[i].used = v->slot[i].submitted = 0;
}

/* Hash `b` on the thread (started on first use), or here if no thread can be had. */
static void submit(RsVerifier *v, Batch *b) {
    if (!v->has_thread) {
        pthread_attr_t attr;
        if (pthread_attr_init(&attr) == 0) {
            pthread_attr_setstacksize(&attr, THREAD_STACK);
            v->has_thread = pthread_create(&v->thread, &attr, worker, v) == 0;
            pthread_attr_destroy(&attr);
#if defined(__linux__) && defined(_GNU_SOURCE)
            if (v->has_thread) pthread_setname_np(v->thread, "rs-verify"); /* as ps and /proc show it */
#endif
        }
        if (!v->has_thread) {
            hash_batch(b);
            return;
        }
    }
    pthread_mutex_lock(&v->mu);
    b->hashed = 0;
    v->job = (int)(b - v->slot);
    pthread_cond_signal(&v->work);
    pthread_mutex_unlock(&v->mu);
    b->submitted = 1;
}

static void wait_for(RsVerifier *v, Batch *b) {
    if (!b->submitted) return;
    pthread_mutex_lock(&v->mu);
    while (!b->hashed) pthread_cond_wait(&v->done, &v->mu);
    pthread_mutex_unlock(&v->mu);
    b->submitted = 0;
}

void rs_verifier_quiesce(RsVerifier *v) {
    if (v == NULL) return;
    after_fork(v); /* here, not per section: getpid() is a system call */
    wait_for(v, &v->slot[0]);
    wait_for(v, &v->slot[1]);
}

int rs_verifier_check(RsVerifier **vp, const uint8_t *buf, Py_ssize_t n, long long offset, Py_ssize_t start,
                      Py_ssize_t ce, Py_ssize_t end, Py_ssize_t max_block) {
    RsVerifier *v = *vp;
    if (v == NULL) {
        v = PyMem_Calloc(1, sizeof *v);
        if (v == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        init_sync(v);
        *vp = v;
    }
    long long at = offset + start;
    Batch *b = NULL;
    for (int i = 0; i < 2; i++) {
        Batch *s = &v->slot[i];
        if (s->used && s->at[s->next] == at) b = s;
    }
    if (b == NULL) { /* not scanned yet (the first section, or after one no batch covered) */
        rs_verifier_quiesce(v);
        v->slot[0].used = v->slot[1].used = 0;
        b = &v->slot[0];
        scan(b, buf, n, offset, start, max_block, FIRST_BATCH);
        if (b->count == 0) return 2;
        hash_batch(b);
        b->used = 1;
    }
    wait_for(v, b);
    Batch *other = &v->slot[b == &v->slot[0] ? 1 : 0];
    if (b->next == 0 && !other->used) { /* starting on this batch: hash the next one meanwhile */
        Py_ssize_t from = (Py_ssize_t)(b->next_at - offset);
        if (from >= 0 && from < n) {
            scan(other, buf, n, offset, from, max_block, BATCH);
            if (other->count) {
                other->used = 1;
                submit(v, other);
            }
        }
    }
    if (b->block_len[b->next] != end - ce) return 2;
    int ok = b->ok[b->next];
    if (++b->next == b->count) b->used = 0;
    return ok;
}

void rs_verifier_free(RsVerifier *v) {
    if (v == NULL) return;
    if (v->has_thread && v->pid == getpid()) {
        pthread_mutex_lock(&v->mu);
        v->stop = 1;
        pthread_cond_signal(&v->work);
        pthread_mutex_unlock(&v->mu);
        pthread_join(v->thread, NULL);
    }
    PyMem_Free(v);
}
