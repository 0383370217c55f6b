//! One module per subcommand.

pub mod analyze;
pub mod bench;
pub mod bench_diffusion;
pub mod bench_dsa;
pub mod bench_exits;
pub mod bench_llama_cpp;
pub mod bench_serve;
pub mod bench_speculative;
pub mod bench_token_exits;
pub mod classify;
pub mod diffuse;
pub mod diffusion;
pub mod eval;
pub mod exits;
pub mod generate;
pub mod models;
pub mod quantize;
pub mod serve;
pub mod speculative;
