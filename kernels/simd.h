/* fp32 vectors of the build's width, for kernel code written once for both instruction sets:
 * VF_LANES = 16 (AVX-512) or 8 (AVX2 + FMA + F16C). Loads and stores of bf16 widen exactly and
 * round like torch (to nearest even, NaN kept quiet); `_n` forms touch only the first `count`
 * lanes (zeros past it on loads). A kernel's AVX2 build gives other bits than its AVX-512 build
 * (fewer lanes, no bf16 dot products), each always the same ones. */
#ifndef DOCANALYST_SIMD_H
#define DOCANALYST_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define VF_INLINE static inline __attribute__((always_inline))

#if defined(__AVX512F__)
#define VF_LANES 16
typedef __m512 vf;
VF_INLINE vf vf_zero(void) { return _mm512_setzero_ps(); }
VF_INLINE vf vf_set1(float v) { return _mm512_set1_ps(v); }
VF_INLINE vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
VF_INLINE void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
VF_INLINE vf vf_load_n(const float *p, int64_t count) {
    return count >= VF_LANES ? vf_load(p) : _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1), p);
}
VF_INLINE void vf_store_n(float *p, vf v, int64_t count) {
    if (count >= VF_LANES) vf_store(p, v);
    else _mm512_mask_storeu_ps(p, (__mmask16)((1u << count) - 1), v);
}
VF_INLINE vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
VF_INLINE vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
VF_INLINE vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
VF_INLINE vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
VF_INLINE vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
VF_INLINE vf vf_min(vf a, vf b) { return _mm512_min_ps(a, b); }
VF_INLINE vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }   /* a * b + c */
VF_INLINE vf vf_fnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); } /* c - a * b */
VF_INLINE vf vf_round(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* a * 2^n for integral n in the range exp needs. */
VF_INLINE vf vf_scale2(vf a, vf n) { return _mm512_scalef_ps(a, n); }
VF_INLINE vf vf_from_bf16_bits(__m256i bits) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
VF_INLINE vf vf_load_bf16(const uint16_t *p) { return vf_from_bf16_bits(_mm256_loadu_si256((const __m256i *)p)); }
VF_INLINE vf vf_load_bf16_n(const uint16_t *p, int64_t count) {
    if (count >= VF_LANES) return vf_load_bf16(p);
    return vf_from_bf16_bits(_mm256_maskz_loadu_epi16((__mmask16)((1u << count) - 1), p));
}
VF_INLINE __m256i vf_bf16_bits(vf v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(rounded);
}
VF_INLINE void vf_store_bf16(uint16_t *p, vf v) { _mm256_storeu_si256((__m256i *)p, vf_bf16_bits(v)); }
VF_INLINE void vf_store_bf16_n(uint16_t *p, vf v, int64_t count) {
    if (count >= VF_LANES) vf_store_bf16(p, v);
    else _mm256_mask_storeu_epi16(p, (__mmask16)((1u << count) - 1), vf_bf16_bits(v));
}
/* Sum of the lanes: halves added (lane j with j + 8, + 4, + 2, + 1), the same tree every time. */
VF_INLINE float vf_hsum(vf v) {
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}
VF_INLINE float vf_hmax(vf v) { return _mm512_reduce_max_ps(v); }
VF_INLINE float vf_first(vf v) { return _mm512_cvtss_f32(v); }
/* Lanes where a < b take x, the others y (a NaN compares false). */
VF_INLINE vf vf_select_lt(vf a, vf b, vf x, vf y) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x); }
/* Whether some lane of a differs from b's (NaN differs from everything). */
VF_INLINE int vf_any_differ(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ) != 0; }
/* 32 bf16 (one 512-bit load) to fp32 as the AVX2 build widens 16, in each 128-bit lane: `low` holds
 * values 0-3, 8-11, 16-19, 24-27 and `high` 4-7, 12-15, 20-23, 28-31 ("split order"). */
typedef __m512i vf_raw;
VF_INLINE vf_raw vf_load_raw(const uint16_t *p) { return _mm512_loadu_si512(p); }
VF_INLINE vf vf_widen_low(vf_raw bits) { return _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), bits)); }
VF_INLINE vf vf_widen_high(vf_raw bits) { return _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), bits)); }
/* Split order back to channel order: `first` gets channels 0-15, `second` 16-31. */
VF_INLINE void vf_unsplit(vf low, vf high, vf *first, vf *second) {
    const __m512i to_first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i to_second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    *first = _mm512_permutex2var_ps(low, to_first, high), *second = _mm512_permutex2var_ps(low, to_second, high);
}

#else /* AVX2 + FMA + F16C */
#define VF_LANES 8
typedef __m256 vf;
VF_INLINE __m256i vf_first_lanes(int64_t count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
VF_INLINE vf vf_zero(void) { return _mm256_setzero_ps(); }
VF_INLINE vf vf_set1(float v) { return _mm256_set1_ps(v); }
VF_INLINE vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
VF_INLINE void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
VF_INLINE vf vf_load_n(const float *p, int64_t count) {
    return count >= VF_LANES ? vf_load(p) : _mm256_maskload_ps(p, vf_first_lanes(count));
}
VF_INLINE void vf_store_n(float *p, vf v, int64_t count) {
    if (count >= VF_LANES) vf_store(p, v);
    else _mm256_maskstore_ps(p, vf_first_lanes(count), v);
}
VF_INLINE vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
VF_INLINE vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
VF_INLINE vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
VF_INLINE vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
VF_INLINE vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
VF_INLINE vf vf_min(vf a, vf b) { return _mm256_min_ps(a, b); }
VF_INLINE vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
VF_INLINE vf vf_fnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
VF_INLINE vf vf_round(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* a * 2^n for integral n in [-126, 127] (what exp's reduction gives after its clamp). */
VF_INLINE vf vf_scale2(vf a, vf n) {
    __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(a, _mm256_castsi256_ps(exponent));
}
VF_INLINE vf vf_from_bf16_bits(__m128i bits) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
VF_INLINE vf vf_load_bf16(const uint16_t *p) { return vf_from_bf16_bits(_mm_loadu_si128((const __m128i *)p)); }
VF_INLINE vf vf_load_bf16_n(const uint16_t *p, int64_t count) {
    if (count >= VF_LANES) return vf_load_bf16(p);
    uint16_t padded[VF_LANES] = {0};
    for (int64_t i = 0; i < count; i++) padded[i] = p[i];
    return vf_load_bf16(padded);
}
VF_INLINE __m128i vf_bf16_bits(vf v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, quiet, nan);
    /* Lanes hold values below 2^16: pack the two 128-bit halves' 32-bit lanes to 16 bits in order. */
    return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}
VF_INLINE void vf_store_bf16(uint16_t *p, vf v) { _mm_storeu_si128((__m128i *)p, vf_bf16_bits(v)); }
VF_INLINE void vf_store_bf16_n(uint16_t *p, vf v, int64_t count) {
    if (count >= VF_LANES) { vf_store_bf16(p, v); return; }
    uint16_t packed[VF_LANES];
    vf_store_bf16(packed, v);
    for (int64_t i = 0; i < count; i++) p[i] = packed[i];
}
VF_INLINE float vf_hsum(vf v) {
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}
VF_INLINE float vf_hmax(vf v) {
    __m128 b = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    b = _mm_max_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_max_ss(b, _mm_movehdup_ps(b)));
}
VF_INLINE float vf_first(vf v) { return _mm256_cvtss_f32(v); }
VF_INLINE vf vf_select_lt(vf a, vf b, vf x, vf y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
VF_INLINE int vf_any_differ(vf a, vf b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_NEQ_UQ)) != 0; }
/* 16 bf16 (one 256-bit load) to fp32 by interleaving them under zero halves: one shuffle per 8
 * values and no arithmetic, so the multiply-add ports only multiply-add. The lanes come out in
 * "split order": `low` holds values 0-3 and 8-11, `high` 4-7 and 12-15; a kernel keeps the other
 * operand of its products (widened with the same helpers) in the same order. */
typedef __m256i vf_raw;
VF_INLINE vf_raw vf_load_raw(const uint16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
VF_INLINE vf vf_widen_low(vf_raw bf16x16) { return _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), bf16x16)); }
VF_INLINE vf vf_widen_high(vf_raw bf16x16) { return _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), bf16x16)); }
/* Split order back to channel order: `first` gets channels 0-7, `second` 8-15. */
VF_INLINE void vf_unsplit(vf low, vf high, vf *first, vf *second) {
    *first = _mm256_permute2f128_ps(low, high, 0x20), *second = _mm256_permute2f128_ps(low, high, 0x31);
}
/* 16 bf16 of which the first `count` exist, zeros after (never reading past them). */
VF_INLINE __m256i bf16x16_load_n(const uint16_t *p, int64_t count) {
    if (count >= 16) return _mm256_loadu_si256((const __m256i *)p);
    uint16_t padded[16] = {0};
    memcpy(padded, p, sizeof(uint16_t) * (size_t)count);
    return _mm256_loadu_si256((const __m256i *)padded);
}
#endif

/* Channels one raw load widens (split order within them). */
#define VF_SPLIT (2 * VF_LANES)
VF_INLINE void vf_widen_split(vf_raw bits, vf *low, vf *high) {
    *low = vf_widen_low(bits), *high = vf_widen_high(bits);
}
/* Rows [n][width] bf16 (row stride ld, width a multiple of VF_SPLIT) -> fp32 [n][width] in split
 * order, exactly. */
VF_INLINE void vf_widen_rows(const uint16_t *src, int64_t ld, int64_t n, int64_t width, float *dst) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t c = 0; c < width; c += VF_SPLIT) {
            vf low, high;
            vf_widen_split(vf_load_raw(src + j * ld + c), &low, &high);
            vf_store(dst + j * width + c, low), vf_store(dst + j * width + c + VF_LANES, high);
        }
}

/* Lanes rounded to bf16 (nearest even, as torch) and widened back: the value a bf16 tensor would hold. */
VF_INLINE vf vf_round_bf16(vf v) { return vf_from_bf16_bits(vf_bf16_bits(v)); }

/* e^x lane by lane (x clamped to [-87.3, 88.3]: below, and for -inf, ~1e-38, not 0): 2^n * poly(r), x = n ln2 + r,
 * |r| <= ln2 / 2, ln2 split in two for an exact-ish reduction. */
VF_INLINE vf vf_exp(vf x) {
    x = vf_min(vf_max(x, vf_set1(-87.3f)), vf_set1(88.3f));
    vf n = vf_round(vf_mul(x, vf_set1(1.44269504088896341f)));
    vf r = vf_fnma(n, vf_set1(0.693359375f), x);
    r = vf_fnma(n, vf_set1(-2.12194440e-4f), r);
    vf p = vf_set1(1.0f / 5040);
    p = vf_fma(p, r, vf_set1(1.0f / 720));
    p = vf_fma(p, r, vf_set1(1.0f / 120));
    p = vf_fma(p, r, vf_set1(1.0f / 24));
    p = vf_fma(p, r, vf_set1(1.0f / 6));
    p = vf_fma(p, r, vf_set1(0.5f));
    p = vf_fma(p, r, vf_set1(1.0f));
    p = vf_fma(p, r, vf_set1(1.0f));
    return vf_scale2(p, n);
}

/* 1 / (1 + e^-x) and x / (1 + e^-x) (SiLU), by vf_exp and a true division: the kernels' one form of each. */
VF_INLINE vf vf_sigmoid(vf x) { return vf_div(vf_set1(1.0f), vf_add(vf_set1(1.0f), vf_exp(vf_sub(vf_zero(), x)))); }
VF_INLINE vf vf_silu(vf x) { return vf_div(x, vf_add(vf_set1(1.0f), vf_exp(vf_sub(vf_zero(), x)))); }

/* A register tile of outer products, as in a GEMM micro-kernel: acc[i][v] += a[c][v] * b[i * ldb + c]
 * for c < n in order, where a holds, per c, NV vectors whose lanes are rows (row stride lda floats)
 * and each b value is broadcast. Every lane of every sum is one chain of fused multiply-adds over c,
 * whatever NV, J or the other rows. NV <= 2 vectors, J <= 12 rows of b. */
VF_INLINE void vf_outer_tile(const int NV, const int J, const float *a, int64_t lda, const float *b, int64_t ldb,
                             int64_t n, vf (*acc)[2]) {
    for (int64_t c = 0; c < n; c++) {
        vf rows[2];
        for (int v = 0; v < NV; v++) rows[v] = vf_load(a + c * lda + v * VF_LANES);
        for (int i = 0; i < J; i++) {
            vf value = vf_set1(b[i * ldb + c]);
            for (int v = 0; v < NV; v++) acc[i][v] = vf_fma(rows[v], value, acc[i][v]);
        }
    }
}

#endif
