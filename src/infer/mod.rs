//! # Inference
//!
//! Shared machinery for the model stages ([`crate::text::classifier`], and later the image
//! classifier): takes model-ready requests from async callers and gives back per-request results.
//!
//! - [`runtime`]: loads the ONNX Runtime shared library once per process and builds sessions with
//!   explicit thread settings.
//! - [`batcher`]: the dynamic batcher — a cheap-to-clone handle in front of a preparation thread
//!   (tokenization, decoding) and a model thread that runs whatever has queued when the model is
//!   free, with a queue deadline and fail-fast admission.
//!
//! Errors are one [`InferError`] enum; it derives `Clone` because one model failure is fanned out
//! to every waiter of the batch.

pub mod batcher;
pub mod runtime;

pub use batcher::{Backend, Batcher, BatcherConfig, BatcherStats, Prepare};

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model, or waiting for it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InferError {
    /// The queue in front of the model is full; the request was not queued (fail fast).
    #[error("model queue is full ({capacity} requests waiting); try again later")]
    Overloaded {
        /// The configured queue capacity that was reached.
        capacity: usize,
    },
    /// The request waited in the queue past its deadline and was answered without running.
    #[error("request waited {waited_ms} ms in the model queue (limit {limit_ms} ms)")]
    Timeout {
        /// How long the request had waited when it was dropped.
        waited_ms: u64,
        /// The configured queue deadline.
        limit_ms: u64,
    },
    /// The batcher's threads are gone (shut down, or a bug); the request cannot be served.
    #[error("model worker is not running")]
    Closed,
    /// The input could not be turned into model input (tokenizer failure, bad image, ...).
    #[error("invalid model input: {0}")]
    Input(String),
    /// The model run failed (or panicked); every request of that batch gets this error.
    #[error("model run failed: {0}")]
    Backend(String),
    /// A file the model stage needs is missing or unreadable.
    #[error("{what} not found at `{path}` ({hint})")]
    MissingFile {
        /// What the file is, e.g. "ONNX Runtime library".
        what: &'static str,
        /// The path that was tried.
        path: PathBuf,
        /// What to do about it (setting to change, command to run).
        hint: String,
    },
    /// A model file exists but could not be loaded or does not have the expected shape.
    #[error("cannot load {what} from `{path}`: {reason}")]
    Load {
        /// What the file is, e.g. "MiniLM encoder".
        what: &'static str,
        /// The file that failed to load.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A configuration value is out of range; names the setting.
    #[error("invalid setting `{setting}`: {reason}")]
    Config {
        /// The setting's name as written in the config file.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}
