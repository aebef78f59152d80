//! In-memory behaviour store.
//!
//! Takes a [`UserKey`] and a closure over that user's [`UserState`]; runs the closure under the
//! user's shard lock (creating the record, and making room for it, when needed). Called by the
//! tracker for `record`/`sender`, and by governor through [`FloodState`] for the flood check, so
//! one record per user holds both the flood bucket and the abuse state.
//!
//! The map is split into up to 64 shards, each a `std::sync::Mutex<HashMap>` holding at most
//! `max_tracked_users / shards` records. Locks are held only for the map operation and the
//! closure (no I/O, no allocation beyond map growth); a shard that is full sweeps itself once
//! (idle users, then the least-recently-active eighth of its unsanctioned users) and, if nothing
//! can go, answers "no room" for the rest of that second instead of rescanning.

use super::BehaviourConfig;
use super::state::{Now, Policy, Tick, UserState};
use governor::nanos::Nanos;
use governor::state::StateStore;
use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A user's identity in the store: a keyed 64-bit hash of tenant + user.
pub(crate) type UserKey = u64;

/// Records one shard holds before it sweeps; more shards than this many users would only waste
/// memory on empty maps.
const MIN_USERS_PER_SHARD: usize = 4096;
/// Most shards: enough to keep lock contention negligible on the machines this runs on.
const MAX_SHARDS: usize = 64;

/// The tracker's clock: `tokio::time::Instant` (so tests can pause and advance it) counted from
/// the system clock's reading when the tracker started, so that ticks are unix seconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    /// When the tracker started.
    epoch: tokio::time::Instant,
    /// The system clock at `epoch`, unix milliseconds.
    epoch_unix_ms: u64,
}

impl Clock {
    /// A clock starting now. The start is rounded down to a whole unix second, so that ticks
    /// turn over exactly N seconds after the start: the tracker's clock runs up to a second
    /// behind the system clock, and a sanction may outlast its reported `until` by as much
    /// (never end before it).
    pub(crate) fn start() -> Clock {
        Clock {
            epoch: tokio::time::Instant::now(),
            epoch_unix_ms: unix_now_ms() / 1000 * 1000,
        }
    }

    /// The current reading.
    pub(crate) fn now(&self) -> Now {
        let elapsed = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        Now::from_unix_ms(self.epoch_unix_ms.saturating_add(elapsed))
    }
}

/// The system clock in unix milliseconds (0 if it is set before 1970).
pub(crate) fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A 64-bit checksum of `bytes` (SipHash-1-3 under a fixed key) for the snapshot and journal.
pub(crate) fn checksum(bytes: &[u8]) -> u64 {
    let mut h = SipHasher::<1, 3>::new(0x6368_6174_6775_6172, 0x6465_6421_7374_6f72);
    h.write(bytes);
    h.finish()
}

/// Derives [`UserKey`]s with SipHash-1-3 under a per-tracker random key, so user ids chosen by
/// an attacker cannot pile into one hash bucket and a collision between two real users needs
/// about 2^32 users. The algorithm is fixed here (not std's unspecified `DefaultHasher`) so that
/// a snapshot that saves the key can restore records across releases.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyHasher {
    /// First half of the SipHash key.
    k0: u64,
    /// Second half of the SipHash key.
    k1: u64,
}

impl KeyHasher {
    /// The hasher with this key (restored from a snapshot).
    pub(crate) fn from_parts(k0: u64, k1: u64) -> KeyHasher {
        KeyHasher { k0, k1 }
    }

    /// The key, to save with a snapshot.
    pub(crate) fn parts(&self) -> (u64, u64) {
        (self.k0, self.k1)
    }

    /// The key of a sequence of fields under a one-byte domain tag (texts, pairs, rooms), each
    /// length-prefixed so that no two sequences collide by concatenation.
    pub(crate) fn key_of(&self, domain: u8, fields: &[&[u8]]) -> u64 {
        let mut h = SipHasher::<1, 3>::new(self.k0 ^ u64::from(domain), self.k1);
        for f in fields {
            h.write(&(f.len() as u64).to_le_bytes());
            h.write(f);
        }
        h.finish()
    }

    /// A hasher with a fresh random key.
    pub(crate) fn random() -> KeyHasher {
        let seed = RandomState::new();
        KeyHasher {
            k0: seed.hash_one(0x243f_6a88_85a3_08d3_u64),
            k1: seed.hash_one(0x1319_8a2e_0370_7344_u64),
        }
    }

    /// The key of `user` in `tenant`. The tenant is length-prefixed, so ("ab", "c") and
    /// ("a", "bc") differ.
    pub(crate) fn user_key(&self, tenant: &str, user: &str) -> UserKey {
        let mut h = SipHasher::<1, 3>::new(self.k0, self.k1);
        h.write(&(tenant.len() as u64).to_le_bytes());
        h.write(tenant.as_bytes());
        h.write(user.as_bytes());
        h.finish()
    }
}

/// SipHash-c-d (Aumasson & Bernstein), streaming, little-endian.
struct SipHasher<const C: usize, const D: usize> {
    /// The four state words.
    v: [u64; 4],
    /// Bytes not yet compressed (fewer than 8), little-endian in the low bytes.
    tail: u64,
    /// How many bytes `tail` holds.
    tail_len: usize,
    /// Total bytes written (only the low byte is used).
    len: usize,
}

impl<const C: usize, const D: usize> SipHasher<C, D> {
    fn new(k0: u64, k1: u64) -> Self {
        SipHasher {
            v: [
                k0 ^ 0x736f_6d65_7073_6575,
                k1 ^ 0x646f_7261_6e64_6f6d,
                k0 ^ 0x6c79_6765_6e65_7261,
                k1 ^ 0x7465_6462_7974_6573,
            ],
            tail: 0,
            tail_len: 0,
            len: 0,
        }
    }

    #[inline]
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }

    #[inline]
    fn compress(&mut self, m: u64) {
        self.v[3] ^= m;
        for _ in 0..C {
            Self::round(&mut self.v);
        }
        self.v[0] ^= m;
    }

    /// Little-endian load of up to 8 bytes.
    #[inline]
    fn load(bytes: &[u8]) -> u64 {
        let mut buf = [0u8; 8];
        buf[..bytes.len()].copy_from_slice(bytes);
        u64::from_le_bytes(buf)
    }

    fn write(&mut self, mut msg: &[u8]) {
        self.len = self.len.wrapping_add(msg.len());
        if self.tail_len > 0 {
            let take = (8 - self.tail_len).min(msg.len());
            self.tail |= Self::load(&msg[..take]) << (8 * self.tail_len);
            self.tail_len += take;
            msg = &msg[take..];
            if self.tail_len < 8 {
                return;
            }
            let m = self.tail;
            self.compress(m);
            self.tail = 0;
            self.tail_len = 0;
        }
        let mut words = msg.chunks_exact(8);
        for word in &mut words {
            self.compress(Self::load(word));
        }
        let rest = words.remainder();
        self.tail = Self::load(rest);
        self.tail_len = rest.len();
    }

    fn finish(mut self) -> u64 {
        let b = ((self.len as u64 & 0xff) << 56) | self.tail;
        self.compress(b);
        self.v[2] ^= 0xff;
        for _ in 0..D {
            Self::round(&mut self.v);
        }
        self.v[0] ^ self.v[1] ^ self.v[2] ^ self.v[3]
    }
}

/// `Hasher` for maps keyed by [`UserKey`]: the key already is a keyed hash, so use it as is.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for keys other than u64, which this map does not have; FNV-1a keeps it
        // correct anyway.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type UserMap = HashMap<UserKey, UserState, BuildHasherDefault<PassThrough>>;

/// One shard of the store.
#[derive(Debug, Default)]
struct Shard {
    /// The records.
    users: UserMap,
    /// A sweep found nothing to evict: until this tick, new users here go untracked without
    /// another sweep (keeps a shard full of sanctioned users from costing a scan per message).
    no_room_before: Tick,
}

/// The in-memory backend: sharded, bounded, with the rules' [`Policy`] and the [`Clock`].
#[derive(Debug)]
pub(crate) struct MemoryStore {
    /// The shards; their number is a power of two.
    shards: Box<[Mutex<Shard>]>,
    /// `shards.len() - 1`, applied to bits 32.. of the key (the map uses the low and top bits).
    shard_mask: u64,
    /// Most records one shard keeps, except sanctioned users that could displace no one.
    shard_capacity: usize,
    /// The rules, in ticks.
    policy: Policy,
    /// Time for decay, expiry and eviction.
    clock: Clock,
}

impl MemoryStore {
    /// An empty store for `cfg`.
    pub(crate) fn new(cfg: &BehaviourConfig) -> MemoryStore {
        let max_users = cfg.max_tracked_users.max(1);
        let shard_count = (max_users / MIN_USERS_PER_SHARD)
            .next_power_of_two()
            .clamp(1, MAX_SHARDS);
        MemoryStore {
            shards: (0..shard_count).map(|_| Mutex::default()).collect(),
            shard_mask: shard_count as u64 - 1,
            shard_capacity: (max_users / shard_count).max(1),
            policy: Policy::new(cfg),
            clock: Clock::start(),
        }
    }

    /// The rules this store evicts by.
    pub(crate) fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The current time.
    pub(crate) fn now(&self) -> Now {
        self.clock.now()
    }

    fn shard(&self, key: UserKey) -> MutexGuard<'_, Shard> {
        let index = ((key >> 32) & self.shard_mask) as usize;
        // A panic while a shard was locked cannot leave a record half-written (records are
        // `Copy` and written whole), so a poisoned lock is still consistent.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_all(&self) -> impl Iterator<Item = MutexGuard<'_, Shard>> {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Runs `f` on `key`'s record under its shard lock, creating the record if needed (`f`'s
    /// second argument says it was just created). When the shard is full of users that cannot
    /// be evicted, `f` runs on a fresh record that is kept only if it ends up holding a sanction
    /// (sanctions are never dropped for space).
    pub(crate) fn update<R>(
        &self,
        key: UserKey,
        now: Now,
        f: impl FnOnce(&mut UserState, bool) -> R,
    ) -> R {
        let mut shard = self.shard(key);
        if shard.users.len() >= self.shard_capacity
            && !shard.users.contains_key(&key)
            && !self.make_room(&mut shard, now.tick)
        {
            let mut fresh = UserState::new(now.tick);
            let result = f(&mut fresh, true);
            if fresh.protected(now.tick, &self.policy) {
                shard.users.insert(key, fresh);
            }
            return result;
        }
        let mut created = false;
        let user = shard.users.entry(key).or_insert_with(|| {
            created = true;
            UserState::new(now.tick)
        });
        f(user, created)
    }

    /// Calls `f` with every record, one shard lock at a time.
    pub(crate) fn for_each(&self, mut f: impl FnMut(UserKey, &UserState)) {
        for shard in self.lock_all() {
            for (&key, user) in &shard.users {
                f(key, user);
            }
        }
    }

    /// A copy of `key`'s record, if tracked.
    pub(crate) fn get(&self, key: UserKey) -> Option<UserState> {
        self.shard(key).users.get(&key).copied()
    }

    /// How many users are tracked.
    pub(crate) fn len(&self) -> usize {
        self.lock_all().map(|s| s.users.len()).sum()
    }

    /// Drops idle users without a sanction or cool-down, and returns memory after a spike.
    /// Returns how many were dropped. Locks one shard at a time.
    pub(crate) fn evict_idle(&self, now: Now) -> usize {
        let mut evicted = 0;
        for mut shard in self.lock_all() {
            let before = shard.users.len();
            shard
                .users
                .retain(|_, u| !u.evictable_idle(now.tick, &self.policy));
            evicted += before - shard.users.len();
            shard.no_room_before = 0;
            let len = shard.users.len();
            if shard.users.capacity() > 4 * len.max(256) {
                shard.users.shrink_to(2 * len);
            }
        }
        evicted
    }

    /// Frees room in a full shard: drops idle users, then, if the shard is still over 7/8 full,
    /// the least-recently-active users without a sanction or cool-down down to 7/8. False when
    /// no slot could be freed (every record is protected).
    fn make_room(&self, shard: &mut Shard, now: Tick) -> bool {
        if now < shard.no_room_before {
            return false;
        }
        let policy = &self.policy;
        shard.users.retain(|_, u| !u.evictable_idle(now, policy));
        // Free an eighth of the shard at once, so that the next sweep is that many inserts away.
        let target = self.shard_capacity - (self.shard_capacity / 8).max(1);
        if shard.users.len() <= target {
            return true;
        }
        let excess = shard.users.len() - target;
        let mut seen: Vec<Tick> = shard
            .users
            .values()
            .filter(|u| !u.protected(now, policy))
            .map(|u| u.seen)
            .collect();
        let drop_count = excess.min(seen.len());
        if drop_count == 0 {
            shard.no_room_before = now.saturating_add(1);
            return false;
        }
        let (_, &mut cutoff, _) = seen.select_nth_unstable(drop_count - 1);
        let mut ties_to_drop = drop_count - seen.iter().filter(|&&s| s < cutoff).count();
        shard.users.retain(|_, u| {
            if u.protected(now, policy) || u.seen > cutoff {
                true
            } else if u.seen < cutoff {
                false
            } else if ties_to_drop > 0 {
                ties_to_drop -= 1;
                false
            } else {
                true
            }
        });
        if shard.users.len() < self.shard_capacity {
            true
        } else {
            shard.no_room_before = now.saturating_add(1);
            false
        }
    }
}

/// The store as governor's keyed state store: the flood bucket (GCRA theoretical arrival time)
/// lives in the user's record, so the flood limit shares the store's bound and eviction and
/// needs no separate `retain_recent` pass.
#[derive(Debug, Clone)]
pub(crate) struct FloodState(pub(crate) Arc<MemoryStore>);

impl StateStore for FloodState {
    type Key = UserKey;

    fn measure_and_replace<T, F, E>(&self, key: &UserKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let store = &self.0;
        let now = store.now();
        store.update(*key, now, |user, _| {
            // A message is activity: fold the score decay in before moving `seen`.
            user.touch(now.tick, &store.policy);
            let previous = (user.tat_nanos != 0).then(|| Nanos::new(user.tat_nanos));
            let (outcome, tat) = f(previous)?;
            user.tat_nanos = tat.as_u64();
            Ok(outcome)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siphash_2_4_matches_the_paper() {
        // Appendix A of "SipHash: a fast short-input PRF": key 00..0f, message 00..0e.
        let k0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let k1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        let msg: Vec<u8> = (0..15).collect();
        let mut h = SipHasher::<2, 4>::new(k0, k1);
        h.write(&msg);
        assert_eq!(h.finish(), 0xa129_ca61_49be_45e5);
    }

    #[test]
    #[allow(deprecated)] // std's SipHasher (2-4) is deprecated but still the reference here
    fn siphash_streaming_matches_std_for_every_split() {
        let msg: Vec<u8> = (0..40u8).map(|b| b.wrapping_mul(37)).collect();
        for len in 0..msg.len() {
            for split in 0..=len {
                let mut want = std::hash::SipHasher::new_with_keys(7, 11);
                want.write(&msg[..len]);
                let mut got = SipHasher::<2, 4>::new(7, 11);
                got.write(&msg[..split]);
                got.write(&msg[split..len]);
                assert_eq!(got.finish(), want.finish(), "len {len} split {split}");
            }
        }
    }

    #[test]
    fn user_keys_separate_tenant_from_user() {
        let keys = KeyHasher { k0: 1, k1: 2 };
        assert_ne!(keys.user_key("ab", "c"), keys.user_key("a", "bc"));
        assert_eq!(keys.user_key("t", "u"), keys.user_key("t", "u"));
        let other = KeyHasher { k0: 3, k1: 2 };
        assert_ne!(keys.user_key("t", "u"), other.user_key("t", "u"));
    }

    #[test]
    fn shard_count_follows_capacity() {
        let store = |max| {
            MemoryStore::new(&BehaviourConfig {
                max_tracked_users: max,
                ..BehaviourConfig::default()
            })
        };
        let small = store(10);
        assert_eq!((small.shards.len(), small.shard_capacity), (1, 10));
        let large = store(1_000_000);
        assert_eq!(large.shards.len(), 64);
        assert!(large.shard_capacity * large.shards.len() <= 1_000_000);
    }

    #[test]
    fn domain_keys_differ_by_domain_and_field_split() {
        let keys = KeyHasher { k0: 1, k1: 2 };
        assert_ne!(
            keys.key_of(1, &[b"ab", b"c"]),
            keys.key_of(1, &[b"a", b"bc"])
        );
        assert_ne!(keys.key_of(1, &[b"x"]), keys.key_of(2, &[b"x"]));
        assert_eq!(keys.key_of(3, &[b"x"]), keys.key_of(3, &[b"x"]));
    }
}
