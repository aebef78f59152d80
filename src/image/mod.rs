//! # Image moderation
//!
//! Takes the images of one `moderate` request (inline base64 `data`, or the bytes of a binary
//! frame) and gives back, per image, an [`ImageReport`] — decode error, perceptual hash,
//! hash-list match, model scores — that [`ImageReport::verdict`] turns into the wire's
//! `images[]` entry under a tenant [`Policy`]. Called by [`crate::moderator::Moderator`] for
//! each request and by `chatguard check --image`.
//!
//! Per image ([`ImageStage::analyze`]):
//! ```text
//! bytes ─▶ exact content hash ─▶ verdict cache ──hit──▶ report
//!            (blocking pool, ≤ image.decode_threads at once)
//!        └▶ decode (limits) ─▶ pHash ─▶ block/allow list ──match──▶ report (no model)
//!                                     └▶ image model (batcher) ─▶ report, cached
//! ```
//! - [`decode`]: safe decoding to the model's and the hash's small pictures.
//! - [`hashlist`]: the 64-bit DCT perceptual hash and the block/allow lists.
//! - [`classifier`]: the ONNX image safety classifier behind the shared batcher.
//! - [`pending`]: binary image frames parked per connection until their request names them.
//!
//! A missing or broken model never fails a request: images are still decoded and matched
//! against the lists, and the verdict says `degraded: ["image_model"]`.

pub mod classifier;
pub mod decode;
pub mod hashlist;
pub mod pending;

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Bytes;

use crate::infer::InferError;
use crate::policy::Policy;
use crate::server::protocol::{Action, ImageVerdict, LabelScore, Source};
use classifier::{ImageClassifier, ImageScores};
use decode::DecodeLimits;
use hashlist::{HashListError, HashLists, ListMatch, PHash};

/// `[image]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    /// Run the image model (decoding limits and the hash lists apply regardless).
    pub model_enabled: bool,
    /// Directory `make models` filled: `image/`, `onnxruntime/`.
    pub models_dir: PathBuf,
    /// The model file; default `<models_dir>/image/image-safety-classifier-s.onnx`.
    pub model_path: Option<PathBuf>,
    /// The ONNX Runtime library; default `<models_dir>/onnxruntime/libonnxruntime.so.1.31.1`
    /// (one runtime per process: whichever model loads first decides).
    pub ort_dylib_path: Option<PathBuf>,
    /// ONNX Runtime intra-op threads of each image session.
    pub intra_threads: usize,
    /// Model threads, each with its own session (each adds ~25 MB of weights and arenas).
    pub workers: usize,
    /// Most frames in one model run.
    pub max_batch_size: usize,
    /// Frames waiting for the model beyond which images are not classified (degraded).
    pub queue_capacity: usize,
    /// How long a frame may wait for the model, and an image for a decoder thread.
    pub queue_timeout_ms: u64,
    /// Images decoded at once (each on a blocking thread); bounds decode memory.
    pub decode_threads: usize,
    /// Largest encoded image, in bytes.
    pub max_encoded_bytes: usize,
    /// Most pixels (width × height) an image may declare; more is refused before decoding.
    pub max_pixels: u64,
    /// Largest width or height an image may declare, in pixels.
    pub max_side_px: u32,
    /// Wall-clock budget of one decode, in milliseconds.
    pub decode_timeout_ms: u64,
    /// Most frames of an animated GIF/WebP decoded.
    pub max_decoded_frames: usize,
    /// Most pixels decoded over all frames of one animation.
    pub max_animation_pixels: u64,
    /// Frames of an animation classified besides the first, spread over it.
    pub sampled_frames: usize,
    /// Perceptual hashes of known-bad images (see [`hashlist`] for the format).
    pub blocklist_path: Option<PathBuf>,
    /// Perceptual hashes of known-good images: allowed without the model.
    pub allowlist_path: Option<PathBuf>,
    /// Largest Hamming distance (of 64 bits) at which two hashes are the same image.
    pub hash_max_distance: u32,
    /// Verdict cache entries, keyed by exact content; 0 turns the cache off.
    pub cache_entries: usize,
    /// How long a binary image frame waits for its request and a request for its frames, in ms.
    pub binary_wait_ms: u64,
    /// Most binary image frames parked per connection.
    pub max_pending_images: usize,
    /// Most bytes of binary image frames parked per connection.
    pub max_pending_bytes: usize,
}

impl Default for ImageConfig {
    fn default() -> Self {
        let limits = DecodeLimits::default();
        ImageConfig {
            model_enabled: true,
            models_dir: PathBuf::from("models"),
            model_path: None,
            ort_dylib_path: None,
            intra_threads: 1,
            workers: 2,
            max_batch_size: 4,
            queue_capacity: 256,
            queue_timeout_ms: 2_000,
            decode_threads: 2,
            max_encoded_bytes: limits.max_encoded_bytes,
            max_pixels: limits.max_pixels,
            max_side_px: limits.max_side_px,
            decode_timeout_ms: limits.timeout.as_millis() as u64,
            max_decoded_frames: limits.max_decoded_frames,
            max_animation_pixels: limits.max_animation_pixels,
            sampled_frames: limits.sampled_frames,
            blocklist_path: None,
            allowlist_path: None,
            hash_max_distance: 8,
            cache_entries: 10_000,
            binary_wait_ms: 5_000,
            max_pending_images: 32,
            max_pending_bytes: 32 << 20,
        }
    }
}

impl ImageConfig {
    /// The model file this config loads.
    pub fn model_file(&self) -> PathBuf {
        self.model_path
            .clone()
            .unwrap_or_else(|| self.models_dir.join("image/image-safety-classifier-s.onnx"))
    }

    /// The ONNX Runtime library this config loads.
    pub fn ort_dylib(&self) -> PathBuf {
        crate::infer::runtime::ort_dylib(&self.models_dir, self.ort_dylib_path.as_deref())
    }

    /// The decoder limits.
    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_encoded_bytes: self.max_encoded_bytes,
            max_pixels: self.max_pixels,
            max_side_px: self.max_side_px,
            max_animation_pixels: self.max_animation_pixels,
            max_decoded_frames: self.max_decoded_frames,
            sampled_frames: self.sampled_frames,
            timeout: Duration::from_millis(self.decode_timeout_ms),
        }
    }

    /// The per-connection bounds of binary image frames.
    pub fn pending_limits(&self) -> pending::PendingLimits {
        pending::PendingLimits {
            max_images: self.max_pending_images,
            max_bytes: self.max_pending_bytes,
            wait: Duration::from_millis(self.binary_wait_ms),
        }
    }

    /// Checks the settings and that the hash lists parse; the error names the setting
    /// (without the `image.` prefix).
    pub fn validate(&self) -> Result<(), String> {
        let positive: [(&str, u64); 13] = [
            ("intra_threads", self.intra_threads as u64),
            ("workers", self.workers as u64),
            ("max_batch_size", self.max_batch_size as u64),
            ("queue_capacity", self.queue_capacity as u64),
            ("queue_timeout_ms", self.queue_timeout_ms),
            ("decode_threads", self.decode_threads as u64),
            ("max_encoded_bytes", self.max_encoded_bytes as u64),
            ("max_pixels", self.max_pixels),
            ("max_side_px", u64::from(self.max_side_px)),
            ("decode_timeout_ms", self.decode_timeout_ms),
            ("max_decoded_frames", self.max_decoded_frames as u64),
            ("binary_wait_ms", self.binary_wait_ms),
            ("max_pending_images", self.max_pending_images as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.workers > crate::text::classifier::MAX_WORKERS {
            return Err(format!(
                "workers must be at most {}",
                crate::text::classifier::MAX_WORKERS
            ));
        }
        if self.decode_threads > Semaphore::MAX_PERMITS {
            return Err("decode_threads is too large".into());
        }
        if self.max_animation_pixels < self.max_pixels {
            return Err(format!(
                "max_animation_pixels ({}) must be at least max_pixels ({})",
                self.max_animation_pixels, self.max_pixels
            ));
        }
        if self.sampled_frames > 64 {
            return Err("sampled_frames must be at most 64".into());
        }
        if self.hash_max_distance > 32 {
            return Err(
                "hash_max_distance must be at most 32 (of 64 bits; unrelated images differ by ~32)"
                    .into(),
            );
        }
        for (name, path) in [
            ("blocklist_path", &self.blocklist_path),
            ("allowlist_path", &self.allowlist_path),
        ] {
            if let Some(p) = path {
                hashlist::HashList::load(p).map_err(|e| {
                    format!("{name}: {e} (create the file, e.g. with `chatguard hashlist add`)")
                })?;
            }
        }
        Ok(())
    }
}

/// Whether the image model can run.
#[derive(Clone)]
pub enum ImageModel {
    /// Turned off (`image.model_enabled = false` or `--lexicon-only`).
    Disabled,
    /// Loaded and serving.
    Ready(ImageClassifier),
    /// Enabled but could not load; verdicts with images carry `degraded: ["image_model"]`.
    Unavailable(String),
}

impl ImageModel {
    /// Loads the model on the blocking pool. Never fails: a load error becomes
    /// [`ImageModel::Unavailable`] and is logged.
    pub async fn load(cfg: &ImageConfig) -> ImageModel {
        if !cfg.model_enabled {
            return ImageModel::Disabled;
        }
        let cfg = cfg.clone();
        match tokio::task::spawn_blocking(move || ImageClassifier::load(&cfg)).await {
            Ok(Ok(c)) => {
                tracing::info!("image model loaded");
                ImageModel::Ready(c)
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "image model unavailable: images get hash-list-only \
                    verdicts marked degraded (run `make models`, or set image.model_enabled = false)");
                ImageModel::Unavailable(e.to_string())
            }
            Err(e) => ImageModel::Unavailable(format!("loader panicked: {e}")),
        }
    }
}

/// Where one image's bytes are.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// Raw bytes (a binary frame, a file).
    Bytes(Bytes),
    /// Base64 text from a request's `data` (a `data:image/...;base64,` prefix is allowed).
    Base64(String),
    /// No bytes; the message says why (e.g. a binary frame that never came).
    Missing(String),
}

/// What the stage found out about one image.
#[derive(Debug, Clone, Default)]
pub struct ImageReport {
    /// Why the image could not be judged (bad input); the other fields are then empty.
    pub error: Option<String>,
    /// The perceptual hash of the first frame (none for flat images).
    pub phash: Option<PHash>,
    /// The block/allow list's say, if any.
    pub list: Option<ListMatch>,
    /// The model's scores, if it ran.
    pub scores: Option<ImageScores>,
    /// The model should have run but could not (unavailable, overloaded, failed).
    pub model_degraded: bool,
    /// The result came from the verdict cache.
    pub cached: bool,
}

impl ImageReport {
    fn error(message: impl Into<String>) -> ImageReport {
        ImageReport {
            error: Some(message.into()),
            ..Default::default()
        }
    }

    /// The wire entry for this image under `policy`: `porn`/`gore` model scores and a hash-list
    /// label; the action is the most severe label's, or `policy.image_error_action` on error.
    pub fn verdict(&self, id: String, policy: &Policy) -> ImageVerdict {
        let mut labels = Vec::new();
        if let Some(ListMatch::Blocked { entry, .. }) = &self.list {
            labels.push(LabelScore {
                label: entry.label,
                sub: entry.sub.clone(),
                score: 1.0,
                source: Source::Hashlist,
            });
        }
        if let Some(s) = &self.scores {
            let mut model = [("porn", s.porn), ("gore", s.gore)];
            model.sort_by(|a, b| b.1.total_cmp(&a.1));
            labels.extend(model.into_iter().map(|(label, score)| LabelScore {
                label,
                sub: None,
                score,
                source: Source::Model,
            }));
        }
        let action = if self.error.is_some() {
            policy.image_error_action
        } else {
            labels
                .iter()
                .map(|l| policy.label_action(l.label, l.score))
                .max()
                .unwrap_or(Action::Allow)
        };
        ImageVerdict {
            id,
            action,
            labels,
            error: self.error.clone(),
            phash: self.phash.map(|h| h.to_string()),
        }
    }
}

/// What the verdict cache keeps per content hash.
#[derive(Debug, Clone)]
enum CacheEntry {
    /// The bytes do not decode (deterministically).
    Failed(String),
    /// Decoded: the hash, and the model's scores once it ran.
    Decoded {
        /// The perceptual hash.
        phash: Option<PHash>,
        /// The model's scores, if it ran on these bytes.
        scores: Option<ImageScores>,
    },
}

/// A bounded map from exact content (keyed SipHash of the bytes) to what is known about it.
/// Oldest entries are evicted first.
struct VerdictCache {
    /// Most entries; 0 disables the cache.
    capacity: usize,
    /// Keyed hasher (random per process, so contents cannot be chosen to collide).
    hasher: std::hash::RandomState,
    /// Entries and their insertion order.
    state: Mutex<(HashMap<u64, CacheEntry>, VecDeque<u64>)>,
}

impl VerdictCache {
    fn new(capacity: usize) -> VerdictCache {
        VerdictCache {
            capacity,
            hasher: std::hash::RandomState::new(),
            state: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    fn key(&self, bytes: &[u8]) -> u64 {
        self.hasher.hash_one(bytes)
    }

    fn get(&self, key: u64) -> Option<CacheEntry> {
        if self.capacity == 0 {
            return None;
        }
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0.get(&key).cloned()
    }

    fn insert(&self, key: u64, entry: CacheEntry) {
        if self.capacity == 0 {
            return;
        }
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (map, order) = &mut *guard;
        if map.insert(key, entry).is_none() {
            order.push_back(key);
            while map.len() > self.capacity {
                match order.pop_front() {
                    Some(old) => {
                        map.remove(&old);
                    }
                    None => break,
                }
            }
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
struct Counters {
    /// Images analysed.
    images: AtomicU64,
    /// Answered from the verdict cache.
    cache_hits: AtomicU64,
    /// Input errors (bad base64, undecodable, over limits, missing frame).
    errors: AtomicU64,
    /// Blocklist matches.
    blocklisted: AtomicU64,
    /// Allowlist matches.
    allowlisted: AtomicU64,
    /// Time spent decoding (blocking pool), in microseconds.
    decode_us: AtomicU64,
}

/// The outcome of the blocking part of [`ImageStage::analyze`].
enum Prepared {
    /// Nothing left to do.
    Done(ImageReport),
    /// The model must score these frames.
    NeedsModel {
        /// Cache key of the bytes.
        key: u64,
        /// The perceptual hash.
        phash: Option<PHash>,
        /// 224×224 RGB frames.
        frames: Vec<Vec<u8>>,
    },
}

/// Cheap-to-clone handle to the image stage.
#[derive(Clone)]
pub struct ImageStage {
    /// Shared state; read-only after construction except for the cache and counters.
    inner: Arc<StageInner>,
}

struct StageInner {
    /// Decoder limits.
    limits: DecodeLimits,
    /// The model, if any.
    model: ImageModel,
    /// Block/allow lists; replaced whole on a config reload ([`ImageStage::set_lists`]), so an
    /// image in progress keeps the lists it started with.
    lists: RwLock<Arc<HashLists>>,
    /// Exact-content cache.
    cache: VerdictCache,
    /// One permit per concurrent decode.
    decode_permits: Arc<Semaphore>,
    /// How long an image waits for a decode permit.
    decode_wait: Duration,
    /// Counters.
    counters: Counters,
}

impl ImageStage {
    /// Builds the stage with `model`; fails if a configured hash list cannot be read.
    pub fn new(cfg: &ImageConfig, model: ImageModel) -> Result<ImageStage, HashListError> {
        let lists = HashLists::open(
            cfg.blocklist_path.as_deref(),
            cfg.allowlist_path.as_deref(),
            cfg.hash_max_distance,
        )?;
        Ok(ImageStage::with_lists(cfg, model, lists))
    }

    fn with_lists(cfg: &ImageConfig, model: ImageModel, lists: HashLists) -> ImageStage {
        ImageStage {
            inner: Arc::new(StageInner {
                limits: cfg.decode_limits(),
                model,
                lists: RwLock::new(Arc::new(lists)),
                cache: VerdictCache::new(cfg.cache_entries),
                decode_permits: Arc::new(Semaphore::new(cfg.decode_threads.max(1))),
                decode_wait: Duration::from_millis(cfg.queue_timeout_ms),
                counters: Counters::default(),
            }),
        }
    }

    /// Builds the stage, loading the model (unless disabled) on the blocking pool. Never fails:
    /// a model that cannot load is [`ImageModel::Unavailable`]; hash lists that cannot be read
    /// (they were checked by [`ImageConfig::validate`]) are logged and left empty.
    pub async fn load(cfg: &ImageConfig) -> ImageStage {
        let model = ImageModel::load(cfg).await;
        ImageStage::with_model(cfg, model)
    }

    /// Builds the stage with `model`, logging and emptying hash lists that cannot be read.
    pub fn with_model(cfg: &ImageConfig, model: ImageModel) -> ImageStage {
        let lists = HashLists::open(
            cfg.blocklist_path.as_deref(),
            cfg.allowlist_path.as_deref(),
            cfg.hash_max_distance,
        )
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "image hash lists unavailable; matching nothing");
            HashLists::empty()
        });
        ImageStage::with_lists(cfg, model, lists)
    }

    /// The model's state.
    pub fn model(&self) -> &ImageModel {
        &self.inner.model
    }

    /// `None` when the model is disabled; otherwise `Ok` or why it is unavailable (`/readyz`).
    pub fn status(&self) -> Option<Result<(), String>> {
        match &self.inner.model {
            ImageModel::Disabled => None,
            ImageModel::Ready(_) => Some(Ok(())),
            ImageModel::Unavailable(e) => Some(Err(e.clone())),
        }
    }

    /// Replaces the block/allow lists (a config reload built them off the runtime).
    pub fn set_lists(&self, lists: HashLists) {
        *self
            .inner
            .lists
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(lists);
    }

    /// Analyses one image. Never fails: problems are in the report.
    pub async fn analyze(&self, input: ImageInput) -> ImageReport {
        self.analyze_with(input, true).await
    }

    /// [`ImageStage::analyze`], with the model skipped when `use_model` is false (a policy
    /// whose `stages.image_model` is off): the image is still decoded and checked against the
    /// hash lists, and is never reported as model-degraded.
    pub async fn analyze_with(&self, input: ImageInput, use_model: bool) -> ImageReport {
        let inner = &self.inner;
        inner.counters.images.fetch_add(1, Relaxed);
        if let ImageInput::Missing(why) = input {
            inner.counters.errors.fetch_add(1, Relaxed);
            return ImageReport::error(why);
        }
        let permit = match tokio::time::timeout(
            inner.decode_wait,
            inner.decode_permits.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => permit,
            _ => {
                inner.counters.errors.fetch_add(1, Relaxed);
                return ImageReport::error(format!(
                    "image decoders busy: waited {} ms (image.decode_threads, image.queue_timeout_ms)",
                    inner.decode_wait.as_millis()
                ));
            }
        };
        let stage = self.inner.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            let prepared = stage.prepare(input, use_model);
            drop(permit);
            prepared
        })
        .await;
        let (key, phash, frames) = match prepared {
            Ok(Prepared::Done(report)) => return report,
            Ok(Prepared::NeedsModel { key, phash, frames }) => (key, phash, frames),
            Err(e) => {
                inner.counters.errors.fetch_add(1, Relaxed);
                return ImageReport::error(format!("image decoding failed: {e}"));
            }
        };
        let ImageModel::Ready(classifier) = &inner.model else {
            // `prepare` only asks for the model when it is ready.
            return ImageReport {
                phash,
                model_degraded: true,
                ..Default::default()
            };
        };
        match classifier.classify(frames).await {
            Ok(scores) => {
                inner.cache.insert(
                    key,
                    CacheEntry::Decoded {
                        phash,
                        scores: Some(scores),
                    },
                );
                ImageReport {
                    phash,
                    scores: Some(scores),
                    ..Default::default()
                }
            }
            Err(e) => {
                log_model_error(&e);
                ImageReport {
                    phash,
                    model_degraded: true,
                    ..Default::default()
                }
            }
        }
    }

    /// Prometheus lines for the stage's counters and the model batcher's.
    pub fn render_metrics(&self, out: &mut String) {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Relaxed);
        let mut counters = vec![
            ("images_total", "Images analysed.", get(&c.images)),
            (
                "cache_hits_total",
                "Images answered from the verdict cache.",
                get(&c.cache_hits),
            ),
            (
                "errors_total",
                "Images that could not be judged (bad input).",
                get(&c.errors),
            ),
            (
                "blocklisted_total",
                "Images matching the hash blocklist.",
                get(&c.blocklisted),
            ),
            (
                "allowlisted_total",
                "Images matching the hash allowlist.",
                get(&c.allowlisted),
            ),
            (
                "decode_seconds_total",
                "Time spent decoding images.",
                get(&c.decode_us) / 1_000_000,
            ),
        ];
        if let ImageModel::Ready(classifier) = &self.inner.model {
            let s = classifier.stats();
            counters.extend([
                ("model_batches_total", "Image model runs.", s.batches),
                (
                    "model_frames_total",
                    "Frames through the image model.",
                    s.batched_items,
                ),
                (
                    "model_timeouts_total",
                    "Frames that waited past the queue deadline.",
                    s.timeouts,
                ),
                (
                    "model_overloads_total",
                    "Frames refused because the queue was full.",
                    s.overloads,
                ),
                (
                    "model_busy_seconds_total",
                    "Time the image model thread spent running.",
                    s.busy_us / 1_000_000,
                ),
            ]);
        }
        for (name, help, v) in counters {
            crate::metrics::write_counter(out, &format!("chatguard_image_{name}"), help, v);
        }
    }
}

fn log_model_error(e: &InferError) {
    tracing::warn!(error = %e, "image model failed for one image; verdict degraded");
}

/// The perceptual hash of an encoded image (decoded within `limits`), for `chatguard hashlist
/// add` and tools. Errors say why: undecodable, or too flat to hash.
pub fn phash_of(bytes: &[u8], limits: &DecodeLimits) -> Result<PHash, String> {
    let decoded = decode::decode(bytes, limits).map_err(|e| e.to_string())?;
    hashlist::phash(&decoded.hash_gray)
        .ok_or_else(|| "image is too flat (almost one colour) for a perceptual hash".to_string())
}

/// Decodes base64, refusing text that would decode to more than `max_bytes` before decoding it.
fn decode_base64(text: &str, max_bytes: usize) -> Result<Vec<u8>, String> {
    let text = match text.strip_prefix("data:") {
        Some(rest) => match rest.split_once(',') {
            Some((meta, payload)) if meta.ends_with(";base64") => payload,
            _ => return Err("`data` URL is not base64 (`data:<type>;base64,<data>`)".into()),
        },
        None => text,
    };
    let estimate = text.len() / 4 * 3;
    if estimate > max_bytes + 3 {
        return Err(format!(
            "image is about {estimate} bytes; the limit is {max_bytes} (image.max_encoded_bytes)"
        ));
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine
        .decode(text)
        .map_err(|e| format!("`data` is not valid base64: {e}"))
}

impl StageInner {
    /// The blocking part: bytes → cache → decode → hash → lists. Runs on the blocking pool.
    fn prepare(&self, input: ImageInput, use_model: bool) -> Prepared {
        let c = &self.counters;
        let fail = |message: String| {
            c.errors.fetch_add(1, Relaxed);
            Prepared::Done(ImageReport::error(message))
        };
        let owned;
        let bytes: &[u8] = match &input {
            ImageInput::Bytes(b) => b,
            ImageInput::Base64(text) => match decode_base64(text, self.limits.max_encoded_bytes) {
                Ok(b) => {
                    owned = b;
                    &owned
                }
                Err(e) => return fail(e),
            },
            ImageInput::Missing(why) => return fail(why.clone()),
        };
        let key = self.cache.key(bytes);
        let needs_model = use_model && matches!(self.model, ImageModel::Ready(_));
        let degraded = use_model && matches!(self.model, ImageModel::Unavailable(_));
        if let Some(entry) = self.cache.get(key) {
            match entry {
                CacheEntry::Failed(message) => {
                    c.cache_hits.fetch_add(1, Relaxed);
                    c.errors.fetch_add(1, Relaxed);
                    return Prepared::Done(ImageReport {
                        cached: true,
                        ..ImageReport::error(message)
                    });
                }
                CacheEntry::Decoded { phash, scores } => {
                    let list = phash.and_then(|h| self.check_lists(h));
                    if list.is_some() || scores.is_some() || !needs_model {
                        c.cache_hits.fetch_add(1, Relaxed);
                        return Prepared::Done(ImageReport {
                            phash,
                            scores: if list.is_some() || !use_model {
                                None
                            } else {
                                scores
                            },
                            model_degraded: list.is_none() && degraded,
                            list,
                            cached: true,
                            ..Default::default()
                        });
                    }
                }
            }
        }
        let started = std::time::Instant::now();
        let decoded = decode::decode(bytes, &self.limits);
        c.decode_us
            .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
        let decoded = match decoded {
            Ok(d) => d,
            Err(e) => {
                if e.is_deterministic() {
                    self.cache.insert(key, CacheEntry::Failed(e.to_string()));
                }
                return fail(e.to_string());
            }
        };
        let phash = hashlist::phash(&decoded.hash_gray);
        let list = phash.and_then(|h| self.check_lists(h));
        if list.is_some() || !needs_model {
            self.cache.insert(
                key,
                CacheEntry::Decoded {
                    phash,
                    scores: None,
                },
            );
            return Prepared::Done(ImageReport {
                phash,
                model_degraded: list.is_none() && degraded,
                list,
                ..Default::default()
            });
        }
        Prepared::NeedsModel {
            key,
            phash,
            frames: decoded.model_frames,
        }
    }

    fn check_lists(&self, hash: PHash) -> Option<ListMatch> {
        let lists = self
            .lists
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let found = lists.check(hash);
        match &found {
            Some(ListMatch::Blocked { .. }) => self.counters.blocklisted.fetch_add(1, Relaxed),
            Some(ListMatch::Allowed { .. }) => self.counters.allowlisted.fetch_add(1, Relaxed),
            None => 0,
        };
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_forms_and_size_guard() {
        assert_eq!(decode_base64("aGk=", 10).as_deref(), Ok(&b"hi"[..]));
        assert_eq!(decode_base64("aGk", 10).as_deref(), Ok(&b"hi"[..]));
        assert_eq!(
            decode_base64("data:image/png;base64,aGk=", 10).as_deref(),
            Ok(&b"hi"[..])
        );
        assert!(decode_base64("!!!", 10).is_err());
        assert!(decode_base64(&"A".repeat(400), 10).is_err());
    }

    #[test]
    fn cache_is_bounded() {
        let cache = VerdictCache::new(2);
        for k in 0..5 {
            cache.insert(k, CacheEntry::Failed(k.to_string()));
        }
        assert!(cache.get(0).is_none());
        assert!(cache.get(4).is_some());
        assert!(cache.get(3).is_some());
    }

    #[test]
    fn defaults_validate() {
        assert_eq!(ImageConfig::default().validate(), Ok(()));
        let cfg = ImageConfig {
            hash_max_distance: 40,
            ..Default::default()
        };
        assert!(cfg.validate().is_err());
        for workers in [0, 65] {
            let cfg = ImageConfig {
                workers,
                ..Default::default()
            };
            let err = cfg.validate().expect_err("workers out of range accepted");
            assert!(err.starts_with("workers must be"), "{err}");
        }
    }
}
