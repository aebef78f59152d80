//! # Policy rules
//!
//! Takes the ORIGINAL text of a message (not the folded text the lexicon scans: a rule sees
//! exactly what the user sent, case and punctuation included) and a policy's compiled
//! [`RuleSet`], gives back a [`Match`] per rule hit, located with byte and char offsets like
//! lexicon matches. Built by [`crate::config::Config::build`] from a policy's `rules`
//! ([`RuleSpec`]); called by [`crate::moderator::Moderator`] for every message under a policy
//! that has rules.
//!
//! Two kinds of rule:
//! - `regex`: the `regex` crate's syntax (linear-time: no backreferences or lookaround),
//!   Unicode-aware. Write `(?i)` for case-insensitive matching.
//! - `wildcard`: a glob over the text, case-insensitive: `*` is any run of characters
//!   (possibly empty), `?` any one character, everything else literal. The pattern matches
//!   anywhere in the text (`*bit.ly/*` and `bit.ly/` are the same rule).
//!
//! Everything is bounded: at most [`MAX_RULES`] rules per policy, patterns of at most
//! [`MAX_PATTERN_BYTES`], each compiled regex within [`REGEX_SIZE_LIMIT`] bytes (and its lazy
//! DFA cache within [`REGEX_DFA_SIZE_LIMIT`]), at most [`MAX_MATCHES_PER_RULE`] matches
//! reported per rule and message. Matching is linear in the text for every rule.

use super::{Match, Severity};
use regex::{Regex, RegexBuilder};
use serde::Deserialize;
use std::sync::Arc;

/// Most rules one policy may have.
pub const MAX_RULES: usize = 256;
/// Longest pattern, in bytes.
pub const MAX_PATTERN_BYTES: usize = 1024;
/// Largest compiled program of one regex, in bytes (`RegexBuilder::size_limit`).
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Largest lazy-DFA cache of one regex, in bytes (`RegexBuilder::dfa_size_limit`).
pub const REGEX_DFA_SIZE_LIMIT: usize = 2 << 20;
/// Most regex nesting levels (`RegexBuilder::nest_limit`).
pub const REGEX_NEST_LIMIT: u32 = 64;
/// Most matches reported per rule for one message (the rest are not reported; the label
/// stands either way).
pub const MAX_MATCHES_PER_RULE: usize = 16;

/// How a rule's pattern is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    /// `regex` crate syntax.
    Regex,
    /// `*` any run, `?` one char, the rest literal; case-insensitive.
    Wildcard,
}

/// One rule as written in a policy (`rules = [{ pattern = "...", kind = "regex", label =
/// "scam", severity = "high" }]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// The pattern, matched against the original text.
    pub pattern: String,
    /// How to read `pattern`.
    pub kind: RuleKind,
    /// Taxonomy label reported on a match (see [`crate::policy::LABELS`]).
    pub label: String,
    /// Optional finer label (`[a-z0-9_]+`), e.g. `phishing`.
    #[serde(default)]
    pub sub: Option<String>,
    /// Severity: the label's score comes from the policy's `severity_scores`.
    pub severity: Severity,
}

/// Why a policy's rules could not be compiled.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuleError {
    /// More rules than [`MAX_RULES`].
    #[error("{count} rules; at most {MAX_RULES} are allowed")]
    TooMany {
        /// How many were given.
        count: usize,
    },
    /// One rule is invalid.
    #[error("rule {index} ({pattern:?}): {reason}")]
    Invalid {
        /// 0-based position in `rules`.
        index: usize,
        /// The pattern, cut to 80 chars.
        pattern: String,
        /// What is wrong.
        reason: String,
    },
}

/// One compiled rule.
#[derive(Debug)]
struct Rule {
    /// The compiled matcher.
    regex: Regex,
    /// Reported as the match's `term`: the pattern as written.
    term: Arc<str>,
    /// Taxonomy label, reported as the match's `category`.
    label: Arc<str>,
    /// Finer label.
    sub: Option<Arc<str>>,
    /// Severity of a match.
    severity: Severity,
}

/// A policy's compiled rules. Cheap to clone, `Send + Sync`; empty by default.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    /// The rules in the order written.
    rules: Arc<[Rule]>,
}

impl RuleSet {
    /// Compiles `specs`, checking every bound; errors name the rule.
    pub fn compile(specs: &[RuleSpec]) -> Result<RuleSet, RuleError> {
        if specs.len() > MAX_RULES {
            return Err(RuleError::TooMany { count: specs.len() });
        }
        let mut rules = Vec::with_capacity(specs.len());
        for (index, spec) in specs.iter().enumerate() {
            let invalid = |reason: String| RuleError::Invalid {
                index,
                pattern: spec.pattern.chars().take(80).collect(),
                reason,
            };
            rules.push(compile_one(spec).map_err(invalid)?);
        }
        Ok(RuleSet {
            rules: rules.into(),
        })
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Appends every rule hit in `text` to `out`: `term` is the rule's pattern, `category` its
    /// taxonomy label, offsets point into `text` (bytes and chars). At most
    /// [`MAX_MATCHES_PER_RULE`] per rule; empty matches are skipped.
    pub fn scan_into(&self, text: &str, out: &mut Vec<Match>) {
        if self.rules.is_empty() || text.is_empty() {
            return;
        }
        // Byte → char offsets, computed once and only when something matched.
        let mut char_starts: Option<Vec<usize>> = None;
        for rule in self.rules.iter() {
            for m in rule
                .regex
                .find_iter(text)
                .filter(|m| !m.is_empty())
                .take(MAX_MATCHES_PER_RULE)
            {
                let starts = char_starts
                    .get_or_insert_with(|| text.char_indices().map(|(i, _)| i).collect());
                let char_at = |byte: usize| starts.partition_point(|&b| b < byte);
                out.push(Match {
                    term: rule.term.clone(),
                    category: rule.label.clone(),
                    sub: rule.sub.clone(),
                    severity: rule.severity,
                    start: m.start(),
                    end: m.end(),
                    start_char: char_at(m.start()),
                    end_char: char_at(m.end()),
                });
            }
        }
    }

    /// The rule hits in `text` (see [`RuleSet::scan_into`]).
    pub fn scan(&self, text: &str) -> Vec<Match> {
        let mut out = Vec::new();
        self.scan_into(text, &mut out);
        out
    }
}

fn is_name(s: &str) -> bool {
    s.len() <= 64 && crate::text::lexicon::is_name(s)
}

fn compile_one(spec: &RuleSpec) -> Result<Rule, String> {
    if spec.pattern.is_empty() {
        return Err("empty pattern".into());
    }
    if spec.pattern.len() > MAX_PATTERN_BYTES {
        return Err(format!(
            "pattern is {} bytes; at most {MAX_PATTERN_BYTES} are allowed",
            spec.pattern.len()
        ));
    }
    let label = crate::policy::find_label(&spec.label)?;
    if let Some(sub) = &spec.sub
        && !is_name(sub)
    {
        return Err(format!(
            "bad sub-label {sub:?} (use lowercase letters, digits and `_`)"
        ));
    }
    let (source, case_insensitive) = match spec.kind {
        RuleKind::Regex => (spec.pattern.clone(), false),
        RuleKind::Wildcard => (wildcard_to_regex(&spec.pattern)?, true),
    };
    let regex = RegexBuilder::new(&source)
        .case_insensitive(case_insensitive)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_SIZE_LIMIT)
        .nest_limit(REGEX_NEST_LIMIT)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(limit) => format!(
                "compiled regex exceeds the size limit ({limit} bytes); simplify it \
                 (large counted repetitions such as `{{1000}}` are the usual cause)"
            ),
            other => format!("invalid regex: {other}"),
        })?;
    if regex.is_match("") {
        return Err("pattern matches the empty text (it would match every message)".into());
    }
    Ok(Rule {
        regex,
        term: Arc::from(spec.pattern.as_str()),
        label: Arc::from(label),
        sub: spec.sub.as_deref().map(Arc::from),
        severity: spec.severity,
    })
}

/// `*` → `.*?` (lazy, so a match is as short as the pattern allows), `?` → `.`, the rest
/// escaped. Leading and trailing `*` are dropped: the pattern matches anywhere anyway.
fn wildcard_to_regex(pattern: &str) -> Result<String, String> {
    let trimmed = pattern.trim_matches('*');
    if trimmed.is_empty() {
        return Err("wildcard has no literal characters".into());
    }
    let mut out = String::with_capacity(trimmed.len() * 2 + 4);
    out.push_str("(?s)");
    let mut buf = [0u8; 4];
    let mut last_star = false;
    for c in trimmed.chars() {
        match c {
            '*' if last_star => continue,
            '*' => out.push_str(".*?"),
            '?' => out.push('.'),
            c => out.push_str(&regex::escape(c.encode_utf8(&mut buf))),
        }
        last_star = c == '*';
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pattern: &str, kind: RuleKind) -> RuleSpec {
        RuleSpec {
            pattern: pattern.into(),
            kind,
            label: "scam".into(),
            sub: None,
            severity: Severity::High,
        }
    }

    #[test]
    fn wildcard_matches_anywhere_case_insensitively() {
        let rules = RuleSet::compile(&[spec("*BIT.LY/*", RuleKind::Wildcard)]).expect("valid");
        let ms = rules.scan("go to bit.ly/x now");
        assert_eq!(ms.len(), 1, "{ms:?}");
        assert_eq!(&"go to bit.ly/x now"[ms[0].start..ms[0].end], "bit.ly/");
        assert!(rules.scan("bitxly/").is_empty(), "`.` is literal");
        let q = RuleSet::compile(&[spec("fr?e gift", RuleKind::Wildcard)]).expect("valid");
        assert_eq!(q.scan("a FREE GIFT").len(), 1);
    }

    #[test]
    fn offsets_are_bytes_and_chars_into_the_original() {
        let rules = RuleSet::compile(&[spec(r"(?i)wire \$\d+", RuleKind::Regex)]).expect("valid");
        let text = "héllo 你好 WIRE $500 now";
        let ms = rules.scan(text);
        assert_eq!(ms.len(), 1);
        let m = &ms[0];
        assert_eq!(&text[m.start..m.end], "WIRE $500");
        let chars: Vec<char> = text.chars().collect();
        let s: String = chars[m.start_char..m.end_char].iter().collect();
        assert_eq!(s, "WIRE $500");
        assert_eq!(&*m.category, "scam");
    }
}
