/* Gated DeltaNet for a few tokens (decode, draft verification) in one call: causal conv1d update
 * with SiLU, gates, q/k L2 norm and the gated delta rule, token after token.
 *
 * Mirrors the PyTorch decode path: the conv sums its taps in fp32 and rounds to bf16 before SiLU
 * (simd.h's vf_silu; rounded again); beta = sigmoid(b) is rounded to bf16; g = -exp(A_log)
 * softplus(a + dt_bias), q and k normalised in fp32 (q then scaled), the recurrent state in fp32,
 * outputs rounded to bf16. Each token is processed exactly as a one-token call would, so verification rows equal
 * decode steps bit for bit. Value heads are split over the OpenMP threads.
 *
 * Built twice, with AVX-512 and with AVX2 + FMA + F16C, from one source on the build's vectors
 * (simd.h). The delta rule has no reduction across lanes (every state column is its own chain of
 * fused multiply-adds over the key dim, in order), so both builds compute the same values. A
 * head's state stays in cache through all of the call's tokens.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

/* The scalar bf16 conversions; the header's AVX-512 helpers go unused in the AVX2 build, where
 * GCC would warn about their ABI. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#include "../bf16_simd.h"
#pragma GCC diagnostic pop
#include "split_bf16.c"

static inline float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

static void l2_normalise(float *x, int64_t n, float scale) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += x[i] * x[i];
    float factor = 1.0f / sqrtf(sum + 1e-6f);
    for (int64_t i = 0; i < n; i++) x[i] = x[i] * factor * scale;
}

/* q and k of one token's activated channels [C] (q | k | v), L2-normalised per key head, q scaled. */
static void normalise_qk(float *activated, int64_t Hk, int64_t Dk, float scale) {
    for (int64_t h = 0; h < Hk; h++) {
        l2_normalise(activated + h * Dk, Dk, scale);
        l2_normalise(activated + Hk * Dk + h * Dk, Dk, 1.0f);
    }
}

/* The decay exp(g) and beta of one value head for one token from its raw a and b. */
static inline void head_gates(uint16_t a, uint16_t b, float decay_rate, float dt_bias, float *decay, float *beta) {
    float g = -decay_rate * softplus(bf16_to_float(a) + dt_bias);
    *decay = expf(g);
    *beta = round_bf16(1.0f / (1.0f + expf(-bf16_to_float(b))));
}

#include "../simd.h"

/* State columns one pass takes: COLUMN_SLICES vectors, as many independent chains to hide the FMA
 * latency. */
#define COLUMN_SLICES 8
/* Vectors of state a 64-byte line holds. */
#define SLICES_PER_LINE (64 / (VF_LANES * (int)sizeof(float)))

/* One value head, one token, on `slices` vectors of state columns starting at state (row stride
 * Dv): projected = k^T (decay S); update = beta v - beta projected; S = decay S + k update;
 * out = q^T S, rounded to bf16. Each column is its own chain of operations over the key dim, in
 * order, whatever the lanes: both builds give the same bits. Where next is not NULL, the same
 * columns of the next state to update are requested into L2 during the first pass (a decode step
 * reads each state from memory once; this overlaps the reads). */
static inline __attribute__((always_inline)) void head_step_columns(float *state, int64_t Dv, const float *q,
                                                                  const float *k, const float *v, vf decay, vf beta,
                                                                  int64_t Dk, uint16_t *out, const float *next,
                                                                  const int slices) {
    vf acc[COLUMN_SLICES], update[COLUMN_SLICES];
    for (int s = 0; s < slices; s++) acc[s] = vf_zero();
    for (int64_t i = 0; i < Dk; i++) {
        vf ki = vf_set1(k[i]);
        const float *row = state + i * Dv;
        if (next)
            for (int s = 0; s < slices; s += SLICES_PER_LINE)
                _mm_prefetch((const char *)(next + i * Dv + s * VF_LANES), _MM_HINT_T1);
        for (int s = 0; s < slices; s++) acc[s] = vf_fma(ki, vf_mul(vf_load(row + s * VF_LANES), decay), acc[s]);
    }
    for (int s = 0; s < slices; s++) {
        update[s] = vf_fnma(beta, acc[s], vf_mul(vf_load(v + s * VF_LANES), beta));
        acc[s] = vf_zero();
    }
    for (int64_t i = 0; i < Dk; i++) {
        vf ki = vf_set1(k[i]), qi = vf_set1(q[i]);
        float *row = state + i * Dv;
        for (int s = 0; s < slices; s++) {
            vf updated = vf_fma(ki, update[s], vf_mul(vf_load(row + s * VF_LANES), decay));
            vf_store(row + s * VF_LANES, updated);
            acc[s] = vf_fma(qi, updated, acc[s]);
        }
    }
    for (int s = 0; s < slices; s++) vf_store_bf16(out + s * VF_LANES, acc[s]);
}

/* One value head, one token: state [Dk, Dv] updated in place, out [Dv] bf16. Dv % 16 == 0.
 * next: the state [Dk, Dv] to prefetch, or NULL. */
static void head_step(float *state, const float *q, const float *k, const float *v, float decay, float beta,
                      int64_t Dk, int64_t Dv, uint16_t *out, const float *next) {
    vf decay_v = vf_set1(decay), beta_v = vf_set1(beta);
    for (int64_t j = 0; j < Dv; j += COLUMN_SLICES * VF_LANES) {
        float *columns = state + j;
        const float *next_columns = next ? next + j : NULL;
        switch ((Dv - j) >= COLUMN_SLICES * VF_LANES ? COLUMN_SLICES : (int)((Dv - j) / VF_LANES)) {
#define COLUMNS_CASE(n) \
        case n: head_step_columns(columns, Dv, q, k, v + j, decay_v, beta_v, Dk, out + j, next_columns, n); break;
        COLUMNS_CASE(8) COLUMNS_CASE(7) COLUMNS_CASE(6) COLUMNS_CASE(5)
        COLUMNS_CASE(4) COLUMNS_CASE(3) COLUMNS_CASE(2) COLUMNS_CASE(1)
#undef COLUMNS_CASE
        }
    }
}

/* Channels c .. c + lanes - 1 (lanes <= VF_LANES) for all T tokens, one channel a lane: each
 * token's conv over the channel's tail [W - 1] and the token (an fp32 chain of fused multiply-adds
 * over the taps, in order), rounded to bf16; SiLU by vf_silu, rounded to bf16;
 * the token then enters the tail. window holds (W - 1 + T) x VF_LANES bf16: the tails, then the
 * tokens. */
static void conv_silu_lanes(uint16_t *conv_state, const uint16_t *conv_weight, int64_t W, const uint16_t *mixed,
                            int64_t T, int64_t C, int64_t c, int lanes, uint16_t *window, float *activated) {
    int64_t taps = W - 1;
    memset(window, 0, sizeof(uint16_t) * (size_t)((taps + T) * VF_LANES));
    for (int64_t i = 0; i < taps; i++)
        for (int l = 0; l < lanes; l++) window[i * VF_LANES + l] = conv_state[(c + l) * taps + i];
    for (int64_t t = 0; t < T; t++) memcpy(window + (taps + t) * VF_LANES, mixed + t * C + c, sizeof(uint16_t) * lanes);
    float weight[W][VF_LANES];
    memset(weight, 0, sizeof(weight));
    for (int64_t i = 0; i < W; i++)
        for (int l = 0; l < lanes; l++) weight[i][l] = bf16_to_float(conv_weight[(c + l) * W + i]);
    for (int64_t t = 0; t < T; t++) {
        vf sum = vf_zero();
        for (int64_t i = 0; i < W; i++)
            sum = vf_fma(vf_load_bf16(window + (t + i) * VF_LANES), vf_load(weight[i]), sum);
        vf y = vf_round_bf16(sum);
        vf silu = vf_round_bf16(vf_silu(y));
        vf_store_n(activated + t * C + c, silu, lanes);
    }
    for (int64_t i = 0; i < taps; i++)
        for (int l = 0; l < lanes; l++) conv_state[(c + l) * taps + i] = window[(T + i) * VF_LANES + l];
}

/* mixed [T, C] bf16 (C = 2 Hk Dk + HV Dv: q | k | v before the conv); conv_state [C, W - 1] bf16
 * and state [HV, Dk, Dv] fp32 are updated in place; conv_weight [C, W] bf16; a, b [T, HV] bf16;
 * decay_rate = exp(A_log) and dt_bias [HV] fp32; out [T, HV, Dv] bf16. Returns 0, or -1 when work
 * buffers cannot be allocated. The conv runs first for all tokens (each channel through its own
 * tail, in token order, VF_LANES channels at a time, shared out over the threads), then each thread
 * takes whole value heads through every token, so a head's state is read from memory once per call. */
int gated_delta_step_bf16(const uint16_t *mixed, int64_t T, int64_t Hk, int64_t HV, int64_t Dk, int64_t Dv,
                          uint16_t *conv_state, const uint16_t *conv_weight, int64_t W, const uint16_t *a,
                          const uint16_t *b, const float *decay_rate, const float *dt_bias, float *state,
                          uint16_t *out, int threads) {
    int64_t C = 2 * Hk * Dk + HV * Dv, group = HV / Hk;
    int64_t window = (W - 1 + T) * VF_LANES;
    float *activated = malloc(sizeof(float) * T * C);
    uint16_t *windows = malloc(sizeof(uint16_t) * window * (threads > 0 ? threads : 1));
    if (!activated || !windows) {
        free(activated);
        free(windows);
        return -1;
    }
    float scale = 1.0f / sqrtf((float)Dk);
#pragma omp parallel num_threads(threads)
    {
        uint16_t *own = windows + window * omp_get_thread_num();
#pragma omp for schedule(static)
        for (int64_t c = 0; c < C; c += VF_LANES)
            conv_silu_lanes(conv_state, conv_weight, W, mixed, T, C, c, C - c < VF_LANES ? (int)(C - c) : VF_LANES, own,
                            activated);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) normalise_qk(activated + t * C, Hk, Dk, scale);
#pragma omp for schedule(static)
        for (int64_t hv = 0; hv < HV; hv++) {
            int64_t hk = hv / group;
            for (int64_t t = 0; t < T; t++) {
                const float *row = activated + t * C;
                float decay, beta;
                head_gates(a[t * HV + hv], b[t * HV + hv], decay_rate[hv], dt_bias[hv], &decay, &beta);
                head_step(state + hv * Dk * Dv, row + hk * Dk, row + Hk * Dk + hk * Dk, row + 2 * Hk * Dk + hv * Dv,
                          decay, beta, Dk, Dv, out + (t * HV + hv) * Dv,
                          t == T - 1 && hv + 1 < HV ? state + (hv + 1) * Dk * Dv : NULL);
            }
        }
    }
    free(activated);
    free(windows);
    return 0;
}

/* The same step on the input projections as the checkpoint lays them out, grouped per key head:
 * qkvz [T, Hk, 2 Dk + 2 g Dv] (q | k | the head's g value heads' v | their z, z unused here) with
 * row stride ld_qkvz, and ba [T, Hk, 2 g] (b | a) with row stride ld_ba, g = HV / Hk. Gathers
 * q | k | v, a and b as the step takes them (copies, so the bits are the step's). */
int gated_delta_step_grouped_bf16(const uint16_t *qkvz, int64_t ld_qkvz, const uint16_t *ba, int64_t ld_ba,
                                  int64_t T, int64_t Hk, int64_t HV, int64_t Dk, int64_t Dv, uint16_t *conv_state,
                                  const uint16_t *conv_weight, int64_t W, const float *decay_rate,
                                  const float *dt_bias, float *state, uint16_t *out, int threads) {
    int64_t C = 2 * Hk * Dk + HV * Dv;
    uint16_t *mixed = malloc(sizeof(uint16_t) * (T * C + 2 * T * HV));
    if (!mixed) return -1;
    uint16_t *a = mixed + T * C, *b = a + T * HV;
    split_projections_bf16(qkvz, ld_qkvz, ba, ld_ba, T, Hk, HV, Dk, Dv, mixed, NULL, b, a, 1);
    int status = gated_delta_step_bf16(mixed, T, Hk, HV, Dk, Dv, conv_state, conv_weight, W, a, b, decay_rate, dt_bias,
                                       state, out, threads);
    free(mixed);
    return status;
}
