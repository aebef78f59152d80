//! The [`Tracker`] handle.
//!
//! Takes (tenant, user) before moderation and the [`Outcome`] after it; gives back a
//! [`Precheck`], the sender's [`SenderInfo`] and, when the sender's state escalates, a
//! [`Sanction`] for the server to push. Called by the moderator on every message, by the server
//! for the maintenance task. A cheap-to-clone handle over the store; every call is synchronous,
//! touches one shard lock at a time and never holds it across I/O or `.await`.

use super::state::{Escalation, Now, UserState};
use super::store::{FloodState, KeyHasher, MemoryStore, UserKey};
use super::{BehaviourConfig, Outcome, Precheck, Sanction, SanctionState, SenderInfo};
use governor::clock::DefaultClock;
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Per-sender flood limit, abuse score and sanctions. Clones share the same state.
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
    /// Turns (tenant, user) into a store key.
    keys: KeyHasher,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

impl Tracker {
    /// A tracker with no users. `cfg` should have passed [`BehaviourConfig::validate`]; values
    /// it would reject are clamped rather than trusted (a zero rate counts as 1 per second).
    pub fn new(cfg: BehaviourConfig) -> Tracker {
        let store = Arc::new(MemoryStore::new(&cfg));
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
                cfg,
                store,
                flood,
                keys: KeyHasher::random(),
            }),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &BehaviourConfig {
        &self.inner.cfg
    }

    /// Before moderation: counts this message against the sender's flood limit and reports the
    /// sender's state. Starts tracking a new sender.
    pub fn precheck(&self, tenant: &str, user: &str) -> Precheck {
        let key = self.key(tenant, user);
        let flooded = self.inner.flood.check_key(&key).is_err();
        Precheck {
            flooded,
            sender: self.sender_by_key(key),
        }
    }

    /// After moderation: adds the outcome to the sender's score. Returns the sender's state and,
    /// when it escalated, the sanction to push.
    pub fn record(
        &self,
        tenant: &str,
        user: &str,
        outcome: Outcome,
    ) -> (SenderInfo, Option<Sanction>) {
        let key = self.key(tenant, user);
        let store = &self.inner.store;
        let now = store.now();
        let (state, escalation) = store.update(key, now, |s| {
            let escalation = s.record(now, outcome, store.policy());
            (*s, escalation)
        });
        let Some(Escalation {
            action,
            duration_secs,
            reason,
        }) = escalation
        else {
            return (self.info(&state, now), None);
        };
        let until = unix_now_ms().saturating_add(u64::from(duration_secs) * 1000);
        tracing::debug!(tenant, user, ?action, until, reason, "sender sanctioned");
        let info = SenderInfo {
            risk: store.policy().risk(state.score),
            state: action,
            until: Some(until),
        };
        let sanction = Sanction {
            user: user.to_owned(),
            action,
            until,
            reason: reason.to_owned(),
        };
        (info, Some(sanction))
    }

    /// The sender's current state, without counting a message or starting to track them.
    pub fn sender(&self, tenant: &str, user: &str) -> SenderInfo {
        self.sender_by_key(self.key(tenant, user))
    }

    /// How many senders are tracked now.
    pub fn tracked_users(&self) -> usize {
        self.inner.store.len()
    }

    /// Drops idle senders that hold no sanction or cool-down (see the module docs). Takes one
    /// shard lock at a time; a few milliseconds per million tracked users.
    pub fn maintain(&self) {
        let store = &self.inner.store;
        let evicted = store.evict_idle(store.now());
        tracing::debug!(evicted, tracked = store.len(), "behaviour maintenance");
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

    fn key(&self, tenant: &str, user: &str) -> UserKey {
        self.inner.keys.user_key(tenant, user)
    }

    fn sender_by_key(&self, key: UserKey) -> SenderInfo {
        let store = &self.inner.store;
        match store.get(key) {
            Some(state) => self.info(&state, store.now()),
            None => SenderInfo::CLEAN,
        }
    }

    /// The wire view of a record at `now`.
    fn info(&self, state: &UserState, now: Now) -> SenderInfo {
        let policy = self.inner.store.policy();
        let active = state.active(now.tick);
        let until = (active != SanctionState::Ok).then(|| {
            let remaining_ms = (u64::from(state.until) * 1000).saturating_sub(now.elapsed_ms);
            unix_now_ms().saturating_add(remaining_ms)
        });
        SenderInfo {
            risk: policy.risk(state.score_at(now.tick, policy)),
            state: active,
            until,
        }
    }
}

/// The system clock in unix milliseconds (0 if it is set before 1970).
fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
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

    /// Asserts `until` is `secs` seconds after a system-clock reading taken in `[before, after]`.
    fn assert_until(until: u64, before: u64, after: u64, secs: u64) {
        let range = before + secs * 1000..=after + secs * 1000;
        assert!(range.contains(&until), "until {until} not in {range:?}");
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
            let before = unix_now_ms();
            let (info, sanction) = t.record("t", "u", BLOCK);
            let after = unix_now_ms();
            let sanction = sanction.expect("each block escalates one step");
            assert_eq!(
                (sanction.action, sanction.reason.as_str()),
                (action, reason)
            );
            assert_eq!(sanction.user, "u");
            assert_until(sanction.until, before, after, duration_secs);
            assert_eq!(info.state, action);
            assert_eq!(info.until, Some(sanction.until));
            // Read back later: same state, same deadline (within the system clock's progress).
            let read = t.sender("t", "u");
            assert_eq!(read.state, action);
            let until = read.until.expect("a sanction has an end");
            assert!(
                until.abs_diff(sanction.until) < 1000,
                "{until} vs {}",
                sanction.until
            );
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
        t.record("t", "u", BLOCK);
        // Reported end is at 60.5 s; the whole-second clock keeps it until 61 s.
        advance(Duration::from_millis(59_900)).await;
        assert_eq!(t.sender("t", "u").state, SanctionState::Throttle);
        advance(Duration::from_millis(600)).await;
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
