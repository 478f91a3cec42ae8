// Losses: mean squared error (whole tensor, or per sample = per row) and cross-entropy
// over class logits, forward and backward. Losses are produced in fp32 whatever the
// input dtype: they are logged and weighted, and bf16 would round them to 3 digits.
//
// Squared error, x viewed as [rows, len] (rows = 1 for the plain MSE):
//   sq_err_partial: rows·bpr blocks of 256 threads; block b adds (p − t)² over chunk
//                   b % bpr of row b / bpr (grid-stride) into partials[b];
//   rows_finish:    one block per row adds its bpr partials and stores scale·sum
//                   (scale = 1/len gives the mean). Two passes and no atomics: the
//                   result is deterministic and a big tensor keeps every SM busy.
//   sq_err_bwd:     dp[i] = coef·g[i / len]·(p[i] − t[i]), coef = 2/len; 1-D grid.
//
// Cross-entropy, logits [rows, C], one 256-thread block per row:
//   ce_fwd: max over the row, then Σ exp(x − max) (fp32, so no overflow), giving
//           lse = max + log Σ and loss = lse − x[target]; lse is kept for the backward.
//           The mean over rows is rows_finish on the per-row losses.
//   ce_bwd: dx[r, c] = g·(exp(x[r, c] − lse[r]) − [c = target[r]])/rows.
// `g`, the incoming gradient, is read from device memory (fp32) so no host sync is needed.
#include "common.cuh"

template <typename T>
__device__ void sq_err_partial_impl(const T* p, const T* t, float* partials, int64_t len, int64_t bpr) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x / bpr, chunk = blockIdx.x % bpr;
    const int64_t base = row * len;
    float acc = 0.f;
    for (int64_t i = chunk * blockDim.x + threadIdx.x; i < len; i += bpr * blockDim.x) {
        const float d = load(p, base + i) - load(t, base + i);
        acc += d * d;
    }
    const float total = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}
extern "C" __global__ void sq_err_partial_f32(const float* p, const float* t, float* partials, int64_t len,
                                              int64_t bpr) {
    sq_err_partial_impl(p, t, partials, len, bpr);
}
extern "C" __global__ void sq_err_partial_bf16(const bf16* p, const bf16* t, float* partials, int64_t len,
                                               int64_t bpr) {
    sq_err_partial_impl(p, t, partials, len, bpr);
}

extern "C" __global__ void rows_finish(const float* partials, float* out, int64_t bpr, float scale) {
    __shared__ float scratch[32];
    const float* src = partials + blockIdx.x * bpr;
    float acc = 0.f;
    for (int64_t i = threadIdx.x; i < bpr; i += blockDim.x) acc += src[i];
    const float total = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = total * scale;
}

template <typename T>
__device__ void sq_err_bwd_impl(const T* p, const T* t, const float* g, T* dp, int64_t len, float coef, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        store(dp, i, coef * g[i / len] * (load(p, i) - load(t, i)));
}
extern "C" __global__ void sq_err_bwd_f32(const float* p, const float* t, const float* g, float* dp, int64_t len,
                                          float coef, int64_t n) {
    sq_err_bwd_impl(p, t, g, dp, len, coef, n);
}
extern "C" __global__ void sq_err_bwd_bf16(const bf16* p, const bf16* t, const float* g, bf16* dp, int64_t len,
                                           float coef, int64_t n) {
    sq_err_bwd_impl(p, t, g, dp, len, coef, n);
}

// Cross-entropy by rows: one block per row. The targets come as int64 (uploaded with the
// call), or are the row index itself (`_diag`: CLIP's contrastive targets, 0..N, with
// nothing uploaded, so that the loss can run inside a recorded CUDA graph).
template <typename T, bool DIAG>
__device__ void ce_fwd_impl(const T* logits, const int64_t* targets, float* loss, float* lse, int64_t classes) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    const T* x = logits + row * classes;
    float m, s;
    block_max_sumexp(x, classes, scratch, m, s);
    if (threadIdx.x == 0) {
        const float l = m + logf(s);
        lse[row] = l;
        loss[row] = l - load(x, DIAG ? row : targets[row]);
    }
}

template <typename T, bool DIAG>
__device__ void ce_bwd_impl(const T* logits, const int64_t* targets, const float* lse, const float* g, T* dx,
                            int64_t classes, float inv_rows) {
    const int64_t row = blockIdx.x;
    const int64_t base = row * classes, target = DIAG ? row : targets[row];
    const float l = lse[row], k = g[0] * inv_rows;
    for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
        const float p = expf(load(logits, base + c) - l);
        store(dx, base + c, k * (p - (c == target ? 1.f : 0.f)));
    }
}

#define CE_ENTRIES(SUFFIX, T)                                                                                     \
    extern "C" __global__ void ce_fwd_##SUFFIX(const T* logits, const int64_t* targets, float* loss, float* lse,   \
                                               int64_t classes) {                                                  \
        ce_fwd_impl<T, false>(logits, targets, loss, lse, classes);                                                \
    }                                                                                                              \
    extern "C" __global__ void ce_fwd_diag_##SUFFIX(const T* logits, float* loss, float* lse, int64_t classes) {  \
        ce_fwd_impl<T, true>(logits, nullptr, loss, lse, classes);                                                 \
    }                                                                                                              \
    extern "C" __global__ void ce_bwd_##SUFFIX(const T* logits, const int64_t* targets, const float* lse,          \
                                               const float* g, T* dx, int64_t classes, float inv_rows) {           \
        ce_bwd_impl<T, false>(logits, targets, lse, g, dx, classes, inv_rows);                                     \
    }                                                                                                              \
    extern "C" __global__ void ce_bwd_diag_##SUFFIX(const T* logits, const float* lse, const float* g, T* dx,      \
                                                    int64_t classes, float inv_rows) {                             \
        ce_bwd_impl<T, true>(logits, nullptr, lse, g, dx, classes, inv_rows);                                      \
    }
CE_ENTRIES(f32, float)
CE_ENTRIES(bf16, bf16)
