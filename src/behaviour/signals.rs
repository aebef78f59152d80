//! Text fingerprints and the windowed counters behind raids, harassment and room alarms.
//!
//! Takes folded texts, user ids mentioned in a text, and keyed hashes of (tenant, text),
//! (tenant, sender, target) and (tenant, room); gives back a [`TextPrint`] per text and, per
//! key, whether its window's count crossed the configured threshold. Called by the tracker on
//! every message; each map is sharded and bounded like the user store, and holds no strings.

use super::BehaviourConfig;
use super::state::Tick;
use super::store::PassThrough;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Longest prefix of the folded text, in bytes, that the near-duplicate sketch reads: keeps
/// the cost per message bounded (the exact hash reads all of it).
const SKETCH_MAX_BYTES: usize = 1024;
/// Most users mentioned in one text that count as harassment targets.
pub(crate) const MAX_MENTIONS: usize = 3;
/// Longest user id read after an `@`, in bytes.
const MAX_MENTION_BYTES: usize = 64;

/// The fingerprints of one message's folded text (see the module docs of `behaviour`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextPrint {
    /// Keyed 64-bit hash of the whole folded text: the raid key.
    pub(crate) exact: u64,
    /// MinHash sketch: 8 one-byte minima over the 4-byte shingles; never 0.
    pub(crate) sketch: u64,
}

/// Odd 64-bit constants, one per sketch byte: multiplying a (well-mixed) shingle hash by one
/// permutes the hashes, and the top byte of the product is close to independent across them.
const SKETCH_SEEDS: [u64; 8] = [
    0x9e37_79b9_7f4a_7c15,
    0xbf58_476d_1ce4_e5b9,
    0x94d0_49bb_1331_11eb,
    0xd6e8_feb8_6659_fd93,
    0xa076_1d64_78bd_642f,
    0xe703_7ed1_a0b4_28db,
    0x8ebc_6af0_9c88_c6e3,
    0x5899_65cc_7537_4cc3,
];

/// A strong 64-bit mix (the splitmix64 finalizer).
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The MinHash sketch of `folded` (its first [`SKETCH_MAX_BYTES`] bytes): for each of 8
/// permutations, the top byte of the smallest permuted shingle hash. Texts shorter than one
/// shingle are one shingle. Never 0.
pub(crate) fn sketch(folded: &str) -> u64 {
    let bytes = folded.as_bytes();
    let bytes = &bytes[..bytes.len().min(SKETCH_MAX_BYTES)];
    let mut mins = [u64::MAX; 8];
    let mut add = |shingle: u64| {
        let h = mix(shingle);
        for (m, seed) in mins.iter_mut().zip(SKETCH_SEEDS) {
            *m = (*m).min(h.wrapping_mul(seed));
        }
    };
    if bytes.len() < 4 {
        let mut buf = [0u8; 8];
        buf[..bytes.len()].copy_from_slice(bytes);
        add(u64::from_le_bytes(buf) | ((bytes.len() as u64) << 56));
    } else {
        for w in bytes.windows(4) {
            add(u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]])));
        }
    }
    let mut out = 0u64;
    for (i, m) in mins.iter().enumerate() {
        out |= (m >> 56) << (8 * i);
    }
    out.max(1)
}

/// Users mentioned in `text` as `@id` (letters, digits, `_ . -`; trailing `.`/`-` dropped),
/// at most [`MAX_MENTIONS`] distinct ones, in order.
pub(crate) fn mentions(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    let mut seen: [&str; MAX_MENTIONS] = [""; MAX_MENTIONS];
    let mut count = 0;
    std::iter::from_fn(move || {
        while count < MAX_MENTIONS {
            let at = rest.find('@')?;
            let after = &rest[at + 1..];
            let end = after
                .char_indices()
                .find(|&(_, c)| !(c.is_alphanumeric() || matches!(c, '_' | '.' | '-')))
                .map_or(after.len(), |(i, _)| i);
            rest = &after[end..];
            let id = after[..end].trim_end_matches(['.', '-']);
            if id.is_empty() || id.len() > MAX_MENTION_BYTES || seen[..count].contains(&id) {
                continue;
            }
            seen[count] = id;
            count += 1;
            return Some(id);
        }
        None
    })
}

type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<PassThrough>>;

/// A bounded, sharded map from a keyed hash to a small windowed counter.
#[derive(Debug)]
pub(crate) struct WindowMap<V> {
    /// The shards; their number is a power of two.
    shards: Box<[Mutex<KeyMap<V>>]>,
    /// `shards.len() - 1`, applied to bits 32.. of the key.
    shard_mask: u64,
    /// Most entries one shard holds.
    shard_capacity: usize,
}

impl<V: Default> WindowMap<V> {
    /// An empty map for at most `max_entries` entries.
    pub(crate) fn new(max_entries: usize) -> WindowMap<V> {
        let max_entries = max_entries.max(1);
        let shard_count = (max_entries / 4096).next_power_of_two().clamp(1, 16);
        WindowMap {
            shards: (0..shard_count).map(|_| Mutex::default()).collect(),
            shard_mask: shard_count as u64 - 1,
            shard_capacity: (max_entries / shard_count).max(1),
        }
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, KeyMap<V>> {
        // Entries are `Copy`-like counters written whole: a poisoned lock is still consistent.
        self.shards[((key >> 32) & self.shard_mask) as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on `key`'s entry, creating it if needed. When the shard is full, entries that
    /// are `stale` are dropped first; if none is, `None` (the key goes untracked).
    pub(crate) fn update<R>(
        &self,
        key: u64,
        stale: impl Fn(&V) -> bool,
        f: impl FnOnce(&mut V) -> R,
    ) -> Option<R> {
        let mut shard = self.shard(key);
        if shard.len() >= self.shard_capacity && !shard.contains_key(&key) {
            shard.retain(|_, v| !stale(v));
            if shard.len() >= self.shard_capacity {
                return None;
            }
        }
        Some(f(shard.entry(key).or_default()))
    }

    /// Drops the `stale` entries; returns how many went.
    pub(crate) fn retain_fresh(&self, stale: impl Fn(&V) -> bool) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let before = shard.len();
            shard.retain(|_, v| !stale(v));
            dropped += before - shard.len();
            let len = shard.len();
            if shard.capacity() > 4 * len.max(256) {
                shard.shrink_to(2 * len);
            }
        }
        dropped
    }

    /// How many entries there are.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// One text's raid window.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RaidState {
    /// Start of the window.
    start: Tick,
    /// Different users counted in the window (approximate: a user is new when its tag is not
    /// among the last eight senders).
    users: u16,
    /// Tags (32 bits of the user key, never 0) of the last eight senders, a ring.
    recent: [u32; 8],
    /// Next slot of `recent` to overwrite.
    next: u8,
}

/// One sender → target pair's harassment window.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PairState {
    /// Start of the window.
    start: Tick,
    /// Flagged messages in the window.
    flagged: u16,
}

/// One room's flagged-message rate.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RoomState {
    /// Start of the current window.
    start: Tick,
    /// Flagged messages in the current window.
    flagged: u32,
    /// Flagged messages in the window before.
    previous: u32,
    /// No new alarm before this.
    quiet_until: Tick,
}

/// The rules of the windowed signals, in ticks.
#[derive(Debug, Clone)]
pub(crate) struct SignalRules {
    /// Raid window.
    raid_window: Tick,
    /// Users that make a raid.
    raid_min_users: u16,
    /// Harassment window.
    harassment_window: Tick,
    /// Flagged messages to one target that make harassment.
    harassment_flagged: u16,
    /// Room window.
    room_window: Tick,
    /// Flagged messages per window that raise an alarm.
    room_alarm_flagged: u32,
    /// Seconds between two alarms of one room.
    room_alarm_cooldown: Tick,
}

impl SignalRules {
    /// The rules of `cfg` (validated; out-of-range values are clamped).
    pub(crate) fn new(cfg: &BehaviourConfig) -> SignalRules {
        let secs = |s: u64| Tick::try_from(s.clamp(1, super::MAX_DURATION_SECS)).unwrap_or(1);
        let count = |n: u32| u16::try_from(n.max(1)).unwrap_or(u16::MAX);
        SignalRules {
            raid_window: secs(cfg.raid_window_secs),
            raid_min_users: count(cfg.raid_min_users),
            harassment_window: secs(cfg.harassment_window_secs),
            harassment_flagged: count(cfg.harassment_flagged),
            room_window: secs(cfg.room_window_secs),
            room_alarm_flagged: cfg.room_alarm_flagged.max(1),
            room_alarm_cooldown: secs(cfg.room_alarm_cooldown_secs),
        }
    }

    /// The room window in seconds (for the alarm event).
    pub(crate) fn room_window_secs(&self) -> u64 {
        u64::from(self.room_window)
    }

    /// The room alarm threshold (for the alarm event).
    pub(crate) fn room_alarm_flagged(&self) -> u32 {
        self.room_alarm_flagged
    }

    /// Counts `user_tag` sending the text at `now`; true when the text is a raid.
    pub(crate) fn raid(&self, s: &mut RaidState, now: Tick, user_tag: u32) -> bool {
        let tag = user_tag.max(1);
        if self.raid_stale(s, now) {
            *s = RaidState {
                start: now,
                ..RaidState::default()
            };
        }
        if !s.recent.contains(&tag) {
            s.users = s.users.saturating_add(1);
            s.recent[usize::from(s.next)] = tag;
            s.next = (s.next + 1) % 8;
        }
        s.users >= self.raid_min_users
    }

    /// The raid window has passed (or never started).
    pub(crate) fn raid_stale(&self, s: &RaidState, now: Tick) -> bool {
        s.users == 0 || now.saturating_sub(s.start) >= self.raid_window
    }

    /// Counts a flagged message to the target at `now`; true when it is harassment.
    pub(crate) fn harassment(&self, s: &mut PairState, now: Tick) -> bool {
        if self.pair_stale(s, now) {
            *s = PairState {
                start: now,
                flagged: 0,
            };
        }
        s.flagged = s.flagged.saturating_add(1);
        s.flagged >= self.harassment_flagged
    }

    /// The harassment window has passed (or never started).
    pub(crate) fn pair_stale(&self, s: &PairState, now: Tick) -> bool {
        s.flagged == 0 || now.saturating_sub(s.start) >= self.harassment_window
    }

    /// Counts a flagged message in the room at `now`; the sliding count when it raises an
    /// alarm.
    pub(crate) fn room(&self, s: &mut RoomState, now: Tick) -> Option<u32> {
        let w = self.room_window;
        let elapsed = now.saturating_sub(s.start);
        if (s.flagged == 0 && s.previous == 0) || elapsed >= 2 * w {
            s.start = now;
            s.flagged = 0;
            s.previous = 0;
        } else if elapsed >= w {
            s.previous = s.flagged;
            s.flagged = 0;
            s.start = s.start.saturating_add(w);
        }
        s.flagged = s.flagged.saturating_add(1);
        // Sliding window: the part of the previous window that still overlaps the last `w`
        // seconds, assuming its messages were spread evenly.
        let into = u64::from(now.saturating_sub(s.start).min(w));
        let carried = u64::from(s.previous) * (u64::from(w) - into) / u64::from(w);
        let estimate = u32::try_from(u64::from(s.flagged) + carried).unwrap_or(u32::MAX);
        if estimate >= self.room_alarm_flagged && now >= s.quiet_until {
            s.quiet_until = now.saturating_add(self.room_alarm_cooldown);
            Some(estimate)
        } else {
            None
        }
    }

    /// Both windows have passed and no alarm cool-down is running.
    pub(crate) fn room_stale(&self, s: &RoomState, now: Tick) -> bool {
        now.saturating_sub(s.start) >= 2 * self.room_window && now >= s.quiet_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::behaviour::state::same_bytes;
    use crate::text::normalize::normalize;

    fn similarity(a: &str, b: &str) -> u32 {
        same_bytes(sketch(&normalize(a)), sketch(&normalize(b)))
    }

    #[test]
    fn sketch_matches_copies_and_near_copies_not_other_texts() {
        let spam = "Buy cheap followers now at cheapfollowers dot com, best prices!!";
        // Case, spacing, leetspeak and punctuation fold away: exact copies.
        assert_eq!(
            similarity(
                spam,
                "BUY CHEAP F0LL0WERS now at cheapfollowers dot com best prices"
            ),
            8
        );
        // A changed word or two still shares most shingles.
        let near = [
            "Buy cheap followers now at cheapfollowers dot com, best prices!! 123",
            "buy cheap followers today at cheapfollowers dot com, best prices",
        ];
        for n in near {
            assert!(similarity(spam, n) >= 5, "{n}: {}", similarity(spam, n));
        }
        let other = [
            "hey, are we still on for lunch tomorrow at noon?",
            "the meeting moved to room 4, bring the slides please",
            "lol that was the best game i have seen all season",
        ];
        for o in other {
            assert!(similarity(spam, o) <= 2, "{o}: {}", similarity(spam, o));
        }
        assert_ne!(sketch(""), 0);
        assert_ne!(sketch("ab"), sketch("ba"));
    }

    #[test]
    fn mentions_are_read_and_bounded() {
        let got: Vec<&str> =
            mentions("@u99 you idiot, @u99. and @bob-, mail a@b.c @ @x @y").collect();
        assert_eq!(got, ["u99", "bob", "b.c"]);
        assert_eq!(mentions("no mentions here").count(), 0);
        let long = format!("@{}", "a".repeat(100));
        assert_eq!(mentions(&long).count(), 0);
    }

    fn rules() -> SignalRules {
        SignalRules::new(&BehaviourConfig {
            raid_min_users: 3,
            raid_window_secs: 60,
            harassment_flagged: 3,
            harassment_window_secs: 600,
            room_alarm_flagged: 4,
            room_window_secs: 60,
            room_alarm_cooldown_secs: 300,
            ..BehaviourConfig::default()
        })
    }

    #[test]
    fn raid_needs_distinct_users_within_the_window() {
        let r = rules();
        let mut s = RaidState::default();
        assert!(!r.raid(&mut s, 100, 1));
        assert!(!r.raid(&mut s, 100, 1), "the same user twice is one user");
        assert!(!r.raid(&mut s, 110, 2));
        assert!(r.raid(&mut s, 120, 3));
        assert!(
            r.raid(&mut s, 121, 1),
            "later copies in the window are raid too"
        );
        assert!(!r.raid(&mut s, 160, 4), "a new window starts over");
        assert!(r.raid_stale(&s, 220));
    }

    #[test]
    fn harassment_counts_per_window() {
        let r = rules();
        let mut s = PairState::default();
        assert!(!r.harassment(&mut s, 0));
        assert!(!r.harassment(&mut s, 100));
        assert!(r.harassment(&mut s, 599));
        assert!(!r.harassment(&mut s, 600), "window passed");
    }

    #[test]
    fn room_alarm_fires_once_per_cooldown_and_slides() {
        let r = rules();
        let mut s = RoomState::default();
        let alarms: Vec<Option<u32>> = (0..6).map(|i| r.room(&mut s, 1000 + i)).collect();
        assert_eq!(alarms, [None, None, None, Some(4), None, None]);
        // 30 s into the next window, half of the previous 6 still count: 3 + 1 = 4 — but the
        // cool-down holds the alarm.
        assert_eq!(r.room(&mut s, 1090), None);
        // After the cool-down, a burst alarms again.
        let later: Vec<Option<u32>> = (0..4).map(|i| r.room(&mut s, 1400 + i)).collect();
        assert_eq!(later, [None, None, None, Some(4)]);
        assert!(r.room_stale(&s, 1400 + 120 + 300));
    }

    #[test]
    fn window_map_is_bounded_and_drops_stale_entries_first() {
        let map: WindowMap<PairState> = WindowMap::new(4);
        let r = rules();
        for key in 0..4u64 {
            assert!(map.update(key, |_| false, |s| r.harassment(s, 0)).is_some());
        }
        assert_eq!(
            map.update(9, |_| false, |s| r.harassment(s, 0)),
            None,
            "full"
        );
        assert!(
            map.update(9, |s| r.pair_stale(s, 600), |s| r.harassment(s, 600))
                .is_some(),
            "stale entries make room"
        );
        assert_eq!(map.len(), 1);
        assert_eq!(map.retain_fresh(|s| r.pair_stale(s, 1200)), 1);
    }
}
