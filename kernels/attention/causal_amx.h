/* The AMX path of causal_bf16.c, included there after its shared definitions (Row, the packed
 * block layouts, softmax_step's conventions): a block of keys against the rows of a tile in groups
 * of 32, both products on the tile unit, the softmax on the vector units. */
#ifndef DOCANALYST_CAUSAL_AMX_H
#define DOCANALYST_CAUSAL_AMX_H

#include "../amx.h"

#define TILE_GROUP 32 /* rows per AMX group: two tiles of 16 */

/* Clears packed value pairs [from, to): the tile products read whole steps of 16 pairs, and
 * probability 0 times a stale NaN would still be NaN. */
static void clear_value_pairs(uint32_t *packed, int64_t D, int from, int to) {
    for (int j = from; j < to; j++)
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_si512(packed + j * D + d, _mm512_setzero_si512());
}

/* The AMX path takes a block in groups of TILE_GROUP rows: row r of a group (its query at
 * query + r * D, its accumulator at acc + r * D) sees its first n[r] keys of the block, n[r] = 0
 * for rows that see none or pad the group. Both products run as 2 x 2 tiles of 16 x 16: C tiles
 * 0-3, A tiles 4-5 (the two halves' queries or probabilities), B tiles 6-7 (two 16-wide slices of
 * keys or value channels), so every B tile loaded serves 32 rows. */
typedef struct {
    float scores[TILE_GROUP][KEYS_PER_BLOCK] __attribute__((aligned(64)));
    uint16_t probs[TILE_GROUP][KEYS_PER_BLOCK] __attribute__((aligned(64)));
    int n[TILE_GROUP];
    int limit; /* keys computed: the seen ones rounded up to a step of 32 */
    int both;  /* whether rows 16-31 see any key (else only the first half is computed) */
} TileGroup;

/* Raw scores of the group's rows against the first `limit` keys of the block. */
static void amx_scores(TileGroup *group, const uint16_t *query, const uint32_t *keys, int64_t D) {
    const int64_t score_stride = KEYS_PER_BLOCK * 4, key_stride = KEYS_PER_BLOCK * 4;
    for (int j0 = 0; j0 < group->limit; j0 += 32) {
        _tile_zero(0);
        _tile_zero(1);
        if (group->both) {
            _tile_zero(2);
            _tile_zero(3);
        }
        for (int64_t p0 = 0; p0 < D / 2; p0 += 16) {
            const uint32_t *k = keys + p0 * KEYS_PER_BLOCK + j0;
            _tile_loadd(4, query + 2 * p0, D * 2);
            _tile_loadd(6, k, key_stride);
            _tile_loadd(7, k + 16, key_stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (group->both) {
                _tile_loadd(5, query + 16 * D + 2 * p0, D * 2);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, &group->scores[0][j0], score_stride);
        _tile_stored(1, &group->scores[0][j0 + 16], score_stride);
        if (group->both) {
            _tile_stored(2, &group->scores[16][j0], score_stride);
            _tile_stored(3, &group->scores[16][j0 + 16], score_stride);
        }
    }
}

/* Online-softmax step of the group's rows, as softmax_step does it row by row but with the 16
 * rows' maxima and rescale factors taken together in one vector; probabilities are zero for rows
 * that see nothing. Rescales the accumulators of rows whose running max moved. */
static void amx_softmax(TileGroup *group, int first, Row *rows, float *acc, int64_t D, float log2_scale) {
    __m512i tops[16];
    float old_max[16] __attribute__((aligned(64))), new_max[16] __attribute__((aligned(64)));
    float factor[16] __attribute__((aligned(64)));
    for (int r = 0; r < 16; r++) {
        int n = group->n[first + r];
        const float *scores = group->scores[first + r];
        __m512 top = _mm512_set1_ps(-INFINITY);
        int j = 0;
        for (; j + 16 <= n; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(scores + j));
        if (j < n) top = _mm512_mask_max_ps(top, (__mmask16)((1u << (n - j)) - 1), top, _mm512_loadu_ps(scores + j));
        tops[r] = _mm512_castps_si512(top);
        old_max[r] = n ? rows[r].max : -INFINITY;
    }
    transpose16(tops);
    __m512 best = _mm512_castsi512_ps(tops[0]);
    for (int i = 1; i < 16; i++) best = _mm512_max_ps(best, _mm512_castsi512_ps(tops[i]));
    /* Lane r: row r's max so far (the first block's is -inf: clamped, its factor is 0). */
    __m512 previous = _mm512_load_ps(old_max);
    __m512 current = _mm512_max_ps(_mm512_mul_ps(best, _mm512_set1_ps(log2_scale)), previous);
    _mm512_store_ps(new_max, current);
    _mm512_store_ps(factor, exp2_512(_mm512_max_ps(_mm512_sub_ps(previous, current), _mm512_set1_ps(-150.0f))));
    __m512 scale_v = _mm512_set1_ps(log2_scale);
    for (int r = 0; r < 16; r++) {
        int n = group->n[first + r];
        uint16_t *probs = group->probs[first + r];
        if (n == 0) {
            for (int j = 0; j < group->limit; j += 32) _mm512_storeu_si512(probs + j, _mm512_setzero_si512());
            continue;
        }
        __m512 total = exponentials(group->scores[first + r], n, group->limit, scale_v, _mm512_set1_ps(new_max[r]),
                                    probs);
        __m512 correction = _mm512_set1_ps(factor[r]);
        _mm512_storeu_ps(rows[r].sum, _mm512_fmadd_ps(_mm512_loadu_ps(rows[r].sum), correction, total));
        rows[r].max = new_max[r];
        if (new_max[r] != old_max[r])
            for (int64_t d = 0; d < D; d += 16)
                _mm512_storeu_ps(acc + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + d), correction));
    }
}

/* acc += probs . values over the group's keys; values cleared past the block's last key up to a
 * step of 32 (probability 0 times a stale NaN would still be NaN). */
static void amx_values(const TileGroup *group, float *acc, const uint32_t *values, int64_t D) {
    const int64_t acc_stride = D * 4, value_stride = D * 4, prob_stride = KEYS_PER_BLOCK * 2;
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
        float *low = acc + d0, *high = acc + 16 * D + d0;
        _tile_loadd(0, low, acc_stride);
        _tile_loadd(1, low + 16, acc_stride);
        if (group->both) {
            _tile_loadd(2, high, acc_stride);
            _tile_loadd(3, high + 16, acc_stride);
        }
        for (int step = 0; step < group->limit / 32; step++) {
            const uint32_t *v = values + (int64_t)step * 16 * D + d0;
            _tile_loadd(4, &group->probs[0][32 * step], prob_stride);
            _tile_loadd(6, v, value_stride);
            _tile_loadd(7, v + 16, value_stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (group->both) {
                _tile_loadd(5, &group->probs[16][32 * step], prob_stride);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, low, acc_stride);
        _tile_stored(1, low + 16, acc_stride);
        if (group->both) {
            _tile_stored(2, high, acc_stride);
            _tile_stored(3, high + 16, acc_stride);
        }
    }
}

/* The tile's `count` rows (queries contiguous, [count][D]) against one packed block, group by
 * group. Each group's scores are taken before the previous group's softmax and values, so the
 * tile unit works on one group while the vector units work on the other. */
static void amx_block(Row *rows, int count, int64_t start, int in_block, const uint16_t *queries, float *acc,
                      const uint32_t *keys, const uint32_t *values, int64_t D, float log2_scale,
                      TileGroup groups[2]) {
    int pending = -1; /* first row of the group waiting for its softmax, or -1 */
    for (int r0 = 0;; r0 += TILE_GROUP) {
        TileGroup *group = &groups[(r0 / TILE_GROUP) % 2];
        int any = 0;
        if (r0 < count) {
            int seen = 0;
            group->both = 0;
            for (int r = 0; r < TILE_GROUP; r++) {
                int64_t visible = r0 + r < count ? rows[r0 + r].visible - start : 0;
                group->n[r] = (int)(visible <= 0 ? 0 : (visible < in_block ? visible : in_block));
                seen = group->n[r] > seen ? group->n[r] : seen;
                if (r >= 16 && group->n[r]) group->both = 1;
            }
            any = seen > 0;
            group->limit = (seen + 31) / 32 * 32;
            if (any) amx_scores(group, queries + r0 * D, keys, D);
        }
        if (pending >= 0) {
            TileGroup *previous = &groups[(pending / TILE_GROUP) % 2];
            amx_softmax(previous, 0, &rows[pending], acc + pending * D, D, log2_scale);
            if (previous->both) amx_softmax(previous, 16, &rows[pending + 16], acc + (pending + 16) * D, D, log2_scale);
            amx_values(previous, acc + pending * D, values, D);
        }
        if (r0 >= count) break;
        pending = any ? r0 : -1;
    }
}

#endif
