/* Causal depthwise conv1d with optional SiLU over a bf16 sequence laid out token-major (the
 * projections' layout), for prefill chunks: a vector of channels at a time, taps summed in fp32 in order
 * (oldest first), rounded to bf16, then SiLU in fp32 rounded to bf16, as conv.causal_conv1d does.
 * Channels are independent lanes, so neither the thread split nor the batch changes a bit.
 *
 * Built twice from this file: with AVX-512 BF16 (16 channels per vector) and with AVX2 + FMA + F16C
 * (8); the Python side runs the build the CPU runs. The sums are the same arithmetic in both; only
 * the SiLU's exp differs (its clamp), each build always giving the same bits.
 */
#include <omp.h>

#define MAX_TAPS 16

#include "../simd.h"

#if defined(__AVX512BF16__)
#include "../bf16_simd.h"

static inline __m512 widen(__m256i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)); }

/* x [T, C] (row stride ldx); tail [C, W - 1] holds the W - 1 inputs before x and is replaced by
 * the last W - 1 inputs seen; weight [C, W]; y [T, C] (row stride ldy). W at most MAX_TAPS. */
void causal_conv1d_bf16(const uint16_t *x, int64_t ldx, int64_t T, int64_t C, uint16_t *tail, const uint16_t *weight,
                        int64_t W, int silu, uint16_t *y, int64_t ldy, int threads) {
    int64_t blocks = (C + 15) / 16, keep = W - 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t block = 0; block < blocks; block++) {
        int64_t c0 = block * 16, here = C - c0 < 16 ? C - c0 : 16;
        __mmask16 live = (__mmask16)((1u << here) - 1);
        float taps[MAX_TAPS][16], history[MAX_TAPS][16];
        for (int64_t c = 0; c < here; c++)
            for (int64_t w = 0; w < W; w++) taps[w][c] = bf16_to_float(weight[(c0 + c) * W + w]);
        for (int64_t c = here; c < 16; c++)
            for (int64_t w = 0; w < W; w++) taps[w][c] = 0.0f;
        /* history[j] = input at t - keep + j for the current t; starts from the carried tail. */
        for (int64_t j = 0; j < keep; j++)
            for (int64_t c = 0; c < 16; c++) history[j][c] = c < here ? bf16_to_float(tail[(c0 + c) * keep + j]) : 0.0f;
        for (int64_t t = 0; t < T; t++) {
            _mm512_storeu_ps(history[keep], widen(_mm256_maskz_loadu_epi16(live, x + t * ldx + c0)));
            __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(history[0]), _mm512_loadu_ps(taps[0]));
            for (int64_t w = 1; w < W; w++)
                sum = _mm512_add_ps(sum, _mm512_mul_ps(_mm512_loadu_ps(history[w]), _mm512_loadu_ps(taps[w])));
            __m256i rounded = to_bf16(sum);
            if (silu) {
                __m512 v = widen(rounded);
                rounded = to_bf16(vf_silu(v));
            }
            _mm256_mask_storeu_epi16(y + t * ldy + c0, live, rounded);
            for (int64_t j = 0; j < keep; j++) _mm512_storeu_ps(history[j], _mm512_loadu_ps(history[j + 1]));
        }
        for (int64_t j = 0; j < keep; j++)
            for (int64_t c = 0; c < here; c++) tail[(c0 + c) * keep + j] = float_to_bf16(history[j][c]);
    }
}

#else /* AVX2 + FMA + F16C: the same steps on 8 channels */
/* The scalar bf16 conversions; the header's AVX-512 helpers go unused here, where GCC would warn
 * about their ABI. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#include "../bf16_simd.h"
#pragma GCC diagnostic pop

/* Channels a task takes: one 64-byte line of a token's bf16 row, so each line of x and y is
 * touched by one task only (strided token rows otherwise cost a line and a page walk per vector). */
#define GROUP (4 * VF_LANES)

/* As the AVX-512 build: x [T, C] (row stride ldx); tail [C, W - 1] in and out; weight [C, W];
 * y [T, C] (row stride ldy). W at most MAX_TAPS. */
void causal_conv1d_bf16(const uint16_t *x, int64_t ldx, int64_t T, int64_t C, uint16_t *tail, const uint16_t *weight,
                        int64_t W, int silu, uint16_t *y, int64_t ldy, int threads) {
    int64_t groups = (C + GROUP - 1) / GROUP, keep = W - 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t group = 0; group < groups; group++) {
        int64_t c0 = group * GROUP, width = C - c0 < GROUP ? C - c0 : GROUP;
        /* Inputs counted from the oldest carried one: input u sits in rows u mod W and u mod W + W,
         * so the W inputs of token t (u = t .. t + W - 1) are the W rows from t mod W on, and no
         * row ever moves. */
        float taps[MAX_TAPS][GROUP], history[2 * MAX_TAPS][GROUP];
        for (int64_t w = 0; w < W; w++)
            for (int64_t c = 0; c < GROUP; c++) taps[w][c] = c < width ? bf16_to_float(weight[(c0 + c) * W + w]) : 0.0f;
        for (int64_t j = 0; j < keep; j++)
            for (int64_t c = 0; c < GROUP; c++)
                history[j][c] = history[j + W][c] = c < width ? bf16_to_float(tail[(c0 + c) * keep + j]) : 0.0f;
        for (int64_t t = 0; t < T; t++) {
            int64_t oldest = t % W, newest = (t + keep) % W;
            for (int64_t v = 0; v < width; v += VF_LANES) {
                vf input = vf_load_bf16_n(x + t * ldx + c0 + v, width - v);
                vf_store(history[newest] + v, input);
                vf_store(history[newest + W] + v, input);
                vf sum = vf_mul(vf_load(history[oldest] + v), vf_load(taps[0] + v));
                for (int64_t w = 1; w < W; w++) sum = vf_add(sum, vf_mul(vf_load(history[oldest + w] + v), vf_load(taps[w] + v)));
                vf rounded = vf_round_bf16(sum);
                if (silu) rounded = vf_silu(rounded);
                vf_store_bf16_n(y + t * ldy + c0 + v, rounded, width - v);
            }
        }
        /* The last W - 1 inputs: u = T .. T + W - 2. */
        for (int64_t j = 0; j < keep; j++)
            for (int64_t c = 0; c < width; c++) tail[(c0 + c) * keep + j] = float_to_bf16(history[(T + j) % W][c]);
    }
}
#endif
