/* The native CPU library's shared declarations: cpu_gemv.c (matrix-vector products on packed weights) and
   cpu_step.c (a decoder's whole decode step), compiled together by cpu_native.py. */

#ifndef MODELPRESS_CPU_NATIVE_H
#define MODELPRESS_CPU_NATIVE_H

#include <stdint.h>

/* A packed weight as the kernel reads it (cpu_native.py fills one per layer, once). table: 16 levels (4 bits);
   linear: those levels are code + bias; kind / bias / unit: the 8-bit decode. scale / offset: type SCALE_*,
   element (row r, group g) at r * s_n + g * s_g (strides 0 for a shared value); offset NULL for scale-only
   formats. */
typedef struct {
    const uint8_t *qdata;
    int64_t q_row;
    const float *table;
    const void *scale, *offset;
    int64_t s_n, s_g, o_n, o_g, n, k, group;
    float bias, unit;
    int32_t bits, linear, kind, scale_type, offset_type;
} mp_weight;

enum { MP_OK = 0, MP_NO_MEMORY = -1, MP_BAD_GROUP = -2 };
/* what mp_gemv may multiply with (cpu_gemv.c): float32 products; bfloat16 x for linear 4-bit formats; int8 x for
   those and 8-bit integer codes (each where the build has it) */
enum { MP_PRODUCTS_F32 = 0, MP_PRODUCTS_BF16 = 1, MP_PRODUCTS_INT8 = 2 };

/* y (m, n) float32 = x (m, k) float32 @ W^T (cpu_gemv.c) */
int mp_gemv(const mp_weight *w, const float *x, int64_t m, float *y, int products);

#endif
