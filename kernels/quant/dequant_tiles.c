/* Dequantization of quantized weight rows into bf16 (or fp32) tiles, for prefill's GEMMs.
 *
 * out[e][r][c] = value(weight e, row first_row + r, column c) * scale of its block / row / group,
 * the product taken in fp32 exactly as reference.dequantize() takes it (value first, so a NaN keeps
 * the value's bits), then, for bf16 tiles, rounded as torch's fp32 -> bf16 conversion rounds:
 * to nearest even, every NaN written as 0xFFFF. The tile is bit-identical to
 * dequantize(weight, rows).to(torch.bfloat16).
 *
 * Formats: formats.h; data strides are in bytes, scale strides in scale elements.
 *
 * `experts` (NULL: one weight at `data`) lists the experts of a stacked weight to dequantize, the
 * i-th into slot i of `out` (out + i * out_expert_stride): the experts nobody routed to are not read.
 * Rows are shared out over OpenMP threads in blocks of ROW_BLOCK.
 *
 * Built with AVX-512 (16 lanes) and with AVX2 + FMA + F16C (8 lanes); both give the same bits, the
 * reference's (the row itself: dequant_row.h).
 */
#include <omp.h>
#include <string.h>

#include "dequant_row.h"

/* Rows a thread takes at a time: enough work per scheduling step, few enough to balance 2 threads
 * over a 128-row expert slice. */
#define ROW_BLOCK 16

void dequantize_rows(int format, const uint8_t *data, int64_t data_expert_stride, int64_t data_row_stride,
                     const void *scale, int scale_bf16, int64_t scale_expert_stride, int64_t scale_row_stride,
                     int64_t group, const int64_t *experts, int64_t expert_count, int64_t first_row, int64_t rows,
                     int64_t columns, void *out, int out_bf16, int64_t out_expert_stride, int64_t out_row_stride,
                     int threads) {
    int64_t segment = format == FORMAT_FP8_BLOCK ? FP8_BLOCK : format == FORMAT_INT8 ? columns : group;
    int64_t blocks_per_expert = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
    int64_t out_element = out_bf16 ? sizeof(uint16_t) : sizeof(float);
    int64_t scale_element = scale_bf16 ? sizeof(uint16_t) : sizeof(float);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < expert_count * blocks_per_expert; task++) {
        int64_t slot = task / blocks_per_expert, expert = experts ? experts[slot] : 0;
        int64_t r0 = task % blocks_per_expert * ROW_BLOCK;
        int64_t r1 = r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows;
        for (int64_t r = r0; r < r1; r++) {
            int64_t row = first_row + r;
            int64_t scale_row = format == FORMAT_FP8_BLOCK ? row / FP8_BLOCK : row;
            const uint8_t *bytes = data + expert * data_expert_stride + row * data_row_stride;
            const char *scales = (const char *)scale + (expert * scale_expert_stride + scale_row * scale_row_stride) *
                                                            scale_element;
            char *target = (char *)out + (slot * out_expert_stride + r * out_row_stride) * out_element;
            dequantize_row(format, bytes, scales, scale_bf16, segment, columns, target, out_bf16);
        }
    }
}
