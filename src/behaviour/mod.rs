//! # Sender behaviour
//!
//! Takes, per message, the sender (tenant + user) before moderation and the moderator's outcome
//! after it; gives back whether the sender is flooding, the sender's risk and sanction state, and
//! a [`Sanction`] event when the state escalates. Called by the moderator (`precheck` before the
//! stages, `record` after the policy decided) and by the server (maintenance task, admin reads).
//!
//! - [`tracker`]: the [`Tracker`] handle — the public API.
//! - `state`: one user's compact record and the escalation rules (pure logic, shared by every
//!   store backend).
//! - `store`: the in-memory backend — a sharded map with a hard size bound, which is also the
//!   governor state store for the flood limit; keys are a keyed 64-bit hash of tenant + user.
//!
//! ## Rules
//! - **Flood**: governor's GCRA, `flood_per_second` with bursts of `flood_burst`, per user.
//! - **Abuse score**: every `review`/`block` outcome adds `review_weight`/`block_weight` times its
//!   severity (0..1); the score halves every `half_life_secs` and is capped at `2 * block_at`
//!   so that recovery time stays bounded.
//! - **Escalation**: a violation that leaves the score at or above `throttle_at` / `mute_at` /
//!   `block_at` imposes that sanction for `throttle_secs` / `mute_secs` / `block_secs`. A
//!   qualifying violation while a sanction is active, or within `cooldown_secs` after it ended,
//!   goes one step beyond the last sanction (throttle → mute → block). A sanction is only ever
//!   replaced by a harsher one; when it expires the state is `ok` again.
//! - **Memory**: at most `max_tracked_users` users (enforced per shard). A user idle for
//!   `idle_evict_secs` with no active sanction or cool-down is dropped by [`Tracker::maintain`].
//!   When a shard is full and a new user arrives, the shard first drops its idle users, then its
//!   least-recently-active users without a sanction or cool-down (down to 7/8 full). Users under
//!   a sanction or cool-down are never evicted: if a shard holds nothing else, new users there
//!   are served untracked (never flooded, risk 0) — except that a new user who earns a sanction
//!   is always stored, so the bound can be exceeded only by sanctioned users.
//! - **Time**: decay and expiry use `tokio::time::Instant` in whole seconds since the tracker
//!   started (a sanction never ends early; it may outlast its reported `until` by under a
//!   second). `until` values are unix milliseconds from the system clock.
//!
//! ## Extending
//! A Redis backend applies the same `state::UserState::record` rules to a fetched record (or
//! ports them to Lua) and keeps the public [`Tracker`] API; snapshots of the memory store must
//! save the `store::KeyHasher` key with the records and rebase ticks onto unix time. Harassment
//! (sender → target) and room alarms are further keyed maps in the same shape.

mod state;
mod store;
pub mod tracker;

pub use tracker::Tracker;

use serde::{Deserialize, Serialize};

/// Longest sanction, cool-down or idle time accepted, in seconds (ten years): keeps every
/// deadline inside the tracker's 32-bit second counter.
const MAX_DURATION_SECS: u64 = 10 * 365 * 24 * 3600;

/// `[behaviour]`: flood limit, abuse score and sanction escalation.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BehaviourConfig {
    /// Sustained messages per second one user may send before `precheck` reports a flood.
    pub flood_per_second: u32,
    /// Messages one user may send at once (the bucket size) on top of the sustained rate.
    pub flood_burst: u32,
    /// Seconds for the abuse score to decay to half.
    pub half_life_secs: f64,
    /// Score added by a `review` outcome of severity 1.0 (scaled by the severity factor).
    pub review_weight: f32,
    /// Score added by a `block` outcome of severity 1.0; must exceed `review_weight`.
    pub block_weight: f32,
    /// Score at which a violation throttles the sender.
    pub throttle_at: f32,
    /// Score at which a violation mutes the sender; above `throttle_at`.
    pub mute_at: f32,
    /// Score at which a violation blocks the sender; above `mute_at`. Risk is `score / block_at`.
    pub block_at: f32,
    /// How long a throttle lasts, in seconds.
    pub throttle_secs: u64,
    /// How long a mute lasts, in seconds; at least `throttle_secs`.
    pub mute_secs: u64,
    /// How long a block lasts, in seconds; at least `mute_secs`.
    pub block_secs: u64,
    /// Seconds after a sanction ends during which a new violation escalates one step further.
    pub cooldown_secs: u64,
    /// Most users tracked at once (each costs about 60–100 bytes).
    pub max_tracked_users: usize,
    /// Seconds without a message after which a user with no sanction or cool-down is dropped.
    pub idle_evict_secs: u64,
    /// Seconds between maintenance runs (idle eviction, shrinking the maps).
    pub maintenance_interval_secs: u64,
}

impl Default for BehaviourConfig {
    fn default() -> Self {
        BehaviourConfig {
            flood_per_second: 10,
            flood_burst: 20,
            half_life_secs: 600.0,
            review_weight: 0.5,
            block_weight: 2.0,
            throttle_at: 4.0,
            mute_at: 8.0,
            block_at: 16.0,
            throttle_secs: 60,
            mute_secs: 900,
            block_secs: 86_400,
            cooldown_secs: 1_800,
            max_tracked_users: 1_000_000,
            idle_evict_secs: 3_600,
            maintenance_interval_secs: 60,
        }
    }
}

impl BehaviourConfig {
    /// Checks ranges and consistency; the message names the setting to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.flood_per_second == 0 {
            return Err("flood_per_second must be at least 1".into());
        }
        if self.flood_burst == 0 {
            return Err("flood_burst must be at least 1".into());
        }
        if !(self.half_life_secs.is_finite() && self.half_life_secs > 0.0) {
            return Err(format!(
                "half_life_secs must be a positive number of seconds, not {}",
                self.half_life_secs
            ));
        }
        if !(self.review_weight.is_finite() && self.review_weight >= 0.0) {
            return Err(format!(
                "review_weight must be zero or positive, not {}",
                self.review_weight
            ));
        }
        if !(self.block_weight.is_finite() && self.block_weight > self.review_weight) {
            return Err(format!(
                "block_weight ({}) must be greater than review_weight ({})",
                self.block_weight, self.review_weight
            ));
        }
        let thresholds = [self.throttle_at, self.mute_at, self.block_at];
        if thresholds.iter().any(|t| !t.is_finite()) || self.throttle_at <= 0.0 {
            return Err(format!(
                "throttle_at, mute_at, block_at must be positive numbers, not {thresholds:?}"
            ));
        }
        if !(self.throttle_at < self.mute_at && self.mute_at < self.block_at) {
            return Err(format!(
                "thresholds must increase: throttle_at ({}) < mute_at ({}) < block_at ({})",
                self.throttle_at, self.mute_at, self.block_at
            ));
        }
        if self.throttle_secs == 0 {
            return Err("throttle_secs must be at least 1".into());
        }
        if !(self.throttle_secs <= self.mute_secs && self.mute_secs <= self.block_secs) {
            return Err(format!(
                "durations must not decrease: throttle_secs ({}) <= mute_secs ({}) <= block_secs ({})",
                self.throttle_secs, self.mute_secs, self.block_secs
            ));
        }
        for (name, secs) in [
            ("block_secs", self.block_secs),
            ("cooldown_secs", self.cooldown_secs),
            ("idle_evict_secs", self.idle_evict_secs),
            ("maintenance_interval_secs", self.maintenance_interval_secs),
        ] {
            if secs > MAX_DURATION_SECS {
                return Err(format!(
                    "{name} must be at most {MAX_DURATION_SECS} seconds"
                ));
            }
        }
        if self.max_tracked_users == 0 {
            return Err("max_tracked_users must be at least 1".into());
        }
        // Forgetting a user sooner than its flood bucket refills would hand it a fresh burst.
        let refill_secs = u64::from(self.flood_burst).div_ceil(u64::from(self.flood_per_second));
        if self.idle_evict_secs < refill_secs.max(1) {
            return Err(format!(
                "idle_evict_secs must be at least {} (flood_burst / flood_per_second)",
                refill_secs.max(1)
            ));
        }
        if self.maintenance_interval_secs == 0 {
            return Err("maintenance_interval_secs must be at least 1".into());
        }
        Ok(())
    }
}

/// A sender's sanction, mildest first (the order is the escalation order).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SanctionState {
    /// No sanction.
    #[default]
    Ok,
    /// The IM server should slow the sender down.
    Throttle,
    /// The IM server should drop the sender's messages.
    Mute,
    /// The IM server should ban the sender.
    Block,
}

impl SanctionState {
    /// The next harsher sanction; `Block` stays `Block`.
    pub fn next(self) -> SanctionState {
        match self {
            SanctionState::Ok => SanctionState::Throttle,
            SanctionState::Throttle => SanctionState::Mute,
            SanctionState::Mute | SanctionState::Block => SanctionState::Block,
        }
    }
}

/// The sender as the verdict reports it (`"sender"` on the wire).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SenderInfo {
    /// Abuse score relative to `block_at`, clamped to 0..=1.
    pub risk: f32,
    /// The sanction in force now.
    pub state: SanctionState,
    /// When the sanction in force ends, unix milliseconds; absent when `state` is `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

impl SenderInfo {
    /// A sender with no history.
    pub const CLEAN: SenderInfo = SenderInfo {
        risk: 0.0,
        state: SanctionState::Ok,
        until: None,
    };
}

/// A sanction event, pushed to the tenant's connections (`"type":"sanction"` on the wire).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sanction {
    /// The sanctioned user, as the IM server named it.
    pub user: String,
    /// The new sanction.
    pub action: SanctionState,
    /// When it ends, unix milliseconds (system clock at the sanction + its duration).
    pub until: u64,
    /// Why: `abuse_rate` (the score crossed the threshold) or `repeat_offence` (a violation
    /// during a sanction or its cool-down pushed it one step further).
    pub reason: String,
}

/// What [`Tracker::precheck`] found before moderation.
#[derive(Debug, Clone, PartialEq)]
pub struct Precheck {
    /// The sender is over the flood limit; this message was counted.
    pub flooded: bool,
    /// The sender's risk and sanction state.
    pub sender: SenderInfo,
}

/// What the moderator tells the tracker after deciding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Nothing wrong.
    Allow,
    /// Held for review; `severity` is a factor in 0..=1 (e.g. high 1.0, medium 0.6, low 0.3).
    Review {
        /// Severity factor 0..=1; out-of-range values are clamped and NaN counts as 1.0.
        severity: f32,
    },
    /// Blocked; `severity` as for `Review`.
    Block {
        /// Severity factor 0..=1; out-of-range values are clamped and NaN counts as 1.0.
        severity: f32,
    },
}
