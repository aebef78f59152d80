//! # Text stage
//!
//! Takes the `text` of a `moderate` request and gives back keyword [`Match`]es whose offsets point
//! into the ORIGINAL text. Called by [`crate::moderator::Moderator`].
//!
//! - [`normalize`]: NFKC, case fold, homoglyph/leetspeak/separator/repeat folding, with an offset
//!   map back to the original text.
//! - [`lexicon`]: the aho-corasick automaton over `wordlists/`, with allowlist and word-boundary
//!   rules.
//! - [`rules`]: a policy's regex/wildcard rules, matched on the original text.

pub mod classifier;
pub mod lexicon;
pub mod normalize;
pub mod rules;

use serde::Serialize;
use std::sync::Arc;

/// How bad a wordlist entry is. Ordered: `Low < Medium < High`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Mild language (e.g. "damn"): labelled, usually allowed.
    Low,
    /// Clearly inappropriate: usually sent to review.
    Medium,
    /// Slurs, explicit threats, explicit sexual content: usually blocked.
    High,
}

impl Severity {
    /// The wire name (`"low" | "medium" | "high"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
        }
    }
}

/// One wordlist hit, located in the ORIGINAL text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Match {
    /// The canonical wordlist entry that matched (normalized form), not the user's spelling.
    pub term: Arc<str>,
    /// Wordlist category (the file it came from): `profanity`, `sexual`, `insult`, `hate`,
    /// `threat`, `self_harm`, `scam`.
    pub category: Arc<str>,
    /// Optional finer label from the wordlist entry (e.g. `sexual`, `racial`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<Arc<str>>,
    /// Severity of the entry.
    pub severity: Severity,
    /// UTF-8 byte offset of the first byte of the match in the original text.
    pub start: usize,
    /// UTF-8 byte offset one past the last byte of the match in the original text.
    pub end: usize,
    /// Char (Unicode scalar value) offset of the start in the original text.
    pub start_char: usize,
    /// Char offset one past the end in the original text.
    pub end_char: usize,
}
