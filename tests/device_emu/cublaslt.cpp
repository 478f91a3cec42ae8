// An emulated cuBLASLt (libcublasLt.so) for the device emulation tier
// (tests/device_emu/README.md). It computes D = alpha·op(A)·op(B) + beta·C (+ bias, then
// ReLU or GELU-tanh) column-major, as cuBLASLt defines it, with strided batches, in f32 or
// bf16 operands, accumulating in double and rounding once to D's type. The training
// epilogues are emulated too: GELU_AUX[_BIAS] (D = GELU(x), the GELU input x written to the
// aux matrix) and DGELU[_BGRAD] (D = product · GELU'(aux), and the bias gradient: D summed
// along its columns, into the bias pointer), with cuBLASLt's rule that the aux leading
// dimension be a multiple of 8 no smaller than D's rows (checked by the heuristic, as
// cuBLASLt's finds no algorithm then, and by the call). Operands must lie
// inside live allocations of the emulated driver; the product runs on the stream as the
// driver runs everything (at once, or recorded while the stream is captured).
// Anything else cuBLASLt offers (other types, orders, epilogues) is refused with
// CUBLAS_STATUS_NOT_SUPPORTED and a message naming it.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#define EXPORT extern "C" __attribute__((visibility("default")))

extern "C" int emu_driver_enqueue(void* stream, int (*op)(void*), void* ctx, void (*drop)(void*));
extern "C" int emu_driver_check_range(const char* what, unsigned long long ptr, size_t bytes);

using Status = int;
enum : int { SUCCESS = 0, INVALID_VALUE = 7, EXECUTION_FAILED = 13, NOT_SUPPORTED = 15 };
// cudaDataType_t
enum : int { R_32F = 0, R_64F = 1, R_16BF = 14 };

namespace {

Status unsupported(const char* fmt, long value) {
    fprintf(stderr, "emu cuBLASLt: ");
    fprintf(stderr, fmt, value);
    fprintf(stderr, " is not emulated\n");
    return NOT_SUPPORTED;
}

size_t type_size(int t) { return t == R_32F ? 4 : t == R_64F ? 8 : t == R_16BF ? 2 : 0; }

double load(int t, const unsigned char* p, size_t i) {
    switch (t) {
        case R_32F: {
            float v;
            memcpy(&v, p + 4 * i, 4);
            return v;
        }
        case R_64F: {
            double v;
            memcpy(&v, p + 8 * i, 8);
            return v;
        }
        default: {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            uint32_t u = (uint32_t)h << 16;
            float v;
            memcpy(&v, &u, 4);
            return v;
        }
    }
}

void store(int t, unsigned char* p, size_t i, double x) {
    switch (t) {
        case R_32F: {
            float v = (float)x;
            memcpy(p + 4 * i, &v, 4);
            break;
        }
        case R_64F: memcpy(p + 8 * i, &x, 8); break;
        default: {
            float v = (float)x;
            uint32_t u;
            memcpy(&u, &v, 4);
            uint16_t h;
            if ((u & 0x7fffffffu) > 0x7f800000u) h = (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
            else h = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);           // nearest, ties to even
            memcpy(p + 2 * i, &h, 2);
        }
    }
}

struct Layout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
    int32_t batch = 1;
    int64_t stride = 0;
    int32_t order = 0;  // CUBLASLT_ORDER_COL
};

struct Desc {
    int compute, scale;
    int32_t trans[3] = {0, 0, 0};
    uint32_t epilogue = 1;  // DEFAULT
    const void* bias = nullptr;
    int64_t bias_stride = 0;
    int bias_type = -1;  // D's type unless set
    void* aux = nullptr;
    int64_t aux_ld = 0;
    int64_t aux_stride = 0;
    int aux_type = -1;  // D's type unless set
    int32_t pointer_mode = 0;
};

struct Op {
    Layout a, b, c, d;
    Desc desc;
    double alpha, beta;
    const unsigned char *pa, *pb, *pc, *bias;
    unsigned char* pd;
};

size_t span(const Layout& l) { return (size_t)(l.batch - 1) * l.stride + (l.cols - 1) * l.ld + l.rows; }

// cublasLtEpilogue_t values and what they involve.
enum : uint32_t { GELU_AUX = 160, GELU_AUX_BIAS = 164, DGELU = 192, DGELU_BGRAD = 208 };
bool reads_bias(uint32_t e) { return e == 4 || e == 6 || e == 36 || e == GELU_AUX_BIAS; }
bool uses_aux(uint32_t e) { return e == GELU_AUX || e == GELU_AUX_BIAS || e == DGELU || e == DGELU_BGRAD; }
bool gelu_forward(uint32_t e) { return e == 32 || e == 36 || e == GELU_AUX || e == GELU_AUX_BIAS; }

constexpr double kGeluC = 0.7978845608028654;  // sqrt(2/pi)
double gelu_tanh(double v) { return 0.5 * v * (1 + std::tanh(kGeluC * (v + 0.044715 * v * v * v))); }
double gelu_tanh_grad(double v) {
    const double t = std::tanh(kGeluC * (v + 0.044715 * v * v * v));
    return 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * kGeluC * (1 + 3 * 0.044715 * v * v);
}

// The aux rules cuBLASLt documents for the GELU epilogues: a pointer, a leading dimension
// that is a multiple of 8 and at least D's rows; one batch. Returns 0 or a status. The
// heuristic runs before the pointer is set (`need_pointer` false).
Status check_aux(const Desc& d, uint64_t rows, int32_t batches, bool need_pointer) {
    if (!uses_aux(d.epilogue)) return SUCCESS;
    if (need_pointer && d.aux == nullptr) {
        fprintf(stderr, "emu cuBLASLt: epilogue %u without an aux pointer\n", d.epilogue);
        return INVALID_VALUE;
    }
    if (d.aux_ld % 8 != 0 || d.aux_ld < (int64_t)rows) {
        fprintf(stderr, "emu cuBLASLt: aux leading dimension %ld for %lu rows (a multiple of 8, at least the rows)\n",
                (long)d.aux_ld, (unsigned long)rows);
        return NOT_SUPPORTED;
    }
    if (batches != 1) return unsupported("a GELU aux epilogue over %ld batches", batches);
    return SUCCESS;
}

int run(void* ctx) {
    const Op& o = *static_cast<const Op*>(ctx);
    const bool ta = o.desc.trans[0] != 0, tb = o.desc.trans[1] != 0;
    const uint64_t m = o.d.rows, n = o.d.cols, k = ta ? o.a.rows : o.a.cols;
    const uint32_t epi = o.desc.epilogue;
    const bool has_bias = reads_bias(epi), bgrad = epi == DGELU_BGRAD, aux = uses_aux(epi);
    const int bias_type = o.desc.bias_type >= 0 ? o.desc.bias_type : o.d.type;
    const int aux_type = o.desc.aux_type >= 0 ? o.desc.aux_type : o.d.type;
    struct Operand {
        const char* what;
        const Layout* l;
        const void* p;
        int t;
    };
    const Operand ops[4] = {{"A", &o.a, o.pa, o.a.type}, {"B", &o.b, o.pb, o.b.type}, {"C", &o.c, o.pc, o.c.type},
                            {"D", &o.d, o.pd, o.d.type}};
    for (const Operand& op : ops) {
        if (op.p == o.pc && o.beta == 0 && op.l == &o.c) continue;  // C is not read with beta 0
        char what[64];
        snprintf(what, sizeof what, "cuBLASLt matmul operand %s", op.what);
        if (!emu_driver_check_range(what, (uintptr_t)op.p, span(*op.l) * type_size(op.t))) return EXECUTION_FAILED;
    }
    const int32_t batches = o.d.batch;
    if ((has_bias || bgrad) &&
        !emu_driver_check_range(bgrad ? "cuBLASLt matmul bias gradient" : "cuBLASLt matmul bias", (uintptr_t)o.bias,
                                ((size_t)(batches - 1) * o.desc.bias_stride + m) * type_size(bias_type)))
        return EXECUTION_FAILED;
    if (aux && !emu_driver_check_range("cuBLASLt matmul aux", (uintptr_t)o.desc.aux,
                                       ((n - 1) * (size_t)o.desc.aux_ld + m) * type_size(aux_type)))
        return EXECUTION_FAILED;
    double* bias_grad = bgrad ? new double[m]() : nullptr;
    auto* aux_p = static_cast<unsigned char*>(o.desc.aux);
    for (int32_t bt = 0; bt < batches; ++bt) {
        const unsigned char* A = o.pa + (size_t)bt * o.a.stride * type_size(o.a.type);
        const unsigned char* B = o.pb + (size_t)bt * o.b.stride * type_size(o.b.type);
        const unsigned char* C = o.pc + (size_t)bt * o.c.stride * type_size(o.c.type);
        unsigned char* D = o.pd + (size_t)bt * o.d.stride * type_size(o.d.type);
        for (uint64_t j = 0; j < n; ++j)
            for (uint64_t i = 0; i < m; ++i) {
                double acc = 0;
                for (uint64_t p = 0; p < k; ++p) {
                    const double x = ta ? load(o.a.type, A, p + i * o.a.ld) : load(o.a.type, A, i + p * o.a.ld);
                    const double y = tb ? load(o.b.type, B, j + p * o.b.ld) : load(o.b.type, B, p + j * o.b.ld);
                    acc += x * y;
                }
                double v = o.alpha * acc;
                if (o.beta != 0) v += o.beta * load(o.c.type, C, i + j * o.c.ld);
                if (has_bias) v += load(bias_type, o.bias, (size_t)bt * o.desc.bias_stride + i);
                if (epi == 2 || epi == 6) v = v > 0 ? v : 0;
                if (aux && gelu_forward(epi)) store(aux_type, aux_p, i + j * o.desc.aux_ld, v);
                if (gelu_forward(epi)) v = gelu_tanh(v);
                if (epi == DGELU || epi == DGELU_BGRAD) v *= gelu_tanh_grad(load(aux_type, aux_p, i + j * o.desc.aux_ld));
                if (bgrad) bias_grad[i] += v;
                store(o.d.type, D, i + j * o.d.ld, v);
            }
    }
    if (bgrad) {
        for (uint64_t i = 0; i < m; ++i) store(bias_type, const_cast<unsigned char*>(o.bias), i, bias_grad[i]);
        delete[] bias_grad;
    }
    return 0;
}

}  // namespace

EXPORT Status cublasLtCreate(void** handle) {
    static int the_handle;
    *handle = &the_handle;
    return SUCCESS;
}
EXPORT Status cublasLtDestroy(void*) { return SUCCESS; }
EXPORT size_t cublasLtGetVersion() { return 130000; }

EXPORT Status cublasLtMatrixLayoutCreate(void** layout, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (type_size(type) == 0) return unsupported("data type %ld", type);
    *layout = new Layout{type, rows, cols, ld};
    return SUCCESS;
}
EXPORT Status cublasLtMatrixLayoutDestroy(void* layout) {
    delete static_cast<Layout*>(layout);
    return SUCCESS;
}
EXPORT Status cublasLtMatrixLayoutSetAttribute(void* layout, int attr, const void* buf, size_t size) {
    auto* l = static_cast<Layout*>(layout);
    switch (attr) {
        case 0: memcpy(&l->type, buf, 4); break;
        case 1:
            memcpy(&l->order, buf, 4);
            if (l->order != 0) return unsupported("matrix order %ld", l->order);
            break;
        case 2: memcpy(&l->rows, buf, 8); break;
        case 3: memcpy(&l->cols, buf, 8); break;
        case 4: memcpy(&l->ld, buf, 8); break;
        case 5: memcpy(&l->batch, buf, 4); break;
        case 6: memcpy(&l->stride, buf, 8); break;
        default: return unsupported("matrix layout attribute %ld", attr);
    }
    (void)size;
    return SUCCESS;
}

EXPORT Status cublasLtMatmulDescCreate(void** desc, int compute, int scale) {
    if (compute != 68 && compute != 77 && compute != 69 && compute != 70)
        return unsupported("compute type %ld", compute);
    if (scale != R_32F && scale != R_64F) return unsupported("scale type %ld", scale);
    *desc = new Desc{compute, scale};
    return SUCCESS;
}
EXPORT Status cublasLtMatmulDescDestroy(void* desc) {
    delete static_cast<Desc*>(desc);
    return SUCCESS;
}
EXPORT Status cublasLtMatmulDescSetAttribute(void* desc, int attr, const void* buf, size_t size) {
    auto* d = static_cast<Desc*>(desc);
    switch (attr) {
        case 2: memcpy(&d->pointer_mode, buf, 4); break;
        case 3: case 4: case 5: memcpy(&d->trans[attr - 3], buf, 4); break;
        case 7:
            memcpy(&d->epilogue, buf, 4);
            if (d->epilogue != 1 && d->epilogue != 2 && d->epilogue != 4 && d->epilogue != 6 && d->epilogue != 32 &&
                d->epilogue != 36 && !uses_aux(d->epilogue))
                return unsupported("epilogue %ld", d->epilogue);
            break;
        case 8: memcpy(&d->bias, buf, sizeof(void*)); break;
        case 10: memcpy(&d->bias_stride, buf, 8); break;
        case 11: memcpy(&d->aux, buf, sizeof(void*)); break;
        case 12: memcpy(&d->aux_ld, buf, 8); break;
        case 13:
            memcpy(&d->aux_stride, buf, 8);
            if (d->aux_stride != 0) return unsupported("aux batch stride %ld", d->aux_stride);
            break;
        case 22: memcpy(&d->aux_type, buf, 4); break;
        case 26: memcpy(&d->bias_type, buf, 4); break;
        default: return unsupported("matmul descriptor attribute %ld", attr);
    }
    (void)size;
    return SUCCESS;
}

EXPORT Status cublasLtMatmulPreferenceCreate(void** pref) {
    static int the_pref;
    *pref = &the_pref;
    return SUCCESS;
}
EXPORT Status cublasLtMatmulPreferenceDestroy(void*) { return SUCCESS; }
EXPORT Status cublasLtMatmulPreferenceSetAttribute(void*, int, const void*, size_t) { return SUCCESS; }

// cublasLtMatmulHeuristicResult_t: a 64-byte algorithm, its workspace, status, waves.
struct Heuristic {
    uint64_t algo[8];
    size_t workspace;
    int state;
    float waves;
    int reserved[4];
};
EXPORT Status cublasLtMatmulAlgoGetHeuristic(void*, void* desc, void*, void*, void*, void* ddesc, void*, int requested,
                                            Heuristic* results, int* count) {
    if (requested < 1) return INVALID_VALUE;
    const Layout& d = *static_cast<Layout*>(ddesc);
    if (const Status s = check_aux(*static_cast<Desc*>(desc), d.rows, d.batch, false); s != SUCCESS) {
        *count = 0;
        return s;
    }
    memset(&results[0], 0, sizeof(Heuristic));
    results[0].algo[0] = 0xE3u;  // any non-zero mark
    results[0].waves = 1;
    *count = 1;
    return SUCCESS;
}

EXPORT Status cublasLtMatmul(void*, void* desc, const void* alpha, const void* a, void* adesc, const void* b,
                             void* bdesc, const void* beta, const void* c, void* cdesc, void* d, void* ddesc,
                             const void* algo, void* workspace, size_t workspace_bytes, void* stream) {
    (void)algo, (void)workspace, (void)workspace_bytes;
    const Desc& ds = *static_cast<Desc*>(desc);
    if (ds.pointer_mode != 0) return unsupported("pointer mode %ld", ds.pointer_mode);
    if (ds.trans[2] != 0) return unsupported("transposed C (%ld)", ds.trans[2]);
    auto* op = new Op{*static_cast<Layout*>(adesc), *static_cast<Layout*>(bdesc), *static_cast<Layout*>(cdesc),
                      *static_cast<Layout*>(ddesc), ds, 0, 0,
                      static_cast<const unsigned char*>(a), static_cast<const unsigned char*>(b),
                      static_cast<const unsigned char*>(c), static_cast<const unsigned char*>(ds.bias),
                      static_cast<unsigned char*>(d)};
    if (ds.scale == R_64F) {
        memcpy(&op->alpha, alpha, 8);
        memcpy(&op->beta, beta, 8);
    } else {
        float x, y;
        memcpy(&x, alpha, 4);
        memcpy(&y, beta, 4);
        op->alpha = x, op->beta = y;
    }
    const bool ta = ds.trans[0] != 0, tb = ds.trans[1] != 0;
    const uint64_t m = op->d.rows, n = op->d.cols, k = ta ? op->a.rows : op->a.cols;
    const bool shapes = (ta ? op->a.cols : op->a.rows) == m && (tb ? op->b.rows : op->b.cols) == n &&
                        (tb ? op->b.cols : op->b.rows) == k && op->c.rows == m && op->c.cols == n &&
                        op->a.ld >= (int64_t)op->a.rows && op->b.ld >= (int64_t)op->b.rows &&
                        op->c.ld >= (int64_t)m && op->d.ld >= (int64_t)m && op->a.batch == op->d.batch &&
                        op->b.batch == op->d.batch && op->c.batch == op->d.batch;
    if (!shapes) {
        fprintf(stderr,
                "emu cuBLASLt: inconsistent matmul: A %lux%lu ld %ld (trans %d), B %lux%lu ld %ld (trans %d), "
                "D %lux%lu ld %ld, batches %d/%d/%d\n",
                (unsigned long)op->a.rows, (unsigned long)op->a.cols, (long)op->a.ld, (int)ta,
                (unsigned long)op->b.rows, (unsigned long)op->b.cols, (long)op->b.ld, (int)tb,
                (unsigned long)op->d.rows, (unsigned long)op->d.cols, (long)op->d.ld, op->a.batch, op->b.batch,
                op->d.batch);
        delete op;
        return INVALID_VALUE;
    }
    if ((reads_bias(ds.epilogue) || ds.epilogue == DGELU_BGRAD) && ds.bias == nullptr) {
        fprintf(stderr, "emu cuBLASLt: a bias epilogue without a bias pointer\n");
        delete op;
        return INVALID_VALUE;
    }
    if (const Status s = check_aux(ds, m, op->d.batch, true); s != SUCCESS) {
        delete op;
        return s;
    }
    const int r = emu_driver_enqueue(stream, run, op, [](void* p) { delete static_cast<Op*>(p); });
    return r == 0 ? SUCCESS : EXECUTION_FAILED;
}
