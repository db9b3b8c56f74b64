/* Routed SwiGLU experts for many bf16 tokens (prefill chunks): the grouped path of
 * reference.experts_swiglu in one call.
 *
 * Weights are bf16, or quantized (fp8 blocks, int8, int4): projection.h dequantizes an expert's rows
 * exactly to bf16 as the products reach them, so the bits are those of bf16 weights of the same values.
 *
 * Each expert runs once on the tokens routed to it, rounding where the PyTorch path does:
 * gate/up projections to bf16, silu(gate) to bf16, its product with up to bf16, the down
 * projection to bf16 and its product with the routing weight to bf16. A token's routed outputs
 * are then summed in fp32 in ascending expert order and rounded once (index_add_'s order).
 *
 * Experts are shared out over OpenMP threads. Within one, the products are dot products on the
 * pair dot-product instruction over the weights as stored: 4 token rows x 16 weight rows per tile,
 * each output 16 fp32 lane chains over its inputs in order, then one fixed tree over the lanes.
 * (Repacking each expert's weights for outer products cost as much as the products themselves
 * with the ~40 tokens an expert gets in a 2,048-token chunk of the 80B.) Input and expert widths
 * are multiples of 16.
 *
 * With `amx` set (CPUs with AMX tiles, prefill-sized calls) the products run on the tile unit
 * instead, reading the weights as stored with the expert's tokens packed as pairs.
 * The gate/up tiles' SwiGLU is written straight in the down projection's input layout, and each
 * block's SwiGLU runs while the tile unit computes the next block. The same rounding steps, but each
 * output's fp32 sum is taken in the tile unit's order, silu's division is a refined reciprocal and
 * roundings go through the conversion instruction (fp32 denormals to zero), so the last bits can
 * differ from the chains above.
 *
 * The AVX2 + FMA + F16C build and the AVX-512 one without BF16 (no bf16 dot products, no tiles) run
 * the same steps on fp32 sums, as outer products with an expert's tokens in lanes (experts_fp32.h).
 * Each output is one fixed chain of fused multiply-adds, so few-token calls give a token the same
 * bits whatever the call's size; the bits differ from the AVX-512 BF16 build's.
 */
#include <omp.h>
#include <stdlib.h>

#include "../simd.h"
#include "projection.h"
#if defined(__AVX512BF16__)
#include "../amx.h"
#include "../bf16_simd.h"
#else
/* The scalar bf16 conversions; the header's AVX-512 helpers go unused here, where GCC would warn
 * about their ABI. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#include "../bf16_simd.h"
#pragma GCC diagnostic pop
#include "experts_fp32.h"
#endif
#include "block_steps.h"

/* Slots (token n's s-th choice is slot n * top_k + s) grouped by expert, tokens ascending within
 * each (a counting sort): expert e's slots are order[start[e] .. start[e + 1]), start zeroed by the
 * caller. Returns the largest group's size, or -1 when a work buffer cannot be allocated. */
static int64_t group_slots(const int64_t *experts, int64_t slots, int64_t E, int64_t *start, int64_t *order) {
    for (int64_t s = 0; s < slots; s++) start[experts[s] + 1]++;
    int64_t largest = 0;
    for (int64_t e = 0; e < E; e++) {
        largest = start[e + 1] > largest ? start[e + 1] : largest;
        start[e + 1] += start[e];
    }
    int64_t *fill = malloc(sizeof(int64_t) * (size_t)E);
    if (!fill) return -1;
    for (int64_t e = 0; e < E; e++) fill[e] = start[e];
    for (int64_t s = 0; s < slots; s++) order[fill[experts[s]]++] = s;
    free(fill);
    return largest;
}

/* out[n] = bf16 of token n's routed outputs (routed [slots, H] bf16) summed in fp32 in ascending
 * expert order: index_add_'s order. */
static void sum_routed(const uint16_t *routed, const int64_t *experts, int64_t N, int64_t H, int64_t top_k,
                       uint16_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        /* This token's slots in ascending expert order (top_k is small: insertion sort). */
        int64_t ranked[MAX_TOP_K];
        int64_t used = top_k < MAX_TOP_K ? top_k : MAX_TOP_K;
        for (int64_t s = 0; s < used; s++) {
            int64_t slot = n * top_k + s, at = s;
            while (at > 0 && experts[ranked[at - 1]] > experts[slot]) {
                ranked[at] = ranked[at - 1];
                at--;
            }
            ranked[at] = slot;
        }
        for (int64_t d = 0; d < H; d += VF_LANES) {
            vf sum = vf_zero();
            for (int64_t s = 0; s < used; s++) sum = vf_add(sum, vf_load_bf16_n(routed + ranked[s] * H + d, H - d));
            vf_store_bf16_n(out + n * H + d, sum, H - d);
        }
    }
}

#if defined(__AVX512BF16__)

/* Token rows and weight rows a tile takes (dot_rows4's shape). */
#define TILE_TOKENS 4
#define TILE_ROWS 16

/* y[r][n0 .. n0 + 15] for 4 token rows x (row stride K) and 16 weight rows w (row stride K) by
 * dot_rows4; with `scales` the rounded sum is multiplied by scales[r] and rounded again. */
static inline void tile(const uint16_t *x, int64_t K, const uint16_t *w, int in_place, uint16_t *y, int64_t ldy,
                        int64_t n0, const float *scales, int rows) {
    const uint16_t *xr[TILE_TOKENS] = { x, x + K, x + 2 * K, x + 3 * K };
    __m512 sums[TILE_TOKENS];
    dot_rows4(xr, w, K, K, in_place, sums);
    for (int t = 0; t < rows; t++) {
        __m256i rounded = to_bf16(sums[t]);
        if (scales) rounded = to_bf16(_mm512_mul_ps(widen_bf16(rounded), _mm512_set1_ps(scales[t])));
        _mm256_storeu_si256((__m256i *)(y + t * ldy + n0), rounded);
    }
}

/* y[r][n] = bf16(x[r] . w[n]) for r < R (x rows contiguous, R padded to a multiple of 4 with
 * readable rows) and the N rows of expert e's projection `source`, read as stored (quantized ones
 * dequantized 16 rows at a time into `scratch`); with `scales` the rounded product is multiplied by
 * scales[r] and rounded again. N and K are multiples of 16. */
static void project(const uint16_t *x, int64_t R, int64_t K, const projection *source, int64_t e, int64_t N,
                    uint16_t *y, int64_t ldy, const float *scales, uint16_t *scratch) {
    for (int64_t n0 = 0; n0 < N; n0 += TILE_ROWS) {
        const uint16_t *w = expert_rows(source, e, n0, TILE_ROWS, scratch);
        int in_place = w != scratch && n0 + 2 * TILE_ROWS <= N;
        for (int64_t r0 = 0; r0 < R; r0 += TILE_TOKENS) {
            int rows = R - r0 < TILE_TOKENS ? (int)(R - r0) : TILE_TOKENS;
            tile(x + r0 * K, K, w, in_place && r0 == 0, y + r0 * ldy, ldy, n0, scales ? scales + r0 : NULL, rows);
        }
    }
}

/* The expert's tokens (x rows `token[t]`, t < R; zero rows from R up to `padded`, a multiple of 16)
 * as the tile unit's B operand, 16 tokens at a time as pairs along K:
 * packed[(g * K / 2 + p) * 16 + t] = x[token[16g + t]][2p] | x[token[16g + t]][2p + 1] << 16.
 * K a multiple of 32. */
static void pack_tokens_for_tiles(const uint16_t *x, int64_t K, const int64_t *token, int64_t R, int64_t padded,
                                  uint32_t *packed) {
    int64_t pairs = K / 2;
    for (int64_t g = 0; g < padded / 16; g++)
        for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
            __m512i rows[16];
            for (int t = 0; t < 16; t++) {
                int64_t r = 16 * g + t;
                rows[t] = r < R ? _mm512_loadu_si512(x + token[r] * K + 2 * p0) : _mm512_setzero_si512();
            }
            transpose16(rows);
            for (int p = 0; p < 16; p++) _mm512_storeu_si512(packed + (g * pairs + p0 + p) * 16, rows[p]);
        }
}

/* fp32 to bf16 and back on the conversion instruction: round to nearest even like to_bf16, except
 * that fp32 denormals (below 2^-126) become zero. */
static inline __m512 round16(__m512 v) { return widen_bf16((__m256i)_mm512_cvtneps_pbh(v)); }

/* One C tile's outputs n0 .. n0 + 15 (stored as sums[n][t]) for `rows` tokens, rounded and scaled as
 * project() does it (on the conversion instruction), each token's 16 values written to row dst[t] + n0. */
static void store_transposed(const float *sums, int rows, int64_t n0, uint16_t *const *dst, const float *scales) {
    __m512i lanes[16];
    for (int n = 0; n < 16; n++) lanes[n] = _mm512_loadu_si512(sums + 16 * n);
    transpose16(lanes);
    for (int t = 0; t < rows; t++) {
        __m512 rounded = round16(_mm512_castsi512_ps(lanes[t]));
        _mm256_storeu_si256((__m256i *)(dst[t] + n0), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(rounded, _mm512_set1_ps(scales[t]))));
    }
}

/* bf16(bf16(silu(bf16(gate))) * bf16(up)) for 16 tokens from fp32 sums, as swiglu() on the rounded
 * projection but with 1 / (1 + e^-g) from the reciprocal estimate and one Newton step (within ~2
 * fp32 ulps of the division, which cost the tile path a third of its time). */
static inline __m256i swiglu16(const float *gate_sums, const float *up_sums) {
    __m512 g = round16(_mm512_loadu_ps(gate_sums));
    __m512 u = round16(_mm512_loadu_ps(up_sums));
    __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), vf_exp(_mm512_sub_ps(_mm512_setzero_ps(), g)));
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
    return (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(round16(_mm512_mul_ps(g, r)), u));
}

/* SwiGLU of 16 outputs n0 .. n0 + 15 for 16 tokens (C tiles stored as sums[n][t]) written as the down
 * projection's B operand: pairs of consecutive outputs, dst[j * 16 + t] = act[n0 + 2j][t] | act[n0 + 2j + 1][t] << 16. */
static void swiglu_pairs(const float *gate, const float *up, uint32_t *dst) {
    for (int j = 0; j < 8; j++) {
        __m512i even = _mm512_cvtepu16_epi32(swiglu16(gate + 32 * j, up + 32 * j));
        __m512i odd = _mm512_cvtepu16_epi32(swiglu16(gate + 32 * j + 16, up + 32 * j + 16));
        _mm512_storeu_si512(dst + 16 * j, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
    }
}

/* C tiles 0-3 = A0 B0, A1 B0, A0 B1, A1 B1 over K (A: 16 rows of w as stored, row stride K; B: 16
 * packed tokens): tiles 1 and 3 only with `two`. A tiles 4-5, B tiles 6-7. */
static inline __attribute__((always_inline)) void tile_block(const uint16_t *a0, const uint16_t *a1,
                                                             const uint32_t *b0, const uint32_t *b1, int64_t K,
                                                             int two) {
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
        _tile_loadd(4, a0 + k0, K * 2);
        _tile_loadd(5, a1 + k0, K * 2);
        _tile_loadd(6, b0 + (k0 / 2) * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (two) {
            _tile_loadd(7, b1 + (k0 / 2) * 16, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
}

/* The C tiles of a block as stored, waiting for their epilogue: it runs after the next block's tile
 * instructions are issued, so the vector units work while the tile unit does (two sets alternate). */
typedef struct {
    float sums[4][16 * 16] __attribute__((aligned(64)));
    int live, two;
    int64_t n0, t0;
} StoredBlock;

static void store_block(StoredBlock *block, int two, int64_t n0, int64_t t0) {
    _tile_stored(0, block->sums[0], 64);
    _tile_stored(1, block->sums[1], 64);
    if (two) {
        _tile_stored(2, block->sums[2], 64);
        _tile_stored(3, block->sums[3], 64);
    }
    block->live = 1, block->two = two, block->n0 = n0, block->t0 = t0;
}

/* SwiGLU of a gate/up block into the down projection's input layout (see gate_up_swiglu_amx). */
static void swiglu_block(const StoredBlock *block, int64_t I, uint32_t *packed_act) {
    uint32_t *dst = packed_act + ((block->t0 / 16) * (I / 2) + block->n0 / 2) * 16;
    swiglu_pairs(block->sums[0], block->sums[1], dst);
    if (block->two) swiglu_pairs(block->sums[2], block->sums[3], dst + (I / 2) * 16);
}

/* Gate/up projection and SwiGLU on the tiles, straight into the down projection's B operand. The A
 * tiles are 16 gate rows of expert e's w [2I, K] and the matching 16 up rows (as stored, or through
 * `scratch`, 32 x K, where quantized), the B tiles the packed tokens, so a pair of C tiles holds gate
 * and up of the same 16 outputs for 16 tokens:
 * packed_act[(g * I / 2 + p) * 16 + t] = act[16g + t][2p] | act[16g + t][2p + 1] << 16, the layout
 * pack_tokens_for_tiles gives act [padded, I]. I and K multiples of 32. */
static void gate_up_swiglu_amx(const uint32_t *packed_x, int64_t padded, int64_t K, const projection *w, int64_t e,
                               int64_t I, uint32_t *packed_act, uint16_t *scratch) {
    StoredBlock blocks[2];
    blocks[0].live = blocks[1].live = 0;
    int set = 0;
    int64_t pairs = K / 2;
    for (int64_t n0 = 0; n0 < I; n0 += 16) {
        const uint16_t *gate = expert_rows(w, e, n0, 16, scratch);
        const uint16_t *up = expert_rows(w, e, I + n0, 16, scratch + 16 * K);
        for (int64_t t0 = 0; t0 < padded; t0 += 32) {
            const uint32_t *b0 = packed_x + (t0 / 16) * pairs * 16;
            tile_block(gate, up, b0, b0 + pairs * 16, K, padded - t0 > 16);
            if (blocks[set ^ 1].live) swiglu_block(&blocks[set ^ 1], I, packed_act);
            store_block(&blocks[set], padded - t0 > 16, n0, t0);
            set ^= 1;
        }
    }
    if (blocks[set ^ 1].live) swiglu_block(&blocks[set ^ 1], I, packed_act);
}

/* A down-projection block's outputs, scaled, to their tokens' rows (see project_amx). */
static void scatter_block(const StoredBlock *block, int64_t R, uint16_t *const *dst, const float *scales) {
    int64_t t0 = block->t0;
    int first_rows = R - t0 < 16 ? (int)(R - t0) : 16;
    store_transposed(block->sums[0], first_rows, block->n0, dst + t0, scales + t0);
    store_transposed(block->sums[1], first_rows, block->n0 + 16, dst + t0, scales + t0);
    if (block->two) {
        int second_rows = R - t0 - 16 < 16 ? (int)(R - t0 - 16) : 16;
        store_transposed(block->sums[2], second_rows, block->n0, dst + t0 + 16, scales + t0 + 16);
        store_transposed(block->sums[3], second_rows, block->n0 + 16, dst + t0 + 16, scales + t0 + 16);
    }
}

/* project() on AMX tiles for tokens already packed as B (`packed`), reading expert e's w [N, K] as it
 * is stored (or through `scratch`, 32 x K, where quantized): the weights are the A operand (16 weight
 * rows x 32 inputs per tile), so C tiles hold [16 outputs][16 tokens], 2 x 2 such blocks at a time.
 * Token t's outputs, times scales[t], go to dst[t]. K and N multiples of 32. The calling thread has
 * configured its tiles. */
static void project_amx(const uint32_t *packed, int64_t R, int64_t K, const projection *w, int64_t e, int64_t N,
                        uint16_t *const *dst, const float *scales, uint16_t *scratch) {
    StoredBlock blocks[2];
    blocks[0].live = blocks[1].live = 0;
    int set = 0;
    int64_t pairs = K / 2;
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
        const uint16_t *rows = expert_rows(w, e, n0, 32, scratch);
        for (int64_t t0 = 0; t0 < R; t0 += 32) {
            const uint32_t *b0 = packed + (t0 / 16) * pairs * 16;
            tile_block(rows, rows + 16 * K, b0, b0 + pairs * 16, K, R - t0 > 16);
            if (blocks[set ^ 1].live) scatter_block(&blocks[set ^ 1], R, dst, scales);
            store_block(&blocks[set], R - t0 > 16, n0, t0);
            set ^= 1;
        }
    }
    if (blocks[set ^ 1].live) scatter_block(&blocks[set ^ 1], R, dst, scales);
}

/* act[r][i] = bf16(bf16(silu(gate)) * up) over I values, gate and up the two halves of h[r]. */
static void swiglu(const uint16_t *h, int64_t R, int64_t I, uint16_t *act) {
    for (int64_t r = 0; r < R; r++) {
        const uint16_t *gate = h + r * 2 * I, *up = gate + I;
        uint16_t *out = act + r * I;
        for (int64_t i = 0; i < I; i += 16) {
            int64_t here = I - i < 16 ? I - i : 16;
            __mmask16 live = (__mmask16)((1u << here) - 1);
            __m512 g = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, gate + i)), 16));
            __m512 u = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, up + i)), 16));
            __m512 silu = vf_silu(g);
            __m512 rounded = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(silu)), 16));
            _mm256_mask_storeu_epi16(out + i, live, to_bf16(_mm512_mul_ps(rounded, u)));
        }
    }
}

/* Every expert with tokens: routed[slot] = bf16(expert output of the slot's token * its weight), for
 * the grouping of group_slots. Returns nonzero when a work buffer cannot be allocated. */
static int run_experts(const uint16_t *x, int64_t H, const uint16_t *weights, int64_t top_k, int64_t E,
                       const int64_t *start, const int64_t *order, int64_t largest, const projection *gate_up,
                       const projection *down, int64_t I, uint16_t *routed, int amx, int threads) {
    amx = amx && H % 32 == 0 && I % 32 == 0 && amx_permitted();
    /* Quantized weight rows: 32 (tiles) or 16 (pairs) at a time. */
    size_t scratch_words = (size_t)((amx ? 32 : 16) * (H > I ? H : I));
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t padded = (largest + 31) / 32 * 32;
        float *scales = malloc(sizeof(float) * (size_t)padded);
        /* Tiles: the expert's tokens and their SwiGLU packed as B operands, token ids and output rows.
         * Pair path: the gathered rows, projections, activations and outputs. */
        uint32_t *packed = amx ? malloc(sizeof(uint32_t) * (size_t)(padded * H / 2)) : NULL;
        uint32_t *packed_act = amx ? malloc(sizeof(uint32_t) * (size_t)(padded * I / 2)) : NULL;
        int64_t *tokens = amx ? malloc(sizeof(int64_t) * (size_t)padded) : NULL;
        uint16_t **targets = amx ? malloc(sizeof(uint16_t *) * (size_t)padded) : NULL;
        uint16_t *gathered = amx ? NULL : calloc((size_t)(padded * H), sizeof(uint16_t));
        uint16_t *h = amx ? NULL : malloc(sizeof(uint16_t) * (size_t)(padded * 2 * I));
        uint16_t *act = amx ? NULL : calloc((size_t)(padded * I), sizeof(uint16_t));
        uint16_t *y = amx ? NULL : malloc(sizeof(uint16_t) * (size_t)(padded * H));
        uint16_t *scratch = malloc(sizeof(uint16_t) * scratch_words);
        int usable = scales && scratch && (amx ? packed && packed_act && tokens && targets : gathered && h && act && y);
        failed |= !usable;
        if (amx) amx_configure();
#pragma omp for schedule(dynamic, 1)
        for (int64_t e = 0; e < E; e++) {
            int64_t count = start[e + 1] - start[e];
            if (!usable || count == 0) continue;
            const int64_t *mine = order + start[e];
            if (amx) {
                int64_t rows = (count + 15) / 16 * 16;
                for (int64_t r = 0; r < count; r++) {
                    tokens[r] = mine[r] / top_k;
                    targets[r] = routed + mine[r] * H;
                    scales[r] = bf16_to_float(weights[mine[r]]);
                }
                pack_tokens_for_tiles(x, H, tokens, count, rows, packed);
                gate_up_swiglu_amx(packed, rows, H, gate_up, e, I, packed_act, scratch);
                project_amx(packed_act, count, I, down, e, H, targets, scales, scratch);
                continue;
            }
            /* A contiguous copy of the expert's tokens (rows past count stay readable zeros). */
            for (int64_t r = 0; r < count; r++) {
                __builtin_memcpy(gathered + r * H, x + (mine[r] / top_k) * H, sizeof(uint16_t) * (size_t)H);
                scales[r] = bf16_to_float(weights[mine[r]]);
            }
            project(gathered, count, H, gate_up, e, 2 * I, h, 2 * I, NULL, scratch);
            swiglu(h, count, I, act);
            project(act, count, I, down, e, H, y, H, scales, scratch);
            for (int64_t r = 0; r < count; r++)
                __builtin_memcpy(routed + mine[r] * H, y + r * H, sizeof(uint16_t) * (size_t)H);
        }
        if (amx) _tile_release();
        free(scales), free(packed), free(packed_act), free(tokens), free(targets), free(scratch);
        free(gathered), free(h), free(act), free(y);
    }
    return failed;
}

#endif

/* The routed experts of x [N, H] (weights [N, k] bf16, experts [N, k] int64 in [0, E)) with
 * projections gate_up [E, 2I, H] and down [E, H, I] into out [N, H]. */
static int routed_experts(const uint16_t *x, int64_t N, int64_t H, const uint16_t *weights, const int64_t *experts,
                          int64_t top_k, int64_t E, const projection *gate_up, const projection *down, int64_t I,
                          uint16_t *out, int amx, int threads) {
    int64_t slots = N * top_k;
    int64_t *start = calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *order = malloc(sizeof(int64_t) * (size_t)slots);
    uint16_t *routed = malloc(sizeof(uint16_t) * (size_t)(slots * H));
    int64_t largest = start && order && routed ? group_slots(experts, slots, E, start, order) : -1;
    int failed = largest < 0 || run_experts(x, H, weights, top_k, E, start, order, largest, gate_up, down, I, routed,
                                            amx, threads);
    if (!failed) sum_routed(routed, experts, N, H, top_k, out, threads);
    free(start), free(order), free(routed);
    return failed ? -1 : 0;
}

/* x [N, H]; weights [N, k] bf16; experts [N, k] int64 in [0, E); gate_up [E, 2I, H]; down [E, H, I];
 * out [N, H]; amx: use the tile unit where the widths allow (AVX-512 build). Returns 0, or -1 when a
 * work buffer cannot be allocated. */
int moe_experts_bf16(const uint16_t *x, int64_t N, int64_t H, const uint16_t *weights, const int64_t *experts,
                     int64_t top_k, int64_t E, const uint16_t *gate_up, const uint16_t *down, int64_t I,
                     uint16_t *out, int amx, int threads) {
    weight_ref gate_up_stack = bf16_stack(gate_up, 2 * I, H), down_stack = bf16_stack(down, H, I);
    projection gate_up_rows = {{&gate_up_stack, &gate_up_stack}, 2 * I}, down_rows = {{&down_stack, &down_stack}, H};
    return routed_experts(x, N, H, weights, experts, top_k, E, &gate_up_rows, &down_rows, I, out, amx, threads);
}

/* moe_experts_bf16 with the experts' weights as `table` describes them: formats.h's weight_ref for
 * gate [E, I, H], up [E, I, H] and down [E, H, I], each in any format, a quantized one dequantized
 * exactly to bf16 as the kernel reaches its rows: the bits of moe_experts_bf16 on those values. */
int moe_experts_quant(const uint16_t *x, int64_t N, int64_t H, const uint16_t *weights, const int64_t *experts,
                      int64_t top_k, int64_t E, const int64_t *table, int64_t I, uint16_t *out, int amx, int threads) {
    const weight_ref *refs = (const weight_ref *)table;
    projection gate_up = {{&refs[0], &refs[1]}, I}, down = {{&refs[2], &refs[2]}, H};
    return routed_experts(x, N, H, weights, experts, top_k, E, &gate_up, &down, I, out, amx, threads);
}
