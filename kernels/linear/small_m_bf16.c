/* bf16 linear layer for a few rows: y[m, n] = round_bf16(sum_k x[m, k] * w[n, k]) (or the fp32 sum).
 *
 * Every output element is one dot product accumulated in fp32 by the same arithmetic whatever the
 * number of rows M, a row's position in the batch or the thread split (which only divides the
 * weight rows), so a token's projection is bit-identical whether computed alone (decode) or beside
 * others (draft verification). Built twice from this file, the Python side running the build the
 * CPU runs; the two give different bits from each other, each always the same ones.
 *
 * AVX-512 BF16: 32-wide bf16 pair products in K order into 16 lanes, then the lanes summed by a
 * fixed tree. Weight rows go in blocks of 16 so one transpose-and-add tree reduces 16 dot products
 * at once.
 *
 * AVX2 + FMA + F16C: weights widened to fp32 (exact) and fused multiply-adds into 8 lanes, see below.
 */
#if defined(__AVX512BF16__)
#include <omp.h>

#include "../bf16_simd.h"

#define BLOCK 16

static inline __m512 dot_block(const uint16_t *x, const uint16_t *w, int64_t ldw, int64_t K, int rows) {
    __m512 acc[BLOCK];
    for (int r = 0; r < BLOCK; r++) acc[r] = _mm512_setzero_ps();
    if (rows == BLOCK) {
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
            for (int r = 0; r < BLOCK; r++) {
                /* The weights stream from memory: request the next block's rows as this one is used,
                 * into L2 (an lm_head ran 20-30% faster than with requests into L1). */
                _mm_prefetch((const char *)(w + (BLOCK + r) * ldw + k), _MM_HINT_T1);
                acc[r] = _mm512_dpbf16_ps(acc[r], xv, (__m512bh)_mm512_loadu_si512(w + r * ldw + k));
            }
        }
        if (k < K) {
            __m512bh xv = load_bf16(x + k, K - k);
            for (int r = 0; r < BLOCK; r++) acc[r] = _mm512_dpbf16_ps(acc[r], xv, load_bf16(w + r * ldw + k, K - k));
        }
    } else {
        for (int64_t k = 0; k < K; k += 32) {
            __m512bh xv = load_bf16(x + k, K - k);
            for (int r = 0; r < rows; r++) acc[r] = _mm512_dpbf16_ps(acc[r], xv, load_bf16(w + r * ldw + k, K - k));
        }
    }
    return reduce16(acc);
}

static void run_blocks(const uint16_t *x, int64_t ldx, int64_t M, const uint16_t *w, int64_t ldw, int64_t N,
                       int64_t K, void *y, int64_t ldy, int fp32_out, int64_t first_block, int64_t end_block) {
    for (int64_t block = first_block; block < end_block; block++) {
        int64_t n0 = block * BLOCK;
        int rows = (int)(N - n0 < BLOCK ? N - n0 : BLOCK);
        __mmask16 keep = (__mmask16)((1u << rows) - 1);
        int64_t m = 0;
        /* Four rows share each weight load where the block is whole; the rest go one by one. */
        for (; rows == BLOCK && m + 4 <= M; m += 4) {
            const uint16_t *xr[4] = { x + m * ldx, x + (m + 1) * ldx, x + (m + 2) * ldx, x + (m + 3) * ldx };
            __m512 sums[4];
            /* The same 16 dot products per row as dot_block, with its exact bits, each weight row read
             * once for the 4 rows. */
            dot_rows4(xr, w + n0 * ldw, ldw, K, 1, sums);
            for (int i = 0; i < 4; i++) {
                if (fp32_out) _mm512_storeu_ps((float *)y + (m + i) * ldy + n0, sums[i]);
                else _mm256_storeu_si256((__m256i *)((uint16_t *)y + (m + i) * ldy + n0), to_bf16(sums[i]));
            }
        }
        for (; m < M; m++) {
            __m512 sums = dot_block(x + m * ldx, w + n0 * ldw, ldw, K, rows);
            if (fp32_out) _mm512_mask_storeu_ps((float *)y + m * ldy + n0, keep, sums);
            else _mm256_mask_storeu_epi16((uint16_t *)y + m * ldy + n0, keep, to_bf16(sums));
        }
    }
}

/* x [M, K] (row stride ldx), w [N, K] (row stride ldw), y [M, N] (row stride ldy), all in elements.
 * Splits the weight rows over up to `threads` OpenMP threads when the matrix is large enough. */
void linear_small_m_bf16(const uint16_t *x, int64_t ldx, int64_t M, const uint16_t *w, int64_t ldw, int64_t N,
                         int64_t K, void *y, int64_t ldy, int fp32_out, int threads) {
    int64_t blocks = (N + BLOCK - 1) / BLOCK;
    if (threads <= 1 || N * K < (1 << 17)) {
        run_blocks(x, ldx, M, w, ldw, N, K, y, ldy, fp32_out, 0, blocks);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        int count = omp_get_num_threads(), index = omp_get_thread_num();
        int64_t per = (blocks + count - 1) / count;
        int64_t first = index * per, end = first + per < blocks ? first + per : blocks;
        if (first < end) run_blocks(x, ldx, M, w, ldw, N, K, y, ldy, fp32_out, first, end);
    }
}

#else /* AVX2 + FMA + F16C */
/* Each output element: for every step of 16 columns in K order, two fused multiply-adds into 8 fp32
 * lanes (the step's widened low and high halves, below), then the lanes summed by simd.h's fixed
 * tree. Which tile an element goes through, and beside which rows, changes none of it.
 *
 * M <= 16 makes this bound by the weight's bytes, each read from memory once, in streaming.h's walk:
 * a thread's weight rows are cut into stretches, and a tile's chains (independent accumulators)
 * take one row of each. Each group of up to X_GROUP rows of x, whose accumulators fit the 16 vector
 * registers, reuses the tile's weights from cache. x is widened to fp32 once per call, in the
 * weights' widened order and padded with zeros past K (a partial last step of weights is
 * zero-filled: it adds 0 * 0). */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "../simd.h"
#include "../streaming.h"
/* The scalar bf16 rounding; the header's AVX-512 helpers go unused here, where GCC would warn
 * about their ABI. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#include "../bf16_simd.h"
#pragma GCC diagnostic pop

/* Columns a step: 16 bf16 (32 bytes) widen into two vectors. */
#define STEP 16
#define X_GROUP 4
/* Chains a tile runs (stretches a thread's rows are cut into): for one row of x, and for groups of 2
 * to X_GROUP rows, which hold STREAMS_MANY accumulators per row. */
#define STREAMS_ONE STREAM_CHAINS
#define STREAMS_MANY 2

/* x [M, K] bf16 -> [M, ldx] fp32 in the weights' split order (simd.h), zeros past K. */
static void prepare_x(const uint16_t *x, int64_t ldx_in, int64_t M, int64_t K, float *out, int64_t ldx) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < ldx; k += STEP) {
            vf low, high;
            vf_widen_split(bf16x16_load_n(x + m * ldx_in + k, K - k), &low, &high);
            vf_store(out + m * ldx + k, low);
            vf_store(out + m * ldx + k + VF_LANES, high);
        }
}

typedef struct {
    const float *x;   /* prepared x [M, ldx] */
    int64_t ldx, M;
    const uint16_t *w;
    int64_t ldw, N, K;
    void *y;
    int64_t ldy;
    int fp32_out;
} problem;

/* One step of the tile at column k (count columns left in a row). */
#define TILE_STEP(k, count)                                                                     \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                                       \
        vf low, high;                                                                           \
        vf_widen_split(bf16x16_load_n(wr[r] + (k), count), &low, &high);                        \
        _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) {                                  \
            acc[m][r] = vf_fma(vf_load(xs[m] + (k)), low, acc[m][r]);                           \
            acc[m][r] = vf_fma(vf_load(xs[m] + (k) + VF_LANES), high, acc[m][r]);               \
        }                                                                                       \
    }

/* x rows m0 .. m0 + MB - 1 times the weight rows `rows[0 .. R - 1]`; a negative entry (a stretch
 * that has run out) computes row rows[0] again and stores nothing. */
VF_INLINE void tile(const problem *p, int64_t m0, const int MB, const int64_t *rows, const int R) {
    const float *xs[X_GROUP];
    const uint16_t *wr[STREAMS_ONE];
    vf acc[X_GROUP][STREAMS_ONE];
    _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) xs[m] = p->x + (m0 + m) * p->ldx;
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
        wr[r] = p->w + (rows[r] < 0 ? rows[0] : rows[r]) * p->ldw;
        _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) acc[m][r] = vf_zero();
    }
    int64_t k = 0;
    for (; k + 2 * STEP <= p->K; k += 2 * STEP) {
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
            _mm_prefetch((const char *)(wr[r] + k) + STREAM_AHEAD_BYTES, _MM_HINT_T0);
        TILE_STEP(k, STEP)
        TILE_STEP(k + STEP, STEP)
    }
    for (; k < p->K; k += STEP) TILE_STEP(k, p->K - k)
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
        if (rows[r] < 0) continue;
        _Pragma("GCC unroll 4") for (int m = 0; m < MB; m++) {
            float sum = vf_hsum(acc[m][r]);
            int64_t at = (m0 + m) * p->ldy + rows[r];
            if (p->fp32_out) ((float *)p->y)[at] = sum;
            else ((uint16_t *)p->y)[at] = float_to_bf16(sum);
        }
    }
}

/* All rows of x times weight rows [first, end), cut into R stretches; a tile's group size and
 * chain count are constants: one case each. */
_Static_assert(X_GROUP == 4 && STREAMS_MANY <= STREAMS_ONE, "one case per group size");
static void run_rows(const problem *p, int64_t first, int64_t end) {
    const int R = p->M == 1 ? STREAMS_ONE : STREAMS_MANY;
    int64_t stretch = stretch_length(first, end, R);
    for (int64_t i = 0; i < stretch; i++) {
        /* Stretch 0 is never shorter than the others, so rows[0] always exists. */
        int64_t rows[STREAMS_ONE];
        for (int r = 0; r < R; r++) rows[r] = stretch_row(first, end, stretch, r, i);
        for (int64_t m0 = 0; m0 < p->M; m0 += X_GROUP) {
            switch (p->M - m0 < X_GROUP ? p->M - m0 : X_GROUP) {
            case 1:
                if (R == STREAMS_ONE) tile(p, m0, 1, rows, STREAMS_ONE);
                else tile(p, m0, 1, rows, STREAMS_MANY);
                break;
            case 2: tile(p, m0, 2, rows, STREAMS_MANY); break;
            case 3: tile(p, m0, 3, rows, STREAMS_MANY); break;
            default: tile(p, m0, 4, rows, STREAMS_MANY); break;
            }
        }
    }
}

/* x [M, K] (row stride ldx), w [N, K] (row stride ldw), y [M, N] (row stride ldy), all in elements.
 * Splits the weight rows over up to `threads` OpenMP threads when the matrix is large enough. */
void linear_small_m_bf16(const uint16_t *x, int64_t ldx, int64_t M, const uint16_t *w, int64_t ldw, int64_t N,
                         int64_t K, void *y, int64_t ldy, int fp32_out, int threads) {
    int64_t padded = (K + STEP - 1) / STEP * STEP;
    /* A multiple of the alignment, as aligned_alloc requires, and never 0. */
    float *prepared = aligned_alloc(32, sizeof(float) * (size_t)(M * padded + STEP));
    if (prepared == NULL) {
        /* No memory for x's copy: NaN outputs rather than numbers that look right. */
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) {
                if (fp32_out) ((float *)y)[m * ldy + n] = NAN;
                else ((uint16_t *)y)[m * ldy + n] = float_to_bf16(NAN);
            }
        return;
    }
    prepare_x(x, ldx, M, K, prepared, padded);
    problem p = { prepared, padded, M, w, ldw, N, K, y, ldy, fp32_out };
    if (threads <= 1 || N * K < (1 << 17)) {
        run_rows(&p, 0, N);
    } else {
#pragma omp parallel num_threads(threads)
        {
            int count = omp_get_num_threads(), index = omp_get_thread_num();
            int64_t per = (N + count - 1) / count;
            int64_t first = index * per, end = first + per < N ? first + per : N;
            if (first < end) run_rows(&p, first, end);
        }
    }
    free(prepared);
}
#endif
