/* Gated DeltaNet for a few tokens (decode, draft verification) in one call: causal conv1d update
 * with SiLU, gates, q/k L2 norm and the gated delta rule, token after token.
 *
 * Mirrors the PyTorch decode path: the conv sums its taps in fp32 and rounds to bf16 before SiLU
 * (rounded again); beta = sigmoid(b) is rounded to bf16; g = -exp(A_log) softplus(a + dt_bias),
 * q and k normalised in fp32 (q then scaled), the recurrent state in fp32, outputs rounded to
 * bf16. Each token is processed exactly as a one-token call would, so verification rows equal
 * decode steps bit for bit. Value heads are split over the OpenMP threads.
 *
 * Built twice: with AVX-512 and with AVX2 + FMA + F16C. The delta rule has no reduction across
 * lanes (every state column is its own chain of fused multiply-adds over the key dim, in order),
 * so both builds compute the same values; the AVX2 build also keeps a head's state in cache
 * through all of the call's tokens.
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

/* One channel, one token x: the conv over the tail [W - 1] and x, SiLU, both rounded to bf16;
 * x then enters the tail. */
static inline float conv_silu(uint16_t *tail, const uint16_t *w, int64_t W, uint16_t x) {
    float sum = 0.0f;
    for (int64_t i = 0; i < W - 1; i++) sum += bf16_to_float(tail[i]) * bf16_to_float(w[i]);
    sum += bf16_to_float(x) * bf16_to_float(w[W - 1]);
    float y = round_bf16(sum);
    for (int64_t i = 0; i + 1 < W - 1; i++) tail[i] = tail[i + 1];
    if (W > 1) tail[W - 2] = x;
    return round_bf16(y / (1.0f + expf(-y)));
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

#if defined(__AVX512BF16__)

/* One value head, one token: state [Dk, Dv] updated in place, out [Dv] bf16. Dv % 16 == 0. */
static void head_step(float *state, const float *q, const float *k, const float *v, float decay, float beta,
                      int64_t Dk, int64_t Dv, float *scratch, uint16_t *out) {
    float *projected = scratch, *update = scratch + Dv, *result = scratch + 2 * Dv;
    __m512 decay_v = _mm512_set1_ps(decay);
    for (int64_t j = 0; j < Dv; j += 16) _mm512_storeu_ps(projected + j, _mm512_setzero_ps());
    for (int64_t i = 0; i < Dk; i++) {
        __m512 ki = _mm512_set1_ps(k[i]);
        for (int64_t j = 0; j < Dv; j += 16) {
            __m512 s = _mm512_mul_ps(_mm512_loadu_ps(state + i * Dv + j), decay_v);
            _mm512_storeu_ps(state + i * Dv + j, s);
            _mm512_storeu_ps(projected + j, _mm512_fmadd_ps(ki, s, _mm512_loadu_ps(projected + j)));
        }
    }
    __m512 beta_v = _mm512_set1_ps(beta);
    for (int64_t j = 0; j < Dv; j += 16) {
        __m512 scaled_v = _mm512_mul_ps(_mm512_loadu_ps(v + j), beta_v);
        _mm512_storeu_ps(update + j, _mm512_fnmadd_ps(beta_v, _mm512_loadu_ps(projected + j), scaled_v));
        _mm512_storeu_ps(result + j, _mm512_setzero_ps());
    }
    for (int64_t i = 0; i < Dk; i++) {
        __m512 ki = _mm512_set1_ps(k[i]), qi = _mm512_set1_ps(q[i]);
        for (int64_t j = 0; j < Dv; j += 16) {
            __m512 s = _mm512_fmadd_ps(ki, _mm512_loadu_ps(update + j), _mm512_loadu_ps(state + i * Dv + j));
            _mm512_storeu_ps(state + i * Dv + j, s);
            _mm512_storeu_ps(result + j, _mm512_fmadd_ps(qi, s, _mm512_loadu_ps(result + j)));
        }
    }
    for (int64_t j = 0; j < Dv; j++) out[j] = float_to_bf16(result[j]);
}

/* mixed [T, C] bf16 (C = 2 Hk Dk + HV Dv: q | k | v before the conv); conv_state [C, W - 1] bf16
 * and state [HV, Dk, Dv] fp32 are updated in place; conv_weight [C, W] bf16; a, b [T, HV] bf16;
 * decay_rate = exp(A_log) and dt_bias [HV] fp32; out [T, HV, Dv] bf16. Returns 0, or -1 when work
 * buffers cannot be allocated. */
int gated_delta_step_bf16(const uint16_t *mixed, int64_t T, int64_t Hk, int64_t HV, int64_t Dk, int64_t Dv,
                          uint16_t *conv_state, const uint16_t *conv_weight, int64_t W, const uint16_t *a,
                          const uint16_t *b, const float *decay_rate, const float *dt_bias, float *state,
                          uint16_t *out, int threads) {
    int64_t C = 2 * Hk * Dk + HV * Dv, group = HV / Hk;
    float *activated = malloc(sizeof(float) * C);
    float *scratch = malloc(sizeof(float) * 3 * Dv * (threads > 0 ? threads : 1));
    if (!activated || !scratch) {
        free(activated);
        free(scratch);
        return -1;
    }
    float scale = 1.0f / sqrtf((float)Dk);
#pragma omp parallel num_threads(threads)
    for (int64_t t = 0; t < T; t++) {
#pragma omp single
        {
            for (int64_t c = 0; c < C; c++)
                activated[c] = conv_silu(conv_state + c * (W - 1), conv_weight + c * W, W, mixed[t * C + c]);
            normalise_qk(activated, Hk, Dk, scale);
        }
        float *own = scratch + 3 * Dv * omp_get_thread_num();
#pragma omp for schedule(static)
        for (int64_t hv = 0; hv < HV; hv++) {
            int64_t hk = hv / group;
            float decay, beta;
            head_gates(a[t * HV + hv], b[t * HV + hv], decay_rate[hv], dt_bias[hv], &decay, &beta);
            head_step(state + hv * Dk * Dv, activated + hk * Dk, activated + Hk * Dk + hk * Dk,
                      activated + 2 * Hk * Dk + hv * Dv, decay, beta, Dk, Dv, own, out + (t * HV + hv) * Dv);
        }
    }
    free(activated);
    free(scratch);
    return 0;
}

#else /* AVX2 + FMA + F16C */
#include "../simd.h"

/* State columns one pass takes: 8 vectors, 8 independent chains to hide the FMA latency. At
 * Dv = 128 a block of a 128-row state is 32 KiB and stays in L1 from the first pass to the second. */
#define COLUMN_SLICES 8

/* One value head, one token, on `slices` vectors of state columns starting at state (row stride
 * Dv): projected = k^T (decay S); update = beta v - beta projected; S = decay S + k update;
 * out = q^T S, rounded to bf16. Per column the same operations in the same order as the
 * AVX-512 build's head_step, which stores decay S between the passes where this recomputes it.
 * Where next is not NULL, the same columns of the next state to update are requested into L2 during
 * the first pass (a decode step reads each state from memory once; this overlaps the reads). */
static inline __attribute__((always_inline)) void head_step_columns(float *state, int64_t Dv, const float *q,
                                                                  const float *k, const float *v, vf decay, vf beta,
                                                                  int64_t Dk, uint16_t *out, const float *next,
                                                                  const int slices) {
    vf acc[COLUMN_SLICES], update[COLUMN_SLICES];
    for (int s = 0; s < slices; s++) acc[s] = vf_zero();
    for (int64_t i = 0; i < Dk; i++) {
        vf ki = vf_set1(k[i]);
        const float *row = state + i * Dv;
        if (next) /* a 64-byte line holds two vectors */
            for (int s = 0; s < slices; s += 2) _mm_prefetch((const char *)(next + i * Dv + s * VF_LANES), _MM_HINT_T1);
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
        case 8: head_step_columns(columns, Dv, q, k, v + j, decay_v, beta_v, Dk, out + j, next_columns, 8); break;
        case 6: head_step_columns(columns, Dv, q, k, v + j, decay_v, beta_v, Dk, out + j, next_columns, 6); break;
        case 4: head_step_columns(columns, Dv, q, k, v + j, decay_v, beta_v, Dk, out + j, next_columns, 4); break;
        default: head_step_columns(columns, Dv, q, k, v + j, decay_v, beta_v, Dk, out + j, next_columns, 2); break;
        }
    }
}

/* bf16 -> fp32 -> bf16 as round_bf16 does, lane by lane. */
static inline __attribute__((always_inline)) vf round_to_bf16(vf x) { return vf_from_bf16_bits(vf_bf16_bits(x)); }

/* conv_silu on channels c .. c + VF_LANES - 1 for all T tokens, one channel a lane: the same
 * operations in the same order (the fused multiply-adds the compiler makes of conv_silu's sum;
 * expf stays libm's, called lane by lane), so the same bits. window holds (W - 1 + T) x VF_LANES
 * bf16: the tails, then the tokens. */
static void conv_silu_lanes(uint16_t *conv_state, const uint16_t *conv_weight, int64_t W, const uint16_t *mixed,
                            int64_t T, int64_t C, int64_t c, uint16_t *window, float *activated) {
    int64_t taps = W - 1;
    for (int64_t i = 0; i < taps; i++)
        for (int l = 0; l < VF_LANES; l++) window[i * VF_LANES + l] = conv_state[(c + l) * taps + i];
    for (int64_t t = 0; t < T; t++) memcpy(window + (taps + t) * VF_LANES, mixed + t * C + c, sizeof(uint16_t) * VF_LANES);
    for (int64_t t = 0; t < T; t++) {
        vf sum = vf_zero();
        for (int64_t i = 0; i < W; i++) {
            float weight[VF_LANES];
            for (int l = 0; l < VF_LANES; l++) weight[l] = bf16_to_float(conv_weight[(c + l) * W + i]);
            sum = vf_fma(vf_load_bf16(window + (t + i) * VF_LANES), vf_load(weight), sum);
        }
        vf y = round_to_bf16(sum);
        float decay[VF_LANES];
        vf_store(decay, y);
        for (int l = 0; l < VF_LANES; l++) decay[l] = expf(-decay[l]);
        vf_store(activated + t * C + c, round_to_bf16(vf_div(y, vf_add(vf_set1(1.0f), vf_load(decay)))));
    }
    for (int64_t i = 0; i < taps; i++)
        for (int l = 0; l < VF_LANES; l++) conv_state[(c + l) * taps + i] = window[(T + i) * VF_LANES + l];
}

/* As the AVX-512 build (same arguments, same values). The conv runs first for all tokens (each
 * channel through its own tail, in token order, VF_LANES channels at a time), then each thread
 * takes whole value heads through every token, so a head's state is read from memory once per call. */
int gated_delta_step_bf16(const uint16_t *mixed, int64_t T, int64_t Hk, int64_t HV, int64_t Dk, int64_t Dv,
                          uint16_t *conv_state, const uint16_t *conv_weight, int64_t W, const uint16_t *a,
                          const uint16_t *b, const float *decay_rate, const float *dt_bias, float *state,
                          uint16_t *out, int threads) {
    int64_t C = 2 * Hk * Dk + HV * Dv, group = HV / Hk;
    int64_t window = (W - 1 + T) * VF_LANES, lane_channels = C / VF_LANES * VF_LANES;
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
        for (int64_t c = 0; c < lane_channels; c += VF_LANES)
            conv_silu_lanes(conv_state, conv_weight, W, mixed, T, C, c, own, activated);
#pragma omp single
        for (int64_t c = lane_channels; c < C; c++)
            for (int64_t t = 0; t < T; t++)
                activated[t * C + c] = conv_silu(conv_state + c * (W - 1), conv_weight + c * W, W, mixed[t * C + c]);
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
#endif

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
