/* Causal attention of T new tokens over a bf16 K/V cache, for prefill chunks and decode alike.
 *
 * Query row (t, h) sees keys [0, past + t]. Keys are visited in fixed blocks of 256 counted from
 * key 0, and the blocks in chunks of CHUNK_KEYS: within a chunk a row keeps an online softmax
 * (scores in fp32 from bf16 dot products, exponentials taken base 2 with the softmax scale and
 * log2(e) folded into one multiply-subtract, probabilities rounded to bf16 for the P.V products as
 * PyTorch's flash kernel does, row sums and outputs in fp32), and the chunks' states are folded in
 * key order. Each row's arithmetic depends only on its own query and its own visible keys, never
 * on how many rows share the call or how it is split over threads, so a token attended alone
 * (decode) gets the same bits as beside others (draft verification, or any prefill chunking). An
 * optional output gate multiplies each output by sigmoid(gate), with the bf16 roundings of
 * `attn * torch.sigmoid(gate)`.
 *
 * Work items are (K/V head, tile of up to 512 query rows), or, when there are fewer of those than
 * threads (decode: one item per K/V head), (K/V head, tile, chunk) with the chunks' states kept
 * apart and folded afterwards; an item walks its key blocks once. Each
 * block is repacked so that both products are outer products on the bf16 pair dot-product
 * instruction: keys as [D / 2][256] pairs along D (a lane per key), values as [128][D] pairs along
 * the keys (a lane per channel). Every score and output lane is then one sequential fp32 chain
 * (pair by pair), whatever the number of rows computed together: up to four rows share each
 * packed load, which is where the speed comes from, and a row alone runs the same chain.
 *
 * With `amx` set (CPUs with AMX tiles, every call there; D a multiple of 32) groups of 32 rows
 * take the tile unit for both products instead, from the same packed blocks (they are the tile
 * unit's B layouts), with the same softmax steps and roundings. Each score and output is then an
 * fp32 sum in the tile unit's order, so its last bits can differ from the chains above, but a row's
 * bits still depend only on its own query and visible keys: decode and draft verification, which
 * both take this path on such CPUs, agree bit for bit.
 *
 * Built twice from this file: with AVX-512 BF16 (and AMX), the code below, and with AVX2 + FMA +
 * F16C, causal_avx2.h (fp32 products, the same guarantees for a row's bits, no tile unit); the
 * Python side runs the build the CPU has. The two builds give different bits from each other.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

/* Both builds: keys of one softmax state (a multiple of either build's block), and the most memory
 * the chunks' states of a call split by chunk may take. */
#define CHUNK_KEYS 2048
#define SPLIT_BYTES (256 << 20)

/* Whether a call's work items (K/V head, tile of rows) become one per chunk of keys: when there
 * are fewer of them than threads, the keys span more than one chunk and their states fit. */
static int split_by_chunk(int64_t items, int threads, int64_t chunks, int64_t state_bytes) {
    return items < threads && chunks > 1 && state_bytes <= SPLIT_BYTES;
}

#if defined(__AVX512BF16__)
#include "../bf16_simd.h"

#define KEYS_PER_BLOCK 256
#define ROWS_PER_TILE 512
#define MAX_DIM 256
#define PREFETCH_KEYS 16 /* how far ahead the packing requests keys and values */
#define FEW_ROWS 16      /* tiles of at most this many rows pack a block SUB_KEYS keys at a time */
#define SUB_KEYS 32

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

/* The next block's keys and values, requested from memory a line at a time while a block is
 * computed, so that reading them overlaps the products (decode is otherwise memory, then compute). */
typedef struct {
    const char *at[2], *end[2];
} Ahead;

static inline __attribute__((always_inline)) void request_ahead(Ahead *ahead) {
    for (int s = 0; s < 2; s++)
        if (ahead->at[s] < ahead->end[s]) {
            _mm_prefetch(ahead->at[s], _MM_HINT_T1);
            ahead->at[s] += 64;
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

/* Values of one block as bf16 pairs: packed[j * D + d] = V[2j][d] | V[2j + 1][d] << 16 for the
 * pairs the block's keys fill (zero past its last key). */
static void pack_values(const uint16_t *values, int64_t ld, int64_t D, int in_block, uint32_t *packed) {
    /* Word i of the first / second half of an interleave of a and b: a[i], b[i], a[i + 1], ... */
    __m512i first_half = _mm512_setzero_si512(), second_half = _mm512_setzero_si512();
    {
        uint16_t low[32], high[32];
        for (int i = 0; i < 32; i++) low[i] = (uint16_t)(i / 2 + (i % 2) * 32), high[i] = (uint16_t)(low[i] + 16);
        first_half = _mm512_loadu_si512(low), second_half = _mm512_loadu_si512(high);
    }
    for (int j = 0; 2 * j < in_block; j++) {
        const uint16_t *first = values + 2 * j * ld, *second = first + ld;
        int has_second = 2 * j + 1 < in_block;
        int64_t d = 0;
        for (; d + 32 <= D; d += 32) {
            _mm_prefetch((const char *)(first + PREFETCH_KEYS * ld + d), _MM_HINT_T1);
            _mm_prefetch((const char *)(second + PREFETCH_KEYS * ld + d), _MM_HINT_T1);
            __m512i a = _mm512_loadu_si512(first + d);
            __m512i b = has_second ? _mm512_loadu_si512(second + d) : _mm512_setzero_si512();
            _mm512_storeu_si512(packed + j * D + d, _mm512_permutex2var_epi16(a, first_half, b));
            _mm512_storeu_si512(packed + j * D + d + 16, _mm512_permutex2var_epi16(a, second_half, b));
        }
        if (d < D) {
            __m512i low = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(first + d)));
            __m512i high = has_second ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(second + d)))
                                      : _mm512_setzero_si512();
            _mm512_storeu_si512(packed + j * D + d, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
        }
    }
}

/* scores[r][at + j] = q_r . k_j (unscaled) for R rows (up to 8) and the packed keys (`width` a
 * line), 16 * V keys at a time: lane j accumulates the pairs of D in order, sharing each packed key
 * load between the rows. top[r] takes the lane-wise max of the scores row r sees (its first n[r]
 * of these keys). */
static inline __attribute__((always_inline)) void group_scores(Row *rows, const int R, const int V,
                                                              const uint32_t *keys, int64_t width, int64_t pairs,
                                                              int seen, const int *n, float scores[][KEYS_PER_BLOCK],
                                                              int at, __m512 *top, Ahead *ahead) {
    const pair_t *query[8];
    for (int r = 0; r < R; r++) query[r] = (const pair_t *)rows[r].query;
    for (int j0 = 0; j0 < seen; j0 += 16 * V) {
        __m512 acc[8][4];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < V; c++) acc[r][c] = _mm512_setzero_ps();
        for (int64_t p = 0; p < pairs; p++) {
            request_ahead(ahead);
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
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < CH; c++) {
            acc[r][c] = _mm512_loadu_ps(rows[r].acc + offset + 16 * c);
            if (rescale) acc[r][c] = _mm512_mul_ps(acc[r][c], correction[r]);
        }
    for (int j = 0; j < pairs; j++) {
        request_ahead(ahead);
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

/* R rows (1 to 4) against one packed block, row r seeing its first n[r] >= 1 keys. */
static inline __attribute__((always_inline)) void group_block(Row *rows, const int R, const int *n,
                                                             const uint32_t *keys, const uint32_t *values,
                                                             int64_t D, float log2_scale, Ahead *ahead) {
    float scores[4][KEYS_PER_BLOCK];
    uint32_t probs[4][KEYS_PER_BLOCK / 2];
    __m512 correction[4];
    /* Keys no row of the group sees would only add products with probability 0 (acc + 0 is acc):
     * skipping them changes no bits. */
    int seen = n[0];
    for (int r = 1; r < R; r++) seen = n[r] > seen ? n[r] : seen;
    __m512 top[4];
    for (int r = 0; r < R; r++) top[r] = _mm512_set1_ps(-INFINITY);
    group_scores(rows, R, 4, keys, KEYS_PER_BLOCK, D / 2, (seen + 63) / 64 * 64, n, scores, 0, top, ahead);
    /* Once a row's max settles its correction is exactly 1 and the rescale would change nothing. */
    int rescale = 0;
    for (int r = 0; r < R; r++) {
        float before = rows[r].max;
        correction[r] = softmax_step(&rows[r], scores[r], n[r], (seen + 31) / 32 * 32, top[r], log2_scale,
                                     (uint16_t *)probs[r]);
        rescale |= rows[r].max != before;
    }
    values_all(rows, R, correction, probs, 0, values, D, (seen + 1) / 2, rescale, ahead);
}

#include "causal_amx.h"

static void rows_block(Row *rows, int R, const int *n, const uint32_t *keys, const uint32_t *values, int64_t D,
                       float log2_scale, Ahead *ahead) {
    switch (R) {
    case 4: group_block(rows, 4, n, keys, values, D, log2_scale, ahead); break;
    case 3: group_block(rows, 3, n, keys, values, D, log2_scale, ahead); break;
    case 2: group_block(rows, 2, n, keys, values, D, log2_scale, ahead); break;
    default: group_block(rows, 1, n, keys, values, D, log2_scale, ahead); break;
    }
}

/* Scores of R rows (1 to 8) against SUB_KEYS packed keys, into columns [at, at + SUB_KEYS). */
static void sub_scores(Row *rows, int R, const uint32_t *keys, int64_t pairs, const int *n,
                       float scores[][KEYS_PER_BLOCK], int at, __m512 *top, Ahead *ahead) {
#define SUB_SCORES(R) group_scores(rows, R, SUB_KEYS / 16, keys, SUB_KEYS, pairs, SUB_KEYS, n, scores, at, top, ahead)
    switch (R) {
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

/* values_all for R rows (1 to 4). */
static void sub_values(Row *rows, int R, const __m512 *correction, const uint32_t probs[][KEYS_PER_BLOCK / 2],
                       int from, const uint32_t *values, int64_t D, int pairs, int rescale, Ahead *ahead) {
    switch (R) {
    case 4: values_all(rows, 4, correction, probs, from, values, D, pairs, rescale, ahead); break;
    case 3: values_all(rows, 3, correction, probs, from, values, D, pairs, rescale, ahead); break;
    case 2: values_all(rows, 2, correction, probs, from, values, D, pairs, rescale, ahead); break;
    default: values_all(rows, 1, correction, probs, from, values, D, pairs, rescale, ahead); break;
    }
}

/* A tile of at most FEW_ROWS rows (decode, short draft verification) against one block of keys k
 * and values v (in_block of them), row r seeing its first n[r] >= 1. A block packed whole and then
 * read once per group of rows (group_block) spends as long packing as multiplying when the rows are
 * few, its packed copy streaming through L2; here SUB_KEYS keys at a time are packed and used by
 * every row while still in L1, up to 8 rows a group. Each score and output lane is the same chain
 * as in group_block, so the bits are the same. */
static void few_rows_block(Row *rows, int count, const int *n, const uint16_t *k, const uint16_t *v, int64_t ld,
                           int64_t D, int in_block, float log2_scale, uint32_t *packed_keys,
                           uint32_t *packed_values, Ahead *ahead) {
    float scores[FEW_ROWS][KEYS_PER_BLOCK];
    uint32_t probs[FEW_ROWS][KEYS_PER_BLOCK / 2];
    __m512 top[FEW_ROWS], correction[FEW_ROWS];
    int seen = 0, from_here[FEW_ROWS];
    for (int r = 0; r < count; r++) {
        seen = n[r] > seen ? n[r] : seen;
        top[r] = _mm512_set1_ps(-INFINITY);
    }
    for (int at = 0; at < seen; at += SUB_KEYS) {
        int here = in_block - at < SUB_KEYS ? in_block - at : SUB_KEYS;
        pack_keys(k + at * ld, ld, D, here, SUB_KEYS, packed_keys, SUB_KEYS);
        for (int r = 0; r < count; r++) from_here[r] = n[r] - at;
        for (int r = 0; r < count; r += 8)
            sub_scores(rows + r, count - r < 8 ? count - r : 8, packed_keys, D / 2, from_here + r, scores + r, at,
                       top + r, ahead);
    }
    int rescale = 0;
    for (int r = 0; r < count; r++) {
        float before = rows[r].max;
        correction[r] = softmax_step(&rows[r], scores[r], n[r], (seen + 31) / 32 * 32, top[r], log2_scale,
                                     (uint16_t *)probs[r]);
        rescale |= rows[r].max != before;
    }
    for (int at = 0; at < seen; at += SUB_KEYS) {
        int here = in_block - at < SUB_KEYS ? in_block - at : SUB_KEYS, pairs = (seen - at + 1) / 2;
        pack_values(v + at * ld, ld, D, here, packed_values);
        for (int r = 0; r < count; r += 4)
            sub_values(rows + r, count - r < 4 ? count - r : 4, correction + r, probs + r, at / 2, packed_values, D,
                       pairs < SUB_KEYS / 2 ? pairs : SUB_KEYS / 2, rescale && at == 0, ahead);
    }
}

/* The softmax states of `count` rows of one K/V head (visible non-decreasing) over keys [start, end),
 * from a fresh start, each block streamed once; rows that see none of them are left untouched. */
static void attend_keys(Row *rows, int count, int64_t start, int64_t end, const uint16_t *k, const uint16_t *v,
                        int64_t ld, int64_t D, float log2_scale, uint32_t *packed_keys, uint32_t *packed_values,
                        const uint16_t *queries, float *acc, TileGroup groups[2]) {
    if (end > rows[count - 1].visible) end = rows[count - 1].visible;
    for (int r = 0; r < count; r++) {
        if (rows[r].visible <= start) continue;
        rows[r].max = -INFINITY;
        _mm512_storeu_ps(rows[r].sum, _mm512_setzero_ps());
        for (int64_t d = 0; d < D; d++) rows[r].acc[d] = 0.0f;
    }
    for (int64_t first = start; first < end; first += KEYS_PER_BLOCK) {
        int in_block = (int)(end - first < KEYS_PER_BLOCK ? end - first : KEYS_PER_BLOCK);
        if (queries) {
            pack_keys(k + first * ld, ld, D, in_block, (in_block + 63) / 64 * 64, packed_keys, KEYS_PER_BLOCK);
            pack_values(v + first * ld, ld, D, in_block, packed_values);
            clear_value_pairs(packed_values, D, (in_block + 1) / 2, (in_block + 31) / 32 * 16);
            amx_block(rows, count, first, in_block, queries, acc, packed_keys, packed_values, D, log2_scale, groups);
            continue;
        }
        /* The next block, one line of its keys and one of its values per step of the products: with 8
         * query rows a K/V head (decode of Qwen3-Next) that is all of it, with one about half (the
         * packing requests the rest). Decode over 4K-32K keys ran 16-20% faster, prefill as before. */
        int64_t next = first + KEYS_PER_BLOCK < end ? first + KEYS_PER_BLOCK : end;
        int64_t next_end = next + KEYS_PER_BLOCK < end ? next + KEYS_PER_BLOCK : end;
        Ahead ahead = { { (const char *)(k + next * ld), (const char *)(v + next * ld) },
                        { (const char *)(k + next_end * ld), (const char *)(v + next_end * ld) } };
        if (count <= FEW_ROWS) {
            int r0 = 0, n[FEW_ROWS];
            while (rows[r0].visible <= first) r0++;
            for (int r = r0; r < count; r++) {
                int64_t seen = rows[r].visible - first;
                n[r - r0] = (int)(seen < in_block ? seen : in_block);
            }
            few_rows_block(rows + r0, count - r0, n, k + first * ld, v + first * ld, ld, D, in_block, log2_scale,
                           packed_keys, packed_values, &ahead);
            continue;
        }
        pack_keys(k + first * ld, ld, D, in_block, (in_block + 63) / 64 * 64, packed_keys, KEYS_PER_BLOCK);
        pack_values(v + first * ld, ld, D, in_block, packed_values);
        for (int r = 0; r < count;) {
            if (rows[r].visible <= first) {
                r++;
                continue;
            }
            int n[4], group = 0;
            while (group < 4 && r + group < count && rows[r + group].visible > first) {
                int64_t seen = rows[r + group].visible - first;
                n[group++] = (int)(seen < in_block ? seen : in_block);
            }
            rows_block(&rows[r], group, n, packed_keys, packed_values, D, log2_scale, &ahead);
            r += group;
        }
    }
}

/* A softmax state over no keys: folding another into it gives that one's bits. */
static void clear_state(float *max, float *sum, float *acc, int64_t D) {
    *max = -INFINITY;
    _mm512_storeu_ps(sum, _mm512_setzero_ps());
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(acc + d, _mm512_setzero_ps());
}

/* into = the softmax state over both states' keys (into's first): each side rescaled to the larger
 * max; a side over no keys (max -inf, clamped) weighs exactly 0. */
static void fold(float *into_max, float *into_sum, float *into_acc, float max, const float *sum, const float *acc,
                 int64_t D) {
    float best = *into_max > max ? *into_max : max;
    __m512 floor = _mm512_set1_ps(-150.0f);
    __m512 first = exp2_512(_mm512_max_ps(_mm512_set1_ps(*into_max - best), floor));
    __m512 second = exp2_512(_mm512_max_ps(_mm512_set1_ps(max - best), floor));
    _mm512_storeu_ps(into_sum, _mm512_fmadd_ps(_mm512_loadu_ps(sum), second, _mm512_mul_ps(_mm512_loadu_ps(into_sum), first)));
    for (int64_t d = 0; d < D; d += 16)
        _mm512_storeu_ps(into_acc + d, _mm512_fmadd_ps(_mm512_loadu_ps(acc + d), second,
                                                       _mm512_mul_ps(_mm512_loadu_ps(into_acc + d), first)));
    *into_max = best;
}

/* out [D] = acc / sum (its lanes added) in bf16, times sigmoid(gate) with the bf16 roundings of
 * `attn * torch.sigmoid(gate)` when gate is not NULL. */
static void finish_row(const float *acc, const float *sum, int64_t D, uint16_t *out, const uint16_t *gate) {
    __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(_mm512_loadu_ps(sum)));
    for (int64_t d = 0; d < D; d += 16) {
        __m256i attn = to_bf16(_mm512_mul_ps(_mm512_loadu_ps(acc + d), inverse));
        if (gate) {
            __m512 g = widen_bf16(_mm256_loadu_si256((const __m256i *)(gate + d)));
            __m512 sigmoid = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                           _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            attn = to_bf16(_mm512_mul_ps(widen_bf16(attn), widen_bf16(to_bf16(sigmoid))));
        }
        _mm256_storeu_si256((__m256i *)(out + d), attn);
    }
}

/* Softmax states of a call's rows, chunk by chunk: row i's state over chunk c at index i * chunks + c
 * (max, 16 lane sums, D outputs). */
typedef struct {
    float *max, *sum, *acc;
    int64_t chunks;
} Parts;

/* q [T, H, D] (strides q_t, q_h), k/v [KVH, S, D] (strides kv_h, kv_s), out [T, H, D] (strides
 * out_t, out_h), gate NULL or [T, H, D] (strides gate_t, gate_h); unit stride along D; D a
 * multiple of 16 and at most MAX_DIM. Query t sees keys 0 .. past + t. amx: use the tile unit
 * where D allows. Returns 0, or -1 when a work buffer cannot be allocated. */
int attention_causal_bf16(const uint16_t *q, int64_t q_t, int64_t q_h, const uint16_t *k, const uint16_t *v,
                          int64_t kv_h, int64_t kv_s, int64_t T, int64_t H, int64_t KVH, int64_t D, int64_t past,
                          float scale, uint16_t *out, int64_t out_t, int64_t out_h, const uint16_t *gate,
                          int64_t gate_t, int64_t gate_h, int amx, int threads) {
    amx = amx && D % 32 == 0 && amx_permitted();
    int64_t group = H / KVH, per_head = T * group, rows_total = KVH * per_head;
    int64_t tiles = (per_head + ROWS_PER_TILE - 1) / ROWS_PER_TILE, chunks = (past + T + CHUNK_KEYS - 1) / CHUNK_KEYS;
    int split = split_by_chunk(KVH * tiles, threads, chunks, rows_total * chunks * (D + 17) * 4);
    int64_t items = KVH * tiles * (split ? chunks : 1), tile_rows = per_head < ROWS_PER_TILE ? per_head : ROWS_PER_TILE;
    Parts parts = { NULL, NULL, NULL, chunks };
    if (split) {
        parts.max = malloc(sizeof(float) * (size_t)(rows_total * chunks));
        parts.sum = malloc(sizeof(float) * 16 * (size_t)(rows_total * chunks));
        parts.acc = malloc(sizeof(float) * (size_t)(rows_total * chunks * D));
        if (!parts.max || !parts.sum || !parts.acc) {
            free(parts.max), free(parts.sum), free(parts.acc);
            return -1;
        }
    }
    float log2_scale = scale * 1.44269504088896341f;
    int failed = 0;
    if (threads > items) threads = (int)items;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* The tile path reads and writes whole groups of rows (queries, accumulators). */
        int64_t slots = tile_rows + (amx ? TILE_GROUP : 0);
        Row *rows = malloc(sizeof(Row) * (size_t)slots);
        float *acc = malloc(sizeof(float) * (size_t)(slots * D));
        /* Unsplit, each row's chunks folded so far: max, 16 lane sums and D outputs. */
        float *total = split ? NULL : malloc(sizeof(float) * (size_t)(tile_rows * (D + 17)));
        uint32_t *packed_keys = malloc(sizeof(uint32_t) * (KEYS_PER_BLOCK / 2) * D);
        uint32_t *packed_values = malloc(sizeof(uint32_t) * (KEYS_PER_BLOCK / 2) * D);
        uint16_t *queries = amx ? malloc(sizeof(uint16_t) * (size_t)(slots * D)) : NULL;
        TileGroup *groups = amx ? aligned_alloc(64, sizeof(TileGroup) * 2) : NULL;
        int usable = rows && acc && (total || split) && packed_keys && packed_values && ((queries && groups) || !amx);
        failed |= !usable;
        if (amx && usable) amx_configure();
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            if (!usable) continue;
            int64_t per_item_chunks = split ? chunks : 1;
            int64_t head = item / (tiles * per_item_chunks), first = item / per_item_chunks % tiles * ROWS_PER_TILE;
            int count = (int)(per_head - first < ROWS_PER_TILE ? per_head - first : ROWS_PER_TILE);
            for (int r = 0; r < count; r++) {
                int64_t t = (first + r) / group, h = head * group + (first + r) % group;
                rows[r] = (Row){ .query = q + t * q_t + h * q_h, .out = out + t * out_t + h * out_h,
                                 .gate = gate ? gate + t * gate_t + h * gate_h : NULL, .visible = past + t + 1,
                                 .acc = acc + (int64_t)r * D };
                if (queries) __builtin_memcpy(queries + r * D, rows[r].query, sizeof(uint16_t) * (size_t)D);
            }
            const uint16_t *keys = k + head * kv_h, *values = v + head * kv_h;
            if (split) {
                int64_t chunk = item % chunks, start = chunk * CHUNK_KEYS;
                if (rows[count - 1].visible <= start) continue;
                attend_keys(rows, count, start, start + CHUNK_KEYS, keys, values, kv_s, D, log2_scale, packed_keys,
                            packed_values, queries, acc, groups);
                for (int r = 0; r < count; r++) {
                    if (rows[r].visible <= start) continue;
                    int64_t at = (head * per_head + first + r) * chunks + chunk;
                    parts.max[at] = rows[r].max;
                    __builtin_memcpy(parts.sum + at * 16, rows[r].sum, sizeof(float) * 16);
                    __builtin_memcpy(parts.acc + at * D, rows[r].acc, sizeof(float) * (size_t)D);
                }
                continue;
            }
            float *total_acc = total, *total_sum = total + count * D, *total_max = total_sum + count * 16;
            for (int r = 0; r < count; r++) clear_state(&total_max[r], total_sum + r * 16, total_acc + r * D, D);
            for (int64_t start = 0; start < rows[count - 1].visible; start += CHUNK_KEYS) {
                attend_keys(rows, count, start, start + CHUNK_KEYS, keys, values, kv_s, D, log2_scale, packed_keys,
                            packed_values, queries, acc, groups);
                for (int r = 0; r < count; r++)
                    if (rows[r].visible > start)
                        fold(&total_max[r], total_sum + r * 16, total_acc + r * D, rows[r].max, rows[r].sum,
                             rows[r].acc, D);
            }
            for (int r = 0; r < count; r++) finish_row(total_acc + r * D, total_sum + r * 16, D, rows[r].out, rows[r].gate);
        }
        if (amx && usable) _tile_release();
        free(queries);
        free(groups);
        free(rows);
        free(acc);
        free(total);
        free(packed_keys);
        free(packed_values);
    }
    if (split && !failed) {
        /* Each row's chunks folded in key order, as an unsplit item folds them. */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t row = 0; row < rows_total; row++) {
            int64_t head = row / per_head, t = row % per_head / group, h = head * group + row % per_head % group;
            float max, sum[16], acc[MAX_DIM];
            clear_state(&max, sum, acc, D);
            for (int64_t chunk = 0; chunk * CHUNK_KEYS < past + t + 1; chunk++) {
                int64_t at = row * chunks + chunk;
                fold(&max, sum, acc, parts.max[at], parts.sum + at * 16, parts.acc + at * D, D);
            }
            finish_row(acc, sum, D, out + t * out_t + h * out_h, gate ? gate + t * gate_t + h * gate_h : NULL);
        }
    }
    free(parts.max), free(parts.sum), free(parts.acc);
    return failed ? -1 : 0;
}

#else /* AVX2 + FMA + F16C */
#include "causal_avx2.h"
#endif
