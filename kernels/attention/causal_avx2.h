/* The AVX2 + FMA + F16C build of causal_bf16.c (included there in place of the AVX-512 code):
 * the same function, computed in fp32 from bf16 loads with 8-lane vectors.
 *
 * Query row (t, h) sees keys [0, past + t]. Keys go in blocks of BLOCK_KEYS and the blocks in
 * chunks of CHUNK_KEYS, both counted from key 0. Within a chunk a row keeps an online softmax
 * (running max, sum and fp32 output); the chunks' states are then folded in key order. A chunk's
 * state depends only on the row's query and the keys it sees there, so the rows of a call may be
 * split over threads by chunk (decode: few rows, long cache) or not (prefill) with the same bits.
 *
 * Bits of a row never depend on the call's size, the row's place in it or the thread count:
 *  - scores: lane l of a row's 8-lane chain adds q[d] k[d] for d = 16m + c, 16m + c + 4 (c = l for
 *    l < 4, l + 4 above) in m order, then the lanes are summed by one fixed tree (reduce_rows);
 *  - softmax: vectors hold GROUP_ROWS rows, one per lane; keys a row does not see get probability
 *    exactly 0 (vf_exp never returns 0, so they are masked), which adds nothing to its sum chain;
 *  - values: lane d of a row's output is one chain over the keys in order.
 * Up to GROUP_ROWS rows share every load of a key and up to 4 every load of a value, which makes a
 * decode step (8 query heads per K/V head) read each K and V row from memory once.
 *
 * 16 bf16 widen to fp32 with two interleaves against zero (shuffles, which leave the multiply-add
 * ports free), so queries, outputs and accumulators are kept in "split" order: per 16 channels,
 * channels 0-3 and 8-11, then 4-7 and 12-15.
 */
#ifndef DOCANALYST_CAUSAL_AVX2_H
#define DOCANALYST_CAUSAL_AVX2_H

#include "../simd.h"

#define BLOCK_KEYS 64         /* keys scored, then weighted, at a time */
#define CHUNK_KEYS 2048       /* keys of one softmax state before the fold; a multiple of BLOCK_KEYS */
#define GROUP_ROWS VF_LANES   /* rows scored together, one per lane of a score vector */
#define VALUE_ROWS 4          /* rows weighting values together */
#define TILE_ROWS 256         /* rows of one K/V head that share each block read from memory */
#define SPLIT_BYTES (256 << 20) /* most memory the chunks' states of a call split by chunk may take */
#define ALWAYS static inline __attribute__((always_inline))

/* Softmax states of rows: row r's running max (of scaled scores), sum of probabilities and fp32
 * output in split order, at max[r * step], sum[r * step], acc + r * step * D. */
typedef struct {
    float *max, *sum, *acc;
    int64_t step;
} States;

/* 16 bf16 as fp32 in split order: low = channels 0-3 and 8-11, high = 4-7 and 12-15. */
ALWAYS void widen16(const uint16_t *p, vf *low, vf *high) {
    __m256i bits = _mm256_loadu_si256((const __m256i *)p), zero = _mm256_setzero_si256();
    *low = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, bits));
    *high = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, bits));
}

/* Lane r = sum of acc[r]'s lanes ((0+1)+(2+3)) + ((4+5)+(6+7)) for r < R, 0 above. */
ALWAYS vf reduce_rows(const vf *acc, const int R) {
    vf a[8];
    for (int r = 0; r < 8; r++) a[r] = r < R ? acc[r] : vf_zero();
    vf low = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    vf high = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return vf_add(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
}

/* scores[j + i] (lane r: q_r . k_(j+i), unscaled) for J keys from j and R rows (queries qs,
 * [R][D] split). fetch: request the next block's keys and this block's values meanwhile. */
ALWAYS void score_keys(const int R, const int J, const float *qs, const uint16_t *keys, const uint16_t *values,
                       int64_t ld, int64_t D, int j, int fetch, vf *scores) {
    vf acc[8][8];
    for (int i = 0; i < J; i++)
        for (int r = 0; r < R; r++) acc[i][r] = vf_zero();
    if (fetch)
        for (int i = 0; i < J; i++)
            for (int64_t d = 0; d < D; d += 32) {
                _mm_prefetch((const char *)(keys + (j + i + BLOCK_KEYS) * ld + d), _MM_HINT_T0);
                _mm_prefetch((const char *)(values + (j + i) * ld + d), _MM_HINT_T0);
            }
    for (int64_t m = 0; m < D; m += 16)
        for (int i = 0; i < J; i++) {
            vf low, high;
            widen16(keys + (j + i) * ld + m, &low, &high);
            for (int r = 0; r < R; r++) {
                acc[i][r] = vf_fma(vf_load(qs + r * D + m), low, acc[i][r]);
                acc[i][r] = vf_fma(vf_load(qs + r * D + m + 8), high, acc[i][r]);
            }
        }
    for (int i = 0; i < J; i++) scores[j + i] = reduce_rows(acc[i], R);
}

/* scores[j] for keys j < seen, J keys at a time (R * J chains in flight), the rest one by one. */
ALWAYS void scores_of(const int R, const int J, const float *qs, const uint16_t *keys, const uint16_t *values,
                      int64_t ld, int64_t D, int seen, int fetch, vf *scores) {
    int j = 0;
    for (; j + J <= seen; j += J) score_keys(R, J, qs, keys, values, ld, D, j, fetch, scores);
    for (; j < seen; j++) score_keys(R, 1, qs, keys, values, ld, D, j, fetch, scores);
}

/* The online-softmax step of a group's rows (lane r) over the block's scores: row r sees its first
 * n[r] keys. probs[j][r] = e^(score * scale - max) (0 for keys it does not see), the running max
 * and sum updated; correction[r] rescales the row's output (0 for a row with no key yet). Returns
 * whether some row's max moved. */
ALWAYS int softmax_of(const vf *scores, int seen, __m256i n, float scale, float *max, float *sum,
                      float (*probs)[GROUP_ROWS], float *correction) {
    const vf minus_inf = vf_set1(-INFINITY), scale_v = vf_set1(scale);
    vf top = minus_inf;
    for (int j = 0; j < seen; j++) {
        vf sees = _mm256_castsi256_ps(_mm256_cmpgt_epi32(n, _mm256_set1_epi32(j)));
        top = vf_max(top, _mm256_blendv_ps(minus_inf, scores[j], sees));
    }
    vf before = vf_load(max), best = vf_max(before, vf_mul(top, scale_v)), neg_best = vf_sub(vf_zero(), best);
    vf total = vf_zero();
    for (int j = 0; j < seen; j++) {
        vf sees = _mm256_castsi256_ps(_mm256_cmpgt_epi32(n, _mm256_set1_epi32(j)));
        vf p = _mm256_and_ps(vf_exp(vf_fma(scores[j], scale_v, neg_best)), sees);
        total = vf_add(total, p);
        vf_store(probs[j], p);
    }
    vf started = _mm256_cmp_ps(before, minus_inf, _CMP_NEQ_OQ);
    vf factor = _mm256_and_ps(vf_exp(vf_sub(before, best)), started);
    vf_store(sum, vf_fma(vf_load(sum), factor, total));
    vf_store(max, best);
    vf_store(correction, factor);
    return _mm256_movemask_ps(_mm256_cmp_ps(before, best, _CMP_NEQ_UQ)) != 0;
}

/* Channels [m, m + 16 S) of R rows (1 to VALUE_ROWS): acc_r = acc_r * correction[lane + r] (when
 * rescale) + sum over keys j < seen of probs[j][lane + r] v_j. */
ALWAYS void value_steps(const int R, const int S, float *const *acc, const float (*probs)[GROUP_ROWS], int lane,
                        const float *correction, int rescale, const uint16_t *values, int64_t ld, int64_t m,
                        int seen) {
    vf low[VALUE_ROWS][4], high[VALUE_ROWS][4];
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) {
            low[r][s] = vf_load(acc[r] + m + 16 * s), high[r][s] = vf_load(acc[r] + m + 16 * s + 8);
            if (rescale) {
                vf c = vf_set1(correction[lane + r]);
                low[r][s] = vf_mul(low[r][s], c), high[r][s] = vf_mul(high[r][s], c);
            }
        }
    for (int j = 0; j < seen; j++)
        for (int s = 0; s < S; s++) {
            vf v_low, v_high;
            widen16(values + j * ld + m + 16 * s, &v_low, &v_high);
            for (int r = 0; r < R; r++) {
                vf p = vf_set1(probs[j][lane + r]);
                low[r][s] = vf_fma(p, v_low, low[r][s]);
                high[r][s] = vf_fma(p, v_high, high[r][s]);
            }
        }
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) vf_store(acc[r] + m + 16 * s, low[r][s]), vf_store(acc[r] + m + 16 * s + 8, high[r][s]);
}

/* All D channels, S steps of 16 at a time (R * 2S chains in flight), the rest one step at a time. */
ALWAYS void values_of(const int R, const int S, float *const *acc, const float (*probs)[GROUP_ROWS], int lane,
                      const float *correction, int rescale, const uint16_t *values, int64_t ld, int64_t D,
                      int seen) {
    int64_t m = 0;
    for (; m + 16 * S <= D; m += 16 * S) value_steps(R, S, acc, probs, lane, correction, rescale, values, ld, m, seen);
    for (; m < D; m += 16) value_steps(R, 1, acc, probs, lane, correction, rescale, values, ld, m, seen);
}

static void group_scores(int R, const float *qs, const uint16_t *keys, const uint16_t *values, int64_t ld,
                         int64_t D, int seen, int fetch, vf *scores) {
    switch (R) {
    case 8: scores_of(8, 1, qs, keys, values, ld, D, seen, fetch, scores); break;
    case 7: scores_of(7, 1, qs, keys, values, ld, D, seen, fetch, scores); break;
    case 6: scores_of(6, 1, qs, keys, values, ld, D, seen, fetch, scores); break;
    case 5: scores_of(5, 1, qs, keys, values, ld, D, seen, fetch, scores); break;
    case 4: scores_of(4, 2, qs, keys, values, ld, D, seen, fetch, scores); break;
    case 3: scores_of(3, 2, qs, keys, values, ld, D, seen, fetch, scores); break;
    case 2: scores_of(2, 4, qs, keys, values, ld, D, seen, fetch, scores); break;
    default: scores_of(1, 8, qs, keys, values, ld, D, seen, fetch, scores); break;
    }
}

static void group_values(int R, float *const *acc, const float (*probs)[GROUP_ROWS], int lane,
                         const float *correction, int rescale, const uint16_t *values, int64_t ld, int64_t D,
                         int seen) {
    switch (R) {
    case 4: values_of(4, 1, acc, probs, lane, correction, rescale, values, ld, D, seen); break;
    case 3: values_of(3, 1, acc, probs, lane, correction, rescale, values, ld, D, seen); break;
    case 2: values_of(2, 2, acc, probs, lane, correction, rescale, values, ld, D, seen); break;
    default: values_of(1, 4, acc, probs, lane, correction, rescale, values, ld, D, seen); break;
    }
}

/* One block (keys and values at its first key) for R rows of a group; row r sees its first n[r]. */
static void group_block(int R, const float *qs, const int *n, const uint16_t *keys, const uint16_t *values,
                        int64_t ld, int64_t D, float scale, States st, int fetch) {
    vf scores[BLOCK_KEYS];
    float probs[BLOCK_KEYS][GROUP_ROWS] __attribute__((aligned(32)));
    float max[GROUP_ROWS] __attribute__((aligned(32))), sum[GROUP_ROWS] __attribute__((aligned(32)));
    float correction[GROUP_ROWS] __attribute__((aligned(32)));
    int lanes[GROUP_ROWS], seen = 0;
    for (int r = 0; r < GROUP_ROWS; r++) {
        lanes[r] = r < R ? n[r] : 0;
        seen = lanes[r] > seen ? lanes[r] : seen;
        max[r] = r < R ? st.max[r * st.step] : -INFINITY;
        sum[r] = r < R ? st.sum[r * st.step] : 0.0f;
    }
    group_scores(R, qs, keys, values, ld, D, seen, fetch, scores);
    int rescale = softmax_of(scores, seen, _mm256_loadu_si256((const __m256i *)lanes), scale, max, sum, probs,
                             correction);
    for (int r = 0; r < R; r++) st.max[r * st.step] = max[r], st.sum[r * st.step] = sum[r];
    for (int r0 = 0; r0 < R; r0 += VALUE_ROWS) {
        int count = R - r0 < VALUE_ROWS ? R - r0 : VALUE_ROWS;
        float *acc[VALUE_ROWS];
        for (int r = 0; r < count; r++) acc[r] = st.acc + (r0 + r) * st.step * D;
        group_values(count, acc, (const float(*)[GROUP_ROWS])probs, r0, correction, rescale, values, ld, D, seen);
    }
}

/* The states of `count` rows (queries qs [count][D] split, row r seeing keys [0, visible[r]),
 * visible non-decreasing) over the keys of chunk `chunk`, from a fresh start. Rows that see none of
 * it are left untouched. */
static void attend_chunk(const float *qs, const int64_t *visible, int count, int64_t chunk, const uint16_t *k,
                         const uint16_t *v, int64_t ld, int64_t D, float scale, States st) {
    int64_t start = chunk * CHUNK_KEYS, end = start + CHUNK_KEYS;
    if (visible[count - 1] < end) end = visible[count - 1];
    for (int r = 0; r < count; r++) {
        if (visible[r] <= start) continue;
        st.max[r * st.step] = -INFINITY, st.sum[r * st.step] = 0.0f;
        for (int64_t d = 0; d < D; d++) st.acc[r * st.step * D + d] = 0.0f;
    }
    for (int64_t block = start; block < end; block += BLOCK_KEYS) {
        int in_block = (int)(end - block < BLOCK_KEYS ? end - block : BLOCK_KEYS), fetch = 1;
        for (int g = 0; g < count; g += GROUP_ROWS) {
            int R = count - g < GROUP_ROWS ? count - g : GROUP_ROWS, n[GROUP_ROWS], any = 0;
            for (int r = 0; r < R; r++) {
                int64_t seen = visible[g + r] - block;
                n[r] = (int)(seen <= 0 ? 0 : (seen < in_block ? seen : in_block));
                any |= n[r] > 0;
            }
            if (!any) continue;
            States group = { st.max + g * st.step, st.sum + g * st.step, st.acc + g * st.step * D, st.step };
            group_block(R, qs + g * D, n, k + block * ld, v + block * ld, ld, D, scale, group, fetch);
            fetch = 0;
        }
    }
}

/* into = the softmax over both states' keys (into's first): each side rescaled to the larger max. */
static void fold(float *into_max, float *into_sum, float *into_acc, float max, float sum, const float *acc,
                 int64_t D) {
    float best = *into_max > max ? *into_max : max;
    vf first = vf_exp(vf_set1(*into_max - best)), second = vf_exp(vf_set1(max - best));
    *into_sum = _mm256_cvtss_f32(vf_fma(vf_set1(sum), second, vf_mul(vf_set1(*into_sum), first)));
    *into_max = best;
    for (int64_t d = 0; d < D; d += VF_LANES)
        vf_store(into_acc + d, vf_fma(vf_load(acc + d), second, vf_mul(vf_load(into_acc + d), first)));
}

/* out [D] = acc / sum in bf16 (acc split), times sigmoid(gate) with the bf16 roundings of
 * `attn * torch.sigmoid(gate)` when gate is not NULL. */
static void finish_row(const float *acc, float sum, int64_t D, uint16_t *out, const uint16_t *gate) {
    vf inverse = vf_set1(1.0f / sum);
    for (int64_t m = 0; m < D; m += 16) {
        vf low = vf_mul(vf_load(acc + m), inverse), high = vf_mul(vf_load(acc + m + 8), inverse);
        vf ordered[2] = { _mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31) };
        for (int h = 0; h < 2; h++) {
            vf attn = vf_from_bf16_bits(vf_bf16_bits(ordered[h]));
            if (gate) {
                vf g = vf_load_bf16(gate + m + 8 * h);
                vf sigmoid = vf_div(vf_set1(1.0f), vf_add(vf_set1(1.0f), vf_exp(vf_sub(vf_zero(), g))));
                attn = vf_mul(attn, vf_from_bf16_bits(vf_bf16_bits(sigmoid)));
            }
            vf_store_bf16(out + m + 8 * h, attn);
        }
    }
}

/* A query row [D] bf16 as fp32 in split order. */
static void split_query(const uint16_t *q, int64_t D, float *qs) {
    for (int64_t m = 0; m < D; m += 16) {
        vf low, high;
        widen16(q + m, &low, &high);
        vf_store(qs + m, low), vf_store(qs + m + 8, high);
    }
}

/* q [T, H, D] (strides q_t, q_h), k/v [KVH, S, D] (strides kv_h, kv_s), out [T, H, D] (strides
 * out_t, out_h), gate NULL or [T, H, D] (strides gate_t, gate_h); unit stride along D; D a
 * multiple of 16. Query t sees keys 0 .. past + t. amx is ignored (no tile unit in this build).
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
    int split = KVH * tiles < threads && chunks > 1 && KVH * per_head * chunks * (D + 2) * 4 <= SPLIT_BYTES;
    int64_t items = KVH * tiles * (split ? chunks : 1);
    int64_t tile_rows = per_head < TILE_ROWS ? per_head : TILE_ROWS;
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
        float *qs = malloc(sizeof(float) * (size_t)(tile_rows * D));
        int64_t *visible = malloc(sizeof(int64_t) * (size_t)tile_rows);
        /* Running states: over all chunks folded so far, and over the current chunk. */
        float *acc = split ? NULL : malloc(sizeof(float) * (size_t)(2 * tile_rows * (D + 2)));
        int usable = qs && visible && (acc || split);
        failed |= !usable;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            if (!usable) continue;
            int64_t per_item_chunks = split ? chunks : 1;
            int64_t head = item / (tiles * per_item_chunks), tile = item / per_item_chunks % tiles;
            int64_t first = tile * TILE_ROWS;
            int count = (int)(per_head - first < TILE_ROWS ? per_head - first : TILE_ROWS);
            for (int r = 0; r < count; r++) {
                int64_t t = (first + r) / group, h = head * group + (first + r) % group;
                split_query(q + t * q_t + h * q_h, D, qs + r * D);
                visible[r] = past + t + 1;
            }
            const uint16_t *keys = k + head * kv_h, *values = v + head * kv_h;
            if (split) {
                int64_t chunk = item % chunks, at = (head * per_head + first) * chunks + chunk;
                if (visible[count - 1] <= chunk * CHUNK_KEYS) continue;
                States st = { part_max + at, part_sum + at, parts + at * D, chunks };
                attend_chunk(qs, visible, count, chunk, keys, values, kv_s, D, scale, st);
                continue;
            }
            float *cur_acc = acc + count * D, *cur_max = acc + 2 * count * D, *cur_sum = cur_max + count;
            float *all_max = cur_sum + count, *all_sum = all_max + count;
            States all = { all_max, all_sum, acc, 1 }, cur = { cur_max, cur_sum, cur_acc, 1 };
            attend_chunk(qs, visible, count, 0, keys, values, kv_s, D, scale, all);
            for (int64_t chunk = 1; chunk * CHUNK_KEYS < visible[count - 1]; chunk++) {
                attend_chunk(qs, visible, count, chunk, keys, values, kv_s, D, scale, cur);
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
        free(qs);
        free(visible);
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
