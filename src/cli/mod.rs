//! The command-line front end of the `synthos-engine` binary: one module per subcommand
//! (`train`, `sample`, `bench`, `clip-train`/`clip-eval`, `synth`) and the model-weight
//! arguments they share. Everything it does goes through the library's public API.

pub mod bench;
pub mod clip;
pub mod model_args;
pub mod sample;
pub mod synth;
pub mod train;
