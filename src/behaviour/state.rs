//! One user's behaviour record and the rules that move it.
//!
//! Takes a [`UserState`], the current time as a [`Now`] and an [`Outcome`] (or a text
//! fingerprint); gives back the updated state and an [`Escalation`] when a sanction is imposed.
//! Pure logic with no locking or clock reads, called by the tracker under the store's per-shard
//! lock and by the Redis backend on the shared record ([`SavedUser`]), so that every backend
//! applies the same rules.

use super::{BehaviourConfig, MAX_DURATION_SECS, Outcome, SanctionState};

/// Whole unix seconds (on the tracker's clock; fits until 2106).
pub(crate) type Tick = u32;

/// One reading of the tracker clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Now {
    /// Whole seconds, rounded down: what decay and expiry compare against.
    pub(crate) tick: Tick,
    /// Whole seconds, rounded up: where a new sanction starts, so it never ends early.
    pub(crate) tick_ceil: Tick,
    /// Unix milliseconds.
    pub(crate) unix_ms: u64,
}

impl Now {
    /// The reading at `unix_ms`.
    pub(crate) fn from_unix_ms(unix_ms: u64) -> Now {
        let clamp = |secs: u64| Tick::try_from(secs).unwrap_or(Tick::MAX);
        Now {
            tick: clamp(unix_ms / 1000),
            tick_ceil: clamp(unix_ms.div_ceil(1000)),
            unix_ms,
        }
    }
}

/// The configuration in the units the rules work in.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// `1 / half_life_secs`: the score is multiplied by `2^(-elapsed * this)`.
    pub(crate) decay_per_sec: f32,
    /// Score per unit of severity of a `review`.
    pub(crate) review_weight: f32,
    /// Score per unit of severity of a `block`.
    pub(crate) block_weight: f32,
    /// Score at which a violation throttles.
    pub(crate) throttle_at: f32,
    /// Score at which a violation mutes; above `throttle_at`.
    pub(crate) mute_at: f32,
    /// Score at which a violation blocks; above `mute_at`, and the score of risk 1.0.
    pub(crate) block_at: f32,
    /// The score never exceeds this, so that recovery takes a bounded number of half-lives.
    pub(crate) score_cap: f32,
    /// Length of a throttle in seconds.
    pub(crate) throttle_secs: Tick,
    /// Length of a mute in seconds.
    pub(crate) mute_secs: Tick,
    /// Length of a block in seconds.
    pub(crate) block_secs: Tick,
    /// Seconds after a sanction ends during which it still counts for escalation.
    pub(crate) cooldown_secs: Tick,
    /// Seconds without activity after which an unsanctioned user may be dropped.
    pub(crate) idle_secs: Tick,
    /// A text is a copy only within this many seconds of the sender's previous text.
    pub(crate) dup_window_secs: Tick,
    /// The copy number from which a repeated text is spam (2..=255).
    pub(crate) dup_copies: u8,
    /// Sketch bytes (of 8) two texts must agree in to be the same text.
    pub(crate) near_dup_min_bytes: u32,
}

impl Policy {
    /// Converts a configuration; out-of-range values (which `validate` rejects) are clamped so
    /// that nothing here can panic or produce NaN.
    pub(crate) fn new(cfg: &BehaviourConfig) -> Policy {
        let secs = |s: u64| Tick::try_from(s.min(MAX_DURATION_SECS)).unwrap_or(Tick::MAX);
        let finite = |x: f32, fallback: f32| if x.is_finite() { x } else { fallback };
        let half_life = if cfg.half_life_secs.is_finite() && cfg.half_life_secs > 0.0 {
            cfg.half_life_secs
        } else {
            BehaviourConfig::default().half_life_secs
        };
        let block_at = finite(cfg.block_at, f32::MAX / 4.0).max(f32::MIN_POSITIVE);
        Policy {
            decay_per_sec: (1.0 / half_life) as f32,
            review_weight: finite(cfg.review_weight, 0.0).max(0.0),
            block_weight: finite(cfg.block_weight, 0.0).max(0.0),
            throttle_at: finite(cfg.throttle_at, f32::MAX),
            mute_at: finite(cfg.mute_at, f32::MAX),
            block_at,
            score_cap: 2.0 * block_at,
            throttle_secs: secs(cfg.throttle_secs),
            mute_secs: secs(cfg.mute_secs),
            block_secs: secs(cfg.block_secs),
            cooldown_secs: secs(cfg.cooldown_secs),
            idle_secs: secs(cfg.idle_evict_secs),
            dup_window_secs: secs(cfg.dup_window_secs),
            dup_copies: u8::try_from(cfg.dup_copies.clamp(2, 255)).unwrap_or(u8::MAX),
            near_dup_min_bytes: {
                let share = if cfg.near_dup_similarity.is_finite() {
                    cfg.near_dup_similarity.clamp(0.25, 1.0)
                } else {
                    1.0
                };
                (share * 8.0).ceil() as u32
            },
        }
    }

    /// The harshest sanction whose threshold `score` reaches.
    fn level_for(&self, score: f32) -> SanctionState {
        if score >= self.block_at {
            SanctionState::Block
        } else if score >= self.mute_at {
            SanctionState::Mute
        } else if score >= self.throttle_at {
            SanctionState::Throttle
        } else {
            SanctionState::Ok
        }
    }

    /// How long `level` lasts, in seconds.
    pub(crate) fn duration_secs(&self, level: SanctionState) -> Tick {
        match level {
            SanctionState::Ok => 0,
            SanctionState::Throttle => self.throttle_secs,
            SanctionState::Mute => self.mute_secs,
            SanctionState::Block => self.block_secs,
        }
    }

    /// Risk in 0..=1 for a score.
    pub(crate) fn risk(&self, score: f32) -> f32 {
        (score / self.block_at).clamp(0.0, 1.0)
    }
}

/// A sanction just imposed by [`UserState::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Escalation {
    /// The new sanction.
    pub(crate) action: SanctionState,
    /// Its length in seconds.
    pub(crate) duration_secs: Tick,
    /// `abuse_rate` or `repeat_offence`.
    pub(crate) reason: &'static str,
}

/// One user's record: 48 bytes. Times are [`Tick`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct UserState {
    /// The flood limiter's theoretical arrival time (governor GCRA, nanoseconds from the
    /// limiter's start); 0 for a user the limiter has not seen.
    pub(crate) tat_nanos: u64,
    /// Abuse score as of `seen` (decay is applied lazily whenever the record is touched).
    pub(crate) score: f32,
    /// Last precheck or record: drives idle eviction and the lazy decay.
    pub(crate) seen: Tick,
    /// End of the last sanction: it is in force while `now < until`.
    pub(crate) until: Tick,
    /// The last sanction imposed; it counts for escalation until `until + cooldown_secs`.
    pub(crate) level: SanctionState,
    /// Copies of the sender's recent texts sent since `print_at - dup_window_secs` (beyond the
    /// first of each).
    pub(crate) copies: u8,
    /// When the sender last sent a fingerprinted text.
    pub(crate) print_at: Tick,
    /// Sketches of the sender's last two distinct texts, newest first; 0 is an empty slot.
    pub(crate) prints: [u64; 2],
}

/// The part of a record that outlives the process: what the snapshot, the journal and Redis
/// keep. The flood bucket and recent texts are not kept.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct SavedUser {
    /// Abuse score as of `seen`.
    pub(crate) score: f32,
    /// When the score was last updated.
    pub(crate) seen: Tick,
    /// End of the last sanction.
    pub(crate) until: Tick,
    /// The last sanction imposed.
    pub(crate) level: SanctionState,
}

impl SavedUser {
    /// A record with this saved part (and a fresh flood bucket and text history).
    pub(crate) fn to_state(self) -> UserState {
        UserState {
            score: self.score,
            seen: self.seen,
            until: self.until,
            level: self.level,
            ..UserState::default()
        }
    }

    /// Unix milliseconds until which this record must be kept: its sanction's cool-down, or
    /// `idle_secs` after its last activity.
    pub(crate) fn keep_until_ms(&self, policy: &Policy) -> u64 {
        let protected = if self.level == SanctionState::Ok {
            0
        } else {
            u64::from(self.until) + u64::from(policy.cooldown_secs)
        };
        let idle = u64::from(self.seen) + u64::from(policy.idle_secs);
        protected.max(idle) * 1000
    }

    /// Compact text form used as the Redis value: `score seen until level`.
    pub(crate) fn encode(&self) -> String {
        format!(
            "{} {} {} {}",
            self.score,
            self.seen,
            self.until,
            self.level.to_u8()
        )
    }

    /// Inverse of [`SavedUser::encode`]; `None` for anything malformed.
    pub(crate) fn decode(s: &str) -> Option<SavedUser> {
        let mut it = s.split(' ');
        let score: f32 = it.next()?.parse().ok()?;
        let seen = it.next()?.parse().ok()?;
        let until = it.next()?.parse().ok()?;
        let level = SanctionState::from_u8(it.next()?.parse().ok()?)?;
        if it.next().is_some() || !score.is_finite() || score < 0.0 {
            return None;
        }
        Some(SavedUser {
            score,
            seen,
            until,
            level,
        })
    }
}

impl UserState {
    /// A user first seen at `now`.
    pub(crate) fn new(now: Tick) -> UserState {
        UserState {
            seen: now,
            ..UserState::default()
        }
    }

    /// The score decayed to `now`.
    pub(crate) fn score_at(&self, now: Tick, policy: &Policy) -> f32 {
        let elapsed = now.saturating_sub(self.seen);
        if elapsed == 0 || self.score == 0.0 {
            return self.score;
        }
        self.score * (-(elapsed as f32) * policy.decay_per_sec).exp2()
    }

    /// Marks activity at `now`, folding the decay since the last touch into the score.
    pub(crate) fn touch(&mut self, now: Tick, policy: &Policy) {
        if now > self.seen {
            self.score = self.score_at(now, policy);
            self.seen = now;
        }
    }

    /// The sanction in force at `now`.
    pub(crate) fn active(&self, now: Tick) -> SanctionState {
        if now < self.until {
            self.level
        } else {
            SanctionState::Ok
        }
    }

    /// A sanction is in force or still within its cool-down: the record must not be dropped.
    pub(crate) fn protected(&self, now: Tick, policy: &Policy) -> bool {
        self.level != SanctionState::Ok && now < self.until.saturating_add(policy.cooldown_secs)
    }

    /// No activity for `idle_secs` and nothing to protect: safe to drop.
    pub(crate) fn evictable_idle(&self, now: Tick, policy: &Policy) -> bool {
        now.saturating_sub(self.seen) >= policy.idle_secs && !self.protected(now, policy)
    }

    /// The part that outlives the process.
    pub(crate) fn saved(&self) -> SavedUser {
        SavedUser {
            score: self.score,
            seen: self.seen,
            until: self.until,
            level: self.level,
        }
    }

    /// Folds in `other`, a view of the same user from elsewhere (another sidecar, a snapshot):
    /// the higher decayed score and the harsher sanction (the one in force at `now`, then the
    /// later end) win. Returns whether the sanction in force changed.
    pub(crate) fn merge(&mut self, other: &SavedUser, now: Tick, policy: &Policy) -> bool {
        let before = (self.active(now), self.until);
        self.touch(now, policy);
        let other_score = other.to_state().score_at(now, policy);
        self.score = self.score.max(other_score).min(policy.score_cap);
        let theirs = other.to_state();
        if (theirs.active(now), theirs.level, theirs.until)
            > (self.active(now), self.level, self.until)
        {
            self.level = other.level;
            self.until = other.until;
        }
        (self.active(now), self.until) != before
    }

    /// Replaces the saved part with `saved` (a sanction set or lifted by hand).
    pub(crate) fn overwrite(&mut self, saved: &SavedUser) {
        self.score = saved.score;
        self.seen = saved.seen;
        self.until = saved.until;
        self.level = saved.level;
    }

    /// Sets the sanction by hand at `now`: `Ok` lifts any sanction, clears the cool-down and the
    /// score; anything else is imposed for `duration_secs` from `now` whatever was in force.
    pub(crate) fn set_by_hand(
        &mut self,
        now: Now,
        action: SanctionState,
        duration_secs: Tick,
        policy: &Policy,
    ) {
        self.touch(now.tick, policy);
        if action == SanctionState::Ok {
            self.score = 0.0;
            self.level = SanctionState::Ok;
            self.until = now.tick;
        } else {
            self.level = action;
            self.until = now.tick_ceil.saturating_add(duration_secs);
        }
    }

    /// Notes a fingerprinted text at `now`; true when it is duplicate spam (the
    /// `dup_copies`-th near-copy of one of the sender's last two distinct texts, each within
    /// `dup_window_secs` of the text before).
    pub(crate) fn note_text(&mut self, now: Tick, sketch: u64, policy: &Policy) -> bool {
        let sketch = sketch.max(1);
        if now.saturating_sub(self.print_at) > policy.dup_window_secs {
            self.prints = [0, 0];
            self.copies = 0;
        }
        self.print_at = now;
        let near = |p: u64| p != 0 && same_bytes(p, sketch) >= policy.near_dup_min_bytes;
        if self.prints.iter().any(|&p| near(p)) {
            self.copies = self.copies.saturating_add(1);
            self.copies.saturating_add(1) >= policy.dup_copies
        } else {
            self.prints = [sketch, self.prints[0]];
            false
        }
    }

    /// Applies the moderator's outcome at `now`; returns the sanction imposed, if any.
    pub(crate) fn record(
        &mut self,
        now: Now,
        outcome: Outcome,
        policy: &Policy,
    ) -> Option<Escalation> {
        self.touch(now.tick, policy);
        let added = match outcome {
            Outcome::Allow => return None,
            Outcome::Review { severity } => policy.review_weight * severity_factor(severity),
            Outcome::Block { severity } => policy.block_weight * severity_factor(severity),
        };
        if added <= 0.0 {
            return None;
        }
        self.score = (self.score + added).min(policy.score_cap);
        let by_score = policy.level_for(self.score);
        if by_score == SanctionState::Ok {
            return None;
        }
        let by_repeat = if self.protected(now.tick, policy) {
            self.level.next()
        } else {
            SanctionState::Ok
        };
        let action = by_score.max(by_repeat);
        if action <= self.active(now.tick) {
            return None;
        }
        let duration_secs = policy.duration_secs(action);
        self.level = action;
        self.until = now.tick_ceil.saturating_add(duration_secs);
        Some(Escalation {
            action,
            duration_secs,
            reason: if by_score >= action {
                "abuse_rate"
            } else {
                "repeat_offence"
            },
        })
    }
}

/// How many of the 8 bytes of `a` and `b` are equal.
pub(crate) fn same_bytes(a: u64, b: u64) -> u32 {
    let x = a ^ b;
    (0..8).filter(|i| (x >> (8 * i)) & 0xff == 0).count() as u32
}

/// Severity as a factor in 0..=1; NaN counts as the worst.
fn severity_factor(severity: f32) -> f32 {
    if severity.is_nan() {
        1.0
    } else {
        severity.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::new(&BehaviourConfig::default())
    }

    fn at(secs: u64) -> Now {
        Now::from_unix_ms(secs * 1000)
    }

    #[test]
    fn user_state_is_compact() {
        assert_eq!(std::mem::size_of::<UserState>(), 48);
    }

    #[test]
    fn now_rounds_both_ways() {
        let n = Now::from_unix_ms(1_001);
        assert_eq!((n.tick, n.tick_ceil), (1, 2));
        let n = Now::from_unix_ms(2_000);
        assert_eq!((n.tick, n.tick_ceil), (2, 2));
    }

    #[test]
    fn saved_user_round_trips_and_rejects_garbage() {
        let saved = SavedUser {
            score: 3.25,
            seen: 1_700_000_000,
            until: 1_700_000_060,
            level: SanctionState::Mute,
        };
        assert_eq!(SavedUser::decode(&saved.encode()), Some(saved));
        for bad in [
            "",
            "1 2 3",
            "1 2 3 9",
            "x 2 3 1",
            "-1 2 3 1",
            "NaN 2 3 1",
            "1 2 3 1 5",
        ] {
            assert_eq!(SavedUser::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn merge_keeps_the_harsher_sanction_and_the_higher_score() {
        let p = policy();
        let mut local = UserState::new(100);
        local.record(at(100), Outcome::Block { severity: 1.0 }, &p);
        let remote = SavedUser {
            score: 20.0,
            seen: 100,
            until: 100 + 900,
            level: SanctionState::Mute,
        };
        assert!(local.merge(&remote, 100, &p));
        assert_eq!(
            (local.level, local.until, local.score),
            (SanctionState::Mute, 1000, 20.0)
        );
        // A milder view changes nothing.
        let milder = SavedUser {
            score: 1.0,
            seen: 100,
            until: 160,
            level: SanctionState::Throttle,
        };
        assert!(!local.merge(&milder, 100, &p));
        assert_eq!(local.level, SanctionState::Mute);
    }

    #[test]
    fn near_copies_count_until_the_window_passes() {
        let p = policy();
        let mut s = UserState::new(0);
        let text = 0xdead_beef_u64;
        assert!(!s.note_text(0, text, &p));
        assert!(
            !s.note_text(1, text ^ 0xff00, &p),
            "7 of 8 bytes equal is a copy, the 2nd"
        );
        assert!(s.note_text(2, text, &p), "the 3rd copy is spam");
        // Another text in between does not reset the count.
        assert!(!s.note_text(3, !text, &p), "a new text is not a copy");
        assert!(s.note_text(4, text, &p));
        // A quiet window resets it.
        assert!(!s.note_text(4 + p.dup_window_secs + 1, text, &p));
    }

    #[test]
    fn severity_is_clamped_and_nan_is_worst() {
        let cases = [
            (0.5, 0.5),
            (-1.0, 0.0),
            (7.0, 1.0),
            (f32::NAN, 1.0),
            (f32::INFINITY, 1.0),
        ];
        for (input, want) in cases {
            assert_eq!(severity_factor(input), want, "severity {input}");
        }
    }

    #[test]
    fn review_adds_less_than_block_and_allow_nothing() {
        let p = policy();
        let mut review = UserState::new(0);
        let mut block = UserState::new(0);
        let mut allow = UserState::new(0);
        review.record(at(0), Outcome::Review { severity: 1.0 }, &p);
        block.record(at(0), Outcome::Block { severity: 1.0 }, &p);
        allow.record(at(0), Outcome::Allow, &p);
        assert!(block.score > review.score && review.score > 0.0);
        assert_eq!(allow.score, 0.0);
    }

    #[test]
    fn score_is_capped() {
        let p = policy();
        let mut s = UserState::new(0);
        for _ in 0..1000 {
            s.record(at(0), Outcome::Block { severity: 1.0 }, &p);
        }
        assert_eq!(s.score, p.score_cap);
        assert_eq!(s.level, SanctionState::Block);
    }
}
