/* The AVX2 build's dot products for the few-token MoE block (no bf16 dot-product instruction
 * there): out[g][n] = x[g] . w[n] for rows x[g] (tokens, or their SwiGLU activations) and a weight
 * matrix w [N, K] as stored (K contiguous), called for a block of weight rows and a few tokens.
 *
 * Widening. One 256-bit load holds 16 bf16 weights (a step), widened into two fp32 vectors in
 * simd.h's split order (k 0-3 and 8-11, then 4-7 and 12-15) by shuffles alone. The x rows are
 * widened once into the same order (widen_row) and padded with zeros to whole steps.
 *
 * Blocking. A tile keeps up to 6 tokens by up to 8 weight rows of fp32 sums in registers; a cache
 * block is 48 tokens by 48 weight rows by 1024 k (a tile's x 24 KiB in L1, the block's weights
 * 96 KiB in L2, reused by every tile of the block), the sums carried between blocks of k in memory.
 * Each weight is read from memory once per 48 tokens. (Blocks of 256 k, whose weights fit L1, ran
 * about 10% slower on a Xeon: more tile starts for the same work.)
 *
 * Bits. Every output is one fp32 chain of fused multiply-adds per lane over the steps in K order
 * (low half, then high half), its 8 lanes then summed by vf_hsum's fixed tree. Tile shapes, the
 * blocking and the thread that runs a tile change none of it: a token's outputs are the same bits
 * alone or among others, on any number of threads.
 */
#ifndef DOCANALYST_DOTS_AVX2_H
#define DOCANALYST_DOTS_AVX2_H

#include "../streaming.h"
#include "block_steps.h"

#define STEP 16         /* k values per step: one 256-bit load of bf16 */
#define TILE_TOKENS 6   /* tokens per tile */
#define BLOCK_TOKENS 48 /* tokens per cache block (a multiple of TILE_TOKENS) */
#define BLOCK_ROWS 48   /* weight rows per cache block */
#define BLOCK_STEPS 64  /* steps per cache block */
/* Floats of scratch dot_products needs for sums carried between blocks of k. */
#define DOT_SCRATCH (BLOCK_TOKENS * BLOCK_ROWS * VF_LANES)

#define DOTS_INLINE static inline __attribute__((always_inline))

/* A row of K values padded to whole steps. */
static inline int64_t padded_width(int64_t K) { return (K + STEP - 1) / STEP * STEP; }

/* x [K] bf16 -> dst [padded_width(K)] fp32 in the weights' step order, zeros past K. */
static void widen_row(const uint16_t *x, int64_t K, float *dst) {
    for (int64_t k = 0; k < K; k += STEP) {
        __m256i v = bf16x16_load_n(x + k, K - k);
        vf_store(dst + k, vf_widen_low(v));
        vf_store(dst + k + VF_LANES, vf_widen_high(v));
    }
}

/* One step (k0 .. k0 + 15, `live` of them in w) of the G x R tile: acc[g][r] += x[g] . w[r], low
 * half then high half. Few tokens keep their x in registers and stream the weight rows; more keep
 * the R widened weight rows and stream x (16 registers either way). */
DOTS_INLINE void tile_step(const float *const *x, const uint16_t *w, int64_t ldw, int64_t k0, int64_t live,
                           vf acc[TILE_TOKENS][8], const int G, const int R) {
    /* The weights come from memory: ask for the next tile's rows into L2 as these are used, a
     * 64-byte line every other step (a few R-row streams alone leave memory latency-bound). */
    if ((k0 & 31) == 0)
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(w + (R + r) * ldw + k0), _MM_HINT_T1);
    for (int half = 0; half < 2; half++) {
        int64_t k = k0 + half * VF_LANES;
        if (G <= 4) {
            vf xv[4];
            for (int g = 0; g < G; g++) xv[g] = vf_load(x[g] + k);
            for (int r = 0; r < R; r++) {
                __m256i raw = bf16x16_load_n(w + r * ldw + k0, live);
                vf wv = half ? vf_widen_high(raw) : vf_widen_low(raw);
                for (int g = 0; g < G; g++) acc[g][r] = vf_fma(wv, xv[g], acc[g][r]);
            }
        } else {
            vf wv[8];
            for (int r = 0; r < R; r++) {
                __m256i raw = bf16x16_load_n(w + r * ldw + k0, live);
                wv[r] = half ? vf_widen_high(raw) : vf_widen_low(raw);
            }
            for (int g = 0; g < G; g++) {
                vf xv = vf_load(x[g] + k);
                for (int r = 0; r < R; r++) acc[g][r] = vf_fma(wv[r], xv, acc[g][r]);
            }
        }
    }
}

/* Steps [s0, s1) of the G x R tile at x[0..G), w rows 0..R. The sums start at zero on K's first
 * block, else come from `carried` (vectors [g * stride + r]); after K's last block the lanes are
 * summed into out[g][col + r], else the sums go back to `carried`. */
DOTS_INLINE void tile(const float *const *x, const uint16_t *w, int64_t ldw, int64_t K, int64_t s0, int64_t s1,
                      float *carried, int64_t stride, float *const *out, int64_t col, const int G, const int R) {
    vf acc[TILE_TOKENS][8];
    int64_t steps = (K + STEP - 1) / STEP, whole = K / STEP;
    for (int g = 0; g < G; g++)
        for (int r = 0; r < R; r++) acc[g][r] = s0 == 0 ? vf_zero() : vf_load(carried + (g * stride + r) * VF_LANES);
    int64_t end = s1 < whole ? s1 : whole;
    for (int64_t s = s0; s < end; s++) tile_step(x, w, ldw, s * STEP, STEP, acc, G, R);
    if (s1 > whole) tile_step(x, w, ldw, whole * STEP, K - whole * STEP, acc, G, R);
    for (int g = 0; g < G; g++)
        for (int r = 0; r < R; r++) {
            if (s1 == steps) out[g][col + r] = vf_hsum(acc[g][r]);
            else vf_store(carried + (g * stride + r) * VF_LANES, acc[g][r]);
        }
}

/* Weight rows a tile of G tokens takes (registers: G * R sums plus the streamed operands). */
static const int TILE_ROWS[TILE_TOKENS + 1] = {0, 8, 4, 3, 2, 2, 2};

/* The G x R tile for R = TILE_ROWS[G] or R = 1 (the rows left over). */
static void run_tile(const float *const *x, const uint16_t *w, int64_t ldw, int64_t K, int64_t s0, int64_t s1,
                     float *carried, int64_t stride, float *const *out, int64_t col, int G, int R) {
#define TILE_CASE(g, r) \
    case g * 8 + r: tile(x, w, ldw, K, s0, s1, carried, stride, out, col, g, r); break;
    switch (G * 8 + R) {
        TILE_CASE(1, 8) TILE_CASE(2, 4) TILE_CASE(3, 3) TILE_CASE(4, 2) TILE_CASE(5, 2) TILE_CASE(6, 2)
        TILE_CASE(1, 1) TILE_CASE(2, 1) TILE_CASE(3, 1) TILE_CASE(4, 1) TILE_CASE(5, 1) TILE_CASE(6, 1)
    }
#undef TILE_CASE
}

/* out[r][0] = x[r] . w[r] for R <= STREAM_CHAINS rows of K values, each with its own x (one token's
 * rows of several products): the 1 x 1 tile's chain for each, side by side, each requesting the line
 * STREAM_AHEAD_BYTES on into L1; the caller walks stretches of rows (streaming.h). */
DOTS_INLINE void one_token_dots(const float *const *x, const uint16_t *const *w, int64_t K, float *const *out,
                                const int R) {
    vf acc[STREAM_CHAINS];
    for (int r = 0; r < R; r++) acc[r] = vf_zero();
    for (int64_t k = 0; k < K; k += STEP) {
        if ((k & 31) == 0)
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(w[r] + k) + STREAM_AHEAD_BYTES, _MM_HINT_T0);
        for (int r = 0; r < R; r++) {
            __m256i raw = bf16x16_load_n(w[r] + k, K - k); /* x is padded with zeros to whole steps */
            acc[r] = vf_fma(vf_widen_low(raw), vf_load(x[r] + k), acc[r]);
            acc[r] = vf_fma(vf_widen_high(raw), vf_load(x[r] + k + VF_LANES), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r][0] = vf_hsum(acc[r]);
}

/* out[g][col + n] = x[g] . w[n] in fp32 for g < M, n < N: x[g] widened by widen_row from K values,
 * w [N, K] bf16 with row stride ldw. `scratch`: DOT_SCRATCH floats (unused when M <= TILE_TOKENS,
 * whose x rows stay in cache without blocking K). */
static void dot_products(const float *const *x, int64_t M, const uint16_t *w, int64_t ldw, int64_t N, int64_t K,
                         float *const *out, int64_t col, float *scratch) {
    int64_t steps = (K + STEP - 1) / STEP;
    int64_t block_steps = M <= TILE_TOKENS ? steps : BLOCK_STEPS;
    for (int64_t t0 = 0; t0 < M; t0 += BLOCK_TOKENS) {
        int64_t tokens = M - t0 < BLOCK_TOKENS ? M - t0 : BLOCK_TOKENS;
        for (int64_t n0 = 0; n0 < N; n0 += BLOCK_ROWS) {
            int64_t rows = N - n0 < BLOCK_ROWS ? N - n0 : BLOCK_ROWS;
            for (int64_t s0 = 0; s0 < steps; s0 += block_steps) {
                int64_t s1 = s0 + block_steps < steps ? s0 + block_steps : steps;
                for (int64_t g0 = 0; g0 < tokens; g0 += TILE_TOKENS) {
                    int G = tokens - g0 < TILE_TOKENS ? (int)(tokens - g0) : TILE_TOKENS;
                    for (int64_t r0 = 0; r0 < rows;) {
                        int R = rows - r0 >= TILE_ROWS[G] ? TILE_ROWS[G] : 1;
                        run_tile(x + t0 + g0, w + (n0 + r0) * ldw, ldw, K, s0, s1,
                                 scratch + (g0 * BLOCK_ROWS + r0) * VF_LANES, BLOCK_ROWS, out + t0 + g0, col + n0 + r0,
                                 G, R);
                        r0 += R;
                    }
                }
            }
        }
    }
}

#endif
