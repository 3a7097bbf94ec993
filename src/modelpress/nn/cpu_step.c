/* One decode step of a Llama-style decoder for the CPU, in one call: every block's norms, projections, rotary
   embedding, attention over the KV cache and gated MLP, then the final norm. Python drives it one token at a time
   (inference/native_decode.py), so a token costs one foreign call instead of ~30 PyTorch operators per block;
   a few tokens at once (speculative decoding's verify pass) read each weight once.

   What it computes is what transformers' LlamaDecoderLayer computes in float32 (also Mistral's, Qwen2's, Qwen3's):
     x = h; h = RMSNorm(h) * w_attn
     q, k, v = h Wq^T + bq, h Wk^T + bk, h Wv^T + bv            (heads of head_dim; grouped-query: kv_heads)
     q, k = RMSNorm_head(q) * w_q, RMSNorm_head(k) * w_k         (Qwen3's q_norm / k_norm, when given)
     q, k = q cos + rotate_half(q) sin, k cos + rotate_half(k) sin   (cos, sin of this position, from a table)
     K[pos], V[pos] = k, v
     a_h = softmax(q_h K_g^T * scaling) V_g                      (g = h / (heads / kv_heads), positions 0..pos)
     h = x + a Wo^T + bo
     x = h; h = x + (silu(RMSNorm(h) * w_mlp Wg^T) * (RMSNorm(h) * w_mlp Wu^T)) Wd^T
   RMSNorm(v) = v * 1 / sqrt(mean(v^2) + eps), then times its weight, as transformers orders it.
   The cos and sin tables are the model's own rotary module's output for every position (any static rope type).
   Projections are packed weights (mp_gemv, cpu_gemv.c) or float32 ones (gemv_f32 below); a packed weight with an
   input permutation (GPTQ's act-order) reads x gathered first. Sums are float32, in another order than PyTorch's
   kernels: results agree to float32 rounding, not bit for bit. Single-threaded, like the kernels it calls. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_native.h"

/* A projection: a packed weight, or a float32 one (packed NULL) with `weight` (n, k), rows contiguous. bias: n
   values or NULL. perm: k indices, x read as x[perm[j]] (or NULL). */
typedef struct {
    const mp_weight *packed;
    const float *weight;
    const float *bias;
    const int64_t *perm;
    int64_t n, k;
} mp_linear;

/* One decoder block. Norm weights: hidden values (attn_norm, mlp_norm), head_dim values (q_norm, k_norm, or NULL
   where the block has none). Caches: (kv_heads, capacity, head_dim) float32, written at the step's position. */
typedef struct {
    mp_linear q, k, v, o, gate, up, down;
    const float *attn_norm, *mlp_norm, *q_norm, *k_norm;
    float *k_cache, *v_cache;
    int64_t heads, kv_heads;
} mp_block;

/* The decoder. cos / sin: (capacity, head_dim) tables; work: mp_forward_work(d, tokens) floats of scratch.
   products: what packed weights multiply with, MP_PRODUCTS_* (as in mp_gemv). */
typedef struct {
    const mp_block *blocks;
    const float *final_norm;
    const float *cos, *sin;
    float *work;
    int64_t n_blocks, hidden, head_dim, capacity;
    float eps, scaling;
    int32_t products;
} mp_decoder;

enum { MP_BAD_POSITION = -3, MP_BAD_SHAPE = -4 };

/* ---- float32 vectors through the compiler's vector extension (AVX-512, AVX2 or plain code alike) ---- */

#define W 16
typedef float vec __attribute__((vector_size(W * sizeof(float))));

static inline vec vload(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }

static inline float vsum(vec v) {
    float t = 0.0f;
    for (int i = 0; i < W; i++) t += v[i];
    return t;
}

static float dot(const float *a, const float *b, int64_t n) {
    vec acc0 = {0}, acc1 = {0};
    int64_t j = 0;
    for (; j + 2 * W <= n; j += 2 * W) {
        acc0 += vload(a + j) * vload(b + j);
        acc1 += vload(a + j + W) * vload(b + j + W);
    }
    for (; j + W <= n; j += W) acc0 += vload(a + j) * vload(b + j);
    float t = vsum(acc0 + acc1);
    for (; j < n; j++) t += a[j] * b[j];
    return t;
}

/* y (m, n) = x (m, k) W^T, W (n, k): four rows of W at a time, each load of x serving four rows, and every row
   of x read against those four rows while they are in L1 */
static void gemv_f32(const float *w, const float *x, int64_t m, int64_t n, int64_t k, float *y) {
    int64_t r = 0;
    for (; r + 4 <= n; r += 4) {
        const float *w0 = w + r * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
        for (int64_t i = 0; i < m; i++) {
            const float *xi = x + i * k;
            vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            int64_t j = 0;
            for (; j + W <= k; j += W) {
                vec xv = vload(xi + j);
                a0 += vload(w0 + j) * xv;
                a1 += vload(w1 + j) * xv;
                a2 += vload(w2 + j) * xv;
                a3 += vload(w3 + j) * xv;
            }
            float t0 = vsum(a0), t1 = vsum(a1), t2 = vsum(a2), t3 = vsum(a3);
            for (; j < k; j++) {
                t0 += w0[j] * xi[j];
                t1 += w1[j] * xi[j];
                t2 += w2[j] * xi[j];
                t3 += w3[j] * xi[j];
            }
            float *yi = y + i * n + r;
            yi[0] = t0;
            yi[1] = t1;
            yi[2] = t2;
            yi[3] = t3;
        }
    }
    for (; r < n; r++)
        for (int64_t i = 0; i < m; i++) y[i * n + r] = dot(w + r * k, x + i * k, k);
}

/* y (m, n) = x (m, k) W^T + b; gather: m k floats of scratch for a permuted x */
static int project(const mp_linear *l, const float *x, int64_t m, float *y, float *gather, int products) {
    int64_t n = l->n, k = l->k;
    if (l->perm) {
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < k; j++) gather[i * k + j] = x[i * k + l->perm[j]];
        x = gather;
    }
    if (l->packed) {
        int status = mp_gemv(l->packed, x, m, y, products);
        if (status != MP_OK) return status;
    } else {
        gemv_f32(l->weight, x, m, n, k, y);
    }
    if (l->bias)
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) y[i * n + j] += l->bias[j];
    return MP_OK;
}

/* out = v / sqrt(mean(v^2) + eps) * w (out may be v) */
static void rms_norm(const float *v, const float *w, int64_t n, float eps, float *out) {
    float inv = 1.0f / sqrtf(dot(v, v, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (v[i] * inv);
}

/* v (d) = v cos + rotate_half(v) sin, rotate_half(v) = (-v[d/2:], v[:d/2]) */
static void rotate(float *v, const float *cos, const float *sin, int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* The widest vectors of any block: q|k|v together, the attention output or MLP's hidden units, and an input */
typedef struct { int64_t qkv, wide, widest_k; } widths;

static widths widths_of(const mp_decoder *d) {
    widths w = {0, 0, d->hidden};
    for (int64_t b = 0; b < d->n_blocks; b++) {
        const mp_block *blk = d->blocks + b;
        w.qkv = max64(w.qkv, blk->q.n + blk->k.n + blk->v.n);
        w.wide = max64(w.wide, max64(blk->gate.n, blk->o.k));
        w.widest_k = max64(w.widest_k, max64(blk->o.k, blk->down.k));
    }
    return w;
}

/* The scratch floats mp_forward needs for `tokens` tokens (its `work` must hold as many): per token the normed h,
   q|k|v, the attention output (then the gate's), the up projection's, a gathered input and a projection's output;
   and one set of scores. */
int64_t mp_forward_work(const mp_decoder *d, int64_t tokens) {
    widths w = widths_of(d);
    return tokens * (d->hidden + w.qkv + 2 * w.wide + w.widest_k + d->hidden) + d->capacity;
}

static int check_block(const mp_decoder *d, const mp_block *b) {
    int64_t hd = d->head_dim, hidden = d->hidden;
    if (b->heads <= 0 || b->kv_heads <= 0 || b->heads % b->kv_heads) return MP_BAD_SHAPE;
    if (b->q.n != b->heads * hd || b->k.n != b->kv_heads * hd || b->v.n != b->kv_heads * hd) return MP_BAD_SHAPE;
    if (b->q.k != hidden || b->k.k != hidden || b->v.k != hidden || b->o.k != b->heads * hd || b->o.n != hidden)
        return MP_BAD_SHAPE;
    if (b->gate.k != hidden || b->up.k != hidden || b->up.n != b->gate.n || b->down.k != b->gate.n ||
        b->down.n != hidden)
        return MP_BAD_SHAPE;
    return MP_OK;
}

/* Checks every block's shapes once (Python calls it when it builds the decoder). */
int mp_check(const mp_decoder *d) {
    if (d->head_dim <= 0 || d->head_dim % 2 || d->hidden <= 0 || d->capacity <= 0) return MP_BAD_SHAPE;
    for (int64_t b = 0; b < d->n_blocks; b++) {
        int status = check_block(d, d->blocks + b);
        if (status != MP_OK) return status;
    }
    return MP_OK;
}

/* out (heads * head_dim) of the token at position pos: its q against the cache's positions 0..pos */
static void attend(const mp_block *b, const float *q, const mp_decoder *d, int64_t pos, float *scores, float *out) {
    int64_t hd = d->head_dim, cap = d->capacity, group = b->heads / b->kv_heads;
    for (int64_t h = 0; h < b->heads; h++) {
        const float *qh = q + h * hd;
        const float *keys = b->k_cache + (h / group) * cap * hd, *values = b->v_cache + (h / group) * cap * hd;
        float top = -INFINITY;
        for (int64_t t = 0; t <= pos; t++) {
            scores[t] = dot(qh, keys + t * hd, hd) * d->scaling;
            if (scores[t] > top) top = scores[t];
        }
        float total = 0.0f;
        for (int64_t t = 0; t <= pos; t++) {
            scores[t] = expf(scores[t] - top);
            total += scores[t];
        }
        float *oh = out + h * hd;
        for (int64_t i = 0; i < hd; i++) oh[i] = 0.0f;
        for (int64_t t = 0; t <= pos; t++) {
            const float *vt = values + t * hd;
            float p = scores[t] / total;
            for (int64_t i = 0; i < hd; i++) oh[i] += p * vt[i];
        }
    }
}

/* q and k of `tokens` tokens from position pos: per-head norms (where the block has them) and the rotation; k and
   v written into the cache */
static void position_heads(const mp_block *b, const mp_decoder *d, float *q, float *k, const float *v,
                           int64_t tokens, int64_t pos) {
    int64_t hd = d->head_dim;
    for (int64_t t = 0; t < tokens; t++) {
        const float *cos = d->cos + (pos + t) * hd, *sin = d->sin + (pos + t) * hd;
        float *qt = q + t * b->q.n, *kt = k + t * b->k.n;
        const float *vt = v + t * b->v.n;
        for (int64_t i = 0; i < b->heads; i++) {
            if (b->q_norm) rms_norm(qt + i * hd, b->q_norm, hd, d->eps, qt + i * hd);
            rotate(qt + i * hd, cos, sin, hd);
        }
        for (int64_t i = 0; i < b->kv_heads; i++) {
            if (b->k_norm) rms_norm(kt + i * hd, b->k_norm, hd, d->eps, kt + i * hd);
            rotate(kt + i * hd, cos, sin, hd);
            memcpy(b->k_cache + (i * d->capacity + pos + t) * hd, kt + i * hd, hd * sizeof(float));
            memcpy(b->v_cache + (i * d->capacity + pos + t) * hd, vt + i * hd, hd * sizeof(float));
        }
    }
}

#define TRY(call) do { int status_ = (call); if (status_ != MP_OK) return status_; } while (0)

/* h (tokens, hidden): in, the tokens' embeddings; out, their final-normed hidden states, which the head reads.
   The tokens sit at positions pos.. pos + tokens - 1 (the cache holds positions 0..pos-1 already); each attends to
   the positions up to its own. Every projection is one call over all the tokens, so a weight is read once per
   call (speculative decoding's verify pass). Returns MP_OK or an error code (h is then undefined). */
int mp_forward(const mp_decoder *d, float *h, int64_t tokens, int64_t pos) {
    if (tokens <= 0 || pos < 0 || pos + tokens > d->capacity) return MP_BAD_POSITION;
    int64_t hidden = d->hidden;
    widths w = widths_of(d);
    float *xn = d->work, *q = xn + tokens * hidden, *att = q + tokens * w.qkv, *up = att + tokens * w.wide;
    float *gather = up + tokens * w.wide, *y = gather + tokens * w.widest_k, *scores = y + tokens * hidden;
    for (int64_t bi = 0; bi < d->n_blocks; bi++) {
        const mp_block *b = d->blocks + bi;
        float *k = q + tokens * b->q.n, *v = k + tokens * b->k.n;
        for (int64_t t = 0; t < tokens; t++) rms_norm(h + t * hidden, b->attn_norm, hidden, d->eps, xn + t * hidden);
        TRY(project(&b->q, xn, tokens, q, gather, d->products));
        TRY(project(&b->k, xn, tokens, k, gather, d->products));
        TRY(project(&b->v, xn, tokens, v, gather, d->products));
        position_heads(b, d, q, k, v, tokens, pos);
        for (int64_t t = 0; t < tokens; t++) attend(b, q + t * b->q.n, d, pos + t, scores, att + t * b->o.k);
        TRY(project(&b->o, att, tokens, y, gather, d->products));
        for (int64_t i = 0; i < tokens * hidden; i++) h[i] += y[i];
        for (int64_t t = 0; t < tokens; t++) rms_norm(h + t * hidden, b->mlp_norm, hidden, d->eps, xn + t * hidden);
        TRY(project(&b->gate, xn, tokens, att, gather, d->products));
        TRY(project(&b->up, xn, tokens, up, gather, d->products));
        for (int64_t i = 0; i < tokens * b->gate.n; i++) att[i] = silu(att[i]) * up[i];
        TRY(project(&b->down, att, tokens, y, gather, d->products));
        for (int64_t i = 0; i < tokens * hidden; i++) h[i] += y[i];
    }
    for (int64_t t = 0; t < tokens; t++) rms_norm(h + t * hidden, d->final_norm, hidden, d->eps, h + t * hidden);
    return MP_OK;
}
