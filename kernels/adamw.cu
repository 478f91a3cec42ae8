// Fused AdamW on fp32 master weights, and the sum of squares behind the global
// gradient norm.
//
// AdamW (decoupled weight decay, as torch.optim.AdamW), per element at step t:
//     g = grad_scale · grad                      (clipping and accumulation averaging)
//     m = β1·m + (1−β1)·g
//     v = β2·v + (1−β2)·g²
//     w = decay·w − (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps)
// with decay = 1 − lr·wd (1 for parameters excluded from decay), bc1 = 1 − β1^t and
// bc2 = 1 − β2^t computed on the host in f64. `cpu::adamw::update` is the same
// expression in the same order.
//
// Layout: w (fp32 weights), m and v are fp32; the gradient is bf16 or f32 (entry points
// `adamw_<grad dtype>`). A bf16 parameter keeps its fp32 master in w and its compute copy
// is rewritten in the same pass as round-to-nearest-even(w) (`adamw_master_<grad>`); an
// f32 parameter is its own master.
//
// Launch: 1-D grid-stride, 256 threads, 8 consecutive elements per thread per iteration.
// One pass per tensor is the whole point: the update is memory bound (per element it
// reads 12 bytes of state plus the gradient and writes 12 bytes plus the copy), so every
// access is a 16-byte vector (2×float4 for fp32 arrays, 8 bf16 in one uint4) when all
// pointers are 16-byte aligned — fresh allocations are — with a scalar tail for the last
// n mod 8 elements, and a scalar loop for everything if a pointer is not aligned.
//
// Split masters (`adamw_split_<grad>`, opt-in: SYNTHOS_CUDA_SPLIT_MASTER=1): a bf16
// parameter's fp32 master is kept as the parameter itself (the high 16 bits, rounded) and
// a 16-bit array `lo` of the low bits, so the master costs 2 bytes per weight instead of
// 4 and is still exact. With M the master's bit pattern, lo = M & 0xFFFF and
// hi = (M + 0x8000) >> 16: round to nearest with ties away from zero (round-to-nearest-
// even differs at exact ties only), and M = (hi << 16) + sign-extended lo. A NaN keeps a
// NaN high half. `master_join` and `master_split` convert to and from an fp32 master
// (checkpoints, resume).
//
// Gate: every update entry point takes a last argument `gate` (may be null): a device
// scalar (step_gate) that multiplies the gradient scale, or, when not finite, makes the
// launch leave every tensor as it is. So a step's update can be queued before the host has
// read its loss and norm, and a non-finite step still changes nothing.
//
// Sum of squares: per tensor (`sum_squares_<dtype>`, partials of a fixed grid), or for
// all tensors at once (`sum_squares_multi`, one partial per chunk); `sum_partials` (one
// block) adds the partials in a fixed order, so the global norm is deterministic run to
// run. The multi-tensor forms (`adamw_multi`, `sum_squares_multi`) cover every parameter
// of an optimizer step in one launch, block b taking one chunk of one tensor from a table
// the host uploads (see below); the host uses them with SYNTHOS_CUDA_MULTI_TENSOR=1 until
// a GPU run has shown them correct and faster.
#include "common.cuh"

// Mirrors `cpu::adamw::AdamWStep`.
struct AdamWStep {
    float lr;
    float beta1;
    float beta2;
    float eps;
    float decay;
    float bias_correction1;
    float bias_correction2_sqrt;
    float grad_scale;
};

constexpr int VEC = 8;

__device__ __forceinline__ void load8(const float* p, int64_t i, float* out) {
    const float4 a = *reinterpret_cast<const float4*>(p + i);
    const float4 b = *reinterpret_cast<const float4*>(p + i + 4);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

__device__ __forceinline__ void load8(const bf16* p, int64_t i, float* out) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p + i);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 f = __bfloat1622float2(h[k]);
        out[2 * k] = f.x;
        out[2 * k + 1] = f.y;
    }
}

__device__ __forceinline__ void store8(float* p, int64_t i, const float* v) {
    *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(p + i + 4) = make_float4(v[4], v[5], v[6], v[7]);
}

__device__ __forceinline__ void store8(bf16* p, int64_t i, const float* v) {
    uint4 raw;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
    *reinterpret_cast<uint4*>(p + i) = raw;
}

// The fp32 master whose high half (rounded) is `hi` and low half `lo` (see the top).
__device__ __forceinline__ float join_master(uint16_t hi, uint16_t lo) {
    return __uint_as_float(((uint32_t)hi << 16) + (uint32_t)(int32_t)(int16_t)lo);
}

// Splits an fp32 master into its rounded high half (the bf16 parameter) and low half.
__device__ __forceinline__ void split_master(float w, uint16_t& hi, uint16_t& lo) {
    const uint32_t bits = __float_as_uint(w);
    lo = (uint16_t)(bits & 0xFFFFu);
    hi = (w != w) ? (uint16_t)((bits >> 16) | 0x0040u) : (uint16_t)((bits + 0x8000u) >> 16);
}

__device__ __forceinline__ void load8_split(const bf16* hi, const uint16_t* lo, int64_t i, float* out) {
    const uint4 h = *reinterpret_cast<const uint4*>(hi + i);
    const uint4 l = *reinterpret_cast<const uint4*>(lo + i);
    const uint32_t hw[4] = {h.x, h.y, h.z, h.w}, lw[4] = {l.x, l.y, l.z, l.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        out[2 * k] = join_master((uint16_t)(hw[k] & 0xFFFFu), (uint16_t)(lw[k] & 0xFFFFu));
        out[2 * k + 1] = join_master((uint16_t)(hw[k] >> 16), (uint16_t)(lw[k] >> 16));
    }
}

__device__ __forceinline__ void store8_split(bf16* hi, uint16_t* lo, int64_t i, const float* v) {
    uint32_t hw[4], lw[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        uint16_t h0, l0, h1, l1;
        split_master(v[2 * k], h0, l0);
        split_master(v[2 * k + 1], h1, l1);
        hw[k] = (uint32_t)h0 | ((uint32_t)h1 << 16);
        lw[k] = (uint32_t)l0 | ((uint32_t)l1 << 16);
    }
    *reinterpret_cast<uint4*>(hi + i) = make_uint4(hw[0], hw[1], hw[2], hw[3]);
    *reinterpret_cast<uint4*>(lo + i) = make_uint4(lw[0], lw[1], lw[2], lw[3]);
}

__device__ __forceinline__ float adamw_update(float w, float& m, float& v, float grad, const AdamWStep& s) {
    const float g = grad * s.grad_scale;
    m = s.beta1 * m + (1.f - s.beta1) * g;
    v = s.beta2 * v + (1.f - s.beta2) * g * g;
    const float denom = sqrtf(v) / s.bias_correction2_sqrt + s.eps;
    return s.decay * w - (s.lr / s.bias_correction1) * (m / denom);
}

// Where a tensor's weights live: fp32 `w` alone (an f32 parameter), fp32 `w` and its bf16
// compute copy `copy` (a master), or the split master: `copy` (the bf16 parameter, the
// high halves) and `lo` (the low halves), `w` unused.
enum WeightMode { kWeightsPlain, kWeightsCopy, kWeightsSplit };

// Updates elements [begin, end) of one tensor, this thread taking the vectors (then the
// tail elements) tid, tid + stride, ... The vector path needs every pointer 16-byte
// aligned at `begin`.
template <typename G, int MODE>
__device__ __forceinline__ void adamw_span(const G* __restrict__ grad, float* __restrict__ w, float* __restrict__ m,
                                           float* __restrict__ v, bf16* __restrict__ copy, uint16_t* __restrict__ lo,
                                           const AdamWStep& s, int64_t begin, int64_t end, int64_t tid,
                                           int64_t stride) {
    const bool vec = aligned16(grad + begin) && aligned16(m + begin) && aligned16(v + begin) &&
                     (MODE == kWeightsSplit || aligned16(w + begin)) && (MODE == kWeightsPlain || aligned16(copy + begin)) &&
                     (MODE != kWeightsSplit || aligned16(lo + begin));
    const int64_t n_vec = vec ? (end - begin) / VEC : 0;
    for (int64_t i = tid; i < n_vec; i += stride) {
        const int64_t o = begin + i * VEC;
        float g[VEC], p[VEC], mm[VEC], vv[VEC];
        load8(grad, o, g);
        if constexpr (MODE == kWeightsSplit)
            load8_split(copy, lo, o, p);
        else
            load8(w, o, p);
        load8(m, o, mm);
        load8(v, o, vv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) p[k] = adamw_update(p[k], mm[k], vv[k], g[k], s);
        if constexpr (MODE == kWeightsSplit) {
            store8_split(copy, lo, o, p);
        } else {
            store8(w, o, p);
            if constexpr (MODE == kWeightsCopy) store8(copy, o, p);
        }
        store8(m, o, mm);
        store8(v, o, vv);
    }
    for (int64_t i = begin + n_vec * VEC + tid; i < end; i += stride) {
        float mi = m[i], vi = v[i];
        float wi;
        if constexpr (MODE == kWeightsSplit)
            wi = join_master(__bfloat16_as_ushort(copy[i]), lo[i]);
        else
            wi = w[i];
        const float p = adamw_update(wi, mi, vi, load(grad, i), s);
        if constexpr (MODE == kWeightsSplit) {
            uint16_t h, l;
            split_master(p, h, l);
            copy[i] = __ushort_as_bfloat16(h);
            lo[i] = l;
        } else {
            w[i] = p;
            if constexpr (MODE == kWeightsCopy) copy[i] = __float2bfloat16(p);
        }
        m[i] = mi;
        v[i] = vi;
    }
}

// Applies a step's gate (see step_gate): false when the step must not update anything
// (a non-finite gate); otherwise the gate multiplies the gradient scale. No gate: true.
__device__ __forceinline__ bool apply_gate(const float* gate, AdamWStep& s) {
    if (gate == nullptr) return true;
    const float c = *gate;
    if (!(fabsf(c) <= 3.402823466e38f)) return false;  // NaN or ±inf
    s.grad_scale *= c;
    return true;
}

template <typename G, int MODE>
__device__ void adamw_impl(const G* __restrict__ grad, float* __restrict__ w, float* __restrict__ m,
                           float* __restrict__ v, bf16* __restrict__ copy, uint16_t* __restrict__ lo, AdamWStep s,
                           int64_t n, const float* gate) {
    if (!apply_gate(gate, s)) return;
    adamw_span<G, MODE>(grad, w, m, v, copy, lo, s, 0, n, blockIdx.x * (int64_t)blockDim.x + threadIdx.x,
                        (int64_t)gridDim.x * blockDim.x);
}

// The three update kernels of one gradient type G (suffix f32 or bf16):
// - adamw_<G>: an f32 parameter, w is the parameter itself;
// - adamw_master_<G>: a bf16 parameter, w is its fp32 master and `param` its compute copy;
// - adamw_split_<G>: a bf16 parameter with a split master, `param` holding the high
//   halves and `lo` the low ones.
#define ADAMW_ENTRIES(G, SUFFIX)                                                                                  \
    extern "C" __global__ void adamw_##SUFFIX(const G* grad, float* w, float* m, float* v, AdamWStep s,          \
                                              int64_t n, const float* gate) {                                   \
        adamw_impl<G, kWeightsPlain>(grad, w, m, v, nullptr, nullptr, s, n, gate);                              \
    }                                                                                                           \
    extern "C" __global__ void adamw_master_##SUFFIX(const G* grad, float* w, float* m, float* v, bf16* param,   \
                                                     AdamWStep s, int64_t n, const float* gate) {               \
        adamw_impl<G, kWeightsCopy>(grad, w, m, v, param, nullptr, s, n, gate);                                 \
    }                                                                                                           \
    extern "C" __global__ void adamw_split_##SUFFIX(const G* grad, bf16* param, uint16_t* lo, float* m, float* v, \
                                                    AdamWStep s, int64_t n, const float* gate) {                \
        adamw_impl<G, kWeightsSplit>(grad, nullptr, m, v, param, lo, s, n, gate);                               \
    }
ADAMW_ENTRIES(float, f32)
ADAMW_ENTRIES(bf16, bf16)

// w[i] = the split master (param[i], lo[i]), for i < n.
extern "C" __global__ void master_join(const bf16* param, const uint16_t* lo, float* w, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        w[i] = join_master(__bfloat16_as_ushort(param[i]), lo[i]);
}

// (param[i], lo[i]) = the split of the fp32 master w[i], for i < n.
extern "C" __global__ void master_split(const float* w, bf16* param, uint16_t* lo, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        uint16_t h, l;
        split_master(w[i], h, l);
        param[i] = __ushort_as_bfloat16(h);
        lo[i] = l;
    }
}

template <typename T>
__device__ void sum_squares_impl(const T* x, int64_t n, float* partials, int64_t offset) {
    __shared__ float scratch[32];
    float acc = 0.f;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float g = load(x, i);
        acc += g * g;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[offset + blockIdx.x] = acc;
}

// One tensor's sum of squares: a grid whose size depends only on n; block b writes the
// fp32 sum of its grid-stride elements to partials[offset + b].
extern "C" __global__ void sum_squares_f32(const float* x, int64_t n, float* partials, int64_t offset) {
    sum_squares_impl(x, n, partials, offset);
}
extern "C" __global__ void sum_squares_bf16(const bf16* x, int64_t n, float* partials, int64_t offset) {
    sum_squares_impl(x, n, partials, offset);
}

// ---- Multi-tensor forms: one launch for every parameter of a step -----------------------
// The host describes each tensor once (MultiTensor) and cuts every tensor into chunks of
// `chunk` elements (a multiple of VEC); block b works on chunk chunks[b] with its 256
// threads. Chunks depend only on the tensor sizes, so the sum of squares, reduced in chunk
// order by sum_partials, is deterministic run to run.

// Mirrors `cuda::adamw::MultiTensor`: a tensor's buffers, its element count and, for
// AdamW, its step (the bias corrections and the decay differ per parameter).
struct MultiTensor {
    const void* grad;  // bf16 when grad_bf16, else f32 (the tensor itself for sum_squares)
    float* w;          // AdamW: the fp32 weights (master), moments m and v
    float* m;
    float* v;
    bf16* copy;        // AdamW: the bf16 compute copy of a master (or a split master's high halves), or null
    uint16_t* lo;      // AdamW: a split master's low halves (w unused), or null
    int64_t n;
    AdamWStep s;
    int grad_bf16;
    int pad;
};

// Mirrors `cuda::adamw::MultiChunk`: chunk `chunk` of tensor `tensor`.
struct MultiChunk {
    int tensor;
    int chunk;
};

// Elements [begin, end) of one tensor of a multi-tensor step, with its gradient g of type
// G, updated in the tensor's weight mode (split master, master with a copy, or plain).
template <typename G>
__device__ __forceinline__ void adamw_tensor_span(const MultiTensor& t, const G* g, const AdamWStep& s, int64_t begin,
                                                  int64_t end) {
    const int64_t tid = threadIdx.x, stride = blockDim.x;
    if (t.lo != nullptr)
        adamw_span<G, kWeightsSplit>(g, nullptr, t.m, t.v, t.copy, t.lo, s, begin, end, tid, stride);
    else if (t.copy != nullptr)
        adamw_span<G, kWeightsCopy>(g, t.w, t.m, t.v, t.copy, nullptr, s, begin, end, tid, stride);
    else
        adamw_span<G, kWeightsPlain>(g, t.w, t.m, t.v, nullptr, nullptr, s, begin, end, tid, stride);
}

extern "C" __global__ void adamw_multi(const MultiTensor* __restrict__ tensors, const MultiChunk* __restrict__ chunks,
                                       int64_t chunk, const float* gate) {
    const MultiChunk c = chunks[blockIdx.x];
    const MultiTensor& t = tensors[c.tensor];
    AdamWStep s = t.s;
    if (!apply_gate(gate, s)) return;
    const int64_t begin = c.chunk * chunk, end = min(begin + chunk, t.n);
    if (t.grad_bf16)
        adamw_tensor_span(t, static_cast<const bf16*>(t.grad), s, begin, end);
    else
        adamw_tensor_span(t, static_cast<const float*>(t.grad), s, begin, end);
}

template <typename T>
__device__ __forceinline__ float sum_squares_span(const T* x, int64_t begin, int64_t end) {
    float acc = 0.f;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float g = load(x, i);
        acc += g * g;
    }
    return acc;
}

// partials[b] = the fp32 sum of squares of chunk chunks[b] (of each tensor's `grad`).
extern "C" __global__ void sum_squares_multi(const MultiTensor* __restrict__ tensors,
                                             const MultiChunk* __restrict__ chunks, int64_t chunk,
                                             float* __restrict__ partials) {
    __shared__ float scratch[32];
    const MultiChunk c = chunks[blockIdx.x];
    const MultiTensor& t = tensors[c.tensor];
    const int64_t begin = c.chunk * chunk, end = min(begin + chunk, t.n);
    float acc = t.grad_bf16 ? sum_squares_span(static_cast<const bf16*>(t.grad), begin, end)
                            : sum_squares_span(static_cast<const float*>(t.grad), begin, end);
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// The gate of a step whose update is queued before its loss and gradient norm are read
// on the host (one thread): out[0] = the factor every gradient is multiplied by, which
// is the clip coefficient min(1, max_norm / (norm + 1e-6)) of norm = sqrt(sumsq[0]) when
// max_norm > 0 (torch.nn.utils.clip_grad_norm_; a NaN coefficient stays NaN) and 1
// otherwise; or NaN when loss[0] or the norm is not finite, which makes every gated
// update skip its tensors (apply_gate). `optim::clip_coefficient` is the host's form.
extern "C" __global__ void step_gate(const float* sumsq, const float* loss, float max_norm, float* out) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const float norm = sqrtf(sumsq[0]);
    const bool finite = fabsf(loss[0]) <= 3.402823466e38f && norm <= 3.402823466e38f;
    float c = 1.f;
    if (max_norm > 0.f) {
        c = max_norm / (norm + 1e-6f);
        if (c == c) c = fminf(c, 1.f);
    }
    out[0] = finite ? c : __uint_as_float(0x7fc00000u);
}

// One block: out[0] = Σ partials[0..count), each thread a fixed strided subset, then a
// fixed tree.
extern "C" __global__ void sum_partials(const float* partials, int64_t count, float* out) {
    __shared__ float scratch[32];
    float acc = 0.f;
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = acc;
}
