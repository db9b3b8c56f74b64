/* Chunked gated delta rule over bf16 q, k, v with fp32 gates, state and arithmetic: the same
 * WY / UT-transform form as chunk.py, computed head by head with the chunk's matrices in cache.
 *
 * For a chunk of n tokens (zero-padded to a multiple of 16: a padded token has g = 0 and beta = 0,
 * so it neither decays nor writes the state), gamma the inclusive cumulative log-decay from the
 * chunk start and D[i][j] = exp(gamma_i - gamma_j) for j <= i:
 *
 *   A[i][j] = beta_i D[i][j] k_i.k_j (j < i),  X = (I + A)^-1 [beta V | beta exp(gamma) K]
 *   U = W - Kc S                 (W, Kc the two halves of X)
 *   O = exp(gamma) Q S + (D * Q K^T) U          (j <= i)
 *   S = exp(gamma_last) S + (exp(gamma_last - gamma) K)^T U
 *
 * q and k are L2-normalised per token (eps inside the square root) and q scaled after, as in
 * utils.prepare_qk. Heads are independent and shared out over OpenMP threads; each head's chunks
 * run in order on one thread, so the bits do not depend on the thread count.
 *
 * Built three times: with AVX-512 (with BF16, or without it as Skylake-SP to Ice Lake have it: the
 * same code, which needs none) and with AVX2 + FMA + F16C. The vector steps (products, decay masks,
 * forward substitution, norms, bf16 stores) have a version per vector width; the AVX-512 and AVX2
 * builds give different bits from each other (lane count, exp), each always the same ones.
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

#define L2NORM_EPS 1e-6f
/* Chunks are padded to a multiple of this many tokens: whole 16-lane masks in the decay step. */
#define TOKEN_PADDING 16

typedef struct {
    float *q, *k, *kt, *kdt;  /* q (decayed, scaled) [C][K]; k [C][K]; k^T and decayed k^T [K][C] */
    float *gram, *qk;         /* [C][C] */
    float *x, *u, *o;         /* [C][V + K], [C][V], [C][V] */
    float *gamma, *beta;      /* [C] */
} Work;

#include "../simd.h"

#if defined(__AVX512F__) /* no bf16 arithmetic: the builds with and without BF16 share it */

/* C[4 rows][16 * SLICES columns] (+)= sign * A[4 rows][inner] . B[inner][same columns]. */
static inline __attribute__((always_inline)) void gemm_tile(int64_t inner, const float *a, int64_t lda,
                                                           const float *b, int64_t ldb, float *c, int64_t ldc,
                                                           int negate, int accumulate, const int SLICES) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int s = 0; s < SLICES; s++)
            acc[r][s] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * s) : _mm512_setzero_ps();
    for (int64_t k = 0; k < inner; k++) {
        __m512 row[4];
        for (int s = 0; s < SLICES; s++) row[s] = _mm512_loadu_ps(b + k * ldb + 16 * s);
        for (int r = 0; r < 4; r++) {
            __m512 scalar = _mm512_set1_ps(a[r * lda + k]);
            for (int s = 0; s < SLICES; s++)
                acc[r][s] = negate ? _mm512_fnmadd_ps(scalar, row[s], acc[r][s]) : _mm512_fmadd_ps(scalar, row[s], acc[r][s]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int s = 0; s < SLICES; s++) _mm512_storeu_ps(c + r * ldc + 16 * s, acc[r][s]);
}

/* C (+)= sign * A B; rows a multiple of 4, width a multiple of 16, row-major with leading dims. */
static void gemm(int64_t rows, int64_t inner, int64_t width, const float *a, int64_t lda, const float *b,
                 int64_t ldb, float *c, int64_t ldc, int negate, int accumulate) {
    for (int64_t i = 0; i < rows; i += 4) {
        for (int64_t col = 0; col < width; col += 64) {
            const float *ai = a + i * lda, *bc = b + col;
            float *ci = c + i * ldc + col;
            switch ((width - col) >= 64 ? 4 : (int)((width - col) / 16)) {
            case 4: gemm_tile(inner, ai, lda, bc, ldb, ci, ldc, negate, accumulate, 4); break;
            case 3: gemm_tile(inner, ai, lda, bc, ldb, ci, ldc, negate, accumulate, 3); break;
            case 2: gemm_tile(inner, ai, lda, bc, ldb, ci, ldc, negate, accumulate, 2); break;
            default: gemm_tile(inner, ai, lda, bc, ldb, ci, ldc, negate, accumulate, 1); break;
            }
        }
    }
}

/* bf16 -> fp32 with L2 normalisation over `dim` values, then multiplied by `scale`. */
static void load_normalized(const uint16_t *src, int64_t dim, float scale, float *dst) {
    __m512 squares = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
        __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + d))), 16));
        _mm512_storeu_ps(dst + d, x);
        squares = _mm512_fmadd_ps(x, x, squares);
    }
    float inverse = 1.0f / sqrtf(_mm512_reduce_add_ps(squares) + L2NORM_EPS);
    for (int64_t d = 0; d < dim; d++) dst[d] = dst[d] * inverse * scale;
}

/* Decay: gram becomes A (strictly lower), qk becomes D * Q K^T (lower with the diagonal). */
static void apply_decay(Work *w, int64_t C) {
    for (int64_t i = 0; i < C; i++) {
        __m512 gi = _mm512_set1_ps(w->gamma[i]);
        for (int64_t j = 0; j < C; j += 16) {
            __m512 diff = _mm512_min_ps(_mm512_sub_ps(gi, _mm512_loadu_ps(w->gamma + j)), _mm512_setzero_ps());
            __m512 decay = vf_exp(diff);
            __mmask16 below = (__mmask16)(i - j >= 16 ? 0xffff : (i - j <= 0 ? 0 : (1u << (i - j)) - 1));
            __mmask16 upto = (__mmask16)(i - j >= 15 ? 0xffff : (i - j < 0 ? 0 : (1u << (i - j + 1)) - 1));
            __m512 a = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(w->beta[i]), decay), _mm512_loadu_ps(w->gram + i * C + j));
            _mm512_storeu_ps(w->gram + i * C + j, _mm512_maskz_mov_ps(below, a));
            _mm512_storeu_ps(w->qk + i * C + j, _mm512_maskz_mov_ps(upto, _mm512_mul_ps(decay, _mm512_loadu_ps(w->qk + i * C + j))));
        }
    }
}

/* Forward substitution: X_i -= sum_{j < i} A[i][j] X_j, row by row, 8 slices of the row at a
 * time so that 8 independent chains hide the FMA latency. */
static void forward_substitute(Work *w, int64_t n, int64_t C, int64_t X) {
    for (int64_t i = 1; i < n; i++) {
        float *xi = w->x + i * X;
        for (int64_t s0 = 0; s0 < X; s0 += 128) {
            int slices = X - s0 >= 128 ? 8 : (int)((X - s0) / 16);
            __m512 acc[8];
            for (int s = 0; s < slices; s++) acc[s] = _mm512_loadu_ps(xi + s0 + 16 * s);
            for (int64_t j = 0; j < i; j++) {
                __m512 a = _mm512_set1_ps(w->gram[i * C + j]);
                const float *xj = w->x + j * X + s0;
                for (int s = 0; s < slices; s++) acc[s] = _mm512_fnmadd_ps(a, _mm512_loadu_ps(xj + 16 * s), acc[s]);
            }
            for (int s = 0; s < slices; s++) _mm512_storeu_ps(xi + s0 + 16 * s, acc[s]);
        }
    }
}

/* The chunk's n output rows [n][V] rounded to bf16 into out (row stride out_t). */
static void store_outputs(const Work *w, int64_t n, int64_t V, uint16_t *out, int64_t out_t) {
    for (int64_t i = 0; i < n; i++) {
        uint16_t *oi = out + i * out_t;
        for (int64_t d = 0; d < V; d += 16) _mm256_storeu_si256((__m256i *)(oi + d), to_bf16(_mm512_loadu_ps(w->o + i * V + d)));
    }
}

#else /* AVX2 + FMA + F16C */

/* Tile rows: 6 x 16 columns keep 12 accumulators, two rows of B and a broadcast in the 16 vector
 * registers; 4-row tiles take what is left of a multiple of 4 rows. */
#define TILE_ROWS 6
#define TILE_SLICES 2

/* C[ROWS rows][16 columns] (+)= sign * A[ROWS rows][inner] . B[inner][same columns]. */
static inline __attribute__((always_inline)) void gemm_tile(int64_t inner, const float *a, int64_t lda,
                                                           const float *b, int64_t ldb, float *c, int64_t ldc,
                                                           int negate, int accumulate, const int ROWS) {
    vf acc[TILE_ROWS][TILE_SLICES];
    for (int r = 0; r < ROWS; r++)
        for (int s = 0; s < TILE_SLICES; s++)
            acc[r][s] = accumulate ? vf_load(c + r * ldc + VF_LANES * s) : vf_zero();
    for (int64_t k = 0; k < inner; k++) {
        vf row[TILE_SLICES];
        for (int s = 0; s < TILE_SLICES; s++) row[s] = vf_load(b + k * ldb + VF_LANES * s);
        for (int r = 0; r < ROWS; r++) {
            vf scalar = vf_set1(a[r * lda + k]);
            for (int s = 0; s < TILE_SLICES; s++)
                acc[r][s] = negate ? vf_fnma(scalar, row[s], acc[r][s]) : vf_fma(scalar, row[s], acc[r][s]);
        }
    }
    for (int r = 0; r < ROWS; r++)
        for (int s = 0; s < TILE_SLICES; s++) vf_store(c + r * ldc + VF_LANES * s, acc[r][s]);
}

/* C (+)= sign * A B; rows a multiple of 4, width a multiple of 16, row-major with leading dims. */
static inline __attribute__((always_inline)) void gemm(int64_t rows, int64_t inner, int64_t width, const float *a, int64_t lda, const float *b,
                 int64_t ldb, float *c, int64_t ldc, int negate, int accumulate) {
    for (int64_t i = 0; i < rows;) {
        /* 6-row tiles while the rest stays a sum of 6s and 4s (16 = 6 + 4 + 6, 128 = 20 x 6 + 4 + 4). */
        int64_t left = rows - i;
        int tall = left % TILE_ROWS == 0 || left >= 2 * TILE_ROWS;
        for (int64_t col = 0; col < width; col += TILE_SLICES * VF_LANES) {
            const float *ai = a + i * lda, *bc = b + col;
            float *ci = c + i * ldc + col;
            if (tall) gemm_tile(inner, ai, lda, bc, ldb, ci, ldc, negate, accumulate, TILE_ROWS);
            else gemm_tile(inner, ai, lda, bc, ldb, ci, ldc, negate, accumulate, 4);
        }
        i += tall ? TILE_ROWS : 4;
    }
}

/* bf16 -> fp32 with L2 normalisation over `dim` values, then multiplied by `scale`. */
static void load_normalized(const uint16_t *src, int64_t dim, float scale, float *dst) {
    vf squares = vf_zero();
    for (int64_t d = 0; d < dim; d += VF_LANES) {
        vf x = vf_load_bf16(src + d);
        vf_store(dst + d, x);
        squares = vf_fma(x, x, squares);
    }
    float inverse = 1.0f / sqrtf(vf_hsum(squares) + L2NORM_EPS);
    for (int64_t d = 0; d < dim; d++) dst[d] = dst[d] * inverse * scale;
}

/* Decay: gram becomes A (strictly lower), qk becomes D * Q K^T (lower with the diagonal). */
static void apply_decay(Work *w, int64_t C) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t i = 0; i < C; i++) {
        vf gi = vf_set1(w->gamma[i]), bi = vf_set1(w->beta[i]);
        for (int64_t j = 0; j < C; j += VF_LANES) {
            vf decay = vf_exp(vf_min(vf_sub(gi, vf_load(w->gamma + j)), vf_zero()));
            /* Column j + lane is below the diagonal when lane < i - j, on or below when lane <= i - j. */
            __m256i offset = _mm256_set1_epi32((int)(i - j));
            vf below = _mm256_castsi256_ps(_mm256_cmpgt_epi32(offset, lane));
            vf upto = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_add_epi32(offset, _mm256_set1_epi32(1)), lane));
            vf a = vf_mul(vf_mul(bi, decay), vf_load(w->gram + i * C + j));
            vf_store(w->gram + i * C + j, _mm256_and_ps(below, a));
            vf_store(w->qk + i * C + j, _mm256_and_ps(upto, vf_mul(decay, vf_load(w->qk + i * C + j))));
        }
    }
}

/* Forward substitution: X_i -= sum_{j < i} A[i][j] X_j, row by row, 8 slices of the row at a
 * time so that 8 independent chains hide the FMA latency. */
static void forward_substitute(Work *w, int64_t n, int64_t C, int64_t X) {
    for (int64_t i = 1; i < n; i++) {
        float *xi = w->x + i * X;
        for (int64_t s0 = 0; s0 < X; s0 += 8 * VF_LANES) {
            int slices = X - s0 >= 8 * VF_LANES ? 8 : (int)((X - s0) / VF_LANES);
            vf acc[8];
            for (int s = 0; s < slices; s++) acc[s] = vf_load(xi + s0 + VF_LANES * s);
            for (int64_t j = 0; j < i; j++) {
                vf a = vf_set1(w->gram[i * C + j]);
                const float *xj = w->x + j * X + s0;
                for (int s = 0; s < slices; s++) acc[s] = vf_fnma(a, vf_load(xj + VF_LANES * s), acc[s]);
            }
            for (int s = 0; s < slices; s++) vf_store(xi + s0 + VF_LANES * s, acc[s]);
        }
    }
}

/* The chunk's n output rows [n][V] rounded to bf16 into out (row stride out_t). */
static void store_outputs(const Work *w, int64_t n, int64_t V, uint16_t *out, int64_t out_t) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t d = 0; d < V; d += VF_LANES) vf_store_bf16(out + i * out_t + d, vf_load(w->o + i * V + d));
}

#endif

/* One chunk of n tokens (padded to `padded`) of one value head; updates the state [K][V]. */
static void chunk_step(Work *w, const uint16_t *q, const uint16_t *k, int64_t qk_t, const uint16_t *v, int64_t v_t,
                       const float *g, const float *beta, int64_t gb_t, int64_t n, int64_t padded, int64_t K,
                       int64_t V, float scale, float *state, uint16_t *out, int64_t out_t) {
    int64_t C = padded, X = V + K;
    float total = 0.0f;
    /* The rows of the next chunk lie a head's width apart in memory: ask for them now, into L2
     * (this chunk's matrices fill L1). */
    for (int64_t i = n; i < 2 * n; i++) {
        for (int64_t d = 0; d < K; d += 32) {
            _mm_prefetch((const char *)(q + i * qk_t + d), _MM_HINT_T1);
            _mm_prefetch((const char *)(k + i * qk_t + d), _MM_HINT_T1);
        }
        for (int64_t d = 0; d < V; d += 32) _mm_prefetch((const char *)(v + i * v_t + d), _MM_HINT_T1);
    }
    for (int64_t i = 0; i < C; i++) {
        if (i < n) {
            load_normalized(q + i * qk_t, K, scale, w->q + i * K);
            load_normalized(k + i * qk_t, K, 1.0f, w->k + i * K);
            total += g[i * gb_t];
            w->beta[i] = beta[i * gb_t];
            const uint16_t *vi = v + i * v_t;
            for (int64_t d = 0; d < V; d++) w->x[i * X + d] = w->beta[i] * bf16_to_float(vi[d]);
        } else {
            memset(w->q + i * K, 0, sizeof(float) * K);
            memset(w->k + i * K, 0, sizeof(float) * K);
            memset(w->x + i * X, 0, sizeof(float) * V);
            w->beta[i] = 0.0f;
        }
        w->gamma[i] = total;
    }
    float last = w->gamma[C - 1];
    for (int64_t i = 0; i < C; i++) {
        float scaled = w->beta[i] * expf(w->gamma[i]);
        for (int64_t d = 0; d < K; d++) {
            w->x[i * X + V + d] = scaled * w->k[i * K + d];
            w->kt[d * C + i] = w->k[i * K + d];
        }
    }
    gemm(C, K, C, w->k, K, w->kt, C, w->gram, C, 0, 0);
    gemm(C, K, C, w->q, K, w->kt, C, w->qk, C, 0, 0);
    apply_decay(w, C);
    forward_substitute(w, n, C, X);
    /* U = W - Kc S, then O = exp(gamma) Q S + (D * Q K^T) U. */
    for (int64_t i = 0; i < C; i++) memcpy(w->u + i * V, w->x + i * X, sizeof(float) * V);
    gemm(C, K, V, w->x + V, X, state, V, w->u, V, 1, 1);
    for (int64_t i = 0; i < C; i++) {
        float decay = expf(w->gamma[i]);
        for (int64_t d = 0; d < K; d++) w->q[i * K + d] *= decay;
    }
    gemm(C, K, V, w->q, K, state, V, w->o, V, 0, 0);
    gemm(C, C, V, w->qk, C, w->u, V, w->o, V, 0, 1);
    store_outputs(w, n, V, out, out_t);
    /* S = exp(gamma_last) S + (exp(gamma_last - gamma) K)^T U. */
    for (int64_t j = 0; j < C; j++) {
        float decay = expf(last - w->gamma[j]);
        for (int64_t d = 0; d < K; d++) w->kdt[d * C + j] = w->kt[d * C + j] * decay;
    }
    float keep = expf(last);
    for (int64_t e = 0; e < K * V; e++) state[e] *= keep;
    gemm(K, C, V, w->kdt, C, w->u, V, state, V, 0, 1);
}

/* q, k [T, H, K] (strides qk_t, qk_h), v [T, HV, V] (strides v_t, v_h), all bf16; g, beta fp32
 * [T, HV]; state fp32 [HV, K, V], updated in place; out bf16 [T, HV, V] (strides out_t, out_h).
 * K and V multiples of 16, any chunk >= 1 (the work buffers grow with it). Returns 0, or -1 when a work buffer cannot be
 * allocated. */
int gated_delta_chunk_bf16(const uint16_t *q, const uint16_t *k, int64_t qk_t, int64_t qk_h, const uint16_t *v,
                           int64_t v_t, int64_t v_h, const float *g, const float *beta, int64_t T, int64_t H,
                           int64_t HV, int64_t K, int64_t V, float scale, int64_t chunk, float *state,
                           uint16_t *out, int64_t out_t, int64_t out_h, int threads) {
    int64_t group = HV / H;
    int failed = 0;
    if (threads > HV) threads = (int)HV;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t C = (chunk + TOKEN_PADDING - 1) / TOKEN_PADDING * TOKEN_PADDING;
        Work w = {0};
        float *block = malloc(sizeof(float) * (4 * C * K + 2 * C * C + C * (V + K) + 2 * C * V + 2 * C));
        failed |= block == NULL;
        if (block) {
            w.q = block, w.k = w.q + C * K, w.kt = w.k + C * K, w.kdt = w.kt + C * K;
            w.gram = w.kdt + C * K, w.qk = w.gram + C * C;
            w.x = w.qk + C * C, w.u = w.x + C * (V + K), w.o = w.u + C * V;
            w.gamma = w.o + C * V, w.beta = w.gamma + C;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t head = 0; head < HV; head++) {
            if (!block) continue;
            int64_t key_head = head / group;
            for (int64_t start = 0; start < T; start += chunk) {
                int64_t n = T - start < chunk ? T - start : chunk;
                int64_t padded = (n + TOKEN_PADDING - 1) / TOKEN_PADDING * TOKEN_PADDING;
                chunk_step(&w, q + start * qk_t + key_head * qk_h, k + start * qk_t + key_head * qk_h, qk_t,
                           v + start * v_t + head * v_h, v_t, g + start * HV + head, beta + start * HV + head, HV,
                           n, padded, K, V, scale, state + head * K * V, out + start * out_t + head * out_h, out_t);
            }
        }
        free(block);
    }
    return failed ? -1 : 0;
}
