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
/* One round; the eight working variables rotate by naming, not by moves. */
#define ROUND(a, b, c, d, e, f, g, h, i, wi)                \
    do {                                                    \
        uint32_t t1 = (h) + S1(e) + CH(e, f, g) + K[i] + (wi); \
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
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3], e = state[4], f = state[5], g = state[6],
             h = state[7];
    ROUNDS8(0, W0);
    ROUNDS8(8, W0);
    ROUNDS8(16, W);
    ROUNDS8(24, W);
    ROUNDS8(32, W);
    ROUNDS8(40, W);
    ROUNDS8(48, W);
    ROUNDS8(56, W);
    state[0] += a;
    state[1] += b;
    state[2] += c;
    state[3] += d;
    state[4] += e;
    state[5] += f;
    state[6] += g;
    state[7] += h;
}

void rs_sha256(const uint8_t *data, size_t len, uint8_t out[32]) {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    size_t full = len / 64;
    for (size_t i = 0; i < full; i++) compress(h, data + 64 * i);
    uint8_t tail[128];
    size_t rest = len - 64 * full;
    memset(tail, 0, sizeof tail);
    if (rest) memcpy(tail, data + 64 * full, rest);
    tail[rest] = 0x80;
    size_t tail_len = rest < 56 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) tail[tail_len - 1 - i] = (uint8_t)(bits >> (8 * i));
    compress(h, tail);
    if (tail_len == 128) compress(h, tail + 64);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(h[i] >> 8);
        out[4 * i + 3] = (uint8_t)h[i];
    }
}
