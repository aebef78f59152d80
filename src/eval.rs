//! # Accuracy evaluation (`chatguard eval text`)
//!
//! Takes the text-model config, an optional lexicon and the labelled Kaggle 2012 insults data
//! (`models/data/insults/`, fetched by `make models`) and gives back an [`EvalReport`]: ROC AUC
//! and precision/recall at a threshold on the TEST split for
//! - the head's `insult` score (MiniLM embedding + tox-block, the model the moderator uses),
//! - tox-block's `insult` probability alone,
//! - the lexicon alone (1 if any match of category insult/profanity/hate/threat/sexual, else 0).
//!
//! Called by the CLI; the report's `Display` is the table the README quotes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::text::classifier::{TOXBLOCK_INSULT, TextClassifier, TextModelConfig};
use crate::text::lexicon::Lexicon;

/// Score at or above which a comment counts as flagged for precision/recall.
pub const DEFAULT_THRESHOLD: f32 = 0.5;

/// Lexicon categories that count as an insult signal.
const LEXICON_CATEGORIES: [&str; 5] = ["insult", "profanity", "hate", "threat", "sexual"];

/// One signal's figures on the test split.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRow {
    /// What was scored.
    pub signal: &'static str,
    /// ROC AUC of the score against the `Insult` label.
    pub auc: f64,
    /// Precision at the report's threshold.
    pub precision: f64,
    /// Recall at the report's threshold.
    pub recall: f64,
    /// F1 at the report's threshold.
    pub f1: f64,
}

/// The result of [`eval_text`].
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// The CSV that was scored.
    pub data_file: PathBuf,
    /// Comments scored.
    pub examples: usize,
    /// Comments labelled insult.
    pub positives: usize,
    /// Threshold for precision/recall.
    pub threshold: f32,
    /// One row per signal: head, tox-block, lexicon (if given).
    pub rows: Vec<EvalRow>,
    /// Wall time of the model pass.
    pub model_time: Duration,
}

impl EvalReport {
    /// The row for `signal`, if present.
    pub fn row(&self, signal: &str) -> Option<&EvalRow> {
        self.rows.iter().find(|r| r.signal == signal)
    }
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "insults test split ({}): {} comments, {} insults ({:.1}%); threshold {:.2}; model pass {:.1} s ({:.0} msgs/s)",
            self.data_file.display(),
            self.examples,
            self.positives,
            100.0 * self.positives as f64 / self.examples.max(1) as f64,
            self.threshold,
            self.model_time.as_secs_f64(),
            self.examples as f64 / self.model_time.as_secs_f64().max(1e-9),
        )?;
        writeln!(
            f,
            "{:<34} {:<11} {:>9} {:>7} {:>6}",
            "signal", "roc", "precision", "recall", "f1"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<34} auc={:.4} {:>9.3} {:>7.3} {:>6.3}",
                r.signal, r.auc, r.precision, r.recall, r.f1
            )?;
        }
        Ok(())
    }
}

/// Signal names in the report.
pub const SIGNAL_HEAD: &str = "head insult (MiniLM + tox-block)";
/// See [`SIGNAL_HEAD`].
pub const SIGNAL_TOXBLOCK: &str = "tox-block insult alone";
/// See [`SIGNAL_HEAD`].
pub const SIGNAL_LEXICON: &str = "lexicon alone (any match)";

/// Evaluates at [`DEFAULT_THRESHOLD`]. `data_dir` is the directory holding
/// `test_with_solutions.csv` (or its parent, e.g. `models/data`).
pub fn eval_text(
    cfg: &TextModelConfig,
    lexicon: Option<&Lexicon>,
    data_dir: &Path,
) -> anyhow::Result<EvalReport> {
    eval_text_at(cfg, lexicon, data_dir, DEFAULT_THRESHOLD)
}

/// [`eval_text`] with an explicit precision/recall threshold.
pub fn eval_text_at(
    cfg: &TextModelConfig,
    lexicon: Option<&Lexicon>,
    data_dir: &Path,
    threshold: f32,
) -> anyhow::Result<EvalReport> {
    let data_file = test_split_path(data_dir)?;
    let (texts, labels) = load_insults(&data_file)?;
    let positives = labels.iter().filter(|&&l| l).count();
    anyhow::ensure!(
        positives > 0 && positives < labels.len(),
        "{} needs both insults and non-insults to compute AUC",
        data_file.display()
    );
    let classifier = TextClassifier::load(cfg)
        .context("loading the text model (settings under [text_model])")?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let started = Instant::now();
    let scores = classifier
        .classify_batch_blocking(&refs)
        .context("running the text model")?;
    let model_time = started.elapsed();

    let head: Vec<f32> = scores.iter().map(|s| s.insult).collect();
    let toxblock: Vec<f32> = scores.iter().map(|s| s.toxblock[TOXBLOCK_INSULT]).collect();
    let mut rows = vec![
        row(SIGNAL_HEAD, &head, &labels, threshold),
        row(SIGNAL_TOXBLOCK, &toxblock, &labels, threshold),
    ];
    if let Some(lexicon) = lexicon {
        let hits: Vec<f32> = texts
            .iter()
            .map(|t| {
                let hit = lexicon
                    .scan(t)
                    .iter()
                    .any(|m| LEXICON_CATEGORIES.contains(&&*m.category));
                if hit { 1.0 } else { 0.0 }
            })
            .collect();
        rows.push(row(SIGNAL_LEXICON, &hits, &labels, 0.5));
    }
    Ok(EvalReport {
        data_file,
        examples: labels.len(),
        positives,
        threshold,
        rows,
        model_time,
    })
}

fn test_split_path(data_dir: &Path) -> anyhow::Result<PathBuf> {
    const FILE: &str = "test_with_solutions.csv";
    let candidates = [data_dir.join(FILE), data_dir.join("insults").join(FILE)];
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!(
            "insults test split not found at {} (run `make models`, or pass the directory holding {FILE})",
            candidates[0].display()
        )
    })
}

/// Reads a Kaggle insults CSV (`Insult,Date,Comment[,Usage]`) → (cleaned comments, labels).
pub fn load_insults(path: &Path) -> anyhow::Result<(Vec<String>, Vec<bool>)> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("opening {}", path.display()))?;
    let headers = reader
        .headers()
        .with_context(|| format!("reading {}", path.display()))?;
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("{} has no `{name}` column", path.display()))
    };
    let (insult_col, comment_col) = (column("Insult")?, column("Comment")?);
    let mut texts = Vec::new();
    let mut labels = Vec::new();
    for (line, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{} record {}", path.display(), line + 1))?;
        let label = record.get(insult_col).unwrap_or_default().trim();
        labels.push(match label {
            "1" => true,
            "0" => false,
            other => anyhow::bail!("{} record {}: Insult = {other:?}", path.display(), line + 1),
        });
        texts.push(clean_comment(record.get(comment_col).unwrap_or_default()));
    }
    Ok((texts, labels))
}

/// The reference trainer's cleaning of a `Comment`: strip the outer quotes, turn literal `\n`
/// escapes into spaces, drop literal `\xNN` / `\uNNNN` escapes (lowercase hex), squeeze
/// whitespace. Matches `clean_comment` in `models/scripts/textstack.py`, so the evaluated text is
/// the text the head was trained on.
pub fn clean_comment(raw: &str) -> String {
    let s = raw.trim_matches('"');
    let bytes = s.as_bytes();
    let is_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            // One or two backslashes, then an escape letter.
            let slashes = if bytes.get(i + 1) == Some(&b'\\') {
                2
            } else {
                1
            };
            let at = i + slashes;
            let hex_len = match bytes.get(at) {
                Some(b'n') => Some(0),
                Some(b'x') => Some(2),
                Some(b'u') => Some(4),
                _ => None,
            };
            if let Some(hex_len) = hex_len {
                let digits = bytes.get(at + 1..at + 1 + hex_len);
                if digits.is_some_and(|d| d.iter().all(|&b| is_hex(b))) {
                    out.push(' ');
                    i = at + 1 + hex_len;
                    continue;
                }
            }
        }
        // Copy one whole char (the input is UTF-8; `i` is always on a char boundary here).
        let ch = s[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn row(signal: &'static str, scores: &[f32], labels: &[bool], threshold: f32) -> EvalRow {
    let (precision, recall) = precision_recall(scores, labels, threshold);
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    EvalRow {
        signal,
        auc: roc_auc(scores, labels),
        precision,
        recall,
        f1,
    }
}

/// ROC AUC by the rank-sum (Mann–Whitney) formula, ties counted half. 0.5 when one class is
/// empty.
pub fn roc_auc(scores: &[f32], labels: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return 0.5;
    }
    let mut positive_rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        // Ranks i+1..=j+1 share their mean.
        let mean_rank = (i + j + 2) as f64 / 2.0;
        positive_rank_sum += mean_rank * order[i..=j].iter().filter(|&&k| labels[k]).count() as f64;
        i = j + 1;
    }
    (positive_rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives)
}

/// Precision and recall of `score >= threshold` (precision 0 when nothing is flagged).
pub fn precision_recall(scores: &[f32], labels: &[bool], threshold: f32) -> (f64, f64) {
    let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
    for (&s, &l) in scores.iter().zip(labels) {
        match (s >= threshold, l) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            (false, false) => {}
        }
    }
    let ratio = |a: usize, b: usize| {
        if a + b == 0 {
            0.0
        } else {
            a as f64 / (a + b) as f64
        }
    };
    (ratio(tp, fp), ratio(tp, fn_))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_matches_hand_computed() {
        let labels = [false, false, true, true];
        assert_eq!(roc_auc(&[0.1, 0.4, 0.35, 0.8], &labels), 0.75);
        assert_eq!(roc_auc(&[0.1, 0.2, 0.3, 0.4], &labels), 1.0);
        assert_eq!(roc_auc(&[0.5; 4], &labels), 0.5);
        // Ties between a positive and a negative count half.
        assert_eq!(roc_auc(&[0.0, 1.0, 1.0, 1.0], &labels), 0.75);
    }

    #[test]
    fn precision_recall_at_threshold() {
        let labels = [true, true, false, false];
        assert_eq!(
            precision_recall(&[0.9, 0.2, 0.7, 0.1], &labels, 0.5),
            (0.5, 0.5)
        );
        assert_eq!(precision_recall(&[0.0; 4], &labels, 0.5), (0.0, 0.0));
    }

    #[test]
    fn clean_comment_matches_reference() {
        let cases = [
            (r#""""You fuck your dad.""""#, "You fuck your dad."),
            (r#""hi\\nthere\nyou""#, "hi there you"),
            (r#""caf\xe9 \\xe9x \u00e9 \\u00e9!""#, "caf x !"),
            (r#""keep \xZZ and \\q""#, r"keep \xZZ and \\q"),
            (r#""  spaced   out  ""#, "spaced out"),
            (r#""ünï\ncødé""#, "ünï cødé"),
        ];
        for (raw, want) in cases {
            assert_eq!(clean_comment(raw), want, "raw {raw:?}");
        }
    }
}
