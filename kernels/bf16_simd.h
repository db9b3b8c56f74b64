/* Helpers shared by the C kernels: bf16 conversions that round like torch (to nearest even, NaN
 * kept quiet), masked bf16 loads, the fixed-tree lane reduction of 16 accumulators, a vector
 * 2^x (e^x is simd.h's vf_exp) and a 16x16 transpose of 32-bit lanes (bf16 pairs). */
#ifndef DOCANALYST_BF16_SIMD_H
#define DOCANALYST_BF16_SIMD_H

#include <immintrin.h>
#include <stdint.h>

static inline float bf16_to_float(uint16_t value) {
    union { uint32_t u; float f; } bits = { (uint32_t)value << 16 };
    return bits.f;
}

static inline uint16_t float_to_bf16(float value) {
    union { float f; uint32_t u; } bits = { value };
    if ((bits.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits.u >> 16) | 0x40u);
    bits.u += 0x7fffu + ((bits.u >> 16) & 1u);
    return (uint16_t)(bits.u >> 16);
}

static inline float round_bf16(float value) { return bf16_to_float(float_to_bf16(value)); }

/* 16 floats to bf16, as float_to_bf16 lane by lane. */
static inline __m256i to_bf16(__m512 values) {
    __m512i bits = _mm512_castps_si512(values);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(rounded);
}

/* 16 bf16 values to floats (exact). */
static inline __m512 widen_bf16(__m256i values) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(values), 16));
}

/* Up to 32 bf16 values, zeros past `count`. */
static inline __m512bh load_bf16(const uint16_t *src, int64_t count) {
    if (count >= 32) return (__m512bh)_mm512_loadu_si512(src);
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << count) - 1), src);
}

/* Lane sums of 16 accumulators: result[r] = sum of acc[r]'s lanes, by the same tree for every r
 * (lane j pairs with j+8, then j+4, then j+2, then j+1). */
static inline __attribute__((always_inline)) __m512 reduce16(__m512 acc[16]) {
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
    /* e[4q + i] holds row 4i + q. */
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, e);
}

/* 16x16 transpose of 32-bit lanes: rows[i] lane j -> rows[j] lane i. */
static inline void transpose16(__m512i rows[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* u[4g + c], 128-bit lane L: rows 4g .. 4g + 3 of column 4L + c. */
    for (int c = 0; c < 4; c++) {
        __m512i even_low = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), odd_low = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);
        __m512i even_high = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
        __m512i odd_high = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
        rows[c] = _mm512_shuffle_i32x4(even_low, even_high, 0x88);
        rows[8 + c] = _mm512_shuffle_i32x4(even_low, even_high, 0xDD);
        rows[4 + c] = _mm512_shuffle_i32x4(odd_low, odd_high, 0x88);
        rows[12 + c] = _mm512_shuffle_i32x4(odd_low, odd_high, 0xDD);
    }
}

/* 2^x lane by lane for finite x <= ~1 (very negative x gives 0): 2^n * poly(r) with n = round(x)
 * and r = x - n exact, |r| <= 1/2; the polynomial is a least-squares fit of 2^r in relative error
 * (~1e-7, about an fp32 ulp). -inf gives NaN: clamp first where it can occur. */
static inline __m512 exp2_512(__m512 x) {
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.5370704932e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3399848248e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6183735877e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5503290146e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022647738e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314718246e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

#if defined(__AVX512BF16__)
/* Dot products of 4 rows x[i] (K bf16 each) with 16 weight rows w (row stride ldw), into sums[i]
 * (lane r: x[i] . w[r]): weight rows in 4 groups of 4, each group's 16 (row, weight row) chains of
 * pair products over K in order, 32 inputs a step, sharing every load, then reduce16's tree; each
 * output has the bits of its lone 16-lane chain reduced by reduce16. With `ahead`, every weight
 * line read requests the same line 16 rows further on into L2 (weights streaming from memory). */
static inline void dot_rows4(const uint16_t *const x[4], const uint16_t *w, int64_t ldw, int64_t K, int ahead,
                             __m512 sums[4]) {
    float lanes[4][16] __attribute__((aligned(64)));
    for (int group = 0; group < 4; group++) {
        __m512 acc[16];
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
        const uint16_t *wg = w + 4 * group * ldw;
        for (int64_t k = 0; k < K; k += 32) {
            __m512bh xv[4], wv[4];
            for (int i = 0; i < 4; i++) xv[i] = load_bf16(x[i] + k, K - k);
            for (int j = 0; j < 4; j++) {
                if (ahead) _mm_prefetch((const char *)(wg + (16 + j) * ldw + k), _MM_HINT_T1);
                wv[j] = load_bf16(wg + j * ldw + k, K - k);
            }
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[4 * i + j] = _mm512_dpbf16_ps(acc[4 * i + j], xv[i], wv[j]);
        }
        float reduced[16] __attribute__((aligned(64)));
        _mm512_store_ps(reduced, reduce16(acc));
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) lanes[i][4 * group + j] = reduced[4 * i + j];
    }
    for (int i = 0; i < 4; i++) sums[i] = _mm512_load_ps(lanes[i]);
}
#endif

#endif
