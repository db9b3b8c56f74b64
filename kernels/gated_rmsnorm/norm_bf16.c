/* RMS norms over bf16 rows, each row alone and always by the same arithmetic (so a token's bits
 * never depend on the rows beside it or the thread count), rounding where norm.py does:
 *
 *   rms_norm:       bf16(x * r * scale),  r = 1 / sqrt(sum(x^2) / D + eps), scale = 1 + w or w (fp32)
 *   gated_rms_norm: bf16(bf16(w * bf16(x * r)) * silu(z))  with silu in fp32
 *   add_rms_norm:   s = bf16(x + delta) (a residual add as torch rounds it), then rms_norm(s)
 *
 * Rows are addressed by up to three leading indices with their own strides, so strided views
 * (a query's half of a fused projection) need no copy. D is a multiple of 16.
 *
 * Built twice from this file: with AVX-512 BF16 (squares summed in 16 lanes) and with AVX2 + FMA +
 * F16C (8 lanes); the Python side runs the build the CPU runs. Only the sum of squares and the exp
 * of the gate's SiLU differ between the two: each build always gives the same bits.
 */
#include <math.h>
#include <omp.h>

#define MAX_DIM 16384

#include "../simd.h"

#if defined(__AVX512BF16__)
#include "../bf16_simd.h"

/* r for one row: fp32 squares summed 16 lanes at a time in D order, lanes by a fixed tree. */
static inline float inverse_rms(const uint16_t *x, int64_t D, float eps) {
    __m512 squares = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
        __m512 v = widen_bf16(_mm256_loadu_si256((const __m256i *)(x + d)));
        squares = _mm512_fmadd_ps(v, v, squares);
    }
    return 1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)D + eps);
}

static inline void norm_row(const uint16_t *src, int64_t D, const float *scale, float eps, uint16_t *dst) {
    __m512 r = _mm512_set1_ps(inverse_rms(src, D, eps));
    for (int64_t d = 0; d < D; d += 16) {
        __m512 v = _mm512_mul_ps(widen_bf16(_mm256_loadu_si256((const __m256i *)(src + d))), r);
        _mm256_storeu_si256((__m256i *)(dst + d), to_bf16(_mm512_mul_ps(v, _mm512_loadu_ps(scale + d))));
    }
}

static inline void add_row(const uint16_t *base, const uint16_t *add, int64_t D, uint16_t *total) {
    for (int64_t d = 0; d < D; d += 16) {
        __m512 a = widen_bf16(_mm256_loadu_si256((const __m256i *)(base + d)));
        __m512 b = widen_bf16(_mm256_loadu_si256((const __m256i *)(add + d)));
        _mm256_storeu_si256((__m256i *)(total + d), to_bf16(_mm512_add_ps(a, b)));
    }
}

static inline void gated_row(const uint16_t *src, const uint16_t *gate, int64_t D, const uint16_t *weight, float eps,
                             uint16_t *dst) {
    __m512 r = _mm512_set1_ps(inverse_rms(src, D, eps));
    for (int64_t d = 0; d < D; d += 16) {
        __m512 normed = widen_bf16(to_bf16(_mm512_mul_ps(widen_bf16(_mm256_loadu_si256((const __m256i *)(src + d))), r)));
        __m512 weighted = widen_bf16(to_bf16(_mm512_mul_ps(widen_bf16(_mm256_loadu_si256((const __m256i *)(weight + d))), normed)));
        __m512 g = widen_bf16(_mm256_loadu_si256((const __m256i *)(gate + d)));
        __m512 silu = vf_silu(g);
        _mm256_storeu_si256((__m256i *)(dst + d), to_bf16(_mm512_mul_ps(weighted, silu)));
    }
}

#else /* AVX2 + FMA + F16C: the same steps on 8 lanes */
/* The scalar bf16 conversions; the header's AVX-512 helpers go unused here, where GCC would warn
 * about their ABI. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#include "../bf16_simd.h"
#pragma GCC diagnostic pop

/* r for one row: fp32 squares summed 8 lanes at a time in D order, lanes by a fixed tree. */
static inline float inverse_rms(const uint16_t *x, int64_t D, float eps) {
    vf squares = vf_zero();
    for (int64_t d = 0; d < D; d += VF_LANES) {
        vf v = vf_load_bf16(x + d);
        squares = vf_fma(v, v, squares);
    }
    return 1.0f / sqrtf(vf_hsum(squares) / (float)D + eps);
}

static inline void norm_row(const uint16_t *src, int64_t D, const float *scale, float eps, uint16_t *dst) {
    vf r = vf_set1(inverse_rms(src, D, eps));
    for (int64_t d = 0; d < D; d += VF_LANES)
        vf_store_bf16(dst + d, vf_mul(vf_mul(vf_load_bf16(src + d), r), vf_load(scale + d)));
}

static inline void add_row(const uint16_t *base, const uint16_t *add, int64_t D, uint16_t *total) {
    for (int64_t d = 0; d < D; d += VF_LANES) vf_store_bf16(total + d, vf_add(vf_load_bf16(base + d), vf_load_bf16(add + d)));
}

static inline void gated_row(const uint16_t *src, const uint16_t *gate, int64_t D, const uint16_t *weight, float eps,
                             uint16_t *dst) {
    vf r = vf_set1(inverse_rms(src, D, eps));
    for (int64_t d = 0; d < D; d += VF_LANES) {
        vf normed = vf_round_bf16(vf_mul(vf_load_bf16(src + d), r));
        vf weighted = vf_round_bf16(vf_mul(vf_load_bf16(weight + d), normed));
        vf g = vf_load_bf16(gate + d);
        vf silu = vf_silu(g);
        vf_store_bf16(dst + d, vf_mul(weighted, silu));
    }
}
#endif

static void norm_scale(const uint16_t *weight, int64_t D, int zero_centered, float *scale) {
    for (int64_t d = 0; d < D; d++) scale[d] = zero_centered ? 1.0f + bf16_to_float(weight[d]) : bf16_to_float(weight[d]);
}

/* x rows at x + i0 s0 + i1 s1 + i2 s2 for i < n; out contiguous [n0, n1, n2, D]. */
void rms_norm_bf16(const uint16_t *x, int64_t n0, int64_t n1, int64_t n2, int64_t s0, int64_t s1, int64_t s2,
                   int64_t D, const uint16_t *weight, int zero_centered, float eps, uint16_t *out, int threads) {
    float scale[MAX_DIM];
    norm_scale(weight, D, zero_centered, scale);
    int64_t rows = n0 * n1 * n2;
    if (rows * D < (1 << 15)) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; row++) {
        int64_t i2 = row % n2, i1 = (row / n2) % n1, i0 = row / (n1 * n2);
        norm_row(x + i0 * s0 + i1 * s1 + i2 * s2, D, scale, eps, out + row * D);
    }
}

/* residual, delta, sum and out contiguous [rows, D]; sum may be residual itself (updated in place). */
void add_rms_norm_bf16(const uint16_t *residual, const uint16_t *delta, uint16_t *sum, int64_t rows, int64_t D,
                       const uint16_t *weight, int zero_centered, float eps, uint16_t *out, int threads) {
    float scale[MAX_DIM];
    norm_scale(weight, D, zero_centered, scale);
    if (rows * D < (1 << 15)) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; row++) {
        add_row(residual + row * D, delta + row * D, D, sum + row * D);
        norm_row(sum + row * D, D, scale, eps, out + row * D);
    }
}

/* x, z rows addressed alike (strides for x, then for z); weight plain; out contiguous. */
void gated_rms_norm_bf16(const uint16_t *x, const uint16_t *z, int64_t n0, int64_t n1, int64_t n2, int64_t s0,
                         int64_t s1, int64_t s2, int64_t z0, int64_t z1, int64_t z2, int64_t D,
                         const uint16_t *weight, float eps, uint16_t *out, int threads) {
    int64_t rows = n0 * n1 * n2;
    if (rows * D < (1 << 15)) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; row++) {
        int64_t i2 = row % n2, i1 = (row / n2) % n1, i0 = row / (n1 * n2);
        gated_row(x + i0 * s0 + i1 * s1 + i2 * s2, z + i0 * z0 + i1 * z1 + i2 * z2, D, weight, eps, out + row * D);
    }
}
