//! The f32 CPU implementations: Rust on slices, spread over the rayon pool where the
//! work is large enough (`par`), with results that do not depend on the number of
//! threads. Every CUDA kernel is tested against these, and these are tested against
//! finite differences and the PyTorch references.

pub mod adamw;
pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod loss;
pub mod math;
pub mod matmul;
pub mod norm;
pub mod par;
pub mod reduce;
pub mod rope;
pub mod sgemm;
pub mod shape;
pub mod softmax;
