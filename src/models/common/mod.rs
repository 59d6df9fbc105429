//! What every architecture shares: trainable linear layers with LoRA, weights and their
//! registry, differentiable ops and the fused CPU kernels (attention, softmax, norms, SwiGLU,
//! cross-entropy) with their fast math, RoPE, attention masks, and the block-quantized kernels.
//! An architecture (`super::llama`, `super::bert`) builds on these and adds only its own folder.

pub mod attention;
pub mod builder;
pub mod fastmath;
pub mod fused;
pub mod linear;
pub mod mask;
pub mod ops;
pub mod params;
pub mod q4_1;
pub mod quantized;
pub mod rope;
