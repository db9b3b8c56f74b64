/* One quantized weight row exactly dequantized into bf16 or fp32, for the CPU builds (AVX-512: 16
 * lanes, AVX2 + FMA + F16C: 8), bit-identical to reference.dequantize(...).to(dtype):
 *
 * out[c] = value(row, column c) * scale of its block / row / group, the product taken in fp32 exactly
 * as reference.dequantize() takes it (value first, so a NaN keeps the value's bits), then, for bf16,
 * rounded as torch's fp32 -> bf16 conversion rounds: to nearest even, every NaN written as 0xFFFF.
 * Where they can, both builds write bf16 several vectors at a time: int4 by table lookup (32
 * columns), fp8 by table lookup under ordinary block scales (32 or 16 columns), int8 under scales
 * whose products are all normal 32 columns at a time through the bf16 conversion instruction
 * (AVX-512) or 16 with integer rounding that needs no NaN case (AVX2). Prefill dequantizes every
 * routed expert of a chunk, so this rate bounds quantized prefill.
 *
 * dequantize_weight_rows() takes a weight as formats.h describes it (one of a stack of experts).
 */
#ifndef DOCANALYST_DEQUANT_ROW_H
#define DOCANALYST_DEQUANT_ROW_H

#include <float.h>
#include <math.h>
#include <string.h>

#include "../simd.h"
#include "formats.h"

/* e4m3: exponent bias 7 against fp32's 127; subnormals are m * 2^-9; 0x7F / 0xFF are NaN, which
 * torch's conversion writes as 0x7FF00000 with the sign. */
#define FP8_BIAS_SHIFT ((127 - 7) << 23)
#define FP8_SUBNORMAL_UNIT (1.0f / 512.0f)
#define FP8_NAN_BITS 0x7FF00000
#define BF16_NAN 0xFFFF

/* One weight value before its scale, in plain C: the fp8 bits as described above. */
static inline float fp8_value(uint8_t byte) {
    uint32_t magnitude = byte & 0x7F, bits;
    if (magnitude == 0x7F) {
        bits = FP8_NAN_BITS;
    } else if (magnitude < 8) {
        float value = (float)magnitude * FP8_SUBNORMAL_UNIT;
        memcpy(&bits, &value, sizeof bits);
    } else {
        bits = (magnitude << 20) + FP8_BIAS_SHIFT;
    }
    bits |= (uint32_t)(byte & 0x80) << 24;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

VF_INLINE float raw_value(int format, const uint8_t *row, int64_t column) {
    if (format == FORMAT_FP8_BLOCK) return fp8_value(row[column]);
    if (format == FORMAT_INT8) return (float)(int8_t)row[column];
    uint8_t pair = row[column / 2];
    return (float)((column % 2 ? pair >> 4 : pair & 0x0F) - 8);
}

#if defined(__AVX512F__)
typedef __m512i vi;
VF_INLINE vi vi_set1(int v) { return _mm512_set1_epi32(v); }
VF_INLINE vi vi_and(vi a, vi b) { return _mm512_and_si512(a, b); }
VF_INLINE vi vi_or(vi a, vi b) { return _mm512_or_si512(a, b); }
VF_INLINE vi vi_add(vi a, vi b) { return _mm512_add_epi32(a, b); }
VF_INLINE vi vi_select(vi when_false, vi when_true, __mmask16 mask) {
    return _mm512_mask_blend_epi32(mask, when_false, when_true);
}
VF_INLINE __mmask16 vi_less(vi a, vi b) { return _mm512_cmplt_epi32_mask(a, b); }
VF_INLINE __mmask16 vi_equal(vi a, vi b) { return _mm512_cmpeq_epi32_mask(a, b); }
typedef __mmask16 vmask;
/* VF_LANES bytes widened to 32-bit lanes, unsigned and signed. */
VF_INLINE vi bytes_u32(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
VF_INLINE vi bytes_i32(const uint8_t *p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
/* VF_LANES / 2 bytes of int4 pairs -> VF_LANES nibbles in column order (low nibble first). */
VF_INLINE vi nibbles_u32(const uint8_t *p) {
    __m128i pairs = _mm_loadl_epi64((const __m128i *)p), low_mask = _mm_set1_epi8(0x0F);
    __m128i low = _mm_and_si128(pairs, low_mask), high = _mm_and_si128(_mm_srli_epi16(pairs, 4), low_mask);
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(low, high));
}
VF_INLINE vf vi_to_vf(vi v) { return _mm512_cvtepi32_ps(v); }
VF_INLINE vf vi_as_vf(vi v) { return _mm512_castsi512_ps(v); }
VF_INLINE vi vf_as_vi(vf v) { return _mm512_castps_si512(v); }
VF_INLINE vi vi_shift_left(vi v, int n) { return _mm512_slli_epi32(v, n); }
/* torch's rounding of fp32 to bf16: to nearest even; NaN -> 0xFFFF. */
VF_INLINE __m256i bf16_bits(vf v) {
    vi bits = vf_as_vi(v);
    vi odd = vi_and(_mm512_srli_epi32(bits, 16), vi_set1(1));
    vi rounded = _mm512_srli_epi32(vi_add(bits, vi_add(odd, vi_set1(0x7FFF))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), vi_set1(BF16_NAN));
    return _mm512_cvtepi32_epi16(rounded);
}
VF_INLINE void store_bf16(uint16_t *p, vf v) { _mm256_storeu_si256((__m256i *)p, bf16_bits(v)); }
#else
typedef __m256i vi;
VF_INLINE vi vi_set1(int v) { return _mm256_set1_epi32(v); }
VF_INLINE vi vi_and(vi a, vi b) { return _mm256_and_si256(a, b); }
VF_INLINE vi vi_or(vi a, vi b) { return _mm256_or_si256(a, b); }
VF_INLINE vi vi_add(vi a, vi b) { return _mm256_add_epi32(a, b); }
typedef __m256i vmask;
VF_INLINE vi vi_select(vi when_false, vi when_true, vmask mask) {
    return _mm256_blendv_epi8(when_false, when_true, mask);
}
VF_INLINE vmask vi_less(vi a, vi b) { return _mm256_cmpgt_epi32(b, a); }
VF_INLINE vmask vi_equal(vi a, vi b) { return _mm256_cmpeq_epi32(a, b); }
VF_INLINE vi bytes_u32(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
VF_INLINE vi bytes_i32(const uint8_t *p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
VF_INLINE vi nibbles_u32(const uint8_t *p) {
    int32_t word;
    memcpy(&word, p, sizeof word);
    __m128i pairs = _mm_cvtsi32_si128(word), low_mask = _mm_set1_epi8(0x0F);
    __m128i low = _mm_and_si128(pairs, low_mask), high = _mm_and_si128(_mm_srli_epi16(pairs, 4), low_mask);
    return _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(low, high));
}
VF_INLINE vf vi_to_vf(vi v) { return _mm256_cvtepi32_ps(v); }
VF_INLINE vf vi_as_vf(vi v) { return _mm256_castsi256_ps(v); }
VF_INLINE vi vf_as_vi(vf v) { return _mm256_castps_si256(v); }
VF_INLINE vi vi_shift_left(vi v, int n) { return _mm256_slli_epi32(v, n); }
VF_INLINE __m128i bf16_bits(vf v) {
    vi bits = vf_as_vi(v);
    vi odd = vi_and(_mm256_srli_epi32(bits, 16), vi_set1(1));
    vi rounded = _mm256_srli_epi32(vi_add(bits, vi_add(odd, vi_set1(0x7FFF))), 16);
    rounded = _mm256_blendv_epi8(rounded, vi_set1(BF16_NAN), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    /* Lanes hold values below 2^16: pack the two halves' 32-bit lanes to 16 bits in order. */
    return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}
VF_INLINE void store_bf16(uint16_t *p, vf v) { _mm_storeu_si128((__m128i *)p, bf16_bits(v)); }
#endif

/* VF_LANES fp8 values from their bytes, the bits of fp8_value() lane by lane. */
VF_INLINE vf fp8_values(const uint8_t *p) {
    vi bytes = bytes_u32(p);
    vi magnitude = vi_and(bytes, vi_set1(0x7F));
    vi normal = vi_add(vi_shift_left(magnitude, 20), vi_set1(FP8_BIAS_SHIFT));
    vi subnormal = vf_as_vi(vf_mul(vi_to_vf(magnitude), vf_set1(FP8_SUBNORMAL_UNIT)));
    vi bits = vi_select(normal, subnormal, vi_less(magnitude, vi_set1(8)));
    bits = vi_select(bits, vi_set1(FP8_NAN_BITS), vi_equal(magnitude, vi_set1(0x7F)));
    return vi_as_vf(vi_or(bits, vi_shift_left(vi_and(bytes, vi_set1(0x80)), 24)));
}

/* VF_LANES raw values from `column` on (even for int4). */
VF_INLINE vf raw_values(int format, const uint8_t *row, int64_t column) {
    if (format == FORMAT_FP8_BLOCK) return fp8_values(row + column);
    if (format == FORMAT_INT8) return vi_to_vf(bytes_i32(row + column));
    return vi_to_vf(vi_add(nibbles_u32(row + column / 2), vi_set1(-8)));
}

/* Whether every product of `scale` and a nonzero int8 value is normal or infinite, and zero times
 * it zero: no denormal, no NaN. */
static inline int int8_products_are_normal(float scale) {
    float magnitude = fabsf(scale);
    return magnitude == 0.0f || (isfinite(magnitude) && magnitude >= FLT_MIN);
}

/* fp8 products by table. A normal e4m3 value is (1 + j/8) * 2^(e - 7) (exponent e 1-15, mantissa
 * j 0-7), so its product with the scale is the product for e = 1, (1 + j/8) * 2^-6 * scale, times
 * 2^(e - 1): exact in fp32, and rounding to bf16 commutes with it while every product is normal and
 * finite, so the rounded product is one of 8 words (indexed by j, computed per scale) with e - 1
 * added to its exponent field. Subnormals (e = 0, j * 2^-9) and zero take 8 more words. The sign is
 * the byte's times the word's; NaN bytes are written as bf16_bits writes NaN. Valid while the words
 * with e - 1 added stay normal and finite: |scale| in [2^-117, 2^100] (products from 2^-9 * 2^-117 =
 * 2^-126 to 448 * 2^100), which real block scales are (~1e-4..1e-2); other scales take the general
 * path. The byte's fields, in 16-bit lanes: j = w & 7, e << 7 = (w << 4) & FP8_EXPONENT_FIELD. */
#define FP8_EXPONENT_FIELD (0xF << 7)
static inline int fp8_products_apply(float scale) {
    float magnitude = fabsf(scale);
    return magnitude >= 0x1p-117f && magnitude <= 0x1p100f;
}
/* The table's values before the scale: the normal ones for e = 1 by j, then the subnormals by j. */
static const float FP8_TABLE_VALUES[16] = {0x1p-6f, 0x1.2p-6f, 0x1.4p-6f, 0x1.6p-6f, 0x1.8p-6f, 0x1.ap-6f, 0x1.cp-6f,
                                           0x1.ep-6f, 0.0f, 0x1p-9f, 0x2p-9f, 0x3p-9f, 0x4p-9f, 0x5p-9f, 0x6p-9f,
                                           0x7p-9f};

/* int4 straight to bf16 by table lookup: a group's 16 possible values, (n - 8) * scale rounded as
 * store_bf16 rounds them (so the same bits), looked up by nibble 32 columns at a time: a few
 * instructions per 32 weights instead of a conversion, product and rounding per 8 or 16. */
#define INT4_TABLE_COLUMNS 32
#if defined(__AVX512F__)
typedef __m512i int4_table; /* the 16 values as words 0-15 */
VF_INLINE int4_table int4_table_of(vf scale) {
    vi nibbles = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_zextsi256_si512(bf16_bits(vf_mul(vi_to_vf(vi_add(nibbles, vi_set1(-8))), scale)));
}
VF_INLINE void int4_bf16_by_table(const uint8_t *pairs, int4_table table, uint16_t *out) {
    vi bytes = bytes_u32(pairs);
    /* 16-bit word 2i: byte i's low nibble (column 2i); word 2i + 1: its high nibble. */
    vi nibbles = vi_and(vi_or(bytes, vi_shift_left(bytes, 12)), vi_set1(0x000F000F));
    _mm512_storeu_si512(out, _mm512_permutexvar_epi16(nibbles, table));
}
/* int8 products rounded 32 at a time by the conversion instruction. It rounds to nearest even as
 * bf16_bits does but reads denormal inputs as zero and keeps a NaN's sign, so it serves only under
 * scales whose products are zero or normal (int8_products_are_normal). */
#define NORMAL_PRODUCT_COLUMNS 32
#if defined(__AVX512BF16__)
VF_INLINE void store_converted(uint16_t *out, vf low, vf high) {
    _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(high, low));
}
#else /* AVX-512 without BF16: store_bf16's rounding (the same bits for these products, never NaN) */
VF_INLINE void store_converted(uint16_t *out, vf low, vf high) { store_bf16(out, low), store_bf16(out + 16, high); }
#endif
VF_INLINE void int8_products_bf16(const uint8_t *bytes, vf scale, uint16_t *out) {
    vf low = vf_mul(vi_to_vf(bytes_i32(bytes)), scale), high = vf_mul(vi_to_vf(bytes_i32(bytes + VF_LANES)), scale);
    store_converted(out, low, high);
}
/* fp8 products by table (above), 32 at a time: words 0-7 of the table are the normal words one
 * exponent step down (adding e's field then gives e - 1 steps up), 8-15 the subnormal ones. */
typedef __m512i fp8_scaling;
VF_INLINE fp8_scaling fp8_scaling_of(vf scale) {
    __m256i words = bf16_bits(vf_mul(_mm512_loadu_ps(FP8_TABLE_VALUES), scale));
    return _mm512_zextsi256_si512(_mm256_sub_epi16(words, _mm256_setr_epi16(128, 128, 128, 128, 128, 128, 128, 128,
                                                                            0, 0, 0, 0, 0, 0, 0, 0)));
}
VF_INLINE void fp8_products_bf16(const uint8_t *bytes, fp8_scaling table, uint16_t *out) {
    __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)bytes));
    __m512i exponent = _mm512_and_si512(_mm512_slli_epi16(words, 4), _mm512_set1_epi16(FP8_EXPONENT_FIELD));
    __m512i index = _mm512_and_si512(words, _mm512_set1_epi16(7));
    index = _mm512_mask_add_epi16(index, _mm512_testn_epi16_mask(words, _mm512_set1_epi16(0x78)), index,
                                  _mm512_set1_epi16(8));
    __m512i values = _mm512_add_epi16(_mm512_permutexvar_epi16(index, table), exponent);
    /* values ^ (word << 8 & 0x8000): the sign. */
    values = _mm512_ternarylogic_epi32(values, _mm512_slli_epi16(words, 8), _mm512_set1_epi16((short)0x8000), 0x78);
    __mmask32 nan = _mm512_cmpeq_epi16_mask(_mm512_and_si512(words, _mm512_set1_epi16(0x7F)), _mm512_set1_epi16(0x7F));
    _mm512_storeu_si512(out, _mm512_mask_mov_epi16(values, nan, _mm512_set1_epi16((short)BF16_NAN)));
}
#else
/* The 16 values' low bytes and high bytes, each in both 128-bit lanes (a byte shuffle looks up 16
 * entries per lane). */
typedef struct {
    __m256i low, high;
} int4_table;
VF_INLINE int4_table int4_table_of(vf scale) {
    vi nibbles = _mm256_setr_epi32(-8, -7, -6, -5, -4, -3, -2, -1);
    __m128i first = bf16_bits(vf_mul(vi_to_vf(nibbles), scale));
    __m128i second = bf16_bits(vf_mul(vi_to_vf(vi_add(nibbles, vi_set1(8))), scale));
    __m128i byte_mask = _mm_set1_epi16(0xFF);
    __m128i low = _mm_packus_epi16(_mm_and_si128(first, byte_mask), _mm_and_si128(second, byte_mask));
    __m128i high = _mm_packus_epi16(_mm_srli_epi16(first, 8), _mm_srli_epi16(second, 8));
    int4_table table = {_mm256_broadcastsi128_si256(low), _mm256_broadcastsi128_si256(high)};
    return table;
}
VF_INLINE void int4_bf16_by_table(const uint8_t *pairs, int4_table table, uint16_t *out) {
    __m128i packed = _mm_loadu_si128((const __m128i *)pairs), mask = _mm_set1_epi8(0x0F);
    __m128i low = _mm_and_si128(packed, mask), high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    /* The 32 nibbles in column order: columns 0-15 in the low lane, 16-31 in the high one. */
    __m256i index = _mm256_set_m128i(_mm_unpackhi_epi8(low, high), _mm_unpacklo_epi8(low, high));
    __m256i low_bytes = _mm256_shuffle_epi8(table.low, index), high_bytes = _mm256_shuffle_epi8(table.high, index);
    /* Words of columns 0-7 and 16-23, then 8-15 and 24-31: lanes swapped back into order on the way out. */
    __m256i first = _mm256_unpacklo_epi8(low_bytes, high_bytes), second = _mm256_unpackhi_epi8(low_bytes, high_bytes);
    _mm256_storeu_si256((__m256i *)out, _mm256_permute2x128_si256(first, second, 0x20));
    _mm256_storeu_si256((__m256i *)(out + 16), _mm256_permute2x128_si256(first, second, 0x31));
}
/* int8 products under scales whose products are zero or normal (int8_products_are_normal), 16 at a time:
 * rounded as bf16_bits rounds them, without its NaN case. */
#define NORMAL_PRODUCT_COLUMNS 16
/* bf16_bits of a value that is not NaN, left in 32-bit lanes. */
VF_INLINE __m256i bf16_of_number(vf v) {
    vi bits = vf_as_vi(v);
    vi odd = vi_and(_mm256_srli_epi32(bits, 16), vi_set1(1));
    return _mm256_srli_epi32(vi_add(bits, vi_add(odd, vi_set1(0x7FFF))), 16);
}
VF_INLINE void int8_products_bf16(const uint8_t *bytes, vf scale, uint16_t *out) {
    __m256i low = bf16_of_number(vf_mul(vi_to_vf(bytes_i32(bytes)), scale));
    __m256i high = bf16_of_number(vf_mul(vi_to_vf(bytes_i32(bytes + VF_LANES)), scale));
    /* Packing works within 128-bit lanes: 64-bit quarters low 0-3, high 0-3, low 4-7, high 4-7. */
    _mm256_storeu_si256((__m256i *)out, _mm256_permute4x64_epi64(_mm256_packus_epi32(low, high), 0xD8));
}
/* fp8 products by table (above), 16 at a time: the normal and the subnormal words, 8 each, in both
 * 128-bit lanes (the byte shuffle's tables); the normal ones one exponent step down. */
typedef struct {
    __m256i normal, subnormal;
} fp8_scaling;
VF_INLINE fp8_scaling fp8_scaling_of(vf scale) {
    __m128i normal = bf16_bits(vf_mul(_mm256_loadu_ps(FP8_TABLE_VALUES), scale));
    __m128i subnormal = bf16_bits(vf_mul(_mm256_loadu_ps(FP8_TABLE_VALUES + 8), scale));
    fp8_scaling scaling = {_mm256_broadcastsi128_si256(_mm_sub_epi16(normal, _mm_set1_epi16(1 << 7))),
                           _mm256_broadcastsi128_si256(subnormal)};
    return scaling;
}
VF_INLINE void fp8_products_bf16(const uint8_t *bytes, fp8_scaling scaling, uint16_t *out) {
    __m256i words = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)bytes));
    /* Word j of a table is its bytes 2j and 2j + 1. */
    __m256i entry = _mm256_add_epi16(_mm256_mullo_epi16(_mm256_and_si256(words, _mm256_set1_epi16(7)),
                                                        _mm256_set1_epi16(0x0202)), _mm256_set1_epi16(0x0100));
    __m256i exponent = _mm256_and_si256(_mm256_slli_epi16(words, 4), _mm256_set1_epi16(FP8_EXPONENT_FIELD));
    __m256i normal = _mm256_add_epi16(_mm256_shuffle_epi8(scaling.normal, entry), exponent);
    __m256i values = _mm256_blendv_epi8(normal, _mm256_shuffle_epi8(scaling.subnormal, entry),
                                        _mm256_cmpeq_epi16(exponent, _mm256_setzero_si256()));
    values = _mm256_xor_si256(values, _mm256_and_si256(_mm256_slli_epi16(words, 8), _mm256_set1_epi16((short)0x8000)));
    /* NaN lanes: all ones, BF16_NAN. */
    __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(words, _mm256_set1_epi16(0x7F)), _mm256_set1_epi16(0x7F));
    _mm256_storeu_si256((__m256i *)out, _mm256_or_si256(values, nan));
}
#endif

VF_INLINE void store_values(void *out, int out_bf16, int64_t column, vf values, int64_t count) {
    if (out_bf16) {
        if (count == VF_LANES) {
            store_bf16((uint16_t *)out + column, values);
        } else {
            uint16_t packed[VF_LANES];
            store_bf16(packed, values);
            memcpy((uint16_t *)out + column, packed, count * sizeof(uint16_t));
        }
    } else {
        vf_store_n((float *)out + column, values, count);
    }
}

static inline float scale_at(const void *scale, int scale_bf16, int64_t index) {
    if (!scale_bf16) return ((const float *)scale)[index];
    uint32_t bits = (uint32_t)((const uint16_t *)scale)[index] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* One row: columns in segments sharing one scale (a 128-column fp8 block, the int8 row, an int4
 * group), full vectors from the row's bytes, a segment's last partial vector through a staging array.
 * Inlined once per format and output dtype, so the inner loop has no branch on either. */
VF_INLINE void dequantize_row_as(const int format, const int out_bf16, const uint8_t *row, const void *scale_row,
                                 int scale_bf16, int64_t segment, int64_t columns, void *out) {
    for (int64_t start = 0, index = 0; start < columns; start += segment, index++) {
        int64_t stop = start + segment < columns ? start + segment : columns;
        float scale_value = scale_at(scale_row, scale_bf16, index);
        vf scale = vf_set1(scale_value);
        int64_t column = start;
        if (format == FORMAT_INT4 && out_bf16 && column % 2 == 0) {
            int4_table table = int4_table_of(scale);
            for (; column + INT4_TABLE_COLUMNS <= stop; column += INT4_TABLE_COLUMNS)
                int4_bf16_by_table(row + column / 2, table, (uint16_t *)out + column);
        } else if (format == FORMAT_INT8 && out_bf16 && int8_products_are_normal(scale_value)) {
            for (; column + NORMAL_PRODUCT_COLUMNS <= stop; column += NORMAL_PRODUCT_COLUMNS)
                int8_products_bf16(row + column, scale, (uint16_t *)out + column);
        } else if (format == FORMAT_FP8_BLOCK && out_bf16 && fp8_products_apply(scale_value)) {
            fp8_scaling scaling = fp8_scaling_of(scale);
            for (; column + NORMAL_PRODUCT_COLUMNS <= stop; column += NORMAL_PRODUCT_COLUMNS)
                fp8_products_bf16(row + column, scaling, (uint16_t *)out + column);
        }
        /* int4 vectors start on a byte; an odd-sized group's odd starts go through the staging array. */
        if (format != FORMAT_INT4 || column % 2 == 0)
            for (; column + VF_LANES <= stop; column += VF_LANES)
                store_values(out, out_bf16, column, vf_mul(raw_values(format, row, column), scale), VF_LANES);
        for (; column < stop; column += VF_LANES) {
            int64_t count = stop - column < VF_LANES ? stop - column : VF_LANES;
            float staged[VF_LANES] = {0};
            for (int64_t i = 0; i < count; i++) staged[i] = raw_value(format, row, column + i);
            store_values(out, out_bf16, column, vf_mul(vf_load(staged), scale), count);
        }
    }
}

static void dequantize_row(int format, const uint8_t *row, const void *scale_row, int scale_bf16, int64_t segment,
                           int64_t columns, void *out, int out_bf16) {
#define ROW_AS(f, b) dequantize_row_as(f, b, row, scale_row, scale_bf16, segment, columns, out)
    switch (format * 2 + (out_bf16 != 0)) {
    case FORMAT_FP8_BLOCK * 2: ROW_AS(FORMAT_FP8_BLOCK, 0); break;
    case FORMAT_FP8_BLOCK * 2 + 1: ROW_AS(FORMAT_FP8_BLOCK, 1); break;
    case FORMAT_INT8 * 2: ROW_AS(FORMAT_INT8, 0); break;
    case FORMAT_INT8 * 2 + 1: ROW_AS(FORMAT_INT8, 1); break;
    case FORMAT_INT4 * 2: ROW_AS(FORMAT_INT4, 0); break;
    default: ROW_AS(FORMAT_INT4, 1); break;
    }
#undef ROW_AS
}

/* Rows row .. row + count - 1 of `expert` (0 for a lone matrix) of a quantized weight `w` into `out`
 * [count][w->columns] bf16. */
static inline void dequantize_weight_rows(const weight_ref *w, int64_t expert, int64_t row, int64_t count,
                                          uint16_t *out) {
    int64_t segment = w->format == FORMAT_FP8_BLOCK ? FP8_BLOCK : w->format == FORMAT_INT8 ? w->columns : w->group;
    int64_t scale_element = w->scale_bf16 ? sizeof(uint16_t) : sizeof(float);
    const uint8_t *data = (const uint8_t *)(uintptr_t)w->data + expert * w->expert_bytes;
    const char *scale = (const char *)(uintptr_t)w->scale + expert * w->expert_scales * scale_element;
    for (int64_t r = row; r < row + count; r++) {
        int64_t scale_row = w->format == FORMAT_FP8_BLOCK ? r / FP8_BLOCK : r;
        dequantize_row((int)w->format, data + r * w->row_bytes, scale + scale_row * w->scale_stride * scale_element,
                       (int)w->scale_bf16, segment, w->columns, out + (r - row) * w->columns, 1);
    }
}

#endif
