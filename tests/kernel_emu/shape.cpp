// kernels/shape.cu under emulation, launched as src/cuda/shape.rs does: permutations up to
// rank 6, slab copies (the pieces of concat, narrow, split and their gradients), and row
// gathers with their scatter gradient. Copies are checked bit for bit, and a slab copy
// must leave every element outside its slab untouched (still poisoned); the scatter's
// fp32 sums must equal the same sums taken in the same order on the host.
#include "harness.h"

#include <algorithm>

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
    static constexpr auto gather_rows = EMU_KERNEL(gather_rows_f32), scatter_rows = EMU_KERNEL(scatter_rows_f32);
};
template <>
struct K<bf16> {
    static constexpr auto permute = EMU_KERNEL(permute_bf16), slab_copy = EMU_KERNEL(slab_copy_bf16);
    static constexpr auto gather_rows = EMU_KERNEL(gather_rows_bf16), scatter_rows = EMU_KERNEL(scatter_rows_bf16);
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

// `cuda::shape::gather_rows` and `cuda::shape::scatter_rows` for `ids` into a table of
// `rows` rows of `d`: the gather is a bit-exact copy; the scatter, given the CSR the host
// builds (a stable sort of the output rows by table row), sums each group in fp32 in
// increasing order and leaves rows nobody read at zero.
template <class T>
void gather_scatter(size_t rows, size_t d, const std::vector<int64_t>& ids) {
    const size_t n = ids.size();
    const auto table = rng.values<T>(rows * d);
    DeviceArray<T> dtable(table), out(n * d);
    if (n * d > 0)
        emu::launch(grid_1d(n * d, 256), K<T>::gather_rows, dtable.ptr(), ids.data(), out.ptr(), (int64_t)d,
                    (int64_t)(n * d));
    std::vector<double> want(n * d);
    for (size_t i = 0; i < n; ++i)
        for (size_t c = 0; c < d; ++c) want[i * d + c] = table[ids[i] * d + c];
    const std::string what = format("rows %zu d %zu, %zu ids", rows, d, n);
    report.close(format("gather_rows_%s %s", Elem<T>::name, what.c_str()), out.download(), want, 0, 0);

    const auto g = rng.values<T>(n * d);
    std::vector<int64_t> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = (int64_t)i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
    std::vector<int64_t> uniq, start;
    for (size_t k = 0; k < n; ++k)
        if (uniq.empty() || uniq.back() != ids[order[k]]) {
            uniq.push_back(ids[order[k]]);
            start.push_back((int64_t)k);
        }
    start.push_back((int64_t)n);
    DeviceArray<T> dg(g), dt(rows * d);
    // The host fills zeros first (`CudaDevice::zeros`).
    std::vector<double> want_t(rows * d, 0.0);
    for (size_t i = 0; i < rows * d; ++i) dt.ptr()[i] = Elem<T>::from(0.0);
    const size_t m = uniq.size() * d;
    if (m > 0)
        emu::launch(grid_1d(m, 256), K<T>::scatter_rows, dg.ptr(), uniq.data(), start.data(), order.data(), dt.ptr(),
                    (int64_t)d, (int64_t)m);
    for (size_t r = 0; r < rows; ++r)
        for (size_t c = 0; c < d; ++c) {
            float acc = 0.f;
            for (size_t i = 0; i < n; ++i)
                if ((size_t)ids[i] == r) acc += (float)g[i * d + c];
            want_t[r * d + c] = round_to<T>(acc);
        }
    report.close(format("scatter_rows_%s %s", Elem<T>::name, what.c_str()), dt.download(), want_t, 0, 0);
}

template <class T>
void family() {
    gather_scatter<T>(7, 5, {3, 0, 3, 6, 3, 1});       // repeats, unused rows
    gather_scatter<T>(1, 1, {0});                       // one element
    gather_scatter<T>(49, 33, {48, 0, 17, 17, 17, 2});  // odd width
    gather_scatter<T>(5, 3, {});                        // no ids: an all-zero gradient
    {
        std::vector<int64_t> many(600);
        for (size_t i = 0; i < many.size(); ++i) many[i] = (int64_t)((i * 7919) % 97);
        gather_scatter<T>(101, 40, many);  // several blocks, every group several rows long
    }

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
