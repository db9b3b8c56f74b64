/* Rotary position embedding on the leading `rot` dims of bf16 heads (NeoX halves), rounding where
 * the PyTorch reference does:
 *
 *   out_j = bf16(bf16(x_j cos_j) + bf16(turned_j sin_j)),  turned = (-x[half:rot], x[:half])
 *
 * and dims past `rot` copied, so the result equals the reference bit for bit. Rows are addressed
 * by (token, head) strides on both sides: a key can be rotated straight into a K/V cache, and
 * rot = 0 is a strided copy (a value into the cache).
 */
#include <omp.h>
#include <string.h>

#include "../bf16_simd.h"

/* x rows at x + t x_t + h x_h, out rows at out + t o_t + h o_h, t < T, h < H; cos, sin [T, rot]. */
void rotary_bf16(const uint16_t *x, int64_t x_t, int64_t x_h, int64_t T, int64_t H, int64_t D, const uint16_t *cos,
                 const uint16_t *sin, int64_t rot, uint16_t *out, int64_t o_t, int64_t o_h, int threads) {
    int64_t half = rot / 2, rows = T * H;
    if (rows * D < (1 << 16)) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; row++) {
        int64_t t = row / H, h = row % H;
        const uint16_t *src = x + t * x_t + h * x_h, *c = cos + t * rot, *s = sin + t * rot;
        uint16_t *dst = out + t * o_t + h * o_h;
        for (int64_t j = 0; j < rot; j++) {
            float turned = j < half ? -bf16_to_float(src[j + half]) : bf16_to_float(src[j - half]);
            float along = round_bf16(bf16_to_float(src[j]) * bf16_to_float(c[j]));
            float across = round_bf16(turned * bf16_to_float(s[j]));
            dst[j] = float_to_bf16(along + across);
        }
        memcpy(dst + rot, src + rot, sizeof(uint16_t) * (D - rot));
    }
}
