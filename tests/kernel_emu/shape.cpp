// kernels/shape.cu under emulation, launched as src/cuda/shape.rs does: permutations up to
// rank 6 (simplified as desc::simplify_permutation does, then through the 16-byte row
// kernel, the tiled transpose or the element-wise kernel, each path counted), slab copies
// (the pieces of concat, narrow, split and their gradients, in elements or 16-byte words),
// and row gathers with their scatter gradient. Copies are checked bit for bit, and a slab
// copy must leave every element outside its slab untouched (still poisoned); the
// scatter's fp32 sums must equal the same sums taken in the same order on the host.
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
    static constexpr auto transpose = EMU_KERNEL(transpose_tiles_f32);
    static constexpr auto gather_rows = EMU_KERNEL(gather_rows_f32), scatter_rows = EMU_KERNEL(scatter_rows_f32);
};
template <>
struct K<bf16> {
    static constexpr auto permute = EMU_KERNEL(permute_bf16), slab_copy = EMU_KERNEL(slab_copy_bf16);
    static constexpr auto transpose = EMU_KERNEL(transpose_tiles_bf16);
    static constexpr auto gather_rows = EMU_KERNEL(gather_rows_bf16), scatter_rows = EMU_KERNEL(scatter_rows_bf16);
};

std::string str(const Shape& s) {
    std::string r = "[";
    for (size_t i = 0; i < s.size(); ++i) r += (i ? "," : "") + std::to_string(s[i]);
    return r + "]";
}

// desc::simplify_permutation: size-1 dimensions dropped, input-adjacent runs merged.
void simplify(const Shape& shape, const Shape& perm, Shape& out_shape, Shape& out_perm) {
    std::vector<std::pair<size_t, size_t>> runs;  // (first, last) input dimension
    for (size_t d : perm) {
        if (shape[d] == 1) continue;
        bool joins = false;
        if (!runs.empty() && runs.back().second < d) {
            joins = true;
            for (size_t e = runs.back().second + 1; e < d; ++e) joins &= shape[e] == 1;
        }
        if (joins)
            runs.back().second = d;
        else
            runs.push_back({d, d});
    }
    std::vector<size_t> by_input(runs.size());
    for (size_t r = 0; r < runs.size(); ++r) by_input[r] = r;
    std::sort(by_input.begin(), by_input.end(), [&](size_t a, size_t b) { return runs[a].first < runs[b].first; });
    out_shape.assign(runs.size(), 1);
    out_perm.assign(runs.size(), 0);
    for (size_t nd = 0; nd < runs.size(); ++nd) {
        const size_t r = by_input[nd];
        for (size_t d = runs[r].first; d <= runs[r].second; ++d) out_shape[nd] *= shape[d];
        out_perm[r] = nd;
    }
}

std::vector<size_t> strides(const Shape& shape) {
    std::vector<size_t> st(shape.size(), 1);
    for (size_t d = shape.size(); d-- > 1;) st[d - 1] = st[d] * shape[d];
    return st;
}

// The launcher's cap on grid y (MAX_GRID_Y), lowered for a few cases so that the kernels'
// grid-stride loops over y (and the transpose's barrier between batch entries) run.
size_t grid_y_cap = 65535;

// How many permutations took each path of the launcher.
size_t rows16_runs = 0, transpose_runs = 0, element_runs = 0, identity_runs = 0;

void launch_slab_runs(const void* src, void* dst, size_t elem, size_t run, size_t src_stride, size_t src_base,
                      size_t dst_stride, size_t dst_base, size_t outer);

// `cuda::shape::permute`: output dimension d walks input dimension perm[d].
template <class T>
void permute(const Shape& shape0, const Shape& perm0) {
    size_t n = 1;
    for (size_t d : shape0) n *= d;
    const auto x = rng.values<T>(n);
    DeviceArray<T> dx(x), out(n);

    Shape shape, perm;
    simplify(shape0, perm0, shape, perm);
    const size_t rank = shape.size();
    const auto st = strides(shape);
    const size_t last = rank ? shape[rank - 1] : 1;
    if (rank <= 1) {
        ++identity_runs;
        launch_slab_runs(dx.ptr(), out.ptr(), sizeof(T), n, n, 0, n, 0, 1);
    } else if (perm[rank - 1] == rank - 1 && last * sizeof(T) % 16 == 0) {
        ++rows16_runs;
        const size_t words = last * sizeof(T) / 16;
        PermuteDesc d{};
        d.rank = (int32_t)rank - 1;
        for (size_t k = 0; k + 1 < rank; ++k) {
            d.out_shape[k] = (int64_t)shape[perm[k]];
            d.src_stride[k] = (int64_t)(st[perm[k]] / last * words);
        }
        const size_t total = n / last * words;
        emu::launch(grid_1d(total, 256), EMU_KERNEL(permute_rows16), reinterpret_cast<const uint4*>(dx.ptr()),
                    reinterpret_cast<uint4*>(out.ptr()), d, (int64_t)words, (int64_t)total);
    } else if (perm[rank - 1] != rank - 1) {
        ++transpose_runs;
        Shape oshape(rank);
        for (size_t k = 0; k < rank; ++k) oshape[k] = shape[perm[k]];
        const auto ost = strides(oshape);
        const size_t q = std::find(perm.begin(), perm.end(), rank - 1) - perm.begin(), b = perm[rank - 1];
        TransposeDesc d{};
        d.len_a = (int64_t)last;
        d.len_b = (int64_t)shape[b];
        d.in_stride_b = (int64_t)st[b];
        d.out_stride_a = (int64_t)ost[q];
        d.batches = 1;
        for (size_t k = 0; k < rank; ++k) {
            if (k == q || k == rank - 1) continue;
            d.batch_shape[d.batch_rank] = (int64_t)shape[perm[k]];
            d.batch_in[d.batch_rank] = (int64_t)st[perm[k]];
            d.batch_out[d.batch_rank] = (int64_t)ost[k];
            ++d.batch_rank;
            d.batches *= (int64_t)shape[perm[k]];
        }
        const unsigned tiles = (unsigned)(ceil_div(last, 32) * ceil_div(shape[b], 32));
        emu::launch(emu::LaunchConfig{dim3(tiles, (unsigned)std::min<int64_t>(d.batches, (int64_t)grid_y_cap)), dim3(32, 8), 0},
                    K<T>::transpose, dx.ptr(), out.ptr(), d);
    } else {
        ++element_runs;
        PermuteDesc desc{};
        desc.rank = (int32_t)rank;
        for (size_t k = 0; k < rank; ++k) {
            desc.out_shape[k] = (int64_t)shape[perm[k]];
            desc.src_stride[k] = (int64_t)st[perm[k]];
        }
        emu::launch(grid_1d(n, 256), K<T>::permute, dx.ptr(), out.ptr(), desc, (int64_t)n);
    }

    // Reference: walk the output of the original permutation in row-major order.
    const size_t rank0 = shape0.size();
    std::vector<double> want(n);
    std::vector<size_t> out_coord(rank0, 0);
    for (size_t i = 0; i < n; ++i) {
        std::vector<size_t> in_coord(rank0);
        for (size_t k = 0; k < rank0; ++k) in_coord[perm0[k]] = out_coord[k];
        size_t idx = 0;
        for (size_t d = 0; d < rank0; ++d) idx = idx * shape0[d] + in_coord[d];
        want[i] = x[idx];
        for (size_t k = rank0; k-- > 0;) {
            if (++out_coord[k] < shape0[perm0[k]]) break;
            out_coord[k] = 0;
        }
    }
    report.close(format("permute_%s %s by %s", Elem<T>::name, str(shape0).c_str(), str(perm0).c_str()),
                 out.download(), want, 0, 0);
}

// `cuda::shape::launch_slab`: `outer` runs of `run` elements of `elem` bytes, in 16-byte
// words when every length and offset is whole words.
void launch_slab_runs(const void* src, void* dst, size_t elem, size_t run, size_t src_stride, size_t src_base,
                      size_t dst_stride, size_t dst_base, size_t outer) {
    const size_t per_word = 16 / elem;
    size_t a[5] = {run, src_stride, src_base, dst_stride, dst_base};
    const bool words = std::all_of(a, a + 5, [&](size_t v) { return v % per_word == 0; });
    if (words)
        for (size_t& v : a) v /= per_word;
    emu::LaunchConfig cfg = grid_1d(a[0], 256);
    cfg.grid.x = std::min(cfg.grid.x, 1u << 16);
    cfg.grid.y = (unsigned)std::min<size_t>(outer, grid_y_cap);
    const int64_t r = (int64_t)a[0], ss = (int64_t)a[1], sb = (int64_t)a[2], ds = (int64_t)a[3], db = (int64_t)a[4];
    if (words)
        emu::launch(cfg, EMU_KERNEL(slab_copy16), static_cast<const uint4*>(src), static_cast<uint4*>(dst), r, ss, sb,
                    ds, db, (int64_t)outer);
    else if (elem == 4)
        emu::launch(cfg, K<float>::slab_copy, static_cast<const float*>(src), static_cast<float*>(dst), r, ss, sb, ds,
                    db, (int64_t)outer);
    else
        emu::launch(cfg, K<bf16>::slab_copy, static_cast<const bf16*>(src), static_cast<bf16*>(dst), r, ss, sb, ds, db,
                    (int64_t)outer);
}

// cpu::shape::Slab: dst[o, dst_off + c, i] = src[o, src_off + c, i] for c < len, both
// viewed as [outer, channels, inner].
struct Slab {
    size_t outer, inner, src_dim, src_off, dst_dim, dst_off, len;
};

// `cuda::shape::copy_slab` into a fresh (poisoned) destination.
template <class T>
void slab_copy(const Slab& s) {
    const auto src = rng.values<T>(s.outer * s.src_dim * s.inner);
    DeviceArray<T> dsrc(src), dst(s.outer * s.dst_dim * s.inner);
    launch_slab_runs(dsrc.ptr(), dst.ptr(), sizeof(T), s.len * s.inner, s.src_dim * s.inner, s.src_off * s.inner,
                     s.dst_dim * s.inner, s.dst_off * s.inner, s.outer);

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
// `rows` rows of `d`, with the index tensor laid out as `ops::RowIndices` does (f32: the
// ids; the positions stably sorted by id; the table rows padded to one group per id with
// -1; their starts padded with n). The gather is a bit-exact copy; the scatter sums each
// group in fp32 in increasing order and leaves rows nobody read at zero. One launch shape
// whatever the ids.
template <class T>
void gather_scatter(size_t rows, size_t d, const std::vector<int64_t>& ids) {
    const size_t n = ids.size();
    const auto table = rng.values<T>(rows * d);
    std::vector<int64_t> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = (int64_t)i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
    std::vector<int64_t> uniq, start;
    for (size_t k = 0; k < n; ++k)
        if (uniq.empty() || uniq.back() != ids[order[k]]) {
            uniq.push_back(ids[order[k]]);
            start.push_back((int64_t)k);
        }
    std::vector<double> ix;
    for (int64_t v : ids) ix.push_back((double)v);
    for (int64_t v : order) ix.push_back((double)v);
    for (size_t u = 0; u < n; ++u) ix.push_back(u < uniq.size() ? (double)uniq[u] : -1.0);
    for (size_t u = 0; u <= n; ++u) ix.push_back(u < start.size() ? (double)start[u] : (double)n);
    DeviceArray<float> dix(ix);

    DeviceArray<T> dtable(table), out(n * d);
    if (n * d > 0)
        emu::launch(grid_1d(n * d, 256), K<T>::gather_rows, dtable.ptr(), dix.ptr(), out.ptr(), (int64_t)d,
                    (int64_t)(n * d), (int64_t)rows);
    std::vector<double> want(n * d);
    for (size_t i = 0; i < n; ++i)
        for (size_t c = 0; c < d; ++c) want[i * d + c] = table[ids[i] * d + c];
    const std::string what = format("rows %zu d %zu, %zu ids", rows, d, n);
    report.close(format("gather_rows_%s %s", Elem<T>::name, what.c_str()), out.download(), want, 0, 0);

    const auto g = rng.values<T>(n * d);
    DeviceArray<T> dg(g), dt(rows * d);
    // The host fills zeros first (`CudaDevice::zeros`).
    for (size_t i = 0; i < rows * d; ++i) dt.ptr()[i] = Elem<T>::from(0.0);
    if (n * d > 0)
        emu::launch(grid_1d(n * d, 256), K<T>::scatter_rows, dg.ptr(), dix.ptr() + 2 * n, dix.ptr() + 3 * n,
                    dix.ptr() + n, dt.ptr(), (int64_t)d, (int64_t)(n * d), (int64_t)rows, (int64_t)n);
    std::vector<double> want_t(rows * d, 0.0);
    for (size_t r = 0; r < rows; ++r)
        for (size_t c = 0; c < d; ++c) {
            float acc = 0.f;
            for (size_t i = 0; i < n; ++i)
                if ((size_t)ids[i] == r) acc += (float)g[i * d + c];
            want_t[r * d + c] = round_to<T>(acc);
        }
    report.close(format("scatter_rows_%s %s", Elem<T>::name, what.c_str()), dt.download(), want_t, 0, 0);
}

// Indices outside the table (a forged index tensor) read zeros and write nothing.
template <class T>
void out_of_range() {
    const size_t rows = 4, d = 3;
    const auto table = rng.values<T>(rows * d);
    DeviceArray<T> dtable(table), out(3 * d), g(rng.values<T>(3 * d)), dt(rows * d);
    const std::vector<double> ids = {1, 4, -1};
    DeviceArray<float> dids(ids);
    emu::launch(grid_1d(3 * d, 256), K<T>::gather_rows, dtable.ptr(), dids.ptr(), out.ptr(), (int64_t)d,
                (int64_t)(3 * d), (int64_t)rows);
    std::vector<double> want(3 * d, 0.0);
    for (size_t c = 0; c < d; ++c) want[c] = table[d + c];
    report.close(format("gather_rows_%s out of range", Elem<T>::name), out.download(), want, 0, 0);
    // Groups: row 7 (outside), row 2 with positions 0..3 of which 5 and 9 are outside g.
    const std::vector<double> uniq = {7, 2, -1}, start = {0, 1, 4, 4}, pos = {0, 5, 1, 9};
    DeviceArray<float> du(uniq), ds(start), dp(pos);
    for (size_t i = 0; i < rows * d; ++i) dt.ptr()[i] = Elem<T>::from(0.0);
    const auto gv = g.download();
    emu::launch(grid_1d(3 * d, 256), K<T>::scatter_rows, g.ptr(), du.ptr(), ds.ptr(), dp.ptr(), dt.ptr(), (int64_t)d,
                (int64_t)(3 * d), (int64_t)rows, (int64_t)3);
    std::vector<double> want_t(rows * d, 0.0);
    for (size_t c = 0; c < d; ++c) want_t[2 * d + c] = round_to<T>((float)gv[d + c]);
    report.close(format("scatter_rows_%s out of range", Elem<T>::name), dt.download(), want_t, 0, 0);
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
    out_of_range<T>();

    permute<T>({17}, {0});
    permute<T>({5, 7}, {1, 0});
    permute<T>({2, 3, 4}, {2, 0, 1});
    permute<T>({2, 3, 4}, {0, 2, 1});
    permute<T>({2, 9, 3, 16}, {0, 2, 1, 3});  // [B, N, H, Dh] <-> [B, H, N, Dh]: 16-byte rows
    permute<T>({2, 9, 3, 12}, {0, 2, 1, 3});  // rows of 24 / 48 bytes
    permute<T>({2, 5, 3, 6}, {0, 2, 1, 3});   // rows of 12 / 24 bytes: element-wise for bf16
    permute<T>({3, 1, 5, 7, 2}, {4, 2, 0, 3, 1});
    permute<T>({2, 3, 1, 4, 2, 3}, {5, 3, 1, 0, 4, 2});
    permute<T>({37, 71}, {1, 0});             // tiles cut at both edges
    permute<T>({3, 40, 33}, {0, 2, 1});       // [B, C, HW] -> [B, HW, C]
    permute<T>({2, 3, 5, 7}, {0, 2, 3, 1});   // channels last: merges H, W
    permute<T>({2, 3, 5, 7}, {3, 1, 0, 2});   // a batch of two dimensions
    permute<T>({1, 4, 3, 2, 5, 2}, {0, 2, 4, 1, 3, 5});  // patchify
    permute<T>({1, 3, 5, 4, 2, 2}, {0, 5, 1, 3, 2, 4});  // unpatchify
    permute<T>({2, 3, 4, 1}, {0, 1, 3, 2});   // an identity after simplification
    permute<T>({1, 1}, {1, 0});               // one element
    // Random permutations of small shapes.
    for (int t = 0; t < 40; ++t) {
        const size_t rank = 2 + rng.below(5);
        Shape shape(rank), perm(rank);
        for (size_t d = 0; d < rank; ++d) shape[d] = 1 + rng.below(d + 1 == rank ? 17 : 5);
        for (size_t d = 0; d < rank; ++d) perm[d] = d;
        for (size_t d = rank; d-- > 1;) std::swap(perm[d], perm[rng.below(d + 1)]);
        permute<T>(shape, perm);
        // The same leading dimensions with a row of whole 16-byte words kept last.
        shape.push_back(16 / sizeof(T) * (1 + rng.below(3)));
        perm.push_back(rank);
        permute<T>(shape, perm);
    }

    const Slab slabs[] = {
        {3, 5, 4, 0, 9, 2, 4},        // a concat piece in the middle
        {3, 5, 5, 0, 9, 4, 5},        // the last concat piece
        {2, 7, 10, 3, 5, 0, 5},       // narrow
        {1, 1, 100, 17, 40, 1, 39},   // inner 1
        {4, 130, 2, 1, 3, 2, 1},      // one channel, long rows
        {2, 1000, 3, 0, 3, 0, 3},     // whole tensor, several blocks
        {1, 3, 1, 0, 1, 0, 1},        // one channel: the whole tensor
        {3, 8, 4, 1, 6, 2, 3},        // inner of 8: 16-byte words for bf16, 32 bytes for f32
        {2, 4, 6, 2, 3, 1, 2},        // inner 4: words for f32 only
    };
    for (const Slab& s : slabs) slab_copy<T>(s);

    // Grid-stride loops over y: more batch entries and runs than blocks along y.
    grid_y_cap = 2;
    permute<T>({5, 40, 33}, {0, 2, 1});
    permute<T>({3, 2, 7, 9}, {3, 1, 0, 2});
    slab_copy<T>({5, 8, 4, 1, 6, 2, 3});
    slab_copy<T>({7, 3, 5, 1, 4, 0, 3});
    grid_y_cap = 65535;
}

}  // namespace

int main() {
    emu::watchdog(300);
    family<float>();
    family<bf16>();
    report.expect(rows16_runs > 10 && transpose_runs > 10 && element_runs > 10 && identity_runs > 2,
                  format("every permute path ran: %zu by 16-byte rows, %zu tiled, %zu element-wise, %zu identities",
                         rows16_runs, transpose_runs, element_runs, identity_runs));
    return report.finish();
}
