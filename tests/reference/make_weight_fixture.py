"""Makes tests/fixtures/weights/tiny_bf16_f16_f32.safetensors, read by tests/weights.rs.

Pinned versions (tests/reference/requirements-weights.txt): safetensors==0.8.0, numpy==2.4.6.
Run from the repository root:

    pip install -r tests/reference/requirements-weights.txt
    python3 tests/reference/make_weight_fixture.py

The values are chosen so the Rust test can state them exactly: some are representable in
their dtype, some are rounded by it (0.1 in bf16 and f16), plus an f16 subnormal, the
largest finite bf16 and f16, a negative zero and an infinity. numpy has no bfloat16, so
bf16 is written from uint16 bits through the library's raw `serialize_file`.
"""

import os
import sys

import numpy as np
import safetensors

OUT = os.path.join("tests", "fixtures", "weights", "tiny_bf16_f16_f32.safetensors")


def bf16_bits(values):
    """float32 -> bfloat16 bits, rounding to nearest even (what torch does)."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def main():
    if safetensors.__version__ != "0.8.0":
        sys.exit(f"expected safetensors 0.8.0 (the TensorSpec API), found {safetensors.__version__}")
    arrays = {
        "bf16.weight": (
            "bfloat16",
            [2, 3],
            bf16_bits([1.0, -2.5, 0.15625, 0.1, -0.0, 3.3895313892515355e38]),
        ),
        "f16.weight": ("float16", [5], np.array([0.5, -1.75, 0.1, 2.0**-24, 65504.0], dtype="<f2")),
        "f32.weight": (
            "float32",
            [2, 2, 2],
            np.array([0.0, 1.0, -1.0, np.pi, 1e-30, -7.5, 123456.789, np.inf], dtype="<f4"),
        ),
        "f32.scalar": ("float32", [], np.array(42.0, dtype="<f4")),
    }
    specs = {
        name: safetensors.TensorSpec(
            dtype=dtype, shape=shape, data_ptr=array.ctypes.data, data_len=array.nbytes
        )
        for name, (dtype, shape, array) in arrays.items()
    }
    metadata = {"format": "pt", "made_by": "make_weight_fixture.py"}
    # `arrays` keeps every buffer alive during the call, as TensorSpec requires.
    safetensors.serialize_file(specs, OUT, metadata=metadata)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
