/* The builds of experts_bf16.c's run_experts without bf16 dot products (included there in place of
 * the AVX-512 BF16 code): the same steps and bf16 roundings, on fp32 sums (no tiles), with 8-lane
 * vectors (AVX2 + FMA + F16C) or 16-lane ones (AVX-512 without BF16, simd.h's VF_LANES).
 *
 * Each projection is a register-tiled outer product, as in a GEMM micro-kernel. An expert's tokens
 * (up to CHUNK_TOKENS at a time) are transposed so that they lie in lanes, GROUP_TOKENS to a group
 * (two vectors, zeros past the last token); its weights are widened to fp32 (exact) BLOCK_ROWS_WIDE
 * rows by BLOCK_INPUTS inputs at a time, and each weight is broadcast to a group's tokens: a tile is one
 * group by up to PAIR_ROWS weight rows, or one vector of tokens by up to SINGLE_ROWS rows (AVX2: 6 and
 * 12, 12 sums of 8 lanes; AVX-512, with twice the registers: 12 and 12).
 *
 * Bits. Lane t of a row's sum is one fp32 chain of fused multiply-adds over the inputs in a fixed
 * order (widening's split order, simd.h; AVX2: per 16 inputs, 0-3, 8-11, 4-7, 12-15), carried in memory from one
 * block of inputs to the next. A token's outputs never depend on the other tokens, how many there
 * are, the tile they share or the thread, so few-token calls give a token the same bits whatever
 * the call's size. They differ from the AVX-512 build's and from the few-token block kernel's
 * (dots_avx2.h, whose chains run over inputs in lanes).
 */
#ifndef DOCANALYST_EXPERTS_FP32_H
#define DOCANALYST_EXPERTS_FP32_H

#include "block_steps.h"

#define CHUNK_TOKENS 96 /* an expert's tokens taken at a time: its weights are widened once per chunk */
#define GROUP_TOKENS (2 * VF_LANES) /* tokens in the lanes of a tile (two vectors) */
#if VF_LANES == 16
#define PAIR_ROWS 12
#else
#define PAIR_ROWS 6
#endif
#define SINGLE_ROWS 12
#define BLOCK_ROWS_WIDE 48 /* weight rows widened together */
#define BLOCK_INPUTS 256   /* inputs widened together (a multiple of VF_SPLIT) */
#define AHEAD_SPAN 32      /* inputs between requests for the next block (one 64-byte line of bf16) */
#define EXPERTS_INLINE static inline __attribute__((always_inline))

/* Rows x_r [K] bf16 (r < m, at rows[r]) into lanes: group g of xt is [K][GROUP_TOKENS] fp32 holding
 * rows GROUP_TOKENS * g onwards, inputs in split order, zeros in the lanes past m. */
static void transpose_tokens(const uint16_t *const *rows, int64_t m, int64_t K, float *xt) {
    int64_t groups = (m + GROUP_TOKENS - 1) / GROUP_TOKENS;
    memset(xt + (groups - 1) * K * GROUP_TOKENS, 0, sizeof(float) * (size_t)(K * GROUP_TOKENS));
    for (int64_t r = 0; r < m; r++) {
        float *lane = xt + (r / GROUP_TOKENS) * K * GROUP_TOKENS + r % GROUP_TOKENS, split[VF_SPLIT];
        for (int64_t c = 0; c < K; c += VF_SPLIT) {
            vf low, high;
            vf_widen_split(vf_load_raw(rows[r] + c), &low, &high);
            vf_store(split, low), vf_store(split + VF_LANES, high);
            for (int i = 0; i < VF_SPLIT; i++) lane[(c + i) * GROUP_TOKENS] = split[i];
        }
    }
}

/* J weight rows (fp32 at wide, row stride n) against a group's NV vectors of tokens over n inputs:
 * sums start at zero on the first block of inputs, else come from `carried` ([J][GROUP_TOKENS]);
 * after the last block the first `live` tokens' sums go to out[t * ldo + i], else back to `carried`.
 * Unless `ahead` is NULL, the same rows of the next block (bf16, row stride ld) are requested into L2
 * a line per row every AHEAD_SPAN inputs: a block's 48 rows are too many streams for the hardware
 * prefetcher, and widening them would otherwise wait on memory between the blocks' products. */
EXPERTS_INLINE void row_tile(const int NV, const int J, const float *a, const float *wide, int64_t n, int first,
                             int last, float *carried, float *out, int64_t ldo, int64_t live, const uint16_t *ahead,
                             int64_t ld) {
    vf acc[12][2];
    for (int i = 0; i < J; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = first ? vf_zero() : vf_load(carried + i * GROUP_TOKENS + v * VF_LANES);
    for (int64_t c = 0; c < n; c += AHEAD_SPAN) {
        if (ahead != NULL)
            for (int i = 0; i < J; i++) _mm_prefetch((const char *)(ahead + i * ld + c), _MM_HINT_T1);
        vf_outer_tile(NV, J, a + c * GROUP_TOKENS, GROUP_TOKENS, wide + c, n, n - c < AHEAD_SPAN ? n - c : AHEAD_SPAN,
                      acc);
    }
    for (int i = 0; i < J; i++) {
        float lanes[GROUP_TOKENS];
        float *dst = last ? lanes : carried + i * GROUP_TOKENS;
        for (int v = 0; v < NV; v++) vf_store(dst + v * VF_LANES, acc[i][v]);
        if (last)
            for (int64_t t = 0; t < live; t++) out[t * ldo + i] = lanes[t];
    }
}

/* All `rows` rows of a widened block against one group: J rows at a time, then 4, 2, 1. */
EXPERTS_INLINE void group_rows(const int NV, const int J, const float *a, const float *wide, int64_t n, int rows,
                               int first, int last, float *carried, float *out, int64_t ldo, int64_t live,
                               const uint16_t *ahead, int64_t ld) {
#define ROW_TILE(j) row_tile(NV, j, a, wide + r * n, n, first, last, carried + r * GROUP_TOKENS, out + r, ldo, live, \
                             ahead == NULL ? NULL : ahead + r * ld, ld)
    int r = 0;
    for (; r + J <= rows; r += J) ROW_TILE(J);
    for (; r + 4 <= rows; r += 4) ROW_TILE(4);
    for (; r + 2 <= rows; r += 2) ROW_TILE(2);
    for (; r < rows; r++) ROW_TILE(1);
#undef ROW_TILE
}

/* out[t * ldo + n] = x_t . w_n in fp32 for the m tokens of xt (transpose_tokens over K inputs) and
 * n < N, w [N, K] bf16 as stored. wide: BLOCK_ROWS_WIDE * BLOCK_INPUTS floats; carried: one group's
 * BLOCK_ROWS_WIDE * GROUP_TOKENS floats per group. */
static void products(const float *xt, int64_t m, int64_t K, const uint16_t *w, int64_t N, float *out, int64_t ldo,
                     float *wide, float *carried) {
    int64_t groups = (m + GROUP_TOKENS - 1) / GROUP_TOKENS;
    for (int64_t n0 = 0; n0 < N; n0 += BLOCK_ROWS_WIDE) {
        int rows = N - n0 < BLOCK_ROWS_WIDE ? (int)(N - n0) : BLOCK_ROWS_WIDE;
        for (int64_t k0 = 0; k0 < K; k0 += BLOCK_INPUTS) {
            int64_t n = K - k0 < BLOCK_INPUTS ? K - k0 : BLOCK_INPUTS;
            int first = k0 == 0, last = k0 + n == K;
            vf_widen_rows(w + n0 * K + k0, K, rows, n, wide);
            /* The next block: the same rows' next inputs, else the next rows' first ones (none after the last). */
            const uint16_t *next = !last ? w + n0 * K + k0 + n : n0 + rows < N ? w + (n0 + rows) * K : NULL;
            for (int64_t g = 0; g < groups; g++) {
                const float *a = xt + (g * K + k0) * GROUP_TOKENS;
                float *c = carried + g * BLOCK_ROWS_WIDE * GROUP_TOKENS;
                float *o = out + g * GROUP_TOKENS * ldo + n0;
                int64_t live = m - g * GROUP_TOKENS < GROUP_TOKENS ? m - g * GROUP_TOKENS : GROUP_TOKENS;
                const uint16_t *ahead = g == 0 ? next : NULL;
                if (live > VF_LANES) group_rows(2, PAIR_ROWS, a, wide, n, rows, first, last, c, o, ldo, live, ahead, K);
                else group_rows(1, SINGLE_ROWS, a, wide, n, rows, first, last, c, o, ldo, live, ahead, K);
            }
        }
    }
}

static int run_experts(const uint16_t *x, int64_t H, const uint16_t *weights, int64_t top_k, int64_t E,
                       const int64_t *start, const int64_t *order, int64_t largest, const projection *gate_up,
                       const projection *down, int64_t I, uint16_t *routed, int amx, int threads) {
    (void)amx;
    int64_t chunk = largest < 1 ? 1 : largest < CHUNK_TOKENS ? largest : CHUNK_TOKENS;
    int64_t groups = (chunk + GROUP_TOKENS - 1) / GROUP_TOKENS, widest = H > I ? H : I;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* A chunk's transposed inputs, gate/up sums, SwiGLU, down sums and the products' blocks. */
        float *xt = malloc(sizeof(float) * (size_t)(groups * GROUP_TOKENS * widest));
        float *sums = malloc(sizeof(float) * (size_t)(chunk * 2 * I));
        uint16_t *act = malloc(sizeof(uint16_t) * (size_t)(chunk * I));
        float *y = malloc(sizeof(float) * (size_t)(chunk * H));
        float *wide = malloc(sizeof(float) * BLOCK_ROWS_WIDE * BLOCK_INPUTS);
        float *carried = malloc(sizeof(float) * (size_t)(groups * BLOCK_ROWS_WIDE * GROUP_TOKENS));
        const uint16_t **rows = malloc(sizeof(uint16_t *) * (size_t)chunk);
        /* An expert's quantized weights, dequantized whole (these products widen blocks of them). */
        int quantized = !projection_in_bf16(gate_up, 2 * I) || !projection_in_bf16(down, H);
        uint16_t *dequantized = quantized ? malloc(sizeof(uint16_t) * (size_t)(3 * I * H)) : NULL;
        int usable = xt && sums && act && y && wide && carried && rows && (dequantized || !quantized);
        failed |= !usable;
#pragma omp for schedule(dynamic, 1)
        for (int64_t e = 0; e < E; e++) {
            int64_t count = start[e + 1] - start[e];
            if (!usable || count == 0) continue;
            const uint16_t *expert_gate_up = expert_matrix(gate_up, e, 2 * I, H, dequantized);
            const uint16_t *expert_down = expert_matrix(down, e, H, I, quantized ? dequantized + 2 * I * H : NULL);
            for (int64_t c0 = 0; c0 < count; c0 += chunk) {
                const int64_t *mine = order + start[e] + c0;
                int64_t m = count - c0 < chunk ? count - c0 : chunk;
                for (int64_t r = 0; r < m; r++) rows[r] = x + (mine[r] / top_k) * H;
                transpose_tokens(rows, m, H, xt);
                products(xt, m, H, expert_gate_up, 2 * I, sums, 2 * I, wide, carried);
                for (int64_t r = 0; r < m; r++) {
                    swiglu_row(sums + r * 2 * I, sums + r * 2 * I + I, I, act + r * I);
                    rows[r] = act + r * I;
                }
                transpose_tokens(rows, m, I, xt);
                products(xt, m, I, expert_down, H, y, H, wide, carried);
                for (int64_t r = 0; r < m; r++) {
                    vf scale = vf_set1(bf16_to_float(weights[mine[r]]));
                    for (int64_t h = 0; h < H; h += VF_LANES)
                        vf_store_bf16_n(routed + mine[r] * H + h,
                                        vf_mul(vf_round_bf16(vf_load_n(y + r * H + h, H - h)), scale), H - h);
                }
            }
        }
        free(xt), free(sums), free(act), free(y), free(wide), free(carried), free(rows), free(dequantized);
    }
    return failed;
}

#endif
