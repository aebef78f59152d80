//! # ONNX Runtime loading
//!
//! Takes the path of `libonnxruntime.so` (the `ort` crate is built with `load-dynamic`, nothing is
//! downloaded) and gives back the process-wide [`Environment`] plus [`Session`]s built with
//! explicit thread settings. Called by the model stages when they load
//! ([`crate::text::classifier::TextClassifier::load`]).
//!
//! The runtime is initialised at most once per process: the first successful [`environment`] call
//! loads the library; later calls return the same environment (a different path is ignored with a
//! warning, since a process cannot hold two ONNX Runtimes). A failed call (missing file) leaves
//! nothing behind, so a corrected path can be tried again.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

use super::InferError;

/// Where `make models` puts the runtime, relative to the models directory.
pub const ORT_DYLIB_IN_MODELS_DIR: &str = "onnxruntime/libonnxruntime.so.1.31.1";

/// The ONNX Runtime library a model config loads: its `ort_dylib_path` if set, else the one
/// `make models` put under its `models_dir`.
pub fn ort_dylib(models_dir: &Path, configured: Option<&Path>) -> PathBuf {
    configured.map_or_else(
        || models_dir.join(ORT_DYLIB_IN_MODELS_DIR),
        Path::to_path_buf,
    )
}

/// The process-wide environment and the library path it was loaded from.
static ENVIRONMENT: Mutex<Option<(Environment, PathBuf)>> = Mutex::new(None);

/// Thread settings for one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionThreads {
    /// Threads one operator may use (ONNX Runtime's intra-op pool, the calling thread included).
    pub intra: usize,
    /// Threads running independent graph branches at once; 1 = sequential execution.
    pub inter: usize,
}

/// Loads ONNX Runtime from `dylib_path` (once per process) and returns the shared environment.
///
/// Errors name the missing file and the setting to change.
pub fn environment(dylib_path: &Path) -> Result<Environment, InferError> {
    let mut slot = ENVIRONMENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((env, loaded_from)) = slot.as_ref() {
        if loaded_from != dylib_path {
            tracing::warn!(
                loaded = %loaded_from.display(),
                requested = %dylib_path.display(),
                "ONNX Runtime is already loaded in this process; ignoring the second path"
            );
        }
        return Ok(env.clone());
    }
    if !dylib_path.is_file() {
        return Err(InferError::MissingFile {
            what: "ONNX Runtime library",
            path: dylib_path.to_path_buf(),
            hint: "run `make models`, or set `ort_dylib_path` in the model config".into(),
        });
    }
    // `ort` resolves relative paths against the executable's directory first; make it absolute so
    // the file we checked is the file it loads.
    let absolute = std::path::absolute(dylib_path).map_err(|e| InferError::Load {
        what: "ONNX Runtime library",
        path: dylib_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let load_error = |reason: String| InferError::Load {
        what: "ONNX Runtime library",
        path: dylib_path.to_path_buf(),
        reason,
    };
    let env = ort::init_from(&absolute)
        .map_err(|e| load_error(e.to_string()))?
        .with_name("chatguard")
        .with_telemetry(false)
        .build()
        .map_err(|e| load_error(e.to_string()))?;
    tracing::info!(path = %absolute.display(), "loaded ONNX Runtime");
    *slot = Some((env.clone(), dylib_path.to_path_buf()));
    Ok(env)
}

/// Builds a CPU session for the model at `model_path` with the given threads, graph optimisation
/// level 3 and no spin-waiting between operators, and checks that it has the named `inputs` and
/// `outputs` ([`check_io`]). `what` names the model in errors.
pub fn session(
    env: &Environment,
    what: &'static str,
    model_path: &Path,
    threads: SessionThreads,
    inputs: &[&str],
    outputs: &[&str],
) -> Result<Session, InferError> {
    if !model_path.is_file() {
        return Err(InferError::MissingFile {
            what,
            path: model_path.to_path_buf(),
            hint: "run `make models`, or set `models_dir` in the model config".into(),
        });
    }
    let load_error = |reason: String| InferError::Load {
        what,
        path: model_path.to_path_buf(),
        reason,
    };
    let session = Session::builder(env)
        .map_err(|e| load_error(e.to_string()))?
        .with_intra_threads(threads.intra)
        .map_err(|e| load_error(e.to_string()))?
        .with_inter_threads(threads.inter)
        .map_err(|e| load_error(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| load_error(e.to_string()))?
        // Idle intra-op workers would otherwise spin-wait for the next operator, burning the
        // core the async runtime and the other model need (measured: 3x slower under load).
        .with_intra_op_spinning(false)
        .map_err(|e| load_error(e.to_string()))?
        .commit_from_file(model_path)
        .map_err(|e| load_error(e.to_string()))?;
    check_io(&session, what, model_path, inputs, outputs)?;
    Ok(session)
}

/// Checks that `session` has the named inputs and outputs, so a wrong model file fails at load
/// time with a clear message instead of at the first request.
fn check_io(
    session: &Session,
    what: &'static str,
    model_path: &Path,
    inputs: &[&str],
    outputs: &[&str],
) -> Result<(), InferError> {
    let has_input = |name: &str| session.inputs().iter().any(|i| i.name() == name);
    let has_output = |name: &str| session.outputs().iter().any(|o| o.name() == name);
    let missing: Vec<&str> = inputs
        .iter()
        .copied()
        .filter(|n| !has_input(n))
        .chain(outputs.iter().copied().filter(|n| !has_output(n)))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(InferError::Load {
            what,
            path: model_path.to_path_buf(),
            reason: format!("model lacks input/output tensors {missing:?}"),
        })
    }
}

/// Maps an ONNX Runtime error into a backend error prefixed with `what`.
pub(crate) fn backend_error(what: &str) -> impl Fn(ort::Error) -> InferError + '_ {
    move |e| InferError::Backend(format!("{what}: {e}"))
}

/// Output `name` of a run as `rows × width` f32 values (row-major), or a backend error naming
/// the output and its actual shape.
pub(crate) fn extract_f32<'a>(
    outputs: &'a ort::session::SessionOutputs<'_>,
    name: &str,
    rows: usize,
    width: usize,
) -> Result<&'a [f32], InferError> {
    let value = outputs
        .get(name)
        .ok_or_else(|| InferError::Backend(format!("model output `{name}` missing")))?;
    let (shape, data) = value
        .try_extract_tensor::<f32>()
        .map_err(backend_error(name))?;
    if data.len() != rows * width {
        return Err(InferError::Backend(format!(
            "model output `{name}` has shape {shape:?}, expected [{rows}, {width}]"
        )));
    }
    Ok(data)
}
