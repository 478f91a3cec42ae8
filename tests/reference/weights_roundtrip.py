"""Reads a safetensors file written by the engine and writes a transformed copy back.

Used by tests/weights.rs (`python_reads_and_writes_our_files`) to check both directions
of compatibility with the reference implementation. Pinned versions as in
tests/reference/requirements-weights.txt (safetensors==0.8.0, numpy==2.4.6).

    python3 tests/reference/weights_roundtrip.py IN OUT

Every float tensor `name` of IN becomes `py.<name>` in OUT with values 2*x + 1 (computed
in float32, stored in the input's dtype), and the metadata of IN is copied with one key
added: "python" = "safetensors <version>".
"""

import sys

import numpy as np
import safetensors
from safetensors import safe_open


def to_f32(dtype, data):
    if dtype == "BF16":
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    if dtype == "F16":
        return np.frombuffer(data, dtype="<f2").astype(np.float32)
    if dtype == "F32":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    sys.exit(f"unexpected dtype {dtype}")


def from_f32(dtype, values):
    if dtype == "BF16":
        bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
        return ("bfloat16", ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2"))
    if dtype == "F16":
        return ("float16", values.astype("<f2"))
    return ("float32", values.astype("<f4"))


def main():
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, "rb") as f:
        entries = safetensors.deserialize(f.read())
    with safe_open(src, framework="numpy") as f:
        metadata = dict(f.metadata() or {})
        for name in f.keys():
            if f.get_slice(name).get_dtype() == "F32":
                # numpy's own path must agree with the raw bytes.
                raw = dict(entries)[name]
                assert np.array_equal(f.get_tensor(name).reshape(-1), to_f32("F32", raw["data"]))
    arrays = {}
    for name, info in entries:
        values = to_f32(info["dtype"], info["data"]) * np.float32(2) + np.float32(1)
        arrays["py." + name] = (info["shape"], *from_f32(info["dtype"], values))
    specs = {
        name: safetensors.TensorSpec(dtype=dtype, shape=shape, data_ptr=a.ctypes.data, data_len=a.nbytes)
        for name, (shape, dtype, a) in arrays.items()
    }
    metadata["python"] = f"safetensors {safetensors.__version__}"
    safetensors.serialize_file(specs, dst, metadata=metadata)
    print(f"read {len(entries)} tensors from {src}, wrote {dst}")


if __name__ == "__main__":
    main()
