/* The top-k softmax router over many tokens' bf16 logits (prefill chunks): softmax in fp32, the k
 * largest probabilities in descending order (lowest expert first on ties), optionally renormalised
 * to sum to one, weights rounded to bf16. Tokens are independent and shared out over the threads.
 *
 * reference.route does the same with PyTorch's softmax and topk, which cost several times the
 * router's matmul at prefill. exp and the sum's order are this file's (the vector exp of
 * bf16_simd.h, lanes then a tree), so probabilities can differ from PyTorch's in the last fp32 bits.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>

#include "../bf16_simd.h"

#define MAX_EXPERTS 1024
#define MAX_TOP_K 64

/* The largest value of probs [E] (E a multiple of 16, taken ones set to -1) and its lowest index. */
static inline int64_t arg_max(const float *probs, int64_t E, float *value) {
    __m512 best = _mm512_set1_ps(-2.0f);
    for (int64_t e = 0; e < E; e += 16) best = _mm512_max_ps(best, _mm512_loadu_ps(probs + e));
    float top = _mm512_reduce_max_ps(best);
    __m512 top_v = _mm512_set1_ps(top);
    for (int64_t e = 0; e < E; e += 16) {
        __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(probs + e), top_v, _CMP_EQ_OQ);
        if (hit) {
            *value = top;
            return e + __builtin_ctz(hit);
        }
    }
    *value = NAN; /* NaN logits: no largest value; the outputs are NaN as PyTorch's would be */
    return 0;
}

/* logits [N, E] bf16 -> weights [N, k] bf16, experts [N, k] int64. E <= MAX_EXPERTS, k <= MAX_TOP_K. */
void route_bf16(const uint16_t *logits, int64_t N, int64_t E, int64_t topk, int normalize, uint16_t *weights,
                int64_t *experts, int threads) {
    if (N * E < (1 << 14)) threads = 1;
    int64_t padded = (E + 15) / 16 * 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        /* Lanes past E hold -1: below every probability, never picked. */
        float probs[MAX_EXPERTS] __attribute__((aligned(64))), picked[MAX_TOP_K];
        const uint16_t *row = logits + n * E;
        __m512 best = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t e = 0; e < padded; e += 16) {
            __mmask16 live = E - e >= 16 ? 0xffff : (__mmask16)((1u << (E - e)) - 1);
            __m512 v = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live,
                                          widen_bf16(_mm256_maskz_loadu_epi16(live, row + e)));
            _mm512_store_ps(probs + e, v);
            best = _mm512_max_ps(best, v);
        }
        __m512 best_v = _mm512_set1_ps(_mm512_reduce_max_ps(best));
        for (int64_t e = 0; e < padded; e += 16) {
            __mmask16 live = E - e >= 16 ? 0xffff : (__mmask16)((1u << (E - e)) - 1);
            __m512 p = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(_mm512_load_ps(probs + e), best_v)));
            _mm512_store_ps(probs + e, p);
            sum = _mm512_add_ps(sum, p);
        }
        __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
        for (int64_t e = 0; e < padded; e += 16) {
            __mmask16 live = E - e >= 16 ? 0xffff : (__mmask16)((1u << (E - e)) - 1);
            __m512 p = _mm512_div_ps(_mm512_load_ps(probs + e), total);
            _mm512_store_ps(probs + e, _mm512_mask_mov_ps(_mm512_set1_ps(-1.0f), live, p));
        }
        float picked_sum = 0.0f;
        for (int64_t j = 0; j < topk; j++) {
            int64_t arg = arg_max(probs, padded, &picked[j]);
            experts[n * topk + j] = arg;
            picked_sum += picked[j];
            probs[arg] = -1.0f;
        }
        for (int64_t j = 0; j < topk; j++)
            weights[n * topk + j] = float_to_bf16(normalize ? picked[j] / picked_sum : picked[j]);
    }
}
