//! Devices and element types.

use std::fmt;

/// Where a tensor lives. `Cpu` is the f32 reference path; `Cuda(ordinal)` runs our
/// kernels in bf16 (with fp32 where it matters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// The plain-Rust f32 reference implementation.
    Cpu,
    /// An NVIDIA GPU, by ordinal.
    Cuda(usize),
}

impl Device {
    /// The first GPU when one is usable, else the CPU.
    pub fn best_available() -> Device {
        if crate::cuda::is_usable(0) {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }
    }

    /// Parses `cpu`, `cuda`, `cuda:N` or `auto`.
    pub fn parse(s: &str) -> crate::Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            "auto" => Ok(Device::best_available()),
            _ => {
                if let Some(n) = s.strip_prefix("cuda:") {
                    n.parse()
                        .map(Device::Cuda)
                        .map_err(|_| crate::Error::msg(format!("bad device {s:?}: expected cpu, cuda, cuda:N or auto")))
                } else {
                    crate::bail!("bad device {s:?}: expected cpu, cuda, cuda:N or auto")
                }
            }
        }
    }

    /// The default element type of activations and weights on this device
    /// (f32 on the CPU, bf16 on a GPU).
    pub fn default_dtype(self) -> DType {
        match self {
            Device::Cpu => DType::F32,
            Device::Cuda(_) => DType::BF16,
        }
    }

    /// True for `Cuda(_)`.
    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// Waits for all work issued on this device (nothing to wait for on the CPU).
    pub fn synchronize(self) -> crate::Result<()> {
        crate::tensor::check_host_transfer("waiting for the device")?;
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => crate::cuda::device(i)?.synchronize(),
        }
    }

    /// Memory in use: the GPU's (total − free), or the process's resident memory.
    pub fn memory_in_use(self) -> Option<u64> {
        match self {
            Device::Cuda(i) => crate::cuda::device(i).ok()?.mem_info().ok().map(|(free, total)| (total - free) as u64),
            Device::Cpu => {
                let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
                let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
                Some(pages * 4096)
            }
        }
    }

    /// The most memory allocated at once since [`Device::reset_peak_memory`] (the GPU's
    /// memory pool; `None` on the CPU).
    pub fn peak_memory(self) -> crate::Result<Option<u64>> {
        match self {
            Device::Cpu => Ok(None),
            Device::Cuda(i) => crate::cuda::device(i)?.peak_memory().map(Some),
        }
    }

    /// Restarts [`Device::peak_memory`] from the memory in use now.
    pub fn reset_peak_memory(self) -> crate::Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => crate::cuda::device(i)?.reset_peak_memory(),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Element type of a tensor. CPU tensors are always `F32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DType::F32 => write!(f, "f32"),
            DType::BF16 => write!(f, "bf16"),
        }
    }
}
