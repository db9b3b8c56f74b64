/* Routed SwiGLU experts for many bf16 tokens (prefill chunks): the grouped path of
 * reference.experts_swiglu in one call.
 *
 * Each expert runs once on the tokens routed to it, rounding where the PyTorch path does:
 * gate/up projections to bf16, silu(gate) to bf16, its product with up to bf16, the down
 * projection to bf16 and its product with the routing weight to bf16. A token's routed outputs
 * are then summed in fp32 in ascending expert order and rounded once (index_add_'s order).
 *
 * Experts are shared out over OpenMP threads. Within one, each projection's weights are first
 * repacked as bf16 pairs along the input dim, so that the products are outer products on the
 * pair dot-product instruction: 4 token rows x 64 output columns per tile, a packed load shared
 * by the 4 rows, every output an fp32 chain over the input pairs in order. Input and expert
 * widths are multiples of 16.
 *
 * With `amx` set (CPUs with AMX tiles, prefill-sized calls) the products run on the tile unit
 * instead, reading the weights as stored (no repacking) with the expert's rows packed as pairs:
 * the same rounding steps, but each output's fp32 sum is taken in the tile unit's order, so its
 * last bits can differ from the chains above.
 *
 * Built with AVX-512 BF16 (and AMX); the Python side only loads it on CPUs that report avx512_bf16.
 */
#include <omp.h>
#include <stdlib.h>

#include "../amx.h"
#include "../bf16_simd.h"

typedef uint32_t pair_t __attribute__((aligned(2), may_alias)); /* two bf16 read as one lane */

/* w [N, K] as bf16 pairs along K in panels of 64 output columns, so that a tile streams one
 * panel: packed[(n / 64) * (K / 2) * 64 + p * 64 + n % 64] = w[n][2p] | w[n][2p + 1] << 16. N and
 * K are multiples of 16. */
static void pack_pairs(const uint16_t *w, int64_t N, int64_t K, uint32_t *packed) {
    int64_t pairs = K / 2;
    for (int64_t n0 = 0; n0 < N; n0 += 16)
        for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
            int64_t here = pairs - p0 < 16 ? pairs - p0 : 16;
            __mmask16 live = (__mmask16)((1u << here) - 1);
            __m512i rows[16];
            for (int j = 0; j < 16; j++) {
                /* The weights come from memory: ask for the next 16 rows while these are packed. */
                _mm_prefetch((const char *)(w + (n0 + 16 + j) * K + 2 * p0), _MM_HINT_T0);
                rows[j] = _mm512_maskz_loadu_epi32(live, w + (n0 + j) * K + 2 * p0);
            }
            transpose16(rows);
            uint32_t *panel = packed + (n0 / 64) * pairs * 64 + n0 % 64;
            for (int64_t p = 0; p < here; p++) _mm512_storeu_si512(panel + (p0 + p) * 64, rows[p]);
        }
}

/* y[r][c0 + 16s + lane] for 4 rows and SLICES slices of 16 columns: each lane one fp32 chain over
 * the pairs of K in order, each packed load shared by the 4 rows. */
static inline __attribute__((always_inline)) void tile(const uint16_t *x, int64_t K, const uint32_t *packed,
                                                      int64_t N, int64_t c0, uint16_t *y, int64_t ldy,
                                                      const float *scales, int rows, const int SLICES) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int s = 0; s < SLICES; s++) acc[r][s] = _mm512_setzero_ps();
    const pair_t *xr[4];
    for (int r = 0; r < 4; r++) xr[r] = (const pair_t *)(x + r * K);
    for (int64_t p = 0; p < K / 2; p++) {
        const uint32_t *w = packed + (c0 / 64) * (K / 2) * 64 + p * 64;
        __m512bh wv[4];
        for (int s = 0; s < SLICES; s++) wv[s] = (__m512bh)_mm512_loadu_si512(w + 16 * s);
        for (int r = 0; r < 4; r++) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xr[r][p]);
            for (int s = 0; s < SLICES; s++) acc[r][s] = _mm512_dpbf16_ps(acc[r][s], xv, wv[s]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int s = 0; s < SLICES; s++) {
            __m256i rounded = to_bf16(acc[r][s]);
            if (scales) {
                __m512 value = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16));
                rounded = to_bf16(_mm512_mul_ps(value, _mm512_set1_ps(scales[r])));
            }
            _mm256_storeu_si256((__m256i *)(y + r * ldy + c0 + 16 * s), rounded);
        }
}

/* y[r][n] = bf16(x[r] . w[n]) for r < R (x rows contiguous, R padded to a multiple of 4 with
 * readable rows), w packed by pack_pairs; with `scales` the rounded product is multiplied by
 * scales[r] and rounded again. */
static void project(const uint16_t *x, int64_t R, int64_t K, const uint32_t *packed, int64_t N, uint16_t *y,
                    int64_t ldy, const float *scales) {
    for (int64_t c0 = 0; c0 < N; c0 += 64) {
        int slices = N - c0 >= 64 ? 4 : (int)((N - c0) / 16);
        for (int64_t r0 = 0; r0 < R; r0 += 4) {
            int rows = R - r0 < 4 ? (int)(R - r0) : 4;
            const uint16_t *xr = x + r0 * K;
            uint16_t *yr = y + r0 * ldy;
            const float *sr = scales ? scales + r0 : NULL;
            switch (slices) {
            case 4: tile(xr, K, packed, N, c0, yr, ldy, sr, rows, 4); break;
            case 3: tile(xr, K, packed, N, c0, yr, ldy, sr, rows, 3); break;
            case 2: tile(xr, K, packed, N, c0, yr, ldy, sr, rows, 2); break;
            default: tile(xr, K, packed, N, c0, yr, ldy, sr, rows, 1); break;
            }
        }
    }
}

/* x [R, K] (R a multiple of 16) as the tile unit's B operand, 16 rows at a time as pairs along K:
 * packed[(g * K / 2 + p) * 16 + t] = x[16g + t][2p] | x[16g + t][2p + 1] << 16. K a multiple of 32. */
static void pack_rows_for_tiles(const uint16_t *x, int64_t R, int64_t K, uint32_t *packed) {
    int64_t pairs = K / 2;
    for (int64_t g = 0; g < R / 16; g++)
        for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
            __m512i rows[16];
            for (int t = 0; t < 16; t++) rows[t] = _mm512_loadu_si512(x + (16 * g + t) * K + 2 * p0);
            transpose16(rows);
            for (int p = 0; p < 16; p++) _mm512_storeu_si512(packed + (g * pairs + p0 + p) * 16, rows[p]);
        }
}

/* Token rows t0 + t (t < rows, at most 16) of outputs n0 .. n0 + 15 from a C tile stored as
 * sums[n][t], rounded as project() rounds them. */
static void store_transposed(const float *sums, int rows, int64_t n0, uint16_t *y, int64_t ldy, const float *scales) {
    __m512i lanes[16];
    for (int n = 0; n < 16; n++) lanes[n] = _mm512_loadu_si512(sums + 16 * n);
    transpose16(lanes);
    for (int t = 0; t < rows; t++) {
        __m256i rounded = to_bf16(_mm512_castsi512_ps(lanes[t]));
        if (scales) rounded = to_bf16(_mm512_mul_ps(widen_bf16(rounded), _mm512_set1_ps(scales[t])));
        _mm256_storeu_si256((__m256i *)(y + t * ldy + n0), rounded);
    }
}

/* project() on AMX tiles, reading w [N, K] as it is stored: the weights are the A operand (16
 * weight rows x 32 inputs per tile), the expert's rows, packed by pack_rows_for_tiles into
 * `packed`, the B operand, so C tiles hold [16 outputs][16 tokens]: C tiles 0-3 for 2 x 2 such
 * blocks, A tiles 4-5, B tiles 6-7. K and N multiples of 32; x readable up to R rounded up to 32
 * rows. The calling thread has configured its tiles. */
static void project_amx(const uint16_t *x, int64_t R, int64_t K, const uint16_t *w, int64_t N, uint16_t *y,
                        int64_t ldy, const float *scales, uint32_t *packed) {
    float sums[4][16 * 16] __attribute__((aligned(64)));
    int64_t padded = (R + 31) / 32 * 32, pairs = K / 2;
    pack_rows_for_tiles(x, padded, K, packed);
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
        const uint16_t *w0 = w + n0 * K, *w1 = w0 + 16 * K;
        for (int64_t t0 = 0; t0 < R; t0 += 32) {
            int two = R - t0 > 16;
            const uint32_t *b0 = packed + (t0 / 16) * pairs * 16, *b1 = b0 + pairs * 16;
            _tile_zero(0);
            _tile_zero(2);
            if (two) {
                _tile_zero(1);
                _tile_zero(3);
            }
            for (int64_t k0 = 0; k0 < K; k0 += 32) {
                _tile_loadd(4, w0 + k0, K * 2);
                _tile_loadd(5, w1 + k0, K * 2);
                _tile_loadd(6, b0 + (k0 / 2) * 16, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(2, 5, 6);
                if (two) {
                    _tile_loadd(7, b1 + (k0 / 2) * 16, 64);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(3, 5, 7);
                }
            }
            int first_rows = R - t0 < 16 ? (int)(R - t0) : 16;
            _tile_stored(0, sums[0], 64);
            _tile_stored(2, sums[2], 64);
            store_transposed(sums[0], first_rows, n0, y + t0 * ldy, ldy, scales ? scales + t0 : NULL);
            store_transposed(sums[2], first_rows, n0 + 16, y + t0 * ldy, ldy, scales ? scales + t0 : NULL);
            if (two) {
                int second_rows = R - t0 - 16 < 16 ? (int)(R - t0 - 16) : 16;
                _tile_stored(1, sums[1], 64);
                _tile_stored(3, sums[3], 64);
                const float *second_scales = scales ? scales + t0 + 16 : NULL;
                store_transposed(sums[1], second_rows, n0, y + (t0 + 16) * ldy, ldy, second_scales);
                store_transposed(sums[3], second_rows, n0 + 16, y + (t0 + 16) * ldy, ldy, second_scales);
            }
        }
    }
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
            __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            __m512 rounded = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(silu)), 16));
            _mm256_mask_storeu_epi16(out + i, live, to_bf16(_mm512_mul_ps(rounded, u)));
        }
    }
}

/* x [N, H]; weights [N, k] bf16; experts [N, k] int64 in [0, E); gate_up [E, 2I, H]; down [E, H, I];
 * out [N, H]; amx: use the tile unit where the widths allow. Returns 0, or -1 when a work buffer
 * cannot be allocated. */
int moe_experts_bf16(const uint16_t *x, int64_t N, int64_t H, const uint16_t *weights, const int64_t *experts,
                     int64_t top_k, int64_t E, const uint16_t *gate_up, const uint16_t *down, int64_t I,
                     uint16_t *out, int amx, int threads) {
    amx = amx && H % 32 == 0 && I % 32 == 0 && amx_permitted();
    int64_t slots = N * top_k;
    int64_t *start = calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *order = malloc(sizeof(int64_t) * (size_t)slots);
    uint16_t *routed = malloc(sizeof(uint16_t) * (size_t)(slots * H));
    if (!start || !order || !routed) {
        free(start), free(order), free(routed);
        return -1;
    }
    /* Slots grouped by expert, tokens ascending within each (a counting sort). */
    for (int64_t s = 0; s < slots; s++) start[experts[s] + 1]++;
    int64_t largest = 0;
    for (int64_t e = 0; e < E; e++) {
        largest = start[e + 1] > largest ? start[e + 1] : largest;
        start[e + 1] += start[e];
    }
    int64_t *fill = malloc(sizeof(int64_t) * (size_t)E);
    if (!fill) {
        free(start), free(order), free(routed);
        return -1;
    }
    for (int64_t e = 0; e < E; e++) fill[e] = start[e];
    for (int64_t s = 0; s < slots; s++) order[fill[experts[s]]++] = s;
    free(fill);

    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t padded = (largest + 31) / 32 * 32;
        float *scales = malloc(sizeof(float) * (size_t)padded);
        uint16_t *gathered = calloc((size_t)(padded * H), sizeof(uint16_t));
        uint16_t *h = malloc(sizeof(uint16_t) * (size_t)(padded * 2 * I));
        uint16_t *act = calloc((size_t)(padded * I), sizeof(uint16_t));
        uint16_t *y = malloc(sizeof(uint16_t) * (size_t)(padded * H));
        int64_t gate_up_panels = (2 * I + 63) / 64 * 64 * (H / 2), down_panels = (H + 63) / 64 * 64 * (I / 2);
        /* Weight panels for the pair path, or an expert's rows packed for the tiles. */
        int64_t packed_words = amx ? padded * (H > I ? H : I) / 2
                                   : (gate_up_panels > down_panels ? gate_up_panels : down_panels);
        uint32_t *packed = malloc(sizeof(uint32_t) * (size_t)packed_words);
        int usable = scales && gathered && h && act && y && packed;
        failed |= !usable;
        if (amx) amx_configure();
#pragma omp for schedule(dynamic, 1)
        for (int64_t e = 0; e < E; e++) {
            int64_t count = start[e + 1] - start[e];
            if (!usable || count == 0) continue;
            const int64_t *mine = order + start[e];
            /* A contiguous copy of the expert's tokens (rows past count stay readable zeros). */
            for (int64_t r = 0; r < count; r++) {
                __builtin_memcpy(gathered + r * H, x + (mine[r] / top_k) * H, sizeof(uint16_t) * (size_t)H);
                scales[r] = bf16_to_float(weights[mine[r]]);
            }
            if (amx) {
                project_amx(gathered, count, H, gate_up + e * 2 * I * H, 2 * I, h, 2 * I, NULL, packed);
                swiglu(h, count, I, act);
                project_amx(act, count, I, down + e * H * I, H, y, H, scales, packed);
            } else {
                pack_pairs(gate_up + e * 2 * I * H, 2 * I, H, packed);
                project(gathered, count, H, packed, 2 * I, h, 2 * I, NULL);
                swiglu(h, count, I, act);
                pack_pairs(down + e * H * I, H, I, packed);
                project(act, count, I, packed, H, y, H, scales);
            }
            for (int64_t r = 0; r < count; r++)
                __builtin_memcpy(routed + mine[r] * H, y + r * H, sizeof(uint16_t) * (size_t)H);
        }
        if (amx) _tile_release();
        free(scales), free(gathered), free(h), free(act), free(y), free(packed);
    }
    if (!failed) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n = 0; n < N; n++) {
            /* This token's slots in ascending expert order (top_k is small: insertion sort). */
            int64_t ranked[64];
            int64_t used = top_k < 64 ? top_k : 64;
            for (int64_t s = 0; s < used; s++) {
                int64_t slot = n * top_k + s, at = s;
                while (at > 0 && experts[ranked[at - 1]] > experts[slot]) {
                    ranked[at] = ranked[at - 1];
                    at--;
                }
                ranked[at] = slot;
            }
            for (int64_t d = 0; d < H; d += 16) {
                int64_t here = H - d < 16 ? H - d : 16;
                __mmask16 live = (__mmask16)((1u << here) - 1);
                __m512 sum = _mm512_setzero_ps();
                for (int64_t s = 0; s < used; s++) {
                    __m256i v = _mm256_maskz_loadu_epi16(live, routed + ranked[s] * H + d);
                    sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
                }
                _mm256_mask_storeu_epi16(out + n * H + d, live, to_bf16(sum));
            }
        }
    }
    free(start), free(order), free(routed);
    return failed ? -1 : 0;
}
