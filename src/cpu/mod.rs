//! The f32 CPU reference implementations: plain Rust on slices, written for clarity.
//! Every CUDA kernel is tested against these, and these are tested against finite
//! differences and the PyTorch references.

pub mod adamw;
pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod reduce;
pub mod rope;
pub mod shape;
pub mod softmax;
