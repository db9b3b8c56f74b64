/* Dot products of a few rows of x with a weight read straight from its stored bytes, shared by the
 * quantized small-row linear layer (small_m_quant.c) and the quantized sparse MoE block
 * (sparse_moe_quant.c): y[m, n] = sum_k x[m, k] * w[n, k], the sum in fp32. Formats (see formats.py):
 *   fp8_block  data e4m3 [N, K], scale [ceil(N/128), ceil(K/128)]   w = fp8 * scale of its block
 *   int8       data int8 [N, K], scale [N, 1]                       w = q * scale of its row
 *   int4       data uint8 [N, ceil(K/2)] (even column low nibble, value + 8),
 *              scale [N, ceil(K/group)]                             w = (nibble - 8) * scale of its group
 *   bf16       data bf16 [N, K], no scale (the MoE's router and shared-expert gate, kept as stored)
 * Scales are fp32 or bf16. An output, in fp32 or bf16, is the fp32 sum plus an optional bias (fp32
 * or bf16), rounded once.
 *
 * Bits. Each output element is one chain of fused multiply-adds over its lanes in K order (the
 * lane holding k is fixed by the layout below), then the lanes summed by one fixed tree. The number
 * of rows M, a row's place among them and the split of weight rows over threads change none of it,
 * so a token's output is bit-identical alone (decode) or beside others (draft verification). Scales
 * cost no multiply per weight: int4 looks its weights up in a 16-entry table of (i - 8) * scale
 * (exactly dequantize()'s fp32 weights; the AVX2 build, without a 16-entry permute, instead starts a
 * group's chain at -8 times x's sum over it and adds x * i, then adds that times the scale into the
 * lane's total), int8 scales the finished sum, fp8 multiplies x by the block scales once per 128
 * weight rows (all rows of a block share them).
 *
 * int4 by pair dot products. Where the caller asks for it (`int4_pairs`: x exact in bf16, groups of
 * a multiple of 64 columns, the AVX-512 BF16 build), int4 weights go through the bf16 pair dot product
 * (vdpbf16ps) instead: nibbles become the bf16 values -8..7 by one word permute, each instruction
 * adds two exact products x * (nibble - 8) into a lane's chain, and a group's sums go into the row's
 * totals times the group's scale (as in the AVX2 build). Half the conversions per weight and two
 * products per lane per instruction: on CPUs that run the instruction at the FMA's rate (AMD Zen 4)
 * it converts twice as many weights a cycle; where it runs at half that rate (Intel's) the table is
 * faster. Other bits than the table's, again fixed whatever the call's size or thread count.
 *
 * Memory. With up to 16 rows of x the work is bound by the weight's bytes: each block of 8 weight
 * rows is read from memory once (the next block requested ahead) and reused from cache for every
 * group of up to 4 rows of x (the groups' accumulators fit the vector registers). x is converted to
 * fp32 once (prepare_row), padded with zeros (so a partial last step of weights, zero-filled past
 * K, adds 0 * 0) and, for int4, reordered so that nibbles need no interleaving.
 *
 * Compiled with AVX-512 (16 lanes; with BF16, or without it as Skylake-SP to Ice Lake have it, which
 * lacks only the pair products: outside them both give the same bits) or with AVX2 + FMA + F16C (8
 * lanes): the 16- and 8-lane builds give different bits from each other, each always the same ones.
 */
#ifndef DOCANALYST_QUANT_DOT_H
#define DOCANALYST_QUANT_DOT_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The shared scalar bf16 conversions (rounding as torch does); the header's AVX-512 helpers go
 * unused in the AVX2 build, where GCC would warn about their ABI. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#include "../bf16_simd.h"
#pragma GCC diagnostic pop

#include "../streaming.h"
#include "formats.h"

/* Weight rows a thread takes at a time (16, or a 16-row sweep, measured slower). */
#define ROW_BLOCK 8
/* Rows of x one pass over the weights takes (the kernels' callers send at most this many). */
#define QUANT_MAX_ROWS 16
#define ALWAYS static inline __attribute__((always_inline))

#if defined(__AVX512F__)
#define LANES 16
/* Tiles: up to X_GROUP rows of x share one pass over a block's weights; a single row takes R_ONE
 * weight rows at a time (independent chains), more rows R_MANY. With 32 registers: 16 accumulators,
 * the group's x and the converted weights. */
#define X_GROUP 4
#define R_ONE 8
#define R_MANY 4
/* A thread's rows in one stretch, each line requesting the next block's into L2 (see TILE_SETUP). */
#define STREAMS 1
#define AHEAD_HINT _MM_HINT_T1
typedef __m512 vec;
ALWAYS vec vzero(void) { return _mm512_setzero_ps(); }
ALWAYS vec vset1(float v) { return _mm512_set1_ps(v); }
ALWAYS vec vload(const float *p) { return _mm512_loadu_ps(p); }
ALWAYS vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
ALWAYS vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }

ALWAYS float hsum(vec v) {
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

/* LANES bytes, zeros past `count`. */
ALWAYS __m128i load_bytes(const uint8_t *p, int64_t count) {
    if (count >= LANES) return _mm_loadu_si128((const __m128i *)p);
    return _mm_maskz_loadu_epi8((__mmask16)((1u << count) - 1), p);
}

ALWAYS vec int8_to_vec(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)); }

/* LANES bf16 weights (zeros past `count`), widened exactly. */
ALWAYS vec load_bf16_vec(const uint8_t *p, int64_t count) {
    __m256i bits = count >= LANES ? _mm256_loadu_si256((const __m256i *)p)
                                  : _mm256_maskz_loadu_epi16((__mmask16)((1u << count) - 1), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

/* e4m3 has no x86 instruction, but its bits shifted into an fp16 are that fp16's bits for value
 * * 2^-8, subnormals included (both formats' subnormals have their smallest exponent's scale), and
 * the F16C conversion to fp32 is exact (and, unlike arithmetic, ignores denormals-are-zero).
 * Sign-extending a byte to 16 bits and shifting left by 7 puts sign, exponent and mantissa in place
 * with the sign copied into the exponent's top bit, which the mask clears: 3 integer ops per 32
 * weights, then the conversions; a table needs a gather (several times slower) or four permutes.
 * The 2^8 is folded into x's copy with the block scales (fp8_scale_x). */
#define FP8_STEP 32
ALWAYS void fp8_to_vecs(__m256i bytes, vec *low, vec *high) {
    __m512i h = _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(bytes), 7), _mm512_set1_epi16((short)0xBFFF));
    *low = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    *high = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}

ALWAYS __m256i load_fp8(const uint8_t *p, int64_t count) {
    if (count >= FP8_STEP) return _mm256_loadu_si256((const __m256i *)p);
    return _mm256_maskz_loadu_epi8((__mmask32)((1u << count) - 1), p);
}

/* NaN bytes (0x7f, 0xff: e4m3's only non-finite) are those whose low 7 bits are all set; `seen`
 * keeps per byte lane the least of ~byte & 0x7f over a row's 64-byte lines, 0 once a NaN passed. */
typedef __m512i nan_seen;
ALWAYS nan_seen nan_none(void) { return _mm512_set1_epi8(0x7f); }
ALWAYS nan_seen nan_update(nan_seen seen, const uint8_t *p, int64_t count) {
    __m512i bytes = count >= 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8((((__mmask64)1 << count) - 1), p);
    return _mm512_min_epu8(seen, _mm512_andnot_si512(bytes, _mm512_set1_epi8(0x7f)));
}
ALWAYS int nan_found(nan_seen seen) { return _mm512_cmpeq_epi8_mask(seen, _mm512_setzero_si512()) != 0; }

/* int4: a group's 16 possible weights, (i - 8) * scale, as a table indexed by nibble. */
typedef vec group_scale;
ALWAYS group_scale int4_group(float scale) {
    return vmul(_mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7), vset1(scale));
}

/* LANES packed bytes -> 2 * LANES weights: even columns (low nibbles) and odd columns (high
 * nibbles), each looked up in the group's table (the permute reads only an index's low 4 bits). */
ALWAYS void int4_to_vecs(__m128i bytes, group_scale table, vec *even, vec *odd) {
    __m512i wide = _mm512_cvtepu8_epi32(bytes);
    *even = _mm512_permutexvar_ps(wide, table);
    *odd = _mm512_permutexvar_ps(_mm512_srli_epi32(wide, 4), table);
}

/* int4_tile's hooks: the weights come scaled, so a row's sums run over all its groups. */
#define INT4_TOTALS
#define INT4_WEIGHTS(bytes, r, even, odd) int4_to_vecs(bytes, table[r], even, odd)
#define INT4_GROUP_START
#define INT4_GROUP_END
#define INT4_SUM(m, r) acc[m][r]

#if defined(__AVX512BF16__)
/* int4 by pair dot products: PAIR_STEP bytes (2 * PAIR_STEP columns) a step. A byte widened to a
 * word indexes the 32-entry table by its low 5 bits, so the table holds -8..7 twice and the low
 * nibble needs no mask; the high nibble is the word shifted right by 4. */
#define INT4_PAIRS 1
#define PAIR_STEP 32
typedef __m512i pair_table;
ALWAYS pair_table int4_pair_table(void) {
    const __m512 values = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    return (__m512i)_mm512_cvtne2ps_pbh(values, values);
}

/* PAIR_STEP packed bytes (zeros past `count`) -> the even columns' and the odd columns' weights. */
ALWAYS void int4_to_pairs(const uint8_t *p, int64_t count, pair_table table, __m512bh *even, __m512bh *odd) {
    __m256i bytes = count >= PAIR_STEP ? _mm256_loadu_si256((const __m256i *)p)
                                       : _mm256_maskz_loadu_epi8((__mmask32)((1ull << count) - 1), p);
    __m512i wide = _mm512_cvtepu8_epi16(bytes);
    *even = (__m512bh)_mm512_permutexvar_epi16(wide, table);
    *odd = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(wide, 4), table);
}
ALWAYS __m512bh load_pairs(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512(p); }
#endif /* AVX-512 without BF16 (Skylake-SP to Ice Lake) builds the rest: the table, F16C, masks */

#else /* AVX2 + FMA + F16C */
#define LANES 8
/* 16 registers: 8 accumulators at most (4 x 2 beat 2 x 4 here: fewer passes over the weights). */
#define X_GROUP 4
#define R_ONE STREAM_CHAINS
#define R_MANY 2
/* streaming.h's walk: a thread's rows in R_ONE stretches, a tile's chains one row of each. */
#define STREAMS R_ONE
#define AHEAD_HINT _MM_HINT_T0
#define AHEAD_BYTES STREAM_AHEAD_BYTES
typedef __m256 vec;
ALWAYS vec vzero(void) { return _mm256_setzero_ps(); }
ALWAYS vec vset1(float v) { return _mm256_set1_ps(v); }
ALWAYS vec vload(const float *p) { return _mm256_loadu_ps(p); }
ALWAYS vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
ALWAYS vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }

ALWAYS float hsum(vec v) {
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

ALWAYS __m128i load_bytes(const uint8_t *p, int64_t count) {
    if (count >= LANES) return _mm_loadl_epi64((const __m128i *)p);
    uint64_t bits = 0;
    memcpy(&bits, p, (size_t)count);
    return _mm_cvtsi64_si128((long long)bits);
}

ALWAYS vec int8_to_vec(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)); }

ALWAYS vec load_bf16_vec(const uint8_t *p, int64_t count) {
    __m128i bits;
    if (count >= LANES) {
        bits = _mm_loadu_si128((const __m128i *)p);
    } else {
        uint16_t padded[LANES] = { 0 };
        memcpy(padded, p, (size_t)count * 2);
        bits = _mm_loadu_si128((const __m128i *)padded);
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

/* As the AVX-512 build: e4m3 bits shifted into fp16 ones (value * 2^-8), then F16C. */
#define FP8_STEP 16
ALWAYS void fp8_to_vecs(__m128i bytes, vec *low, vec *high) {
    __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7), _mm256_set1_epi16((short)0xBFFF));
    *low = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *high = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

ALWAYS __m128i load_fp8(const uint8_t *p, int64_t count) {
    if (count >= FP8_STEP) return _mm_loadu_si128((const __m128i *)p);
    uint8_t bytes[16] = { 0 };
    memcpy(bytes, p, (size_t)count);
    return _mm_loadu_si128((const __m128i *)bytes);
}

typedef __m256i nan_seen;
ALWAYS nan_seen nan_none(void) { return _mm256_set1_epi8(0x7f); }
ALWAYS nan_seen nan_update(nan_seen seen, const uint8_t *p, int64_t count) {
    const __m256i low7 = _mm256_set1_epi8(0x7f);
    for (int64_t i = 0; i < 64 && i < count; i += 32) {
        __m256i bytes;
        if (count - i >= 32) {
            bytes = _mm256_loadu_si256((const __m256i *)(p + i));
        } else {
            uint8_t tail[32] = { 0 };
            memcpy(tail, p + i, (size_t)(count - i));
            bytes = _mm256_loadu_si256((const __m256i *)tail);
        }
        seen = _mm256_min_epu8(seen, _mm256_andnot_si256(bytes, low7));
    }
    return seen;
}
ALWAYS int nan_found(nan_seen seen) {
    return _mm256_movemask_epi8(_mm256_cmpeq_epi8(seen, _mm256_setzero_si256())) != 0;
}

typedef vec group_scale;
ALWAYS group_scale int4_group(float scale) { return vset1(scale); }

/* LANES packed bytes -> 2 * LANES nibbles (0..15, exact in fp32): even columns, then odd ones. */
ALWAYS void int4_to_vecs(__m128i bytes, vec *even, vec *odd) {
    __m256i wide = _mm256_cvtepu8_epi32(bytes);
    *even = _mm256_cvtepi32_ps(_mm256_and_si256(wide, _mm256_set1_epi32(15)));
    *odd = _mm256_cvtepi32_ps(_mm256_srli_epi32(wide, 4));
}

/* int4_tile's hooks: a group's chains start from -8 times x's own sums over the group (int4_sum_x,
 * lane by lane) and run over x * nibble, giving sum x * (nibble - 8) without a subtraction per
 * weight; they then go into the row's totals times the group's scale, one multiply-add per group
 * instead of a multiply per weight. */
#define INT4_X_SUMS 1
#define INT4_TOTALS                                                                             \
    vec total[X_GROUP][ROW_BLOCK];                                                              \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                         \
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) total[m][r] = vzero();
#define INT4_WEIGHTS(bytes, r, even, odd) int4_to_vecs(bytes, even, odd)
#define INT4_GROUP_START                                                                        \
    _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) {                                      \
        vec start = vload(p->x_sums[m0 + m] + g * LANES);                                       \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[m][r] = start;                  \
    }
#define INT4_GROUP_END                                                                          \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                         \
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) total[m][r] = vfma(acc[m][r], table[r], total[m][r]);
#define INT4_SUM(m, r) total[m][r]
#endif

/* Elements of x per chunk of its prepared copy: int4 reads LANES bytes = 2 * LANES weights a step. */
#define CHUNK (2 * LANES)

/* The length of a prepared row of K elements: whole chunks, at least one (in floats; a row prepared
 * for pair products, 2 * PAIR_STEP bf16 columns a step, fits it too). */
static inline int64_t prepared_width(int64_t K) { return K > 0 ? (K + CHUNK - 1) / CHUNK * CHUNK : CHUNK; }

/* Element `index` of an fp32 or bf16 array. */
static inline float value_at(const void *values, int64_t index, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)values)[index]) : ((const float *)values)[index];
}

/* One row of x [K] (fp32 or bf16) as the weight's `format` reads it, into `out` [ldx]: fp32, zero
 * past K; for int4 each CHUNK holds its even columns, then its odd ones. */
static void prepare_row(const void *x, int x_bf16, int64_t K, int format, float *out, int64_t ldx) {
    if (format != FORMAT_INT4) {
        for (int64_t k = 0; k < K; k++) out[k] = value_at(x, k, x_bf16);
        for (int64_t k = K; k < ldx; k++) out[k] = 0.0f;
        return;
    }
    for (int64_t c = 0; c < ldx; c += CHUNK)
        for (int i = 0; i < LANES; i++) {
            int64_t k = c + 2 * i;
            out[c + i] = k < K ? value_at(x, k, x_bf16) : 0.0f;
            out[c + LANES + i] = k + 1 < K ? value_at(x, k + 1, x_bf16) : 0.0f;
        }
}

#ifdef INT4_PAIRS
/* One row of x [K] (fp32 values exact in bf16, or bf16) for int4 pair products, into `out` [ldx
 * floats] as bf16 words: each 2 * PAIR_STEP columns' even columns, then their odd ones, zero past K. */
static void prepare_pairs(const void *x, int x_bf16, int64_t K, float *out, int64_t ldx) {
    uint16_t *words = (uint16_t *)out;
    for (int64_t c = 0; c < 2 * ldx; c += 2 * PAIR_STEP)
        for (int i = 0; i < PAIR_STEP; i++) {
            int64_t k = c + 2 * i;
            words[c + i] = k < K ? float_to_bf16(value_at(x, k, x_bf16)) : 0;
            words[c + PAIR_STEP + i] = k + 1 < K ? float_to_bf16(value_at(x, k + 1, x_bf16)) : 0;
        }
}
#endif

/* Whether a product over `format` with this int4 `group` takes pair products when asked to. */
static inline int takes_pairs(int format, int64_t group) {
#ifdef INT4_PAIRS
    return format == FORMAT_INT4 && group % (2 * PAIR_STEP) == 0;
#else
    (void)format, (void)group;
    return 0;
#endif
}

/* x prepared for `format`, as pair products want it when `pairs`. */
static inline void prepare_for(const void *x, int x_bf16, int64_t K, int format, int pairs, float *out, int64_t ldx) {
#ifdef INT4_PAIRS
    if (pairs) {
        prepare_pairs(x, x_bf16, K, out, ldx);
        return;
    }
#endif
    (void)pairs;
    prepare_row(x, x_bf16, K, format, out, ldx);
}

/* One product: M <= QUANT_MAX_ROWS rows of prepared x times a weight [N, K], into M output rows. */
typedef struct {
    int format;
    const float *const *x; /* M rows prepared by prepare_row for `format`, ldx elements each */
    int64_t ldx, M, K, N;
    const uint8_t *w;      /* [N, ldw] bytes */
    int64_t ldw;
    const void *scale;
    int scale_bf16;
    int64_t lds;           /* scale row stride in elements */
    int64_t group;         /* int4 group along K */
    const void *bias;      /* [N] or NULL */
    int bias_bf16;
    void *const *y;        /* M output rows of N elements */
    int y_bf16;
    int pairs;             /* int4 by pair products, x prepared by prepare_pairs (takes_pairs) */
    const float *const *x_sums; /* set by run_blocks where int4_tile needs them (int4_sum_x) */
    /* Set by run_blocks: the weight rows [first, end) it runs, as `streams` stretches of `stretch`
     * rows, tiles going through them in "walk" order: walk position v (from first) is row
     * first + (v % streams) * stretch + v / streams, positions to walk_end (past `end`: no row).
     * One stretch is the rows in order. `ahead`: rows between a row and the one its lines request. */
    int64_t first, end, stretch, walk_end, ahead;
    int streams;
} problem;

/* The weight row at walk position v, or -1 where it has none. */
static inline int64_t walk_row(const problem *p, int64_t v) {
    return stretch_row(p->first, p->end, p->stretch, (v - p->first) % p->streams, (v - p->first) / p->streams);
}

/* y[m][n] = sum + bias[n], rounded to y's dtype. */
static inline void put(const problem *p, int64_t m, int64_t n, float sum) {
    if (p->bias != NULL) sum += value_at(p->bias, n, p->bias_bf16);
    if (p->y_bf16) ((uint16_t *)p->y[m])[n] = float_to_bf16(sum);
    else ((float *)p->y[m])[n] = sum;
}

/* x rows m0 .. m0 + MB - 1 (of the rows `x`) times the weight rows at walk positions n0 .. n0 + R - 1;
 * a position without a row computes the walk's last row again, not stored (`kept`).
 *
 * The weight streams from memory once: each 64-byte line of a row requests the same line of the row
 * `ahead` further on (the row itself past the end), as AHEAD_HINT says: rows of a few KB are too
 * short for the hardware prefetcher to ramp up. One request per line: more cost more than they
 * bring. */
#define TILE_SETUP                                                                              \
    const float *xs[X_GROUP];                                                                   \
    const uint8_t *wr[ROW_BLOCK], *ahead[ROW_BLOCK];                                            \
    int64_t rows[ROW_BLOCK];                                                                    \
    int kept[ROW_BLOCK];                                                                        \
    vec acc[X_GROUP][ROW_BLOCK];                                                                \
    _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) xs[m] = x[m0 + m];                     \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                       \
        rows[r] = walk_row(p, n0 + r);                                                          \
        kept[r] = rows[r] >= 0;                                                                 \
        if (!kept[r]) rows[r] = p->end - 1;                                                     \
        wr[r] = p->w + rows[r] * p->ldw;                                                        \
        ahead[r] = rows[r] + p->ahead < p->N ? wr[r] + p->ahead * p->ldw : wr[r];               \
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) acc[m][r] = vzero();               \
    }
#define PREFETCH(r, offset) _mm_prefetch((const char *)(ahead[r] + (offset)), AHEAD_HINT)

/* One step of every row of the tile at byte k (count bytes left in a row): the step's x is loaded
 * once for all R weight rows. */
#define FP8_STEP_TILE(k, count)                                                                 \
    {                                                                                           \
        vec xl[X_GROUP], xh[X_GROUP];                                                           \
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) {                                  \
            xl[m] = vload(xs[m] + (k));                                                         \
            xh[m] = vload(xs[m] + (k) + LANES);                                                 \
        }                                                                                       \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                   \
            vec low, high;                                                                      \
            fp8_to_vecs(load_fp8(wr[r] + (k), count), &low, &high);                             \
            _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) {                              \
                acc[m][r] = vfma(xl[m], low, acc[m][r]);                                        \
                acc[m][r] = vfma(xh[m], high, acc[m][r]);                                       \
            }                                                                                   \
        }                                                                                       \
    }

/* x here already carries the block scales (fp8_scale_x), so the weights are used as converted. With
 * CHECK (the first pass over a block), NaN weights are looked for, a line at a time. */
ALWAYS void fp8_tile(const problem *p, const float *const *x, int64_t m0, const int MB, int64_t n0, const int R,
                     const int CHECK, int *nan) {
    TILE_SETUP
    nan_seen seen[ROW_BLOCK];
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) seen[r] = nan_none();
    int64_t k = 0;
    for (; k + 64 <= p->K; k += 64) {
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
            PREFETCH(r, k);
            if (CHECK) seen[r] = nan_update(seen[r], wr[r] + k, 64);
        }
        _Pragma("GCC unroll 4") for (int step = 0; step < 64; step += FP8_STEP) FP8_STEP_TILE(k + step, FP8_STEP)
    }
    if (k < p->K) {
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
            if (CHECK) seen[r] = nan_update(seen[r], wr[r] + k, p->K - k);
        for (; k < p->K; k += FP8_STEP) FP8_STEP_TILE(k, p->K - k)
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
        if (!kept[r]) continue;
        if (CHECK) nan[r] = nan_found(seen[r]);
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++)
            put(p, m0 + m, rows[r], nan[r] ? NAN : hsum(acc[m][r]));
    }
}

#define INT8_STEP_TILE(k, count)                                                                \
    {                                                                                           \
        vec xv[X_GROUP];                                                                        \
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) xv[m] = vload(xs[m] + (k));        \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                   \
            vec w = int8_to_vec(load_bytes(wr[r] + (k), count));                                \
            _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) acc[m][r] = vfma(xv[m], w, acc[m][r]); \
        }                                                                                       \
    }

ALWAYS void int8_tile(const problem *p, const float *const *x, int64_t m0, const int MB, int64_t n0, const int R,
                      const int CHECK, int *nan) {
    (void)CHECK, (void)nan;
    TILE_SETUP
    int64_t k = 0;
    for (; k + 64 <= p->K; k += 64) {
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) PREFETCH(r, k);
        _Pragma("GCC unroll 8") for (int step = 0; step < 64; step += LANES) INT8_STEP_TILE(k + step, LANES)
    }
    for (; k < p->K; k += LANES) INT8_STEP_TILE(k, p->K - k)
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
        if (!kept[r]) continue;
        float scale = value_at(p->scale, rows[r] * p->lds, p->scale_bf16);
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) put(p, m0 + m, rows[r], hsum(acc[m][r]) * scale);
    }
}

/* bf16 weights: element k at byte 2k, LANES a step, a 64-byte line every 32 elements. */
#define BF16_STEP_TILE(k, count)                                                                \
    {                                                                                           \
        vec xv[X_GROUP];                                                                        \
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) xv[m] = vload(xs[m] + (k));        \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                   \
            vec w = load_bf16_vec(wr[r] + 2 * (k), count);                                      \
            _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) acc[m][r] = vfma(xv[m], w, acc[m][r]); \
        }                                                                                       \
    }

ALWAYS void bf16_tile(const problem *p, const float *const *x, int64_t m0, const int MB, int64_t n0, const int R,
                      const int CHECK, int *nan) {
    (void)CHECK, (void)nan;
    TILE_SETUP
    int64_t k = 0;
    for (; k + 32 <= p->K; k += 32) {
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) PREFETCH(r, 2 * k);
        _Pragma("GCC unroll 4") for (int step = 0; step < 32; step += LANES) BF16_STEP_TILE(k + step, LANES)
    }
    for (; k < p->K; k += LANES) BF16_STEP_TILE(k, p->K - k)
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
        if (!kept[r]) continue;
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) put(p, m0 + m, rows[r], hsum(acc[m][r]));
    }
}

/* Byte b holds columns 2b and 2b + 1; the prepared x has a chunk's even columns, then its odd ones. */
#define INT4_STEP_TILE(b, count)                                                                \
    {                                                                                           \
        vec xe[X_GROUP], xo[X_GROUP];                                                           \
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) {                                  \
            xe[m] = vload(xs[m] + 2 * (b));                                                     \
            xo[m] = vload(xs[m] + 2 * (b) + LANES);                                             \
        }                                                                                       \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                   \
            vec even, odd;                                                                      \
            INT4_WEIGHTS(load_bytes(wr[r] + (b), count), r, &even, &odd);                         \
            _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) {                              \
                acc[m][r] = vfma(xe[m], even, acc[m][r]);                                       \
                acc[m][r] = vfma(xo[m], odd, acc[m][r]);                                        \
            }                                                                                   \
        }                                                                                       \
    }

/* The group must be a multiple of CHUNK, so a step's LANES bytes never straddle two groups. */
ALWAYS void int4_tile(const problem *p, const float *const *x, int64_t m0, const int MB, int64_t n0, const int R,
                      const int CHECK, int *nan) {
    (void)CHECK, (void)nan;
    TILE_SETUP
    INT4_TOTALS
    for (int64_t k0 = 0, g = 0; k0 < p->K; k0 += p->group, g++) {
        int64_t end = k0 + p->group < p->K ? k0 + p->group : p->K;
        int64_t first = k0 / 2, byte_end = (end + 1) / 2;
        group_scale table[ROW_BLOCK];
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
            table[r] = int4_group(value_at(p->scale, rows[r] * p->lds + g, p->scale_bf16));
            PREFETCH(r, first);
            /* Groups of up to 128 columns fit a line; larger ones take the rest here. */
            for (int64_t line = first + 64; line < byte_end; line += 64) PREFETCH(r, line);
        }
        INT4_GROUP_START
        int64_t b = first;
        for (; b + LANES <= byte_end; b += LANES) INT4_STEP_TILE(b, LANES)
        if (b < byte_end) INT4_STEP_TILE(b, byte_end - b)
        INT4_GROUP_END
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
        if (!kept[r]) continue;
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) put(p, m0 + m, rows[r], hsum(INT4_SUM(m, r)));
    }
}

#ifdef INT4_PAIRS
/* Byte b holds columns 2b and 2b + 1; x's step is its even columns' bf16, then its odd ones'. */
#define INT4_PAIR_STEP_TILE(b, count)                                                           \
    {                                                                                           \
        __m512bh xe[X_GROUP], xo[X_GROUP];                                                      \
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) {                                  \
            xe[m] = load_pairs((const uint16_t *)xs[m] + 2 * (b));                              \
            xo[m] = load_pairs((const uint16_t *)xs[m] + 2 * (b) + PAIR_STEP);                  \
        }                                                                                       \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                   \
            __m512bh even, odd;                                                                 \
            int4_to_pairs(wr[r] + (b), count, table, &even, &odd);                              \
            _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) {                              \
                acc[m][r] = _mm512_dpbf16_ps(acc[m][r], even, xe[m]);                          \
                acc[m][r] = _mm512_dpbf16_ps(acc[m][r], odd, xo[m]);                            \
            }                                                                                   \
        }                                                                                       \
    }

/* The group is a multiple of 2 * PAIR_STEP columns (takes_pairs), so steps never straddle two. */
ALWAYS void int4_pairs_tile(const problem *p, const float *const *x, int64_t m0, const int MB, int64_t n0,
                            const int R, const int CHECK, int *nan) {
    (void)CHECK, (void)nan;
    TILE_SETUP
    const pair_table table = int4_pair_table();
    vec total[X_GROUP][ROW_BLOCK];
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) total[m][r] = vzero();
    for (int64_t k0 = 0, g = 0; k0 < p->K; k0 += p->group, g++) {
        int64_t end = k0 + p->group < p->K ? k0 + p->group : p->K;
        int64_t first = k0 / 2, byte_end = (end + 1) / 2;
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
            for (int64_t line = first; line < byte_end; line += 64) PREFETCH(r, line);
        int64_t b = first;
        for (; b + PAIR_STEP <= byte_end; b += PAIR_STEP) INT4_PAIR_STEP_TILE(b, PAIR_STEP)
        if (b < byte_end) INT4_PAIR_STEP_TILE(b, byte_end - b)
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
            vec scale = vset1(value_at(p->scale, rows[r] * p->lds + g, p->scale_bf16));
            _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) {
                total[m][r] = vfma(acc[m][r], scale, total[m][r]);
                acc[m][r] = vzero();
            }
        }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
        if (!kept[r]) continue;
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; m++) put(p, m0 + m, rows[r], hsum(total[m][r]));
    }
}
/* Accumulators and totals for 4 x 4 tiles would overflow the registers. */
#define R_MANY_PAIRS 2
#endif

/* One block of ROW_BLOCK walk positions for all rows of x, in groups of up to X_GROUP rows, each in
 * tiles of R_ONE or R_MANY weight rows. Which tile a row goes through changes no bits. */
#define RUN_TILES(tile, mb, r, check)                                                           \
    for (int sub = 0; sub < ROW_BLOCK && n0 + sub < p->walk_end; sub += (r))                    \
        tile(p, x, m0, mb, n0 + sub, r, check, nan + sub);
/* Every group size up to X_GROUP (at most 8) has its own case: a tile's MB is a constant. */
#define GROUP_CASE(tile, mb, many, check)                                                       \
    case mb: if ((mb) <= X_GROUP) { RUN_TILES(tile, (mb) <= X_GROUP ? (mb) : 1, many, check) } break;
#define RUN_GROUP(tile, many, check)                                                            \
    switch (p->M - m0 < X_GROUP ? p->M - m0 : X_GROUP) {                                        \
    case 1: RUN_TILES(tile, 1, R_ONE, check) break;                                             \
    GROUP_CASE(tile, 2, many, check) GROUP_CASE(tile, 3, many, check)                           \
    GROUP_CASE(tile, 4, many, check) GROUP_CASE(tile, 5, many, check)                           \
    GROUP_CASE(tile, 6, many, check) GROUP_CASE(tile, 7, many, check)                           \
    GROUP_CASE(tile, 8, many, check)                                                            \
    }
/* `many`: weight rows a tile takes for more than one row of x. */
#define RUN_BLOCK_OF(tile, many)                                                                \
    for (int64_t m0 = 0; m0 < p->M; m0 += X_GROUP) {                                            \
        if (m0 == 0) { RUN_GROUP(tile, many, 1) } else { RUN_GROUP(tile, many, 0) }             \
    }
#define RUN_BLOCK(tile) RUN_BLOCK_OF(tile, R_MANY)

/* fp8: x times the block scales of the 128-row band `band` (and 2^8, see fp8_to_vecs), into the
 * rows `scaled` (zero past K, as prepared rows are). Every row of a ROW_BLOCK lies in one band, so
 * each weight is used as converted; a product is (x * scale) * fp8, two roundings as in
 * x * (fp8 * scale), in the other order. */
static void fp8_scale_x(const problem *p, int64_t band, float *const *scaled) {
    for (int64_t k0 = 0; k0 < p->K; k0 += FP8_BLOCK) {
        float scale = value_at(p->scale, band * p->lds + k0 / FP8_BLOCK, p->scale_bf16) * 256.0f;
        int64_t end = k0 + FP8_BLOCK < p->K ? k0 + FP8_BLOCK : p->K;
        for (int64_t m = 0; m < p->M; m++)
            for (int64_t k = k0; k < end; k++) scaled[m][k] = p->x[m][k] * scale;
    }
    for (int64_t m = 0; m < p->M; m++)
        for (int64_t k = p->K; k < p->ldx; k++) scaled[m][k] = 0.0f;
}

#ifdef INT4_X_SUMS
/* -8 times each row of x's sums over every int4 group, lane by lane in the order int4_tile's steps meet
 * the columns: sums[m][g * LANES + lane], at most ldx / 2 floats a row (a group spans whole chunks). */
static void int4_sum_x(const problem *p, float *const *sums) {
    for (int64_t m = 0; m < p->M; m++)
        for (int64_t k0 = 0, g = 0; k0 < p->K; k0 += p->group, g++) {
            int64_t end = k0 + p->group < p->K ? k0 + p->group : p->K;
            vec sum = vzero();
            for (int64_t b = k0 / 2; b < (end + 1) / 2; b += LANES)
                sum = _mm256_add_ps(_mm256_add_ps(sum, vload(p->x[m] + 2 * b)), vload(p->x[m] + 2 * b + LANES));
            _mm256_storeu_ps(sums[m] + g * LANES, vmul(vset1(-8.0f), sum));
        }
}
#endif

/* Whether run_blocks needs `scratch`: fp8's copy of x times the block scales, the AVX2 build's int4
 * sums of x. */
static inline int needs_scratch(const problem *p) {
#ifdef INT4_X_SUMS
    if (p->format == FORMAT_INT4 && !p->pairs) return 1;
#endif
    return p->format == FORMAT_FP8_BLOCK;
}

/* Weight rows [first_block, end_block) * ROW_BLOCK of the product, for all its rows of x; `scratch`
 * QUANT_MAX_ROWS * ldx floats where needs_scratch (else ignored). */
static void run_blocks(const problem *given, int64_t first_block, int64_t end_block, float *scratch) {
    problem own = *given;
    const problem *p = &own;
    own.first = first_block * ROW_BLOCK;
    own.end = end_block * ROW_BLOCK < p->N ? end_block * ROW_BLOCK : p->N;
    /* fp8 keeps the rows in order: a block's rows share one band of scales (fp8_scale_x). */
    own.streams = p->format == FORMAT_FP8_BLOCK ? 1 : STREAMS;
    own.stretch = stretch_length(p->first, p->end, p->streams);
    own.walk_end = p->first + p->streams * p->stretch;
    own.ahead = ROW_BLOCK;
#ifdef AHEAD_BYTES
    if (p->streams > 1) own.ahead = p->ldw < AHEAD_BYTES ? AHEAD_BYTES / p->ldw : 1;
#endif
    const float *const *x = p->x;
    float *rows_of_scratch[QUANT_MAX_ROWS];
    int64_t band = -1;
    if (needs_scratch(p))
        for (int64_t m = 0; m < p->M; m++) rows_of_scratch[m] = scratch + m * p->ldx;
    if (p->format == FORMAT_FP8_BLOCK) x = (const float *const *)rows_of_scratch;
#ifdef INT4_X_SUMS
    if (p->format == FORMAT_INT4 && !p->pairs) {
        int4_sum_x(p, rows_of_scratch);
        own.x_sums = (const float *const *)rows_of_scratch;
    }
#endif
    for (int64_t block = first_block; block * ROW_BLOCK < p->walk_end; block++) {
        int64_t n0 = block * ROW_BLOCK;
        /* NaN weights (fp8 only) are found in the first pass and make their outputs NaN, as dequantize's would. */
        int nan[ROW_BLOCK] = { 0 };
        if (p->format == FORMAT_FP8_BLOCK) {
            if (n0 / FP8_BLOCK != band) fp8_scale_x(p, band = n0 / FP8_BLOCK, rows_of_scratch);
            RUN_BLOCK(fp8_tile)
        } else if (p->format == FORMAT_INT8) {
            RUN_BLOCK(int8_tile)
        } else if (p->format == FORMAT_INT4) {
#ifdef INT4_PAIRS
            if (p->pairs) { RUN_BLOCK_OF(int4_pairs_tile, R_MANY_PAIRS) } else
#endif
            { RUN_BLOCK(int4_tile) }
        } else {
            RUN_BLOCK(bf16_tile)
        }
    }
}

/* Blocks of ROW_BLOCK weight rows in a product. */
static inline int64_t row_blocks(const problem *p) { return (p->N + ROW_BLOCK - 1) / ROW_BLOCK; }

#endif
