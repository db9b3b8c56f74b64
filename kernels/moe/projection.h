/* Where the experts kernel reads an expert projection's weights [E][N][K] from: bf16 as stored, or
 * a quantized format (formats.h; gate and up may be two weights), dequantized exactly to bf16
 * (dequant_row.h) into the thread's scratch as the kernel reaches the rows, so that a quantized
 * expert's bf16 weights never travel through memory and the products are those of the bf16 weights
 * holding the same values. */
#ifndef DOCANALYST_MOE_PROJECTION_H
#define DOCANALYST_MOE_PROJECTION_H

#include "../quant/dequant_row.h"

/* Rows [0, split) of the projection are parts[0]'s, rows [split, N) parts[1]'s rows [0, N - split). */
typedef struct {
    const weight_ref *parts[2];
    int64_t split;
} projection;

/* A bf16 stack [E][N][K] as stored. */
static inline weight_ref bf16_stack(const uint16_t *w, int64_t N, int64_t K) {
    weight_ref ref = {FORMAT_BF16, (int64_t)(uintptr_t)w, 0, 0, N, K, K * 2, 0, 0, N * K * 2, 0};
    return ref;
}

/* Rows row .. row + count - 1 of expert e, bf16 [count][K]: in place where stored in bf16, else
 * dequantized into `scratch` (count x K). The rows lie in one part. */
static inline const uint16_t *expert_rows(const projection *w, int64_t e, int64_t row, int64_t count,
                                          uint16_t *scratch) {
    int second = row >= w->split;
    const weight_ref *part = w->parts[second];
    int64_t local = second ? row - w->split : row;
    if (part->format == FORMAT_BF16)
        return (const uint16_t *)(uintptr_t)(part->data + e * part->expert_bytes + local * part->row_bytes);
    dequantize_weight_rows(part, e, local, count, scratch);
    return scratch;
}

/* Whether every part is stored in bf16 (then no row needs scratch). */
static inline int projection_in_bf16(const projection *w, int64_t N) {
    return w->parts[0]->format == FORMAT_BF16 && (w->split >= N || w->parts[1]->format == FORMAT_BF16);
}

/* Expert e's whole projection [N][K] in bf16: in place where it is one bf16 part, else gathered
 * into `scratch` (N x K). */
static inline const uint16_t *expert_matrix(const projection *w, int64_t e, int64_t N, int64_t K,
                                            uint16_t *scratch) {
    if (w->split >= N && w->parts[0]->format == FORMAT_BF16) return expert_rows(w, e, 0, N, scratch);
    for (int64_t first = 0; first < N;) {
        int64_t stop = first < w->split && w->split < N ? w->split : N;
        const uint16_t *rows = expert_rows(w, e, first, stop - first, scratch + first * K);
        uint16_t *target = scratch + first * K;
        if (rows != target) memcpy(target, rows, sizeof(uint16_t) * (size_t)((stop - first) * K));
        first = stop;
    }
    return scratch;
}

#endif
