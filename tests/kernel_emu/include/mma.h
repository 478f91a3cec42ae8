// The part of CUDA's WMMA API (mma.h) our kernels use, for the CPU emulation (emu.h):
// 16x16x16 fragments, bf16 A and B, f32 accumulators.
//
// The mapping of a lane's fragment elements x[t] to matrix positions is opaque on the GPU
// and differs between architectures, so the emulation uses a scrambled one: element t of
// lane l holds position (37, 101 or 173 for A, B, C)·(8l + t) + 11 mod 256 of the
// row-major 16x16 matrix (an odd multiplier: a permutation). A kernel that assumes any
// particular layout computes garbage here.
//
// load/store/fill touch only the calling lane's elements and do not synchronise (a
// kernel must __syncwarp before lanes read what others stored); mma_sync is a warp
// collective: every lane publishes its A, B and C elements and computes its own D
// elements as C + A·B in f32, k ascending (a tensor core's summation order is
// unspecified). Pointers must be 32-byte aligned and leading dimensions multiples of
// 16 bytes, as WMMA requires.
#pragma once
#include "cuda_bf16.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulation provides 16x16x16 fragments only");
    static constexpr int num_elements = 8;
    T x[num_elements];
};

namespace detail {

// Row-major position (row·16 + col) of element t of `lane`'s fragment.
template <class Use>
inline int position(unsigned lane, int t) {
    const int mult = std::is_same_v<Use, matrix_a> ? 37 : std::is_same_v<Use, matrix_b> ? 101 : 173;
    return (int)((lane * 8 + t) * mult + 11) & 255;
}

inline float to_float(float v) { return v; }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline void from_float(float& d, float v) { d = v; }
inline void from_float(__nv_bfloat16& d, float v) { d = __float2bfloat16(v); }

inline void check_pointer(const char* what, const void* p, unsigned ldm, unsigned elem_bytes) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail("%s: pointer %p is not 32-byte aligned", what, p);
    if (ldm * elem_bytes % 16 != 0) emu::fail("%s: leading dimension %u is not a multiple of 16 bytes", what, ldm);
}

// Offset of (row, col) in memory with leading dimension ldm.
inline long offset(int row, int col, unsigned ldm, bool row_major_mem) {
    return row_major_mem ? (long)row * ldm + col : (long)col * ldm + row;
}

}  // namespace detail

template <class Use, class T, class L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
    static_assert(!std::is_same_v<L, void>, "A and B fragments carry their memory layout");
    detail::check_pointer("wmma::load_matrix_sync", p, ldm, sizeof(T));
    const unsigned lane = emu::self("wmma::load_matrix_sync").lane;
    for (int t = 0; t < f.num_elements; ++t) {
        const int pos = detail::position<Use>(lane, t);
        f.x[t] = p[detail::offset(pos / 16, pos % 16, ldm, std::is_same_v<L, row_major>)];
    }
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
    detail::check_pointer("wmma::load_matrix_sync", p, ldm, sizeof(float));
    const unsigned lane = emu::self("wmma::load_matrix_sync").lane;
    for (int t = 0; t < f.num_elements; ++t) {
        const int pos = detail::position<accumulator>(lane, t);
        f.x[t] = p[detail::offset(pos / 16, pos % 16, ldm, layout == mem_row_major)];
    }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
    detail::check_pointer("wmma::store_matrix_sync", p, ldm, sizeof(float));
    const unsigned lane = emu::self("wmma::store_matrix_sync").lane;
    for (int t = 0; t < f.num_elements; ++t) {
        const int pos = detail::position<accumulator>(lane, t);
        p[detail::offset(pos / 16, pos % 16, ldm, layout == mem_row_major)] = f.x[t];
    }
}

template <class Use, class T, class L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float v) {
    for (auto& e : f.x) detail::from_float(e, v);
}

template <class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c, const emu::Loc& loc = emu::Loc::current()) {
    emu::ThreadContext& self = emu::warp_collective(0xffffffffu, "wmma::mma_sync");
    emu::Warp& w = *self.warp;
    const unsigned lane = self.lane, p = self.warp_phase & 1;
    float(&A)[256] = w.mma[p][0];
    float(&B)[256] = w.mma[p][1];
    float(&C)[256] = w.mma[p][2];
    for (int t = 0; t < 8; ++t) {
        A[detail::position<matrix_a>(lane, t)] = detail::to_float(a.x[t]);
        B[detail::position<matrix_b>(lane, t)] = detail::to_float(b.x[t]);
        C[detail::position<accumulator>(lane, t)] = c.x[t];
    }
    emu::warp_wait(self, "wmma::mma_sync", loc);
    float out[8];
    for (int t = 0; t < 8; ++t) {
        const int pos = detail::position<accumulator>(lane, t), row = pos / 16, col = pos % 16;
        float s = C[pos];
        for (int k = 0; k < 16; ++k) s += A[row * 16 + k] * B[k * 16 + col];
        out[t] = s;
    }
    for (int t = 0; t < 8; ++t) d.x[t] = out[t];
}

}  // namespace wmma
}  // namespace nvcuda
