// cuTensorMapEncodeTiled of the emulated driver (libemu_tma.so): the tensor maps the
// kernel emulation's TMA loads read (include/tma_emu.h). The emulation knows 4-d bf16
// maps in the 128-byte swizzle or none, which is what the engine encodes; anything
// else is refused with a message.
#include <cuda_bf16.h>
#include <emu.h>
#include <ptx.cuh>
#include <tma.cuh>

extern "C" __attribute__((visibility("default"))) int emu_tensor_map_encode_tiled(
    void* map, int dtype, unsigned rank, void* base, const unsigned long long* dims, const unsigned long long* strides,
    const unsigned* box, const unsigned* elem_strides, int interleave, int swizzle, int l2, int oob) {
    (void)l2;
    // CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 = 9; swizzle NONE = 0, 128B = 3; OOB fill NONE = 0.
    if (dtype != 9 || rank != 4 || interleave != 0 || (swizzle != 0 && swizzle != 3) || oob != 0) {
        fprintf(stderr,
                "emu driver: cuTensorMapEncodeTiled: only 4-d bf16 maps without interleave, in no or the 128-byte "
                "swizzle, zero-filled, are emulated (dtype %d, rank %u, interleave %d, swizzle %d, oob %d)\n",
                dtype, rank, interleave, swizzle, oob);
        return 1;
    }
    for (unsigned k = 0; k < rank; ++k)
        if (elem_strides[k] != 1) {
            fprintf(stderr, "emu driver: cuTensorMapEncodeTiled: element strides other than 1 are not emulated\n");
            return 1;
        }
    const uint64_t d[4] = {dims[0], dims[1], dims[2], dims[3]};
    const uint64_t s[3] = {strides[0], strides[1], strides[2]};
    const uint32_t b[4] = {box[0], box[1], box[2], box[3]};
    const ptx::TmaMap m = ptx::tma_encode_4d_bf16(base, d, s, b, swizzle == 3);
    memcpy(map, &m, sizeof m);
    return 0;
}
