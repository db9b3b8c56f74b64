/* The pair dot-product path of causal_bf16.c's AVX-512 build, included there: the packed layouts
 * of a block of keys and values, the products of a few rows against a block, and the online-softmax
 * step. Everything here works on one block and a handful of rows; the walk over blocks and chunks,
 * the threads and the fold of chunk states are causal_bf16.c's. */
#ifndef DOCANALYST_CAUSAL_PAIRS_H
#define DOCANALYST_CAUSAL_PAIRS_H

#include "../bf16_simd.h"

#define KEYS_PER_BLOCK 256
#define PREFETCH_KEYS 16 /* how far ahead the packing requests keys and values */
/* Tiles of at most this many rows pack a block SUB_KEYS keys at a time: decode and the verification of
 * up to three drafts with 8 query heads a K/V head (the 80B's; four tokens, 32 rows). Three tokens over
 * 32K keys at D 256 took 5% less time here than through whole packed blocks. */
#define FEW_ROWS 32
#define SUB_KEYS 32
/* Rows of a tile of many (prefill) that share each packed load: 6 x 4 accumulators, 4 keys or
 * values and the broadcast query fill 29 of the 32 registers. Against 4 rows, a 2,048-token causal
 * prompt at D 256 went from ~715 to ~805 GFLOP/s on two Zen 5 cores, 2,048 tokens over 30,720
 * cached from ~750 to ~875 (same bits: each lane is its own chain whatever the group). */
#define ROWS_PER_GROUP 6
/* Rows of a few-row tile scored together: 12 x 2 accumulators, 2 packed key lines and the query. With
 * outputs 6 rows at a time (ROWS_PER_GROUP), three tokens over 32K keys at D 256 took 5% less time than
 * with 8 and 4. */
#define SCORE_ROWS 12

typedef uint32_t pair_t __attribute__((aligned(2), may_alias)); /* two bf16 read as one lane */

typedef struct {
    const uint16_t *query; /* [D] */
    uint16_t *out;         /* [D] */
    const uint16_t *gate;  /* [D], or NULL */
    int64_t visible;       /* keys 0 .. visible - 1 */
    float max;             /* running max of the scores, times scale * log2(e) */
    float *acc;            /* [D] fp32 */
    float sum[16];         /* running sum of the probabilities, lane by lane */
} Row;

/* Keys and values requested from memory while a block is computed, a few lines at each step of the
 * products, so that reading them overlaps the products (decode is otherwise memory, then compute):
 * each of two streams requests LINES lines from `at` a step (a constant where the products are
 * compiled: a count read at run time slowed prefill 2-3%), until it reaches its end. */
typedef struct {
    const char *at[2], *end[2];
} Ahead;

static inline __attribute__((always_inline)) void request_ahead(Ahead *ahead, const int LINES) {
    for (int s = 0; s < 2; s++)
        if (ahead->at[s] < ahead->end[s]) {
            for (int i = 0; i < LINES; i++) _mm_prefetch(ahead->at[s] + 64 * i, _MM_HINT_T1);
            ahead->at[s] += 64 * LINES;
        }
}

/* Keys of a block as pairs along D: packed[p * width + j] = K[j][2p] | K[j][2p + 1] << 16 (width: keys
 * per packed line), zero for keys past the block's last up to `filled`, a multiple of 16 (scores
 * are read that many keys at a time). */
static void pack_keys(const uint16_t *keys, int64_t ld, int64_t D, int in_block, int filled, uint32_t *packed,
                      int64_t width) {
    int64_t pairs = D / 2;
    for (int j0 = 0; j0 < filled; j0 += 16) {
        int valid = in_block - j0 < 16 ? in_block - j0 : 16;
        for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
            int64_t here = pairs - p0 < 16 ? pairs - p0 : 16;
            __mmask16 live = (__mmask16)((1u << here) - 1);
            __m512i rows[16];
            const uint16_t *key = keys + j0 * ld + 2 * p0;
            if (valid == 16) {
                /* Whole tiles unrolled, so that the rows stay in registers (a loop to `valid` kept
                 * them on the stack: twice the time). The keys PREFETCH_KEYS on (into the next
                 * block at its end) are requested into L2: with few rows (decode) the loop waits
                 * on memory. A whole block ahead measured 5-14% slower. */
#pragma GCC unroll 16
                for (int j = 0; j < 16; j++) {
                    _mm_prefetch((const char *)(key + (PREFETCH_KEYS + j) * ld), _MM_HINT_T1);
                    rows[j] = _mm512_maskz_loadu_epi32(live, key + j * ld);
                }
            } else {
                for (int j = 0; j < 16; j++)
                    rows[j] = j < valid ? _mm512_maskz_loadu_epi32(live, key + j * ld) : _mm512_setzero_si512();
            }
            transpose16(rows);
            for (int64_t p = 0; p < here; p++) _mm512_storeu_si512(packed + (p0 + p) * width + j0, rows[p]);
        }
    }
}

/* Indices of the first (half 0) or second (half 1) 32 words of an interleave of a and b (32 words
 * each) by _mm512_permutex2var_epi16: a[i], b[i], a[i + 1], b[i + 1], ... from i = 16 * half. */
static inline __m512i interleave_half(int half) {
    uint16_t index[32];
    for (int i = 0; i < 32; i++) index[i] = (uint16_t)(i / 2 + (i % 2) * 32 + 16 * half);
    return _mm512_loadu_si512(index);
}

/* A key pair's values as bf16 pairs, 16 channels a vector (lane i: first[i] | second[i] << 16; second
 * read only where its mask is set, else zeros): 32 channels into two vectors (half: interleave_half's
 * indices), or 16 into one. The layout both value products read, packed or straight from the cache. */
static inline __attribute__((always_inline)) void value_pairs32(const uint16_t *first, const uint16_t *second,
                                                               __mmask32 has_second, const __m512i half[2],
                                                               __m512i out[2]) {
    __m512i a = _mm512_loadu_si512(first), b = _mm512_maskz_loadu_epi16(has_second, second);
    out[0] = _mm512_permutex2var_epi16(a, half[0], b);
    out[1] = _mm512_permutex2var_epi16(a, half[1], b);
}

static inline __attribute__((always_inline)) __m512i value_pairs16(const uint16_t *first, const uint16_t *second,
                                                                  __mmask16 has_second) {
    __m512i low = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)first));
    __m512i high = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(has_second, second));
    return _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
}

/* Values of one block as bf16 pairs: packed[j * D + d] = V[2j][d] | V[2j + 1][d] << 16 for the
 * pairs the block's keys fill (zero past its last key). */
static void pack_values(const uint16_t *values, int64_t ld, int64_t D, int in_block, uint32_t *packed) {
    const __m512i half[2] = { interleave_half(0), interleave_half(1) };
    for (int j = 0; 2 * j < in_block; j++) {
        const uint16_t *first = values + 2 * j * ld, *second = first + ld;
        __mmask32 has_second = 2 * j + 1 < in_block ? ~(__mmask32)0 : 0;
        int64_t d = 0;
        for (; d + 32 <= D; d += 32) {
            _mm_prefetch((const char *)(first + PREFETCH_KEYS * ld + d), _MM_HINT_T1);
            _mm_prefetch((const char *)(second + PREFETCH_KEYS * ld + d), _MM_HINT_T1);
            __m512i pairs[2];
            value_pairs32(first + d, second + d, has_second, half, pairs);
            _mm512_storeu_si512(packed + j * D + d, pairs[0]);
            _mm512_storeu_si512(packed + j * D + d + 16, pairs[1]);
        }
        if (d < D)
            _mm512_storeu_si512(packed + j * D + d, value_pairs16(first + d, second + d, (__mmask16)has_second));
    }
}

/* A whole block in the layouts the many-row and tile products read (keys 64 at a time). */
static void pack_block(const uint16_t *keys, const uint16_t *values, int64_t ld, int64_t D, int in_block,
                       uint32_t *packed_keys, uint32_t *packed_values) {
    pack_keys(keys, ld, D, in_block, (in_block + 63) / 64 * 64, packed_keys, KEYS_PER_BLOCK);
    pack_values(values, ld, D, in_block, packed_values);
}

/* scores[r][at + j] = q_r . k_j (unscaled) for R rows (up to SCORE_ROWS) and the packed keys
 * (`width` a line), 16 * V keys at a time: lane j accumulates the pairs of D in order, sharing each
 * packed key load between the rows. top[r] takes the lane-wise max of the scores row r sees (its
 * first n[r] of these keys). */
static inline __attribute__((always_inline)) void group_scores(Row *rows, const int R, const int V,
                                                              const uint32_t *keys, int64_t width, int64_t pairs,
                                                              int seen, const int *n, float scores[][KEYS_PER_BLOCK],
                                                              int at, __m512 *top, Ahead *ahead,
                                                              const int LINES) {
    const pair_t *query[SCORE_ROWS];
    for (int r = 0; r < R; r++) query[r] = (const pair_t *)rows[r].query;
    for (int j0 = 0; j0 < seen; j0 += 16 * V) {
        __m512 acc[SCORE_ROWS][4];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < V; c++) acc[r][c] = _mm512_setzero_ps();
        for (int64_t p = 0; p < pairs; p++) {
            request_ahead(ahead, LINES);
            const uint32_t *k = keys + p * width + j0;
            __m512bh key[4];
            for (int c = 0; c < V; c++) key[c] = (__m512bh)_mm512_loadu_si512(k + 16 * c);
            for (int r = 0; r < R; r++) {
                __m512bh q = (__m512bh)_mm512_set1_epi32((int)query[r][p]);
                for (int c = 0; c < V; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], q, key[c]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < V; c++) {
                _mm512_storeu_ps(scores[r] + at + j0 + 16 * c, acc[r][c]);
                int live = n[r] - j0 - 16 * c;
                __mmask16 mask = (__mmask16)(live >= 16 ? 0xffff : (live <= 0 ? 0 : (1u << live) - 1));
                top[r] = _mm512_mask_max_ps(top[r], mask, top[r], acc[r][c]);
            }
    }
}

/* acc_r[offset + 16c] = acc_r * correction_r (when rescale) + sum over `pairs` packed key pairs of
 * probs . values, the probabilities from pair `from` of the block, for CH slices of 16 channels;
 * lane d of each row is one chain in key order. */
static inline __attribute__((always_inline)) void group_values(Row *rows, const int R, const __m512 *correction,
                                                              const uint32_t probs[][KEYS_PER_BLOCK / 2], int from,
                                                              const uint32_t *values, int64_t D, int64_t offset,
                                                              int pairs, const int CH, int rescale, Ahead *ahead) {
    __m512 acc[ROWS_PER_GROUP][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < CH; c++) {
            acc[r][c] = _mm512_loadu_ps(rows[r].acc + offset + 16 * c);
            if (rescale) acc[r][c] = _mm512_mul_ps(acc[r][c], correction[r]);
        }
    for (int j = 0; j < pairs; j++) {
        request_ahead(ahead, 1);
        const uint32_t *v = values + j * D + offset;
        __m512bh slice[4];
        for (int c = 0; c < CH; c++) slice[c] = (__m512bh)_mm512_loadu_si512(v + 16 * c);
        for (int r = 0; r < R; r++) {
            __m512bh p = (__m512bh)_mm512_set1_epi32((int)probs[r][from + j]);
            for (int c = 0; c < CH; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], p, slice[c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < CH; c++) _mm512_storeu_ps(rows[r].acc + offset + 16 * c, acc[r][c]);
}

/* probs[j] = bf16(2^(scores[j] * scale - best)) for j < limit (zero from n on; limit a multiple
 * of 32; rounded to nearest even, tiny values flushed to zero); returns their lane-wise sums, added
 * in key order. Whole steps of 32 seen keys take the same operations without masks. */
static inline __m512 exponentials(const float *scores, int n, int limit, __m512 scale_v, __m512 best_v,
                                  uint16_t *probs) {
    __m512 total = _mm512_setzero_ps();
    int j0 = 0;
    for (; j0 + 32 <= n; j0 += 32) {
        __m512 p0 = exp2_512(_mm512_fmsub_ps(_mm512_loadu_ps(scores + j0), scale_v, best_v));
        __m512 p1 = exp2_512(_mm512_fmsub_ps(_mm512_loadu_ps(scores + j0 + 16), scale_v, best_v));
        total = _mm512_add_ps(_mm512_add_ps(total, p0), p1);
        _mm512_storeu_si512(probs + j0, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    }
    for (; j0 < limit; j0 += 32) {
        __m512 p[2];
        for (int half = 0; half < 2; half++) {
            int start = j0 + 16 * half, live_count = n - start < 0 ? 0 : (n - start > 16 ? 16 : n - start);
            __mmask16 live = (__mmask16)((1u << live_count) - 1);
            __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(scores + start), scale_v, best_v);
            p[half] = _mm512_maskz_mov_ps(live, exp2_512(x));
            total = _mm512_add_ps(total, p[half]);
        }
        _mm512_storeu_si512(probs + j0, (__m512i)_mm512_cvtne2ps_pbh(p[1], p[0]));
    }
    return total;
}

/* Online-softmax update of one row from its raw block scores, of which the first n count (top:
 * their lane-wise max): p = 2^(score * log2_scale - max) with bf16 copies into probs[0 .. limit)
 * (zero past n; limit a multiple of 32; rounded to nearest even, tiny values flushed to zero),
 * running max and lane sums updated; returns the factor that rescales the row's accumulator. */
static __m512 softmax_step(Row *row, const float *scores, int n, int limit, __m512 top, float log2_scale,
                           uint16_t *probs) {
    float best = _mm512_reduce_max_ps(top) * log2_scale;
    if (!(best >= row->max)) best = row->max;
    __m512 total = exponentials(scores, n, limit, _mm512_set1_ps(log2_scale), _mm512_set1_ps(best), probs);
    /* The first block's running max is -inf: clamped, its factor is 0. */
    __m512 correction = exp2_512(_mm512_max_ps(_mm512_set1_ps(row->max - best), _mm512_set1_ps(-150.0f)));
    _mm512_storeu_ps(row->sum, _mm512_fmadd_ps(_mm512_loadu_ps(row->sum), correction, total));
    row->max = best;
    return correction;
}

/* softmax_step for R rows against one block's scores (row r's first n[r] count; probabilities up to
 * the group's `seen` keys rounded up to 32), correction[r] its factor; returns whether any row's
 * max moved (once a row's max settles its correction is exactly 1 and the rescale would change
 * nothing). */
static int softmax_rows(Row *rows, int R, float scores[][KEYS_PER_BLOCK], const int *n, int seen, const __m512 *top,
                        float log2_scale, uint32_t probs[][KEYS_PER_BLOCK / 2], __m512 *correction) {
    int rescale = 0;
    for (int r = 0; r < R; r++) {
        float before = rows[r].max;
        correction[r] = softmax_step(&rows[r], scores[r], n[r], (seen + 31) / 32 * 32, top[r], log2_scale,
                                     (uint16_t *)probs[r]);
        rescale |= rows[r].max != before;
    }
    return rescale;
}

/* group_values over all D channels, 64 at a time, then 16. */
static inline __attribute__((always_inline)) void values_all(Row *rows, const int R, const __m512 *correction,
                                                            const uint32_t probs[][KEYS_PER_BLOCK / 2], int from,
                                                            const uint32_t *values, int64_t D, int pairs, int rescale,
                                                            Ahead *ahead) {
    int64_t offset = 0;
    for (; offset + 64 <= D; offset += 64)
        group_values(rows, R, correction, probs, from, values, D, offset, pairs, 4, rescale, ahead);
    for (; offset < D; offset += 16)
        group_values(rows, R, correction, probs, from, values, D, offset, pairs, 1, rescale, ahead);
}

/* R rows (1 to ROWS_PER_GROUP) against one packed block, row r seeing its first n[r] >= 1 keys. */
static inline __attribute__((always_inline)) void group_block(Row *rows, const int R, const int *n,
                                                             const uint32_t *keys, const uint32_t *values,
                                                             int64_t D, float log2_scale, Ahead *ahead) {
    float scores[ROWS_PER_GROUP][KEYS_PER_BLOCK];
    uint32_t probs[ROWS_PER_GROUP][KEYS_PER_BLOCK / 2];
    __m512 correction[ROWS_PER_GROUP];
    /* Keys no row of the group sees would only add products with probability 0 (acc + 0 is acc):
     * skipping them changes no bits. */
    int seen = n[0];
    for (int r = 1; r < R; r++) seen = n[r] > seen ? n[r] : seen;
    __m512 top[ROWS_PER_GROUP];
    for (int r = 0; r < R; r++) top[r] = _mm512_set1_ps(-INFINITY);
    group_scores(rows, R, 4, keys, KEYS_PER_BLOCK, D / 2, (seen + 63) / 64 * 64, n, scores, 0, top, ahead, 1);
    int rescale = softmax_rows(rows, R, scores, n, seen, top, log2_scale, probs, correction);
    values_all(rows, R, correction, probs, 0, values, D, (seen + 1) / 2, rescale, ahead);
}

static void rows_block(Row *rows, int R, const int *n, const uint32_t *keys, const uint32_t *values, int64_t D,
                       float log2_scale, Ahead *ahead) {
    switch (R) {
    case 6: group_block(rows, 6, n, keys, values, D, log2_scale, ahead); break;
    case 5: group_block(rows, 5, n, keys, values, D, log2_scale, ahead); break;
    case 4: group_block(rows, 4, n, keys, values, D, log2_scale, ahead); break;
    case 3: group_block(rows, 3, n, keys, values, D, log2_scale, ahead); break;
    case 2: group_block(rows, 2, n, keys, values, D, log2_scale, ahead); break;
    default: group_block(rows, 1, n, keys, values, D, log2_scale, ahead); break;
    }
}

/* Scores of R rows (1 to SCORE_ROWS) against SUB_KEYS packed keys, into columns [at, at + SUB_KEYS). */
static void sub_scores(Row *rows, int R, const uint32_t *keys, int64_t pairs, const int *n,
                       float scores[][KEYS_PER_BLOCK], int at, __m512 *top, Ahead *ahead) {
#define SUB_SCORES(R) \
    group_scores(rows, R, SUB_KEYS / 16, keys, SUB_KEYS, pairs, SUB_KEYS, n, scores, at, top, ahead, 2)
    switch (R) {
    case 12: SUB_SCORES(12); break;
    case 11: SUB_SCORES(11); break;
    case 10: SUB_SCORES(10); break;
    case 9: SUB_SCORES(9); break;
    case 8: SUB_SCORES(8); break;
    case 7: SUB_SCORES(7); break;
    case 6: SUB_SCORES(6); break;
    case 5: SUB_SCORES(5); break;
    case 4: SUB_SCORES(4); break;
    case 3: SUB_SCORES(3); break;
    case 2: SUB_SCORES(2); break;
    default: SUB_SCORES(1); break;
    }
#undef SUB_SCORES
}

/* Rows of a few-row tile whose outputs are weighted together, straight from the values as stored. */
#define RAW_VALUE_ROWS 8

/* group_values for W slices of 16 channels from `offset` (R rows, up to RAW_VALUE_ROWS), the pairs
 * of keys' values (the sub-block's from `values`, row stride ld, `here` keys) interleaved in
 * registers as they are loaded, exactly as pack_values lays them out: the same operands in the same
 * order, so the same bits, without a packed copy to write and read back (-6% for decode over 32K
 * keys). LINES lines of the ahead stream are requested a step. */
static inline __attribute__((always_inline)) void raw_values(Row *rows, const int R, const __m512 *correction,
                                                            const uint32_t probs[][KEYS_PER_BLOCK / 2], int from,
                                                            const uint16_t *values, int64_t ld, int here,
                                                            int64_t offset, int pairs, const int W, int rescale,
                                                            Ahead *ahead, const int LINES) {
    const __m512i half[2] = { interleave_half(0), interleave_half(1) };
    __m512 acc[RAW_VALUE_ROWS][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < W; c++) {
            acc[r][c] = _mm512_loadu_ps(rows[r].acc + offset + 16 * c);
            if (rescale) acc[r][c] = _mm512_mul_ps(acc[r][c], correction[r]);
        }
    for (int j = 0; j < pairs; j++) {
        request_ahead(ahead, LINES);
        const uint16_t *first = values + 2 * j * ld + offset, *second = first + ld;
        __mmask32 has_second = 2 * j + 1 < here ? ~(__mmask32)0 : 0;
        __m512i slice[4];
        for (int c = 0; c + 1 < W; c += 2) value_pairs32(first + 16 * c, second + 16 * c, has_second, half, slice + c);
        if (W % 2) slice[W - 1] = value_pairs16(first + 16 * (W - 1), second + 16 * (W - 1), (__mmask16)has_second);
        for (int r = 0; r < R; r++) {
            __m512bh p = (__m512bh)_mm512_set1_epi32((int)probs[r][from + j]);
            for (int c = 0; c < W; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], p, (__m512bh)slice[c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < W; c++) _mm512_storeu_ps(rows[r].acc + offset + 16 * c, acc[r][c]);
}

/* raw_values over all D channels: 64 at a time for up to 4 rows, 32 for more (the accumulators fill
 * 16 registers either way), then 16. A sub-block's values fill D lines and these take D / 4 or D / 2
 * steps: 4 or 2 lines a step keep pace. */
static inline __attribute__((always_inline)) void raw_values_all(Row *rows, const int R, const __m512 *correction,
                                                                const uint32_t probs[][KEYS_PER_BLOCK / 2], int from,
                                                                const uint16_t *values, int64_t ld, int here,
                                                                int64_t D, int pairs, int rescale, Ahead *ahead) {
    const int W = R <= 4 ? 4 : 2;
    int64_t offset = 0;
    for (; offset + 16 * W <= D; offset += 16 * W)
        raw_values(rows, R, correction, probs, from, values, ld, here, offset, pairs, W, rescale, ahead, W);
    for (; offset < D; offset += 16)
        raw_values(rows, R, correction, probs, from, values, ld, here, offset, pairs, 1, rescale, ahead, 1);
}

static void few_values(Row *rows, int R, const __m512 *correction, const uint32_t probs[][KEYS_PER_BLOCK / 2],
                       int from, const uint16_t *values, int64_t ld, int here, int64_t D, int pairs, int rescale,
                       Ahead *ahead) {
#define FEW_VALUES(R) raw_values_all(rows, R, correction, probs, from, values, ld, here, D, pairs, rescale, ahead)
    switch (R) {
    case 8: FEW_VALUES(8); break;
    case 7: FEW_VALUES(7); break;
    case 6: FEW_VALUES(6); break;
    case 5: FEW_VALUES(5); break;
    case 4: FEW_VALUES(4); break;
    case 3: FEW_VALUES(3); break;
    case 2: FEW_VALUES(2); break;
    default: FEW_VALUES(1); break;
    }
#undef FEW_VALUES
}

/* The size of the next of the fewest sets of at most `most` rows that `left` rows make, as even as can
 * be (16 rows by 6: 6 5 5), so that every set keeps enough chains in flight. */
static inline int next_set(int left, int most) {
    int sets = (left + most - 1) / most;
    return (left + sets - 1) / sets;
}

/* A tile of at most FEW_ROWS rows (decode, short draft verification) against one block of keys k
 * and values v (in_block of them), row r seeing its first n[r] >= 1. A block packed whole and then
 * read once per group of rows (group_block) spends as long packing as multiplying when the rows are
 * few, its packed copy streaming through L2; here SUB_KEYS keys at a time are packed and scored by
 * every row while still in L1 (up to SCORE_ROWS rows a group), and the outputs weighted straight
 * from the values (up to RAW_VALUE_ROWS rows a group). Each score and output lane is the same chain
 * as in group_block, so the bits are the same. Keys [SUB_KEYS, ahead) from the block's first are
 * requested from memory while the scores are computed, and their values while the outputs are
 * weighted, each sub-block's products requesting the next sub-block. */
static void few_rows_block(Row *rows, int count, const int *n, const uint16_t *k, const uint16_t *v, int64_t ld,
                           int64_t D, int in_block, int64_t ahead, float log2_scale, uint32_t *packed_keys) {
    float scores[FEW_ROWS][KEYS_PER_BLOCK];
    uint32_t probs[FEW_ROWS][KEYS_PER_BLOCK / 2];
    __m512 top[FEW_ROWS], correction[FEW_ROWS];
    int seen = 0, from_here[FEW_ROWS];
    for (int r = 0; r < count; r++) {
        seen = n[r] > seen ? n[r] : seen;
        top[r] = _mm512_set1_ps(-INFINITY);
    }
    /* A sub-block's keys fill D lines and a group of rows scores them in D / 2 steps: 2 lines a step
     * keep pace (the values: raw_values_all). */
    int64_t from = SUB_KEYS < ahead ? SUB_KEYS : ahead;
    Ahead keys_ahead = { { (const char *)(k + from * ld) }, { (const char *)(k + ahead * ld) } };
    Ahead values_ahead = { { (const char *)(v + from * ld) }, { (const char *)(v + ahead * ld) } };
    for (int at = 0; at < seen; at += SUB_KEYS) {
        int here = in_block - at < SUB_KEYS ? in_block - at : SUB_KEYS;
        pack_keys(k + at * ld, ld, D, here, SUB_KEYS, packed_keys, SUB_KEYS);
        for (int r = 0; r < count; r++) from_here[r] = n[r] - at;
        for (int r = 0, size; r < count; r += size) {
            size = next_set(count - r, SCORE_ROWS);
            sub_scores(rows + r, size, packed_keys, D / 2, from_here + r, scores + r, at, top + r, &keys_ahead);
        }
    }
    int rescale = softmax_rows(rows, count, scores, n, seen, top, log2_scale, probs, correction);
    for (int at = 0; at < seen; at += SUB_KEYS) {
        int here = in_block - at < SUB_KEYS ? in_block - at : SUB_KEYS, pairs = (seen - at + 1) / 2;
        for (int r = 0, size; r < count; r += size) {
            size = next_set(count - r, RAW_VALUE_ROWS);
            few_values(rows + r, size, correction + r, probs + r, at / 2, v + at * ld, ld, here, D,
                       pairs < SUB_KEYS / 2 ? pairs : SUB_KEYS / 2, rescale && at == 0, &values_ahead);
        }
    }
}

#endif
