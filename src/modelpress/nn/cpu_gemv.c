/* Matrix-vector products on packed weights for the CPU, read in PackedWeight's stored layout (no copy).

   y[m, n] = sum_g s[n, g] * sum_{k in g} L(c[n, k]) * x[m, k]  +  o[n, g] * sum_{k in g} x[m, k]

   c: the stored codes, L: the format's level of a code, s / o: the group's scale / offset (fp32, fp16 or bf16,
   addressed by strides, so per-tensor, per-row and grouped scales are one case). Sums are in float32 and the scale
   is applied once per group (per lane of a vector, see below), not per weight.

   4 bits (byte j of a row: code 2j in the low nibble, 2j + 1 in the high one). A superblock is 8 VW codes: VW
   dwords of 8 codes; lane j holds codes 8j..8j+7, nibble i of it (bits 4i..4i+3) is code 8j + i. x is laid out to
   match once per call, so a shift and a mask give one code of every lane with no shuffle:
   - planes (float32 products): plane i of superblock c is the vector of x[8 VW c + 8j + i] over lanes j; the level
     is the code converted to float (linear formats, level = code + bias: int4, int4-asym) or looked up in a
     16-entry table in registers (nf4, fp4). Exact: the stored weight's levels times float32 x.
   - pairs (bfloat16 products, linear formats, where the CPU has AVX512_BF16): x rounded to bfloat16, dword j of
     pair p holding x[128c + 8j + p] and x[128c + 8j + p + 4]; nibbles p and p + 4 of a lane masked in place and
     ORed with 0x4300 in each half are the bfloat16 values 128 + code, exact, and vdpbf16ps multiplies 32 weights
     by x's pair in one instruction, summing in float32. Same numbers as PyTorch's int4 CPU kernel (x rounded to
     bfloat16), twice as fast here.
   - int16 pairs (linear formats on AVX2, which has no bfloat16 or VNNI instructions, where bfloat16 products are
     allowed): x quantized to int16 in blocks of 32 (finer than bfloat16), the nibbles masked into 16-bit words the
     same way and multiplied by vpmaddwd (superblocks_int).
   The bias (and pairs' 128) is taken off per lane with the sum of the lane's 8 x values, and so is the offset:
   total += s * (acc + corr * xsum) + o * xsum. Groups shorter than a superblock (8, 16, 32, 64 codes; 64 at most
   with AVX2) get their scales and offsets spread over the lanes by one permute; longer ones (a multiple of 8 VW,
   or one group per row) are one broadcast. Codes past the last whole 8 are done in scalar code.
   8 bits: L computed from the code: an integer (code + bias), or fp8 e4m3 / e5m2 widened through float16 (exact,
   subnormals included); float32 products. Integer codes where bfloat16 products are allowed and the CPU has
   AVX512_VNNI: x quantized to int16 in blocks of 32 (scale max|x| / 32767: each value within 2^-16 of its block's
   largest, a rounding finer than bfloat16's 2^-9 of the value itself), and vpdpwssd multiplies two codes (16-bit
   words of a lane: bytes 0 and 2 masked, bytes 1 and 3 shifted down) by two x values per lane per instruction,
   summed into int32 and converted once per superblock as int8 products are (below). The float32 path converts
   every code and takes an FMA per 16 of them; this one reads the head of a model (8-bit, 28 MB) at about 1.5x
   the rate.
   int8 products (MP_PRODUCTS_INT8, where the CPU has AVX512_VNNI; linear 4-bit formats and 8-bit integer codes): x
   quantized to int8 in blocks of 32 (scale max|x| / 127, rounded to nearest, as llama.cpp's Q8_0), and vpdpbusd
   multiplies 4 unsigned codes by 4 int8 x values and sums them into a lane's int32 in one instruction (4 bits: the
   low nibbles of a lane's bytes are its even codes, the high ones its odd codes, so x is laid out as an even and
   an odd byte vector per superblock). Per superblock a lane's integer sum is converted once and scaled by its x
   block's scale; the bias and offsets come off with the lane's sum of quantized x. Not the stored weight's exact
   product: x carries the int8 rounding (up to 1/254 of its block's largest value), as llama.cpp's CPU matmuls do.

   Built by cpu_native.py with -O3 -march=native: AVX-512 where the machine has it, else AVX2 + FMA + F16C, else
   plain C (which cpu_native.py does not use). Single-threaded: calls are decode sized (a few rows of x),
   memory-bound, and the backend runs them on one thread. Rows are taken RB at a time: independent accumulators,
   and each load of x serves RB rows. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_native.h"
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MP_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MP_AVX2 1
#endif
#if defined(MP_AVX512) && defined(__AVX512BF16__)
#define MP_BF16 1
#endif
#if defined(MP_AVX512) && defined(__AVX512VNNI__)
#define MP_VNNI 1
#endif
#if defined(MP_AVX512) || defined(MP_AVX2)
#define MP_VECTOR 1
#include <immintrin.h>
#endif

enum { SCALE_F32 = 0, SCALE_F16 = 1, SCALE_BF16 = 2 };
enum { KIND_INT = 0, KIND_E4M3 = 1, KIND_E5M2 = 2 };
#define RB 4
#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 2
#endif
#define INLINE static inline __attribute__((always_inline))

/* What the build multiplies with: MP_PRODUCTS_BF16 and MP_PRODUCTS_INT8 bits (each where the CPU has it). */
int mp_products(void) {
    int products = 0;
#if defined(MP_BF16)
    products |= 1 << MP_PRODUCTS_BF16;
#endif
#if defined(MP_VNNI)
    products |= 1 << MP_PRODUCTS_INT8;
#endif
    return products;
}

/* 512 (AVX-512), 256 (AVX2 + FMA + F16C) or 0 (plain C); +1 where 4-bit linear formats take bfloat16 products */
int mp_isa(void) {
#if defined(MP_BF16)
    return 513;
#elif defined(MP_AVX512)
    return 512;
#elif defined(MP_AVX2)
    return 256;
#else
    return 0;
#endif
}

/* ---- scalars: float16 / bfloat16 parameters, fp8 levels ---- */

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {  /* subnormal half: renormalize */
        exp = 113;
        while (!(mant & 0x400)) { mant <<= 1; exp--; }
        bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float load_param(const void *base, int type, int64_t index) {
    if (type == SCALE_F32) return ((const float *)base)[index];
    uint16_t h = ((const uint16_t *)base)[index];
#if defined(MP_VECTOR)
    if (type == SCALE_F16) return _cvtsh_ss(h);
#else
    if (type == SCALE_F16) return half_to_float(h);
#endif
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* count parameters of one row, element g at base[start + g * stride], as float32 into out */
static void load_params(const void *base, int type, int64_t start, int64_t stride, int64_t count, float *out) {
    int64_t g = 0;
#if defined(MP_AVX512)
    const uint16_t *p = (const uint16_t *)base + start;
    if (stride == 1 && type == SCALE_F16) {
        for (; g + 16 <= count; g += 16)
            _mm512_storeu_ps(out + g, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + g))));
    } else if (stride == 1 && type == SCALE_BF16) {
        for (; g + 16 <= count; g += 16) {
            __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + g)));
            _mm512_storeu_ps(out + g, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
        }
    }
#endif
    if (stride == 1 && type == SCALE_F32) {
        memcpy(out, (const float *)base + start, (size_t)count * sizeof(float));
        return;
    }
    for (; g < count; g++) out[g] = load_param(base, type, start + g * stride);
}

/* The parameters of rows r0 .. r0 + RB - 1, each row's `count` at out + r * count: where they lie back to back
   (stride 1, rows `count` apart: the usual grouped layout), converted as one run, with masked loads and stores for
   its end (a call per row cost ~15% of a decode-shaped GEMV with K = 576); otherwise row by row. */
static void load_block_params(const void *base, int type, int64_t r0, int64_t row_stride, int64_t stride,
                              int64_t count, float *out) {
#if defined(MP_AVX512)
    if (stride == 1 && row_stride == count && type != SCALE_F32) {
        const uint16_t *p = (const uint16_t *)base + r0 * count;
        int64_t total = RB * count, g = 0;
        for (; g < total; g += 16) {
            __mmask16 live = total - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (total - g)) - 1);
            __m256i h = _mm256_maskz_loadu_epi16(live, p + g);
            __m512 f = type == SCALE_F16 ? _mm512_cvtph_ps(h)
                                         : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            _mm512_mask_storeu_ps(out + g, live, f);
        }
        return;
    }
#endif
    for (int r = 0; r < RB; r++) load_params(base, type, (r0 + r) * row_stride, stride, count, out + r * count);
}

/* 8-bit levels: e5m2 is the top byte of a float16; e4m3's magnitude shifted under float16's wider exponent reads as
   2^-8 times its value, so the caller's `unit` is 256 for e4m3 and 1 for e5m2 */
static inline uint16_t fp8_half_bits(uint16_t code, int kind) {
    return kind == KIND_E5M2 ? (uint16_t)(code << 8) : (uint16_t)(((code & 0x7F) << 7) | ((code & 0x80) << 8));
}

static float level8_scalar(uint8_t code, int kind, float bias, float unit) {
    if (kind == KIND_INT) return (float)code + bias;
    return half_to_float(fp8_half_bits(code, kind)) * unit;
}

static float bf16_round(float v) {   /* to nearest, ties to even; infinities stay, NaNs stay (quiet) NaNs */
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7F800000u) == 0x7F800000u)
        u = (u & 0xFFFF0000u) | ((u & 0x007FFFFFu) ? 0x00400000u : 0);
    else
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
    memcpy(&v, &u, 4);
    return v;
}

/* A growing per-thread scratch buffer of floats. */
static float *scratch(size_t count) {
    static __thread float *buf = NULL;
    static __thread size_t cap = 0;
    if (count > cap) {
        free(buf);
        cap = count + 1024;
        buf = (float *)aligned_alloc(64, ((cap * sizeof(float)) + 63) / 64 * 64);
        if (!buf) cap = 0;
    }
    return buf;
}

/* ---- the vector unit as one vocabulary: vf holds VW float32 lanes, vi VW int32 lanes ---- */

#if defined(MP_AVX512)
#define VW 16
typedef __m512 vf;
typedef __m512i vi;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSET1(v) _mm512_set1_ps(v)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VCVT(i) _mm512_cvtepi32_ps(i)
#define VPERM(idx, v) _mm512_permutexvar_ps(idx, v)
#define VI_SRL(a, n) _mm512_srli_epi32(a, n)
#define VI_AND15(a) _mm512_and_si512(a, _mm512_set1_epi32(15))
#define VI_LANE_GROUP(shift) \
    _mm512_srli_epi32(_mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120), shift)
/* the lane sums of four vectors at once: pairs interleaved, then 128-bit lanes of [t0, t1, t2, t3] added */
static inline __m128 hsum4(vf t0, vf t1, vf t2, vf t3) {
    __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(t0, t1), _mm512_unpackhi_ps(t0, t1));
    __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(t2, t3), _mm512_unpackhi_ps(t2, t3));
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
/* the first `lanes` dwords at p (the rest 0) */
static inline vi load_lanes(const uint8_t *p, int lanes) {
    return lanes == VW ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi32((__mmask16)((1u << lanes) - 1), p);
}
typedef struct { __m512 t; } table16;
static inline table16 make_table(const float *t) { table16 r = {_mm512_loadu_ps(t)}; return r; }
static inline vf lookup(vi idx, table16 t) { return _mm512_permutexvar_ps(idx, t.t); }
/* VW 8-bit codes at p -> their levels */
static inline vf levels8(const uint8_t *p, int kind, vf bias, vf unit) {
    __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    if (kind == KIND_INT) return _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), bias);
    __m256i w = _mm256_cvtepu8_epi16(bytes);
    if (kind == KIND_E5M2) {
        w = _mm256_slli_epi16(w, 8);
    } else {
        w = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7F)), 7),
                            _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8));
    }
    return _mm512_mul_ps(_mm512_cvtph_ps(w), unit);
}
#elif defined(MP_AVX2)
#define VW 8
typedef __m256 vf;
typedef __m256i vi;
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSET1(v) _mm256_set1_ps(v)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VCVT(i) _mm256_cvtepi32_ps(i)
#define VPERM(idx, v) _mm256_permutevar8x32_ps(v, idx)
#define VI_SRL(a, n) _mm256_srli_epi32(a, n)
#define VI_AND15(a) _mm256_and_si256(a, _mm256_set1_epi32(15))
#define VI_LANE_GROUP(shift) _mm256_srli_epi32(_mm256_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56), shift)
static inline __m128 hsum4(vf t0, vf t1, vf t2, vf t3) {
    __m256 s01 = _mm256_add_ps(_mm256_unpacklo_ps(t0, t1), _mm256_unpackhi_ps(t0, t1));
    __m256 s23 = _mm256_add_ps(_mm256_unpacklo_ps(t2, t3), _mm256_unpackhi_ps(t2, t3));
    __m256 s = _mm256_add_ps(_mm256_shuffle_ps(s01, s23, 0x44), _mm256_shuffle_ps(s01, s23, 0xEE));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}
static inline vi load_lanes(const uint8_t *p, int lanes) {
    if (lanes == VW) return _mm256_loadu_si256((const __m256i *)p);
    __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_epi32((const int *)p, mask);
}
typedef struct { __m256 lo, hi; } table16;
static inline table16 make_table(const float *t) { table16 r = {_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)}; return r; }
/* 16-entry lookup of 8 indices in 0..15: two 8-entry permutes, chosen by bit 3 */
static inline vf lookup(vi idx, table16 t) {
    __m256 a = _mm256_permutevar8x32_ps(t.lo, idx), b = _mm256_permutevar8x32_ps(t.hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  /* bit 3 -> sign bit */
}
static inline vf levels8(const uint8_t *p, int kind, vf bias, vf unit) {
    __m128i bytes = _mm_loadl_epi64((const __m128i *)p);
    if (kind == KIND_INT) return _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), bias);
    __m128i w = _mm_cvtepu8_epi16(bytes);
    if (kind == KIND_E5M2) {
        w = _mm_slli_epi16(w, 8);
    } else {
        w = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x7F)), 7),
                         _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8));
    }
    return _mm256_mul_ps(_mm256_cvtph_ps(w), unit);
}
#else
#define VW 1
#endif

#if defined(MP_VECTOR)
/* Where the scales of superblock c come from (see the top of the file). */
typedef struct { int spread; vi lane_group; int64_t per_block, span; } spreading;
#endif

/* What a block of RB weight rows is multiplied with. */
typedef struct {
    int bits;
    const float *table;            /* 4 bits: the 16 levels */
    int linear, pairs;             /* 4 bits: levels code + bias, converted; pairs: bfloat16 products */
    int kind;                      /* 8 bits: KIND_*, with bias and unit */
    int planes8;                   /* 8 bits: integer levels in byte planes (see superblocks) */
    float bias, unit;
    float corr;                    /* planes: level minus what the vector part reads (bias; bias - 128 for pairs) */
    const float *xp;               /* planes: x in planes, or pairs of planes (as uint32) */
    const float *xsum;             /* planes: per lane, the sum of its x values (8 for 4 bits, 4 for 8 bits) */
    const float *x;                /* x (rounded to bfloat16 for pairs) */
    int int8;                      /* int8 products: xp holds x's int8 codes (even, odd byte vectors for 4 bits) */
    int int16;                     /* 8-bit integer codes, bfloat16 products: xp holds x's int16 codes (see top) */
    const float *xscale;           /* int8 products: per lane, its x block's scale */
    const float *xqsum;            /* int8 products: per lane, scale times the sum of its int8 x codes */
    int has_offset;
    int64_t k, group, groups;
#if defined(MP_VECTOR)
    spreading sp;                  /* planes: made once per call, not per block of rows */
#endif
} operands;

#if defined(MP_VECTOR)

static inline spreading make_spreading(int64_t group, int per_lane) {
    spreading sp;
    sp.span = per_lane * VW;
    sp.spread = group < sp.span;
    int shift = 0;   /* lane j's group within a superblock: j >> shift (VI_LANE_GROUP takes 8j, so 3 + shift) */
    while (sp.spread && ((int64_t)per_lane << shift) < group) shift++;
    sp.lane_group = VI_LANE_GROUP(3 + shift);
    sp.per_block = sp.spread ? sp.span / group : 0;
    return sp;
}

INLINE vf block_params(const float *row, spreading sp, int64_t c, int64_t group) {
    return sp.spread ? VPERM(sp.lane_group, VLOAD(row + c * sp.per_block)) : VSET1(row[c * sp.span / group]);
}

/* One row of superblock c (4 bits): the products of its 8 VW codes with x, summed per lane. */
INLINE vf superblock_row(const uint8_t *q, int live, const vf xv[8], const void *xb_in, table16 tab, int linear,
                         int pairs, vf start) {
    vi w = load_lanes(q, live);
    vf acc0 = start, acc1 = VZERO();
#if defined(MP_BF16)
    if (pairs) {
        const float *xf = (const float *)xb_in;   /* unaligned loads: rows of x's layout are not 64-byte aligned */
        __m512bh xb[4];
        for (int p = 0; p < 4; p++) xb[p] = (__m512bh)_mm512_loadu_si512(xf + p * VW);
        const __m512i mask = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
        /* (A & B) | C is ternary-logic table 0xEA */
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_ternarylogic_epi32(w, mask, magic, 0xEA), xb[0]);
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(w, 4), mask, magic, 0xEA),
                                xb[1]);
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(w, 8), mask, magic, 0xEA),
                                xb[2]);
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(w, 12), mask, magic, 0xEA),
                                xb[3]);
        return acc0;
    }
#else
    (void)xb_in;
    (void)pairs;
#endif
#pragma GCC unroll 4
    for (int i = 0; i < 8; i += 2) {
        vi i0 = i == 0 ? VI_AND15(w) : VI_AND15(VI_SRL(w, 4 * i));
        vi i1 = VI_AND15(VI_SRL(w, 4 * i + 4));
        acc0 = VFMA(linear ? VCVT(i0) : lookup(i0, tab), xv[i], acc0);
        acc1 = VFMA(linear ? VCVT(i1) : lookup(i1, tab), xv[i + 1], acc1);
    }
    return VADD(acc0, acc1);
}

/* One row of superblock c (8-bit integer codes): lane j holds codes 4j..4j+3, byte b of it is code 4j + b. */
INLINE vf superblock_row8(const uint8_t *q, int live, const vf xv[8]) {
    vi w = load_lanes(q, live);
#if defined(MP_AVX512)
    const vi bytes = _mm512_set1_epi32(0xFF);
    vi b0 = _mm512_and_si512(w, bytes), b1 = _mm512_and_si512(_mm512_srli_epi32(w, 8), bytes);
    vi b2 = _mm512_and_si512(_mm512_srli_epi32(w, 16), bytes), b3 = _mm512_srli_epi32(w, 24);
#else
    const vi bytes = _mm256_set1_epi32(0xFF);
    vi b0 = _mm256_and_si256(w, bytes), b1 = _mm256_and_si256(_mm256_srli_epi32(w, 8), bytes);
    vi b2 = _mm256_and_si256(_mm256_srli_epi32(w, 16), bytes), b3 = _mm256_srli_epi32(w, 24);
#endif
    vf acc0 = VFMA(VCVT(b0), xv[0], VZERO()), acc1 = VFMA(VCVT(b1), xv[1], VZERO());
    acc0 = VFMA(VCVT(b2), xv[2], acc0);
    acc1 = VFMA(VCVT(b3), xv[3], acc1);
    return VADD(acc0, acc1);
}

#if defined(MP_BF16)
/* superblock_row's bfloat16 pairs for a superblock of at most VW / 2 live lanes (the last of a row whose lanes end
   half way through one: K = 576 is 4.5 superblocks), on 256-bit halves: the same products at half the cost */
INLINE __m256 half_pairs(const uint8_t *q, int live, const float *xf, __m256 start) {
    __m256i w = _mm256_maskz_loadu_epi32((__mmask8)((1u << live) - 1), q);
    const __m256i mask = _mm256_set1_epi32(0x000F000F), magic = _mm256_set1_epi32(0x43004300);
    __m256 acc = start;
    for (int p = 0; p < 4; p++) {
        __m256bh xb = (__m256bh)_mm256_loadu_si256((const __m256i *)(xf + p * VW));
        __m256i codes = _mm256_ternarylogic_epi32(p ? _mm256_srli_epi32(w, 4 * p) : w, mask, magic, 0xEA);
        acc = _mm256_dpbf16_ps(acc, (__m256bh)codes, xb);
    }
    return acc;
}

/* block_params for the lower half of a superblock's lanes */
INLINE __m256 half_params(const float *row, spreading sp, int64_t c, int64_t group) {
    return sp.spread ? _mm256_permutexvar_ps(_mm512_castsi512_si256(sp.lane_group), _mm256_loadu_ps(row + c * sp.per_block))
                     : _mm256_set1_ps(row[c * sp.span / group]);
}
#endif

/* Every whole superblock (4 bits, or 8-bit integer codes: BITS8): t += s * (acc + corr * xsum) (+ o * xsum) for
   each of the RB rows, in four named accumulators (an array of them was kept in memory). LINEAR, PAIRS and BITS8
   are constants where inlined. */
INLINE void superblocks(const uint8_t *const q[RB], const float *const scales[RB], const float *const offsets[RB],
                        const operands *o, int linear, int pairs, int bits8, vf total[RB]) {
    static const float no_table[16];
    table16 tab = make_table(o->table ? o->table : no_table);   /* used by lookup formats only */
    int per_lane = bits8 ? 4 : 8, planes = per_lane;
    const spreading sp = o->sp;
    int64_t lanes = o->k / per_lane, blocks = (lanes + VW - 1) / VW;
    const vf corr = VSET1(o->corr);
    const int has_offset = o->has_offset;
    vf t0 = VZERO(), t1 = VZERO(), t2 = VZERO(), t3 = VZERO();
    for (int64_t c = 0; c < blocks; c++) {
        int live = lanes - c * VW < VW ? (int)(lanes - c * VW) : VW;
        vf xs = VLOAD(o->xsum + c * VW);
#if defined(MP_BF16)
        if (pairs && live <= VW / 2) {   /* a half superblock: 256-bit halves (lanes past live hold zeros) */
            const __m256 xh = _mm512_castps512_ps256(xs), start_h = _mm256_mul_ps(xh, _mm512_castps512_ps256(corr));
            const float *xf = o->xp + 4 * c * VW;
#define HALF_ROW(r, t)                                                                                       \
            {                                                                                                \
                __m256 acc = half_pairs(q[r] + 4 * VW * c, live, xf, start_h);                               \
                __m256 part = _mm256_mul_ps(acc, half_params(scales[r], sp, c, o->group));                   \
                if (has_offset) part = _mm256_fmadd_ps(xh, half_params(offsets[r], sp, c, o->group), part);  \
                t = _mm512_add_ps(t, _mm512_zextps256_ps512(part));                                          \
            }
            HALF_ROW(0, t0) HALF_ROW(1, t1) HALF_ROW(2, t2) HALF_ROW(3, t3)
#undef HALF_ROW
            continue;
        }
#endif
        const vf start = pairs ? VMUL(xs, corr) : VZERO();   /* pairs: the bias's part, every row's */
        const void *xb = o->xp + 4 * c * VW;
        vf xv[8];
        if (!pairs)
            for (int i = 0; i < planes; i++) xv[i] = VLOAD(o->xp + (planes * c + i) * VW);
#define ROW(r, t)                                                                                            \
        {                                                                                                    \
            vf acc = bits8 ? superblock_row8(q[r] + 4 * VW * c, live, xv)                                    \
                           : superblock_row(q[r] + 4 * VW * c, live, xv, xb, tab, linear, pairs, start);     \
            if (linear && !pairs) acc = VFMA(xs, corr, acc);                                                 \
            t = VFMA(acc, block_params(scales[r], sp, c, o->group), t);                                      \
            if (has_offset) t = VFMA(xs, block_params(offsets[r], sp, c, o->group), t);                      \
        }
        ROW(0, t0) ROW(1, t1) ROW(2, t2) ROW(3, t3)
#undef ROW
    }
    total[0] = t0, total[1] = t1, total[2] = t2, total[3] = t3;
}

#if defined(MP_VNNI)
/* One row of superblock c with int8 x: per lane, the integer sum of its codes times x's int8 codes */
INLINE __m512i superblock_row_i8(const uint8_t *q, int live, __m512i xe, __m512i xo, int bits8) {
    __m512i w = load_lanes(q, live);
    __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), bits8 ? w : _mm512_and_si512(w, _mm512_set1_epi8(15)),
                                      xe);
    if (!bits8) acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi32(w, 4), _mm512_set1_epi8(15)), xo);
    return acc;
}

/* One row of superblock c (8-bit integer codes) with int16 x: lane j's bytes 0 and 2 as 16-bit words times xe's
   pair (x[4j], x[4j + 2]), bytes 1 and 3 (the words' high bytes, shifted down) times xo's (x[4j + 1], x[4j + 3]):
   two vpdpwssd per 64 codes, sums of 4 products of at most 255 * 32767 per lane, far inside int32 */
INLINE __m512i superblock_row_i16(const uint8_t *q, int live, __m512i xe, __m512i xo) {
    __m512i w = load_lanes(q, live);
    __m512i acc = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w, _mm512_set1_epi32(0x00FF00FF)), xe);
    return _mm512_dpwssd_epi32(acc, _mm512_srli_epi16(w, 8), xo);
}

#endif

#if defined(MP_AVX2)
/* AVX2 (no bfloat16 or VNNI instructions): linear 4-bit codes with int16 x where bfloat16 products are allowed.
   vpmaddwd multiplies 16-bit words pairwise and adds each pair into a lane's int32: pair p of a lane holds its codes
   p and p + 4 (nibbles masked where a shift by 4p puts them) against x's (x[8j + p], x[8j + p + 4]). The float32
   path converted every code and took an FMA per 8 codes: int4/g32 at K = 576 41.6 -> 27.2 ns a row,
   int4-asym/g128 48.3 -> 28.7 (A/B, one thread). 8-bit codes keep float32 products: int16 x on AVX2's superblocks
   of 32 codes was no faster (49.5 vs 50.4 ns). Sums stay far inside int32. */
INLINE __m256i superblock_row_i16_avx2(const uint8_t *q, int live, const __m256i xv[4]) {
    __m256i w = load_lanes(q, live);
    const __m256i mask = _mm256_set1_epi32(0x000F000F);
    __m256i acc = _mm256_madd_epi16(_mm256_and_si256(w, mask), xv[0]);
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi32(w, 4), mask), xv[1]));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi32(w, 8), mask), xv[2]));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi32(w, 12), mask), xv[3]));
}

#endif

#if defined(MP_VNNI) || defined(MP_AVX2)
#if defined(MP_VNNI)
#define VI_LOAD(p) _mm512_loadu_si512(p)
/* one row's integer sums of superblock c (see the row functions above) */
INLINE vi integer_row(const uint8_t *q, int live, const vi xv[4], int bits8, int wide) {
    return wide ? superblock_row_i16(q, live, xv[0], xv[1]) : superblock_row_i8(q, live, xv[0], xv[1], bits8);
}
#else
#define VI_LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
INLINE vi integer_row(const uint8_t *q, int live, const vi xv[4], int bits8, int wide) {
    (void)bits8, (void)wide;   /* AVX2: 4-bit codes with int16 x only */
    return superblock_row_i16_avx2(q, live, xv);
}
#endif

/* superblocks() with integer x, int8 or (WIDE) int16: t += s * (xscale * isum + corr * xqsum) (+ o * xqsum) for
   each of the RB rows: the offset too multiplies the quantized x, so the product is the weight's with quantized x
   (asymmetric formats' offsets are as large as their codes' part, and would not cancel x's rounding in it
   otherwise). Per superblock, x's codes are per_lane / 4 (int8) or per_lane / 2 (int16) vectors. */
INLINE void superblocks_int(const uint8_t *const q[RB], const float *const scales[RB], const float *const offsets[RB],
                            const operands *o, int bits8, int wide, vf total[RB]) {
    int per_lane = bits8 ? 4 : 8, vectors = wide ? per_lane / 2 : per_lane / 4;
    const spreading sp = o->sp;
    int64_t lanes = o->k / per_lane, blocks = (lanes + VW - 1) / VW;
    const vf corr = VSET1(o->corr);
    const int has_offset = o->has_offset;
    const uint8_t *xq = (const uint8_t *)o->xp;
    vf t0 = VZERO(), t1 = VZERO(), t2 = VZERO(), t3 = VZERO();
    for (int64_t c = 0; c < blocks; c++) {
        int live = lanes - c * VW < VW ? (int)(lanes - c * VW) : VW;
        vi xv[4];
        for (int v = 0; v < vectors; v++) xv[v] = VI_LOAD(xq + sizeof(vi) * (vectors * c + v));
        vf xd = VLOAD(o->xscale + c * VW), xs = VLOAD(o->xqsum + c * VW), cx = VMUL(corr, xs);
#define ROW(r, t)                                                                                            \
        {                                                                                                    \
            vf acc = VFMA(VCVT(integer_row(q[r] + 4 * VW * c, live, xv, bits8, wide)), xd, cx);             \
            t = VFMA(acc, block_params(scales[r], sp, c, o->group), t);                                      \
            if (has_offset) t = VFMA(xs, block_params(offsets[r], sp, c, o->group), t);                      \
        }
        ROW(0, t0) ROW(1, t1) ROW(2, t2) ROW(3, t3)
#undef ROW
    }
    total[0] = t0, total[1] = t1, total[2] = t2, total[3] = t3;
}
#endif

/* 8 bits: the products of `steps` vector steps of VW codes from q with x, summed per lane */
INLINE vf steps8(const uint8_t *q, const float *x, int64_t steps, int kind, vf vbias, vf vunit) {
    vf acc0 = VZERO(), acc1 = VZERO();
    int64_t c = 0;
    for (; c + 1 < steps; c += 2) {
        acc0 = VFMA(levels8(q + VW * c, kind, vbias, vunit), VLOAD(x + VW * c), acc0);
        acc1 = VFMA(levels8(q + VW * (c + 1), kind, vbias, vunit), VLOAD(x + VW * (c + 1)), acc1);
    }
    if (c < steps) acc0 = VFMA(levels8(q + VW * c, kind, vbias, vunit), VLOAD(x + VW * c), acc0);
    return VADD(acc0, acc1);
}

/* 8 bits, whole vector steps of every group, scaled per group, in four named accumulators (offsets are the
   caller's; the rest of each group is left to the scalar code). KIND is a constant where inlined. */
INLINE void groups8(const uint8_t *const q[RB], const float *const scales[RB], const operands *o, int kind,
                    vf total[RB]) {
    const vf vbias = VSET1(o->bias), vunit = VSET1(o->unit);
    vf t0 = VZERO(), t1 = VZERO(), t2 = VZERO(), t3 = VZERO();
    for (int64_t g = 0; g < o->groups; g++) {
        int64_t start = g * o->group, end = start + o->group <= o->k ? start + o->group : o->k;
        int64_t steps = (end - start) / VW;
        if (steps == 0) continue;
        const float *x = o->x + start;
#define ROW(r, t) t = VFMA(steps8(q[r] + start, x, steps, kind, vbias, vunit), VSET1(scales[r][g]), t);
        ROW(0, t0) ROW(1, t1) ROW(2, t2) ROW(3, t3)
#undef ROW
    }
    total[0] = t0, total[1] = t1, total[2] = t2, total[3] = t3;
}

/* One function per decode, each with its own register allocation (inlined together, the accumulators of one
   path were spilled in another's loop); the accumulators are locals so that they stay in registers. */
#define VECTOR_PATH(name, call)                                                                                \
    static __attribute__((noinline)) void name(const uint8_t *const q_in[RB], const float *const s_in[RB],    \
                                               const float *const o_in[RB], const operands *o, vf out[RB]) {   \
        const uint8_t *q[RB];                                                                                  \
        const float *scales[RB], *offsets[RB];                                                                 \
        vf total[RB];                                                                                          \
        for (int r = 0; r < RB; r++) {                                                                         \
            q[r] = q_in[r]; scales[r] = s_in[r]; offsets[r] = o_in[r]; total[r] = VZERO();                     \
        }                                                                                                      \
        (void)offsets;                                                                                         \
        call;                                                                                                  \
        for (int r = 0; r < RB; r++) out[r] = total[r];                                                        \
    }
/* The decodes of the planes layouts, X(name suffix, superblocks call), once for both wrappers: VECTOR_PATH (a block
   of rows: dot*) and ROWS_PATH below (a one-row call's whole row loop: rows*) */
#if defined(MP_BF16)
#define IF_BF16(x) x
#else
#define IF_BF16(x)
#endif
#if defined(MP_VNNI)
#define IF_VNNI(x) x
#else
#define IF_VNNI(x)
#endif
#if defined(MP_AVX2)
#define IF_AVX2(x) x
#else
#define IF_AVX2(x)
#endif
#define PLANES_PATHS(X)                                                                                        \
    X(4_linear, superblocks(q, scales, offsets, o, 1, 0, 0, total))                                            \
    X(4_table, superblocks(q, scales, offsets, o, 0, 0, 0, total))                                             \
    IF_BF16(X(4_pairs, superblocks(q, scales, offsets, o, 1, 1, 0, total)))                                    \
    X(8_planes, superblocks(q, scales, offsets, o, 1, 0, 1, total))                                            \
    IF_VNNI(X(4_i8, superblocks_int(q, scales, offsets, o, 0, 0, total))                                       \
            X(8_i8, superblocks_int(q, scales, offsets, o, 1, 0, total))                                       \
            X(8_i16, superblocks_int(q, scales, offsets, o, 1, 1, total)))                                     \
    IF_AVX2(X(4_i16, superblocks_int(q, scales, offsets, o, 0, 1, total)))
#define AS_DOT(suffix, call) VECTOR_PATH(dot##suffix, call)
PLANES_PATHS(AS_DOT)
VECTOR_PATH(dot8_int, groups8(q, scales, o, KIND_INT, total))
VECTOR_PATH(dot8_e4m3, groups8(q, scales, o, KIND_E4M3, total))
VECTOR_PATH(dot8_e5m2, groups8(q, scales, o, KIND_E5M2, total))

/* Rows from .. from + RB - 1 (those below n) towards L2: the row loops fetch PREFETCH_BLOCKS blocks ahead (the
   hardware prefetcher follows one stream poorly when it is read as RB interleaved short rows) */
INLINE void prefetch_block(const uint8_t *qdata, int64_t q_row, int64_t row_bytes, int64_t from, int64_t n) {
    int64_t end = from + RB < n ? from + RB : n;
    for (int64_t row = from; row < end; row++)
        for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch((const char *)(qdata + row * q_row + b), _MM_HINT_T1);
}

/* Where a one-row call's weight rows and parameters are, for rows_*. */
typedef struct {
    const uint8_t *qdata;
    int64_t q_row, row_bytes, n;
    const void *scale, *offset;
    int scale_type, offset_type;
    int64_t s_n, s_g, o_n, o_g;
    float *sblock, *oblock;   /* scratch: RB rows' scales and offsets as float32 */
    float *y;
} row_source;

/* Columns r0 .. r1 of y (r1 - r0 a multiple of RB; every code in whole lanes, so there is no scalar part) for the
   m rows of x whose operands are row_ops[0 .. m): the row loop itself in one function per decode, each block of
   weight rows taken against every row of x while it is in L1. Called once per block of rows and row of x, a
   path's function cost more than its superblocks on a decode-sized row (the call, its constants, the sums handed
   back through memory: ~5 of 22 ns per row at K = 576). */
#define ROWS_PATH(name, call)                                                                                  \
    static __attribute__((noinline)) void name(const row_source *src, const operands *row_ops, int64_t m,     \
                                               int64_t r0, int64_t r1) {                                       \
        const float *scales[RB], *offsets[RB];                                                                 \
        int64_t groups = row_ops->groups;                                                                      \
        for (int r = 0; r < RB; r++) scales[r] = src->sblock + r * groups, offsets[r] = src->oblock + r * groups; \
        (void)offsets;                                                                                         \
        for (int64_t b0 = r0; b0 < r1; b0 += RB) {                                                             \
            prefetch_block(src->qdata, src->q_row, src->row_bytes, b0 + PREFETCH_BLOCKS * RB, src->n);         \
            load_block_params(src->scale, src->scale_type, b0, src->s_n, src->s_g, groups, src->sblock);       \
            if (src->offset)                                                                                   \
                load_block_params(src->offset, src->offset_type, b0, src->o_n, src->o_g, groups, src->oblock); \
            const uint8_t *q[RB];                                                                              \
            for (int r = 0; r < RB; r++) q[r] = src->qdata + (b0 + r) * src->q_row;                            \
            for (int64_t i = 0; i < m; i++) {                                                                  \
                const operands *o = row_ops + i;                                                               \
                vf total[RB];                                                                                  \
                call;                                                                                          \
                _mm_storeu_ps(src->y + i * src->n + b0, hsum4(total[0], total[1], total[2], total[3]));       \
            }                                                                                                  \
        }                                                                                                      \
    }
#define AS_ROWS(suffix, call) ROWS_PATH(rows##suffix, call)
PLANES_PATHS(AS_ROWS)

/* A planes layout's two wrappers of one decode */
typedef struct {
    void (*dot)(const uint8_t *const q_in[RB], const float *const s_in[RB], const float *const o_in[RB],
                const operands *o, vf out[RB]);
    void (*rows)(const row_source *src, const operands *row_ops, int64_t m, int64_t r0, int64_t r1);
} planes_fns;
#define AS_FNS(suffix, call) static const planes_fns fns##suffix = {dot##suffix, rows##suffix};
PLANES_PATHS(AS_FNS)

/* The decode for these operands (4 bits, or 8-bit integer codes in byte planes) */
static const planes_fns *planes_path(const operands *o) {
    if (o->bits == 4) {
#if defined(MP_VNNI)
        if (o->int8) return &fns4_i8;
#endif
#if defined(MP_AVX2)
        if (o->int16) return &fns4_i16;
#endif
#if defined(MP_BF16)
        if (o->pairs) return &fns4_pairs;
#endif
        return o->linear ? &fns4_linear : &fns4_table;
    }
#if defined(MP_VNNI)
    if (o->int8) return &fns8_i8;
    if (o->int16) return &fns8_i16;
#endif
    return &fns8_planes;
}
#endif

/* out[r] = row r's product with x, offsets included for 4 bits (8 bits: the caller adds them): the vector part,
   then in scalar code what it left (4 bits: codes past the last whole 8; 8 bits: columns of each group past its
   whole vector steps). */
static void block_dot(const uint8_t *const q[RB], const float *const scales[RB], const float *const offsets[RB],
                      const operands *o, float out[RB]) {
    float rest[RB] = {0};
    int planes = o->bits == 4 || o->planes8;   /* the vector part took offsets too */
    int64_t from_planes = 0;   /* planes: the first code the vector part left */
#if defined(MP_VECTOR)
    vf total[RB];
    if (planes) {
        planes_path(o)->dot(q, scales, offsets, o, total);
        int per_lane = o->bits == 4 ? 8 : 4;
        from_planes = o->k / per_lane * per_lane;
    } else if (o->kind == KIND_INT) {
        dot8_int(q, scales, offsets, o, total);
    } else if (o->kind == KIND_E4M3) {
        dot8_e4m3(q, scales, offsets, o, total);
    } else {
        dot8_e5m2(q, scales, offsets, o, total);
    }
#endif
    /* planes: only the groups from the one holding from_planes on have codes left (none when K is a multiple of
       the lane's codes, the usual case: no loop over every group per block of rows) */
    int64_t first = !planes ? 0 : from_planes < o->k ? from_planes / o->group : o->groups;  /* planes: K % 8 == 0 */
    for (int64_t g = first; g < o->groups; g++) {
        int64_t start = g * o->group, end = start + o->group <= o->k ? start + o->group : o->k, from = start;
        if (planes) from = from_planes > start ? from_planes : start;
#if defined(MP_VECTOR)
        else from = start + (end - start) / VW * VW;
#endif
        if (from >= end) continue;
        for (int r = 0; r < RB; r++) {
            float t = 0.0f, xsum = 0.0f;
            for (int64_t j = from; j < end; j++) {
                float level;
                if (o->bits == 4) {
                    uint8_t code = (q[r][j / 2] >> (4 * (j & 1))) & 15;
                    level = o->linear ? (float)code + o->bias : o->table[code];
                    xsum += o->x[j];
                } else {
                    level = level8_scalar(q[r][j], o->kind, o->bias, o->unit);
                    xsum += o->x[j];
                }
                t += level * o->x[j];
            }
            rest[r] += t * scales[r][g] + (planes && o->has_offset ? offsets[r][g] * xsum : 0.0f);
        }
    }
#if defined(MP_VECTOR)
    _mm_storeu_ps(out, _mm_add_ps(hsum4(total[0], total[1], total[2], total[3]), _mm_loadu_ps(rest)));
#else
    for (int r = 0; r < RB; r++) out[r] = rest[r];
#endif
}

/* Whether superblocks of per_lane * VW codes can take this group's scales (see the top of the file). */
static int group_fits(int64_t group, int64_t k, int per_lane) {
    int64_t span = per_lane * VW;
    return group >= k || (group < span ? span % group == 0 && group % per_lane == 0 : group % span == 0);
}


/* x's int8 layout for one row (see the top of the file): codes (even / odd byte vectors per superblock for 4 bits, in
   order for 8 bits), and per lane its x block's scale, scale times its codes' sum, and its float x sum. wide: int16
   codes (scale max|x| / 32767) in per_lane / 2 vectors per superblock, vector p holding lane j's pair (x[j0 + p],
   x[j0 + p + per_lane / 2]), j0 its first code: 8 bits (x[4j], x[4j + 2]) then (x[4j + 1], x[4j + 3]); 4 bits
   (x[8j + p], x[8j + p + 4]) for p < 4. */
static void quantize_x(const float *x, int64_t k, int per_lane, int64_t lanes, int wide, void *codes, float *xscale,
                       float *xqsum, float *xsum) {
    const float top_code = wide ? 32767.0f : 127.0f;
    memset(codes, 0, (size_t)(lanes * per_lane * (wide ? 2 : 1)));
    int64_t whole = k / per_lane, end = whole * per_lane;
    float d = 0.0f, inv = 0.0f;
    for (int64_t lane = 0; lane < lanes; lane++) {
        int64_t j0 = lane * per_lane;
        if (lane >= whole) {   /* lanes past the codes: zeros */
            xscale[lane] = xqsum[lane] = xsum[lane] = 0.0f;
            continue;
        }
        if (j0 % 32 == 0) {   /* a lane starting a block of 32: the block's scale (a lane never spans two) */
            int64_t b1 = j0 + 32 < end ? j0 + 32 : end;
            float top = 0.0f;
            for (int64_t j = j0; j < b1; j++) top = fabsf(x[j]) > top ? fabsf(x[j]) : top;
            d = top / top_code, inv = top > 0.0f ? top_code / top : 0.0f;
        }
        int64_t c = lane / VW, lj = lane % VW;
        float qs = 0.0f, xs = 0.0f;
        for (int at = 0; at < per_lane; at++) {
            float v = nearbyintf(x[j0 + at] * inv);
            if (wide) {   /* pair at % half of lane lj in vector at % half of superblock c, word at / half of it */
                int half = per_lane / 2;
                ((int16_t *)codes)[(half * c + at % half) * 2 * VW + 2 * lj + at / half] = (int16_t)(int)v;
            } else {   /* 4 bits: byte (at / 2) of lane lj in the even (at even) or odd vector of superblock c */
                int64_t pos = per_lane == 8 ? (2 * c + (at & 1)) * 64 + 4 * lj + at / 2 : j0 + at;
                ((uint8_t *)codes)[pos] = (uint8_t)(int8_t)(int)v;
            }
            qs += v;
            xs += x[j0 + at];
        }
        xscale[lane] = d, xqsum[lane] = d * qs, xsum[lane] = xs;
    }
}

/* Point o at one row of x's layout (xp: that row's part of the scratch; x_row: the row itself, or NULL for pairs,
   whose bfloat16-rounded copy follows the planes in xp). */
static void at_x_row(operands *o, const float *xp, int code_floats, int64_t lanes, const float *x_row) {
    int per_lane = o->bits == 4 ? 8 : 4;
    o->xp = xp;
    o->xsum = xp + code_floats * lanes;
    o->xscale = o->xsum + lanes;
    o->xqsum = o->xsum + 2 * lanes;
    o->x = x_row ? x_row : xp + (per_lane + 1) * lanes;
}

#define WHOLE_ROWS_MAX_M 64   /* rows of x whose operands the rows* functions take (on the stack) */

/* y (m, n) float32 = x (m, k) float32 @ W^T (see the top of the file). products: MP_PRODUCTS_BF16 lets linear
   4-bit formats take bfloat16 products, MP_PRODUCTS_INT8 also lets them and 8-bit integer codes take int8 x (each
   where the build has it; others keep float32 products). Returns MP_OK, MP_NO_MEMORY, or MP_BAD_GROUP (4 bits: a
   group length the vector part cannot take). */
int mp_gemv(const mp_weight *w, const float *x, int64_t m, float *y, int products) {
    const uint8_t *qdata = w->qdata;
    const float *table = w->table;
    const void *scale = w->scale, *offset = w->offset;
    int64_t q_row = w->q_row, s_n = w->s_n, s_g = w->s_g, o_n = w->o_n, o_g = w->o_g;
    int64_t n = w->n, k = w->k, group = w->group;
    float bias = w->bias, unit = w->unit;
    int bits = w->bits, linear = w->linear, kind = w->kind, scale_type = w->scale_type, offset_type = w->offset_type;
    int64_t groups = (k + group - 1) / group;
    if (bits == 4 && !group_fits(group, k, 8)) return MP_BAD_GROUP;
#if defined(MP_VECTOR)
    int planes8 = bits == 8 && kind == KIND_INT && group_fits(group, k, 4);
#else
    int planes8 = 0;
#endif
#if defined(MP_VNNI)
    int int8 = products == MP_PRODUCTS_INT8 && ((bits == 4 && linear) || planes8);
#else
    int int8 = 0;
#endif
#if defined(MP_BF16)
    int pairs = products >= MP_PRODUCTS_BF16 && bits == 4 && linear && !int8;
#else
    int pairs = 0;
#endif
#if defined(MP_VNNI)
    /* 8-bit integer codes where bfloat16 x would do: x in int16 (a rounding finer than bfloat16's), vpdpwssd */
    int int16 = products >= MP_PRODUCTS_BF16 && planes8 && !int8;
#elif defined(MP_AVX2)
    /* AVX2: linear 4-bit codes (no bfloat16 pairs there), vpmaddwd (superblocks_int) */
    int int16 = products >= MP_PRODUCTS_BF16 && bits == 4 && linear;
#else
    int int16 = 0;
#endif
    int per_lane = bits == 4 ? 8 : 4;   /* codes per lane of the planes layout */
    int64_t lanes = (k / per_lane + VW - 1) / VW * VW;   /* lane positions, in whole vectors */
    int planes = bits == 4 || planes8;
    /* per row of x: its planes (per_lane per lane), lane sums and bfloat16-rounded x (pairs); or, int8 / int16: its
       codes (per_lane / 4 or per_lane / 2 floats' bytes per lane), lane sums, scales and scaled code sums */
    int code_floats = int8 ? per_lane / 4 : int16 ? per_lane / 2 : per_lane;   /* per lane, for x's codes or planes */
    int64_t per_x = int8 || int16 ? (code_floats + 3) * lanes : planes ? (per_lane + 1) * lanes + (pairs ? k : 0) : 0;
    int sums8 = bits == 8 && offset != NULL && !planes8;
    /* scratch: per row of x, its planes layout or its group sums (other 8-bit layouts' offsets); a block's scales
       and offsets (+ a vector's worth read past the last of them by the permuted loads) */
    size_t need = (size_t)(m * per_x) + (size_t)(sums8 ? m * groups : 0) + 2 * RB * (size_t)groups + 2 * VW + 16;
    float *buf = scratch(need);
    if (!buf) return MP_NO_MEMORY;
    float *sums = buf + m * per_x, *sblock = sums + (sums8 ? m * groups : 0), *oblock = sblock + RB * groups + VW;
    /* the permuted loads of the last rows' parameters read up to a vector past them (lanes past the row's codes,
       whose products are 0): zeros there, not what an earlier call left in the scratch (0 x NaN is NaN) */
    memset(sblock + RB * groups, 0, VW * sizeof(float));
    memset(oblock + RB * groups, 0, VW * sizeof(float));
    for (int64_t i = 0; (int8 || int16) && i < m; i++) {
        float *xp = buf + i * per_x, *xsum = xp + code_floats * lanes;
        quantize_x(x + i * k, k, per_lane, lanes, int16, xp, xsum + lanes, xsum + 2 * lanes, xsum);
    }
    for (int64_t i = 0; planes && !int8 && !int16 && i < m; i++) {
        float *xp = buf + i * per_x, *xsum = xp + per_lane * lanes, *xr = xsum + lanes;
        const float *xi = x + i * k;
        if (pairs) {
            for (int64_t j = 0; j < k; j++) xr[j] = bf16_round(xi[j]);
            xi = xr;
        }
        for (int64_t lane = 0; lane < lanes; lane++) {
            int64_t c = lane / VW, j = lane % VW, whole = lane < k / per_lane;
            const float *xl = xi + per_lane * lane;
            float t = 0.0f;
            for (int p = 0; p < per_lane; p++) t += whole ? xl[p] : 0.0f;
            xsum[lane] = t;
            if (pairs) {   /* dword j of pair p: x[8 lane + p] (low half), x[8 lane + p + 4] (high half) */
                uint32_t *xb = (uint32_t *)xp;
                for (int p = 0; p < 4; p++) {
                    uint32_t lo = 0, hi = 0;
                    if (whole) {
                        memcpy(&lo, xl + p, 4);
                        memcpy(&hi, xl + p + 4, 4);
                    }
                    xb[(4 * c + p) * VW + j] = (lo >> 16) | (hi & 0xFFFF0000u);
                }
            } else {
                for (int p = 0; p < per_lane; p++) xp[(per_lane * c + p) * VW + j] = whole ? xl[p] : 0.0f;
            }
        }
    }
    if (sums8) {
        for (int64_t i = 0; i < m; i++)
            for (int64_t g = 0; g < groups; g++) {
                int64_t end = (g + 1) * group <= k ? (g + 1) * group : k;
                float t = 0.0f;
                for (int64_t j = g * group; j < end; j++) t += x[i * k + j];
                sums[i * groups + g] = t;
            }
    }
#if defined(MP_VECTOR)
    int64_t row_bytes = bits == 4 ? (k + 1) / 2 : k;
#endif
    operands o = {.bits = bits, .table = table, .linear = linear, .pairs = pairs, .kind = kind, .planes8 = planes8,
                  .bias = bias, .unit = unit, .corr = pairs ? bias - 128.0f : bias, .int8 = int8, .int16 = int16,
                  .has_offset = offset != NULL, .k = k, .group = group, .groups = groups};
    int64_t done = 0;   /* rows already computed */
#if defined(MP_VECTOR)
    if (planes) o.sp = make_spreading(group, per_lane);
    if (m <= WHOLE_ROWS_MAX_M && planes && k % per_lane == 0 && !sums8 && n >= RB) {   /* decode-sized: rows* */
        operands row_ops[WHOLE_ROWS_MAX_M];
        for (int64_t i = 0; i < m; i++) {
            row_ops[i] = o;
            at_x_row(&row_ops[i], buf + i * per_x, code_floats, lanes, pairs ? NULL : x + i * k);
        }
        row_source src = {.qdata = qdata, .q_row = q_row, .row_bytes = row_bytes, .n = n, .scale = scale,
                          .offset = offset, .scale_type = scale_type, .offset_type = offset_type, .s_n = s_n,
                          .s_g = s_g, .o_n = o_n, .o_g = o_g, .sblock = sblock, .oblock = oblock, .y = y};
        done = n / RB * RB;
        planes_path(&o)->rows(&src, row_ops, m, 0, done);
    }
#endif
    for (int64_t r0 = done; r0 < n; r0 += RB) {
        const uint8_t *q[RB];
        const float *s[RB], *off[RB];
        int live = n - r0 < RB ? (int)(n - r0) : RB;
#if defined(MP_VECTOR)
        prefetch_block(qdata, q_row, row_bytes, r0 + PREFETCH_BLOCKS * RB, n);
#endif
        for (int r = 0; r < RB; r++) {
            int64_t row = r0 + (r < live ? r : live - 1);   /* a short last block repeats its last row */
            q[r] = qdata + row * q_row;
            s[r] = sblock + r * groups;
            off[r] = oblock + r * groups;
            if (live < RB) {
                load_params(scale, scale_type, row * s_n, s_g, groups, sblock + r * groups);
                if (offset) load_params(offset, offset_type, row * o_n, o_g, groups, oblock + r * groups);
            }
        }
        if (live == RB) {
            load_block_params(scale, scale_type, r0, s_n, s_g, groups, sblock);
            if (offset) load_block_params(offset, offset_type, r0, o_n, o_g, groups, oblock);
        }
        for (int64_t i = 0; i < m; i++) {
            float out[RB];
            at_x_row(&o, buf + i * per_x, code_floats, lanes, pairs ? NULL : x + i * k);
            block_dot(q, s, off, &o, out);
            for (int r = 0; r < live; r++) {
                float v = out[r];
                if (sums8)
                    for (int64_t g = 0; g < groups; g++) v += off[r][g] * sums[i * groups + g];
                y[i * n + r0 + r] = v;
            }
        }
    }
    return MP_OK;
}
