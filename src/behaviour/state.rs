//! One user's behaviour record and the rules that move it.
//!
//! Takes a [`UserState`], the current time as a [`Now`] and an [`Outcome`]; gives back the
//! updated state and an [`Escalation`] when a sanction is imposed. Pure logic with no locking or
//! clock reads, called by the tracker under the store's per-shard lock, so that every store
//! backend (memory now, Redis later) applies the same rules.

use super::{BehaviourConfig, MAX_DURATION_SECS, Outcome, SanctionState};

/// Whole seconds since the tracker started (136 years fit).
pub(crate) type Tick = u32;

/// One reading of the tracker clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Now {
    /// Whole seconds elapsed, rounded down: what decay and expiry compare against.
    pub(crate) tick: Tick,
    /// Whole seconds elapsed, rounded up: where a new sanction starts, so it never ends early.
    pub(crate) tick_ceil: Tick,
    /// Milliseconds elapsed: to turn a stored deadline back into unix milliseconds.
    pub(crate) elapsed_ms: u64,
}

impl Now {
    /// The reading at `elapsed_ms` milliseconds after the tracker started.
    pub(crate) fn from_elapsed_ms(elapsed_ms: u64) -> Now {
        let clamp = |secs: u64| Tick::try_from(secs).unwrap_or(Tick::MAX);
        Now {
            tick: clamp(elapsed_ms / 1000),
            tick_ceil: clamp(elapsed_ms.div_ceil(1000)),
            elapsed_ms,
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

/// One user's record: 24 bytes. Times are [`Tick`]s.
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
        Now::from_elapsed_ms(secs * 1000)
    }

    #[test]
    fn user_state_is_compact() {
        assert_eq!(std::mem::size_of::<UserState>(), 24);
    }

    #[test]
    fn now_rounds_both_ways() {
        let n = Now::from_elapsed_ms(1_001);
        assert_eq!((n.tick, n.tick_ceil), (1, 2));
        let n = Now::from_elapsed_ms(2_000);
        assert_eq!((n.tick, n.tick_ceil), (2, 2));
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
