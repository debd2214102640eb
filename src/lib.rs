//! # moe-kernels
//!
//! Kernels for Mixture-of-Experts layers — router logits, fused gating (scoring + top-k,
//! groups, capacity, expert choice), permutation, grouped expert FFN and combine — with a CPU
//! reference in f64 that every backend is checked against. See `DESIGN.md` for the stage
//! contracts and `README.md` for what each backend supports today.
//!
//! ```no_run
//! use moe_kernels::{Backend, LayerConfig, MoeLayer, io};
//! # fn main() -> moe_kernels::Result<()> {
//! let dev = Backend::auto()?;
//! let config = LayerConfig::from_file("layer.json".as_ref())?;
//! let layer = MoeLayer::load(config, "layer.safetensors".as_ref())?;
//! let x = io::load_input("x.safetensors".as_ref())?;
//! let out = layer.forward(&dev, &x)?;
//! println!("y has {} elements", out.y.len());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod asynch;
pub mod backend;
#[cfg(feature = "cli")]
pub mod bench;
#[cfg(feature = "candle")]
pub mod candle;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod device;
pub mod ep;
pub mod error;
pub mod io;
pub mod layer;
pub mod limits;
pub mod quant;
pub mod shape;
pub mod stage;
#[cfg(any(test, feature = "synth"))]
pub mod synth;
pub mod tensor;

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(all(feature = "web", target_arch = "wasm32"))]
pub mod web;
#[cfg(feature = "wgpu")]
pub mod wgpu;

pub use backend::{Backend, BackendKind, GateBuffers, PermuteBuffers};
pub use config::{
    Activation, Capacity, Combine, LayerConfig, Preset, Priority, RoutingConfig, Scoring,
};
pub use error::{Error, Result};
pub use layer::{ForwardOutput, MoeLayer, PreparedLayer, RoutingOutput};
pub use limits::Resource;
pub use stage::Stage;
pub use tensor::{DType, Element, Tensor, TensorData};
