//! The `redis` backend: one behaviour record per user shared by every sidecar.
//!
//! Takes the tracker's changes (violations, sanctions by hand, first sight of a user) through a
//! bounded queue; a write-behind task applies them to the shared records in Redis and applies
//! the results — and every other sidecar's sanctions, received on a pub/sub channel — to the
//! local store, pushing a [`Sanction`] event for each change in force. Called by the tracker
//! (`submit`, `sync`, `shutdown`, `degraded`); no verdict ever waits for Redis.
//!
//! ## Keys (`P` = `redis_key_prefix`, `M` = `<tenant byte length>:<tenant>:<user>`)
//! Needs Redis 6.2 or later (`ZRANGE ... BYSCORE LIMIT`).
//!
//! - `P:u:M` — the user's saved record, `"<version>|<score> <seen> <until> <level>"` (unix
//!   seconds, level 0..=3), with a TTL to the end of its cool-down or idle time.
//! - `P:sanctions` — sorted set of `M` by the unix ms until which the record must be kept
//!   (sanction + cool-down): pulled on (re)connect, trimmed once a minute.
//! - `P:events` — pub/sub channel of sanction changes (JSON [`Wire`]).
//!
//! ## Updates
//! A batch of queued changes is applied in two pipelined round trips: `GET` every touched
//! record, apply the changes with the same `state` rules the memory store uses (a violation is
//! replayed on the shared record, so other sidecars' violations count; the local record is then
//! merged in; a sanction by hand overwrites), then one Lua compare-and-set per record that
//! bumps the version, sets the TTL, updates the index and publishes — all or nothing. A record
//! another sidecar changed in between fails its compare-and-set and is redone in the next batch.
//!
//! ## Outages
//! Every round trip has `redis_timeout_ms`. On any error the backend marks itself degraded,
//! keeps queueing (oldest dropped beyond `redis_max_pending`), and reconnects with backoff
//! (0.1 s doubling to 2 s); a lost pub/sub connection counts as an error too. On reconnect it
//! replays the queue, then pulls every record in the sanction index and merges it locally, and
//! only then clears the degraded flag.

use super::backend::{Backend, Change};
use super::state::{Now, Policy, SavedUser, UserState};
use super::store::{KeyHasher, MemoryStore, unix_now_ms};
use super::{BehaviourConfig, BehaviourError, Outcome, Sanction, SanctionState};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Changes queued between the tracker and the task before `submit` starts dropping.
const QUEUE_LEN: usize = 65_536;
/// Most records one batch touches.
const BATCH: usize = 512;
/// Compare-and-set attempts for one change before it is dropped with an error.
const MAX_ATTEMPTS: u8 = 8;
/// Members read per page when pulling the sanction index.
const PULL_PAGE: isize = 1000;
/// Backoff bounds between reconnect attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often an idle connection is checked (and the index trimmed every 60th time).
const PING_EVERY: Duration = Duration::from_secs(1);

/// Compare-and-set of one record: KEYS = record, index; ARGV = expected version, new value,
/// TTL ms, index score (or ''), index member, event JSON (or ''), channel.
const CAS_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
local ver = 0
if cur then ver = tonumber(string.match(cur, '^(%d+)|')) or 0 end
if ver ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], (ver + 1) .. '|' .. ARGV[2], 'PX', ARGV[3])
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5]) end
if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[7], ARGV[6]) end
return 1
";

/// What the task needs from the tracker: the local store to merge into, the key hasher, the
/// journal to record merged sanctions in, and where to push events.
pub(crate) struct Local {
    /// The local store.
    pub(crate) store: Arc<MemoryStore>,
    /// Local keys of (tenant, user).
    pub(crate) keys: KeyHasher,
    /// The file backend, when `snapshot_path` is set: merged sanctions are journaled too.
    pub(crate) journal: Option<Arc<dyn Backend>>,
    /// Sanction events for the tenant's connections.
    pub(crate) events_tx: mpsc::Sender<(Arc<str>, Sanction)>,
}

impl Local {
    /// Folds a shared record into the local one (`manual`: overwrite instead); pushes an event
    /// and journals when the sanction in force changed.
    fn apply(&self, tenant: &Arc<str>, user: &str, saved: &SavedUser, manual: bool, reason: &str) {
        let key = self.keys.user_key(tenant, user);
        let store = &self.store;
        let now = store.now();
        let policy = store.policy();
        let changed = store.update(key, now, |u, _| {
            let changed = if manual {
                let before = (u.active(now.tick), u.until);
                u.overwrite(saved);
                (u.active(now.tick), u.until) != before
            } else {
                u.merge(saved, now.tick, policy)
            };
            if changed && let Some(j) = &self.journal {
                j.submit(&Change::Sanction {
                    key,
                    tenant: tenant.clone(),
                    user: user.into(),
                    saved: u.saved(),
                    manual,
                    reason: reason.into(),
                });
            }
            changed.then(|| (u.active(now.tick), u.until))
        });
        let Some((action, until)) = changed else {
            return;
        };
        let until = if action == SanctionState::Ok {
            now.unix_ms
        } else {
            u64::from(until) * 1000
        };
        let event = Sanction {
            user: user.to_owned(),
            action,
            until,
            reason: reason.to_owned(),
        };
        if self.events_tx.try_send((tenant.clone(), event)).is_err() {
            tracing::debug!("sanction event from shared state not delivered (no listener or full)");
        }
    }
}

/// A sanction change on the pub/sub channel.
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    /// The sidecar that made it (it ignores its own).
    origin: u64,
    /// The tenant.
    tenant: String,
    /// The user.
    user: String,
    /// The saved record after the change ([`SavedUser::encode`]).
    record: String,
    /// Set by hand: overwrite instead of merge.
    manual: bool,
    /// The sanction event's reason.
    reason: String,
}

/// One queued change.
#[derive(Debug, Clone)]
enum Op {
    /// Replay `outcome` at `at`, then merge `local`.
    Violation {
        outcome: Outcome,
        at: Now,
        local: SavedUser,
    },
    /// Overwrite with `saved`.
    Manual { saved: SavedUser, reason: Box<str> },
    /// Read only.
    Fetch,
}

/// A change with its user and how often it was tried.
#[derive(Debug, Clone)]
struct Queued {
    tenant: Arc<str>,
    user: Box<str>,
    op: Op,
    attempts: u8,
}

/// Requests to the task besides changes.
enum Control {
    /// Answer once the queue is empty (written, or parked while Redis is down).
    Sync(oneshot::Sender<()>),
    /// Flush what can be flushed within the timeout, then stop.
    Shutdown(oneshot::Sender<()>),
}

/// The `redis` backend's handle.
pub(crate) struct RedisBackend {
    /// Changes to the task.
    ops_tx: mpsc::Sender<Queued>,
    /// Sync and shutdown requests.
    control_tx: mpsc::UnboundedSender<Control>,
    /// Redis is unreachable (or not reached yet).
    degraded: Arc<AtomicBool>,
    /// Changes dropped because the queue was full.
    dropped: AtomicU64,
    /// The task, until shutdown.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl RedisBackend {
    /// Starts the write-behind task (it connects in the background; until it has, the backend
    /// is degraded). Must be called within a tokio runtime.
    pub(crate) fn start(
        cfg: &BehaviourConfig,
        policy: Policy,
        local: Local,
    ) -> Result<RedisBackend, BehaviourError> {
        let client = redis::Client::open(cfg.redis_url.as_str())
            .map_err(|e| BehaviourError::RedisUrl(e.to_string()))?;
        let (ops_tx, ops_rx) = mpsc::channel(QUEUE_LEN);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let degraded = Arc::new(AtomicBool::new(true));
        let prefix = cfg.redis_key_prefix.clone();
        let task = Task {
            client,
            timeout: Duration::from_millis(cfg.redis_timeout_ms.max(1)),
            index: format!("{prefix}:sanctions"),
            channel: format!("{prefix}:events"),
            prefix,
            script: redis::Script::new(CAS_SCRIPT),
            origin: std::collections::hash_map::RandomState::new().hash_one(unix_now_ms()),
            policy,
            local,
            degraded: degraded.clone(),
            max_pending: cfg.redis_max_pending.max(1),
            pending: VecDeque::new(),
            ops_rx,
            control_rx,
            syncs: Vec::new(),
            lost: 0,
        };
        let handle = tokio::spawn(task.run());
        Ok(RedisBackend {
            ops_tx,
            control_tx,
            degraded,
            dropped: AtomicU64::new(0),
            task: Mutex::new(Some(handle)),
        })
    }

    fn queue(&self, tenant: &Arc<str>, user: &str, op: Op) {
        let queued = Queued {
            tenant: tenant.clone(),
            user: user.into(),
            op,
            attempts: 0,
        };
        if self.ops_tx.try_send(queued).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(dropped = n + 1, "shared-state queue full: changes dropped");
            }
        }
    }
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn wants_activity(&self) -> bool {
        true
    }

    fn submit(&self, change: &Change) {
        match change {
            Change::Violation {
                tenant,
                user,
                outcome,
                at,
                local,
            } => self.queue(
                tenant,
                user,
                Op::Violation {
                    outcome: *outcome,
                    at: *at,
                    local: *local,
                },
            ),
            Change::Sanction {
                tenant,
                user,
                saved,
                manual: true,
                reason,
                ..
            } => self.queue(
                tenant,
                user,
                Op::Manual {
                    saved: *saved,
                    reason: reason.clone(),
                },
            ),
            // Escalations reach Redis as the violation that caused them.
            Change::Sanction { .. } => {}
            Change::FirstSight { tenant, user } => self.queue(tenant, user, Op::Fetch),
        }
    }

    fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    fn sync(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (done_tx, done_rx) = oneshot::channel();
            if self.control_tx.send(Control::Sync(done_tx)).is_ok() {
                let _ = done_rx.await;
            }
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (done_tx, done_rx) = oneshot::channel();
            if self.control_tx.send(Control::Shutdown(done_tx)).is_ok() {
                let _ = done_rx.await;
            }
            let task = self
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(task) = task {
                let _ = task.await;
            }
        })
    }
}

/// Why the connected loop ended.
enum Exit {
    /// Redis failed; reconnect.
    Lost(String),
    /// Shutdown requested (and answered).
    Stop,
}

/// The write-behind task's state.
struct Task {
    /// Opens connections.
    client: redis::Client,
    /// Longest wait for one round trip.
    timeout: Duration,
    /// Key prefix.
    prefix: String,
    /// The sanction index key.
    index: String,
    /// The pub/sub channel.
    channel: String,
    /// The compare-and-set script.
    script: redis::Script,
    /// This sidecar's id on the channel.
    origin: u64,
    /// The rules.
    policy: Policy,
    /// The local side.
    local: Local,
    /// Shared with the handle.
    degraded: Arc<AtomicBool>,
    /// Most changes parked while Redis is down.
    max_pending: usize,
    /// Changes not yet written, oldest first.
    pending: VecDeque<Queued>,
    /// From the handle.
    ops_rx: mpsc::Receiver<Queued>,
    /// From the handle.
    control_rx: mpsc::UnboundedReceiver<Control>,
    /// Sync requests to answer once `pending` is empty.
    syncs: Vec<oneshot::Sender<()>>,
    /// Changes dropped from `pending` for space since the last report.
    lost: u64,
}

type Conn = redis::aio::MultiplexedConnection;

impl Task {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.connect().await {
                Ok((mut conn, pubsub)) => {
                    backoff = BACKOFF_MIN;
                    match self.serve(&mut conn, pubsub).await {
                        Exit::Stop => return,
                        Exit::Lost(why) => {
                            if !self.degraded.swap(true, Ordering::Relaxed) {
                                tracing::warn!(error = %why,
                                    "shared state (Redis) lost: answering from local state");
                            }
                        }
                    }
                }
                Err(why) => {
                    self.degraded.store(true, Ordering::Relaxed);
                    tracing::debug!(error = %why, "shared state (Redis) unreachable");
                }
            }
            if self.wait_offline(backoff).await {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Runs `fut` with the round-trip timeout.
    async fn timed<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Err(_) => Err(format!("{what}: no answer within {:?}", self.timeout)),
        }
    }

    async fn connect(&mut self) -> Result<(Conn, redis::aio::PubSubStream), String> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let mut conn = self
            .timed(
                "connect",
                self.client
                    .get_multiplexed_async_connection_with_config(&config),
            )
            .await?;
        let mut pubsub = self
            .timed("connect pub/sub", self.client.get_async_pubsub())
            .await?;
        self.timed("subscribe", pubsub.subscribe(&self.channel))
            .await?;
        let load = self.script.prepare_invoke();
        let _: String = self
            .timed("load script", load.load_async(&mut conn))
            .await?;
        Ok((conn, pubsub.into_on_message()))
    }

    /// Connected: reconcile, then serve changes, the channel and control until Redis fails or
    /// the tracker shuts down.
    async fn serve(&mut self, conn: &mut Conn, mut events: redis::aio::PubSubStream) -> Exit {
        if let Err(e) = self.flush(conn).await {
            return Exit::Lost(e);
        }
        if let Err(e) = self.pull(conn).await {
            return Exit::Lost(e);
        }
        if self.degraded.swap(false, Ordering::Relaxed) {
            tracing::info!("shared state (Redis) connected");
        }
        self.answer_syncs();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pings = 0u32;
        loop {
            tokio::select! {
                op = self.ops_rx.recv() => {
                    let Some(op) = op else {
                        // The tracker is gone without a shutdown: write what is left.
                        let _ = self.flush(conn).await;
                        return Exit::Stop;
                    };
                    self.park(op);
                    self.drain_queue();
                    if let Err(e) = self.flush(conn).await {
                        return Exit::Lost(e);
                    }
                    self.answer_syncs();
                }
                msg = events.next() => match msg {
                    Some(msg) => self.on_event(msg.get_payload_bytes()),
                    None => return Exit::Lost("pub/sub connection closed".into()),
                },
                control = self.control_rx.recv() => match control {
                    Some(Control::Sync(done)) => {
                        self.syncs.push(done);
                        self.drain_queue();
                        if let Err(e) = self.flush(conn).await {
                            return Exit::Lost(e);
                        }
                        self.answer_syncs();
                    }
                    Some(Control::Shutdown(done)) => {
                        self.drain_queue();
                        if let Err(e) = self.flush(conn).await {
                            tracing::warn!(error = %e, unsent = self.pending.len(),
                                "shared state (Redis): changes not written at shutdown");
                        }
                        self.answer_syncs();
                        let _ = done.send(());
                        return Exit::Stop;
                    }
                    None => return Exit::Stop,
                },
                _ = ping.tick() => {
                    pings = pings.wrapping_add(1);
                    let ping_cmd = redis::cmd("PING");
                    let pong: Result<String, String> =
                        self.timed("ping", ping_cmd.query_async(conn)).await;
                    if let Err(e) = pong {
                        return Exit::Lost(e);
                    }
                    if pings.is_multiple_of(60) {
                        let mut trim = redis::cmd("ZREMRANGEBYSCORE");
                        trim.arg(&self.index).arg("-inf").arg(unix_now_ms());
                        let trimmed: Result<i64, String> =
                            self.timed("trim index", trim.query_async(conn)).await;
                        if let Err(e) = trimmed {
                            return Exit::Lost(e);
                        }
                    }
                }
            }
        }
    }

    /// Redis is down: park changes and answer control for `wait`. True when shutting down.
    async fn wait_offline(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return false,
                op = self.ops_rx.recv() => match op {
                    Some(op) => self.park(op),
                    None => return true,
                },
                control = self.control_rx.recv() => match control {
                    // Parked is as far as a change gets while Redis is down.
                    Some(Control::Sync(done)) => {
                        self.drain_queue();
                        let _ = done.send(());
                    }
                    Some(Control::Shutdown(done)) => {
                        self.drain_queue();
                        if !self.pending.is_empty() {
                            tracing::warn!(unsent = self.pending.len(),
                                "shared state (Redis) unreachable at shutdown: changes not written");
                        }
                        let _ = done.send(());
                        return true;
                    }
                    None => return true,
                },
            }
        }
    }

    /// Moves everything queued into `pending`.
    fn drain_queue(&mut self) {
        while let Ok(op) = self.ops_rx.try_recv() {
            self.park(op);
        }
    }

    /// Adds a change to `pending`, dropping the oldest beyond `max_pending`.
    fn park(&mut self, op: Queued) {
        self.pending.push_back(op);
        while self.pending.len() > self.max_pending {
            self.pending.pop_front();
            self.lost += 1;
            if self.lost.is_power_of_two() {
                tracing::warn!(
                    dropped = self.lost,
                    "shared state (Redis) down too long: oldest queued changes dropped \
                     (behaviour.redis_max_pending)"
                );
            }
        }
    }

    fn answer_syncs(&mut self) {
        if self.pending.is_empty() {
            for done in self.syncs.drain(..) {
                let _ = done.send(());
            }
        }
    }

    fn record_key(&self, member: &str) -> String {
        format!("{}:u:{member}", self.prefix)
    }

    /// Writes `pending` in batches until it is empty; an error leaves the rest in `pending`.
    async fn flush(&mut self, conn: &mut Conn) -> Result<(), String> {
        while !self.pending.is_empty() {
            let take = self.pending.len().min(BATCH);
            let batch: Vec<Queued> = self.pending.drain(..take).collect();
            match self.write_batch(conn, &batch).await {
                Ok(retry) => {
                    // Lost compare-and-sets go first next time, in their order.
                    for q in retry.into_iter().rev() {
                        self.pending.push_front(q);
                    }
                }
                Err(e) => {
                    for q in batch.into_iter().rev() {
                        self.pending.push_front(q);
                    }
                    return Err(e);
                }
            }
            // More may have arrived meanwhile.
            self.drain_queue();
        }
        Ok(())
    }

    /// Applies one batch (two round trips); returns the changes whose compare-and-set lost
    /// a race and must be redone.
    async fn write_batch(
        &mut self,
        conn: &mut Conn,
        batch: &[Queued],
    ) -> Result<Vec<Queued>, String> {
        // Group by user, keeping each user's changes in order.
        let mut users: Vec<(String, &Queued, Vec<&Queued>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for q in batch {
            let member = member(&q.tenant, &q.user);
            match index.get(&member) {
                Some(&i) => users[i].2.push(q),
                None => {
                    index.insert(member.clone(), users.len());
                    users.push((member, q, vec![q]));
                }
            }
        }
        let mut get = redis::pipe();
        for (member, _, _) in &users {
            get.get(self.record_key(member));
        }
        let current: Vec<Option<String>> =
            self.timed("read records", get.query_async(conn)).await?;

        let now = Now::from_unix_ms(unix_now_ms());
        let mut cas = redis::pipe();
        let mut written: Vec<(usize, SavedUser, bool, String)> = Vec::new();
        let mut fetched: Vec<(usize, SavedUser)> = Vec::new();
        for (i, ((member, first, ops), value)) in users.iter().zip(&current).enumerate() {
            let (version, shared) = match value.as_deref().map(parse_value) {
                Some(Some((v, s))) => (v, Some(s)),
                Some(None) => {
                    tracing::warn!(member = %member, "unreadable shared record replaced");
                    (version_of(value.as_deref()), None)
                }
                None => (0, None),
            };
            let mut rec = shared.map_or_else(|| UserState::new(now.tick), |s| s.to_state());
            let before = (rec.active(now.tick), rec.level, rec.until);
            let mut changed = false;
            let mut manual = false;
            let mut reason: Option<String> = None;
            for q in ops {
                match &q.op {
                    Op::Violation { outcome, at, local } => {
                        if let Some(e) = rec.record(*at, *outcome, &self.policy) {
                            reason = Some(e.reason.to_owned());
                        }
                        rec.merge(local, now.tick, &self.policy);
                        changed = true;
                    }
                    Op::Manual { saved, reason: why } => {
                        rec.overwrite(saved);
                        manual = true;
                        reason = Some(why.to_string());
                        changed = true;
                    }
                    Op::Fetch => {}
                }
            }
            let saved = rec.saved();
            if !changed {
                if let Some(s) = shared {
                    fetched.push((i, s));
                }
                continue;
            }
            let sanction_changed = manual || (rec.active(now.tick), rec.level, rec.until) != before;
            let reason = reason.unwrap_or_else(|| "abuse_rate".into());
            let event = if sanction_changed {
                serde_json::to_string(&Wire {
                    origin: self.origin,
                    tenant: first.tenant.to_string(),
                    user: first.user.to_string(),
                    record: saved.encode(),
                    manual,
                    reason: reason.clone(),
                })
                .unwrap_or_default()
            } else {
                String::new()
            };
            let keep_until = saved.keep_until_ms(&self.policy);
            let ttl_ms = keep_until.saturating_sub(now.unix_ms).max(1000);
            let index_score = if saved.level != SanctionState::Ok || manual {
                keep_until.to_string()
            } else {
                String::new()
            };
            cas.invoke_script(
                self.script
                    .key(self.record_key(member))
                    .key(&self.index)
                    .arg(version)
                    .arg(saved.encode())
                    .arg(ttl_ms)
                    .arg(index_score)
                    .arg(member)
                    .arg(event)
                    .arg(&self.channel),
            );
            written.push((i, saved, manual, reason));
        }
        let mut retry = Vec::new();
        if !written.is_empty() {
            let results: Result<Vec<i64>, String> =
                self.timed("write records", cas.query_async(conn)).await;
            let results = match results {
                Err(e) if e.contains("NOSCRIPT") => {
                    let load = self.script.prepare_invoke();
                    let _: String = self.timed("load script", load.load_async(conn)).await?;
                    return Err(e);
                }
                other => other?,
            };
            for ((i, saved, manual, reason), ok) in written.into_iter().zip(results) {
                let (_, first, ops) = &users[i];
                if ok == 1 {
                    self.local
                        .apply(&first.tenant, &first.user, &saved, manual, &reason);
                } else {
                    for q in ops {
                        let mut q = (*q).clone();
                        q.attempts += 1;
                        if q.attempts < MAX_ATTEMPTS {
                            retry.push(q);
                        } else {
                            tracing::error!(user = %q.user,
                                "shared record kept changing under us: change dropped");
                        }
                    }
                }
            }
        }
        for (i, shared) in fetched {
            let (_, first, _) = &users[i];
            self.local
                .apply(&first.tenant, &first.user, &shared, false, "shared_state");
        }
        Ok(retry)
    }

    /// Merges every record in the sanction index into the local store.
    async fn pull(&mut self, conn: &mut Conn) -> Result<(), String> {
        let mut offset: isize = 0;
        loop {
            let mut page = redis::cmd("ZRANGE");
            page.arg(&self.index)
                .arg(unix_now_ms())
                .arg("+inf")
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(offset)
                .arg(PULL_PAGE);
            let members: Vec<String> = self.timed("read index", page.query_async(conn)).await?;
            if members.is_empty() {
                return Ok(());
            }
            let mut get = redis::pipe();
            for m in &members {
                get.get(self.record_key(m));
            }
            let values: Vec<Option<String>> =
                self.timed("read records", get.query_async(conn)).await?;
            for (m, v) in members.iter().zip(values) {
                let (Some((tenant, user)), Some((_, saved))) =
                    (split_member(m), v.as_deref().and_then(parse_value))
                else {
                    continue;
                };
                self.local
                    .apply(&Arc::from(tenant), user, &saved, false, "shared_state");
            }
            if members.len() < PULL_PAGE as usize {
                return Ok(());
            }
            offset += PULL_PAGE;
        }
    }

    fn on_event(&self, payload: &[u8]) {
        let wire: Wire = match serde_json::from_slice(payload) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable message on the shared-state channel");
                return;
            }
        };
        if wire.origin == self.origin {
            return;
        }
        let Some(saved) = SavedUser::decode(&wire.record) else {
            tracing::warn!("unreadable record on the shared-state channel");
            return;
        };
        self.local.apply(
            &Arc::from(wire.tenant.as_str()),
            &wire.user,
            &saved,
            wire.manual,
            &wire.reason,
        );
    }
}

/// The index member (and record key suffix) of a user: `<tenant len>:<tenant>:<user>` (the
/// same scheme as the verdict lookup's keys).
fn member(tenant: &str, user: &str) -> String {
    crate::lookup::entry_key(tenant, user)
}

/// Inverse of [`member`].
fn split_member(m: &str) -> Option<(&str, &str)> {
    let (len, rest) = m.split_once(':')?;
    let len: usize = len.parse().ok()?;
    let tenant = rest.get(..len)?;
    let user = rest.get(len..)?.strip_prefix(':')?;
    Some((tenant, user))
}

/// Parses `"<version>|<saved>"`.
fn parse_value(v: &str) -> Option<(u64, SavedUser)> {
    let (version, saved) = v.split_once('|')?;
    Some((version.parse().ok()?, SavedUser::decode(saved)?))
}

/// The version of a value whose record part is unreadable (so it can still be replaced).
fn version_of(v: Option<&str>) -> u64 {
    v.and_then(|v| v.split_once('|'))
        .and_then(|(ver, _)| ver.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_round_trip_whatever_the_ids_hold() {
        for (tenant, user) in [
            ("acme", "u42"),
            ("a:b", "c:d"),
            ("", "x"),
            ("日本", "ユーザー"),
        ] {
            let m = member(tenant, user);
            assert_eq!(split_member(&m), Some((tenant, user)), "{m}");
        }
        assert_eq!(split_member("9:short:u"), None);
        assert_eq!(split_member("x:y"), None);
    }

    #[test]
    fn values_parse_with_their_version() {
        let saved = SavedUser {
            score: 2.5,
            seen: 10,
            until: 70,
            level: SanctionState::Throttle,
        };
        let v = format!("7|{}", saved.encode());
        assert_eq!(parse_value(&v), Some((7, saved)));
        assert_eq!(parse_value("7|garbage"), None);
        assert_eq!(version_of(Some("7|garbage")), 7);
        assert_eq!(version_of(None), 0);
    }
}
