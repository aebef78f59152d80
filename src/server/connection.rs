//! # Connection
//!
//! Takes one authenticated WebSocket and serves it until the client leaves, breaks the
//! protocol, or the server shuts down. Requests are pipelined: each `moderate` runs as its own
//! task (at most `server.max_in_flight_per_connection` at once, more get `overloaded`) and its
//! reply goes out when ready, so replies may come back out of order. A single writer task owns
//! the socket's sending half and also forwards the tenant's pushed events. Called by
//! [`super::run`].
//!
//! Images may come as binary frames (4-byte big-endian header length, JSON header
//! `{"type":"image","id":"<request id>/<image id>"}`, raw bytes), before or after the `moderate`
//! request that lists them without `data`; they are parked in a bounded per-connection
//! [`PendingImages`] store and the request waits for missing ones up to `image.binary_wait_ms`.
//!
//! Close codes: 1001 on shutdown, 1009 for a message over `server.max_message_bytes`, 1007 for
//! a text frame that is not UTF-8, 1002 for other protocol violations. A client that stops
//! reading gets no close frame (it would not read it): once one frame has waited
//! `server.write_timeout_ms` for it, the connection is dropped.

use super::Shared;
use super::protocol::{
    ErrorCode, ErrorReply, LookupRequest, ModerateRequest, Pong, Probe, Request, SanctionReply,
    lookup_result_json, parse_image_frame, to_json,
};
use crate::image::pending::{PendingError, PendingImages};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message, Utf8Bytes};

/// Serves one connection to completion.
pub(crate) async fn serve(ws: WebSocketStream<TcpStream>, tenant: Arc<str>, shared: Arc<Shared>) {
    let server = &shared.config.server;
    let (sink, mut stream) = ws.split();
    let (out_tx, out_rx) = mpsc::channel::<Message>(server.outgoing_queue_len);
    let events = shared.moderator.events().subscribe(&tenant);
    let write_timeout = Duration::from_millis(server.write_timeout_ms);
    let mut writer = tokio::spawn(write_loop(sink, out_rx, events, write_timeout));
    let mut writer_done = false;
    let max_in_flight = server.max_in_flight_per_connection;
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let conn = Conn {
        tenant,
        shared: shared.clone(),
        out_tx,
        in_flight: in_flight.clone(),
        pending: Arc::new(PendingImages::new(shared.config.image.pending_limits())),
    };
    tracing::debug!(tenant = %conn.tenant, "connection open");

    let close: Option<(CloseCode, &'static str)> = loop {
        let msg = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => break Some((CloseCode::Away, "server shutting down")),
            // The socket broke, or the client stopped reading: nothing more can reach it.
            end = &mut writer => {
                writer_done = true;
                if matches!(end, Ok(WriterEnd::Stalled)) {
                    shared.metrics.write_timeouts.fetch_add(1, Relaxed);
                    tracing::warn!(
                        tenant = %conn.tenant,
                        timeout_ms = server.write_timeout_ms,
                        "client stopped reading its replies; dropping the connection"
                    );
                }
                break None;
            }
            msg = stream.next() => msg,
        };
        match msg {
            None | Some(Ok(Message::Close(_))) => break None,
            Some(Ok(Message::Text(text))) => conn.on_text(text.as_str()).await,
            Some(Ok(Message::Binary(frame))) => conn.on_binary(frame).await,
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Err(e)) => break close_for(&e),
        }
    };

    // Let in-flight requests finish and send their replies before the close frame.
    let grace = Duration::from_millis(server.shutdown_grace_ms);
    let all = u32::try_from(max_in_flight).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, in_flight.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(tenant = %conn.tenant, "in-flight requests outlived the shutdown grace period");
    }
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = conn.out_tx.send(Message::Close(Some(frame))).await;
    }
    drop(conn);
    if !writer_done {
        // Bounded: the writer gives up on a frame the client does not take in time.
        let _ = writer.await;
    }
}

/// Maps a read error to the close frame to send, if the socket can still take one.
fn close_for(e: &WsError) -> Option<(CloseCode, &'static str)> {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => Some((
            CloseCode::Size,
            "message too big (server.max_message_bytes)",
        )),
        WsError::Capacity(_) => Some((CloseCode::Size, "frame too big")),
        WsError::Utf8(_) => Some((CloseCode::Invalid, "text frame is not valid UTF-8")),
        WsError::Protocol(p) => {
            tracing::debug!(error = %p, "protocol violation");
            Some((CloseCode::Protocol, "protocol violation"))
        }
        WsError::ConnectionClosed | WsError::AlreadyClosed => None,
        other => {
            tracing::debug!(error = %other, "read failed");
            None
        }
    }
}

/// How [`write_loop`] ended.
enum WriterEnd {
    /// The replies ran out, a close frame went out, or the socket broke.
    Done,
    /// A frame waited `server.write_timeout_ms` for the client to take it.
    Stalled,
}

/// The sending side: replies from `out_rx` and the tenant's events, in arrival order, each
/// given `write_timeout` to go out.
async fn write_loop(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<TcpStream>, Message>,
    mut out_rx: mpsc::Receiver<Message>,
    mut events: broadcast::Receiver<Arc<str>>,
    write_timeout: Duration,
) -> WriterEnd {
    loop {
        let msg = tokio::select! {
            msg = out_rx.recv() => match msg {
                Some(m) => m,
                None => break,
            },
            ev = events.recv() => match ev {
                Ok(json) => Message::text(json.to_string()),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "slow connection missed pushed events");
                    continue;
                }
                // The hub lives as long as the server; keep serving replies.
                Err(broadcast::error::RecvError::Closed) => {
                    events = broadcast::channel(1).1;
                    continue;
                }
            },
        };
        let is_close = matches!(msg, Message::Close(_));
        let mut sending = std::pin::pin!(sink.send(msg));
        // Most frames go out at once: the timer is set only for one that has to wait.
        let sent = match futures_util::poll!(sending.as_mut()) {
            std::task::Poll::Ready(result) => Ok(result),
            std::task::Poll::Pending => tokio::time::timeout(write_timeout, sending).await,
        };
        match sent {
            Ok(Ok(())) if !is_close => {}
            Ok(_) => break,
            // Dropped without a close frame: the client would not read that either.
            Err(_) => return WriterEnd::Stalled,
        }
    }
    let _ = tokio::time::timeout(write_timeout, sink.close()).await;
    WriterEnd::Done
}

/// Per-connection request handling.
struct Conn {
    /// The tenant this connection authenticated as.
    tenant: Arc<str>,
    /// Server-wide state.
    shared: Arc<Shared>,
    /// Frames to send; bounded, so a client that does not read slows only itself (until
    /// `server.write_timeout_ms` drops it).
    out_tx: mpsc::Sender<Message>,
    /// One permit per in-flight request.
    in_flight: Arc<Semaphore>,
    /// Binary image frames waiting for their request (and requests waiting for frames).
    pending: Arc<PendingImages>,
}

/// Fills in the bytes of the images `req` expects as binary frames (those without `data`),
/// waiting for missing ones up to `image.binary_wait_ms`. Skipped for a request with too many
/// images: it is refused anyway.
async fn attach_binary_images(
    pending: &PendingImages,
    req: &mut ModerateRequest,
    max_images: usize,
) {
    if req.images.len() > max_images {
        return;
    }
    let request_id = req.id.as_str();
    let waits = req
        .images
        .iter_mut()
        .filter(|image| image.data.is_none())
        .map(|image| async move {
            let key = image.frame_key(request_id);
            image.binary = Some(pending.take(&key).await);
        });
    futures_util::future::join_all(waits).await;
}

impl Conn {
    async fn send(&self, json: String) {
        // Fails only when the writer has stopped (the socket is gone): nothing to tell.
        let _ = self.out_tx.send(Message::text(json)).await;
    }

    async fn send_error(&self, id: Option<String>, code: ErrorCode, message: &str) {
        self.shared.metrics.error(code);
        self.send(to_json(&ErrorReply::new(id, code, message)))
            .await
    }

    /// A binary image frame: parked for (or handed to) the request that lists it.
    async fn on_binary(&self, frame: Bytes) {
        match parse_image_frame(&frame) {
            Ok((key, bytes)) => {
                if let Err(e) = self.pending.offer(key.clone(), bytes) {
                    let code = match e {
                        PendingError::Duplicate(_) => ErrorCode::BadRequest,
                        PendingError::Full { .. } => ErrorCode::Overloaded,
                    };
                    self.send_error(Some(key), code, &e.to_string()).await;
                }
            }
            Err((key, message)) => self.send_error(key, ErrorCode::BadRequest, &message).await,
        }
    }

    /// A `lookup` request: answered at once from memory; a miss that may be in Redis is
    /// answered by its own task (it counts as in flight, bounded by the Redis timeout).
    async fn on_lookup(&self, req: LookupRequest) {
        if let Err(message) = req.validate() {
            return self
                .send_error(Some(req.id), ErrorCode::BadRequest, &message)
                .await;
        }
        let Some(lookup) = self.shared.lookup.clone() else {
            return self
                .send_error(
                    Some(req.id),
                    ErrorCode::BadRequest,
                    "verdict lookup is off on this server (lookup.enabled = false)",
                )
                .await;
        };
        if let Some(found) = lookup.lookup_local(&self.tenant, &req.message) {
            return self
                .send(lookup_result_json(&req, Some((&found.json, found.age_ms))))
                .await;
        }
        if !lookup.is_shared() {
            lookup.count_miss();
            return self.send(lookup_result_json(&req, None)).await;
        }
        let Some(permit) = self.in_flight_permit(&req.id).await else {
            return;
        };
        let tenant = self.tenant.clone();
        let out_tx = self.out_tx.clone();
        tokio::spawn(async move {
            let found = lookup.lookup_shared_or_miss(&tenant, &req.message).await;
            let json = lookup_result_json(&req, found.as_ref().map(|f| (&*f.json, f.age_ms)));
            let _ = out_tx.send(Message::text(json)).await;
            drop(permit);
        });
    }

    /// A slot in this connection's in-flight budget, or `None` after answering request `id`
    /// with an `overloaded` error.
    async fn in_flight_permit(&self, id: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(permit) = self.in_flight.clone().try_acquire_owned() {
            return Some(permit);
        }
        let message = format!(
            "too many requests in flight on this connection (limit {}, \
             server.max_in_flight_per_connection); wait for replies",
            self.shared.config.server.max_in_flight_per_connection
        );
        self.send_error(Some(id.to_owned()), ErrorCode::Overloaded, &message)
            .await;
        None
    }

    async fn on_text(&self, text: &str) {
        let req = match super::protocol::parse_request(text) {
            Ok(req) => req,
            Err(e) => {
                // Only an object has an `id` to echo (a JSON array would deserialize
                // positionally into the probe).
                let probe: Probe = if text.trim_start().starts_with('{') {
                    serde_json::from_str(text).unwrap_or_default()
                } else {
                    Probe::default()
                };
                let message = match probe.kind.as_deref() {
                    _ if e.is_syntax() || e.is_eof() => format!("malformed JSON: {e}"),
                    None => format!("missing or non-string `type`: {e}"),
                    Some(k) if !matches!(k, "moderate" | "sanction" | "lookup" | "ping") => {
                        format!(
                            "unknown type `{k}` (expected `moderate`, `sanction`, `lookup` or \
                             `ping`)"
                        )
                    }
                    Some(k) => format!("invalid `{k}` request: {e}"),
                };
                return self
                    .send_error(probe.id, ErrorCode::BadRequest, &message)
                    .await;
            }
        };
        match req {
            Request::Ping { id } => self.send(to_json(&Pong { kind: "pong", id })).await,
            Request::Lookup(req) => self.on_lookup(req).await,
            Request::Sanction(req) => {
                let id = req.id.clone();
                let json = match self.shared.moderator.sanction(&self.tenant, req) {
                    Ok(sanction) => to_json(&SanctionReply {
                        kind: "sanction",
                        id,
                        sanction,
                    }),
                    Err(e) => {
                        self.shared.metrics.error(e.code());
                        to_json(&ErrorReply::new(Some(id), e.code(), e.to_string()))
                    }
                };
                self.send(json).await
            }
            Request::Moderate(req) => {
                let Some(permit) = self.in_flight_permit(&req.id).await else {
                    return;
                };
                let shared = self.shared.clone();
                let tenant = self.tenant.clone();
                let out_tx = self.out_tx.clone();
                let pending = self.pending.clone();
                tokio::spawn(async move {
                    let mut req = req;
                    let max_images = shared.config.server.max_images_per_message;
                    attach_binary_images(&pending, &mut req, max_images).await;
                    let id = req.id.clone();
                    let msg = match shared.moderator.moderate(&tenant, req).await {
                        Ok(verdict) => {
                            let mut json = to_json(&verdict);
                            match &shared.lookup {
                                Some(lookup) => {
                                    // The stored verdict shares the frame's buffer (no copy);
                                    // shrinking first keeps serializer slack out of the store.
                                    json.shrink_to_fit();
                                    let json = Utf8Bytes::from(json);
                                    lookup.record(&tenant, &verdict.id, &json);
                                    Message::Text(json)
                                }
                                None => Message::text(json),
                            }
                        }
                        Err(e) => {
                            shared.metrics.error(e.code());
                            Message::text(to_json(&ErrorReply::new(
                                Some(id),
                                e.code(),
                                e.to_string(),
                            )))
                        }
                    };
                    let _ = out_tx.send(msg).await;
                    drop(permit);
                });
            }
        }
    }
}
