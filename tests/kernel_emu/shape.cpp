// kernels/shape.cu under emulation, launched as src/cuda/shape.rs does: permutations up to
// rank 6 and slab copies (the pieces of concat, narrow, split and their gradients). Copies
// are checked bit for bit, and a slab copy must leave every element outside its slab
// untouched (still poisoned).
#include "harness.h"

#include "shape.cu"

using namespace harness;

namespace {

Report report("shape");
Rng rng(0x5A9E);

using Shape = std::vector<size_t>;

template <class T>
struct K;
template <>
struct K<float> {
    static constexpr auto permute = EMU_KERNEL(permute_f32), slab_copy = EMU_KERNEL(slab_copy_f32);
};
template <>
struct K<bf16> {
    static constexpr auto permute = EMU_KERNEL(permute_bf16), slab_copy = EMU_KERNEL(slab_copy_bf16);
};

std::string str(const Shape& s) {
    std::string r = "[";
    for (size_t i = 0; i < s.size(); ++i) r += (i ? "," : "") + std::to_string(s[i]);
    return r + "]";
}

// `cuda::shape::permute`: output dimension d walks input dimension perm[d].
template <class T>
void permute(const Shape& shape, const Shape& perm) {
    const size_t rank = shape.size();
    // cpu::shape::strides: row-major element strides.
    std::vector<size_t> st(rank, 1);
    for (size_t d = rank; d-- > 1;) st[d - 1] = st[d] * shape[d];
    PermuteDesc desc{};
    desc.rank = (int32_t)rank;
    for (size_t k = 0; k < rank; ++k) {
        desc.out_shape[k] = (int64_t)shape[perm[k]];
        desc.src_stride[k] = (int64_t)st[perm[k]];
    }
    size_t n = 1;
    for (size_t d : shape) n *= d;
    const auto x = rng.values<T>(n);
    DeviceArray<T> dx(x), out(n);
    emu::launch(grid_1d(n, 256), K<T>::permute, dx.ptr(), out.ptr(), desc, (int64_t)n);

    // Reference: walk the output in row-major order, carrying input coordinates.
    std::vector<double> want(n);
    std::vector<size_t> out_coord(rank, 0);
    for (size_t i = 0; i < n; ++i) {
        std::vector<size_t> in_coord(rank);
        for (size_t k = 0; k < rank; ++k) in_coord[perm[k]] = out_coord[k];
        size_t idx = 0;
        for (size_t d = 0; d < rank; ++d) idx = idx * shape[d] + in_coord[d];
        want[i] = x[idx];
        for (size_t k = rank; k-- > 0;) {
            if (++out_coord[k] < shape[perm[k]]) break;
            out_coord[k] = 0;
        }
    }
    report.close(format("permute_%s %s by %s", Elem<T>::name, str(shape).c_str(), str(perm).c_str()),
                 out.download(), want, 0, 0);
}

// cpu::shape::Slab: dst[o, dst_off + c, i] = src[o, src_off + c, i] for c < len, both
// viewed as [outer, channels, inner].
struct Slab {
    size_t outer, inner, src_dim, src_off, dst_dim, dst_off, len;
};

// `cuda::shape::copy_slab` into a fresh (poisoned) destination.
template <class T>
void slab_copy(const Slab& s) {
    const size_t n = s.outer * s.len * s.inner;
    const auto src = rng.values<T>(s.outer * s.src_dim * s.inner);
    DeviceArray<T> dsrc(src), dst(s.outer * s.dst_dim * s.inner);
    emu::launch(grid_1d(n, 256), K<T>::slab_copy, dsrc.ptr(), dst.ptr(), (int64_t)s.inner, (int64_t)s.src_dim,
                (int64_t)s.src_off, (int64_t)s.dst_dim, (int64_t)s.dst_off, (int64_t)s.len, (int64_t)n);

    const auto got = dst.download();
    std::vector<double> want(got.size(), std::nan(""));
    for (size_t o = 0; o < s.outer; ++o)
        for (size_t c = 0; c < s.len; ++c)
            for (size_t i = 0; i < s.inner; ++i)
                want[(o * s.dst_dim + s.dst_off + c) * s.inner + i] = src[(o * s.src_dim + s.src_off + c) * s.inner + i];
    const std::string what = format("slab_copy_%s outer %zu inner %zu: [%zu, %zu) of %zu -> [%zu, %zu) of %zu",
                                    Elem<T>::name, s.outer, s.inner, s.src_off, s.src_off + s.len, s.src_dim,
                                    s.dst_off, s.dst_off + s.len, s.dst_dim);
    report.close(what, got, want, 0, 0);
    bool untouched = true;
    for (size_t i = 0; i < got.size(); ++i) untouched &= !std::isnan(want[i]) || dst.poisoned(i);
    report.expect(untouched, what + ": elements outside the slab keep their poison bytes");
}

template <class T>
void family() {
    permute<T>({17}, {0});
    permute<T>({5, 7}, {1, 0});
    permute<T>({2, 3, 4}, {2, 0, 1});
    permute<T>({2, 3, 4}, {0, 2, 1});
    permute<T>({2, 9, 3, 16}, {0, 2, 1, 3});  // [B, N, H, Dh] <-> [B, H, N, Dh]
    permute<T>({3, 1, 5, 7, 2}, {4, 2, 0, 3, 1});
    permute<T>({2, 3, 1, 4, 2, 3}, {5, 3, 1, 0, 4, 2});
    permute<T>({37, 71}, {1, 0});  // more than one block

    const Slab slabs[] = {
        {3, 5, 4, 0, 9, 2, 4},        // a concat piece in the middle
        {3, 5, 5, 0, 9, 4, 5},        // the last concat piece
        {2, 7, 10, 3, 5, 0, 5},       // narrow
        {1, 1, 100, 17, 40, 1, 39},   // inner 1
        {4, 130, 2, 1, 3, 2, 1},      // one channel, long rows
        {2, 1000, 3, 0, 3, 0, 3},     // whole tensor, several blocks
        {1, 3, 1, 0, 1, 0, 1},        // one channel: the whole tensor
    };
    for (const Slab& s : slabs) slab_copy<T>(s);
}

}  // namespace

int main() {
    emu::watchdog(300);
    family<float>();
    family<bf16>();
    return report.finish();
}
