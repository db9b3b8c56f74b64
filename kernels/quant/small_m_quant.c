/* Linear layer over a quantized weight for a few rows (decode, draft verification):
 * y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), the weight read straight from its quantized bytes
 * by the dot products of quant_dot.h (formats, bits and memory traffic are described there).
 *
 * Built twice from this file: with AVX-512 (16 lanes) and with AVX2 + FMA + F16C (8 lanes); the
 * Python side picks the build the CPU runs. The two give different bits from each other (lane
 * count), each always the same ones.
 */
#include <omp.h>

#include "quant_dot.h"

/* Which build this is: 16 lanes (AVX-512) or 8 (AVX2). */
void quant_small_m_lanes(int32_t *lanes) { *lanes = LANES; }

/* The product's blocks [first, end) with a scratch of its own where it needs one (NaN outputs when
 * that cannot be allocated). */
static void run_blocks_alone(const problem *p, int64_t first, int64_t end) {
    float *scratch = NULL;
    if (needs_scratch(p) && (scratch = malloc(sizeof(float) * (size_t)(p->M * p->ldx))) == NULL) {
        for (int64_t m = 0; m < p->M; m++)
            for (int64_t n = first * ROW_BLOCK; n < end * ROW_BLOCK && n < p->N; n++) put(p, m, n, NAN);
        return;
    }
    run_blocks(p, first, end, scratch);
    free(scratch);
}

/* Up to QUANT_MAX_ROWS rows: quant_linear_small_m's contract. */
static void linear_rows(int format, const char *x, int x_bf16, int64_t ldx, int64_t M, int64_t K, const void *w,
                        int64_t ldw, int64_t N, const void *scale, int scale_bf16, int64_t lds, int64_t group,
                        const void *bias, int bias_bf16, char *y, int y_bf16, int int4_pairs, int threads) {
    int pairs = int4_pairs && x_bf16 && takes_pairs(format, group);
    int64_t width = prepared_width(K);
    float *prepared = aligned_alloc(64, sizeof(float) * (size_t)(M * width));
    const float *x_rows[QUANT_MAX_ROWS];
    void *y_rows[QUANT_MAX_ROWS];
    for (int64_t m = 0; m < M; m++) {
        x_rows[m] = prepared + m * width;
        y_rows[m] = y + m * N * (y_bf16 ? 2 : 4);
    }
    problem p = { format, x_rows, width, M, K, N, (const uint8_t *)w, ldw, scale, scale_bf16, lds, group,
                  bias, bias_bf16, y_rows, y_bf16, pairs, NULL };
    if (prepared == NULL || K <= 0) {
        /* An empty sum is 0; without memory for x, NaN says so. */
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) put(&p, m, n, prepared == NULL ? NAN : 0.0f);
        free(prepared);
        return;
    }
    for (int64_t m = 0; m < M; m++)
        prepare_for(x + m * ldx * (x_bf16 ? 2 : 4), x_bf16, K, format, pairs, prepared + m * width, width);
    int64_t blocks = row_blocks(&p);
    if (threads <= 1 || N * K < (1 << 17)) {
        run_blocks_alone(&p, 0, blocks);
    } else {
#pragma omp parallel num_threads(threads)
        {
            int count = omp_get_num_threads(), index = omp_get_thread_num();
            int64_t per = (blocks + count - 1) / count;
            int64_t first = index * per, end = first + per < blocks ? first + per : blocks;
            if (first < end) run_blocks_alone(&p, first, end);
        }
    }
    free(prepared);
}

/* y [M, N] (fp32 or bf16) = x [M, K] (fp32 or bf16, row stride ldx elements) times the weight [N, K]
 * of `format` (data rows of ldw bytes; scale fp32 or bf16, rows of lds elements; int4 group a
 * multiple of 2 * LANES), plus bias [N] (fp32 or bf16) unless NULL. With `int4_pairs`, an int4
 * weight times bf16 x takes pair products where the build and the group allow (quant_dot.h). Weight
 * rows are split over up to `threads` OpenMP threads when there are enough; more than
 * QUANT_MAX_ROWS rows of x go through in runs of that many. */
void quant_linear_small_m(int format, const void *x, int x_bf16, int64_t ldx, int64_t M, int64_t K, const void *w,
                          int64_t ldw, int64_t N, const void *scale, int scale_bf16, int64_t lds, int64_t group,
                          const void *bias, int bias_bf16, void *y, int y_bf16, int int4_pairs, int threads) {
    if (N <= 0) return;
    for (int64_t m0 = 0; m0 < M; m0 += QUANT_MAX_ROWS)
        linear_rows(format, (const char *)x + m0 * ldx * (x_bf16 ? 2 : 4), x_bf16, ldx,
                    M - m0 < QUANT_MAX_ROWS ? M - m0 : QUANT_MAX_ROWS, K, w, ldw, N, scale, scale_bf16, lds, group,
                    bias, bias_bf16, (char *)y + m0 * N * (y_bf16 ? 2 : 4), y_bf16, int4_pairs, threads);
}
