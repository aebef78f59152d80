//! # Text model
//!
//! Takes message text and gives back [`TextScores`]: six abuse scores from a small head over two
//! models, plus the raw tox-block probabilities. Called by [`crate::moderator`] (through the
//! batcher, [`TextClassifier::classify`]) and by `chatguard eval text`, benches and the CLI
//! ([`TextClassifier::classify_batch_blocking`]).
//!
//! Per batch:
//! 1. MiniLM-L6-v2 tokenizer (WordPiece, truncated at `max_tokens`) → encoder session →
//!    `sentence_embedding` `[B,384]` (mean-pooled, L2-normalised inside the graph). A batch is
//!    sorted by length and run as one or more padded groups when that is cheaper than padding
//!    every message to the longest;
//! 2. tox-block tokenizer (Keras word index; unknown words dropped, last 100 ids kept, left-padded
//!    with 0) → BiLSTM session → `probs` `[B,6]`;
//! 3. head (`models/head/text_head.json`): `sigmoid(concat(embedding, transform(probs)) · W + b)`,
//!    a 390×6 matmul in plain Rust.
//!
//! Tokenization runs on the batcher's preparation thread, the sessions on its model threads —
//! never on the async runtime. `workers` model threads (default 2), each with its own pair of
//! sessions and `intra_threads` ONNX Runtime threads per session (default 1), inter-op 1: on the
//! 2-core box two single-threaded workers ran 1.56× the messages/s of one worker with two
//! intra-op threads (batches of 32 chat lines; most of MiniLM's ~100 small operators per run
//! are too small to split well). The model files come from `make models` (see `models/`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::infer::runtime::{backend_error, extract_f32};
use ort::session::{OutputSelector, RunOptions, Session};
use ort::value::TensorRef;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::infer::runtime::{self, SessionThreads};
use crate::infer::{Backend, Batcher, BatcherConfig, BatcherStats, InferError, Prepare};

/// Width of MiniLM's sentence embedding.
pub const EMBEDDING_DIM: usize = 384;
/// tox-block's fixed input length.
pub const TOXBLOCK_LEN: usize = 100;
/// tox-block's outputs, in order.
pub const TOXBLOCK_LABELS: [&str; 6] = [
    "toxic",
    "severe_toxic",
    "obscene",
    "threat",
    "insult",
    "identity_hate",
];
/// Index of `insult` in [`TextScores::toxblock`].
pub const TOXBLOCK_INSULT: usize = 4;
/// The head's outputs, in [`TextScores`] field order.
pub const HEAD_LABELS: [&str; 6] = ["insult", "threat", "sexual", "hate", "toxic", "severe"];
/// Head input width: the embedding plus the six tox-block values.
pub const HEAD_INPUTS: usize = EMBEDDING_DIM + 6;
/// tox-block's out-of-vocabulary id; it never reached the model in training, so it is dropped.
const TOXBLOCK_UNK_ID: u32 = 20000;
/// Most model threads `[text_model] workers` may ask for.
pub const MAX_WORKERS: usize = 64;

/// MiniLM's position-embedding table size: the hard upper bound for `max_tokens`.
const MINILM_MAX_POSITIONS: usize = 512;

/// `[text_model]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextModelConfig {
    /// Run the text model at all (the lexicon runs regardless). The caller checks this before
    /// [`TextClassifier::load`].
    pub enabled: bool,
    /// Directory `make models` filled: `minilm/`, `toxblock/`, `head/`, `onnxruntime/`.
    pub models_dir: PathBuf,
    /// The ONNX Runtime shared library; default `<models_dir>/onnxruntime/libonnxruntime.so.1.31.1`.
    pub ort_dylib_path: Option<PathBuf>,
    /// ONNX Runtime intra-op threads per session (the calling thread included).
    pub intra_threads: usize,
    /// Model threads, each with its own sessions (each adds about 100 MB of weights and arenas).
    pub workers: usize,
    /// Most messages in one model run.
    pub max_batch_size: usize,
    /// Most padded MiniLM tokens in one model run (messages × longest message).
    pub max_batch_tokens: usize,
    /// MiniLM truncation: tokens per message, `[CLS]`/`[SEP]` included (at most 512).
    pub max_tokens: usize,
    /// Messages waiting for the model beyond which requests are refused `overloaded`.
    pub queue_capacity: usize,
    /// How long a message may wait for the model before it is answered `timeout`.
    pub queue_timeout_ms: u64,
}

impl Default for TextModelConfig {
    fn default() -> Self {
        TextModelConfig {
            enabled: true,
            models_dir: PathBuf::from("models"),
            ort_dylib_path: None,
            intra_threads: 1,
            workers: 2,
            max_batch_size: 32,
            max_batch_tokens: 32 * 64,
            max_tokens: 128,
            queue_capacity: 1024,
            queue_timeout_ms: 1000,
        }
    }
}

impl TextModelConfig {
    /// The ONNX Runtime library this config loads.
    pub fn ort_dylib(&self) -> PathBuf {
        crate::infer::runtime::ort_dylib(&self.models_dir, self.ort_dylib_path.as_deref())
    }

    /// Checks the numeric settings; the error names the setting.
    pub fn validate(&self) -> Result<(), InferError> {
        let bad =
            |setting: &'static str, reason: String| Err(InferError::Config { setting, reason });
        if self.intra_threads == 0 {
            return bad("intra_threads", "must be at least 1".into());
        }
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return bad("workers", format!("must be in 1..={MAX_WORKERS}"));
        }
        if self.max_tokens < 2 || self.max_tokens > MINILM_MAX_POSITIONS {
            return bad(
                "max_tokens",
                format!("must be in 2..={MINILM_MAX_POSITIONS}"),
            );
        }
        if self.max_batch_size == 0 {
            return bad("max_batch_size", "must be at least 1".into());
        }
        if self.max_batch_tokens < self.max_tokens {
            return bad(
                "max_batch_tokens",
                format!("must be at least max_tokens ({})", self.max_tokens),
            );
        }
        if self.queue_capacity == 0 {
            return bad("queue_capacity", "must be at least 1".into());
        }
        if self.queue_timeout_ms == 0 {
            return bad("queue_timeout_ms", "must be at least 1".into());
        }
        Ok(())
    }
}

/// The text model's verdict on one message. All values are probabilities in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TextScores {
    /// Personal attack on the addressee (the head's main, evaluated output).
    pub insult: f32,
    /// Threat of violence.
    pub threat: f32,
    /// Sexual / obscene content.
    pub sexual: f32,
    /// Identity-based hate.
    pub hate: f32,
    /// General toxicity.
    pub toxic: f32,
    /// Severe toxicity.
    pub severe: f32,
    /// tox-block's raw probabilities, in [`TOXBLOCK_LABELS`] order.
    pub toxblock: [f32; 6],
}

impl TextScores {
    /// The head scores in [`HEAD_LABELS`] order.
    pub fn head(&self) -> [f32; 6] {
        [
            self.insult,
            self.threat,
            self.sexual,
            self.hate,
            self.toxic,
            self.severe,
        ]
    }
}

/// Everything computed for one message, for parity tests and debugging.
#[derive(Debug, Clone)]
pub struct TextFeatures {
    /// MiniLM token ids, `[CLS] … [SEP]`, unpadded.
    pub minilm_ids: Vec<i64>,
    /// tox-block input ids (length [`TOXBLOCK_LEN`], left-padded with 0).
    pub toxblock_ids: Vec<i64>,
    /// MiniLM sentence embedding ([`EMBEDDING_DIM`] values).
    pub embedding: Vec<f32>,
    /// The scores.
    pub scores: TextScores,
}

/// One message, tokenized for both models (see [`TextClassifier::tokenize_blocking`]).
#[derive(Debug, Clone)]
pub struct TextItem {
    /// MiniLM ids, unpadded, at most `max_tokens`.
    minilm_ids: Vec<i64>,
    /// tox-block ids, exactly [`TOXBLOCK_LEN`].
    toxblock_ids: Vec<i64>,
}

/// Both tokenizers, configured for inference. Shared by the preparation thread and blocking
/// callers (`Tokenizer::encode` takes `&self`).
struct TextTokenizers {
    /// MiniLM WordPiece, truncation at `max_tokens`, padding off (the model thread pads).
    minilm: Tokenizer,
    /// MiniLM's `[PAD]` id.
    minilm_pad_id: i64,
    /// tox-block WordLevel.
    toxblock: Tokenizer,
    /// tox-block's `[UNK]` id, dropped from the input.
    toxblock_unk_id: u32,
}

impl TextTokenizers {
    fn load(dir: &Path, max_tokens: usize) -> Result<Self, InferError> {
        let minilm_path = dir.join("minilm/tokenizer.json");
        let toxblock_path = dir.join("toxblock/toxblock_tokenizer.json");
        let mut minilm = load_tokenizer("MiniLM tokenizer", &minilm_path)?;
        let mut toxblock = load_tokenizer("tox-block tokenizer", &toxblock_path)?;
        let minilm_pad_id = minilm
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| minilm.token_to_id("[PAD]"))
            .unwrap_or(0);
        minilm.with_padding(None);
        let truncation = tokenizers::TruncationParams {
            max_length: max_tokens,
            ..minilm.get_truncation().cloned().unwrap_or_default()
        };
        minilm
            .with_truncation(Some(truncation))
            .map_err(|e| InferError::Load {
                what: "MiniLM tokenizer",
                path: minilm_path.clone(),
                reason: format!("cannot truncate at max_tokens = {max_tokens}: {e}"),
            })?;
        toxblock.with_padding(None);
        toxblock
            .with_truncation(None)
            .map_err(|e| InferError::Load {
                what: "tox-block tokenizer",
                path: toxblock_path.clone(),
                reason: e.to_string(),
            })?;
        let toxblock_unk_id = toxblock.token_to_id("[UNK]").unwrap_or(TOXBLOCK_UNK_ID);
        Ok(TextTokenizers {
            minilm,
            minilm_pad_id: i64::from(minilm_pad_id),
            toxblock,
            toxblock_unk_id,
        })
    }

    fn encode(&self, text: &str) -> Result<TextItem, InferError> {
        let minilm = self
            .minilm
            .encode(text, true)
            .map_err(|e| InferError::Input(format!("MiniLM tokenizer: {e}")))?;
        let minilm_ids = minilm.get_ids().iter().map(|&id| i64::from(id)).collect();
        let toxblock = self
            .toxblock
            .encode(text, false)
            .map_err(|e| InferError::Input(format!("tox-block tokenizer: {e}")))?;
        let known: Vec<u32> = toxblock
            .get_ids()
            .iter()
            .copied()
            .filter(|&id| id != self.toxblock_unk_id)
            .collect();
        let tail = &known[known.len().saturating_sub(TOXBLOCK_LEN)..];
        let mut toxblock_ids = vec![0i64; TOXBLOCK_LEN - tail.len()];
        toxblock_ids.extend(tail.iter().map(|&id| i64::from(id)));
        Ok(TextItem {
            minilm_ids,
            toxblock_ids,
        })
    }
}

fn load_tokenizer(what: &'static str, path: &Path) -> Result<Tokenizer, InferError> {
    if !path.is_file() {
        return Err(InferError::MissingFile {
            what,
            path: path.to_path_buf(),
            hint: "run `make models`, or set `models_dir` in the model config".into(),
        });
    }
    Tokenizer::from_file(path).map_err(|e| InferError::Load {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// How tox-block's probabilities enter the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ToxblockTransform {
    /// As they are.
    Identity,
    /// `ln(p / (1 - p))`, with `p` clipped to `[1e-6, 1 - 1e-6]`.
    Logit,
}

/// `models/head/text_head.json` as written by the head trainer.
#[derive(Deserialize)]
struct HeadFile {
    labels: Vec<String>,
    toxblock_transform: String,
    #[serde(rename = "W")]
    w: Vec<Vec<f64>>,
    b: Vec<f64>,
}

/// The logistic head: [`HEAD_INPUTS`] features → six scores, columns in [`HEAD_LABELS`] order.
#[derive(Debug, Clone)]
struct Head {
    /// Row `i` holds feature `i`'s weight for each output. f64 like the trainer: the folded-in
    /// standardisation makes weights large, and the sums cancel.
    w: Vec<[f64; 6]>,
    /// Bias per output.
    b: [f64; 6],
    /// Applied to tox-block's probabilities before they enter.
    transform: ToxblockTransform,
}

impl Head {
    fn load(path: &Path) -> Result<Head, InferError> {
        const WHAT: &str = "text head";
        if !path.is_file() {
            return Err(InferError::MissingFile {
                what: WHAT,
                path: path.to_path_buf(),
                hint: "run `make models`, or set `models_dir` in the model config".into(),
            });
        }
        let bad = |reason: String| InferError::Load {
            what: WHAT,
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let file: HeadFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let transform = match file.toxblock_transform.as_str() {
            "identity" => ToxblockTransform::Identity,
            "logit" => ToxblockTransform::Logit,
            other => return Err(bad(format!("unknown toxblock_transform {other:?}"))),
        };
        // Column of the file for each of our outputs.
        let mut column = [0usize; 6];
        for (slot, label) in column.iter_mut().zip(HEAD_LABELS) {
            *slot = file
                .labels
                .iter()
                .position(|l| l == label)
                .ok_or_else(|| bad(format!("labels {:?} lack {label:?}", file.labels)))?;
        }
        if file.labels.len() != 6 || file.b.len() != 6 || file.w.len() != HEAD_INPUTS {
            return Err(bad(format!(
                "expected 6 labels, b[6], W[{HEAD_INPUTS}][6]; got {} labels, b[{}], W[{}]",
                file.labels.len(),
                file.b.len(),
                file.w.len()
            )));
        }
        let mut w = Vec::with_capacity(HEAD_INPUTS);
        for (i, row) in file.w.iter().enumerate() {
            if row.len() != 6 {
                return Err(bad(format!(
                    "W row {i} has {} values, expected 6",
                    row.len()
                )));
            }
            w.push(column.map(|c| row[c]));
        }
        Ok(Head {
            w,
            b: column.map(|c| file.b[c]),
            transform,
        })
    }

    /// Scores one message from its embedding and tox-block probabilities (in f64, like the
    /// trainer's reference).
    fn scores(&self, embedding: &[f32], toxblock: [f32; 6]) -> TextScores {
        let transformed = toxblock.map(|p| {
            let p = f64::from(p);
            match self.transform {
                ToxblockTransform::Identity => p,
                ToxblockTransform::Logit => {
                    let q = p.clamp(1e-6, 1.0 - 1e-6);
                    q.ln() - (-q).ln_1p()
                }
            }
        });
        let features = embedding.iter().map(|&x| f64::from(x)).chain(transformed);
        let mut z = self.b;
        for (x, row) in features.zip(&self.w) {
            for (acc, weight) in z.iter_mut().zip(row) {
                *acc += x * weight;
            }
        }
        let [insult, threat, sexual, hate, toxic, severe] =
            z.map(|v| (1.0 / (1.0 + (-v).exp())) as f32);
        TextScores {
            insult,
            threat,
            sexual,
            hate,
            toxic,
            severe,
            toxblock,
        }
    }
}

/// The two sessions and the head. Owned by the batcher's model thread behind a mutex that
/// blocking callers also take.
struct TextModel {
    /// MiniLM encoder.
    minilm: Session,
    /// Asks MiniLM for `sentence_embedding` only (not the `[B,T,384]` hidden states).
    minilm_outputs: RunOptions<ort::session::HasSelectedOutputs>,
    /// tox-block BiLSTM.
    toxblock: Session,
    /// The logistic head.
    head: Head,
    /// MiniLM `[PAD]` id.
    minilm_pad_id: i64,
}

/// Per-message model outputs before the head.
struct RawOutputs {
    /// `sentence_embedding`, flattened `[B,384]`.
    embeddings: Vec<f32>,
    /// `probs`, one row per message.
    toxblock: Vec<[f32; 6]>,
}

/// Fixed cost of one MiniLM run in padded-token units (measured: a 1×8 run costs about as much
/// as 8 + 12 tokens of a large batch). Used to decide when splitting a batch pays.
const RUN_OVERHEAD_TOKENS: usize = 12;

/// Splits ascending `lengths` into contiguous groups minimising the padded cost
/// `Σ (RUN_OVERHEAD_TOKENS + group_len × group_max)`: a batch of short messages with one long one
/// runs as two MiniLM calls instead of padding everything to the long one. O(n²), n ≤ batch size.
fn length_groups(lengths: &[usize]) -> Vec<std::ops::Range<usize>> {
    let n = lengths.len();
    // best[j]: cheapest cost of the first j items; cut[j]: where its last group starts.
    let mut best = vec![0usize; n + 1];
    let mut cut = vec![0usize; n + 1];
    for j in 1..=n {
        let (cost, start) = (0..j)
            .map(|i| (best[i] + RUN_OVERHEAD_TOKENS + (j - i) * lengths[j - 1], i))
            .min()
            .unwrap_or((0, 0));
        best[j] = cost;
        cut[j] = start;
    }
    let mut groups = Vec::new();
    let mut end = n;
    while end > 0 {
        groups.push(cut[end]..end);
        end = cut[end];
    }
    groups.reverse();
    groups
}

impl TextModel {
    /// Opens both sessions (`env` is the loaded ONNX Runtime) and checks their tensors.
    fn load(
        env: &ort::environment::Environment,
        dir: &Path,
        threads: SessionThreads,
        head: &Head,
        minilm_pad_id: i64,
    ) -> Result<TextModel, InferError> {
        let minilm_path = dir.join("minilm/minilm-l6-v2.onnx");
        let minilm = runtime::session(
            env,
            "MiniLM encoder",
            &minilm_path,
            threads,
            &["input_ids", "attention_mask", "token_type_ids"],
            &["sentence_embedding"],
        )?;
        let toxblock_path = dir.join("toxblock/toxblock.onnx");
        let toxblock = runtime::session(
            env,
            "tox-block model",
            &toxblock_path,
            threads,
            &["input_ids"],
            &["probs"],
        )?;
        let minilm_outputs = RunOptions::new()
            .map_err(|e| InferError::Backend(e.to_string()))?
            .with_outputs(OutputSelector::no_default().with("sentence_embedding"));
        Ok(TextModel {
            minilm,
            minilm_outputs,
            toxblock,
            head: head.clone(),
            minilm_pad_id,
        })
    }

    /// Both models on `items`: MiniLM in length groups ([`length_groups`]), tox-block in one run.
    fn run_raw(&mut self, items: &[&TextItem]) -> Result<RawOutputs, InferError> {
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| items[i].minilm_ids.len());
        let lengths: Vec<usize> = order.iter().map(|&i| items[i].minilm_ids.len()).collect();
        let mut embeddings = vec![0f32; items.len() * EMBEDDING_DIM];
        for group in length_groups(&lengths) {
            let members = &order[group];
            let group_items: Vec<&TextItem> = members.iter().map(|&i| items[i]).collect();
            let group_embeddings = self.embed(&group_items)?;
            for (&i, row) in members
                .iter()
                .zip(group_embeddings.chunks_exact(EMBEDDING_DIM))
            {
                embeddings[i * EMBEDDING_DIM..(i + 1) * EMBEDDING_DIM].copy_from_slice(row);
            }
        }
        let toxblock = self.toxblock_probs(items)?;
        Ok(RawOutputs {
            embeddings,
            toxblock,
        })
    }

    /// One MiniLM run, padded to the longest item → flattened `sentence_embedding` rows.
    fn embed(&mut self, items: &[&TextItem]) -> Result<Vec<f32>, InferError> {
        let rows = items.len();
        let longest = items
            .iter()
            .map(|i| i.minilm_ids.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut ids = vec![self.minilm_pad_id; rows * longest];
        let mut mask = vec![0i64; rows * longest];
        let token_types = vec![0i64; rows * longest];
        for (row, item) in items.iter().enumerate() {
            let start = row * longest;
            ids[start..start + item.minilm_ids.len()].copy_from_slice(&item.minilm_ids);
            mask[start..start + item.minilm_ids.len()].fill(1);
        }
        let shape = [rows, longest];
        fn tensor(shape: [usize; 2], data: &[i64]) -> Result<TensorRef<'_, i64>, InferError> {
            TensorRef::from_array_view((shape, data)).map_err(backend_error("MiniLM input"))
        }
        let outputs = self
            .minilm
            .run_with_options(
                ort::inputs![
                    "input_ids" => tensor(shape, &ids)?,
                    "attention_mask" => tensor(shape, &mask)?,
                    "token_type_ids" => tensor(shape, &token_types)?,
                ],
                &self.minilm_outputs,
            )
            .map_err(backend_error("MiniLM"))?;
        Ok(extract_f32(&outputs, "sentence_embedding", rows, EMBEDDING_DIM)?.to_vec())
    }

    /// One tox-block run → `probs` rows.
    fn toxblock_probs(&mut self, items: &[&TextItem]) -> Result<Vec<[f32; 6]>, InferError> {
        let rows = items.len();
        let toxblock_ids: Vec<i64> = items
            .iter()
            .flat_map(|i| i.toxblock_ids.iter().copied())
            .collect();
        let input = TensorRef::from_array_view(([rows, TOXBLOCK_LEN], &toxblock_ids[..]))
            .map_err(backend_error("tox-block input"))?;
        let outputs = self
            .toxblock
            .run(ort::inputs!["input_ids" => input])
            .map_err(backend_error("tox-block"))?;
        let probs = extract_f32(&outputs, "probs", rows, 6)?;
        Ok(probs
            .chunks_exact(6)
            .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]])
            .collect())
    }

    fn scores(&mut self, items: &[&TextItem]) -> Result<Vec<TextScores>, InferError> {
        let raw = self.run_raw(items)?;
        Ok(raw
            .embeddings
            .chunks_exact(EMBEDDING_DIM)
            .zip(&raw.toxblock)
            .map(|(embedding, &probs)| self.head.scores(embedding, probs))
            .collect())
    }
}

/// The batcher's preparation side: tokenizes on the preparation thread.
struct TextPrepare {
    /// Shared with blocking callers.
    tokenizers: Arc<TextTokenizers>,
}

impl Prepare for TextPrepare {
    type Request = String;
    type Item = TextItem;

    fn prepare(&mut self, text: String) -> Result<TextItem, InferError> {
        self.tokenizers.encode(&text)
    }
}

/// The batcher's model side.
struct TextBackend {
    /// Shared with blocking callers.
    model: Arc<Mutex<TextModel>>,
}

impl Backend for TextBackend {
    type Item = TextItem;
    type Output = TextScores;

    fn cost(&self, item: &TextItem) -> usize {
        item.minilm_ids.len()
    }

    fn run(&mut self, batch: Vec<TextItem>) -> Result<Vec<TextScores>, InferError> {
        let items: Vec<&TextItem> = batch.iter().collect();
        self.model
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .scores(&items)
    }
}

/// A chunk's index and its scores (see [`TextClassifier::score_chunks`]).
type ScoredChunk = (usize, Vec<TextScores>);

/// Cheap-to-clone handle to the loaded text model and its batcher.
#[derive(Clone)]
pub struct TextClassifier {
    /// The queue in front of the model thread.
    batcher: Batcher<String, TextScores>,
    /// For blocking callers (tokenize on the caller's thread).
    tokenizers: Arc<TextTokenizers>,
    /// One per model thread; blocking callers use them too (in parallel).
    models: Vec<Arc<Mutex<TextModel>>>,
    /// Chunk size for blocking batches.
    max_batch_size: usize,
}

impl TextClassifier {
    /// Loads ONNX Runtime, both models, both tokenizers and the head, and starts the batcher.
    /// Errors name the missing file or the bad setting.
    pub fn load(cfg: &TextModelConfig) -> Result<TextClassifier, InferError> {
        cfg.validate()?;
        let env = runtime::environment(&cfg.ort_dylib())?;
        let dir = &cfg.models_dir;
        let threads = SessionThreads {
            intra: cfg.intra_threads,
            inter: 1,
        };
        let head = Head::load(&dir.join("head/text_head.json"))?;
        let tokenizers = Arc::new(TextTokenizers::load(dir, cfg.max_tokens)?);
        let models = (0..cfg.workers)
            .map(|_| {
                let model = TextModel::load(&env, dir, threads, &head, tokenizers.minilm_pad_id)?;
                Ok(Arc::new(Mutex::new(model)))
            })
            .collect::<Result<Vec<_>, InferError>>()?;
        let batcher = Batcher::spawn_pool(
            BatcherConfig {
                name: "text-model".into(),
                max_batch_size: cfg.max_batch_size,
                max_batch_tokens: cfg.max_batch_tokens,
                queue_capacity: cfg.queue_capacity,
                queue_timeout: Duration::from_millis(cfg.queue_timeout_ms),
            },
            TextPrepare {
                tokenizers: tokenizers.clone(),
            },
            models
                .iter()
                .map(|model| TextBackend {
                    model: model.clone(),
                })
                .collect(),
        )?;
        Ok(TextClassifier {
            batcher,
            tokenizers,
            models,
            max_batch_size: cfg.max_batch_size,
        })
    }

    /// Scores one message through the batcher (tokenization and inference on its threads).
    pub async fn classify(&self, text: &str) -> Result<TextScores, InferError> {
        self.batcher.submit(text.to_owned()).await
    }

    /// Scores `texts` directly on the calling thread, bypassing the queue (for eval, benches and
    /// the CLI). Messages of similar length are batched together (up to `max_batch_size`, less
    /// padding); results come back in input order. Blocks; do not call on the async runtime.
    pub fn classify_batch_blocking(&self, texts: &[&str]) -> Result<Vec<TextScores>, InferError> {
        let items = self.tokenize_blocking(texts)?;
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| items[i].minilm_ids.len());
        let chunks: Vec<&[usize]> = order.chunks(self.max_batch_size).collect();
        let mut scores: Vec<Option<TextScores>> = vec![None; items.len()];
        for (chunk, batch) in chunks.iter().zip(self.score_chunks(&items, &chunks)?) {
            for (&i, s) in chunk.iter().zip(batch) {
                scores[i] = Some(s);
            }
        }
        Ok(scores
            .into_iter()
            .map(|s| s.expect("every index is in exactly one chunk. This is a bug."))
            .collect())
    }

    /// Tokenizes `texts` for both models on the calling thread (benches: time the sessions alone).
    pub fn tokenize_blocking(&self, texts: &[&str]) -> Result<Vec<TextItem>, InferError> {
        texts.iter().map(|t| self.tokenizers.encode(t)).collect()
    }

    /// Runs already-tokenized messages through the sessions and the head on the calling thread
    /// (and one more per extra worker), in fixed batches of `max_batch_size` in the given order
    /// (the raw-session baseline).
    pub fn run_tokenized_blocking(
        &self,
        items: &[TextItem],
    ) -> Result<Vec<TextScores>, InferError> {
        let order: Vec<usize> = (0..items.len()).collect();
        let chunks: Vec<&[usize]> = order.chunks(self.max_batch_size).collect();
        Ok(self.score_chunks(items, &chunks)?.concat())
    }

    /// Scores each chunk of `items` (indices; one model run each) on all models at once: one
    /// scoped thread per model takes the next chunk until none is left. Results in chunk order;
    /// the first error stops the rest.
    fn score_chunks(
        &self,
        items: &[TextItem],
        chunks: &[&[usize]],
    ) -> Result<Vec<Vec<TextScores>>, InferError> {
        let next = AtomicUsize::new(0);
        let work = |model: &Mutex<TextModel>| {
            let mut done = Vec::new();
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                let Some(chunk) = chunks.get(c) else {
                    return Ok(done);
                };
                let refs: Vec<&TextItem> = chunk.iter().map(|&i| &items[i]).collect();
                let scored = model
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .scores(&refs);
                match scored {
                    Ok(scores) => done.push((c, scores)),
                    Err(e) => {
                        next.store(chunks.len(), Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
        };
        let per_model: Vec<Result<Vec<ScoredChunk>, InferError>> =
            if self.models.len() == 1 || chunks.len() <= 1 {
                vec![work(&self.models[0])]
            } else {
                let work = &work;
                std::thread::scope(|scope| {
                    let threads: Vec<_> = self
                        .models
                        .iter()
                        .map(|model| scope.spawn(move || work(model)))
                        .collect();
                    threads
                        .into_iter()
                        .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                        .collect()
                })
            };
        let mut out = vec![Vec::new(); chunks.len()];
        for done in per_model {
            for (c, scores) in done? {
                out[c] = scores;
            }
        }
        Ok(out)
    }

    /// Like [`classify_batch_blocking`](Self::classify_batch_blocking), keeping the token ids and
    /// embeddings (parity tests, debugging). `texts` run as one batch.
    pub fn features_blocking(&self, texts: &[&str]) -> Result<Vec<TextFeatures>, InferError> {
        let items = self.tokenize_blocking(texts)?;
        let refs: Vec<&TextItem> = items.iter().collect();
        let mut model = self.lock_model();
        let raw = model.run_raw(&refs)?;
        Ok(items
            .into_iter()
            .zip(raw.embeddings.chunks_exact(EMBEDDING_DIM))
            .zip(raw.toxblock)
            .map(|((item, embedding), probs)| TextFeatures {
                scores: model.head.scores(embedding, probs),
                minilm_ids: item.minilm_ids,
                toxblock_ids: item.toxblock_ids,
                embedding: embedding.to_vec(),
            })
            .collect())
    }

    /// The batcher's counters (for `/metrics`).
    pub fn stats(&self) -> BatcherStats {
        self.batcher.stats()
    }

    fn lock_model(&self) -> std::sync::MutexGuard<'_, TextModel> {
        self.models[0]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_groups_split_only_when_padding_costs_more_than_a_run() {
        assert!(length_groups(&[]).is_empty());
        assert_eq!(length_groups(&[7]), vec![0..1]);
        assert_eq!(length_groups(&[10, 11, 12]), vec![0..3]);
        let mut lengths = vec![10; 31];
        lengths.push(40);
        assert_eq!(length_groups(&lengths), vec![0..31, 31..32]);
        let groups = length_groups(&[5, 5, 6, 30, 31, 32, 128]);
        assert_eq!(groups, vec![0..3, 3..6, 6..7]);
    }

    #[test]
    fn config_validation_names_the_setting() {
        let setting = |cfg: TextModelConfig| match cfg.validate() {
            Err(InferError::Config { setting, .. }) => setting,
            other => panic!("expected a Config error, got {other:?}"),
        };
        assert!(TextModelConfig::default().validate().is_ok());
        let d = TextModelConfig::default;
        assert_eq!(
            setting(TextModelConfig {
                intra_threads: 0,
                ..d()
            }),
            "intra_threads"
        );
        for workers in [0, MAX_WORKERS + 1] {
            assert_eq!(setting(TextModelConfig { workers, ..d() }), "workers");
        }
        assert_eq!(
            setting(TextModelConfig {
                max_tokens: 513,
                ..d()
            }),
            "max_tokens"
        );
        assert_eq!(
            setting(TextModelConfig {
                max_batch_size: 0,
                ..d()
            }),
            "max_batch_size"
        );
        assert_eq!(
            setting(TextModelConfig {
                queue_capacity: 0,
                ..d()
            }),
            "queue_capacity"
        );
        assert_eq!(
            setting(TextModelConfig {
                queue_timeout_ms: 0,
                ..d()
            }),
            "queue_timeout_ms"
        );
    }

    #[test]
    fn config_parses_from_toml_with_defaults() {
        let cfg: TextModelConfig =
            toml::from_str("intra_threads = 1\nmodels_dir = \"/m\"").expect("parse");
        assert_eq!(cfg.intra_threads, 1);
        assert_eq!(cfg.models_dir, PathBuf::from("/m"));
        assert_eq!(
            cfg.ort_dylib(),
            PathBuf::from("/m/onnxruntime/libonnxruntime.so.1.31.1")
        );
        assert!(toml::from_str::<TextModelConfig>("intra_thread = 1").is_err());
    }
}
