/* The quantized weight formats as the C kernels see them (formats.py defines their layouts): the
 * format codes, the fp8 scale block, and one weight as the Python side describes it.
 *
 *   fp8_block  e4m3 bytes, scale[row / 128][column / 128]
 *   int8       int8 bytes, scale[row][0]
 *   int4       uint8 pairs (even column in the low nibble, value + 8), scale[row][column / group]
 *   bf16       the weight as stored, no scale
 * Scales are fp32 or bf16.
 */
#ifndef DOCANALYST_QUANT_FORMATS_H
#define DOCANALYST_QUANT_FORMATS_H

#include <stdint.h>

enum { FORMAT_FP8_BLOCK = 0, FORMAT_INT8 = 1, FORMAT_INT4 = 2, FORMAT_BF16 = 3 };

#define FP8_BLOCK 128

/* One weight as moe_native.py's WEIGHT_FIELDS describes it (same order): a matrix [rows, columns],
 * or a stack of them, one per expert, `expert_bytes` / `expert_scales` apart; strides in bytes
 * (data) and scale elements (scale). */
typedef struct {
    int64_t format, data, scale, scale_bf16, rows, columns, row_bytes, scale_stride, group, expert_bytes,
        expert_scales;
} weight_ref;

#endif
