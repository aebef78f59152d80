//! # Server
//!
//! Takes an already-bound [`TcpListener`], a validated [`Config`] and a shutdown token; accepts
//! WebSocket connections on `/v1/ws` (bearer-token auth during the handshake, a global
//! connection limit, a handshake deadline) and hands each one to [`connection`]. Called by
//! `main` (`chatguard serve`) and by the end-to-end tests, which bind port 0.
//!
//! Shutdown (the token is cancelled, e.g. on SIGTERM): stop accepting, let every connection
//! finish its in-flight requests (up to `server.shutdown_grace_ms`), close them with 1001, stop
//! the maintenance tasks, flush the behaviour state (final snapshot, last writes to Redis).
//!
//! Hot reload ([`run_with_reload`]): the server attaches a [`Reloader`] to its state (tokens,
//! tenants, wordlists, policies, image hash lists) and, when `server.reload_poll_ms` > 0,
//! polls the watched files; `main` calls [`Reloader::reload_now`] on SIGHUP.

pub mod admin;
pub mod connection;
pub mod protocol;

use crate::behaviour::Tracker;
use crate::config::{Config, DEFAULT_TENANT};
use crate::metrics::Metrics;
use crate::moderator::{EventHub, Moderator, TextModel};
use crate::reload::Reloader;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The WebSocket path of protocol v1.
pub const WS_PATH: &str = "/v1/ws";

/// Bytes each connection reads from its socket at a time. tungstenite's default (128 KiB,
/// allocated per connection up front) made an idle connection cost ~135 KB: 1.3 GB for 10,000
/// (`tests/faults.rs`). Larger messages still arrive whole, in more reads.
const READ_BUFFER_BYTES: usize = 8 << 10;

/// State shared by every connection.
pub(crate) struct Shared {
    /// Validated configuration.
    pub config: Config,
    /// Runs the stages for each message.
    pub moderator: Moderator,
    /// Cancelled when the server shuts down.
    pub shutdown: CancellationToken,
    /// Counters and histograms for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Recent verdicts for `lookup` requests; `None` when `lookup.enabled = false`.
    pub lookup: Option<crate::lookup::VerdictLookup>,
    /// The `[webhook]` delivery queue, when `webhook.url` is set.
    pub webhook: Option<crate::webhook::Webhook>,
}

impl Shared {
    /// `(ready, JSON body)` for `/readyz`: every stage with `ok` or why it is unavailable.
    pub fn readiness(&self) -> (bool, String) {
        let stages = self.moderator.stage_status();
        let ready = stages
            .iter()
            .all(|(_, status, required)| status.is_ok() || !required);
        let body = serde_json::json!({
            "ready": ready,
            "stages": stages
                .iter()
                .map(|(name, status, _)| {
                    let v = match status {
                        Ok(()) => "ok".to_string(),
                        Err(e) => format!("unavailable: {e}"),
                    };
                    (name.to_string(), serde_json::Value::String(v))
                })
                .collect::<serde_json::Map<_, _>>(),
        });
        (ready, format!("{body}\n"))
    }

    /// The Prometheus exposition of every metric.
    pub fn render_metrics(&self) -> String {
        let mut extra = self.moderator.render_metrics();
        if let Some(lookup) = &self.lookup {
            lookup.render_metrics(&mut extra);
        }
        if let Some(webhook) = &self.webhook {
            webhook.render_metrics(&mut extra);
        }
        self.metrics.render(&extra)
    }
}

/// Runs the server until `shutdown` is cancelled and every connection has closed.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    run_with_admin(listener, None, config, shutdown).await
}

/// [`run`], plus the admin endpoints (`/healthz`, `/readyz`, `/metrics`) on `admin`.
pub async fn run_with_admin(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: Config,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve(listener, admin, config, None, shutdown).await
}

/// [`run_with_admin`], with hot reload: `reloader` (made by [`Reloader::load`], which also
/// gave `config`) is attached to the running state, and the watched files are polled every
/// `server.reload_poll_ms` (0: never; [`Reloader::reload_now`] still works).
pub async fn run_with_reload(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: Config,
    reloader: Reloader,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve(listener, admin, config, Some(reloader), shutdown).await
}

async fn serve(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: Config,
    reloader: Option<Reloader>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if config.is_open() {
        tracing::warn!(
            "NO AUTH TOKEN CONFIGURED: every client is accepted as tenant `{DEFAULT_TENANT}`. \
             Set CHATGUARD_TOKEN or [auth.tokens] in the config file before exposing this port."
        );
    }
    // Restores the saved sanctions (snapshot + journal) and connects the shared state.
    let (tracker, mut remote_events) = Tracker::open(config.behaviour.clone())
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let maintenance = tracker.spawn_maintenance(shutdown.child_token());
    let webhook = crate::webhook::Webhook::start(&config.webhook).map_err(std::io::Error::other)?;
    let events = EventHub::default().with_webhook(webhook.clone());
    // Sanctions made by other sidecars (shared state) reach this tenant's connections too (but
    // not the webhook: the sidecar that made them posts them).
    let remote_hub = events.relay();
    let shared_lookup = (config.lookup.shared
        && config.behaviour.store == crate::behaviour::StoreKind::Redis)
        .then(|| crate::lookup::SharedTarget {
            url: config.behaviour.redis_url.clone(),
            prefix: config.behaviour.redis_key_prefix.clone(),
            timeout: Duration::from_millis(config.behaviour.redis_timeout_ms.max(1)),
        });
    let lookup = crate::lookup::VerdictLookup::start(&config.lookup, shared_lookup)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    tokio::spawn(async move {
        while let Some((tenant, sanction)) = remote_events.recv().await {
            remote_hub.publish(&tenant, &protocol::Event::Sanction(sanction));
        }
    });
    let metrics = Arc::new(Metrics::default());
    let (text_model, images) = tokio::join!(
        TextModel::load(&config.text_model),
        crate::image::ImageStage::load(&config.image),
    );
    let moderator = Moderator::new(&config, Some(tracker.clone()), events)
        .with_metrics(metrics.clone())
        .with_text_model(text_model)
        .with_images(images);
    let poller = match &reloader {
        Some(r) => {
            r.attach(
                moderator.live().clone(),
                moderator.images().clone(),
                metrics.clone(),
            )
            .await;
            let poll_ms = config.server.reload_poll_ms;
            (poll_ms > 0)
                .then(|| r.spawn_poller(Duration::from_millis(poll_ms), shutdown.child_token()))
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        config,
        moderator,
        shutdown: shutdown.clone(),
        metrics,
        lookup,
        webhook: webhook.clone(),
    });
    if let Some(admin) = admin {
        tracing::info!(addr = %admin.local_addr()?, "admin endpoints: /healthz /readyz /metrics");
        tokio::spawn(admin::run(admin, shared.clone()));
    }
    let conn_limit = Arc::new(Semaphore::new(shared.config.server.max_connections));
    let tasks = TaskTracker::new();
    tracing::info!(addr = %listener.local_addr()?, path = WS_PATH, "listening");

    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let permit = conn_limit.clone().try_acquire_owned().ok();
        let shared = shared.clone();
        tasks.spawn(async move {
            let Some(tenant) = handshake_and_serve(stream, &shared, permit.is_some()).await else {
                shared.metrics.handshakes_rejected.fetch_add(1, Relaxed);
                return;
            };
            tracing::debug!(%peer, %tenant, "connection closed");
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(
        connections = tasks.len(),
        "shutting down: finishing in-flight requests"
    );
    tasks.close();
    tasks.wait().await;
    let _ = maintenance.await;
    if let Some(poller) = poller {
        let _ = poller.await;
    }
    tracker.shutdown().await;
    if let Some(webhook) = &webhook {
        webhook.shutdown().await;
    }
    tracing::info!("shutdown complete");
    Ok(())
}

/// Performs the handshake (auth, path, capacity) and serves the connection. Returns the tenant
/// when a connection was served.
async fn handshake_and_serve(
    stream: TcpStream,
    shared: &Arc<Shared>,
    has_capacity: bool,
) -> Option<Arc<str>> {
    let server = &shared.config.server;
    let mut tenant: Option<Arc<str>> = None;
    // Tokens as of this handshake: a reload affects new connections, never open ones.
    let tokens = shared.moderator.live().load().tokens.clone();
    // The error type is tungstenite's (an HTTP response); its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != WS_PATH {
            return Err(reject(
                StatusCode::NOT_FOUND,
                "not found: the WebSocket endpoint is /v1/ws",
            ));
        }
        if !has_capacity {
            return Err(reject(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections (server.max_connections)",
            ));
        }
        if tokens.is_empty() {
            tenant = Some(Arc::from(DEFAULT_TENANT));
            return Ok(resp);
        }
        let token = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match token.and_then(|t| tokens.get(t)) {
            Some(t) => {
                tenant = Some(t.clone());
                Ok(resp)
            }
            None => Err(reject(
                StatusCode::UNAUTHORIZED,
                "unauthorized: send `Authorization: Bearer <token>`",
            )),
        }
    };
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(server.max_message_bytes))
        .max_frame_size(Some(server.max_message_bytes));
    let handshake =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config));
    let ws = match tokio::time::timeout(
        Duration::from_millis(server.handshake_timeout_ms),
        handshake,
    )
    .await
    {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "handshake rejected");
            return None;
        }
        Err(_) => {
            tracing::debug!("handshake timed out");
            return None;
        }
    };
    let tenant = tenant?;
    shared.metrics.connections_total.fetch_add(1, Relaxed);
    shared.metrics.connections_open.fetch_add(1, Relaxed);
    connection::serve(ws, tenant.clone(), shared.clone()).await;
    shared.metrics.connections_open.fetch_sub(1, Relaxed);
    Some(tenant)
}

fn reject(status: StatusCode, body: &str) -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some(body.to_string()));
    *resp.status_mut() = status;
    resp
}
