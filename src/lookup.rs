//! # Verdict lookup
//!
//! Takes every verdict the server sends, already serialized (the exact bytes that went on the
//! wire, shared with the outgoing frame, never copied), keyed by (tenant, message id); gives it
//! back to a `lookup` request of the same tenant for `lookup.ttl_secs`. Called by
//! [`crate::server::connection`]: [`VerdictLookup::record`] after each verdict is serialized,
//! [`VerdictLookup::lookup`] for each `lookup` request.
//!
//! ## Bounds
//! The local store holds at most `lookup.max_entries` verdicts and `lookup.max_total_bytes` of
//! JSON; the oldest go first. A verdict over `lookup.max_verdict_bytes` is not stored (counted
//! in `chatguard_lookup_skipped_total`). Expired verdicts are dropped as newer ones arrive and
//! are never answered.
//!
//! ## Shared (Redis)
//! With `behaviour.store = "redis"` (and `lookup.shared = true`) every stored verdict is also
//! written to Redis as `P:v:<tenant byte length>:<tenant>:<message id>` (`P` =
//! `behaviour.redis_key_prefix`; the length keeps tenants apart whatever their names contain)
//! with the same TTL, write-behind through a bounded queue: a verdict never waits for Redis.
//! While Redis is unreachable, writes wait in the queue (and go out after the reconnect with
//! what is left of their TTL); a full queue drops new ones (counted). A local miss asks Redis,
//! bounded by `behaviour.redis_timeout_ms`; when Redis is down the answer comes from the local
//! store alone. `age_ms` of a shared hit is derived from the key's remaining TTL.

use crate::metrics::{write_counter, write_gauge, write_labelled};
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Most verdicts queued for Redis before new writes are dropped.
const REDIS_QUEUE_LEN: usize = 16_384;
/// Most verdict bytes queued for Redis (while it is down) before new writes are dropped: the
/// count bound alone would allow `REDIS_QUEUE_LEN` × `max_verdict_bytes` (1 GiB at the default).
const REDIS_QUEUE_BYTES: usize = 64 << 20;
/// Most verdicts written to Redis in one pipelined round trip.
const REDIS_BATCH: usize = 256;
/// Backoff bounds between Redis reconnect attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often an idle Redis connection is checked.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Largest `lookup.max_entries`.
const MAX_ENTRIES_LIMIT: usize = 10_000_000;
/// Largest `lookup.ttl_secs` (a week).
const MAX_TTL_SECS: u64 = 7 * 24 * 3600;

/// `[lookup]`: recent verdicts kept for `lookup` requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LookupConfig {
    /// Keep verdicts and answer `lookup` requests at all.
    pub enabled: bool,
    /// Most verdicts kept in memory; the oldest is dropped for a new one beyond.
    pub max_entries: usize,
    /// Seconds a verdict can be looked up after it was sent.
    pub ttl_secs: u64,
    /// Largest verdict (serialized JSON, bytes) that is kept; larger ones are skipped.
    pub max_verdict_bytes: usize,
    /// Most bytes of verdict JSON kept in memory; the oldest are dropped beyond.
    pub max_total_bytes: usize,
    /// With `behaviour.store = "redis"`: also keep verdicts in Redis, so that every sidecar
    /// sharing it can answer a lookup.
    pub shared: bool,
}

impl Default for LookupConfig {
    fn default() -> Self {
        LookupConfig {
            enabled: true,
            max_entries: 100_000,
            ttl_secs: 600,
            max_verdict_bytes: 64 << 10,
            max_total_bytes: 128 << 20,
            shared: true,
        }
    }
}

impl LookupConfig {
    /// Checks ranges; the message names the setting to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_entries == 0 || self.max_entries > MAX_ENTRIES_LIMIT {
            return Err(format!("max_entries must be 1..={MAX_ENTRIES_LIMIT}"));
        }
        if self.ttl_secs == 0 || self.ttl_secs > MAX_TTL_SECS {
            return Err(format!("ttl_secs must be 1..={MAX_TTL_SECS}"));
        }
        if self.max_verdict_bytes == 0 || self.max_verdict_bytes > 16 << 20 {
            return Err("max_verdict_bytes must be 1..=16777216".into());
        }
        if self.max_total_bytes < self.max_verdict_bytes {
            return Err(format!(
                "max_total_bytes ({}) must be at least max_verdict_bytes ({})",
                self.max_total_bytes, self.max_verdict_bytes
            ));
        }
        Ok(())
    }
}

/// Where a lookup was answered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupSource {
    /// This sidecar's memory.
    Local,
    /// Redis (another sidecar, or this one before a restart).
    Shared,
}

/// A verdict found by a lookup.
#[derive(Debug, Clone)]
pub struct Found {
    /// The verdict JSON exactly as it was sent.
    pub json: Utf8Bytes,
    /// Milliseconds since it was sent.
    pub age_ms: u64,
    /// Where it came from.
    pub source: LookupSource,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct LookupStats {
    /// Lookups answered from memory.
    pub hit_local: AtomicU64,
    /// Lookups answered from Redis.
    pub hit_shared: AtomicU64,
    /// Lookups that found nothing.
    pub miss: AtomicU64,
    /// Verdicts dropped to make room (entries or bytes).
    pub evicted: AtomicU64,
    /// Verdicts dropped because they expired.
    pub expired: AtomicU64,
    /// Verdicts not stored because they were over `max_verdict_bytes`.
    pub skipped: AtomicU64,
    /// Verdicts written to Redis.
    pub shared_written: AtomicU64,
    /// Verdicts not written to Redis (queue full, a failed write, or expired while queued).
    pub shared_dropped: AtomicU64,
    /// Redis lookups that failed or timed out (answered from memory alone).
    pub shared_errors: AtomicU64,
}

/// One kept verdict.
struct Entry {
    /// Insertion number; matches the `order` item that owns this entry.
    seq: u64,
    /// When it was stored (sent, or for a verdict from Redis, sent as far as we know).
    at: Instant,
    /// The verdict JSON.
    json: Utf8Bytes,
}

/// The in-memory store: a map for lookups and an insertion-ordered queue for eviction and
/// expiry. A verdict stored again under the same key leaves a stale queue item behind; stale
/// items count against `max_entries` too (so the queue is bounded) and are skipped when popped.
pub struct LocalStore {
    /// Key → newest verdict.
    map: HashMap<Arc<str>, Entry>,
    /// (seq, key), oldest first.
    order: VecDeque<(u64, Arc<str>)>,
    /// Next insertion number.
    next_seq: u64,
    /// Sum of the stored verdicts' lengths.
    bytes: usize,
    /// Most queue items (live or stale).
    max_entries: usize,
    /// Most bytes.
    max_total_bytes: usize,
    /// How long a verdict lives.
    ttl: Duration,
}

impl LocalStore {
    /// An empty store with the limits of `cfg`.
    pub fn new(cfg: &LookupConfig) -> LocalStore {
        LocalStore {
            map: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            bytes: 0,
            max_entries: cfg.max_entries,
            max_total_bytes: cfg.max_total_bytes,
            ttl: Duration::from_secs(cfg.ttl_secs),
        }
    }

    /// Verdicts kept now (expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes of verdict JSON kept now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Stores `json` under `key` as of `at`; drops expired and, beyond the limits, the oldest
    /// verdicts. Returns (evicted, expired) counts.
    pub fn insert(&mut self, key: Arc<str>, json: Utf8Bytes, at: Instant) -> (u64, u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += json.len();
        if let Some(old) = self.map.insert(key.clone(), Entry { seq, at, json }) {
            self.bytes -= old.json.len();
        }
        self.order.push_back((seq, key));
        self.trim(at)
    }

    /// Drops expired verdicts, then the oldest until within the limits.
    fn trim(&mut self, now: Instant) -> (u64, u64) {
        let (mut evicted, mut expired) = (0, 0);
        while let Some((seq, key)) = self.order.front() {
            let live = self.map.get(key).filter(|e| e.seq == *seq);
            let over = self.order.len() > self.max_entries || self.bytes > self.max_total_bytes;
            match live {
                None => {}
                Some(e) if now.saturating_duration_since(e.at) >= self.ttl => expired += 1,
                Some(_) if over => evicted += 1,
                Some(_) => break,
            }
            if live.is_some()
                && let Some(e) = self.map.remove(key)
            {
                self.bytes -= e.json.len();
            }
            self.order.pop_front();
        }
        (evicted, expired)
    }

    /// The verdict under `key` and its age, unless absent or expired.
    pub fn get(&self, key: &str, now: Instant) -> Option<(Utf8Bytes, Duration)> {
        let e = self.map.get(key)?;
        let age = now.saturating_duration_since(e.at);
        (age < self.ttl).then(|| (e.json.clone(), age))
    }
}

/// The key of (tenant, message id): `<tenant byte length>:<tenant>:<id>`, so that no two pairs
/// share one whatever the names contain.
pub fn entry_key(tenant: &str, id: &str) -> String {
    format!("{}:{tenant}:{id}", tenant.len())
}

/// Where verdicts are shared: the Redis server and key prefix of the behaviour store.
#[derive(Debug, Clone)]
pub struct SharedTarget {
    /// `behaviour.redis_url`.
    pub url: String,
    /// `behaviour.redis_key_prefix`.
    pub prefix: String,
    /// `behaviour.redis_timeout_ms`.
    pub timeout: Duration,
}

type Conn = redis::aio::MultiplexedConnection;

/// A verdict queued for Redis.
struct Write {
    /// The Redis key.
    key: String,
    /// The verdict JSON.
    json: Utf8Bytes,
    /// When it was stored locally: the Redis TTL is what is left of `lookup.ttl_secs`.
    at: Instant,
}

/// The Redis side: a write-behind queue and the current connection (while connected).
struct Shared {
    /// Verdicts to write: (Redis key, JSON).
    writes_tx: mpsc::Sender<Write>,
    /// The connection the writer keeps up; `None` while Redis is unreachable.
    conn: Arc<Mutex<Option<Conn>>>,
    /// Verdict bytes in the queue (bounded by [`REDIS_QUEUE_BYTES`]).
    queued_bytes: Arc<AtomicUsize>,
    /// `P:v:`.
    key_prefix: String,
    /// Longest wait for a lookup's round trip.
    timeout: Duration,
}

/// Cheap-to-clone handle to the verdict store.
#[derive(Clone)]
pub struct VerdictLookup {
    /// The state.
    inner: Arc<Inner>,
}

struct Inner {
    /// The in-memory verdicts (std mutex: never held across an await; O(1) per operation
    /// plus the evictions it causes).
    local: Mutex<LocalStore>,
    /// Largest verdict kept.
    max_verdict_bytes: usize,
    /// TTL in milliseconds (Redis `PX`, and the age of a shared hit).
    ttl_ms: u64,
    /// Redis, when shared.
    shared: Option<Shared>,
    /// Counters.
    stats: Arc<LookupStats>,
}

/// Why the lookup store could not start.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// `behaviour.redis_url` is not a valid Redis URL.
    #[error("behaviour.redis_url (for lookup.shared): {0}")]
    RedisUrl(String),
}

impl VerdictLookup {
    /// Builds the store; with `shared`, starts the Redis writer (it connects in the background;
    /// must be called within a tokio runtime). `None` when `lookup.enabled = false`.
    pub fn start(
        cfg: &LookupConfig,
        shared: Option<SharedTarget>,
    ) -> Result<Option<VerdictLookup>, LookupError> {
        if !cfg.enabled {
            return Ok(None);
        }
        let stats = Arc::new(LookupStats::default());
        let ttl_ms = cfg.ttl_secs.saturating_mul(1000);
        let shared = match shared {
            None => None,
            Some(target) => {
                let client = redis::Client::open(target.url.as_str())
                    .map_err(|e| LookupError::RedisUrl(e.to_string()))?;
                let (writes_tx, writes_rx) = mpsc::channel(REDIS_QUEUE_LEN);
                let conn = Arc::new(Mutex::new(None));
                let queued_bytes = Arc::new(AtomicUsize::new(0));
                let writer = Writer {
                    client,
                    timeout: target.timeout,
                    ttl_ms,
                    conn: conn.clone(),
                    stats: stats.clone(),
                    queued_bytes: queued_bytes.clone(),
                };
                tokio::spawn(writer.run(writes_rx));
                Some(Shared {
                    writes_tx,
                    conn,
                    queued_bytes,
                    key_prefix: format!("{}:v:", target.prefix),
                    timeout: target.timeout,
                })
            }
        };
        Ok(Some(VerdictLookup {
            inner: Arc::new(Inner {
                local: Mutex::new(LocalStore::new(cfg)),
                max_verdict_bytes: cfg.max_verdict_bytes,
                ttl_ms,
                shared,
                stats,
            }),
        }))
    }

    /// The counters.
    pub fn stats(&self) -> &LookupStats {
        &self.inner.stats
    }

    fn local(&self) -> std::sync::MutexGuard<'_, LocalStore> {
        self.inner
            .local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps the verdict `json` (as sent) for message `id` of `tenant`. Never blocks: the Redis
    /// write is queued (or dropped when the queue is full).
    pub fn record(&self, tenant: &str, id: &str, json: &Utf8Bytes) {
        let inner = &self.inner;
        if json.len() > inner.max_verdict_bytes {
            inner.stats.skipped.fetch_add(1, Relaxed);
            return;
        }
        let key = entry_key(tenant, id);
        if let Some(shared) = &inner.shared {
            let redis_key = format!("{}{key}", shared.key_prefix);
            let write = Write {
                key: redis_key,
                json: json.clone(),
                at: Instant::now(),
            };
            let len = json.len();
            let admitted = shared
                .queued_bytes
                .fetch_update(Relaxed, Relaxed, |q| {
                    (q + len <= REDIS_QUEUE_BYTES).then_some(q + len)
                })
                .is_ok();
            if !admitted {
                inner.stats.shared_dropped.fetch_add(1, Relaxed);
            } else if shared.writes_tx.try_send(write).is_err() {
                shared.queued_bytes.fetch_sub(len, Relaxed);
                inner.stats.shared_dropped.fetch_add(1, Relaxed);
            }
        }
        let (evicted, expired) = self
            .local()
            .insert(key.into(), json.clone(), Instant::now());
        inner.stats.evicted.fetch_add(evicted, Relaxed);
        inner.stats.expired.fetch_add(expired, Relaxed);
    }

    /// The verdict for message `id` of `tenant` from memory, counting a hit; `None` on a
    /// local miss (not counted: [`VerdictLookup::lookup`] goes on to Redis).
    pub fn lookup_local(&self, tenant: &str, id: &str) -> Option<Found> {
        let key = entry_key(tenant, id);
        let (json, age) = self.local().get(&key, Instant::now())?;
        self.inner.stats.hit_local.fetch_add(1, Relaxed);
        Some(Found {
            json,
            age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
            source: LookupSource::Local,
        })
    }

    /// Whether a local miss is worth an asynchronous [`VerdictLookup::lookup`] (Redis is
    /// configured).
    pub fn is_shared(&self) -> bool {
        self.inner.shared.is_some()
    }

    /// After a local miss: Redis when shared (counting a shared hit or a miss), else a miss.
    pub async fn lookup_shared_or_miss(&self, tenant: &str, id: &str) -> Option<Found> {
        let found = match &self.inner.shared {
            Some(shared) => self.lookup_shared(shared, tenant, id).await,
            None => None,
        };
        match &found {
            Some(_) => self.inner.stats.hit_shared.fetch_add(1, Relaxed),
            None => self.inner.stats.miss.fetch_add(1, Relaxed),
        };
        found
    }

    /// Counts a miss (a local miss with no Redis to ask).
    pub fn count_miss(&self) {
        self.inner.stats.miss.fetch_add(1, Relaxed);
    }

    async fn lookup_shared(&self, shared: &Shared, tenant: &str, id: &str) -> Option<Found> {
        let stats = &self.inner.stats;
        let mut conn = shared
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        let key = entry_key(tenant, id);
        let redis_key = format!("{}{key}", shared.key_prefix);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&redis_key).cmd("PTTL").arg(&redis_key);
        let reply: Result<(Option<Vec<u8>>, i64), _> =
            match tokio::time::timeout(shared.timeout, pipe.query_async(&mut conn)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {:?}", shared.timeout)),
            };
        let (value, pttl) = match reply {
            Ok(v) => v,
            Err(e) => {
                stats.shared_errors.fetch_add(1, Relaxed);
                tracing::debug!(error = %e, "verdict lookup in Redis failed: answering from memory");
                return None;
            }
        };
        let value = value?;
        // What another sidecar wrote is spliced into our reply: check it is one JSON value
        // within our own size limit, or treat it as absent.
        if value.len() > self.inner.max_verdict_bytes
            || serde_json::from_slice::<serde::de::IgnoredAny>(&value).is_err()
        {
            tracing::warn!(key = %redis_key, "ignoring a stored verdict that is not valid JSON");
            return None;
        }
        let json = Utf8Bytes::try_from(value).ok()?;
        let remaining = u64::try_from(pttl).unwrap_or(0).min(self.inner.ttl_ms);
        let age_ms = self.inner.ttl_ms - remaining;
        let at = Instant::now()
            .checked_sub(Duration::from_millis(age_ms))
            .unwrap_or_else(Instant::now);
        let (evicted, expired) = self.local().insert(key.into(), json.clone(), at);
        stats.evicted.fetch_add(evicted, Relaxed);
        stats.expired.fetch_add(expired, Relaxed);
        Some(Found {
            json,
            age_ms,
            source: LookupSource::Shared,
        })
    }

    /// Prometheus lines for the lookup counters and gauges.
    pub fn render_metrics(&self, out: &mut String) {
        let s = &self.inner.stats;
        let (entries, bytes) = {
            let local = self.local();
            (local.len(), local.bytes())
        };
        write_labelled(
            out,
            "chatguard_lookups_total",
            "Lookup requests by result.",
            "result",
            [
                ("hit_local", s.hit_local.load(Relaxed)),
                ("hit_shared", s.hit_shared.load(Relaxed)),
                ("miss", s.miss.load(Relaxed)),
            ],
        );
        write_gauge(
            out,
            "chatguard_lookup_stored",
            "Verdicts kept for lookups now.",
            entries,
        );
        write_gauge(
            out,
            "chatguard_lookup_stored_bytes",
            "Bytes of verdict JSON kept now.",
            bytes,
        );
        for (name, help, v) in [
            (
                "evictions_total",
                "Verdicts dropped to make room (lookup.max_entries, lookup.max_total_bytes).",
                &s.evicted,
            ),
            (
                "expired_total",
                "Verdicts dropped after lookup.ttl_secs.",
                &s.expired,
            ),
            (
                "skipped_total",
                "Verdicts not kept: over lookup.max_verdict_bytes.",
                &s.skipped,
            ),
            (
                "shared_written_total",
                "Verdicts written to Redis.",
                &s.shared_written,
            ),
            (
                "shared_dropped_total",
                "Verdicts not written to Redis (queue full, failed write, expired while queued).",
                &s.shared_dropped,
            ),
            (
                "shared_errors_total",
                "Redis lookups that failed or timed out.",
                &s.shared_errors,
            ),
        ] {
            write_counter(
                out,
                &format!("chatguard_lookup_{name}"),
                help,
                v.load(Relaxed),
            );
        }
    }
}

/// The Redis writer task: keeps a connection up (publishing it for lookups) and writes the
/// queued verdicts in pipelined batches. Ends when every handle is gone.
struct Writer {
    /// Opens connections.
    client: redis::Client,
    /// Longest wait for one round trip.
    timeout: Duration,
    /// `PX` of every key.
    ttl_ms: u64,
    /// The published connection.
    conn: Arc<Mutex<Option<Conn>>>,
    /// Counters.
    stats: Arc<LookupStats>,
    /// Verdict bytes in the queue; the writer gives back what it takes off.
    queued_bytes: Arc<AtomicUsize>,
}

impl Writer {
    async fn run(self, mut writes_rx: mpsc::Receiver<Write>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.connect().await {
                Ok(mut conn) => {
                    backoff = BACKOFF_MIN;
                    *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
                    let lost = self.serve(&mut conn, &mut writes_rx).await;
                    *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = None;
                    match lost {
                        None => return,
                        Some(e) => tracing::warn!(error = %e,
                            "verdict lookup: Redis lost, answering lookups from memory"),
                    }
                }
                Err(e) => tracing::debug!(error = %e, "verdict lookup: Redis unreachable"),
            }
            // Offline: writes wait in the queue (a full queue drops new ones, counted); they
            // go out after the reconnect with what is left of their TTL.
            tokio::time::sleep(backoff).await;
            if writes_rx.is_closed() {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn connect(&self) -> Result<Conn, String> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        match tokio::time::timeout(
            self.timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("connect: no answer within {:?}", self.timeout)),
        }
    }

    /// Writes until Redis fails (`Some(why)`) or the queue closes (`None`).
    async fn serve(
        &self,
        conn: &mut Conn,
        writes_rx: &mut mpsc::Receiver<Write>,
    ) -> Option<String> {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(REDIS_BATCH);
        loop {
            tokio::select! {
                n = writes_rx.recv_many(&mut batch, REDIS_BATCH) => {
                    if n == 0 {
                        return None;
                    }
                    let taken: usize = batch.iter().map(|w| w.json.len()).sum();
                    self.queued_bytes.fetch_sub(taken, Relaxed);
                    let now = Instant::now();
                    let mut pipe = redis::pipe();
                    let mut expired = 0;
                    for w in &batch {
                        let age_ms = u64::try_from(now.saturating_duration_since(w.at).as_millis())
                            .unwrap_or(u64::MAX);
                        let Some(px) = self.ttl_ms.checked_sub(age_ms).filter(|px| *px > 0) else {
                            expired += 1;
                            continue;
                        };
                        pipe.cmd("SET").arg(&w.key).arg(w.json.as_bytes()).arg("PX").arg(px)
                            .ignore();
                    }
                    self.stats.shared_dropped.fetch_add(expired, Relaxed);
                    let sent = batch.len() as u64 - expired;
                    batch.clear();
                    if sent == 0 {
                        continue;
                    }
                    let r: Result<(), String> =
                        match tokio::time::timeout(self.timeout, pipe.query_async(conn)).await {
                            Ok(r) => r.map_err(|e| e.to_string()),
                            Err(_) => Err(format!("write: no answer within {:?}", self.timeout)),
                        };
                    match r {
                        Ok(()) => { self.stats.shared_written.fetch_add(sent, Relaxed); }
                        Err(e) => {
                            self.stats.shared_dropped.fetch_add(sent, Relaxed);
                            return Some(e);
                        }
                    }
                }
                _ = ping.tick() => {
                    let pong: Result<String, String> = match tokio::time::timeout(
                        self.timeout, redis::cmd("PING").query_async(conn)).await {
                        Ok(r) => r.map_err(|e| e.to_string()),
                        Err(_) => Err(format!("ping: no answer within {:?}", self.timeout)),
                    };
                    if let Err(e) = pong {
                        return Some(e);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_entries: usize, ttl_secs: u64) -> LookupConfig {
        LookupConfig {
            max_entries,
            ttl_secs,
            ..LookupConfig::default()
        }
    }

    fn j(s: &str) -> Utf8Bytes {
        Utf8Bytes::from(s.to_string())
    }

    #[test]
    fn evicts_oldest_beyond_max_entries_and_overwrites_in_place() {
        let mut s = LocalStore::new(&cfg(2, 60));
        let now = Instant::now();
        s.insert("a".into(), j("1"), now);
        s.insert("b".into(), j("2"), now);
        assert_eq!(s.insert("c".into(), j("3"), now), (1, 0));
        assert!(s.get("a", now).is_none());
        assert_eq!(s.get("c", now).map(|v| v.0), Some(j("3")));
        // Overwrite: the newest wins, the stale queue item is skipped.
        s.insert("c".into(), j("33"), now);
        assert_eq!(s.get("c", now).map(|v| v.0), Some(j("33")));
        // `b` made room for the stale queue item; `c` alone is left.
        assert_eq!(s.len(), 1);
        assert_eq!(s.order.len(), 1);
        assert_eq!(
            s.bytes(),
            s.map.values().map(|e| e.json.len()).sum::<usize>()
        );
    }

    #[test]
    fn expires_after_ttl_and_bounds_bytes() {
        let mut s = LocalStore::new(&LookupConfig {
            max_total_bytes: 10,
            max_verdict_bytes: 10,
            ..cfg(100, 1)
        });
        let t0 = Instant::now();
        s.insert("a".into(), j("123456"), t0);
        assert!(s.get("a", t0 + Duration::from_millis(999)).is_some());
        assert!(s.get("a", t0 + Duration::from_secs(1)).is_none());
        // Bytes: the second 6-byte verdict pushes the first out.
        assert_eq!(s.insert("b".into(), j("654321"), t0), (1, 0));
        assert_eq!(s.bytes(), 6);
        // Expired entries go when something new arrives.
        assert_eq!(
            s.insert("c".into(), j("x"), t0 + Duration::from_secs(2)),
            (0, 1)
        );
        assert_eq!(s.len(), 1);
    }

    /// While Redis is unreachable the write-behind queue is bounded by bytes, not only by count:
    /// big verdicts past [`REDIS_QUEUE_BYTES`] are dropped (counted) and still kept locally.
    #[tokio::test]
    async fn the_redis_queue_is_bounded_by_bytes_while_redis_is_down() {
        let target = SharedTarget {
            // Nothing listens on port 1: the writer never connects, so nothing leaves the queue.
            url: "redis://127.0.0.1:1/".into(),
            prefix: "cg-test".into(),
            timeout: Duration::from_millis(50),
        };
        let lookup = VerdictLookup::start(&LookupConfig::default(), Some(target))
            .expect("starts")
            .expect("enabled");
        let verdict = Utf8Bytes::from("x".repeat(60 << 10));
        let n = 1100;
        for i in 0..n {
            lookup.record("acme", &format!("m-{i}"), &verdict);
        }
        let fit = REDIS_QUEUE_BYTES / verdict.len();
        assert!(
            fit < n && fit < REDIS_QUEUE_LEN,
            "the byte bound is what binds here"
        );
        assert_eq!(
            lookup.stats().shared_dropped.load(Relaxed),
            (n - fit) as u64
        );
        assert!(lookup.lookup_local("acme", "m-1099").is_some());
    }

    #[test]
    fn keys_keep_tenants_apart() {
        assert_ne!(entry_key("a:b", "c"), entry_key("a", "b:c"));
    }

    #[test]
    fn validates_limits() {
        assert!(LookupConfig::default().validate().is_ok());
        assert!(cfg(0, 1).validate().is_err());
        assert!(cfg(1, 0).validate().is_err());
        let bad = LookupConfig {
            max_total_bytes: 1,
            ..LookupConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("max_total_bytes"));
    }
}
