//! # Sender behaviour
//!
//! Takes, per message, the sender (tenant + user), the room, the target user, a fingerprint of
//! the folded text before moderation, and the moderator's outcome after it; gives back whether
//! the sender is flooding or spamming, whether the message is targeted harassment, the sender's
//! risk and sanction state, a [`Sanction`] event when the state escalates and a [`RoomAlarm`]
//! when a room turns bad. Called by the moderator (`precheck` before the stages, `record` after
//! the policy decided, `set_sanction` for the `sanction` request) and by the server (start,
//! maintenance, shutdown).
//!
//! - [`tracker`]: the [`Tracker`] handle — the public API.
//! - `state`: one user's compact record and the escalation rules (pure logic, shared by every
//!   backend: the memory store applies them under a shard lock, the Redis backend to the shared
//!   record it fetched).
//! - `store`: the in-memory store — a sharded map with a hard size bound, which is also the
//!   governor state store for the flood limit; keys are a keyed 64-bit hash of tenant + user.
//! - `signals`: text fingerprints (exact hash + SimHash), and the bounded windowed maps behind
//!   raids (per text), harassment (per sender → target) and room alarms (per room).
//! - `backend`: the [`Backend`](backend::Backend) trait through which changes leave the
//!   process: `persist` (snapshot + fsynced journal on local disk) and `redis` (state shared by
//!   every sidecar through a Redis server).
//!
//! ## Signals
//! - **Flood**: governor's GCRA, `flood_per_second` with bursts of `flood_burst`, per user.
//! - **Duplicate spam**: texts whose folded form has at least `spam_min_chars` bytes get a
//!   64-bit MinHash sketch (8 one-byte minima over the 4-byte shingles of the folded text; the
//!   share of equal bytes estimates the texts' Jaccard similarity — unlike SimHash it still
//!   works for one-line messages). A text whose sketch agrees with one of the sender's last two
//!   distinct texts in at least `near_dup_similarity` of its bytes, sent within
//!   `dup_window_secs` of the sender's previous text, is a copy; the `dup_copies`-th copy and
//!   every later one is spam (`spam/duplicate`).
//! - **Raid**: the same folded text (exact 64-bit hash) from `raid_min_users` different users
//!   within `raid_window_secs`, in one room (or, for messages without a room, anywhere in the
//!   tenant) is a raid; every further copy in the window is spam (`spam/raid`). The default
//!   (25 users a minute) leaves room for a busy room's common greetings.
//! - **Targeted harassment**: flagged messages (outcome `review`/`block`) from one sender to
//!   one target — the `to` user or a user mentioned as `@id` in the text — are counted per
//!   pair; the `harassment_flagged`-th within `harassment_window_secs` and every later one is
//!   harassment: the verdict gets `abuse/harassment` and the outcome counts as a `block` of
//!   severity 1.0 (a sanction it causes has reason `harassment`).
//! - **Abuse score**: every `review`/`block` outcome adds `review_weight`/`block_weight` times
//!   its severity (0..1); the score halves every `half_life_secs` and is capped at
//!   `2 * block_at` so that recovery time stays bounded.
//! - **Escalation**: a violation that leaves the score at or above `throttle_at` / `mute_at` /
//!   `block_at` imposes that sanction for `throttle_secs` / `mute_secs` / `block_secs`. A
//!   qualifying violation while a sanction is active, or within `cooldown_secs` after it ended,
//!   goes one step beyond the last sanction (throttle → mute → block). A sanction is only ever
//!   replaced by a harsher one (or by hand); when it expires the state is `ok` again.
//! - **Rooms**: flagged messages per room over a sliding `room_window_secs`; reaching
//!   `room_alarm_flagged` raises a [`RoomAlarm`], at most one per room per
//!   `room_alarm_cooldown_secs`.
//!
//! ## Memory
//! At most `max_tracked_users` users (enforced per shard), about 100–120 bytes each. A user
//! idle for `idle_evict_secs` with no active sanction or cool-down is dropped by
//! [`Tracker::maintain`]. When a shard is full and a new user arrives, the shard first drops its
//! idle users, then its least-recently-active users without a sanction or cool-down (down to
//! 7/8 full). Users under a sanction or cool-down are never evicted: if a shard holds nothing
//! else, new users there are served untracked (never flooded, risk 0) — except that a new user
//! who earns a sanction is always stored, so the bound can be exceeded only by sanctioned users.
//! Texts, sender → target pairs and rooms live in their own bounded maps
//! (`max_tracked_texts`, `max_tracked_pairs`, `max_tracked_rooms`); an entry whose window has
//! passed is dropped first, and when a map is full of live entries new keys go untracked.
//!
//! ## Time
//! Decay and expiry use `tokio::time::Instant` (tests pause and advance it), counted in whole
//! unix seconds from the system clock reading taken when the tracker started. Sanction deadlines
//! are whole seconds (a sanction never ends early; it starts at the next whole second), so the
//! `until` values on the wire are unix milliseconds that are multiples of 1000, and the same
//! numbers are what the snapshot, the journal and Redis store.
//!
//! ## Backends (`store`)
//! - `memory` (default): the sharded in-memory store. With `snapshot_path` set, every sanction
//!   change (escalation, by hand, from another sidecar) is appended to `<snapshot_path>.journal`
//!   and fsynced by a dedicated thread (group commit; the verdict does not wait for it), and a
//!   snapshot of every record with a sanction, cool-down or non-negligible score is written
//!   every `snapshot_interval_secs` and on shutdown. On start the snapshot and the journal are
//!   replayed, so neither a restart nor a crash unbans anyone (a crash can lose only changes
//!   made in the last few milliseconds, before their fsync).
//! - `redis`: decisions stay local-first (the memory store answers every verdict, so a verdict
//!   never waits for Redis); every violation, sanction by hand and first sight of a user is
//!   queued to a write-behind task which applies the same `state` rules to the shared record in
//!   Redis (optimistic compare-and-set with a Lua script, pipelined), keeps an index of active
//!   sanctions, publishes sanction changes on a pub/sub channel that every sidecar applies
//!   within milliseconds, and pulls the shared record of each new user. While Redis is
//!   unreachable, verdicts carry `degraded: ["shared_state"]`, changes queue up (at most
//!   `redis_max_pending`), and on reconnect the queue is replayed and the active sanctions are
//!   pulled. `snapshot_path` may be set as well for local durability.

pub(crate) mod backend;
mod persist;
mod redis;
mod signals;
mod state;
mod store;
pub mod tracker;

pub use signals::TextPrint;
pub use tracker::{RemoteEvents, Tracker};

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Longest sanction, cool-down, window or idle time accepted, in seconds (ten years): keeps
/// every deadline inside the tracker's 32-bit second counter.
pub const MAX_DURATION_SECS: u64 = 10 * 365 * 24 * 3600;

/// Where behaviour state is kept beyond this process's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// This process only (plus the snapshot and journal when `snapshot_path` is set).
    #[default]
    Memory,
    /// Shared by every sidecar through `redis_url`.
    Redis,
}

/// `[behaviour]`: signals, abuse score, sanction escalation, and where state is kept.
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
    /// Most users tracked at once (each costs about 100–120 bytes).
    pub max_tracked_users: usize,
    /// Seconds without a message after which a user with no sanction or cool-down is dropped.
    pub idle_evict_secs: u64,
    /// Seconds between maintenance runs (idle eviction, expired windows, shrinking the maps).
    pub maintenance_interval_secs: u64,

    /// Shortest folded text, in bytes, that duplicate and raid detection look at.
    pub spam_min_chars: usize,
    /// A text is a copy only if it comes within this many seconds of the sender's previous one.
    pub dup_window_secs: u64,
    /// The copy number (the first send counts as 1) from which a repeated text is spam.
    pub dup_copies: u32,
    /// Share (0..=1) of the 8 sketch bytes two folded texts must agree in to count as the same
    /// text: 1.0 only (near-)exact copies, 0.6 (5 of 8) texts sharing about 3/4 of their
    /// shingles.
    pub near_dup_similarity: f32,
    /// Window, in seconds, in which one text from many users is a raid.
    pub raid_window_secs: u64,
    /// Different users sending the same text to one room (or, without a room, within the
    /// tenant) within `raid_window_secs` that make a raid.
    pub raid_min_users: u32,
    /// Most distinct texts tracked for raids at once.
    pub max_tracked_texts: usize,
    /// Window, in seconds, over which flagged messages to one target are counted.
    pub harassment_window_secs: u64,
    /// Flagged messages from one sender to one target within the window that make harassment.
    pub harassment_flagged: u32,
    /// Most sender → target pairs tracked at once.
    pub max_tracked_pairs: usize,
    /// Window, in seconds, over which a room's flagged messages are counted (sliding).
    pub room_window_secs: u64,
    /// Flagged messages in a room within `room_window_secs` that raise a `room_alarm`.
    pub room_alarm_flagged: u32,
    /// Seconds after an alarm during which the same room raises no other.
    pub room_alarm_cooldown_secs: u64,
    /// Most rooms tracked at once.
    pub max_tracked_rooms: usize,

    /// `memory` (default) or `redis`.
    pub store: StoreKind,
    /// Snapshot file (the journal is this path + `.journal`); unset: nothing is written and a
    /// restart of a `memory` sidecar forgets every sanction.
    pub snapshot_path: Option<PathBuf>,
    /// Seconds between snapshots (the journal covers the time in between).
    pub snapshot_interval_secs: u64,
    /// Redis server for `store = "redis"` (`CHATGUARD_REDIS_URL` overrides).
    pub redis_url: String,
    /// Prefix of every Redis key and of the pub/sub channel; sidecars that share state must use
    /// the same prefix (and the same rules).
    pub redis_key_prefix: String,
    /// Longest wait for one Redis round trip, in milliseconds, before Redis counts as down.
    pub redis_timeout_ms: u64,
    /// Most changes queued for Redis while it is unreachable; older ones are dropped beyond.
    pub redis_max_pending: usize,
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
            spam_min_chars: 10,
            dup_window_secs: 120,
            dup_copies: 3,
            near_dup_similarity: 0.6,
            raid_window_secs: 60,
            raid_min_users: 25,
            max_tracked_texts: 200_000,
            harassment_window_secs: 600,
            harassment_flagged: 3,
            max_tracked_pairs: 200_000,
            room_window_secs: 60,
            room_alarm_flagged: 20,
            room_alarm_cooldown_secs: 300,
            max_tracked_rooms: 100_000,
            store: StoreKind::Memory,
            snapshot_path: None,
            snapshot_interval_secs: 60,
            redis_url: "redis://127.0.0.1:6379/".into(),
            redis_key_prefix: "chatguard".into(),
            redis_timeout_ms: 250,
            redis_max_pending: 100_000,
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
            ("dup_window_secs", self.dup_window_secs),
            ("raid_window_secs", self.raid_window_secs),
            ("harassment_window_secs", self.harassment_window_secs),
            ("room_window_secs", self.room_window_secs),
            ("room_alarm_cooldown_secs", self.room_alarm_cooldown_secs),
            ("snapshot_interval_secs", self.snapshot_interval_secs),
        ] {
            if secs > MAX_DURATION_SECS {
                return Err(format!(
                    "{name} must be at most {MAX_DURATION_SECS} seconds"
                ));
            }
        }
        for (name, secs) in [
            ("dup_window_secs", self.dup_window_secs),
            ("raid_window_secs", self.raid_window_secs),
            ("harassment_window_secs", self.harassment_window_secs),
            ("room_window_secs", self.room_window_secs),
            ("snapshot_interval_secs", self.snapshot_interval_secs),
        ] {
            if secs == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        for (name, n) in [
            ("max_tracked_users", self.max_tracked_users),
            ("max_tracked_texts", self.max_tracked_texts),
            ("max_tracked_pairs", self.max_tracked_pairs),
            ("max_tracked_rooms", self.max_tracked_rooms),
            ("redis_max_pending", self.redis_max_pending),
        ] {
            if n == 0 {
                return Err(format!("{name} must be at least 1"));
            }
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
        if !(2..=255).contains(&self.dup_copies) {
            return Err(format!(
                "dup_copies must be 2..=255 (the copy that is spam), not {}",
                self.dup_copies
            ));
        }
        if !(self.near_dup_similarity >= 0.25 && self.near_dup_similarity <= 1.0) {
            return Err(format!(
                "near_dup_similarity must be 0.25..=1.0 (lower matches unrelated texts), not {}",
                self.near_dup_similarity
            ));
        }
        if self.spam_min_chars == 0 {
            return Err("spam_min_chars must be at least 1".into());
        }
        for (name, n) in [
            ("raid_min_users", self.raid_min_users),
            ("harassment_flagged", self.harassment_flagged),
            ("room_alarm_flagged", self.room_alarm_flagged),
        ] {
            if !(1..=u32::from(u16::MAX)).contains(&n) {
                return Err(format!("{name} must be 1..=65535, not {n}"));
            }
        }
        if self.raid_min_users < 2 {
            return Err("raid_min_users must be at least 2".into());
        }
        if self.store == StoreKind::Redis {
            if !(self.redis_url.starts_with("redis://")
                || self.redis_url.starts_with("redis+unix://")
                || self.redis_url.starts_with("unix://"))
            {
                return Err(format!(
                    "redis_url must start with redis:// (or unix://), not `{}`",
                    self.redis_url
                ));
            }
            if self.redis_timeout_ms == 0 || self.redis_timeout_ms > 60_000 {
                return Err("redis_timeout_ms must be 1..=60000".into());
            }
        }
        if self.redis_key_prefix.is_empty()
            || self.redis_key_prefix.len() > 64
            || self.redis_key_prefix.contains(char::is_whitespace)
        {
            return Err("redis_key_prefix must be 1..=64 bytes without whitespace".into());
        }
        if self
            .snapshot_path
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err("snapshot_path must not be empty (leave it out to disable)".into());
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

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SanctionState::Ok => "ok",
            SanctionState::Throttle => "throttle",
            SanctionState::Mute => "mute",
            SanctionState::Block => "block",
        }
    }

    /// The byte stored in snapshots, the journal and Redis.
    pub(crate) fn to_u8(self) -> u8 {
        self as u8
    }

    /// Inverse of [`SanctionState::to_u8`]; `None` for an unknown byte.
    pub(crate) fn from_u8(b: u8) -> Option<SanctionState> {
        Some(match b {
            0 => SanctionState::Ok,
            1 => SanctionState::Throttle,
            2 => SanctionState::Mute,
            3 => SanctionState::Block,
            _ => return None,
        })
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

/// A sanction event, pushed to the tenant's connections (`"type":"sanction"` on the wire), and
/// the body of the reply to a `sanction` request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sanction {
    /// The sanctioned user, as the IM server named it.
    pub user: String,
    /// The new sanction (`ok` when a sanction was lifted by hand).
    pub action: SanctionState,
    /// When it ends, unix milliseconds (for `ok`: when it was lifted).
    pub until: u64,
    /// Why: `abuse_rate` (the score crossed the threshold), `repeat_offence` (a violation
    /// during a sanction or its cool-down pushed it one step further), `harassment` (the
    /// violation was targeted harassment), or the reason given with a `sanction` request
    /// (`moderator` when none was).
    pub reason: String,
}

/// A room whose rate of flagged messages crossed `room_alarm_flagged` (`"type":"room_alarm"`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoomAlarm {
    /// The room, as the IM server named it.
    pub room: String,
    /// Flagged messages counted over the last `window_secs` (sliding estimate).
    pub flagged: u32,
    /// The window the count covers, in seconds.
    pub window_secs: u64,
    /// The configured threshold (`room_alarm_flagged`).
    pub threshold: u32,
    /// When the alarm was raised, unix milliseconds.
    pub at: u64,
}

/// Spam found by `precheck`, as the verdict's `spam` sub-label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Spam {
    /// The sender repeats (nearly) the same text.
    Duplicate,
    /// Many users send the same text.
    Raid,
}

impl Spam {
    /// The sub-label on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Spam::Duplicate => "duplicate",
            Spam::Raid => "raid",
        }
    }
}

/// What [`Tracker::precheck`] found before moderation.
#[derive(Debug, Clone, PartialEq)]
pub struct Precheck {
    /// The sender is over the flood limit; this message was counted.
    pub flooded: bool,
    /// The text is duplicate spam or part of a raid (duplicate wins when both).
    pub spam: Option<Spam>,
    /// The sender's risk and sanction state.
    pub sender: SenderInfo,
}

/// What [`Tracker::record`] concluded after moderation.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The sender's state after this message.
    pub sender: SenderInfo,
    /// The sanction this message caused, to push to the tenant's connections.
    pub sanction: Option<Sanction>,
    /// The message is targeted harassment (the verdict gets `abuse/harassment`).
    pub harassment: bool,
    /// The room alarm this message raised, to push to the tenant's connections.
    pub room_alarm: Option<RoomAlarm>,
}

/// One message as the tracker sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct MessageFacts<'a> {
    /// The sender's user id.
    pub user: &'a str,
    /// The room the message is posted in.
    pub room: Option<&'a str>,
    /// The target of a direct message.
    pub to: Option<&'a str>,
    /// The original text (mentions `@id` are read from it); may be empty.
    pub text: &'a str,
    /// The folded text's fingerprint ([`Tracker::fingerprint`]); `None` skips duplicate and
    /// raid detection.
    pub print: Option<TextPrint>,
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

impl Outcome {
    /// A `review` or `block`: counts for harassment and room alarms.
    pub fn is_flagged(self) -> bool {
        !matches!(self, Outcome::Allow)
    }
}

/// Why the behaviour tracker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BehaviourError {
    /// The snapshot or journal could not be read or is damaged.
    #[error(
        "behaviour.snapshot_path: cannot restore {path}: {reason} (move the file away to start \
         without the saved sanctions)"
    )]
    Restore {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The snapshot or journal could not be written.
    #[error("behaviour.snapshot_path: cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `redis_url` is not a valid Redis URL.
    #[error("behaviour.redis_url: {0}")]
    RedisUrl(String),
}
