/* The MoE block kernels' steps outside the products, for either build (simd.h's fp32 vectors): a
 * token's routing, SwiGLU, and a token's block output from its routed and shared experts' outputs,
 * each rounded to bf16 where the module path's bf16 tensors are. Its includers have the scalar bf16
 * conversions (bf16_simd.h). */
#ifndef DOCANALYST_MOE_BLOCK_STEPS_H
#define DOCANALYST_MOE_BLOCK_STEPS_H

#include <math.h>

#include "../simd.h"

/* The most experts a token may choose (the Python bindings' MAX_TOP_K). */
#define MAX_TOP_K 64

/* A token's routing from its fp32 router logits (overwritten): softmax over the bf16-rounded logits
 * in fp32; the top-k (the lowest id first among equal probabilities), listed in ascending expert
 * id (the order their outputs are added in), and their weights as bf16 values, renormalised to sum
 * to one with `normalize`. topk <= MAX_TOP_K. */
static inline void route_token(float *logits, int64_t E, int64_t topk, int normalize, int64_t *chosen,
                               float *weight) {
    float best = -INFINITY, sum = 0.0f, picked_sum = 0.0f, picked[MAX_TOP_K];
    for (int64_t e = 0; e < E; e++) {
        logits[e] = round_bf16(logits[e]);
        best = logits[e] > best ? logits[e] : best;
    }
    for (int64_t e = 0; e < E; e++) sum += (logits[e] = expf(logits[e] - best));
    for (int64_t e = 0; e < E; e++) logits[e] /= sum;
    for (int64_t j = 0; j < topk; j++) {
        /* Probabilities lie in [0, 1], so -1 marks a taken expert; NaN ones (from a NaN x) compare
         * false and leave the lowest untaken id, whose output is NaN then anyway. */
        int64_t arg = -1;
        for (int64_t e = 0; e < E; e++)
            if (logits[e] != -1.0f && (arg < 0 || logits[e] > logits[arg])) arg = e;
        chosen[j] = arg;
        picked[j] = logits[arg];
        picked_sum += picked[j];
        logits[arg] = -1.0f;
    }
    for (int64_t a = 1; a < topk; a++)
        for (int64_t b = a; b > 0 && chosen[b] < chosen[b - 1]; b--) {
            int64_t id = chosen[b]; chosen[b] = chosen[b - 1]; chosen[b - 1] = id;
            float p = picked[b]; picked[b] = picked[b - 1]; picked[b - 1] = p;
        }
    for (int64_t j = 0; j < topk; j++) weight[j] = round_bf16(normalize ? picked[j] / picked_sum : picked[j]);
}

/* act[i] = bf16(bf16(silu(bf16(gate[i]))) * bf16(up[i])) for i < width, as F.silu(gate) * up on bf16
 * tensors; silu by simd.h's vf_silu. */
static inline void swiglu_row(const float *gate, const float *up, int64_t width, uint16_t *act) {
    for (int64_t i = 0; i < width; i += VF_LANES) {
        int64_t live = width - i;
        vf g = vf_round_bf16(vf_load_n(gate + i, live)), u = vf_round_bf16(vf_load_n(up + i, live));
        vf silu = vf_silu(g);
        vf_store_bf16_n(act + i, vf_mul(vf_round_bf16(silu), u), live);
    }
}

/* Columns of a token's block output one thread takes at a time (a multiple of either build's lanes). */
#define OUTPUT_PIECE 256

/* A token's block output at columns [h0, h1): out[h] = bf16(bf16(routed) + bf16(gate * bf16(shared[h])))
 * with routed = the sum over j < topk, in that order, of bf16(bf16(expert[j * stride + h]) * weight[j])
 * (`weight`: bf16 values) and gate = bf16(sigmoid(bf16(gate_logit))), the shared expert's gate as the
 * module path rounds it. Which columns a call takes changes no bits. */
static inline void block_output(const float *expert, int64_t stride, const float *weight, int64_t topk,
                                const float *shared, float gate_logit, int64_t h0, int64_t h1, uint16_t *out) {
    float gate = round_bf16(1.0f / (1.0f + expf(-round_bf16(gate_logit))));
    for (int64_t h = h0; h < h1; h += VF_LANES) {
        int64_t live = h1 - h;
        vf routed = vf_zero();
        for (int64_t j = 0; j < topk; j++)
            routed = vf_add(routed, vf_round_bf16(vf_mul(vf_round_bf16(vf_load_n(expert + j * stride + h, live)),
                                                       vf_set1(weight[j]))));
        vf gated = vf_round_bf16(vf_mul(vf_set1(gate), vf_round_bf16(vf_load_n(shared + h, live))));
        vf_store_bf16_n(out + h, vf_add(vf_round_bf16(routed), gated), live);
    }
}

#endif
