/* Causal attention of T new tokens over a bf16 K/V cache, for prefill chunks and decode alike.
 *
 * Query row (t, h) sees keys [0, past + t]. Keys are visited in fixed blocks of 64 counted from
 * key 0 with an online softmax: scores in fp32 from bf16 dot products, probabilities rounded to
 * bf16 for the P.V products (as PyTorch's flash kernel does), row sums and outputs in fp32. Each
 * row's arithmetic depends only on its own query and its own visible keys, never on how many
 * rows share the call, so a token attended alone (decode) gets the same bits as beside others
 * (draft verification, or any prefill chunking).
 *
 * Work items are (K/V head, tile of up to 128 query rows); a tile walks the key blocks once, each
 * block's values repacked into bf16 pairs so P.V runs on the same dot-product instruction.
 *
 * Built with AVX-512 BF16; the Python side only loads it on CPUs that report avx512_bf16.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "../bf16_simd.h"

#define KEYS_PER_BLOCK 64
#define ROWS_PER_TILE 128
#define MAX_DIM 256

/* e^x for x <= 0 (results below ~1e-45 become 0): 2^n * poly(r), x = n ln2 + r, |r| <= ln2 / 2. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

typedef struct {
    const uint16_t *query; /* [D] */
    uint16_t *out;         /* [D] */
    int64_t visible;       /* keys 0 .. visible - 1 */
    float max, sum;
    float *acc;            /* [D] fp32 */
} Row;

/* acc[j] = q . k_j for 16 keys, CHUNKS = D / 32 known at compile time: the query stays in
 * registers and four keys' dot products are interleaved so their dependency chains overlap. */
static inline __attribute__((always_inline)) void dots16(const uint16_t *q, const uint16_t *base, int64_t ld,
                                                         __m512 acc[16], const int CHUNKS) {
    __m512bh qv[8];
    for (int c = 0; c < CHUNKS; c++) qv[c] = (__m512bh)_mm512_loadu_si512(q + 32 * c);
    for (int j = 0; j < 16; j += 4) {
        __m512 d0 = _mm512_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
        const uint16_t *k0 = base + j * ld, *k1 = k0 + ld, *k2 = k1 + ld, *k3 = k2 + ld;
        for (int c = 0; c < CHUNKS; c++) {
            d0 = _mm512_dpbf16_ps(d0, qv[c], (__m512bh)_mm512_loadu_si512(k0 + 32 * c));
            d1 = _mm512_dpbf16_ps(d1, qv[c], (__m512bh)_mm512_loadu_si512(k1 + 32 * c));
            d2 = _mm512_dpbf16_ps(d2, qv[c], (__m512bh)_mm512_loadu_si512(k2 + 32 * c));
            d3 = _mm512_dpbf16_ps(d3, qv[c], (__m512bh)_mm512_loadu_si512(k3 + 32 * c));
        }
        acc[j] = d0, acc[j + 1] = d1, acc[j + 2] = d2, acc[j + 3] = d3;
    }
}

/* scores[j] = scale * q . k_j for the `count` keys of a block (keys rows of stride ld). Every key's
 * dot product is the same chain of 32-wide steps in D order on every path. */
static void block_scores(const uint16_t *q, const uint16_t *keys, int64_t ld, int64_t D, int count, float scale,
                         float *scores) {
    for (int j0 = 0; j0 < count; j0 += 16) {
        __m512 acc[16];
        int keys_here = count - j0 < 16 ? count - j0 : 16;
        const uint16_t *base = keys + j0 * ld;
        if (keys_here == 16 && D == 128) {
            dots16(q, base, ld, acc, 4);
        } else if (keys_here == 16 && D == 256) {
            dots16(q, base, ld, acc, 8);
        } else {
            for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
            for (int j = 0; j < keys_here; j++) {
                __m512 dot = _mm512_setzero_ps();
                for (int64_t d = 0; d < D; d += 32)
                    dot = _mm512_dpbf16_ps(dot, load_bf16(q + d, D - d), load_bf16(base + j * ld + d, D - d));
                acc[j] = dot;
            }
        }
        _mm512_storeu_ps(scores + j0, _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale)));
    }
}

/* Values of one block as bf16 pairs: packed[j * D + d] = V[2j][d] | V[2j + 1][d] << 16, zero past
 * the block's last key, so P.V is one dot-product instruction per pair of keys. */
static void pack_values(const uint16_t *values, int64_t ld, int64_t D, int in_block, uint32_t *packed) {
    for (int j = 0; 2 * j < in_block; j++) {
        const uint16_t *first = values + 2 * j * ld;
        for (int64_t d = 0; d < D; d += 16) {
            __m512i low = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(first + d)));
            __m512i high = _mm512_setzero_si512();
            if (2 * j + 1 < in_block)
                high = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(first + ld + d)));
            _mm512_storeu_si512(packed + j * D + d, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
        }
    }
}

/* acc = acc * correction + sum over key pairs of probs . values, D / 16 == CHUNKS slices kept in
 * registers (a constant CHUNKS lets the compiler keep them there). */
static inline __attribute__((always_inline)) void weighted_values(float *acc_row, int chunks_rt, __m512 correction,
                                                                  const uint32_t *pairs, int pair_count,
                                                                  const uint32_t *packed, int64_t D, const int CHUNKS) {
    int chunks = CHUNKS ? CHUNKS : chunks_rt;
    __m512 acc[MAX_DIM / 16];
    for (int c = 0; c < chunks; c++) acc[c] = _mm512_mul_ps(_mm512_loadu_ps(acc_row + 16 * c), correction);
    for (int j = 0; j < pair_count; j++) {
        __m512bh p = (__m512bh)_mm512_set1_epi32((int)pairs[j]);
        const uint32_t *v = packed + j * D;
        for (int c = 0; c < chunks; c++)
            acc[c] = _mm512_dpbf16_ps(acc[c], p, (__m512bh)_mm512_loadu_si512(v + 16 * c));
    }
    for (int c = 0; c < chunks; c++) _mm512_storeu_ps(acc_row + 16 * c, acc[c]);
}

/* Online-softmax update of one row from its block scores: bf16 probabilities into probs (zero
 * past n), running max and sum updated; returns the factor that rescales the row's accumulator. */
static inline __m512 softmax_step(Row *row, const float *scores, int n, uint16_t *probs) {
    __m512 top = _mm512_set1_ps(row->max);
    for (int j0 = 0; j0 < n; j0 += 16) {
        __mmask16 live = (__mmask16)(n - j0 >= 16 ? 0xffff : (1u << (n - j0)) - 1);
        top = _mm512_mask_max_ps(top, live, top, _mm512_loadu_ps(scores + j0));
    }
    float best = _mm512_reduce_max_ps(top);
    __m512 best_v = _mm512_set1_ps(best), total = _mm512_setzero_ps();
    for (int j0 = 0; j0 < n; j0 += 16) {
        __mmask16 live = (__mmask16)(n - j0 >= 16 ? 0xffff : (1u << (n - j0)) - 1);
        __m512 p = _mm512_maskz_mov_ps(live, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + j0), best_v)));
        total = _mm512_add_ps(total, p);
        _mm256_storeu_si256((__m256i *)(probs + j0), to_bf16(p));
    }
    __m512 correction = exp_nonpositive(_mm512_set1_ps(row->max - best));
    row->sum = row->sum * _mm512_cvtss_f32(correction) + _mm512_reduce_add_ps(total);
    row->max = best;
    return correction;
}

/* One row against one key block of which it sees the first n keys (n >= 1). */
static void row_block(Row *row, const uint16_t *keys, int64_t ld, int64_t D, int n, float scale,
                      const uint32_t *packed) {
    float scores[KEYS_PER_BLOCK];
    uint16_t probs[KEYS_PER_BLOCK];
    block_scores(row->query, keys, ld, D, n, scale, scores);
    __m512 correction = softmax_step(row, scores, n, probs);
    /* An odd n leaves probs[n] = 0 (a masked lane), the partner of the last key. */
    const uint32_t *pairs = (const uint32_t *)probs;
    int pair_count = (n + 1) / 2;
    if (D == 128) weighted_values(row->acc, 8, correction, pairs, pair_count, packed, D, 8);
    else if (D == 256) weighted_values(row->acc, 16, correction, pairs, pair_count, packed, D, 16);
    else weighted_values(row->acc, (int)(D / 16), correction, pairs, pair_count, packed, D, 0);
}

/* dots16 for two queries at once, sharing every key load; each dot product is the same chain. */
static inline __attribute__((always_inline)) void dots16_pair(const uint16_t *qa, const uint16_t *qb,
                                                              const uint16_t *base, int64_t ld, __m512 acc_a[16],
                                                              __m512 acc_b[16], const int CHUNKS) {
    __m512bh va[8], vb[8];
    for (int c = 0; c < CHUNKS; c++) {
        va[c] = (__m512bh)_mm512_loadu_si512(qa + 32 * c);
        vb[c] = (__m512bh)_mm512_loadu_si512(qb + 32 * c);
    }
    for (int j = 0; j < 16; j += 2) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
        const uint16_t *k0 = base + j * ld, *k1 = k0 + ld;
        for (int c = 0; c < CHUNKS; c++) {
            __m512bh key0 = (__m512bh)_mm512_loadu_si512(k0 + 32 * c), key1 = (__m512bh)_mm512_loadu_si512(k1 + 32 * c);
            a0 = _mm512_dpbf16_ps(a0, va[c], key0);
            b0 = _mm512_dpbf16_ps(b0, vb[c], key0);
            a1 = _mm512_dpbf16_ps(a1, va[c], key1);
            b1 = _mm512_dpbf16_ps(b1, vb[c], key1);
        }
        acc_a[j] = a0, acc_a[j + 1] = a1, acc_b[j] = b0, acc_b[j + 1] = b1;
    }
}

/* weighted_values for two rows over 8 slices of D starting at `offset`, sharing value loads. */
static inline __attribute__((always_inline)) void weighted_values_pair(float *acc_a_row, float *acc_b_row,
                                                                       __m512 corr_a, __m512 corr_b,
                                                                       const uint32_t *pairs_a,
                                                                       const uint32_t *pairs_b,
                                                                       const uint32_t *packed, int64_t D,
                                                                       int64_t offset) {
    __m512 acc_a[8], acc_b[8];
    for (int c = 0; c < 8; c++) {
        acc_a[c] = _mm512_mul_ps(_mm512_loadu_ps(acc_a_row + offset + 16 * c), corr_a);
        acc_b[c] = _mm512_mul_ps(_mm512_loadu_ps(acc_b_row + offset + 16 * c), corr_b);
    }
    for (int j = 0; j < KEYS_PER_BLOCK / 2; j++) {
        __m512bh pa = (__m512bh)_mm512_set1_epi32((int)pairs_a[j]), pb = (__m512bh)_mm512_set1_epi32((int)pairs_b[j]);
        const uint32_t *v = packed + j * D + offset;
        for (int c = 0; c < 8; c++) {
            __m512bh value = (__m512bh)_mm512_loadu_si512(v + 16 * c);
            acc_a[c] = _mm512_dpbf16_ps(acc_a[c], pa, value);
            acc_b[c] = _mm512_dpbf16_ps(acc_b[c], pb, value);
        }
    }
    for (int c = 0; c < 8; c++) {
        _mm512_storeu_ps(acc_a_row + offset + 16 * c, acc_a[c]);
        _mm512_storeu_ps(acc_b_row + offset + 16 * c, acc_b[c]);
    }
}

/* Two rows that both see a whole block, D of 128 or 256: the same arithmetic per row as
 * row_block, with key and value loads shared between the rows. */
static void row_pair_block(Row *a, Row *b, const uint16_t *keys, int64_t ld, int64_t D, float scale,
                           const uint32_t *packed) {
    float scores_a[KEYS_PER_BLOCK], scores_b[KEYS_PER_BLOCK];
    uint16_t probs_a[KEYS_PER_BLOCK], probs_b[KEYS_PER_BLOCK];
    for (int j0 = 0; j0 < KEYS_PER_BLOCK; j0 += 16) {
        __m512 acc_a[16], acc_b[16];
        if (D == 128) dots16_pair(a->query, b->query, keys + j0 * ld, ld, acc_a, acc_b, 4);
        else dots16_pair(a->query, b->query, keys + j0 * ld, ld, acc_a, acc_b, 8);
        _mm512_storeu_ps(scores_a + j0, _mm512_mul_ps(reduce16(acc_a), _mm512_set1_ps(scale)));
        _mm512_storeu_ps(scores_b + j0, _mm512_mul_ps(reduce16(acc_b), _mm512_set1_ps(scale)));
    }
    __m512 corr_a = softmax_step(a, scores_a, KEYS_PER_BLOCK, probs_a);
    __m512 corr_b = softmax_step(b, scores_b, KEYS_PER_BLOCK, probs_b);
    for (int64_t offset = 0; offset < D; offset += 128)
        weighted_values_pair(a->acc, b->acc, corr_a, corr_b, (const uint32_t *)probs_a, (const uint32_t *)probs_b,
                             packed, D, offset);
}

/* One work item: `count` rows of one K/V head, key blocks streamed once. */
static void attend_tile(Row *rows, int count, const uint16_t *k, const uint16_t *v, int64_t ld, int64_t D,
                        float scale, uint32_t *packed) {
    int64_t longest = 0;
    for (int r = 0; r < count; r++) longest = rows[r].visible > longest ? rows[r].visible : longest;
    for (int64_t start = 0; start < longest; start += KEYS_PER_BLOCK) {
        int in_block = (int)(longest - start < KEYS_PER_BLOCK ? longest - start : KEYS_PER_BLOCK);
        pack_values(v + start * ld, ld, D, in_block, packed);
        int paired = in_block == KEYS_PER_BLOCK && (D == 128 || D == 256);
        for (int r = 0; r < count; r++) {
            int64_t n = rows[r].visible - start;
            if (paired && r + 1 < count && n >= KEYS_PER_BLOCK && rows[r + 1].visible - start >= KEYS_PER_BLOCK) {
                row_pair_block(&rows[r], &rows[r + 1], k + start * ld, ld, D, scale, packed);
                r++;
            } else if (n > 0) {
                row_block(&rows[r], k + start * ld, ld, D, (int)(n < in_block ? n : in_block), scale, packed);
            }
        }
    }
    for (int r = 0; r < count; r++) {
        float inverse = 1.0f / rows[r].sum;
        for (int64_t d = 0; d < D; d++) rows[r].out[d] = float_to_bf16(rows[r].acc[d] * inverse);
    }
}

/* q [T, H, D] (strides q_t, q_h), k/v [KVH, S, D] (strides kv_h, kv_s), out [T, H, D] (strides
 * out_t, out_h); unit stride along D; D a multiple of 16 and at most MAX_DIM. Query t sees
 * keys 0 .. past + t. Returns 0, or -1 when a work buffer cannot be allocated. */
int attention_causal_bf16(const uint16_t *q, int64_t q_t, int64_t q_h, const uint16_t *k, const uint16_t *v,
                          int64_t kv_h, int64_t kv_s, int64_t T, int64_t H, int64_t KVH, int64_t D, int64_t past,
                          float scale, uint16_t *out, int64_t out_t, int64_t out_h, int threads) {
    int64_t group = H / KVH, per_head = T * group;
    int64_t tiles = (per_head + ROWS_PER_TILE - 1) / ROWS_PER_TILE, items = KVH * tiles;
    int failed = 0;
    if (threads > items) threads = (int)items;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        Row *rows = malloc(sizeof(Row) * ROWS_PER_TILE);
        float *acc = malloc(sizeof(float) * ROWS_PER_TILE * D);
        uint32_t *packed = malloc(sizeof(uint32_t) * (KEYS_PER_BLOCK / 2) * D);
        int usable = rows && acc && packed;
        failed |= !usable;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            if (!usable) continue;
            int64_t head = item / tiles, first = (item % tiles) * ROWS_PER_TILE;
            int count = (int)(per_head - first < ROWS_PER_TILE ? per_head - first : ROWS_PER_TILE);
            for (int r = 0; r < count; r++) {
                int64_t t = (first + r) / group, h = head * group + (first + r) % group;
                rows[r] = (Row){ q + t * q_t + h * q_h, out + t * out_t + h * out_h, past + t + 1, -INFINITY, 0.0f,
                                 acc + (int64_t)r * D };
                for (int64_t d = 0; d < D; d++) rows[r].acc[d] = 0.0f;
            }
            attend_tile(rows, count, k + head * kv_h, v + head * kv_h, kv_s, D, scale, packed);
        }
        free(rows);
        free(acc);
        free(packed);
    }
    return failed ? -1 : 0;
}
