//! # Webhook
//!
//! Takes every pushed event this sidecar makes (`sanction`, `room_alarm`; not the ones it
//! relays from other sidecars, which post their own) from [`crate::moderator::EventHub`] and
//! POSTs it to `webhook.url`: the event JSON exactly as sent on the WebSocket plus
//! `"tenant":"NAME"`, `Content-Type: application/json`, `Authorization: Bearer <token>` when
//! `webhook.token` is set. Gives back nothing to its caller: [`Webhook::offer`] only queues.
//! Started by [`crate::server`], which also renders its metrics and flushes it at shutdown.
//!
//! ## Delivery
//! One task delivers the queue in order, one event at a time. An attempt is bounded by
//! `webhook.timeout_ms` (connect, send, status line). Connect errors, timeouts, malformed
//! replies, 408, 429 and 5xx are retried up to `webhook.max_attempts` attempts in all, after
//! `webhook.backoff_ms` doubling per attempt up to `webhook.max_backoff_ms`, with jitter (half
//! the delay is random); any other non-2xx status is a permanent failure, logged and counted.
//! The queue holds `webhook.queue` events; when it is full a new event is dropped and counted
//! (`chatguard_webhook_dropped_total`): moderation never waits for the webhook. On shutdown
//! the queue is delivered for at most `webhook.shutdown_flush_ms`.
//!
//! ## HTTP
//! A minimal HTTP/1.1 client over a tokio `TcpStream` (`Connection: close`, `Content-Length`
//! body, only the status line is read): no TLS. `https://` URLs are refused at config
//! validation; point `webhook.url` at a local TLS-terminating proxy instead.

use crate::metrics::{write_counter, write_gauge};
use crate::server::protocol::{Event, to_json};
use serde::Deserialize;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Event types a webhook can carry.
pub const EVENT_TYPES: &[&str] = &["sanction", "room_alarm"];
/// Longest status line read, in bytes.
const MAX_STATUS_LINE: usize = 1024;

/// `[webhook]`: POST pushed events to an HTTP endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://host[:port]/path`; unset (the default) turns the webhook off. `https://` is not
    /// supported: use a local TLS-terminating proxy.
    pub url: Option<String>,
    /// Which event types are posted: `sanction`, `room_alarm`.
    pub events: Vec<String>,
    /// Most events waiting for delivery; a new event is dropped when full.
    pub queue: usize,
    /// Attempts per event (the first included) before it counts as failed.
    pub max_attempts: u32,
    /// Delay before the first retry, in milliseconds; doubles per retry.
    pub backoff_ms: u64,
    /// Longest delay between retries, in milliseconds.
    pub max_backoff_ms: u64,
    /// Time for one attempt (connect, send, status line), in milliseconds.
    pub timeout_ms: u64,
    /// Sent as `Authorization: Bearer <token>` when set.
    pub token: Option<String>,
    /// On shutdown, how long queued events may still be delivered, in milliseconds.
    pub shutdown_flush_ms: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: None,
            events: EVENT_TYPES.iter().map(|s| s.to_string()).collect(),
            queue: 1000,
            max_attempts: 6,
            backoff_ms: 200,
            max_backoff_ms: 30_000,
            timeout_ms: 2000,
            token: None,
            shutdown_flush_ms: 5000,
        }
    }
}

impl WebhookConfig {
    /// Checks the URL and ranges; the message names the setting to change.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.url {
            HttpUrl::parse(url)?;
        }
        if self.events.is_empty() {
            return Err(format!(
                "events must name at least one of {EVENT_TYPES:?} (unset url to turn it off)"
            ));
        }
        for (i, e) in self.events.iter().enumerate() {
            if !EVENT_TYPES.contains(&e.as_str()) {
                return Err(format!(
                    "events: unknown event `{e}` (expected {EVENT_TYPES:?})"
                ));
            }
            if self.events[..i].contains(e) {
                return Err(format!("events: `{e}` is listed twice"));
            }
        }
        if self.queue == 0 || self.queue > 1_000_000 {
            return Err("queue must be 1..=1000000".into());
        }
        if self.max_attempts == 0 || self.max_attempts > 100 {
            return Err("max_attempts must be 1..=100".into());
        }
        if self.backoff_ms == 0 || self.backoff_ms > 600_000 {
            return Err("backoff_ms must be 1..=600000".into());
        }
        if self.max_backoff_ms < self.backoff_ms || self.max_backoff_ms > 3_600_000 {
            return Err("max_backoff_ms must be backoff_ms..=3600000".into());
        }
        if self.timeout_ms == 0 || self.timeout_ms > 600_000 {
            return Err("timeout_ms must be 1..=600000".into());
        }
        if self.shutdown_flush_ms > 600_000 {
            return Err("shutdown_flush_ms must be 0..=600000".into());
        }
        if let Some(token) = &self.token
            && (token.is_empty()
                || token.len() > 4096
                || !token.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err("token must be 1..=4096 visible ASCII characters".into());
        }
        Ok(())
    }
}

/// A parsed `http://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port (80 when the URL names none).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// The `Host` header value.
    pub authority: String,
}

impl HttpUrl {
    /// Parses `http://host[:port][/path]`; the error says what is wrong.
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(format!(
                "url `{url}`: https:// is not supported; point webhook.url at a local \
                 TLS-terminating proxy (e.g. http://127.0.0.1:8443/hook) that forwards to it"
            ));
        }
        if !lower.starts_with("http://") {
            return Err(format!("url `{url}` must start with http://"));
        }
        let rest = &url[7..];
        let rest = rest.split('#').next().unwrap_or_default();
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        if authority.contains('@') {
            return Err(format!(
                "url `{url}`: credentials in the URL are not supported (use webhook.token)"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("url `{url}`: unclosed `[` in the host"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("url `{url}`: junk after `]`"))?,
                ),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("url `{url}`: port `{p}` is not 1..=65535"))?,
        };
        let host_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':');
        if host.is_empty() || host.len() > 253 || !host.chars().all(host_ok) {
            return Err(format!("url `{url}`: invalid host `{host}`"));
        }
        if path.len() > 2048 || !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "url `{url}`: the path must be at most 2048 visible ASCII characters \
                 (percent-encode the rest)"
            ));
        }
        Ok(HttpUrl {
            host: host.to_string(),
            port,
            path,
            authority: authority.to_string(),
        })
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct WebhookStats {
    /// Events delivered (2xx).
    pub delivered: AtomicU64,
    /// Retries made (attempts after the first).
    pub retried: AtomicU64,
    /// Events given up on (permanent error, attempts exhausted, or shutdown).
    pub failed: AtomicU64,
    /// Events dropped because the queue was full.
    pub dropped: AtomicU64,
}

/// One queued event.
struct Job {
    /// The tenant it belongs to.
    tenant: Arc<str>,
    /// The event JSON as pushed.
    json: Arc<str>,
}

/// Cheap-to-clone handle: queues events for the delivery task.
#[derive(Clone)]
pub struct Webhook {
    /// The state.
    inner: Arc<Inner>,
}

struct Inner {
    /// Events to the task.
    jobs_tx: mpsc::Sender<Job>,
    /// Post `sanction` events.
    sanction: bool,
    /// Post `room_alarm` events.
    room_alarm: bool,
    /// Counters, shared with the task.
    stats: Arc<WebhookStats>,
    /// Cancelled at shutdown.
    stop: CancellationToken,
    /// When the shutdown flush ends; set before `stop` is cancelled.
    deadline: Arc<OnceLock<Instant>>,
    /// `webhook.shutdown_flush_ms`.
    flush: Duration,
    /// The task, until shutdown.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Webhook {
    /// Starts the delivery task (within a tokio runtime). `Ok(None)` when `webhook.url` is
    /// unset; the error is a bad URL (normally caught by [`WebhookConfig::validate`]).
    pub fn start(cfg: &WebhookConfig) -> Result<Option<Webhook>, String> {
        let Some(url) = &cfg.url else {
            return Ok(None);
        };
        let url = HttpUrl::parse(url).map_err(|e| format!("webhook.{e}"))?;
        let (jobs_tx, jobs_rx) = mpsc::channel(cfg.queue.max(1));
        let stats = Arc::new(WebhookStats::default());
        let stop = CancellationToken::new();
        let deadline = Arc::new(OnceLock::new());
        let sender = Sender {
            url,
            auth: cfg
                .token
                .as_ref()
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default(),
            timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
            max_attempts: cfg.max_attempts.max(1),
            backoff: Duration::from_millis(cfg.backoff_ms),
            max_backoff: Duration::from_millis(cfg.max_backoff_ms),
            stats: stats.clone(),
            stop: stop.clone(),
            deadline: deadline.clone(),
        };
        tracing::info!(url = %cfg.url.as_deref().unwrap_or_default(), events = ?cfg.events,
            "webhook on");
        let task = tokio::spawn(sender.run(jobs_rx));
        Ok(Some(Webhook {
            inner: Arc::new(Inner {
                jobs_tx,
                sanction: cfg.events.iter().any(|e| e == "sanction"),
                room_alarm: cfg.events.iter().any(|e| e == "room_alarm"),
                stats,
                stop,
                deadline,
                flush: Duration::from_millis(cfg.shutdown_flush_ms),
                task: Mutex::new(Some(task)),
            }),
        }))
    }

    /// Queues `event` of `tenant` (`json`: the event as pushed) when its type is configured.
    /// Never blocks: a full queue drops it (counted, logged at powers of two).
    pub fn offer(&self, tenant: &Arc<str>, event: &Event, json: &Arc<str>) {
        let inner = &self.inner;
        let wanted = match event {
            Event::Sanction(_) => inner.sanction,
            Event::RoomAlarm(_) => inner.room_alarm,
        };
        if !wanted || inner.stop.is_cancelled() {
            return;
        }
        let job = Job {
            tenant: tenant.clone(),
            json: json.clone(),
        };
        if inner.jobs_tx.try_send(job).is_err() {
            let n = inner.stats.dropped.fetch_add(1, Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "webhook queue full (webhook.queue): events dropped"
                );
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> &WebhookStats {
        &self.inner.stats
    }

    /// Events waiting for delivery (the one being delivered not included).
    pub fn queue_depth(&self) -> usize {
        self.inner.jobs_tx.max_capacity() - self.inner.jobs_tx.capacity()
    }

    /// Delivers what is queued for at most `webhook.shutdown_flush_ms`, then stops the task.
    /// Later events are ignored.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        let _ = inner.deadline.set(Instant::now() + inner.flush);
        inner.stop.cancel();
        let task = inner
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Prometheus lines for the webhook counters and queue depth.
    pub fn render_metrics(&self, out: &mut String) {
        let s = &self.inner.stats;
        for (name, help, v) in [
            ("delivered", "Events delivered (2xx).", &s.delivered),
            (
                "retried",
                "Delivery retries (attempts after the first).",
                &s.retried,
            ),
            (
                "failed",
                "Events given up on (permanent error, webhook.max_attempts, shutdown).",
                &s.failed,
            ),
            (
                "dropped",
                "Events dropped because the queue (webhook.queue) was full.",
                &s.dropped,
            ),
        ] {
            write_counter(
                out,
                &format!("chatguard_webhook_{name}_total"),
                help,
                v.load(Relaxed),
            );
        }
        write_gauge(
            out,
            "chatguard_webhook_queue_depth",
            "Events waiting for delivery.",
            self.queue_depth(),
        );
    }
}

/// The body posted for `json` (an event object) of `tenant`: the same object plus `tenant`.
pub fn body(json: &str, tenant: &str) -> String {
    let head = json.trim_end().strip_suffix('}').unwrap_or(json);
    let sep = if head.trim_end().ends_with('{') {
        ""
    } else {
        ","
    };
    format!("{head}{sep}\"tenant\":{}}}", to_json(&tenant))
}

/// What one attempt came to.
enum Attempt {
    /// 2xx.
    Delivered,
    /// Worth another try (the reason, for the log).
    Retry(String),
    /// Not worth another try.
    Permanent(String),
}

/// The delivery task.
struct Sender {
    /// Where to.
    url: HttpUrl,
    /// The `Authorization` header line, or empty.
    auth: String,
    /// Per attempt.
    timeout: Duration,
    /// Attempts per event.
    max_attempts: u32,
    /// First retry delay.
    backoff: Duration,
    /// Longest retry delay.
    max_backoff: Duration,
    /// Counters.
    stats: Arc<WebhookStats>,
    /// Cancelled at shutdown.
    stop: CancellationToken,
    /// End of the shutdown flush.
    deadline: Arc<OnceLock<Instant>>,
}

impl Sender {
    async fn run(self, mut jobs_rx: mpsc::Receiver<Job>) {
        loop {
            let job = tokio::select! {
                biased;
                job = jobs_rx.recv() => match job {
                    Some(job) => job,
                    None => return,
                },
                _ = self.stop.cancelled() => break,
            };
            self.deliver(job).await;
        }
        // Shutdown: deliver what is queued until the deadline.
        let mut lost = 0u64;
        while let Ok(job) = jobs_rx.try_recv() {
            if self.past_deadline() {
                lost += 1;
                self.stats.failed.fetch_add(1, Relaxed);
            } else {
                self.deliver(job).await;
            }
        }
        if lost > 0 {
            tracing::warn!(
                lost,
                "webhook: events not delivered before the shutdown deadline \
                 (webhook.shutdown_flush_ms)"
            );
        }
    }

    fn past_deadline(&self) -> bool {
        self.deadline.get().is_some_and(|d| Instant::now() >= *d)
    }

    /// Delivers one event, retrying as configured.
    async fn deliver(&self, job: Job) {
        let body = body(&job.json, &job.tenant);
        let mut attempt = 1;
        loop {
            let why = match self.attempt(body.as_bytes()).await {
                Attempt::Delivered => {
                    self.stats.delivered.fetch_add(1, Relaxed);
                    return;
                }
                Attempt::Permanent(why) => {
                    self.stats.failed.fetch_add(1, Relaxed);
                    tracing::error!(url = %self.url.authority, path = %self.url.path,
                        tenant = %job.tenant, error = %why,
                        "webhook: event rejected, not retried");
                    return;
                }
                Attempt::Retry(why) => why,
            };
            if attempt >= self.max_attempts || self.past_deadline() {
                self.stats.failed.fetch_add(1, Relaxed);
                tracing::warn!(url = %self.url.authority, tenant = %job.tenant, attempts = attempt,
                    error = %why, "webhook: event not delivered, giving up");
                return;
            }
            tracing::debug!(attempt, error = %why, "webhook: attempt failed, retrying");
            let wake = Instant::now() + self.delay(attempt);
            // A shutdown bounds the wait by the flush deadline.
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.stop.cancelled() => {
                    let end = self.deadline.get().map_or(wake, |d| wake.min(*d));
                    tokio::time::sleep_until(end).await;
                }
            }
            if self.past_deadline() {
                self.stats.failed.fetch_add(1, Relaxed);
                return;
            }
            attempt += 1;
            self.stats.retried.fetch_add(1, Relaxed);
        }
    }

    /// Delay before retry number `attempt` (1-based): half of the capped exponential delay
    /// plus a random part up to the other half.
    fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff
            .saturating_mul(1u32 << (attempt - 1).min(20))
            .min(self.max_backoff);
        let half = exp / 2;
        let random = std::collections::hash_map::RandomState::new().hash_one(attempt);
        let jitter_ns = random % (u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1));
        half + Duration::from_nanos(jitter_ns)
    }

    /// One POST, bounded by the timeout (and, once shutdown starts, the flush deadline).
    async fn attempt(&self, body: &[u8]) -> Attempt {
        let give_up = Instant::now() + self.timeout;
        let shutdown_deadline = async {
            self.stop.cancelled().await;
            match self.deadline.get() {
                Some(d) => tokio::time::sleep_until(*d).await,
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            r = self.post(body) => r,
            _ = tokio::time::sleep_until(give_up) => {
                Err(format!("no answer within {:?}", self.timeout))
            }
            _ = shutdown_deadline => Err("shutdown deadline (webhook.shutdown_flush_ms)".into()),
        };
        match result {
            Err(e) => Attempt::Retry(e),
            Ok(status) => match status {
                200..=299 => Attempt::Delivered,
                408 | 429 | 500..=599 => Attempt::Retry(format!("HTTP {status}")),
                _ => Attempt::Permanent(format!("HTTP {status}")),
            },
        }
    }

    /// Sends the request and reads the status code.
    async fn post(&self, body: &[u8]) -> Result<u16, String> {
        let url = &self.url;
        let mut stream = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("connect to {}: {e}", url.authority))?;
        let _ = stream.set_nodelay(true);
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: chatguard/{}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
            url.path,
            url.authority,
            env!("CARGO_PKG_VERSION"),
            body.len(),
            self.auth,
        );
        let mut request = Vec::with_capacity(head.len() + body.len());
        request.extend_from_slice(head.as_bytes());
        request.extend_from_slice(body);
        stream
            .write_all(&request)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = [0u8; MAX_STATUS_LINE];
        let mut n = 0;
        let line_end = loop {
            let read = stream
                .read(&mut buf[n..])
                .await
                .map_err(|e| format!("read: {e}"))?;
            if read == 0 {
                return Err("connection closed before the status line".into());
            }
            n += read;
            if let Some(i) = buf[..n].iter().position(|&b| b == b'\n') {
                break i;
            }
            if n == buf.len() {
                return Err(format!("status line over {MAX_STATUS_LINE} bytes"));
            }
        };
        parse_status(&buf[..line_end])
    }
}

/// The status code of an HTTP/1.x status line (`HTTP/1.1 200 OK`).
fn parse_status(line: &[u8]) -> Result<u16, String> {
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(format!(
            "not an HTTP/1.x status line: `{}`",
            line.trim_end()
        ));
    }
    code.parse::<u16>()
        .map_err(|_| format!("bad status code `{code}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_urls_and_refuses_https() {
        let u = HttpUrl::parse("http://127.0.0.1:9000/hooks/cg?x=1").expect("valid");
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.path.as_str(),
                u.authority.as_str()
            ),
            ("127.0.0.1", 9000, "/hooks/cg?x=1", "127.0.0.1:9000")
        );
        let u = HttpUrl::parse("http://alerts.internal").expect("valid");
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        let u = HttpUrl::parse("http://[::1]:8080/h").expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("::1", 8080));
        let e = HttpUrl::parse("https://example.com/h").expect_err("https");
        assert!(e.contains("TLS-terminating proxy"), "{e}");
        for bad in [
            "ftp://x/",
            "http://",
            "http://h:0/",
            "http://h:99999/",
            "http://u:p@h/",
            "http://h/a b",
            "http://h/\r\nX: y",
            "http://[::1/",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validates_settings() {
        let ok = WebhookConfig {
            url: Some("http://127.0.0.1:1/h".into()),
            ..WebhookConfig::default()
        };
        assert!(ok.validate().is_ok());
        type Case = (fn(&mut WebhookConfig), &'static str);
        let cases: [Case; 6] = [
            (|c| c.events = vec!["verdict".into()], "unknown event"),
            (|c| c.events = vec![], "at least one"),
            (|c| c.queue = 0, "queue"),
            (|c| c.max_attempts = 0, "max_attempts"),
            (|c| c.token = Some("a\r\nb".into()), "token"),
            (|c| c.max_backoff_ms = 1, "max_backoff_ms"),
        ];
        for (edit, want) in cases {
            let mut c = ok.clone();
            edit(&mut c);
            let e = c.validate().expect_err(want);
            assert!(e.contains(want), "{e} (want {want})");
        }
    }

    #[test]
    fn body_adds_the_tenant() {
        let b = body(r#"{"type":"sanction","user":"u1"}"#, "ac\"me");
        let v: serde_json::Value = serde_json::from_str(&b).expect("JSON");
        assert_eq!(v["tenant"], "ac\"me");
        assert_eq!(v["user"], "u1");
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 204 No Content\r"), Ok(204));
        assert_eq!(parse_status(b"HTTP/1.0 500"), Ok(500));
        assert!(parse_status(b"SSH-2.0-OpenSSH").is_err());
    }
}
