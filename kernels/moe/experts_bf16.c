/* Routed SwiGLU experts for many bf16 tokens (prefill chunks): the grouped path of
 * reference.experts_swiglu in one call.
 *
 * Each expert runs once on the tokens routed to it, rounding where the PyTorch path does:
 * gate/up projections to bf16, silu(gate) to bf16, its product with up to bf16, the down
 * projection to bf16 and its product with the routing weight to bf16. A token's routed outputs
 * are then summed in fp32 in ascending expert order and rounded once (index_add_'s order).
 *
 * Experts are shared out over OpenMP threads. Within one, the weights stream once per
 * projection: blocks of 4 weight rows stay in L1 while every 4-row group of the expert's tokens
 * passes by, 16 dot products at a time (bf16 pair products into 16 fp32 lanes, then one
 * reduction tree).
 *
 * Built with AVX-512 BF16; the Python side only loads it on CPUs that report avx512_bf16.
 */
#include <omp.h>
#include <stdlib.h>

#include "../bf16_simd.h"

/* Lane 4i + j of the result: x[i] . w[j] over K values. */
static inline __attribute__((always_inline)) __m512 dots4x4(const uint16_t *const x[4], const uint16_t *const w[4], int64_t K) {
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh xv[4], wv[4];
        for (int i = 0; i < 4; i++) xv[i] = (__m512bh)_mm512_loadu_si512(x[i] + k);
        for (int j = 0; j < 4; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w[j] + k);
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) acc[4 * i + j] = _mm512_dpbf16_ps(acc[4 * i + j], xv[i], wv[j]);
    }
    if (k < K) {
        __m512bh xv[4], wv[4];
        for (int i = 0; i < 4; i++) xv[i] = load_bf16(x[i] + k, K - k);
        for (int j = 0; j < 4; j++) wv[j] = load_bf16(w[j] + k, K - k);
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) acc[4 * i + j] = _mm512_dpbf16_ps(acc[4 * i + j], xv[i], wv[j]);
    }
    return reduce16(acc);
}

/* y[r][n] = bf16(rows[r] . w[n]) for r < R, n < N (w rows of length K, stride ldw); when
 * `scales` is given the rounded product is multiplied by scales[r] and rounded again. Missing
 * rows or columns of a 4x4 tile repeat the last real one and are not stored. */
static void project(const uint16_t *const *rows, int64_t R, const uint16_t *w, int64_t ldw, int64_t N, int64_t K,
                    uint16_t *y, int64_t ldy, const float *scales) {
    const __m512i row_of_lane = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
        const uint16_t *wr[4];
        for (int j = 0; j < 4; j++) wr[j] = w + (n0 + j < N ? n0 + j : N - 1) * ldw;
        int columns = N - n0 < 4 ? (int)(N - n0) : 4;
        for (int64_t r0 = 0; r0 < R; r0 += 4) {
            const uint16_t *xr[4];
            for (int i = 0; i < 4; i++) xr[i] = rows[r0 + i < R ? r0 + i : R - 1];
            __m512 dots = dots4x4(xr, wr, K);
            if (scales) {
                __m512 rounded = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(dots)), 16));
                __m512i row = _mm512_min_epi32(row_of_lane, _mm512_set1_epi32((int)(R - 1 - r0)));
                dots = _mm512_mul_ps(rounded, _mm512_permutexvar_ps(row, _mm512_loadu_ps(scales + r0)));
            }
            uint16_t packed[16];
            _mm256_storeu_si256((__m256i *)packed, to_bf16(dots));
            for (int i = 0; i < 4 && r0 + i < R; i++) {
                if (columns == 4) __builtin_memcpy(y + (r0 + i) * ldy + n0, packed + 4 * i, 8);
                else for (int j = 0; j < columns; j++) y[(r0 + i) * ldy + n0 + j] = packed[4 * i + j];
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
 * out [N, H]. Returns 0, or -1 when a work buffer cannot be allocated. */
int moe_experts_bf16(const uint16_t *x, int64_t N, int64_t H, const uint16_t *weights, const int64_t *experts,
                     int64_t top_k, int64_t E, const uint16_t *gate_up, const uint16_t *down, int64_t I,
                     uint16_t *out, int threads) {
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
        const uint16_t **rows = malloc(sizeof(uint16_t *) * (size_t)(largest + 1));
        const uint16_t **act_rows = malloc(sizeof(uint16_t *) * (size_t)(largest + 1));
        float *scales = malloc(sizeof(float) * (size_t)(largest + 16)); /* read 16 at a time */
        uint16_t *h = malloc(sizeof(uint16_t) * (size_t)((largest + 1) * 2 * I));
        uint16_t *act = malloc(sizeof(uint16_t) * (size_t)((largest + 1) * I));
        uint16_t *y = malloc(sizeof(uint16_t) * (size_t)((largest + 1) * H));
        uint16_t *gathered = malloc(sizeof(uint16_t) * (size_t)((largest + 1) * H));
        int usable = rows && act_rows && scales && h && act && y && gathered;
        failed |= !usable;
#pragma omp for schedule(dynamic, 1)
        for (int64_t e = 0; e < E; e++) {
            int64_t count = start[e + 1] - start[e];
            if (!usable || count == 0) continue;
            const int64_t *mine = order + start[e];
            for (int64_t r = 0; r < count; r++) {
                /* A contiguous copy of the expert's tokens streams better than the scattered rows. */
                __builtin_memcpy(gathered + r * H, x + (mine[r] / top_k) * H, sizeof(uint16_t) * (size_t)H);
                rows[r] = gathered + r * H;
                scales[r] = bf16_to_float(weights[mine[r]]);
                act_rows[r] = act + r * I;
            }
            project(rows, count, gate_up + e * 2 * I * H, H, 2 * I, H, h, 2 * I, NULL);
            swiglu(h, count, I, act);
            project(act_rows, count, down + e * H * I, I, H, I, y, H, scales);
            for (int64_t r = 0; r < count; r++) {
                uint16_t *dst = routed + mine[r] * H;
                for (int64_t d = 0; d < H; d++) dst[d] = y[r * H + d];
            }
        }
        free(rows), free(act_rows), free(scales), free(h), free(act), free(y), free(gathered);
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
