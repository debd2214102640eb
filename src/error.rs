//! The crate's one error type. Every public call returns `Result<_, Error>`; nothing panics on
//! user input.

use std::path::PathBuf;

use crate::device::BackendKind;
use crate::limits::Resource;
use crate::stage::Stage;

/// Everything that can go wrong, with the context a user needs to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stage's input or output has the wrong shape, length or value range.
    #[error("{stage}: {what}")]
    Shape {
        /// The stage whose operand is wrong.
        stage: Stage,
        /// Which operand, and what is wrong with it.
        what: String,
    },

    /// A command-line value is not one the crate knows (backend or dtype name).
    #[error("usage: {0}")]
    Usage(String),

    /// A blocking call would have to wait where nothing may block (wasm32: the browser's event
    /// loop must run for the device to answer). Names the call; use its `_async` version.
    #[error("{0} would block, and nothing may block on wasm32: call its async version")]
    WouldBlock(String),

    /// The layer or routing configuration is invalid (bad value, unsupported combination).
    #[error("config: {0}")]
    Config(String),

    /// A JSON config file could not be parsed (malformed JSON, unknown key, wrong type).
    #[error("config {path}: {msg}")]
    ConfigJson {
        /// The config file (or other origin) that failed to parse.
        path: String,
        /// The parser's message, naming the key where one is at fault.
        msg: String,
    },

    /// A layer-weights file is missing a tensor, has an extra one, or has inconsistent shapes.
    #[error("weights {path}: {what}")]
    Weights {
        /// The weights file.
        path: String,
        /// Which tensor, and what is wrong with it.
        what: String,
    },

    /// A checkpoint directory (config.json, shard index, shards, the layer asked for) cannot
    /// give the layer: names the file, and the tensor and layer where one is concerned.
    #[error("checkpoint {path}: {what}")]
    Checkpoint {
        /// The file in the checkpoint directory (or the directory itself).
        path: String,
        /// What is wrong, naming the tensor and layer.
        what: String,
    },

    /// A tensor file (weights, input) is not a readable safetensors file.
    #[error("safetensors {path}: {msg}")]
    Safetensors {
        /// The tensor file.
        path: String,
        /// The safetensors reader's message.
        msg: String,
    },

    /// The input tensor file is wrong (missing `x`, wrong rank, wrong width).
    #[error("input {path}: {what}")]
    Input {
        /// The input file.
        path: String,
        /// What is wrong with its `x`.
        what: String,
    },

    /// A tensor has a dtype this crate does not accept.
    #[error("{context}: unsupported dtype {dtype} (expected F32, F16 or BF16)")]
    Dtype {
        /// Which tensor, in which file.
        context: String,
        /// The dtype it has, as the file names it.
        dtype: String,
    },

    /// A tensor or buffer is in another dtype than the one it must have (e.g. `x` of a layer
    /// prepared for bf16 activations given in f32).
    #[error("{what}: expected {expected}, got {got}")]
    DtypeMismatch {
        /// The tensor or buffer.
        what: String,
        /// The dtype it must have.
        expected: crate::tensor::DType,
        /// The dtype it has.
        got: crate::tensor::DType,
    },

    /// A device call failed while the backend was usable: a rejected submission, a failed
    /// launch, copy or read-back, a driver error mid-forward.
    #[error("{backend}: {what}")]
    Device {
        /// The backend whose call failed.
        backend: BackendKind,
        /// The call, and the driver's or wgpu's message.
        what: String,
    },

    /// The requested backend cannot be used on this machine or is not built yet.
    #[error("backend {backend} is not available: {reason}")]
    BackendUnavailable {
        /// The backend asked for.
        backend: BackendKind,
        /// Why it cannot be used (feature not built, no driver, no adapter, ...).
        reason: String,
    },

    /// A shape needs more than the device (or host) offers: memory, one buffer or binding, a
    /// kernel's index range, a grid. Returned before anything is allocated or launched.
    #[error(
        "{backend}: {what}: needs {}, more than the {resource} ({})",
        quantity(*need, resource.unit()),
        quantity(*limit, resource.unit())
    )]
    Limit {
        /// The backend (or [`BackendKind::Cpu`] for host memory) whose limit is exceeded.
        backend: BackendKind,
        /// Which limit; its [`Resource::unit`] is the unit of `need` and `limit`.
        resource: Resource,
        /// The buffer, kernel or allocation that needs it.
        what: String,
        /// How much the shape needs.
        need: u64,
        /// How much the device or host offers.
        limit: u64,
    },

    /// Expert parallelism: the ranks disagree (shapes, layer, expert split), a collective was
    /// given inconsistent counts, or a peer rank failed and aborted the world.
    #[error("expert parallelism, rank {rank}: {what}")]
    Ep {
        /// The rank that reports it.
        rank: usize,
        /// What went wrong, naming the peer where one is concerned.
        what: String,
    },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A shape error in `stage`.
    pub(crate) fn shape(stage: Stage, what: impl Into<String>) -> Self {
        Error::Shape {
            stage,
            what: what.into(),
        }
    }

    /// A config error.
    pub(crate) fn config(what: impl Into<String>) -> Self {
        Error::Config(what.into())
    }
}

/// `n unit`, with a binary-prefixed size after byte counts of a KiB or more.
fn quantity(n: u64, unit: &str) -> String {
    if unit != "bytes" || n < 1024 {
        return format!("{n} {unit}");
    }
    let units = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64 / 1024.0;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{n} bytes ({v:.1} {})", units[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_errors_name_resource_and_both_sizes() {
        let e = Error::Limit {
            backend: BackendKind::Wgpu,
            resource: Resource::BufferSize,
            what: "buffer y_perm".into(),
            need: 3 << 30,
            limit: 1 << 30,
        };
        assert_eq!(
            e.to_string(),
            "wgpu: buffer y_perm: needs 3221225472 bytes (3.0 GiB), more than the device's \
             largest buffer (1073741824 bytes (1.0 GiB))"
        );
        let e = Error::Limit {
            backend: BackendKind::Cuda,
            resource: Resource::IndexRange,
            what: "x_perm".into(),
            need: 5_000_000_000,
            limit: i32::MAX as u64,
        };
        assert!(e.to_string().contains("5000000000 elements"), "{e}");
    }
}
