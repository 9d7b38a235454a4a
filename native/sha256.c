/* SHA-256 (FIPS 180-4), written for repo-stream: MST key layers and --verify block hashes.
 * Plain portable C; no library (OpenSSL 3's one-shot SHA256() costs ~10x this on 30-byte keys). */
#include "native.h"



static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
#define S0(x) (ROTR(x, 2) ^ ROTR(x, 13) ^ ROTR(x, 22))
#define S1(x) (ROTR(x, 6) ^ ROTR(x, 11) ^ ROTR(x, 25))
#define s0(x) (ROTR(x, 7) ^ ROTR(x, 18) ^ ((x) >> 3))
#define s1(x) (ROTR(x, 17) ^ ROTR(x, 19) ^ ((x) >> 10))
#define CH(e, f, g) ((g) ^ ((e) & ((f) ^ (g))))
#define MAJ(a, b, c) (((a) & (b)) | ((c) & ((a) | (b))))
/* The message schedule word for round i (i >= 16), kept in a 16-word ring. */
#define W(i) (w[(i) & 15] += s1(w[((i) - 2) & 15]) + w[((i) - 7) & 15] + s0(w[((i) - 15) & 15]))
/* One round; the eight working variables rotate by naming, not by moves. Type-generic: the
 * scalar compress() runs it on uint32_t, sha256_lanes.h on vectors of one word per lane. */
#define ROUND(a, b, c, d, e, f, g, h, i, wi)                \
    do {                                                    \
        __typeof__(h) t1 = (h) + S1(e) + CH(e, f, g) + K[i] + (wi); \
        (d) += t1;                                          \
        (h) = t1 + S0(a) + MAJ(a, b, c);                    \
    } while (0)
#define ROUNDS8(i, WI)                                      \
    ROUND(a, b, c, d, e, f, g, h, (i) + 0, WI((i) + 0));    \
    ROUND(h, a, b, c, d, e, f, g, (i) + 1, WI((i) + 1));    \
    ROUND(g, h, a, b, c, d, e, f, (i) + 2, WI((i) + 2));    \
    ROUND(f, g, h, a, b, c, d, e, (i) + 3, WI((i) + 3));    \
    ROUND(e, f, g, h, a, b, c, d, (i) + 4, WI((i) + 4));    \
    ROUND(d, e, f, g, h, a, b, c, (i) + 5, WI((i) + 5));    \
    ROUND(c, d, e, f, g, h, a, b, (i) + 6, WI((i) + 6));    \
    ROUND(b, c, d, e, f, g, h, a, (i) + 7, WI((i) + 7))
#define W0(i) (w[i])
/* The 64 rounds over a..h, with the message schedule in w[16]. */
#define ROUNDS64     \
    ROUNDS8(0, W0);  \
    ROUNDS8(8, W0);  \
    ROUNDS8(16, W);  \
    ROUNDS8(24, W);  \
    ROUNDS8(32, W);  \
    ROUNDS8(40, W);  \
    ROUNDS8(48, W);  \
    ROUNDS8(56, W)
/* One block: the 64 rounds on the state st[8] (of type T: uint32_t, or a vector of lanes), with
 * the message schedule in w[16]. */
#define COMPRESS(T, st)                                                                                      \
    do {                                                                                                     \
        T a = (st)[0], b = (st)[1], c = (st)[2], d = (st)[3], e = (st)[4], f = (st)[5], g = (st)[6], h = (st)[7]; \
        ROUNDS64;                                                                                            \
        (st)[0] += a;                                                                                        \
        (st)[1] += b;                                                                                        \
        (st)[2] += c;                                                                                        \
        (st)[3] += d;                                                                                        \
        (st)[4] += e;                                                                                        \
        (st)[5] += f;                                                                                        \
        (st)[6] += g;                                                                                        \
        (st)[7] += h;                                                                                        \
    } while (0)

/* A BMI2 clone (rorx: rotates without a copy, ~25% fewer instructions) is picked at load time
 * where the CPU has it; the plain one everywhere else. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
__attribute__((target_clones("bmi2", "default")))
#endif
static void compress(uint32_t state[8], const uint8_t block[64]) {
    uint32_t w[16];
    for (int i = 0; i < 16; i++)
        w[i] = ((uint32_t)block[4 * i] << 24) | ((uint32_t)block[4 * i + 1] << 16) |
               ((uint32_t)block[4 * i + 2] << 8) | (uint32_t)block[4 * i + 3];
    COMPRESS(uint32_t, state);
}

static const uint32_t IV[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

/* The padding blocks of a message of `len` bytes whose last `rest` (< 64) bytes are at `last`:
 * those bytes, 0x80, zeros, and the length in bits (FIPS 180-4 5.1.1). Returns 1 or 2 blocks. */
static int pad_tail(uint8_t tail[128], const uint8_t *last, size_t rest, size_t len) {
    memset(tail, 0, 128);
    if (rest) memcpy(tail, last, rest);
    tail[rest] = 0x80;
    int blocks = rest < 56 ? 1 : 2;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) tail[64 * blocks - 1 - i] = (uint8_t)(bits >> (8 * i));
    return blocks;
}

static void digest_out(const uint32_t h[8], uint8_t out[32]) {
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(h[i] >> 8);
        out[4 * i + 3] = (uint8_t)h[i];
    }
}

/* --- the SHA extensions (x86 SHA-NI) ------------------------------------------------------------- */

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define RS_SHA_NI 1

/* The SHA-NI rounds, written out (no loop: the schedule words stay in registers and the CPU
 * overlaps the schedule of the next four rounds with these). sha256rnds2 does two rounds on the
 * state held as ABEF (s0) and CDGH (s1); sha256msg1/msg2 extend the message schedule four words at
 * a time (W[t] = s1(W[t-2]) + W[t-7] + s0(W[t-15]) + W[t-16]). The macros take a suffix L naming
 * one message's variables (s0L, s1L and w0L..w3L, the last 16 schedule words), so that two
 * messages' independent rounds can be interleaved. */
#define SHANI_RNDS(L, m, g)                                                       \
    do {                                                                          \
        __m128i k_ = _mm_add_epi32(m, _mm_loadu_si128((const __m128i *)&K[4 * (g)])); \
        s1##L = _mm_sha256rnds2_epu32(s1##L, s0##L, k_);                          \
        s0##L = _mm_sha256rnds2_epu32(s0##L, s1##L, _mm_shuffle_epi32(k_, 0x0E));  \
    } while (0)
/* Rounds 4g..4g+3 for g < 4: the words straight from the block at p (big-endian). */
#define SHANI_FIRST(L, p, i, g)                                                                   \
    do {                                                                                          \
        w##i##L = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)((p) + 16 * (g))), swap);     \
        SHANI_RNDS(L, w##i##L, g);                                                                \
    } while (0)
/* Rounds 4g..4g+3 for g >= 4: W[t-16] + s0(W[t-15]), + W[t-7], + s1(W[t-2]). */
#define SHANI_NEXT(L, a, b, c, d, g)                                                                                 \
    do {                                                                                                             \
        w##a##L = _mm_sha256msg2_epu32(_mm_add_epi32(_mm_sha256msg1_epu32(w##a##L, w##b##L), _mm_alignr_epi8(w##d##L, w##c##L, 4)), \
                                       w##d##L);                                                                     \
        SHANI_RNDS(L, w##a##L, g);                                                                                   \
    } while (0)
#define SHANI_NEXT4(L, g)                \
    SHANI_NEXT(L, 0, 1, 2, 3, (g));     \
    SHANI_NEXT(L, 1, 2, 3, 0, (g) + 1); \
    SHANI_NEXT(L, 2, 3, 0, 1, (g) + 2); \
    SHANI_NEXT(L, 3, 0, 1, 2, (g) + 3)

/* h0..h7 into ABEF, CDGH and back. */
__attribute__((target("sha,sse4.1"))) static inline void shani_in(const uint32_t state[8], __m128i *s0, __m128i *s1) {
    __m128i tmp = _mm_loadu_si128((const __m128i *)&state[0]); /* DCBA */
    __m128i hgfe = _mm_loadu_si128((const __m128i *)&state[4]); /* HGFE */
    tmp = _mm_shuffle_epi32(tmp, 0xB1);                        /* CDAB */
    hgfe = _mm_shuffle_epi32(hgfe, 0x1B);                      /* EFGH */
    *s0 = _mm_alignr_epi8(tmp, hgfe, 8);                       /* ABEF */
    *s1 = _mm_blend_epi16(hgfe, tmp, 0xF0);                    /* CDGH */
}

__attribute__((target("sha,sse4.1"))) static inline void shani_out(uint32_t state[8], __m128i s0, __m128i s1) {
    __m128i tmp = _mm_shuffle_epi32(s0, 0x1B); /* FEBA */
    s1 = _mm_shuffle_epi32(s1, 0xB1);          /* DCHG */
    s0 = _mm_blend_epi16(tmp, s1, 0xF0);       /* DCBA */
    s1 = _mm_alignr_epi8(s1, tmp, 8);          /* HGFE */
    _mm_storeu_si128((__m128i *)&state[0], s0);
    _mm_storeu_si128((__m128i *)&state[4], s1);
}

/* `n` 64-byte blocks into state (h0..h7), with the SHA-NI instructions. */
__attribute__((target("sha,sse4.1"))) static void compress_shani(uint32_t state[8], const uint8_t *data, size_t n) {
    const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL); /* big-endian words */
    __m128i s0X, s1X;
    shani_in(state, &s0X, &s1X);
    while (n--) {
        __m128i save0 = s0X, save1 = s1X, w0X, w1X, w2X, w3X;
        SHANI_FIRST(X, data, 0, 0);
        SHANI_FIRST(X, data, 1, 1);
        SHANI_FIRST(X, data, 2, 2);
        SHANI_FIRST(X, data, 3, 3);
        SHANI_NEXT4(X, 4);
        SHANI_NEXT4(X, 8);
        SHANI_NEXT4(X, 12);
        s0X = _mm_add_epi32(s0X, save0);
        s1X = _mm_add_epi32(s1X, save1);
        data += 64;
    }
    shani_out(state, s0X, s1X);
}

/* A message as blocks: `full` 64-byte blocks at data, then the padding blocks at tail. */
typedef struct {
    const uint8_t *data;
    size_t full;
    const uint8_t *tail;
} Blocks;

static inline const uint8_t *block_at(const Blocks *m, size_t j) { return j < m->full ? m->data + 64 * j : m->tail + 64 * (j - m->full); }

/* Blocks j..n-1 of m into state, one message at a time. */
static void compress_shani_from(uint32_t state[8], const Blocks *m, size_t j, size_t n) {
    if (j < m->full) {
        compress_shani(state, m->data + 64 * j, m->full - j);
        j = m->full;
    }
    if (j < n) compress_shani(state, m->tail + 64 * (j - m->full), n - j);
}

/* Blocks 0..n-1 of two messages into their states, the two messages' rounds interleaved: two
 * independent chains of sha256rnds2, whose latency (not its throughput) bounds one message. */
__attribute__((target("sha,sse4.1"))) static void compress_shani_x2(uint32_t state_a[8], const Blocks *a, uint32_t state_b[8], const Blocks *b,
                                                                  size_t n) {
    const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i s0A, s1A, s0B, s1B;
    shani_in(state_a, &s0A, &s1A);
    shani_in(state_b, &s0B, &s1B);
    for (size_t j = 0; j < n; j++) {
        const uint8_t *pa = block_at(a, j), *pb = block_at(b, j);
        __m128i save0A = s0A, save1A = s1A, save0B = s0B, save1B = s1B;
        __m128i w0A, w1A, w2A, w3A, w0B, w1B, w2B, w3B;
        SHANI_FIRST(A, pa, 0, 0);
        SHANI_FIRST(B, pb, 0, 0);
        SHANI_FIRST(A, pa, 1, 1);
        SHANI_FIRST(B, pb, 1, 1);
        SHANI_FIRST(A, pa, 2, 2);
        SHANI_FIRST(B, pb, 2, 2);
        SHANI_FIRST(A, pa, 3, 3);
        SHANI_FIRST(B, pb, 3, 3);
        for (int g = 4; g < 16; g += 4) {
            SHANI_NEXT(A, 0, 1, 2, 3, g);
            SHANI_NEXT(B, 0, 1, 2, 3, g);
            SHANI_NEXT(A, 1, 2, 3, 0, g + 1);
            SHANI_NEXT(B, 1, 2, 3, 0, g + 1);
            SHANI_NEXT(A, 2, 3, 0, 1, g + 2);
            SHANI_NEXT(B, 2, 3, 0, 1, g + 2);
            SHANI_NEXT(A, 3, 0, 1, 2, g + 3);
            SHANI_NEXT(B, 3, 0, 1, 2, g + 3);
        }
        s0A = _mm_add_epi32(s0A, save0A);
        s1A = _mm_add_epi32(s1A, save1A);
        s0B = _mm_add_epi32(s0B, save0B);
        s1B = _mm_add_epi32(s1B, save1B);
    }
    shani_out(state_a, s0A, s1A);
    shani_out(state_b, s0B, s1B);
}

/* Whether the CPU has the SHA extensions (and the SSSE3/SSE4.1 the code around them uses). */
static int have_sha_ni(void) {
    static int have = -1;
    if (have < 0) {
        unsigned a, b, c, d;
        have = 0;
        if (__get_cpuid(1, &a, &b, &c, &d) && (c & bit_SSSE3) && (c & bit_SSE4_1) && __get_cpuid_count(7, 0, &a, &b, &c, &d))
            have = (b >> 29) & 1;
    }
    return have;
}
#endif

/* rs_sha256 with the portable rounds only (for tests: both must give the same digests). */
void rs_sha256_portable(const uint8_t *data, size_t len, uint8_t out[32]) {
    uint32_t h[8];
    memcpy(h, IV, sizeof h);
    size_t full = len / 64;
    for (size_t i = 0; i < full; i++) compress(h, data + 64 * i);
    uint8_t tail[128];
    int blocks = pad_tail(tail, data + 64 * full, len - 64 * full, len);
    compress(h, tail);
    if (blocks == 2) compress(h, tail + 64);
    digest_out(h, out);
}

void rs_sha256(const uint8_t *data, size_t len, uint8_t out[32]) {
#ifdef RS_SHA_NI
    if (have_sha_ni()) {
        uint32_t h[8];
        memcpy(h, IV, sizeof h);
        size_t full = len / 64;
        if (full) compress_shani(h, data, full);
        uint8_t tail[128];
        int blocks = pad_tail(tail, data + 64 * full, len - 64 * full, len);
        compress_shani(h, tail, (size_t)blocks);
        digest_out(h, out);
        return;
    }
#endif
    rs_sha256_portable(data, len, out);
}

void rs_sha256_x2(const uint8_t *data_a, size_t len_a, const uint8_t *data_b, size_t len_b, uint8_t out_a[32], uint8_t out_b[32]) {
#ifdef RS_SHA_NI
    if (have_sha_ni()) {
        uint8_t tail_a[128], tail_b[128];
        Blocks a = {data_a, len_a / 64, tail_a}, b = {data_b, len_b / 64, tail_b};
        size_t n_a = a.full + (size_t)pad_tail(tail_a, data_a + 64 * a.full, len_a - 64 * a.full, len_a);
        size_t n_b = b.full + (size_t)pad_tail(tail_b, data_b + 64 * b.full, len_b - 64 * b.full, len_b);
        size_t both = n_a < n_b ? n_a : n_b;
        uint32_t h_a[8], h_b[8];
        memcpy(h_a, IV, sizeof h_a);
        memcpy(h_b, IV, sizeof h_b);
        compress_shani_x2(h_a, &a, h_b, &b, both);
        compress_shani_from(h_a, &a, both, n_a);
        compress_shani_from(h_b, &b, both, n_b);
        digest_out(h_a, out_a);
        digest_out(h_b, out_b);
        return;
    }
#endif
    rs_sha256_portable(data_a, len_a, out_a);
    rs_sha256_portable(data_b, len_b, out_b);
}

/* --- many messages at once ---------------------------------------------------------------------- */

/* One lane of the multi-buffer engine (sha256_lanes.h): the message it hashes and where it is. */
typedef struct {
    const uint8_t *next_full; /* the next full 64-byte block of the message */
    size_t full_left;         /* full blocks left */
    int tail_left;            /* padding blocks left after them */
    int tail_blocks;          /* padding blocks in all (1 or 2) */
    int busy;                 /* 0: idle, hashing nothing */
    size_t job;               /* the message's index */
    uint8_t tail[128];
} Lane;

static void lane_start(Lane *lane, size_t job, const uint8_t *msg, size_t len) {
    size_t full = len / 64;
    lane->next_full = msg;
    lane->full_left = full;
    lane->tail_blocks = lane->tail_left = pad_tail(lane->tail, msg + 64 * full, len - 64 * full, len);
    lane->busy = 1;
    lane->job = job;
}

/* Vector lanes need GCC or clang on x86-64; sanitizer builds keep them (they are plain C). */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RS_SHA256_LANES 1

typedef uint32_t rs_u32x16 __attribute__((vector_size(64)));

/* Load the 64-byte blocks of 16 lanes and transpose them: w[i] = word i of each lane (a 16x16
 * transpose of 32-bit words: interleave words, then pairs, then 128-bit quarters twice). */
__attribute__((target("avx512f"))) static inline void load16(const uint8_t *const block[16], rs_u32x16 w[16]) {
    __m512i r[16], t[16], u[16];
    for (int l = 0; l < 16; l++) r[l] = _mm512_loadu_si512((const void *)block[l]);
    for (int k = 0; k < 16; k += 2) {
        t[k] = _mm512_unpacklo_epi32(r[k], r[k + 1]);     /* per quarter q: rows k, k+1, words 4q, 4q+1 */
        t[k + 1] = _mm512_unpackhi_epi32(r[k], r[k + 1]); /* words 4q+2, 4q+3 */
    }
    for (int g = 0; g < 16; g += 4) { /* u[g+j], quarter q: word 4q+j of rows g..g+3 */
        u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
        u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
        u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
        u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
    }
    for (int j = 0; j < 4; j++) { /* 0x88: quarters 0, 2 of each; 0xdd: quarters 1, 3 */
        __m512i a02 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88), a13 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);
        __m512i b02 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
        __m512i b13 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
        w[j] = (rs_u32x16)_mm512_shuffle_i32x4(a02, b02, 0x88);
        w[j + 8] = (rs_u32x16)_mm512_shuffle_i32x4(a02, b02, 0xdd);
        w[j + 4] = (rs_u32x16)_mm512_shuffle_i32x4(a13, b13, 0x88);
        w[j + 12] = (rs_u32x16)_mm512_shuffle_i32x4(a13, b13, 0xdd);
    }
}

#define LANES_FN sha256_lanes16
#define LANES 16
#define LANES_TARGET "avx512f"
#define LANES_VEC rs_u32x16_lanes
#define LANES_LOAD load16
#include "sha256_lanes.h"
#define LANES_FN sha256_lanes8
#define LANES 8
#define LANES_TARGET "avx2"
#define LANES_VEC rs_u32x8
#include "sha256_lanes.h"
#endif

int rs_sha256_lanes(void) {
    static int lanes = 0;
    if (lanes == 0) {
        lanes = 1;
#ifdef RS_SHA256_LANES
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f"))
            lanes = 16;
        else if (__builtin_cpu_supports("avx2"))
            lanes = 8;
#endif
    }
    return lanes;
}

void rs_sha256_many(size_t n, const uint8_t *const *data, const size_t *len, uint8_t (*out)[32], int lanes) {
    if (lanes <= 0 || lanes > rs_sha256_lanes()) lanes = rs_sha256_lanes();
#ifdef RS_SHA_NI
    /* The SHA extensions (two messages at a time) beat the vector lanes but on short messages
     * (~1 us per KiB against ~1.2; a 30-byte key ~0.2 us against ~0.12): blocks go two by two. */
    if (lanes > 1 && have_sha_ni()) {
        size_t total = 0;
        for (size_t i = 0; i < n; i++) total += len[i];
        if (total >= 128 * n) lanes = 1;
    }
#endif
#ifdef RS_SHA256_LANES
    if (lanes == 16 && n > 1) {
        sha256_lanes16(n, data, len, out);
        return;
    }
    if (lanes >= 8 && n > 1) {
        sha256_lanes8(n, data, len, out);
        return;
    }
#endif
    size_t i = 0;
    for (; i + 1 < n; i += 2) rs_sha256_x2(data[i], len[i], data[i + 1], len[i + 1], out[i], out[i + 1]);
    if (i < n) rs_sha256(data[i], len[i], out[i]);
}
