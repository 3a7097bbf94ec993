/* One decode step of a Llama-style decoder for the CPU, in one call: every block's norms, projections, rotary
   embedding, attention over the KV cache and gated MLP, then the final norm and the output head. Python drives it
   one token at a time (inference/native_decode.py), so a token costs one foreign call instead of ~30 PyTorch
   operators per block; a few tokens at once (a short prompt, speculative decoding's verify pass) read each weight
   once.

   What it computes is what transformers' LlamaDecoderLayer computes in float32 (also Mistral's, Qwen2's, Qwen3's,
   Gemma 2's and Gemma 3's):
     x = h; h = RMSNorm(h) * w_attn
     q, k, v = h Wq^T + bq, h Wk^T + bk, h Wv^T + bv            (heads of head_dim; grouped-query: kv_heads)
     q, k = RMSNorm_head(q) * w_q, RMSNorm_head(k) * w_k         (Qwen3's and Gemma 3's q_norm / k_norm, when given)
     q, k = q cos + rotate_half(q) sin, k cos + rotate_half(k) sin   (cos, sin of this position, from a table)
     K[pos], V[pos] = k, v                                       (or, an int8 cache: their codes and scales)
     s_t = q_h K_g[t]^T * scaling                                (g = h / (heads / kv_heads))
     s_t = cap tanh(s_t / cap)                                   (Gemma 2's attention soft-capping, when given)
     a_h = softmax(s) V_g                 (positions 0..pos, or the last `window` of them in a sliding-window block)
     h = x + RMSNorm(a Wo^T + bo) * w_post_attn                 (Gemma's norm of the output, when given; else none)
     x = h; h = x + RMSNorm(act(RMSNorm(h) * w_mlp Wg^T) * (RMSNorm(h) * w_mlp Wu^T)) Wd^T) * w_post_mlp
   act: SiLU, or GELU's tanh approximation (Gemma); the post-MLP norm only where given.
   RMSNorm(v) = v * 1 / sqrt(mean(v^2) + eps), then times its weight, as transformers orders it (Gemma's weights
   are given as 1 + w, which is what Gemma's norms multiply by). Output logits may be soft-capped as attention's are.
   The cos and sin tables are the model's own rotary module's output for every position (any static rope type);
   a block may have its own (Gemma 3's sliding-window layers rotate with another base).
   Projections are packed weights (mp_gemv, cpu_gemv.c) or float32 ones (gemv_f32 below); a packed weight with an
   input permutation (GPTQ's act-order) reads x gathered first. Sums are float32, in another order than PyTorch's
   kernels: results agree to float32 rounding, not bit for bit. A forward call splits every projection's rows
   over a pool of threads (below; the same numbers at any thread count), for one token or several. */

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define RELAX() _mm_pause()
#else
#define RELAX() ((void)0)
#endif

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

/* One decoder block. Norm weights: hidden values (attn_norm, mlp_norm; post_attn_norm, post_mlp_norm: Gemma's norms
   of the attention's and the MLP's outputs, or NULL), head_dim values (q_norm, k_norm, or NULL where the block has
   none). Caches, written at the step's position: k_cache, v_cache (kv_heads, capacity, head_dim) float32; or, where
   k_codes is set, int8 codes of that shape (k_codes, v_codes) and a float32 scale per (kv_head, position)
   (k_scales, v_scales): the `int8` KV cache (quantize_state). cos, sin: the block's own rope table, or NULL for the
   decoder's. window: a sliding-window block attends to its last `window` positions (its own included); 0: all. */
typedef struct {
    mp_linear q, k, v, o, gate, up, down;
    const float *attn_norm, *mlp_norm, *q_norm, *k_norm;
    float *k_cache, *v_cache;
    int8_t *k_codes, *v_codes;
    float *k_scales, *v_scales;
    int64_t heads, kv_heads;
    const float *post_attn_norm, *post_mlp_norm;
    const float *cos, *sin;
    int64_t window;
} mp_block;

/* The decoder. cos / sin: (capacity, head_dim) tables; work: mp_forward_work(d, tokens) floats of scratch.
   head: the output head (n = 0: none, the caller applies its own to h), writing (tokens - logits_from, head.n)
   logits.
   products: what packed weights multiply with, MP_PRODUCTS_* (as in mp_gemv).
   act: the MLP's activation, MP_ACT_*. attn_softcap, logit_softcap: soft-capping of attention scores and of the
   logits (cap tanh(s / cap)); 0: none. */
typedef struct {
    const mp_block *blocks;
    const float *final_norm;
    const float *cos, *sin;
    float *work;
    int64_t n_blocks, hidden, head_dim, capacity;
    float eps, scaling;
    int32_t products;
    int32_t threads;   /* forward calls split each projection's rows over this many threads (1: none) */
    mp_linear head;
    float *logits;
    int64_t logits_from;   /* the head runs for tokens logits_from.. of a call (a prompt: its last one only) */
    int32_t act;
    float attn_softcap, logit_softcap;
} mp_decoder;

enum { MP_BAD_POSITION = -3, MP_BAD_SHAPE = -4, MP_NO_LOGITS = -5, MP_NO_CACHE = -6 };
enum { MP_ACT_SILU = 0, MP_ACT_GELU_TANH = 1 };

/* ---- float32 vectors through the compiler's vector extension (AVX-512, AVX2 or plain code alike) ---- */

#define W 16
typedef float vec __attribute__((vector_size(W * sizeof(float))));

static inline vec vload(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }

/* the lanes' sum by halves (a tree of vector adds, not 15 dependent scalar adds; memcpy between vector widths,
   which compilers turn into register moves, keeps this to the vector extension GCC and clang share) */
typedef float half_vec __attribute__((vector_size(W / 2 * sizeof(float))));
typedef float quarter_vec __attribute__((vector_size(W / 4 * sizeof(float))));
static inline float vsum(vec v) {
    half_vec lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    lo += hi;
    quarter_vec a, c;
    memcpy(&a, &lo, sizeof a);
    memcpy(&c, (const char *)&lo + sizeof a, sizeof c);
    a += c;
    float t = 0.0f;
    for (int i = 0; i < W / 4; i++) t += a[i];
    return t;
}

static inline float dot(const float *a, const float *b, int64_t n) {
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

/* out[r] = a . rows[r] (n floats each) for r < 4: each load of a serves four rows, and the four sums' reductions
   are independent of each other */
static inline void dot4(const float *a, const float *r0, const float *r1, const float *r2, const float *r3, int64_t n,
                        float out[4]) {
    vec s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t j = 0;
    for (; j + W <= n; j += W) {
        vec av = vload(a + j);
        s0 += av * vload(r0 + j);
        s1 += av * vload(r1 + j);
        s2 += av * vload(r2 + j);
        s3 += av * vload(r3 + j);
    }
    out[0] = vsum(s0), out[1] = vsum(s1), out[2] = vsum(s2), out[3] = vsum(s3);
    for (; j < n; j++) {
        out[0] += a[j] * r0[j];
        out[1] += a[j] * r1[j];
        out[2] += a[j] * r2[j];
        out[3] += a[j] * r3[j];
    }
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

/* Rows r0..r1 of a packed weight as a weight of their own (the same codes and scales, addressed from row r0) */
static mp_weight rows_of(const mp_weight *w, int64_t r0, int64_t r1) {
    static const int64_t sizes[] = {4, 2, 2};   /* SCALE_F32, SCALE_F16, SCALE_BF16 */
    mp_weight part = *w;
    part.qdata = w->qdata + r0 * w->q_row;
    part.scale = (const char *)w->scale + r0 * w->s_n * sizes[w->scale_type];
    if (w->offset) part.offset = (const char *)w->offset + r0 * w->o_n * sizes[w->offset_type];
    part.n = r1 - r0;
    return part;
}

/* out (m, r1 - r0) = x (m, k) W[r0..r1)^T, without the bias */
static int product_rows(const mp_linear *l, const float *x, int64_t m, int64_t r0, int64_t r1, float *out,
                        int products) {
    if (l->packed) {
        mp_weight part = rows_of(l->packed, r0, r1);
        return mp_gemv(&part, x, m, out, products);
    }
    gemv_f32(l->weight + r0 * l->k, x, m, r1 - r0, l->k, out);
    return MP_OK;
}

/* y[:, r0..r1) of m rows of x (y is (m, n)): the rows' (m, r1 - r0) product made at block + m r0 (block: m n
   floats), then copied into y's columns. Each output is the sum the whole call computes (r0 at a block of 4 rows). */
static int product_block(const mp_linear *l, const float *x, int64_t m, int64_t r0, int64_t r1, float *y,
                         float *block, int products) {
    int64_t n = l->n, rows = r1 - r0;
    float *out = block + m * r0;
    int status = product_rows(l, x, m, r0, r1, out, products);
    if (status != MP_OK) return status;
    for (int64_t i = 0; i < m; i++) memcpy(y + i * n + r0, out + i * rows, (size_t)rows * sizeof(float));
    return MP_OK;
}

/* ---- a pool of worker threads that split projections by rows ----
   Workers sleep between forward calls; during one they spin on a job counter, since a token makes ~7 projections
   per block, each a few to some tens of microseconds: waking a thread through the scheduler would cost as much.
   One forward call uses the pool at a time (a lock); a forked child starts with no workers. */

#define MAX_THREADS 64
#define SPINS 4096   /* pauses before a waiting thread yields its core each round (an oversubscribed machine) */

static inline void wait_a_little(int *spins) {
    if (++*spins < SPINS) RELAX(); else sched_yield();
}

static struct {
    pthread_mutex_t lock, use;     /* lock: workers' sleep; use: one forward call at a time */
    pthread_cond_t wake;
    int workers;                   /* started so far (threads beyond the caller's) */
    atomic_int running;            /* a forward call is on: workers spin */
    atomic_long job;               /* bumped for each job */
    atomic_int left;               /* parts of the job not done */
    atomic_int status;             /* the first error a part met */
    int parts;
    const mp_linear *l;
    const float *x;
    float *y;
    int64_t m;                     /* rows of x */
    float *block;                  /* m > 1: m n floats, each part's (m, its rows) product before it goes to y */
    int products;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .use = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

/* part p of the pool's job: rows split evenly, in whole blocks of 4 (the kernels' row blocks) */
static void run_part(int p) {
    int64_t n = pool.l->n, blocks = (n + 3) / 4;
    int64_t r0 = blocks * p / pool.parts * 4, r1 = blocks * (p + 1) / pool.parts * 4;
    if (r1 > n) r1 = n;
    if (r0 < r1) {
        int status = pool.m == 1 ? product_rows(pool.l, pool.x, 1, r0, r1, pool.y + r0, pool.products)
                                 : product_block(pool.l, pool.x, pool.m, r0, r1, pool.y, pool.block, pool.products);
        if (status != MP_OK) atomic_store(&pool.status, status);
    }
}

static long first_job[MAX_THREADS];   /* the job counter when each worker was started: jobs before are not its */

static void *worker(void *arg) {
    int index = (int)(intptr_t)arg;
    long seen = first_job[index];
    for (;;) {
        pthread_mutex_lock(&pool.lock);
        while (!atomic_load(&pool.running)) pthread_cond_wait(&pool.wake, &pool.lock);
        pthread_mutex_unlock(&pool.lock);
        int spins = 0;
        while (atomic_load(&pool.running)) {
            long job = atomic_load_explicit(&pool.job, memory_order_acquire);
            if (job != seen) {
                seen = job;
                spins = 0;
                if (index < pool.parts) {
                    run_part(index);
                    atomic_fetch_sub_explicit(&pool.left, 1, memory_order_release);
                }
            } else {
                wait_a_little(&spins);
            }
        }
    }
    return NULL;
}

/* in a forked child: the threads were not copied */
static void forget_workers(void) {
    pool.workers = 0;
    atomic_store(&pool.running, 0);
}

static void register_fork(void) { pthread_atfork(NULL, NULL, forget_workers); }

/* Starts a forward call's use of the pool for `threads` threads (the caller's included); the number it runs with */
static int pool_begin(int threads) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1) return 1;
    pthread_once(&once, register_fork);
    pthread_mutex_lock(&pool.use);
    while (pool.workers < threads - 1) {
        pthread_t id;
        first_job[pool.workers + 1] = atomic_load(&pool.job);
        if (pthread_create(&id, NULL, worker, (void *)(intptr_t)(pool.workers + 1)) != 0) break;
        pthread_detach(id);
        pool.workers++;
    }
    threads = pool.workers + 1 < threads ? pool.workers + 1 : threads;
    pthread_mutex_lock(&pool.lock);
    atomic_store(&pool.running, 1);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    return threads;
}

static void pool_end(int threads) {
    if (threads <= 1) return;
    atomic_store(&pool.running, 0);
    pthread_mutex_unlock(&pool.use);
}

/* m n floats for product_block's parts (the caller's thread only, inside a forward call's use of the pool) */
static float *split_block(size_t count) {
    static float *buf = NULL;
    static size_t cap = 0;
    if (count > cap) {
        float *grown = realloc(buf, count * sizeof(float));
        if (!grown) return NULL;
        buf = grown, cap = count;
    }
    return buf;
}

/* y (m, n) of m x rows, its n rows split over `threads` threads (the caller runs part 0) */
static int product_split(const mp_linear *l, const float *x, int64_t m, float *y, int products, int threads) {
    float *block = m > 1 ? split_block((size_t)(m * l->n)) : NULL;
    if (m > 1 && !block) return MP_NO_MEMORY;
    pool.l = l, pool.x = x, pool.y = y, pool.m = m, pool.block = block, pool.products = products, pool.parts = threads;
    atomic_store(&pool.status, MP_OK);
    atomic_store(&pool.left, threads - 1);
    atomic_fetch_add_explicit(&pool.job, 1, memory_order_release);
    run_part(0);
    int spins = 0;
    while (atomic_load_explicit(&pool.left, memory_order_acquire) > 0) wait_a_little(&spins);
    return atomic_load(&pool.status);
}

/* y (m, n) = x (m, k) W^T + b; gather: m k floats of scratch for a permuted x; threads: split W's rows */
static int project(const mp_linear *l, const float *x, int64_t m, float *y, float *gather, int products,
                   int threads) {
    int64_t n = l->n, k = l->k;
    if (l->perm) {
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < k; j++) gather[i * k + j] = x[i * k + l->perm[j]];
        x = gather;
    }
    int status = threads > 1 ? product_split(l, x, m, y, products, threads)
                             : product_rows(l, x, m, 0, n, y, products);
    if (status != MP_OK) return status;
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

typedef int32_t ivec __attribute__((vector_size(W * sizeof(int32_t))));

/* exp of W lanes, within 2 ulp of expf over [-87, 88] (inputs outside it are clamped: exp(-87) ~ 1.6e-38 stands for
   the smaller values' 0 or subnormals, which add nothing to a softmax's sum or a SiLU): x = n ln 2 + r, |r| <= ln 2 / 2,
   exp(r) by a degree-7 polynomial (Cephes' expf coefficients), times 2^n put into the exponent bits. Softmax and
   SiLU called libm's expf once per cached position and head, and once per MLP unit: a quarter of a long-context
   step's time. */
static inline vec vexp(vec x) {
    const vec lo = (vec){0} - 87.0f, hi = (vec){0} + 88.0f;
    ivec below = x < lo, above = x > hi;
    x = (vec)(((ivec)x & ~below) | ((ivec)lo & below));
    x = (vec)(((ivec)x & ~above) | ((ivec)hi & above));
    const vec shifter = (vec){0} + 12582912.0f;   /* 1.5 * 2^23: adding and taking it off rounds to an integer */
    vec n = (x * 1.44269504088896341f + shifter) - shifter;
    vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vec p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    ivec e = __builtin_convertvector(n, ivec) << 23;
    return (vec)((ivec)p + e);
}

/* v[i] = silu(v[i]) * u[i] for i < n */
static void silu_times(float *v, const float *u, int64_t n) {
    int64_t i = 0;
    for (; i + W <= n; i += W) {
        vec a = vload(v + i), y = a / (1.0f + vexp(-a)) * vload(u + i);
        memcpy(v + i, &y, sizeof y);
    }
    for (; i < n; i++) v[i] = silu(v[i]) * u[i];
}

/* tanh of W lanes from vexp: 1 - 2 / (exp(2x) + 1), which goes to +-1 where vexp clamps (|x| > 44) */
static inline vec vtanh(vec x) { return 1.0f - 2.0f / (vexp(x + x) + 1.0f); }

/* v[i] = gelu_tanh(v[i]) * u[i] for i < n: GELU's tanh approximation, 0.5 a (1 + tanh(sqrt(2 / pi) (a + 0.044715 a^3)))
   (PyTorch's gelu(approximate="tanh"), Gemma's gelu_pytorch_tanh) */
static void gelu_tanh_times(float *v, const float *u, int64_t n) {
    const float c = 0.7978845608028654f;
    int64_t i = 0;
    for (; i + W <= n; i += W) {
        vec a = vload(v + i), y = 0.5f * a * (1.0f + vtanh(c * (a + 0.044715f * a * a * a))) * vload(u + i);
        memcpy(v + i, &y, sizeof y);
    }
    for (; i < n; i++) v[i] = 0.5f * v[i] * (1.0f + tanhf(c * (v[i] + 0.044715f * v[i] * v[i] * v[i]))) * u[i];
}

/* v[i] = cap tanh(v[i] / cap) for i < n (soft-capping) */
static void soft_cap(float *v, int64_t n, float cap) {
    int64_t i = 0;
    for (; i + W <= n; i += W) {
        vec y = cap * vtanh(vload(v + i) / cap);
        memcpy(v + i, &y, sizeof y);
    }
    for (; i < n; i++) v[i] = cap * tanhf(v[i] / cap);
}

/* p[t] = exp(p[t] - top) for t < n; returns their sum */
static float exp_shifted(float *p, int64_t n, float top) {
    vec acc = {0};
    int64_t t = 0;
    for (; t + W <= n; t += W) {
        vec e = vexp(vload(p + t) - top);
        memcpy(p + t, &e, sizeof e);
        acc += e;
    }
    float total = vsum(acc);
    for (; t < n; t++) {
        p[t] = expf(p[t] - top);
        total += p[t];
    }
    return total;
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

#define VALUE_TILE 32   /* positions: 32 rows of a 128-dim head are 16 KB, in L1 while the group's heads use them */

/* The widest vectors of any block: q|k|v together, the attention output or MLP's hidden units, and an input */
typedef struct { int64_t qkv, wide, widest_k, group; } widths;

static widths widths_of(const mp_decoder *d) {
    widths w = {0, 0, d->hidden, 1};
    for (int64_t b = 0; b < d->n_blocks; b++) {
        const mp_block *blk = d->blocks + b;
        w.qkv = max64(w.qkv, blk->q.n + blk->k.n + blk->v.n);
        w.wide = max64(w.wide, max64(blk->gate.n, blk->o.k));
        w.widest_k = max64(w.widest_k, max64(blk->o.k, blk->down.k));
        if (blk->kv_heads > 0) w.group = max64(w.group, blk->heads / blk->kv_heads);
    }
    return w;
}

/* The scratch floats mp_forward needs for `tokens` tokens (its `work` must hold as many): per token the normed h,
   q|k|v, the attention output (then the gate's), the up projection's, a gathered input and a projection's output;
   and the scores of one group of heads sharing a key/value head, and a tile of an int8 cache made float. */
int64_t mp_forward_work(const mp_decoder *d, int64_t tokens) {
    widths w = widths_of(d);
    return tokens * (d->hidden + w.qkv + 2 * w.wide + w.widest_k + d->hidden) + w.group * d->capacity +
           VALUE_TILE * d->head_dim;
}

static int check_block(const mp_decoder *d, const mp_block *b) {
    int64_t hd = d->head_dim, hidden = d->hidden;
    if (b->heads <= 0 || b->kv_heads <= 0 || b->heads % b->kv_heads || b->window < 0) return MP_BAD_SHAPE;
    if (!b->cos != !b->sin) return MP_BAD_SHAPE;
    if (b->k_codes ? !(b->v_codes && b->k_scales && b->v_scales) : !(b->k_cache && b->v_cache)) return MP_NO_CACHE;
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
    if ((d->act != MP_ACT_SILU && d->act != MP_ACT_GELU_TANH) || d->attn_softcap < 0.0f || d->logit_softcap < 0.0f)
        return MP_BAD_SHAPE;
    if (d->head.n && d->head.k != d->hidden) return MP_BAD_SHAPE;
    for (int64_t b = 0; b < d->n_blocks; b++) {
        int status = check_block(d, d->blocks + b);
        if (status != MP_OK) return status;
    }
    return MP_OK;
}

/* out (hd) (+)= sum over t < n of p[t] * values[t] (rows of hd; add: onto out, else over it): the sums kept in
   registers across t, W * 4 columns at a time (summed in memory, each position's update waited on the last one's
   store) */
static void weigh_values(const float *values, const float *p, int64_t n, int64_t hd, int add, float *out) {
    int64_t i = 0;
    for (; i + 4 * W <= hd; i += 4 * W) {
        vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        if (add) a0 = vload(out + i), a1 = vload(out + i + W), a2 = vload(out + i + 2 * W), a3 = vload(out + i + 3 * W);
        for (int64_t t = 0; t < n; t++) {
            const float *vt = values + t * hd + i;
            a0 += p[t] * vload(vt);
            a1 += p[t] * vload(vt + W);
            a2 += p[t] * vload(vt + 2 * W);
            a3 += p[t] * vload(vt + 3 * W);
        }
        memcpy(out + i, &a0, sizeof a0);
        memcpy(out + i + W, &a1, sizeof a1);
        memcpy(out + i + 2 * W, &a2, sizeof a2);
        memcpy(out + i + 3 * W, &a3, sizeof a3);
    }
    for (; i + W <= hd; i += W) {
        vec a = {0};
        if (add) a = vload(out + i);
        for (int64_t t = 0; t < n; t++) a += p[t] * vload(values + t * hd + i);
        memcpy(out + i, &a, sizeof a);
    }
    for (; i < hd; i++) {
        float a = add ? out[i] : 0.0f;
        for (int64_t t = 0; t < n; t++) a += p[t] * values[t * hd + i];
        out[i] = a;
    }
}

typedef int8_t code_vec __attribute__((vector_size(W)));

/* W int8 codes as floats: sign-extended and converted by the vector unit (GCC's __builtin_convertvector from 16
   int8 lanes is element by element, 3x slower for a whole step at a long context) */
static inline vec codes_as_floats(const int8_t *p) {
    vec v;
#if defined(__AVX512F__)
    __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    memcpy(&v, &f, sizeof v);
#elif defined(__AVX2__)
    __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
    memcpy(&v, &lo, sizeof lo);
    memcpy((char *)&v + sizeof lo, &hi, sizeof hi);
#else
    code_vec c;
    memcpy(&c, p, sizeof c);
    v = __builtin_convertvector(c, vec);
#endif
    return v;
}

/* Rows t0 .. t0 + n - 1 of one key/value head's cache as float32 rows of hd: the float cache's own, or (an int8
   cache: codes set) its codes times their rows' scales written into buf (n * hd floats), once for all the heads
   sharing them; the values are those the eager int8 cache dequantizes (code * scale is exact in float32) */
static const float *cache_rows(const float *rows, const int8_t *codes, const float *scales, int64_t t0, int64_t n,
                               int64_t hd, float *buf) {
    if (!codes) return rows + t0 * hd;
    for (int64_t t = 0; t < n; t++) {
        const int8_t *c = codes + (t0 + t) * hd;
        float s = scales[t0 + t], *out = buf + t * hd;
        int64_t i = 0;
        for (; i + W <= hd; i += W) {
            vec v = codes_as_floats(c + i) * s;
            memcpy(out + i, &v, sizeof v);
        }
        for (; i < hd; i++) out[i] = (float)c[i] * s;
    }
    return buf;
}

/* out (heads * head_dim) of the token at position pos: its q against the cache's positions 0..pos (a sliding-window
   block: pos - window + 1..pos). The heads that
   share a key/value head are taken together, so each cached key and value is read once per token, not once per
   head (at long contexts the cache is the larger part of what a step reads); both are read in tiles of VALUE_TILE
   positions (an int8 cache's tile made float32 once for the group). scores: group * capacity floats; tile:
   VALUE_TILE * head_dim floats. */
static void attend(const mp_block *b, const float *q, const mp_decoder *d, int64_t pos, float *scores, float *tile,
                   float *out) {
    int64_t hd = d->head_dim, cap = d->capacity, group = b->heads / b->kv_heads;
    /* the first position attended to, and how many are */
    int64_t first = b->window > 0 && pos - b->window + 1 > 0 ? pos - b->window + 1 : 0, seen = pos + 1 - first;
    for (int64_t g = 0; g < b->kv_heads; g++) {
        int64_t row = g * cap * hd;   /* this key/value head's first row, in either kind of cache */
        int codes = b->k_codes != NULL;
        const float *keys = codes ? NULL : b->k_cache + row, *values = codes ? NULL : b->v_cache + row;
        const int8_t *key_codes = codes ? b->k_codes + row : NULL, *value_codes = codes ? b->v_codes + row : NULL;
        const float *key_scales = codes ? b->k_scales + g * cap : NULL;
        const float *value_scales = codes ? b->v_scales + g * cap : NULL;
        const float *qg = q + g * group * hd;
        for (int64_t t0 = first; t0 <= pos; t0 += VALUE_TILE) {
            int64_t n = pos + 1 - t0 < VALUE_TILE ? pos + 1 - t0 : VALUE_TILE, t = 0;
            const float *kt = cache_rows(keys, key_codes, key_scales, t0, n, hd, tile);
            for (; t + 4 <= n; t += 4) {   /* four positions' keys at a time, read once for the group's heads */
                const float *k0 = kt + t * hd;
                for (int64_t j = 0; j < group; j++) {
                    float four[4], *sj = scores + j * cap + t0 + t;
                    dot4(qg + j * hd, k0, k0 + hd, k0 + 2 * hd, k0 + 3 * hd, hd, four);
                    for (int r = 0; r < 4; r++) sj[r] = four[r] * d->scaling;
                }
            }
            for (; t < n; t++)
                for (int64_t j = 0; j < group; j++)
                    scores[j * cap + t0 + t] = dot(qg + j * hd, kt + t * hd, hd) * d->scaling;
        }
        float *og = out + g * group * hd;
        for (int64_t j = 0; j < group; j++) {
            float *sj = scores + j * cap + first, top = -INFINITY;
            if (d->attn_softcap > 0.0f) soft_cap(sj, seen, d->attn_softcap);
            for (int64_t t = 0; t < seen; t++) top = sj[t] > top ? sj[t] : top;
            float total = exp_shifted(sj, seen, top);
            for (int64_t t = 0; t < seen; t++) sj[t] /= total;
        }
        /* the values in tiles of VALUE_TILE positions, each tile read from memory once for the group's heads */
        for (int64_t t0 = first; t0 <= pos; t0 += VALUE_TILE) {
            int64_t n = pos + 1 - t0 < VALUE_TILE ? pos + 1 - t0 : VALUE_TILE;
            const float *vt = cache_rows(values, value_codes, value_scales, t0, n, hd, tile);
            for (int64_t j = 0; j < group; j++)
                weigh_values(vt, scores + j * cap + t0, n, hd, t0 > first, og + j * hd);
        }
    }
}

/* x rounded to float16 and back, for x in float16's normal range [2^-14, 65504] (to nearest, ties to even): the
   13 low mantissa bits of float32 rounded away */
static float float16_rounded(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u += 0x0FFFu + ((u >> 13) & 1u);
    u &= ~0x1FFFu;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* One state vector (hd values) as int8 codes and a scale, by the rule of kv_quant.quantize_per_token with the int8
   format (the eager path's `int8` KV cache, the same codes): scale = absmax / 127 (1 for an all-zero vector), clamped
   to float16's normal range and rounded to float16; codes round(x / scale), ties to even, clamped to [-128, 127] */
static void quantize_state(const float *x, int64_t hd, int8_t *codes, float *scale) {
    float amax = 0.0f;
    for (int64_t i = 0; i < hd; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    float s = amax > 0.0f ? amax / 127.0f : 1.0f;
    s = float16_rounded(s < 0x1p-14f ? 0x1p-14f : s > 65504.0f ? 65504.0f : s);
    for (int64_t i = 0; i < hd; i++) {
        float c = nearbyintf(x[i] / s);
        codes[i] = (int8_t)(c < -128.0f ? -128.0f : c > 127.0f ? 127.0f : c);
    }
    *scale = s;
}

/* k and v of key/value head i into the cache at position `at` */
static void store_states(const mp_block *b, const mp_decoder *d, int64_t i, int64_t at, const float *k,
                         const float *v) {
    int64_t hd = d->head_dim, row = i * d->capacity + at;
    if (b->k_codes) {
        quantize_state(k, hd, b->k_codes + row * hd, b->k_scales + row);
        quantize_state(v, hd, b->v_codes + row * hd, b->v_scales + row);
    } else {
        memcpy(b->k_cache + row * hd, k, hd * sizeof(float));
        memcpy(b->v_cache + row * hd, v, hd * sizeof(float));
    }
}

/* q and k of `tokens` tokens from position pos: per-head norms (where the block has them) and the rotation; k and
   v written into the cache */
static void position_heads(const mp_block *b, const mp_decoder *d, float *q, float *k, const float *v,
                           int64_t tokens, int64_t pos) {
    int64_t hd = d->head_dim;
    const float *cos_table = b->cos ? b->cos : d->cos, *sin_table = b->sin ? b->sin : d->sin;
    for (int64_t t = 0; t < tokens; t++) {
        const float *cos = cos_table + (pos + t) * hd, *sin = sin_table + (pos + t) * hd;
        float *qt = q + t * b->q.n, *kt = k + t * b->k.n;
        const float *vt = v + t * b->v.n;
        for (int64_t i = 0; i < b->heads; i++) {
            if (b->q_norm) rms_norm(qt + i * hd, b->q_norm, hd, d->eps, qt + i * hd);
            rotate(qt + i * hd, cos, sin, hd);
        }
        for (int64_t i = 0; i < b->kv_heads; i++) {
            if (b->k_norm) rms_norm(kt + i * hd, b->k_norm, hd, d->eps, kt + i * hd);
            rotate(kt + i * hd, cos, sin, hd);
            store_states(b, d, i, pos + t, kt + i * hd, vt + i * hd);
        }
    }
}

/* h += y (tokens rows of hidden), y first RMS-normed with `norm` where it is given (Gemma's post-norms) */
static void add_output(float *h, float *y, const float *norm, int64_t tokens, int64_t hidden, float eps) {
    if (norm)
        for (int64_t t = 0; t < tokens; t++) rms_norm(y + t * hidden, norm, hidden, eps, y + t * hidden);
    for (int64_t i = 0; i < tokens * hidden; i++) h[i] += y[i];
}

#define TRY(call) do { int status_ = (call); if (status_ != MP_OK) return status_; } while (0)

/* mp_forward's work, the pool begun */
static int forward(const mp_decoder *d, float *h, int64_t tokens, int64_t pos, int threads) {
    int64_t hidden = d->hidden;
    widths w = widths_of(d);
    float *xn = d->work, *q = xn + tokens * hidden, *att = q + tokens * w.qkv, *up = att + tokens * w.wide;
    float *gather = up + tokens * w.wide, *y = gather + tokens * w.widest_k, *scores = y + tokens * hidden;
    float *tile = scores + w.group * d->capacity;
    for (int64_t bi = 0; bi < d->n_blocks; bi++) {
        const mp_block *b = d->blocks + bi;
        float *k = q + tokens * b->q.n, *v = k + tokens * b->k.n;
        for (int64_t t = 0; t < tokens; t++) rms_norm(h + t * hidden, b->attn_norm, hidden, d->eps, xn + t * hidden);
        TRY(project(&b->q, xn, tokens, q, gather, d->products, threads));
        TRY(project(&b->k, xn, tokens, k, gather, d->products, threads));
        TRY(project(&b->v, xn, tokens, v, gather, d->products, threads));
        position_heads(b, d, q, k, v, tokens, pos);
        for (int64_t t = 0; t < tokens; t++) attend(b, q + t * b->q.n, d, pos + t, scores, tile, att + t * b->o.k);
        TRY(project(&b->o, att, tokens, y, gather, d->products, threads));
        add_output(h, y, b->post_attn_norm, tokens, hidden, d->eps);
        for (int64_t t = 0; t < tokens; t++) rms_norm(h + t * hidden, b->mlp_norm, hidden, d->eps, xn + t * hidden);
        TRY(project(&b->gate, xn, tokens, att, gather, d->products, threads));
        TRY(project(&b->up, xn, tokens, up, gather, d->products, threads));
        if (d->act == MP_ACT_GELU_TANH)
            gelu_tanh_times(att, up, tokens * b->gate.n);
        else
            silu_times(att, up, tokens * b->gate.n);
        TRY(project(&b->down, att, tokens, y, gather, d->products, threads));
        add_output(h, y, b->post_mlp_norm, tokens, hidden, d->eps);
    }
    for (int64_t t = 0; t < tokens; t++) rms_norm(h + t * hidden, d->final_norm, hidden, d->eps, h + t * hidden);
    int64_t from = d->logits_from;
    if (d->head.n) {
        TRY(project(&d->head, h + from * hidden, tokens - from, d->logits, gather, d->products, threads));
        if (d->logit_softcap > 0.0f) soft_cap(d->logits, (tokens - from) * d->head.n, d->logit_softcap);
    }
    return MP_OK;
}

/* h (tokens, hidden): in, the tokens' embeddings; out, their final-normed hidden states, which the head reads
   (d->head, if it has one, into d->logits).
   The tokens sit at positions pos.. pos + tokens - 1 (the cache holds positions 0..pos-1 already); each attends to
   the positions up to its own. Every projection is one call over all the tokens, so a weight is read once per
   call (speculative decoding's verify pass); every projection is split by rows over d->threads threads. Returns
   MP_OK or an error code (h is then undefined). */
int mp_forward(const mp_decoder *d, float *h, int64_t tokens, int64_t pos) {
    if (tokens <= 0 || pos < 0 || pos + tokens > d->capacity) return MP_BAD_POSITION;
    if (d->head.n && !d->logits) return MP_NO_LOGITS;
    if (d->logits_from < 0 || d->logits_from >= tokens) return MP_BAD_POSITION;
    int threads = pool_begin(d->threads);
    int status = forward(d, h, tokens, pos, threads);
    pool_end(threads);
    return status;
}
