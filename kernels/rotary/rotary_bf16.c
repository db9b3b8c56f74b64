/* Rotary position embedding on the leading `rot` dims of bf16 heads (NeoX halves), rounding where
 * the PyTorch reference does:
 *
 *   out_j = bf16(bf16(x_j cos_j) + bf16(turned_j sin_j)),  turned = (-x[half:rot], x[:half])
 *
 * and dims past `rot` copied, so the result equals the reference bit for bit (a product of two bf16
 * values and a sum of two are exact in fp32 before their rounding) in either build: AVX-512 (one
 * dim at a time) or AVX2 + FMA + F16C (8 dims at a time). Rows are addressed by (token, head)
 * strides on both sides: a key can be rotated straight into a K/V cache, and rot = 0 is a strided
 * copy (a value into the cache).
 */
#include <omp.h>
#include <string.h>

#if defined(__AVX512BF16__)
#include "../bf16_simd.h"

static inline void rotate_row(const uint16_t *src, const uint16_t *c, const uint16_t *s, int64_t rot, uint16_t *dst) {
    int64_t half = rot / 2;
    for (int64_t j = 0; j < rot; j++) {
        float turned = j < half ? -bf16_to_float(src[j + half]) : bf16_to_float(src[j - half]);
        float along = round_bf16(bf16_to_float(src[j]) * bf16_to_float(c[j]));
        float across = round_bf16(turned * bf16_to_float(s[j]));
        dst[j] = float_to_bf16(along + across);
    }
}

#else /* AVX2 + FMA + F16C */
#include "../simd.h"

/* `count` dims of one half: x times cos plus `sign` times the other half's x times sin. */
static inline void rotate_half(const uint16_t *x, const uint16_t *other, const uint16_t *c, const uint16_t *s,
                               int64_t count, float sign, uint16_t *dst) {
    for (int64_t j = 0; j < count; j += VF_LANES) {
        int64_t n = count - j;
        vf along = vf_round_bf16(vf_mul(vf_load_bf16_n(x + j, n), vf_load_bf16_n(c + j, n)));
        vf turned = vf_mul(vf_load_bf16_n(other + j, n), vf_set1(sign));
        vf across = vf_round_bf16(vf_mul(turned, vf_load_bf16_n(s + j, n)));
        vf_store_bf16_n(dst + j, vf_add(along, across), n);
    }
}

static inline void rotate_row(const uint16_t *src, const uint16_t *c, const uint16_t *s, int64_t rot, uint16_t *dst) {
    int64_t half = rot / 2;
    rotate_half(src, src + half, c, s, half, -1.0f, dst);
    rotate_half(src + half, src, c + half, s + half, half, 1.0f, dst + half);
}
#endif

/* x rows at x + t x_t + h x_h, out rows at out + t o_t + h o_h, t < T, h < H; cos, sin [T, rot]. */
void rotary_bf16(const uint16_t *x, int64_t x_t, int64_t x_h, int64_t T, int64_t H, int64_t D, const uint16_t *cos,
                 const uint16_t *sin, int64_t rot, uint16_t *out, int64_t o_t, int64_t o_h, int threads) {
    int64_t rows = T * H;
    if (rows * D < (1 << 16)) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; row++) {
        int64_t t = row / H, h = row % H;
        const uint16_t *src = x + t * x_t + h * x_h;
        uint16_t *dst = out + t * o_t + h * o_h;
        rotate_row(src, cos + t * rot, sin + t * rot, rot, dst);
        memcpy(dst + rot, src + rot, sizeof(uint16_t) * (D - rot));
    }
}
