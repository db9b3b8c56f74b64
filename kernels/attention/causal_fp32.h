/* The builds of causal_bf16.c without bf16 dot products (included there in place of the AVX-512
 * BF16 code): the same function, computed in fp32 from bf16 loads, with 8-lane vectors (AVX2 + FMA
 * + F16C) or 16-lane ones (AVX-512 without BF16, simd.h's VF_LANES).
 *
 * Query row (t, h) sees keys [0, past + t]. Keys go in blocks of BLOCK_KEYS and the blocks in
 * chunks of CHUNK_KEYS, both counted from key 0. Within a chunk a row keeps an online softmax
 * (running max, sum and fp32 output); the chunks' states are then folded in key order. A chunk's
 * state depends only on the row's query and the keys it sees there, so the rows of a call may be
 * split over threads by chunk (decode: few rows, long cache) or not (prefill) with the same bits.
 *
 * Both products are register-tiled outer products, as in a GEMM micro-kernel, over a block's keys
 * (and, in prefill, values) widened to fp32 once (exact) and queries transposed so that rows lie
 * in lanes:
 *  - scores: a group of up to GROUP_ROWS rows (two vectors) against several keys at a
 *    time, a key's channel broadcast to every row; lane r of a score is one fp32 chain over the
 *    channels in split order (below); in the 16-lane build a group of at most 8 rows (decode)
 *    scores two keys a vector ("twins"), one of at most 4 rows four ("quads"), the same chains;
 *  - softmax: lane by lane; keys a row does not see get probability exactly 0 (vf_exp never
 *    returns 0, so they are masked), which adds nothing to its sum chain;
 *  - values: up to VALUE_ROWS rows by VF_SPLIT channels, a row's probability broadcast; lane d of a row's
 *    output is one chain over the keys in order.
 * So the bits of a row never depend on the call's size, the row's place in it, how many rows share
 * a tile or the thread count, while each loaded key or value feeds many multiply-adds. The next
 * block's keys and values are requested from memory while a block is computed.
 *
 * VF_SPLIT bf16 widen to fp32 with two interleaves against zero (shuffles, which leave the
 * multiply-add ports free), so keys, values, transposed queries and output accumulators are kept in
 * simd.h's "split" order (AVX2: per 16 channels, channels 0-3 and 8-11, then 4-7 and 12-15).
 */
#ifndef DOCANALYST_CAUSAL_FP32_H
#define DOCANALYST_CAUSAL_FP32_H

#include "../simd.h"

#define BLOCK_KEYS 64         /* keys scored, then weighted, at a time */
#define GROUP_VECTORS 2       /* score vectors of a row group */
#define GROUP_ROWS (GROUP_VECTORS * VF_LANES) /* rows scored together, one per lane */
/* Tiles as large as the vector registers allow (16 in AVX2, 32 in AVX-512): rows weighting values
 * together (2 accumulators each), and keys scored at a time by a group of two vectors of rows or one. */
#if VF_LANES == 16
#define VALUE_ROWS 12
#define PAIR_KEYS 12
#define SINGLE_KEYS 12
#else
#define VALUE_ROWS 6
#define PAIR_KEYS 6
#define SINGLE_KEYS 8
#endif
#define TILE_ROWS 256         /* rows of one K/V head that share each block read from memory */
#define ALWAYS static inline __attribute__((always_inline))

/* Softmax states of rows: row r's running max (of scaled scores), sum of probabilities and fp32
 * output, at max[r * step], sum[r * step], acc + r * step * D. */
typedef struct {
    float *max, *sum, *acc;
    int64_t step;
} States;

/* A block: its keys (and, where many rows share them, values) as fp32 rows [BLOCK_KEYS][D] in
 * split order. */
typedef struct {
    float *keys, *values;
    const uint16_t *raw_values;              /* the block's values as stored (row stride ld) */
    const uint16_t *next_keys, *next_values; /* the next block's, requested meanwhile, or NULL */
    int64_t ld;
} Block;

/* Request row j of the next block's keys or values (NULL: none) into L2: requests into L1 made
 * lone-token decode 26% slower on a Zen 4 (a block's keys and values fill L1). */
ALWAYS void fetch_row(const uint16_t *next, int64_t ld, int64_t D, int j) {
    if (next)
        for (int64_t d = 0; d < D; d += 32) _mm_prefetch((const char *)(next + j * ld + d), _MM_HINT_T1);
}

/* VF_SPLIT bf16 channels as fp32 in split order. */
ALWAYS void widen(const uint16_t *p, vf *low, vf *high) { vf_widen_split(vf_load_raw(p), low, high); }

/* scores[j + i][v] (lane l: row VF_LANES * v + l's q . k_(j+i), unscaled) for J keys from j, the
 * group's queries qt [D][GROUP_ROWS] (rows in lanes), keys fp32 [.][D], both in split order. Rows
 * [j, j + J) of the next block's keys (next; NULL: none) are requested one before each Jth of the
 * channels: all at once, they stalled the products while the memory took them (the same chains,
 * channel after channel, so the same bits). */
ALWAYS void score_keys(const int NV, const int J, const float *qt, const float *keys, int64_t D, int j,
                       vf (*scores)[GROUP_VECTORS], const uint16_t *next, int64_t ld) {
    vf acc[PAIR_KEYS > SINGLE_KEYS ? PAIR_KEYS : SINGLE_KEYS][GROUP_VECTORS];
    for (int i = 0; i < J; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = vf_zero();
    if (!next) {
        vf_outer_tile(NV, J, qt, GROUP_ROWS, keys + j * D, D, D, acc);
    } else {
        int64_t part = D / J; /* >= 1: D is a multiple of VF_SPLIT, more than any J */
        for (int i = 0; i < J; i++) {
            int64_t c = i * part, n = i == J - 1 ? D - c : part;
            fetch_row(next, ld, D, j + i);
            vf_outer_tile(NV, J, qt + c * GROUP_ROWS, GROUP_ROWS, keys + j * D + c, D, n, acc);
        }
    }
    for (int i = 0; i < J; i++)
        for (int v = 0; v < NV; v++) scores[j + i][v] = acc[i][v];
}

/* scores[j] for keys j < seen: J keys at a time (NV * J chains in flight), then 4, then one; the
 * next block's keys (NULL: none) requested meanwhile, the same rows as are scored. */
ALWAYS void scores_of(const int NV, const int J, const float *qt, Block block, int64_t D, int seen,
                      const uint16_t *next_keys, vf (*scores)[GROUP_VECTORS]) {
    int j = 0;
    for (; j + J <= seen; j += J) score_keys(NV, J, qt, block.keys, D, j, scores, next_keys, block.ld);
    for (int i = j; i < BLOCK_KEYS; i++) fetch_row(next_keys, block.ld, D, i);
    for (; j + 4 <= seen; j += 4) score_keys(NV, 4, qt, block.keys, D, j, scores, NULL, 0);
    for (; j < seen; j++) score_keys(NV, 1, qt, block.keys, D, j, scores, NULL, 0);
}

#if VF_LANES == 16
/* Decode's few rows (one token: 8 query heads per K/V head in Qwen3-Next) fill half a 16-lane score
 * vector, so a group of at most TWIN_ROWS rows scores two keys a vector: keys 2p and 2p + 1 widened
 * into one row of "twins" [D][2] (split order), the queries duplicated into lane pairs, so that lane
 * 2r + s is row r against key 2p + s, the same fp32 chain over the same channels as lane r of the
 * one-key tiles above: the same bits for half the multiply-adds. */
#define TWIN_ROWS (VF_LANES / 2)
#define TWIN_TILE 16 /* twins scored at a time: 16 accumulators */

/* Keys [n][D] bf16 (row stride ld) -> twins [(n + 1) / 2][D][2] fp32, channels in split order; the
 * last twin of an odd n gets zeros for its second key. */
ALWAYS void widen_twins(const uint16_t *src, int64_t ld, int n, int64_t D, float *dst) {
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int j = 0; j < n; j += 2) {
        const uint16_t *a = src + j * ld, *b = j + 1 < n ? a + ld : NULL;
        float *out = dst + j * D;
        for (int64_t c = 0; c < D; c += VF_SPLIT) {
            vf a_low, a_high, b_low = vf_zero(), b_high = vf_zero();
            widen(a + c, &a_low, &a_high);
            if (b) widen(b + c, &b_low, &b_high);
            vf_store(out + 2 * c, _mm512_permutex2var_ps(a_low, first, b_low));
            vf_store(out + 2 * c + VF_LANES, _mm512_permutex2var_ps(a_low, second, b_low));
            vf_store(out + 2 * c + 2 * VF_LANES, _mm512_permutex2var_ps(a_high, first, b_high));
            vf_store(out + 2 * c + 3 * VF_LANES, _mm512_permutex2var_ps(a_high, second, b_high));
        }
    }
}

/* The next block's rows [first, first + count) of keys (next; NULL: none) requested one every
 * `every` channels of a tile's products (a row for the head dims too small for that, where every is
 * 0, requested before). */
ALWAYS int64_t fetch_every(const uint16_t *next, int64_t ld, int64_t D, int first, int count) {
    int64_t every = next ? D / count : 0;
    if (next && !every)
        for (int j = first; j < first + count; j++) fetch_row(next, ld, D, j);
    return every;
}

ALWAYS void fetch_at(const uint16_t *next, int64_t ld, int64_t D, int first, int count, int64_t every, int64_t c) {
    if (every && c % every == 0 && c / every < count) fetch_row(next, ld, D, first + (int)(c / every));
}

/* scores[2p + s] (lane r: row r's q . k_(2p+s), r < TWIN_ROWS) for P twins from p0, their keys' rows
 * of the next block (next) requested along the way. D is a constant where the caller specializes
 * it, so each twin's row is one displacement from one pointer (a key pointer per accumulator would
 * not fit the general registers). */
ALWAYS void score_twins(const int P, const float *qt, const float *twins, const int64_t D, int p0,
                        vf (*scores)[GROUP_VECTORS], const uint16_t *next, int64_t ld) {
    int64_t every = fetch_every(next, ld, D, 2 * p0, 2 * P);
    const __m512i doubled = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    vf acc[TWIN_TILE];
    for (int i = 0; i < P; i++) acc[i] = vf_zero();
    const float *base = twins + p0 * 2 * D;
    for (int64_t c = 0; c < D; c++) {
        fetch_at(next, ld, D, 2 * p0, 2 * P, every, c);
        vf rows = _mm512_permutexvar_ps(doubled, vf_load(qt + c * GROUP_ROWS));
        for (int i = 0; i < P; i++) {
            double both;
            memcpy(&both, base + i * 2 * D + 2 * c, sizeof both);
            acc[i] = vf_fma(rows, _mm512_castpd_ps(_mm512_set1_pd(both)), acc[i]);
        }
    }
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int i = 0; i < P; i++) {
        scores[2 * (p0 + i)][0] = _mm512_permutexvar_ps(even, acc[i]);
        scores[2 * (p0 + i) + 1][0] = _mm512_permutexvar_ps(odd, acc[i]);
    }
}

ALWAYS void twin_scores_at(const int64_t D, const float *qt, Block block, int seen, const uint16_t *next_keys,
                           vf (*scores)[GROUP_VECTORS]) {
    int twins = (seen + 1) / 2, p = 0;
    for (; p + TWIN_TILE <= twins; p += TWIN_TILE)
        score_twins(TWIN_TILE, qt, block.keys, D, p, scores, next_keys, block.ld);
    for (int j = 2 * p; j < BLOCK_KEYS; j++) fetch_row(next_keys, block.ld, D, j);
    for (; p + 4 <= twins; p += 4) score_twins(4, qt, block.keys, D, p, scores, NULL, 0);
    for (; p < twins; p++) score_twins(1, qt, block.keys, D, p, scores, NULL, 0);
}

/* scores[j] for keys j < seen (and j = seen when seen is odd, its twin's other half) from twins. */
static void twin_scores_of(const float *qt, Block block, int64_t D, int seen, const uint16_t *next_keys,
                           vf (*scores)[GROUP_VECTORS]) {
    switch (D) {
    case 128: twin_scores_at(128, qt, block, seen, next_keys, scores); break;
    case 256: twin_scores_at(256, qt, block, seen, next_keys, scores); break;
    default: twin_scores_at(D, qt, block, seen, next_keys, scores); break;
    }
}

/* Qwen3.5's dense models have 4 query rows per K/V head: a group of at most QUAD_ROWS rows scores
 * four keys a vector the same way ("quads" [D][4], lane 4r + s: row r against key 4p + s). Kept
 * apart from the twins' functions: one version for both measured 3-5% slower for 8 rows. */
#define QUAD_ROWS (VF_LANES / 4)

/* Keys [n][D] bf16 (row stride ld) -> quads [ceil(n / 4)][D][4] fp32, channels in split order; keys
 * past n in the last quad are zeros. */
ALWAYS void widen_quads(const uint16_t *src, int64_t ld, int n, int64_t D, float *dst) {
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i first_pairs = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
    const __m512i second_pairs = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
    for (int j = 0; j < n; j += 4) {
        float *out = dst + j * D;
        for (int64_t c = 0; c < D; c += VF_SPLIT) {
            vf half[2][4];
            for (int s = 0; s < 4; s++) {
                half[0][s] = half[1][s] = vf_zero();
                if (j + s < n) widen(src + (j + s) * ld + c, &half[0][s], &half[1][s]);
            }
            for (int h = 0; h < 2; h++) {
                /* a0 b0 a1 b1 .., then (a0 b0) (c0 d0) (a1 b1) (c1 d1) .. */
                __m512d ab_first = _mm512_castps_pd(_mm512_permutex2var_ps(half[h][0], first, half[h][1]));
                __m512d ab_second = _mm512_castps_pd(_mm512_permutex2var_ps(half[h][0], second, half[h][1]));
                __m512d cd_first = _mm512_castps_pd(_mm512_permutex2var_ps(half[h][2], first, half[h][3]));
                __m512d cd_second = _mm512_castps_pd(_mm512_permutex2var_ps(half[h][2], second, half[h][3]));
                float *at = out + 4 * (c + h * VF_LANES);
                vf_store(at, _mm512_castpd_ps(_mm512_permutex2var_pd(ab_first, first_pairs, cd_first)));
                vf_store(at + VF_LANES, _mm512_castpd_ps(_mm512_permutex2var_pd(ab_first, second_pairs, cd_first)));
                vf_store(at + 2 * VF_LANES, _mm512_castpd_ps(_mm512_permutex2var_pd(ab_second, first_pairs, cd_second)));
                vf_store(at + 3 * VF_LANES, _mm512_castpd_ps(_mm512_permutex2var_pd(ab_second, second_pairs, cd_second)));
            }
        }
    }
}

/* scores[4p + s] (lane r: row r's q . k_(4p+s), r < QUAD_ROWS) for P quads from p0 (next and D as
 * above). */
ALWAYS void score_quads(const int P, const float *qt, const float *quads, const int64_t D, int p0,
                        vf (*scores)[GROUP_VECTORS], const uint16_t *next, int64_t ld) {
    int64_t every = fetch_every(next, ld, D, 4 * p0, 4 * P);
    const __m512i repeated = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    vf acc[TWIN_TILE];
    for (int i = 0; i < P; i++) acc[i] = vf_zero();
    const float *base = quads + p0 * 4 * D;
    for (int64_t c = 0; c < D; c++) {
        fetch_at(next, ld, D, 4 * p0, 4 * P, every, c);
        vf rows = _mm512_permutexvar_ps(repeated, vf_load(qt + c * GROUP_ROWS));
        for (int i = 0; i < P; i++)
            acc[i] = vf_fma(rows, _mm512_broadcast_f32x4(_mm_loadu_ps(base + i * 4 * D + 4 * c)), acc[i]);
    }
    for (int s = 0; s < 4; s++) {
        const __m512i pick = _mm512_add_epi32(_mm512_setr_epi32(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12),
                                              _mm512_set1_epi32(s));
        for (int i = 0; i < P; i++) scores[4 * (p0 + i) + s][0] = _mm512_permutexvar_ps(pick, acc[i]);
    }
}

ALWAYS void quad_scores_at(const int64_t D, const float *qt, Block block, int seen, const uint16_t *next_keys,
                           vf (*scores)[GROUP_VECTORS]) {
    int quads = (seen + 3) / 4, p = 0;
    for (; p + TWIN_TILE <= quads; p += TWIN_TILE)
        score_quads(TWIN_TILE, qt, block.keys, D, p, scores, next_keys, block.ld);
    for (int j = 4 * p; j < BLOCK_KEYS; j++) fetch_row(next_keys, block.ld, D, j);
    for (; p + 4 <= quads; p += 4) score_quads(4, qt, block.keys, D, p, scores, NULL, 0);
    for (; p < quads; p++) score_quads(1, qt, block.keys, D, p, scores, NULL, 0);
}

/* scores[j] for keys j < seen (and up to the end of the last quad) from quads. */
static void quad_scores_of(const float *qt, Block block, int64_t D, int seen, const uint16_t *next_keys,
                           vf (*scores)[GROUP_VECTORS]) {
    switch (D) {
    case 128: quad_scores_at(128, qt, block, seen, next_keys, scores); break;
    case 256: quad_scores_at(256, qt, block, seen, next_keys, scores); break;
    default: quad_scores_at(D, qt, block, seen, next_keys, scores); break;
    }
}
#endif

/* The online-softmax step of a group's rows (lane l of vector v: row VF_LANES * v + l) over the
 * block's scores: row r sees its first n[r] keys. probs[j][r] = e^(score * scale - max) (0 for
 * keys it does not see), the running max and sum updated; correction[r] rescales the row's output
 * (0 for a row with no key yet). Returns whether some row's max moved. */
static int softmax_of(int NV, const vf (*scores)[GROUP_VECTORS], int seen, const float *n, float scale, float *max,
                      float *sum, float (*probs)[GROUP_ROWS], float *correction) {
    const vf minus_inf = vf_set1(-INFINITY), scale_v = vf_set1(scale);
    int moved = 0;
    for (int v = 0; v < NV; v++) {
        const int lane = v * VF_LANES;
        vf visible = vf_load(n + lane);
        vf top = minus_inf;
        for (int j = 0; j < seen; j++) top = vf_max(top, vf_select_lt(vf_set1((float)j), visible, scores[j][v], minus_inf));
        vf before = vf_load(max + lane), best = vf_max(before, vf_mul(top, scale_v));
        vf neg_best = vf_sub(vf_zero(), best), total = vf_zero();
        for (int j = 0; j < seen; j++) {
            vf p = vf_select_lt(vf_set1((float)j), visible, vf_exp(vf_fma(scores[j][v], scale_v, neg_best)), vf_zero());
            total = vf_add(total, p);
            vf_store(probs[j] + lane, p);
        }
        vf factor = vf_select_lt(minus_inf, before, vf_exp(vf_sub(before, best)), vf_zero());
        vf_store(sum + lane, vf_fma(vf_load(sum + lane), factor, total));
        vf_store(max + lane, best);
        vf_store(correction + lane, factor);
        moved |= vf_any_differ(before, best);
    }
    return moved;
}

/* Channels [c, c + VF_SPLIT) of R rows (1 to VALUE_ROWS, the group's rows from `lane`): acc_r =
 * acc_r * correction[lane + r] (when rescale) + sum over keys j < seen of probs[j][lane + r] v_j,
 * the values read from the block's fp32 copy when WIDE, else widened as they are read (exact
 * either way, so the same bits). The first `lines` lines from `ahead` are requested from memory
 * meanwhile, one a key. */
ALWAYS void value_steps(const int R, const int WIDE, float *const *acc, const float (*probs)[GROUP_ROWS], int lane,
                        const float *correction, int rescale, Block block, int64_t D, int64_t c, int seen,
                        const char *ahead, int lines) {
    vf out[VALUE_ROWS][2];
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++) {
            out[r][h] = vf_load(acc[r] + c + VF_LANES * h);
            if (rescale) out[r][h] = vf_mul(out[r][h], vf_set1(correction[lane + r]));
        }
    for (int j = 0; j < seen; j++) {
        if (j < lines) _mm_prefetch(ahead + 64 * j, _MM_HINT_T1);
        vf value[2];
        if (WIDE) value[0] = vf_load(block.values + j * D + c), value[1] = vf_load(block.values + j * D + c + VF_LANES);
        else widen(block.raw_values + j * block.ld + c, &value[0], &value[1]);
        for (int r = 0; r < R; r++) {
            vf p = vf_set1(probs[j][lane + r]);
            for (int h = 0; h < 2; h++) out[r][h] = vf_fma(p, value[h], out[r][h]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++) vf_store(acc[r] + c + VF_LANES * h, out[r][h]);
}

/* All D channels, VF_SPLIT at a time; the next block's values (NULL: none) requested meanwhile, an
 * even share of its rows during each step where they lie one after another in memory (a line a
 * key: all at once, they stalled the products), else after it. */
ALWAYS void values_of(const int R, const int WIDE, float *const *acc, const float (*probs)[GROUP_ROWS], int lane,
                      const float *correction, int rescale, Block block, int64_t D, int seen,
                      const uint16_t *next_values) {
    int64_t steps = D / VF_SPLIT, share = (BLOCK_KEYS + steps - 1) / steps;
    int along = next_values && block.ld == D;
    for (int64_t c = 0, step = 0; c < D; c += VF_SPLIT, step++) {
        int64_t first = step * share, last = first + share < BLOCK_KEYS ? first + share : BLOCK_KEYS;
        const char *ahead = along ? (const char *)(next_values + first * D) : NULL;
        int lines = along && first < last ? (int)((last - first) * D / 32) : 0;
        value_steps(R, WIDE, acc, probs, lane, correction, rescale, block, D, c, seen, ahead, lines);
        if (!along)
            for (int64_t j = first; j < last; j++) fetch_row(next_values, block.ld, D, (int)j);
    }
}

#define VALUES_OF(R) \
    (wide ? values_of(R, 1, acc, probs, lane, correction, rescale, block, D, seen, next_values) \
          : values_of(R, 0, acc, probs, lane, correction, rescale, block, D, seen, next_values))

static void group_values(int R, float *const *acc, const float (*probs)[GROUP_ROWS], int lane,
                         const float *correction, int rescale, Block block, int wide, int64_t D, int seen,
                         const uint16_t *next_values) {
    switch (R) {
#if VALUE_ROWS > 6
    case 12: VALUES_OF(12); break;
    case 11: VALUES_OF(11); break;
    case 10: VALUES_OF(10); break;
    case 9: VALUES_OF(9); break;
    case 8: VALUES_OF(8); break;
    case 7: VALUES_OF(7); break;
#endif
    case 6: VALUES_OF(6); break;
    case 5: VALUES_OF(5); break;
    case 4: VALUES_OF(4); break;
    case 3: VALUES_OF(3); break;
    case 2: VALUES_OF(2); break;
    default: VALUES_OF(1); break;
    }
}

/* One block for R rows of a group (queries qt); row r sees its first n[r]. wide: the block's values
 * are widened in it; fetch: request the next block's keys and values meanwhile (a block's first
 * group does). */
static void group_block(int R, const float *qt, const int *n, Block block, int wide, int fetch, int64_t D,
                        float scale, States st) {
    vf scores[BLOCK_KEYS][GROUP_VECTORS];
    float probs[BLOCK_KEYS][GROUP_ROWS] __attribute__((aligned(32)));
    float max[GROUP_ROWS] __attribute__((aligned(32))), sum[GROUP_ROWS] __attribute__((aligned(32)));
    float correction[GROUP_ROWS] __attribute__((aligned(32)));
    float lanes[GROUP_ROWS]; /* keys each row sees, as floats for the vector compares (exact: <= BLOCK_KEYS) */
    int seen = 0;
    for (int r = 0; r < GROUP_ROWS; r++) {
        int sees = r < R ? n[r] : 0;
        lanes[r] = (float)sees;
        seen = sees > seen ? sees : seen;
        max[r] = r < R ? st.max[r * st.step] : -INFINITY;
        sum[r] = r < R ? st.sum[r * st.step] : 0.0f;
    }
    int vectors = R > VF_LANES ? 2 : 1;
    const uint16_t *next_keys = fetch ? block.next_keys : NULL;
#if VF_LANES == 16
    /* A call of at most TWIN_ROWS rows is one group, the block's first (attend_chunk widened twins). */
    if (fetch && R <= QUAD_ROWS) quad_scores_of(qt, block, D, seen, next_keys, scores);
    else if (fetch && R <= TWIN_ROWS) twin_scores_of(qt, block, D, seen, next_keys, scores);
    else
#endif
    if (vectors == 2) scores_of(2, PAIR_KEYS, qt, block, D, seen, next_keys, scores);
    else scores_of(1, SINGLE_KEYS, qt, block, D, seen, next_keys, scores);
    int rescale = softmax_of(vectors, (const vf(*)[GROUP_VECTORS])scores, seen, lanes, scale, max, sum, probs,
                             correction);
    for (int r = 0; r < R; r++) st.max[r * st.step] = max[r], st.sum[r * st.step] = sum[r];
    /* Rows in sets of at most VALUE_ROWS, as even as can be (AVX2, 16: 6 5 5; 8: 4 4), so that every set
     * keeps enough multiply-add chains in flight. */
    int sets = (R + VALUE_ROWS - 1) / VALUE_ROWS;
    for (int set = 0, r0 = 0; set < sets; set++) {
        int count = (R - r0) / (sets - set) + ((R - r0) % (sets - set) != 0);
        float *acc[VALUE_ROWS];
        for (int r = 0; r < count; r++) acc[r] = st.acc + (r0 + r) * st.step * D;
        group_values(count, acc, (const float(*)[GROUP_ROWS])probs, r0, correction, rescale, block, wide, D, seen,
                     fetch && set == 0 ? block.next_values : NULL);
        r0 += count;
    }
}

/* The states of `count` rows (queries qt: groups of [D][GROUP_ROWS], row r seeing keys
 * [0, visible[r]), visible non-decreasing) over the keys of chunk `chunk`, from a fresh start. Rows
 * that see none of it are left untouched. */
static void attend_chunk(const float *qt, const int64_t *visible, int count, int64_t chunk, const uint16_t *k,
                         const uint16_t *v, int64_t ld, int64_t D, float scale, States st, Block block) {
    int64_t start = chunk * CHUNK_KEYS, end = start + CHUNK_KEYS;
    if (visible[count - 1] < end) end = visible[count - 1];
    for (int r = 0; r < count; r++) {
        if (visible[r] <= start) continue;
        st.max[r * st.step] = -INFINITY, st.sum[r * st.step] = 0.0f;
        for (int64_t d = 0; d < D; d++) st.acc[r * st.step * D + d] = 0.0f;
    }
    for (int64_t first = start; first < end; first += BLOCK_KEYS) {
        int in_block = (int)(end - first < BLOCK_KEYS ? end - first : BLOCK_KEYS);
        /* Values are widened once where more than one group shares them (prefill), else as read. */
        int wide = count > GROUP_ROWS;
#if VF_LANES == 16
        if (count <= QUAD_ROWS) widen_quads(k + first * ld, ld, in_block, D, block.keys);
        else if (count <= TWIN_ROWS) widen_twins(k + first * ld, ld, in_block, D, block.keys);
        else
#endif
        vf_widen_rows(k + first * ld, ld, in_block, D, block.keys);
        if (wide) vf_widen_rows(v + first * ld, ld, in_block, D, block.values);
        int more = first + BLOCK_KEYS < end;
        block.raw_values = v + first * ld, block.ld = ld;
        block.next_keys = more ? k + (first + BLOCK_KEYS) * ld : NULL;
        block.next_values = more ? v + (first + BLOCK_KEYS) * ld : NULL;
        for (int g = 0; g < count; g += GROUP_ROWS) {
            int R = count - g < GROUP_ROWS ? count - g : GROUP_ROWS, n[GROUP_ROWS], any = 0;
            for (int r = 0; r < R; r++) {
                int64_t seen = visible[g + r] - first;
                n[r] = (int)(seen <= 0 ? 0 : (seen < in_block ? seen : in_block));
                any |= n[r] > 0;
            }
            if (!any) continue;
            States group = { st.max + g * st.step, st.sum + g * st.step, st.acc + g * st.step * D, st.step };
            group_block(R, qt + g * D, n, block, wide, g == 0, D, scale, group);
        }
    }
}

/* into = the softmax over both states' keys (into's first): each side rescaled to the larger max. */
static void fold(float *into_max, float *into_sum, float *into_acc, float max, float sum, const float *acc,
                 int64_t D) {
    float best = *into_max > max ? *into_max : max;
    vf first = vf_exp(vf_set1(*into_max - best)), second = vf_exp(vf_set1(max - best));
    *into_sum = vf_first(vf_fma(vf_set1(sum), second, vf_mul(vf_set1(*into_sum), first)));
    *into_max = best;
    for (int64_t d = 0; d < D; d += VF_LANES)
        vf_store(into_acc + d, vf_fma(vf_load(acc + d), second, vf_mul(vf_load(into_acc + d), first)));
}

/* out [D] = acc / sum in bf16 (acc split), times sigmoid(gate) with the bf16 roundings of
 * `attn * torch.sigmoid(gate)` when gate is not NULL. */
static void finish_row(const float *acc, float sum, int64_t D, uint16_t *out, const uint16_t *gate) {
    vf inverse = vf_set1(1.0f / sum);
    for (int64_t m = 0; m < D; m += VF_SPLIT) {
        vf low = vf_mul(vf_load(acc + m), inverse), high = vf_mul(vf_load(acc + m + VF_LANES), inverse), ordered[2];
        vf_unsplit(low, high, &ordered[0], &ordered[1]);
        for (int h = 0; h < 2; h++) {
            vf attn = vf_round_bf16(ordered[h]);
            if (gate) {
                vf g = vf_load_bf16(gate + m + VF_LANES * h);
                vf sigmoid = vf_sigmoid(g);
                attn = vf_mul(attn, vf_round_bf16(sigmoid));
            }
            vf_store_bf16(out + m + VF_LANES * h, attn);
        }
    }
}

/* Row r's query q_r [D] bf16 into lane r % GROUP_ROWS of its group's transposed block
 * qt[r / GROUP_ROWS] ([D][GROUP_ROWS] fp32), channels in split order as the keys are widened. */
static void transpose_query(const uint16_t *q, int r, int64_t D, float *qt) {
    float *lane = qt + (int64_t)(r / GROUP_ROWS) * D * GROUP_ROWS + r % GROUP_ROWS, split[VF_SPLIT];
    for (int64_t m = 0; m < D; m += VF_SPLIT) {
        vf low, high;
        widen(q + m, &low, &high);
        vf_store(split, low), vf_store(split + VF_LANES, high);
        for (int i = 0; i < VF_SPLIT; i++) lane[(m + i) * GROUP_ROWS] = split[i];
    }
}

/* q [T, H, D] (strides q_t, q_h), k/v [KVH, S, D] (strides kv_h, kv_s), out [T, H, D] (strides
 * out_t, out_h), gate NULL or [T, H, D] (strides gate_t, gate_h); unit stride along D; D a
 * multiple of VF_SPLIT (16 in AVX2, 32 in AVX-512). Query t sees keys 0 .. past + t. amx is ignored (no tile unit in this build).
 * Returns 0, or -1 when a work buffer cannot be allocated. */
int attention_causal_bf16(const uint16_t *q, int64_t q_t, int64_t q_h, const uint16_t *k, const uint16_t *v,
                          int64_t kv_h, int64_t kv_s, int64_t T, int64_t H, int64_t KVH, int64_t D, int64_t past,
                          float scale, uint16_t *out, int64_t out_t, int64_t out_h, const uint16_t *gate,
                          int64_t gate_t, int64_t gate_h, int amx, int threads) {
    (void)amx;
    int64_t group = H / KVH, per_head = T * group;
    int64_t tiles = (per_head + TILE_ROWS - 1) / TILE_ROWS, chunks = (past + T + CHUNK_KEYS - 1) / CHUNK_KEYS;
    /* Too few (head, tile) items for the threads: one item per chunk, each chunk's states kept
     * apart and folded afterwards, in the order a single item folds them. */
    int split = split_by_chunk(KVH * tiles, threads, chunks, KVH * per_head * chunks * (D + 2) * 4);
    int64_t items = KVH * tiles * (split ? chunks : 1);
    int64_t tile_rows = per_head < TILE_ROWS ? per_head : TILE_ROWS;
    int64_t group_slots = (tile_rows + GROUP_ROWS - 1) / GROUP_ROWS * GROUP_ROWS;
    float *parts = NULL, *part_max = NULL, *part_sum = NULL;
    if (split) {
        parts = malloc(sizeof(float) * (size_t)(KVH * per_head * chunks * D));
        part_max = malloc(sizeof(float) * (size_t)(KVH * per_head * chunks));
        part_sum = malloc(sizeof(float) * (size_t)(KVH * per_head * chunks));
        if (!parts || !part_max || !part_sum) {
            free(parts), free(part_max), free(part_sum);
            return -1;
        }
    }
    int failed = 0;
    if (threads > items) threads = (int)items;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *qt = malloc(sizeof(float) * (size_t)(group_slots * D));
        int64_t *visible = malloc(sizeof(int64_t) * (size_t)tile_rows);
        Block block = { .keys = malloc(sizeof(float) * (size_t)(BLOCK_KEYS * D)),
                        .values = malloc(sizeof(float) * (size_t)(BLOCK_KEYS * D)) };
        /* Running states: over all chunks folded so far, and over the current chunk. */
        float *acc = split ? NULL : malloc(sizeof(float) * (size_t)(2 * tile_rows * (D + 2)));
        int usable = qt && visible && block.keys && block.values && (acc || split);
        failed |= !usable;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            if (!usable) continue;
            int64_t per_item_chunks = split ? chunks : 1;
            int64_t head = item / (tiles * per_item_chunks), tile = item / per_item_chunks % tiles;
            int64_t first = tile * TILE_ROWS;
            int count = (int)(per_head - first < TILE_ROWS ? per_head - first : TILE_ROWS);
            /* The last group's lanes past the rows: zeros (their scores are masked anyway). */
            if (count % GROUP_ROWS)
                memset(qt + (int64_t)(count / GROUP_ROWS) * D * GROUP_ROWS, 0, sizeof(float) * (size_t)(D * GROUP_ROWS));
            for (int r = 0; r < count; r++) {
                int64_t t = (first + r) / group, h = head * group + (first + r) % group;
                transpose_query(q + t * q_t + h * q_h, r, D, qt);
                visible[r] = past + t + 1;
            }
            const uint16_t *keys = k + head * kv_h, *values = v + head * kv_h;
            if (split) {
                int64_t chunk = item % chunks, at = (head * per_head + first) * chunks + chunk;
                if (visible[count - 1] <= chunk * CHUNK_KEYS) continue;
                States st = { part_max + at, part_sum + at, parts + at * D, chunks };
                attend_chunk(qt, visible, count, chunk, keys, values, kv_s, D, scale, st, block);
                continue;
            }
            float *cur_acc = acc + count * D, *cur_max = acc + 2 * count * D, *cur_sum = cur_max + count;
            float *all_max = cur_sum + count, *all_sum = all_max + count;
            States all = { all_max, all_sum, acc, 1 }, cur = { cur_max, cur_sum, cur_acc, 1 };
            attend_chunk(qt, visible, count, 0, keys, values, kv_s, D, scale, all, block);
            for (int64_t chunk = 1; chunk * CHUNK_KEYS < visible[count - 1]; chunk++) {
                attend_chunk(qt, visible, count, chunk, keys, values, kv_s, D, scale, cur, block);
                for (int r = 0; r < count; r++)
                    if (visible[r] > chunk * CHUNK_KEYS)
                        fold(&all_max[r], &all_sum[r], acc + r * D, cur_max[r], cur_sum[r], cur_acc + r * D, D);
            }
            for (int r = 0; r < count; r++) {
                int64_t t = (first + r) / group, h = head * group + (first + r) % group;
                finish_row(acc + r * D, all_sum[r], D, out + t * out_t + h * out_h,
                           gate ? gate + t * gate_t + h * gate_h : NULL);
            }
        }
        free(qt);
        free(visible);
        free(block.keys);
        free(block.values);
        free(acc);
    }
    if (split && !failed) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t row = 0; row < KVH * per_head; row++) {
            int64_t head = row / per_head, t = row % per_head / group, h = head * group + row % per_head % group;
            int64_t at = row * chunks;
            for (int64_t chunk = 1; chunk * CHUNK_KEYS < past + t + 1; chunk++)
                fold(&part_max[at], &part_sum[at], parts + at * D, part_max[at + chunk], part_sum[at + chunk],
                     parts + (at + chunk) * D, D);
            finish_row(parts + at * D, part_sum[at], D, out + t * out_t + h * out_h,
                       gate ? gate + t * gate_t + h * gate_h : NULL);
        }
    }
    free(parts), free(part_max), free(part_sum);
    return failed ? -1 : 0;
}

#endif
