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
 * threads (decode: one item per K/V head), (K/V head, tile, run of chunks) with the chunks' states
 * kept apart and folded afterwards; an item walks its key blocks once. Each block is repacked
 * (causal_pairs.h) so that both products are outer products on the bf16 pair dot-product
 * instruction: keys as [D / 2][256] pairs along D (a lane per key), values as [128][D] pairs along
 * the keys (a lane per channel). Every score and output lane is then one sequential fp32 chain
 * (pair by pair), whatever the number of rows computed together: up to six rows (twelve for the
 * scores of a tile of few rows, which packs 32 keys at a time) share each packed load, which is
 * where the speed comes from, and a row alone runs the same chain.
 *
 * With `amx` set (CPUs with AMX tiles, every call there; D a multiple of 32) groups of 32 rows
 * take the tile unit for both products instead, from the same packed blocks (they are the tile
 * unit's B layouts), with the same softmax steps and roundings. Each score and output is then an
 * fp32 sum in the tile unit's order, so its last bits can differ from the chains above, but a row's
 * bits still depend only on its own query and visible keys: decode and draft verification, which
 * both take this path on such CPUs, agree bit for bit.
 *
 * Built three times from this file: with AVX-512 BF16 (and AMX), the code below, and with AVX-512
 * without BF16 or AVX2 + FMA + F16C, causal_fp32.h (fp32 products, the same guarantees for a row's
 * bits, no tile unit); the Python side runs the build the CPU has. The builds give different bits
 * from each other.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "../simd.h"

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
#define ROWS_PER_TILE 512
#define MAX_DIM 256

#include "causal_pairs.h"
#include "causal_amx.h"

/* Chunks of keys per work item when a call is split by chunk: an item walks its chunks one after
 * another, requesting the next chunk's first keys and values while it ends one, and each thread still
 * gets about ITEMS_PER_THREAD items to balance the threads with. */
#define ITEMS_PER_THREAD 4
static int64_t chunks_per_item(int64_t items, int threads, int64_t chunks) {
    int64_t span = items * chunks / ((int64_t)threads * ITEMS_PER_THREAD);
    return span < 1 ? 1 : span;
}

/* A softmax state over no keys: folding another into it gives that one's bits. */
static void clear_state(float *max, float *sum, float *acc, int64_t D) {
    *max = -INFINITY;
    _mm512_storeu_ps(sum, _mm512_setzero_ps());
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(acc + d, _mm512_setzero_ps());
}

/* The softmax states of `count` rows of one K/V head (visible non-decreasing) over keys [start, end),
 * from a fresh start, each block streamed once; rows that see none of them are left untouched. Keys
 * up to `reach` (at least end) are read next, so they may be requested from memory meanwhile. */
static void attend_keys(Row *rows, int count, int64_t start, int64_t end, int64_t reach, const uint16_t *k,
                        const uint16_t *v, int64_t ld, int64_t D, float log2_scale, uint32_t *packed_keys,
                        uint32_t *packed_values, const uint16_t *queries, float *acc, TileGroup groups[2]) {
    if (end > rows[count - 1].visible) end = rows[count - 1].visible;
    if (reach > rows[count - 1].visible) reach = rows[count - 1].visible;
    for (int r = 0; r < count; r++)
        if (rows[r].visible > start) clear_state(&rows[r].max, rows[r].sum, rows[r].acc, D);
    for (int64_t first = start; first < end; first += KEYS_PER_BLOCK) {
        int in_block = (int)(end - first < KEYS_PER_BLOCK ? end - first : KEYS_PER_BLOCK);
        if (queries) {
            pack_block(k + first * ld, v + first * ld, ld, D, in_block, packed_keys, packed_values);
            clear_value_pairs(packed_values, D, (in_block + 1) / 2, (in_block + 31) / 32 * 16);
            amx_block(rows, count, first, in_block, queries, acc, packed_keys, packed_values, D, log2_scale, groups);
            continue;
        }
        if (count <= FEW_ROWS) {
            int r0 = 0, n[FEW_ROWS];
            while (rows[r0].visible <= first) r0++;
            for (int r = r0; r < count; r++) {
                int64_t seen = rows[r].visible - first;
                n[r - r0] = (int)(seen < in_block ? seen : in_block);
            }
            /* The keys and values one sub-block on, over a block's worth of them: a whole block on (as
             * below) measured 12-17% slower for decode over 4K-262K keys. */
            int64_t ahead = reach - first < KEYS_PER_BLOCK + SUB_KEYS ? reach - first : KEYS_PER_BLOCK + SUB_KEYS;
            few_rows_block(rows + r0, count - r0, n, k + first * ld, v + first * ld, ld, D, in_block, ahead,
                           log2_scale, packed_keys);
            continue;
        }
        /* The next block, one line of its keys and one of its values per step of the products (the
         * packing requests the rest). */
        int64_t next = first + KEYS_PER_BLOCK < end ? first + KEYS_PER_BLOCK : end;
        int64_t next_end = next + KEYS_PER_BLOCK < end ? next + KEYS_PER_BLOCK : end;
        Ahead ahead = { { (const char *)(k + next * ld), (const char *)(v + next * ld) },
                        { (const char *)(k + next_end * ld), (const char *)(v + next_end * ld) } };
        pack_block(k + first * ld, v + first * ld, ld, D, in_block, packed_keys, packed_values);
        for (int r = 0; r < count;) {
            if (rows[r].visible <= first) {
                r++;
                continue;
            }
            int n[ROWS_PER_GROUP], group = 0;
            while (group < ROWS_PER_GROUP && r + group < count && rows[r + group].visible > first) {
                int64_t seen = rows[r + group].visible - first;
                n[group++] = (int)(seen < in_block ? seen : in_block);
            }
            rows_block(&rows[r], group, n, packed_keys, packed_values, D, log2_scale, &ahead);
            r += group;
        }
    }
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
            __m512 sigmoid = vf_sigmoid(g);
            attn = to_bf16(_mm512_mul_ps(widen_bf16(attn), widen_bf16(to_bf16(sigmoid))));
        }
        _mm256_storeu_si256((__m256i *)(out + d), attn);
    }
}

/* Softmax states of a call's rows, chunk by chunk: row i's state over chunk c at index i * chunks + c
 * (max, 16 lane sums, D outputs). */
typedef struct {
    float *max, *sum, *acc;
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
    int64_t span = split ? chunks_per_item(KVH * tiles, threads, chunks) : chunks, spans = (chunks + span - 1) / span;
    int64_t items = KVH * tiles * (split ? spans : 1), tile_rows = per_head < ROWS_PER_TILE ? per_head : ROWS_PER_TILE;
    Parts parts = { NULL, NULL, NULL };
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
            int64_t per_tile = split ? spans : 1;
            int64_t head = item / (tiles * per_tile), first = item / per_tile % tiles * ROWS_PER_TILE;
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
                int64_t from = item % spans * span, to = from + span < chunks ? from + span : chunks;
                for (int64_t chunk = from; chunk < to && rows[count - 1].visible > chunk * CHUNK_KEYS; chunk++) {
                    int64_t start = chunk * CHUNK_KEYS;
                    attend_keys(rows, count, start, start + CHUNK_KEYS, to * CHUNK_KEYS, keys, values, kv_s, D,
                                log2_scale, packed_keys, packed_values, queries, acc, groups);
                    for (int r = 0; r < count; r++) {
                        if (rows[r].visible <= start) continue;
                        int64_t at = (head * per_head + first + r) * chunks + chunk;
                        parts.max[at] = rows[r].max;
                        __builtin_memcpy(parts.sum + at * 16, rows[r].sum, sizeof(float) * 16);
                        __builtin_memcpy(parts.acc + at * D, rows[r].acc, sizeof(float) * (size_t)D);
                    }
                }
                continue;
            }
            float *total_acc = total, *total_sum = total + count * D, *total_max = total_sum + count * 16;
            for (int r = 0; r < count; r++) clear_state(&total_max[r], total_sum + r * 16, total_acc + r * D, D);
            for (int64_t start = 0; start < rows[count - 1].visible; start += CHUNK_KEYS) {
                attend_keys(rows, count, start, start + CHUNK_KEYS, rows[count - 1].visible, keys, values, kv_s, D,
                            log2_scale, packed_keys, packed_values, queries, acc, groups);
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

#else /* AVX2 + FMA + F16C, or AVX-512 without BF16 */
#include "causal_fp32.h"
#endif
