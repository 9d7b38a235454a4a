/* SHA-256 of many messages at once, one message per vector lane (multi-buffer hashing).
 *
 * Included by sha256.c once per vector width, with these defined:
 *   LANES_FN      the function's name
 *   LANES         lanes per vector (16 for AVX-512, 8 for AVX2)
 *   LANES_TARGET  the GCC target attribute string ("avx512f", "avx2")
 * and the scalar round macros of sha256.c (COMPRESS, ROUNDS64 and what they use, with the table K), which
 * are type-generic: here they act on GCC vector types, one independent hash per lane.
 *
 * The messages stream through the lanes: a lane that has hashed its message's last block writes
 * the digest and takes the next message, so lanes stay busy whatever the lengths. Each step
 * gathers one 64-byte block per lane (the message's next full block, then its one or two padding
 * blocks, FIPS 180-4 5.1.1), transposes it into 16 word vectors and runs the 64 rounds on all
 * lanes (LANES_LOAD, if defined, loads and transposes the blocks: w[i] = word i of every lane,
 * byte order as in memory). Nothing is read outside a message: padding blocks are built in the lane's own buffer. */

typedef uint32_t LANES_VEC __attribute__((vector_size(4 * LANES)));

/* Give lane l message j, or leave it idle when none is left. */
#define LANES_TAKE(l)                                                   \
    do {                                                                \
        if (next < n) {                                                 \
            lane_start(&lanes[l], next, data[next], len[next]);         \
            for (int k_ = 0; k_ < 8; k_++) s[k_][l] = IV[k_];           \
            next++;                                                     \
        } else if (lanes[l].busy) {                                     \
            lanes[l].busy = 0;                                          \
            active--;                                                   \
        }                                                               \
    } while (0)

__attribute__((target(LANES_TARGET))) static void LANES_FN(size_t n, const uint8_t *const *data, const size_t *len,
                                                            uint8_t (*out)[32]) {
    static const uint8_t idle_block[64];
    Lane lanes[LANES];
    LANES_VEC s[8];
    size_t next = 0;
    int active = LANES;

    for (int k = 0; k < 8; k++) s[k] = (LANES_VEC){0};
    for (int l = 0; l < LANES; l++) {
        lanes[l].busy = 1;
        LANES_TAKE(l);
    }
    while (active) {
        const uint8_t *block[LANES];
        for (int l = 0; l < LANES; l++) {
            const Lane *lane = &lanes[l];
            if (!lane->busy)
                block[l] = idle_block;
            else if (lane->full_left)
                block[l] = lane->next_full;
            else
                block[l] = lane->tail + 64 * (lane->tail_blocks - lane->tail_left);
        }
        LANES_VEC w[16];
#ifdef LANES_LOAD
        LANES_LOAD(block, w);
        for (int i = 0; i < 16; i++) /* big-endian words */
            w[i] = (((w[i] << 8) | (w[i] >> 24)) & 0x00ff00ff) | (((w[i] >> 8) | (w[i] << 24)) & 0xff00ff00);
#else
        uint32_t m[16][LANES];
        for (int l = 0; l < LANES; l++)
            for (int i = 0; i < 16; i++) {
                uint32_t word;
                memcpy(&word, block[l] + 4 * i, 4);
                m[i][l] = __builtin_bswap32(word);
            }
        memcpy(w, m, sizeof w);
#endif
        COMPRESS(LANES_VEC, s);
        for (int l = 0; l < LANES; l++) {
            Lane *lane = &lanes[l];
            if (!lane->busy) continue;
            if (lane->full_left) {
                lane->full_left--;
                lane->next_full += 64;
                continue;
            }
            if (--lane->tail_left) continue;
            for (int k = 0; k < 8; k++) {
                uint32_t word = __builtin_bswap32(s[k][l]);
                memcpy(out[lane->job] + 4 * k, &word, 4);
            }
            LANES_TAKE(l);
        }
    }
}

#undef LANES_TAKE
#undef LANES_FN
#undef LANES
#undef LANES_TARGET
#undef LANES_VEC
#undef LANES_LOAD
