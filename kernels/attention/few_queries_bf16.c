/* Attention of a few query tokens (decode, draft verification) over a bf16 K/V cache.
 *
 * Query row (t, h) sees keys [0, past + t]. Keys are visited in fixed blocks of 64 counted from
 * key 0, with an online softmax in fp32: each row's arithmetic depends only on its own query and
 * its own visible keys, never on how many rows share the call. So a token attended alone (decode)
 * gets the same bits as beside others (verification). The rows of one K/V head share each block
 * while it sits in L1, so K and V stream from memory once per call.
 *
 * Built with AVX-512 BF16; the Python side only loads it on CPUs that report avx512_bf16.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define KEYS_PER_BLOCK 64
#define ROWS_AT_ONCE 8
#define MAX_DIM 512

static inline __m512bh load_bf16(const uint16_t *src, int64_t count) {
    if (count >= 32) return (__m512bh)_mm512_loadu_si512(src);
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << count) - 1), src);
}

static inline __m512 bf16_to_fp32(const uint16_t *src) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src)), 16));
}

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

/* Lane sums of 16 accumulators by one fixed tree: result[i] = sum of acc[i]'s lanes. */
static inline __m512 reduce16(__m512 acc[16]) {
    __m512 pairs[8], quads[4];
    for (int p = 0; p < 8; p++) {
        __m512 a = acc[2 * p], b = acc[2 * p + 1];
        pairs[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    }
    for (int q = 0; q < 4; q++) {
        __m512 a = pairs[2 * q], b = pairs[2 * q + 1];
        quads[q] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
    }
    __m512 d0 = _mm512_add_ps(_mm512_unpacklo_ps(quads[0], quads[1]), _mm512_unpackhi_ps(quads[0], quads[1]));
    __m512 d1 = _mm512_add_ps(_mm512_unpacklo_ps(quads[2], quads[3]), _mm512_unpackhi_ps(quads[2], quads[3]));
    __m512 e = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(d0), _mm512_castps_pd(d1))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(d0), _mm512_castps_pd(d1))));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, e);
}

static inline uint16_t round_to_bf16(float value) {
    union { float f; uint32_t u; } bits = { value };
    if ((bits.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits.u >> 16) | 0x40u);
    bits.u += 0x7fffu + ((bits.u >> 16) & 1u);
    return (uint16_t)(bits.u >> 16);
}

typedef struct {
    const uint16_t *query; /* [D] */
    uint16_t *out;         /* [D] */
    int64_t visible;       /* keys 0 .. visible - 1 */
    float max, sum;
    float *acc;            /* [D] fp32 */
} Row;

/* scores[j] = scale * q . k_j for the `count` keys of a block (keys rows of stride ld). Full
 * groups of 16 keys over a D that is a multiple of 32 (up to 256) take a loop that keeps the
 * query in registers; both loops do the same arithmetic per key. */
static void block_scores(const uint16_t *q, const uint16_t *keys, int64_t ld, int64_t D, int count, float scale,
                         float *scores) {
    for (int j0 = 0; j0 < count; j0 += 16) {
        __m512 acc[16];
        int keys_here = count - j0 < 16 ? count - j0 : 16;
        for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
        const uint16_t *base = keys + j0 * ld;
        if (keys_here == 16 && D % 32 == 0 && D <= 256) {
            __m512bh qv[8];
            int chunks = (int)(D / 32);
            for (int c = 0; c < chunks; c++) qv[c] = (__m512bh)_mm512_loadu_si512(q + 32 * c);
            for (int j = 0; j < 16; j++) {
                const uint16_t *key = base + j * ld;
                __m512 dot = _mm512_setzero_ps();
                for (int c = 0; c < chunks; c++)
                    dot = _mm512_dpbf16_ps(dot, qv[c], (__m512bh)_mm512_loadu_si512(key + 32 * c));
                acc[j] = dot;
            }
        } else {
            for (int64_t d = 0; d < D; d += 32) {
                __m512bh qv = load_bf16(q + d, D - d);
                for (int j = 0; j < keys_here; j++)
                    acc[j] = _mm512_dpbf16_ps(acc[j], qv, load_bf16(base + j * ld + d, D - d));
            }
        }
        _mm512_storeu_ps(scores + j0, _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale)));
    }
}

/* acc[g] = acc[g] * correction[g] + sum_j probs[g][j] * values[j] over one 16-wide slice of D,
 * for `group` rows that each see the block's first keys_of[g] keys (same order for every row). */
static inline void weighted_values(float *const *acc_rows, int64_t d, int64_t D, const float *values, int in_block,
                                   int group, const int *keys_of, const __m512 *correction,
                                   float (*probs)[KEYS_PER_BLOCK]) {
    __m512 acc[ROWS_AT_ONCE];
    int full = group == ROWS_AT_ONCE;
    for (int g = 0; g < group; g++) full &= keys_of[g] == in_block;
    if (full) {
        for (int g = 0; g < ROWS_AT_ONCE; g++) acc[g] = _mm512_mul_ps(_mm512_loadu_ps(acc_rows[g] + d), correction[g]);
        for (int j = 0; j < in_block; j++) {
            __m512 value = _mm512_loadu_ps(values + j * D + d);
            for (int g = 0; g < ROWS_AT_ONCE; g++) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(probs[g][j]), value, acc[g]);
        }
        for (int g = 0; g < ROWS_AT_ONCE; g++) _mm512_storeu_ps(acc_rows[g] + d, acc[g]);
        return;
    }
    for (int g = 0; g < group; g++) {
        if (!keys_of[g]) continue;
        __m512 row = _mm512_mul_ps(_mm512_loadu_ps(acc_rows[g] + d), correction[g]);
        for (int j = 0; j < keys_of[g]; j++)
            row = _mm512_fmadd_ps(_mm512_set1_ps(probs[g][j]), _mm512_loadu_ps(values + j * D + d), row);
        _mm512_storeu_ps(acc_rows[g] + d, row);
    }
}

/* One K/V head: all its rows, keys streamed block by block. */
static void attend_head(Row *rows, int count, const uint16_t *k, const uint16_t *v, int64_t ld, int64_t D,
                        float scale, float *values, float (*probs)[KEYS_PER_BLOCK]) {
    int64_t longest = 0;
    for (int r = 0; r < count; r++) longest = rows[r].visible > longest ? rows[r].visible : longest;
    for (int64_t start = 0; start < longest; start += KEYS_PER_BLOCK) {
        int in_block = (int)(longest - start < KEYS_PER_BLOCK ? longest - start : KEYS_PER_BLOCK);
        int64_t ahead = start + KEYS_PER_BLOCK < longest ? start + KEYS_PER_BLOCK : start;
        for (int j = 0; j < in_block; j++) {
            /* The hardware prefetcher does not run ahead of this block-by-block walk: ask for the
             * next block's keys and values while this one is computed. */
            for (int64_t d = 0; d < D; d += 32) {
                _mm_prefetch((const char *)(k + (ahead + j) * ld + d), _MM_HINT_T0);
                _mm_prefetch((const char *)(v + (ahead + j) * ld + d), _MM_HINT_T0);
            }
            for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(values + j * D + d, bf16_to_fp32(v + (start + j) * ld + d));
        }
        for (int r0 = 0; r0 < count; r0 += ROWS_AT_ONCE) {
            int group = count - r0 < ROWS_AT_ONCE ? count - r0 : ROWS_AT_ONCE;
            int keys_of[ROWS_AT_ONCE];
            __m512 correction[ROWS_AT_ONCE];
            for (int g = 0; g < group; g++) {
                Row *row = &rows[r0 + g];
                int n = row->visible - start < in_block ? (int)(row->visible - start) : in_block;
                keys_of[g] = n > 0 ? n : 0;
                if (n <= 0) continue;
                float scores[KEYS_PER_BLOCK];
                block_scores(row->query, k + start * ld, ld, D, n, scale, scores);
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
                    _mm512_storeu_ps(probs[g] + j0, p);
                    total = _mm512_add_ps(total, p);
                }
                correction[g] = exp_nonpositive(_mm512_set1_ps(row->max - best));
                row->sum = row->sum * _mm512_cvtss_f32(correction[g]) + _mm512_reduce_add_ps(total);
                row->max = best;
            }
            float *acc_rows[ROWS_AT_ONCE];
            for (int g = 0; g < group; g++) acc_rows[g] = rows[r0 + g].acc;
            for (int64_t d = 0; d < D; d += 16)
                weighted_values(acc_rows, d, D, values, in_block, group, keys_of, correction, probs);
        }
    }
    for (int r = 0; r < count; r++) {
        float inverse = 1.0f / rows[r].sum;
        for (int64_t d = 0; d < D; d++) rows[r].out[d] = round_to_bf16(rows[r].acc[d] * inverse);
    }
}

/* q [T, H, D] (strides q_t, q_h), k/v [KVH, S, D] (strides kv_h, kv_s), out [T, H, D] (strides
 * out_t, out_h); unit stride along D; D a multiple of 16 and at most MAX_DIM. Query t sees
 * keys 0 .. past + t. Returns 0, or -1 when a work buffer cannot be allocated. */
int attention_few_queries_bf16(const uint16_t *q, int64_t q_t, int64_t q_h, const uint16_t *k, const uint16_t *v,
                               int64_t kv_h, int64_t kv_s, int64_t T, int64_t H, int64_t KVH, int64_t D, int64_t past,
                               float scale, uint16_t *out, int64_t out_t, int64_t out_h, int threads) {
    int64_t group = H / KVH, per_head = T * group;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : failed)
    for (int64_t head = 0; head < KVH; head++) {
        Row *rows = malloc(sizeof(Row) * per_head);
        float *acc = calloc(per_head * D, sizeof(float));
        float *values = malloc(sizeof(float) * KEYS_PER_BLOCK * D);
        float (*probs)[KEYS_PER_BLOCK] = malloc(sizeof(float) * ROWS_AT_ONCE * KEYS_PER_BLOCK);
        if (!rows || !acc || !values || !probs) {
            failed = 1;
        } else {
            for (int64_t t = 0; t < T; t++)
                for (int64_t g = 0; g < group; g++) {
                    int64_t h = head * group + g;
                    Row *row = &rows[t * group + g];
                    row->query = q + t * q_t + h * q_h;
                    row->out = out + t * out_t + h * out_h;
                    row->visible = past + t + 1;
                    row->max = -INFINITY;
                    row->sum = 0.0f;
                    row->acc = acc + (t * group + g) * D;
                }
            attend_head(rows, (int)per_head, k + head * kv_h, v + head * kv_h, kv_s, D, scale, values, probs);
        }
        free(rows);
        free(acc);
        free(values);
        free(probs);
    }
    return failed ? -1 : 0;
}
