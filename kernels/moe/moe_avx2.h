/* The AVX2 builds' shared parts of the MoE kernels: SwiGLU and bf16 rounding of fp32 vectors. */
#ifndef DOCANALYST_MOE_AVX2_H
#define DOCANALYST_MOE_AVX2_H

#include "../simd.h"

/* Lanes rounded to bf16 (nearest even, as torch) and widened back. */
VF_INLINE vf round_lanes(vf v) { return vf_from_bf16_bits(vf_bf16_bits(v)); }

/* act[i] = bf16(bf16(silu(bf16(gate[i]))) * bf16(up[i])) for i < width, as F.silu(gate) * up on bf16
 * tensors; silu as g / (1 + e^-g) with vf_exp. */
static void swiglu_row(const float *gate, const float *up, int64_t width, uint16_t *act) {
    for (int64_t i = 0; i < width; i += VF_LANES) {
        int64_t live = width - i;
        vf g = round_lanes(vf_load_n(gate + i, live)), u = round_lanes(vf_load_n(up + i, live));
        vf silu = vf_div(g, vf_add(vf_set1(1.0f), vf_exp(vf_sub(vf_zero(), g))));
        vf_store_bf16_n(act + i, vf_mul(round_lanes(silu), u), live);
    }
}

#endif
