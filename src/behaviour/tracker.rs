//! The [`Tracker`] handle.
//!
//! Takes (tenant, [`MessageFacts`]) before moderation and the [`Outcome`] after it; gives back
//! a [`Precheck`] and a [`Recorded`] (the sender's [`SenderInfo`], and the [`Sanction`] and
//! [`RoomAlarm`] events to push). Called by the moderator on every message and for `sanction`
//! requests, by the server to start, maintain and stop it. A cheap-to-clone handle over the
//! store and the signal maps; every per-message call is synchronous, touches one lock at a time
//! and never holds it across I/O or `.await` — backends only queue.

use super::backend::{Backend, Change};
use super::persist::{FileBackend, Paths};
use super::redis::{Local, RedisBackend};
use super::signals::{
    MAX_MENTIONS, PairState, RaidState, RoomState, SignalRules, TextPrint, WindowMap, mentions,
    sketch,
};
use super::state::{Escalation, Now, UserState};
use super::store::{FloodState, KeyHasher, MemoryStore, UserKey};
use super::{
    BehaviourConfig, BehaviourError, MAX_DURATION_SECS, MessageFacts, Outcome, Precheck, Recorded,
    RoomAlarm, Sanction, SanctionState, SenderInfo, Spam, StoreKind,
};
use crate::text::normalize::normalize;
use governor::clock::DefaultClock;
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Domain tags of the keyed hashes (see [`KeyHasher::key_of`]).
const DOMAIN_FOLDED: u8 = 1;
const DOMAIN_TEXT: u8 = 2;
const DOMAIN_PAIR: u8 = 3;
const DOMAIN_ROOM: u8 = 4;
const DOMAIN_ROOM_TEXT: u8 = 5;
/// Sanction events from the shared state buffered for the server.
const REMOTE_EVENTS: usize = 1024;

/// Per-sender flood limit, spam, harassment, abuse score and sanctions, and per-room alarms.
/// Clones share the same state.
#[derive(Clone)]
pub struct Tracker {
    /// The shared state.
    inner: Arc<Inner>,
}

struct Inner {
    /// The configuration the tracker was built with.
    cfg: BehaviourConfig,
    /// The user records.
    store: Arc<MemoryStore>,
    /// Governor's GCRA over the same records (see [`FloodState`]).
    flood: RateLimiter<UserKey, FloodState, DefaultClock>,
    /// Turns (tenant, user) and the other keys into 64-bit hashes.
    keys: KeyHasher,
    /// Windows and thresholds of raids, harassment and rooms.
    rules: SignalRules,
    /// Raid windows per (tenant, folded text).
    texts: WindowMap<RaidState>,
    /// Harassment windows per (tenant, sender, target).
    pairs: WindowMap<PairState>,
    /// Flagged-message rates per (tenant, room).
    rooms: WindowMap<RoomState>,
    /// Where changes go besides the memory store (journal, Redis); empty for [`Tracker::new`].
    backends: Vec<Arc<dyn Backend>>,
    /// Some backend wants violations and first sights (Redis).
    wants_activity: bool,
    /// Failed journal writes, fsyncs and snapshots of the `memory` backend's files.
    persist_errors: Arc<AtomicU64>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("cfg", &self.inner.cfg)
            .field(
                "backends",
                &self
                    .inner
                    .backends
                    .iter()
                    .map(|b| b.name())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Sanction events that reach this sidecar from the shared state (another sidecar's sanctions,
/// records pulled from Redis), for the server to push to the tenant's connections.
#[derive(Debug)]
pub struct RemoteEvents {
    /// From the Redis backend's task.
    rx: mpsc::Receiver<(Arc<str>, Sanction)>,
}

impl RemoteEvents {
    /// The next event and its tenant; `None` once the tracker has shut down.
    pub async fn recv(&mut self) -> Option<(Arc<str>, Sanction)> {
        self.rx.recv().await
    }
}

impl Tracker {
    /// A tracker with no users, in memory only: `store`, `snapshot_path` and the Redis settings
    /// are ignored (see [`Tracker::open`]). `cfg` should have passed
    /// [`BehaviourConfig::validate`]; values it would reject are clamped rather than trusted (a
    /// zero rate counts as 1 per second). Works outside a runtime.
    pub fn new(cfg: BehaviourConfig) -> Tracker {
        let store = Arc::new(MemoryStore::new(&cfg));
        Tracker::assemble(cfg, store, KeyHasher::random(), Vec::new(), Arc::default())
    }

    /// The tracker `cfg` describes: restores the snapshot and journal of `snapshot_path` (if
    /// set) and starts journaling; with `store = "redis"`, starts the shared-state task (it
    /// connects in the background: until it has, verdicts are marked degraded). Returns the
    /// stream of sanction events that come from the shared state. Must be called within a
    /// tokio runtime; file I/O runs on the blocking pool.
    pub async fn open(cfg: BehaviourConfig) -> Result<(Tracker, RemoteEvents), BehaviourError> {
        let store = Arc::new(MemoryStore::new(&cfg));
        let mut backends: Vec<Arc<dyn Backend>> = Vec::new();
        let mut keys = KeyHasher::random();
        let mut journal: Option<Arc<dyn Backend>> = None;
        let persist_errors = Arc::new(AtomicU64::new(0));
        match &cfg.snapshot_path {
            Some(path) => {
                let paths = Paths::new(path);
                let interval = Duration::from_secs(cfg.snapshot_interval_secs.max(1));
                let store2 = store.clone();
                let errors = persist_errors.clone();
                let started = tokio::task::spawn_blocking(move || {
                    let restored = super::persist::restore(&paths, &store2)?;
                    let keys = restored.keys.unwrap_or(keys);
                    let file = FileBackend::start(paths, store2, keys, interval, errors)?;
                    Ok::<_, BehaviourError>((restored, keys, file))
                })
                .await
                .map_err(|e| BehaviourError::Restore {
                    path: path.clone(),
                    reason: format!("restore task failed: {e}"),
                })?;
                let (restored, restored_keys, file) = started?;
                keys = restored_keys;
                tracing::info!(
                    path = %path.display(),
                    snapshot_records = restored.snapshot_records,
                    journal_entries = restored.journal_entries,
                    "behaviour state restored"
                );
                let file: Arc<dyn Backend> = Arc::new(file);
                journal = Some(file.clone());
                backends.push(file);
            }
            None if cfg.store == StoreKind::Memory => tracing::warn!(
                "behaviour.snapshot_path is not set: sanctions will not survive a restart"
            ),
            None => {}
        }
        let (events_tx, events_rx) = mpsc::channel(REMOTE_EVENTS);
        if cfg.store == StoreKind::Redis {
            let local = Local {
                store: store.clone(),
                keys,
                journal,
                events_tx,
            };
            let redis = RedisBackend::start(&cfg, store.policy().clone(), local)?;
            // Redis first: its last merges may still go to the journal at shutdown.
            backends.insert(0, Arc::new(redis));
        }
        let tracker = Tracker::assemble(cfg, store, keys, backends, persist_errors);
        Ok((tracker, RemoteEvents { rx: events_rx }))
    }

    fn assemble(
        cfg: BehaviourConfig,
        store: Arc<MemoryStore>,
        keys: KeyHasher,
        backends: Vec<Arc<dyn Backend>>,
        persist_errors: Arc<AtomicU64>,
    ) -> Tracker {
        let per_second = NonZeroU32::new(cfg.flood_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(cfg.flood_burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(per_second).allow_burst(burst);
        let flood = RateLimiter::new(
            quota,
            FloodState(Arc::clone(&store)),
            DefaultClock::default(),
        );
        Tracker {
            inner: Arc::new(Inner {
                rules: SignalRules::new(&cfg),
                texts: WindowMap::new(cfg.max_tracked_texts),
                pairs: WindowMap::new(cfg.max_tracked_pairs),
                rooms: WindowMap::new(cfg.max_tracked_rooms),
                cfg,
                store,
                flood,
                keys,
                wants_activity: backends.iter().any(|b| b.wants_activity()),
                backends,
                persist_errors,
            }),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &BehaviourConfig {
        &self.inner.cfg
    }

    /// The tracker's clock, unix milliseconds (the clock `until` values are on).
    pub fn now_ms(&self) -> u64 {
        self.inner.store.now().unix_ms
    }

    /// The fingerprint duplicate and raid detection compare `text` by: normalizes it (see
    /// [`crate::text::normalize`]) and hashes the folded form; `None` when the folded text is
    /// shorter than `spam_min_chars`. Costs about as much as normalizing the text: callers
    /// with long texts run it off the runtime. Prints of different trackers do not compare.
    pub fn fingerprint(&self, text: &str) -> Option<TextPrint> {
        let folded = normalize(text);
        if folded.len() < self.inner.cfg.spam_min_chars {
            return None;
        }
        Some(TextPrint {
            exact: self.inner.keys.key_of(DOMAIN_FOLDED, &[folded.as_bytes()]),
            sketch: sketch(&folded),
        })
    }

    /// Before moderation, with nothing known but the sender: see [`Tracker::precheck_message`].
    pub fn precheck(&self, tenant: &str, user: &str) -> Precheck {
        self.precheck_message(
            tenant,
            &MessageFacts {
                user,
                ..MessageFacts::default()
            },
        )
    }

    /// Before moderation: counts this message against the sender's flood limit, checks its
    /// fingerprint for duplicate spam and raids, and reports the sender's state. Starts
    /// tracking a new sender (and, with the Redis backend, fetches their shared record in the
    /// background).
    pub fn precheck_message(&self, tenant: &str, msg: &MessageFacts<'_>) -> Precheck {
        let inner = &*self.inner;
        let key = self.key(tenant, msg.user);
        let store = &inner.store;
        let now = store.now();
        let (duplicate, sender) = store.update(key, now, |u, created| {
            if created && inner.wants_activity {
                self.submit(&Change::FirstSight {
                    tenant: Arc::from(tenant),
                    user: msg.user.into(),
                });
            }
            let duplicate = msg
                .print
                .is_some_and(|p| u.note_text(now.tick, p.sketch, store.policy()));
            (duplicate, self.info(u, now))
        });
        let raid = msg.print.is_some_and(|p| {
            // Per room when the message has one (a raid floods a room; the same greeting in
            // many rooms is not one), per tenant otherwise (direct messages).
            let exact = p.exact.to_le_bytes();
            let text_key = match msg.room {
                Some(room) => inner.keys.key_of(
                    DOMAIN_ROOM_TEXT,
                    &[tenant.as_bytes(), room.as_bytes(), &exact],
                ),
                None => inner.keys.key_of(DOMAIN_TEXT, &[tenant.as_bytes(), &exact]),
            };
            inner
                .texts
                .update(
                    text_key,
                    |r| inner.rules.raid_stale(r, now.tick),
                    |r| inner.rules.raid(r, now.tick, key as u32),
                )
                .unwrap_or(false)
        });
        let flooded = inner.flood.check_key(&key).is_err();
        Precheck {
            flooded,
            spam: if duplicate {
                Some(Spam::Duplicate)
            } else if raid {
                Some(Spam::Raid)
            } else {
                None
            },
            sender,
        }
    }

    /// After moderation, with nothing known but the sender: see [`Tracker::record_message`].
    pub fn record(
        &self,
        tenant: &str,
        user: &str,
        outcome: Outcome,
    ) -> (SenderInfo, Option<Sanction>) {
        let r = self.record_message(
            tenant,
            &MessageFacts {
                user,
                ..MessageFacts::default()
            },
            outcome,
        );
        (r.sender, r.sanction)
    }

    /// After moderation: counts a flagged outcome against each target (`to` and `@mentions`)
    /// and the room, upgrades it to a `block` of severity 1.0 when it is harassment, and adds
    /// it to the sender's score. Returns the sender's state and the events to push.
    pub fn record_message(
        &self,
        tenant: &str,
        msg: &MessageFacts<'_>,
        outcome: Outcome,
    ) -> Recorded {
        let inner = &*self.inner;
        let store = &inner.store;
        let now = store.now();
        let flagged = outcome.is_flagged();
        let harassment = flagged && self.harassment(tenant, msg, now);
        let outcome = if harassment {
            Outcome::Block { severity: 1.0 }
        } else {
            outcome
        };
        let room_alarm = match msg.room {
            Some(room) if flagged => self.room(tenant, room, now),
            _ => None,
        };
        let key = self.key(tenant, msg.user);
        let (state, escalation) = store.update(key, now, |u, created| {
            let escalation = u.record(now, outcome, store.policy());
            if inner.wants_activity || (escalation.is_some() && !inner.backends.is_empty()) {
                self.after_record(
                    tenant, msg.user, key, u, now, outcome, escalation, harassment, created,
                );
            }
            (*u, escalation)
        });
        let Some(Escalation { action, reason, .. }) = escalation else {
            return Recorded {
                sender: self.info(&state, now),
                sanction: None,
                harassment,
                room_alarm,
            };
        };
        let until = u64::from(state.until) * 1000;
        let reason = if harassment { "harassment" } else { reason };
        tracing::debug!(
            tenant,
            user = msg.user,
            ?action,
            until,
            reason,
            "sender sanctioned"
        );
        Recorded {
            sender: SenderInfo {
                risk: store.policy().risk(state.score),
                state: action,
                until: Some(until),
            },
            sanction: Some(Sanction {
                user: msg.user.to_owned(),
                action,
                until,
                reason: reason.to_owned(),
            }),
            harassment,
            room_alarm,
        }
    }

    /// Tells the backends about a recorded outcome (under the user's shard lock).
    #[allow(clippy::too_many_arguments)]
    fn after_record(
        &self,
        tenant: &str,
        user: &str,
        key: UserKey,
        u: &UserState,
        now: Now,
        outcome: Outcome,
        escalation: Option<Escalation>,
        harassment: bool,
        created: bool,
    ) {
        let tenant: Arc<str> = Arc::from(tenant);
        let activity = self.inner.wants_activity;
        if created && activity {
            self.submit(&Change::FirstSight {
                tenant: tenant.clone(),
                user: user.into(),
            });
        }
        if outcome.is_flagged() && activity {
            self.submit(&Change::Violation {
                tenant: tenant.clone(),
                user: user.into(),
                outcome,
                at: now,
                local: u.saved(),
            });
        }
        if let Some(e) = escalation {
            self.submit(&Change::Sanction {
                key,
                tenant,
                user: user.into(),
                saved: u.saved(),
                manual: false,
                reason: if harassment { "harassment" } else { e.reason }.into(),
            });
        }
    }

    /// Counts a flagged message against each of its targets; true when any pair reached the
    /// harassment threshold.
    fn harassment(&self, tenant: &str, msg: &MessageFacts<'_>, now: Now) -> bool {
        let inner = &*self.inner;
        let mut targets: [&str; MAX_MENTIONS + 1] = [""; MAX_MENTIONS + 1];
        let mut n = 0;
        for target in msg.to.into_iter().chain(mentions(msg.text)) {
            if !target.is_empty() && target != msg.user && !targets[..n].contains(&target) {
                targets[n] = target;
                n += 1;
            }
        }
        let mut harassment = false;
        for target in &targets[..n] {
            let pair = inner.keys.key_of(
                DOMAIN_PAIR,
                &[tenant.as_bytes(), msg.user.as_bytes(), target.as_bytes()],
            );
            harassment |= inner
                .pairs
                .update(
                    pair,
                    |p| inner.rules.pair_stale(p, now.tick),
                    |p| inner.rules.harassment(p, now.tick),
                )
                .unwrap_or(false);
        }
        harassment
    }

    /// Counts a flagged message in `room`; the alarm when it crossed the threshold.
    fn room(&self, tenant: &str, room: &str, now: Now) -> Option<RoomAlarm> {
        let inner = &*self.inner;
        let key = inner
            .keys
            .key_of(DOMAIN_ROOM, &[tenant.as_bytes(), room.as_bytes()]);
        let flagged = inner
            .rooms
            .update(
                key,
                |r| inner.rules.room_stale(r, now.tick),
                |r| inner.rules.room(r, now.tick),
            )
            .flatten()?;
        tracing::info!(tenant, room, flagged, "room alarm");
        Some(RoomAlarm {
            room: room.to_owned(),
            flagged,
            window_secs: inner.rules.room_window_secs(),
            threshold: inner.rules.room_alarm_flagged(),
            at: now.unix_ms,
        })
    }

    /// Applies or lifts a sanction by hand (the `sanction` request). `action = Ok` lifts any
    /// sanction and clears the cool-down and the score; any other action is imposed for
    /// `duration_secs` (default: the configured length of that sanction; at most ten years)
    /// whatever was in force, milder or harsher. Journaled, and shared through Redis, where it
    /// replaces what other sidecars hold.
    pub fn set_sanction(
        &self,
        tenant: &str,
        user: &str,
        action: SanctionState,
        duration_secs: Option<u64>,
        reason: &str,
    ) -> Sanction {
        let store = &self.inner.store;
        let policy = store.policy();
        let duration = duration_secs.map_or(policy.duration_secs(action), |d| {
            u32::try_from(d.min(MAX_DURATION_SECS)).unwrap_or(u32::MAX)
        });
        let key = self.key(tenant, user);
        let now = store.now();
        let saved = store.update(key, now, |u, _| {
            u.set_by_hand(now, action, duration, policy);
            if !self.inner.backends.is_empty() {
                self.submit(&Change::Sanction {
                    key,
                    tenant: Arc::from(tenant),
                    user: user.into(),
                    saved: u.saved(),
                    manual: true,
                    reason: reason.into(),
                });
            }
            u.saved()
        });
        tracing::info!(
            tenant,
            user,
            action = action.as_str(),
            reason,
            "sanction set by hand"
        );
        Sanction {
            user: user.to_owned(),
            action,
            until: if action == SanctionState::Ok {
                now.unix_ms
            } else {
                u64::from(saved.until) * 1000
            },
            reason: reason.to_owned(),
        }
    }

    /// The sender's current state, without counting a message or starting to track them.
    pub fn sender(&self, tenant: &str, user: &str) -> SenderInfo {
        let store = &self.inner.store;
        match store.get(self.key(tenant, user)) {
            Some(state) => self.info(&state, store.now()),
            None => SenderInfo::CLEAN,
        }
    }

    /// The shared state (Redis) is unavailable now: verdicts are decided on local state only
    /// and should say so (`degraded: ["shared_state"]`).
    pub fn degraded(&self) -> bool {
        self.inner.backends.iter().any(|b| b.degraded())
    }

    /// Failed journal writes, fsyncs and snapshots since start (the `memory` backend's files).
    pub fn persist_errors(&self) -> u64 {
        self.inner
            .persist_errors
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many senders are tracked now.
    pub fn tracked_users(&self) -> usize {
        self.inner.store.len()
    }

    /// Drops idle senders that hold no sanction or cool-down (see the module docs) and windows
    /// that have passed. Takes one shard lock at a time; a few milliseconds per million tracked
    /// users.
    pub fn maintain(&self) {
        let inner = &*self.inner;
        let store = &inner.store;
        let now = store.now();
        let evicted = store.evict_idle(now);
        let t = now.tick;
        let texts = inner.texts.retain_fresh(|r| inner.rules.raid_stale(r, t));
        let pairs = inner.pairs.retain_fresh(|p| inner.rules.pair_stale(p, t));
        let rooms = inner.rooms.retain_fresh(|r| inner.rules.room_stale(r, t));
        tracing::debug!(
            evicted,
            texts,
            pairs,
            rooms,
            tracked = store.len(),
            "behaviour maintenance"
        );
    }

    /// Runs [`Tracker::maintain`] every `maintenance_interval_secs` on the blocking pool until
    /// `shutdown` is cancelled. Must be called within a tokio runtime.
    pub fn spawn_maintenance(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        let tracker = self.clone();
        let period = Duration::from_secs(self.inner.cfg.maintenance_interval_secs.max(1));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = ticks.tick() => {
                        let tracker = tracker.clone();
                        if let Err(e) = tokio::task::spawn_blocking(move || tracker.maintain()).await {
                            tracing::error!(error = %e, "behaviour maintenance failed");
                        }
                    }
                }
            }
        })
    }

    /// Waits until every change made so far is durable (journal fsynced) and shared (written to
    /// Redis, or queued for the reconnect while Redis is down).
    pub async fn sync(&self) {
        for b in &self.inner.backends {
            b.sync().await;
        }
    }

    /// Flushes the backends: last writes to Redis (bounded by its timeout), a final snapshot.
    /// Call once, when the server stops; changes made afterwards are kept in memory only.
    pub async fn shutdown(&self) {
        for b in &self.inner.backends {
            b.shutdown().await;
        }
    }

    fn submit(&self, change: &Change) {
        for b in &self.inner.backends {
            b.submit(change);
        }
    }

    fn key(&self, tenant: &str, user: &str) -> UserKey {
        self.inner.keys.user_key(tenant, user)
    }

    /// The wire view of a record at `now`.
    fn info(&self, state: &UserState, now: Now) -> SenderInfo {
        let policy = self.inner.store.policy();
        let active = state.active(now.tick);
        SenderInfo {
            risk: policy.risk(state.score_at(now.tick, policy)),
            state: active,
            until: (active != SanctionState::Ok).then(|| u64::from(state.until) * 1000),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use tokio::time::advance;

    /// Small numbers that make the arithmetic easy to follow: a `block` of severity 1.0 adds
    /// 2.0, so one throttles, two mute, four block.
    fn cfg() -> BehaviourConfig {
        BehaviourConfig {
            review_weight: 0.5,
            block_weight: 2.0,
            throttle_at: 2.0,
            mute_at: 4.0,
            block_at: 8.0,
            half_life_secs: 600.0,
            throttle_secs: 60,
            mute_secs: 600,
            block_secs: 3600,
            cooldown_secs: 300,
            idle_evict_secs: 120,
            ..BehaviourConfig::default()
        }
    }

    const BLOCK: Outcome = Outcome::Block { severity: 1.0 };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// The `until` of a sanction of `secs` imposed at tracker time `now_ms`: it starts at the
    /// next whole second.
    fn until_after(now_ms: u64, secs: u64) -> u64 {
        now_ms.div_ceil(1000) * 1000 + secs * 1000
    }

    #[tokio::test(start_paused = true)]
    async fn score_decays_by_half_after_a_half_life() {
        let t = Tracker::new(cfg());
        let (info, sanction) = t.record("t", "u", Outcome::Block { severity: 0.5 });
        assert_eq!(sanction, None);
        assert!((info.risk - 1.0 / 8.0).abs() < 1e-6, "risk {}", info.risk);
        advance(secs(600)).await;
        let risk = t.sender("t", "u").risk;
        assert!((risk - 1.0 / 16.0).abs() < 1e-6, "risk {risk}");
        advance(secs(600)).await;
        let risk = t.sender("t", "u").risk;
        assert!((risk - 1.0 / 32.0).abs() < 1e-6, "risk {risk}");
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_blocks_escalate_throttle_mute_block() {
        let t = Tracker::new(cfg());
        let want = [
            (SanctionState::Throttle, 60, "abuse_rate"),
            // One second of decay leaves the score just under mute_at: the repeat rule mutes.
            (SanctionState::Mute, 600, "repeat_offence"),
            (SanctionState::Block, 3600, "repeat_offence"),
        ];
        for (action, duration_secs, reason) in want {
            let now = t.now_ms();
            let (info, sanction) = t.record("t", "u", BLOCK);
            let sanction = sanction.expect("each block escalates one step");
            assert_eq!(
                (sanction.action, sanction.reason.as_str()),
                (action, reason)
            );
            assert_eq!(sanction.user, "u");
            assert_eq!(sanction.until, until_after(now, duration_secs));
            assert_eq!(info.state, action);
            assert_eq!(info.until, Some(sanction.until));
            // Read back later: same state, same deadline.
            let read = t.sender("t", "u");
            assert_eq!((read.state, read.until), (action, Some(sanction.until)));
            advance(secs(1)).await;
        }
        // Already blocked: more violations change nothing.
        let (info, sanction) = t.record("t", "u", BLOCK);
        assert_eq!((info.state, sanction), (SanctionState::Block, None));
        assert!(info.risk > 0.99, "risk {}", info.risk);
    }

    #[tokio::test(start_paused = true)]
    async fn sanctions_expire_back_to_ok() {
        let t = Tracker::new(cfg());
        let (_, sanction) = t.record("t", "u", BLOCK);
        assert_eq!(sanction.map(|s| s.action), Some(SanctionState::Throttle));
        advance(secs(59)).await;
        assert_eq!(t.sender("t", "u").state, SanctionState::Throttle);
        advance(secs(1)).await;
        let info = t.sender("t", "u");
        assert_eq!((info.state, info.until), (SanctionState::Ok, None));
        assert!(t.precheck("t", "u").sender.state == SanctionState::Ok);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sanction_never_ends_before_its_until() {
        let t = Tracker::new(cfg());
        advance(Duration::from_millis(500)).await;
        let (_, sanction) = t.record("t", "u", BLOCK);
        let until = sanction.expect("throttled").until;
        // Imposed at x.5 s: it starts at the next whole second and lasts 60 s from there.
        assert_eq!(until, until_after(t.now_ms(), 60));
        assert_eq!(until - t.now_ms(), 60_500);
        advance(Duration::from_millis(until - t.now_ms() - 1)).await;
        assert_eq!(t.sender("t", "u").state, SanctionState::Throttle);
        advance(Duration::from_millis(1)).await;
        assert_eq!(t.sender("t", "u").state, SanctionState::Ok);
    }

    #[tokio::test(start_paused = true)]
    async fn repeat_offence_within_cooldown_escalates() {
        // Throttled, throttle expires, then a new violation inside / outside the cool-down.
        for (wait_secs, want, reason) in [
            (61, SanctionState::Mute, "repeat_offence"),
            (400, SanctionState::Throttle, "abuse_rate"),
        ] {
            let t = Tracker::new(cfg());
            t.record("t", "u", BLOCK);
            advance(secs(wait_secs)).await;
            assert_eq!(t.sender("t", "u").state, SanctionState::Ok);
            let (_, sanction) = t.record("t", "u", BLOCK);
            let sanction = sanction.expect("the score is over throttle_at again");
            assert_eq!(
                (sanction.action, sanction.reason.as_str()),
                (want, reason),
                "after {wait_secs} s"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn light_violations_below_throttle_do_not_sanction() {
        let t = Tracker::new(cfg());
        for _ in 0..3 {
            let (info, sanction) = t.record("t", "u", Outcome::Review { severity: 1.0 });
            assert_eq!((info.state, sanction), (SanctionState::Ok, None));
        }
        let (info, sanction) = t.record("t", "u", Outcome::Allow);
        assert_eq!((info.state, sanction), (SanctionState::Ok, None));
        assert!((info.risk - 1.5 / 8.0).abs() < 1e-6);
        // A fourth review reaches throttle_at.
        let (_, sanction) = t.record("t", "u", Outcome::Review { severity: 1.0 });
        assert_eq!(sanction.map(|s| s.action), Some(SanctionState::Throttle));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_users_are_evicted_sanctioned_ones_are_not() {
        let t = Tracker::new(cfg());
        t.precheck("t", "idle");
        t.record("t", "bad", BLOCK); // throttled until 60 s, cool-down until 360 s
        assert_eq!(t.tracked_users(), 2);
        advance(secs(119)).await;
        t.maintain();
        assert_eq!(t.tracked_users(), 2, "not idle for idle_evict_secs yet");
        advance(secs(1)).await;
        t.maintain();
        assert_eq!(t.tracked_users(), 1);
        assert_eq!(t.sender("t", "idle"), SenderInfo::CLEAN);
        // The sanction ended at 60 s, but the cool-down still protects the record.
        advance(secs(239)).await;
        t.maintain();
        assert_eq!(t.tracked_users(), 1);
        advance(secs(1)).await;
        t.maintain();
        assert_eq!(t.tracked_users(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn maintenance_task_evicts_and_stops_on_shutdown() {
        let t = Tracker::new(BehaviourConfig {
            maintenance_interval_secs: 30,
            ..cfg()
        });
        t.precheck("t", "idle");
        let shutdown = CancellationToken::new();
        let task = t.spawn_maintenance(shutdown.clone());
        tokio::time::sleep(secs(150)).await;
        for _ in 0..100 {
            if t.tracked_users() == 0 {
                break;
            }
            tokio::time::sleep(secs(1)).await;
        }
        assert_eq!(t.tracked_users(), 0);
        shutdown.cancel();
        task.await.expect("the maintenance task exits cleanly");
    }

    #[tokio::test(start_paused = true)]
    async fn max_tracked_users_bound_holds() {
        let t = Tracker::new(BehaviourConfig {
            max_tracked_users: 100,
            ..cfg()
        });
        t.record("t", "bad", BLOCK);
        for i in 0..1000u32 {
            if i.is_multiple_of(10) {
                advance(secs(1)).await;
            }
            t.precheck("t", &format!("user{i}"));
            assert!(t.tracked_users() <= 100, "{} after {i}", t.tracked_users());
        }
        assert!(t.tracked_users() >= 87, "a sweep keeps the shard 7/8 full");
        // The throttle has ended, but the cool-down kept the record (and its score).
        let bad = t.sender("t", "bad");
        assert!(bad.state == SanctionState::Ok && bad.risk > 0.2, "{bad:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn sanctions_are_never_dropped_for_space() {
        let t = Tracker::new(BehaviourConfig {
            max_tracked_users: 3,
            ..cfg()
        });
        for user in ["a", "b", "c"] {
            t.record("t", user, BLOCK);
        }
        // Full of sanctioned users: a newcomer goes untracked...
        let pre = t.precheck("t", "new");
        assert_eq!((pre.flooded, pre.sender), (false, SenderInfo::CLEAN));
        assert_eq!(t.tracked_users(), 3);
        // ...unless it earns a sanction, which is kept over the bound.
        let (_, sanction) = t.record("t", "d", BLOCK);
        assert!(sanction.is_some());
        assert_eq!(t.tracked_users(), 4);
        assert_eq!(t.sender("t", "d").state, SanctionState::Throttle);
        // Once the cool-downs pass, maintenance brings it back under the bound.
        advance(secs(400)).await;
        t.maintain();
        assert_eq!(t.tracked_users(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn flood_triggers_after_burst() {
        let t = Tracker::new(BehaviourConfig {
            flood_per_second: 1,
            flood_burst: 3,
            ..cfg()
        });
        let flooded: Vec<bool> = (0..5).map(|_| t.precheck("t", "u").flooded).collect();
        assert_eq!(flooded, [false, false, false, true, true]);
        assert!(!t.precheck("t", "other").flooded);
        // Flooding is reported, not sanctioned: the moderator decides what it costs.
        assert_eq!(t.sender("t", "u"), SenderInfo::CLEAN);
    }

    #[tokio::test(start_paused = true)]
    async fn tenants_with_the_same_user_id_are_independent() {
        let t = Tracker::new(BehaviourConfig {
            flood_per_second: 1,
            flood_burst: 1,
            ..cfg()
        });
        assert!(!t.precheck("t1", "u").flooded);
        assert!(t.precheck("t1", "u").flooded);
        assert!(!t.precheck("t2", "u").flooded);
        let (_, sanction) = t.record("t1", "u", BLOCK);
        assert!(sanction.is_some());
        assert_eq!(t.sender("t1", "u").state, SanctionState::Throttle);
        assert_eq!(t.sender("t2", "u"), SenderInfo::CLEAN);
        assert_eq!(t.tracked_users(), 2);
    }

    #[test]
    fn config_validation_rejects_bad_settings() {
        assert_eq!(BehaviourConfig::default().validate(), Ok(()));
        assert_eq!(cfg().validate(), Ok(()));
        type Edit = fn(&mut BehaviourConfig);
        let cases: &[(&str, Edit)] = &[
            ("thresholds must increase", |c| c.mute_at = c.throttle_at),
            ("thresholds must increase", |c| c.block_at = c.mute_at - 0.5),
            ("throttle_at", |c| c.throttle_at = 0.0),
            ("throttle_at", |c| c.block_at = f32::NAN),
            ("flood_per_second", |c| c.flood_per_second = 0),
            ("flood_burst", |c| c.flood_burst = 0),
            ("half_life_secs", |c| c.half_life_secs = 0.0),
            ("half_life_secs", |c| c.half_life_secs = f64::INFINITY),
            ("review_weight", |c| c.review_weight = -1.0),
            ("block_weight", |c| c.block_weight = c.review_weight),
            ("throttle_secs", |c| c.throttle_secs = 0),
            ("durations must not decrease", |c| {
                c.mute_secs = c.block_secs + 1
            }),
            ("block_secs", |c| {
                c.block_secs = u64::MAX;
                c.mute_secs = u64::MAX;
            }),
            ("max_tracked_users", |c| c.max_tracked_users = 0),
            ("idle_evict_secs", |c| c.idle_evict_secs = 1),
            ("maintenance_interval_secs", |c| {
                c.maintenance_interval_secs = 0
            }),
            ("dup_copies", |c| c.dup_copies = 1),
            ("near_dup_similarity", |c| c.near_dup_similarity = 0.1),
            ("near_dup_similarity", |c| c.near_dup_similarity = f32::NAN),
            ("raid_min_users", |c| c.raid_min_users = 1),
            ("harassment_flagged", |c| c.harassment_flagged = 0),
            ("room_alarm_flagged", |c| c.room_alarm_flagged = 70_000),
            ("room_window_secs", |c| c.room_window_secs = 0),
            ("max_tracked_rooms", |c| c.max_tracked_rooms = 0),
            ("redis_url", |c| {
                c.store = StoreKind::Redis;
                c.redis_url = "http://x".into();
            }),
            ("redis_key_prefix", |c| c.redis_key_prefix = "a b".into()),
            ("snapshot_path", |c| c.snapshot_path = Some(PathBuf::new())),
        ];
        let mut failures = Vec::new();
        for (i, (want, edit)) in cases.iter().enumerate() {
            let mut c = BehaviourConfig::default();
            edit(&mut c);
            match c.validate() {
                Err(e) if e.contains(want) => {}
                other => failures.push(format!("case {i} ({want}): {other:?}")),
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn config_parses_with_defaults_and_rejects_unknown_fields() {
        let c: BehaviourConfig = toml::from_str("flood_burst = 5\nmute_at = 9.5").expect("valid");
        assert_eq!((c.flood_burst, c.mute_at), (5, 9.5));
        assert_eq!(
            c.flood_per_second,
            BehaviourConfig::default().flood_per_second
        );
        assert!(toml::from_str::<BehaviourConfig>("flood_brust = 5").is_err());
        let c: BehaviourConfig = toml::from_str(
            "store = \"redis\"\nredis_url = \"redis://10.0.0.1:6379/\"\nsnapshot_path = \"/var/lib/cg/b.snap\"",
        )
        .expect("valid");
        assert_eq!(c.store, StoreKind::Redis);
        assert_eq!(c.snapshot_path, Some(PathBuf::from("/var/lib/cg/b.snap")));
        assert!(toml::from_str::<BehaviourConfig>("store = \"etcd\"").is_err());
    }

    #[test]
    fn wire_shapes() {
        let clean = serde_json::to_string(&SenderInfo::CLEAN).expect("serializable");
        assert_eq!(clean, r#"{"risk":0.0,"state":"ok"}"#);
        let sanction = Sanction {
            user: "u42".into(),
            action: SanctionState::Mute,
            until: 1_700_000_000_000,
            reason: "abuse_rate".into(),
        };
        assert_eq!(
            serde_json::to_string(&sanction).expect("serializable"),
            r#"{"user":"u42","action":"mute","until":1700000000000,"reason":"abuse_rate"}"#
        );
    }

    #[test]
    fn concurrent_senders_are_all_counted() {
        let t = Tracker::new(BehaviourConfig::default());
        let threads: Vec<_> = (0..4)
            .map(|n| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        let user = format!("u{}", (i + n * 2_500) % 12_500);
                        t.precheck("t", &user);
                        t.record("t", &user, Outcome::Review { severity: 0.1 });
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("no panics in tracker calls");
        }
        assert_eq!(t.tracked_users(), 12_500);
    }

    #[test]
    fn tracker_is_send_sync_and_works_outside_a_runtime() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<Tracker>();
        let t = Tracker::new(BehaviourConfig::default());
        assert!(!t.precheck("t", "u").flooded);
        assert_eq!(t.tracked_users(), 1);
    }
}

#[cfg(test)]
mod signal_tests {
    //! The signals through the tracker API, under a paused clock.
    use super::*;
    use tokio::time::advance;

    fn cfg() -> BehaviourConfig {
        BehaviourConfig {
            dup_copies: 3,
            dup_window_secs: 60,
            raid_min_users: 3,
            raid_window_secs: 60,
            harassment_flagged: 3,
            harassment_window_secs: 600,
            room_alarm_flagged: 3,
            room_window_secs: 60,
            room_alarm_cooldown_secs: 300,
            ..BehaviourConfig::default()
        }
    }

    fn msg<'a>(t: &Tracker, user: &'a str, text: &'a str) -> MessageFacts<'a> {
        MessageFacts {
            user,
            room: Some("r1"),
            to: None,
            text,
            print: t.fingerprint(text),
        }
    }

    const SPAM: &str = "Visit cheapfollowers dot com for 10000 followers today";

    #[tokio::test(start_paused = true)]
    async fn duplicates_are_spam_from_the_third_copy_and_expire() {
        let t = Tracker::new(cfg());
        let spam: Vec<Option<Spam>> = ["a", "b", "c"]
            .iter()
            .map(|_| t.precheck_message("t", &msg(&t, "u", SPAM)).spam)
            .collect();
        assert_eq!(spam, [None, None, Some(Spam::Duplicate)]);
        // A near copy (a word changed) is still a copy.
        let near = "Visit cheapfollowers dot com for 10000 followers now";
        assert_eq!(
            t.precheck_message("t", &msg(&t, "u", near)).spam,
            Some(Spam::Duplicate)
        );
        // Another sender is not affected; short texts are never compared.
        assert_eq!(t.precheck_message("t", &msg(&t, "v", SPAM)).spam, None);
        assert!(t.fingerprint("ok ok").is_none());
        // After a quiet window the count starts over.
        advance(Duration::from_secs(61)).await;
        assert_eq!(t.precheck_message("t", &msg(&t, "u", SPAM)).spam, None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_text_from_many_users_is_a_raid() {
        let t = Tracker::new(cfg());
        let spam: Vec<Option<Spam>> = ["u1", "u2", "u3", "u4"]
            .iter()
            .map(|u| t.precheck_message("t", &msg(&t, u, SPAM)).spam)
            .collect();
        assert_eq!(spam, [None, None, Some(Spam::Raid), Some(Spam::Raid)]);
        // Per tenant, and per room.
        assert_eq!(t.precheck_message("t2", &msg(&t, "u1", SPAM)).spam, None);
        let elsewhere = MessageFacts {
            room: Some("r2"),
            ..msg(&t, "u5", SPAM)
        };
        assert_eq!(t.precheck_message("t", &elsewhere).spam, None);
        advance(Duration::from_secs(60)).await;
        assert_eq!(t.precheck_message("t", &msg(&t, "u5", SPAM)).spam, None);
        t.maintain();
    }

    #[tokio::test(start_paused = true)]
    async fn flagged_messages_to_one_target_become_harassment() {
        let t = Tracker::new(cfg());
        let review = Outcome::Review { severity: 0.3 };
        let to_victim = |text| MessageFacts {
            user: "bully",
            room: None,
            to: Some("victim"),
            text,
            print: None,
        };
        assert!(
            !t.record_message("t", &to_victim("you idiot"), review)
                .harassment
        );
        // A mention of the same target counts for the same pair.
        let mention = MessageFacts {
            to: None,
            ..to_victim("@victim you idiot")
        };
        assert!(!t.record_message("t", &mention, review).harassment);
        // Clean messages do not count.
        assert!(
            !t.record_message("t", &to_victim("hi"), Outcome::Allow)
                .harassment
        );
        let third = t.record_message("t", &to_victim("idiot"), review);
        assert!(third.harassment);
        // Harassment counts as a block of severity 1.0: with the defaults, 0.15 + 0.15 + 2.0.
        assert!(
            (third.sender.risk - 2.3 / 16.0).abs() < 1e-3,
            "{:?}",
            third.sender
        );
        // Another target of the same sender is a new pair.
        let other = MessageFacts {
            to: Some("someone"),
            ..to_victim("idiot")
        };
        assert!(!t.record_message("t", &other, review).harassment);
        advance(Duration::from_secs(600)).await;
        assert!(
            !t.record_message("t", &to_victim("idiot"), review)
                .harassment
        );
    }

    #[tokio::test(start_paused = true)]
    async fn harassment_sanctions_say_so() {
        let t = Tracker::new(BehaviourConfig {
            throttle_at: 2.5,
            ..cfg()
        });
        let to_victim = MessageFacts {
            user: "bully",
            to: Some("victim"),
            ..MessageFacts::default()
        };
        let review = Outcome::Review { severity: 1.0 };
        t.record_message("t", &to_victim, review);
        t.record_message("t", &to_victim, review);
        let third = t.record_message("t", &to_victim, review);
        let sanction = third.sanction.expect("0.5 + 0.5 + 2.0 reaches throttle_at");
        assert_eq!(sanction.reason, "harassment");
    }

    #[tokio::test(start_paused = true)]
    async fn flagged_messages_in_a_room_raise_one_alarm_per_cooldown() {
        let t = Tracker::new(cfg());
        let flagged = Outcome::Review { severity: 0.3 };
        let alarms: Vec<bool> = (0..5)
            .map(|i| {
                let user = format!("u{i}");
                let m = MessageFacts {
                    user: &user,
                    room: Some("r1"),
                    ..MessageFacts::default()
                };
                t.record_message("t", &m, flagged).room_alarm.is_some()
            })
            .collect();
        assert_eq!(alarms, [false, false, true, false, false]);
        // Clean messages and other rooms do not count.
        let clean = MessageFacts {
            user: "u",
            room: Some("r2"),
            ..MessageFacts::default()
        };
        for _ in 0..5 {
            assert!(
                t.record_message("t", &clean, Outcome::Allow)
                    .room_alarm
                    .is_none()
            );
        }
        advance(Duration::from_secs(300)).await;
        let m = MessageFacts {
            user: "u",
            room: Some("r1"),
            ..MessageFacts::default()
        };
        let alarm = (0..3)
            .filter_map(|_| t.record_message("t", &m, flagged).room_alarm)
            .next()
            .expect("a new alarm after the cool-down");
        assert_eq!(
            (alarm.room.as_str(), alarm.flagged, alarm.threshold),
            ("r1", 3, 3)
        );
        assert_eq!(alarm.window_secs, 60);
        assert_eq!(alarm.at, t.now_ms());
    }

    #[tokio::test(start_paused = true)]
    async fn sanctions_by_hand_apply_and_lift() {
        let t = Tracker::new(cfg());
        let s = t.set_sanction("t", "u", SanctionState::Mute, Some(600), "moderator");
        assert_eq!(
            (s.action, s.reason.as_str()),
            (SanctionState::Mute, "moderator")
        );
        assert_eq!(s.until, until_after(t.now_ms(), 600));
        assert_eq!(t.sender("t", "u").state, SanctionState::Mute);
        // By hand, a milder sanction replaces a harsher one.
        t.set_sanction("t", "u", SanctionState::Throttle, None, "moderator");
        let info = t.sender("t", "u");
        assert_eq!(info.state, SanctionState::Throttle);
        assert_eq!(info.until, Some(until_after(t.now_ms(), 60)));
        // Lifting clears the score and the cool-down: the next violation starts from scratch.
        for _ in 0..3 {
            t.record("t", "u", Outcome::Block { severity: 1.0 });
        }
        let lifted = t.set_sanction("t", "u", SanctionState::Ok, None, "appeal");
        assert_eq!(
            (lifted.action, lifted.until),
            (SanctionState::Ok, t.now_ms())
        );
        assert_eq!(t.sender("t", "u"), SenderInfo::CLEAN);
        let (_, next) = t.record("t", "u", Outcome::Block { severity: 1.0 });
        assert_eq!(next, None, "2.0 is under throttle_at 4.0 again");
        advance(Duration::from_secs(1)).await;
    }

    fn until_after(now_ms: u64, secs: u64) -> u64 {
        now_ms.div_ceil(1000) * 1000 + secs * 1000
    }
}
