//! The `[webhook]` end to end: the real server (with its admin endpoint for `/metrics`) posts
//! the `sanction` events that `sanction` requests push to a local test HTTP endpoint. An event
//! answered 500 twice then 200 is delivered once after two retries with the right body and
//! auth header; an endpoint that keeps failing gets `max_attempts` tries and the event counts as
//! failed; a 4xx is not retried; a stalled endpoint fills the queue and new events are dropped
//! and counted; an event type not in `webhook.events` is not posted; a `room_alarm` is posted
//! like a sanction.

use crate::common::{Server, Ws, recv, send};
use chatguard::config::{Config, RawConfig};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// What the test endpoint answers to one request.
#[derive(Debug, Clone, Copy)]
enum Reply {
    /// This status, empty body.
    Status(u16),
    /// Read the request, answer nothing, keep the connection open.
    Hang,
}

/// One request the endpoint received.
#[derive(Debug)]
struct Received {
    /// `POST /path HTTP/1.1`.
    request_line: String,
    /// Header names lower-cased.
    headers: Vec<(String, String)>,
    /// The body.
    body: String,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A local HTTP endpoint answering requests by `script` (the last reply repeats).
struct Hook {
    /// Where it listens.
    addr: SocketAddr,
    /// Every request, in arrival order.
    received: mpsc::UnboundedReceiver<Received>,
}

impl Hook {
    async fn start(script: Vec<Reply>) -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, received) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut stream, _)) = listener.accept().await {
                let reply = script
                    .get(n)
                    .or(script.last())
                    .copied()
                    .unwrap_or(Reply::Status(200));
                n += 1;
                let tx = tx.clone();
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut stream).await else {
                        return;
                    };
                    let _ = tx.send(req);
                    match reply {
                        Reply::Status(code) => {
                            let head = format!(
                                "HTTP/1.1 {code} Test\r\nContent-Length: 0\r\n\
                                 Connection: close\r\n\r\n"
                            );
                            let _ = stream.write_all(head.as_bytes()).await;
                            let _ = stream.shutdown().await;
                        }
                        Reply::Hang => {
                            let mut sink = [0u8; 64];
                            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                        }
                    }
                });
            }
        });
        Hook { addr, received }
    }

    /// The next request (10 s at most).
    async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(10), self.received.recv())
            .await
            .expect("a webhook request within 10 s")
            .expect("endpoint running")
    }
}

/// Reads one request with a `Content-Length` body.
async fn read_request(stream: &mut TcpStream) -> Option<Received> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 1 << 20 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")?
        .1
        .parse()
        .ok()?;
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Received {
        request_line,
        headers,
        body: String::from_utf8(body).ok()?,
    })
}

/// Starts a server whose webhook posts to `hook` (`edit` adjusts the rest).
async fn start(hook: SocketAddr, edit: impl FnOnce(&mut RawConfig)) -> Server {
    Server::start(|raw| {
        raw.webhook.url = Some(format!("http://{hook}/hooks/chatguard"));
        raw.webhook.token = Some("hook-secret".into());
        raw.webhook.backoff_ms = 10;
        raw.webhook.max_backoff_ms = 40;
        edit(raw);
    })
    .await
}

/// Polls the counter `name` until it equals `want` (10 s at most).
async fn wait_metric(server: &Server, name: &str, want: f64) {
    let started = Instant::now();
    loop {
        let got = server.metric(name).await;
        if got == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name} = {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Mutes `user` by hand; returns the pushed `sanction` event (as the WebSocket carried it).
async fn sanction(ws: &mut Ws, id: &str, user: &str) -> Value {
    send(
        ws,
        json!({"type":"sanction","id":id,"user":user,"action":"mute","duration_secs":60,
               "reason":"spam"}),
    )
    .await;
    let (mut reply, mut event) = (None, None);
    while reply.is_none() || event.is_none() {
        let v = recv(ws).await;
        match v.get("id") {
            Some(got) if got == id => reply = Some(v),
            None if v["type"] == "sanction" && v["user"] == user => event = Some(v),
            _ => {}
        }
    }
    let reply = reply.unwrap_or_default();
    assert_eq!(reply["type"], "sanction", "{reply}");
    event.unwrap_or_default()
}

#[tokio::test]
async fn an_event_answered_500_twice_is_delivered_once_after_two_retries() {
    use Reply::Status;
    let mut hook = Hook::start(vec![Status(500), Status(500), Status(200)]).await;
    let server = start(hook.addr, |_| {}).await;
    let mut ws = server.connect().await;
    let event = sanction(&mut ws, "s-1", "u42").await;

    let mut expected = event.clone();
    expected["tenant"] = json!("acme");
    for attempt in 1..=3 {
        let req = hook.next().await;
        assert_eq!(
            req.request_line, "POST /hooks/chatguard HTTP/1.1",
            "attempt {attempt}"
        );
        assert_eq!(req.header("authorization"), Some("Bearer hook-secret"));
        assert_eq!(req.header("content-type"), Some("application/json"));
        let body: Value = serde_json::from_str(&req.body).expect("body is JSON");
        assert_eq!(body, expected, "attempt {attempt}");
    }
    wait_metric(&server, "chatguard_webhook_delivered_total", 1.0).await;
    assert_eq!(server.metric("chatguard_webhook_retried_total").await, 2.0);
    assert_eq!(server.metric("chatguard_webhook_failed_total").await, 0.0);
    assert_eq!(server.metric("chatguard_webhook_dropped_total").await, 0.0);
    server.stop().await;
    // Delivered once: nothing after the 200, shutdown flush included.
    assert!(hook.received.try_recv().is_err(), "a request after the 200");
}

#[tokio::test]
async fn an_endpoint_that_keeps_failing_gets_max_attempts_and_the_event_fails() {
    let mut hook = Hook::start(vec![Reply::Status(503)]).await;
    let server = start(hook.addr, |raw| raw.webhook.max_attempts = 3).await;
    let mut ws = server.connect().await;
    sanction(&mut ws, "s-1", "u1").await;
    for _ in 0..3 {
        hook.next().await;
    }
    wait_metric(&server, "chatguard_webhook_failed_total", 1.0).await;
    assert_eq!(server.metric("chatguard_webhook_retried_total").await, 2.0);
    assert_eq!(
        server.metric("chatguard_webhook_delivered_total").await,
        0.0
    );
    server.stop().await;
    assert!(hook.received.try_recv().is_err(), "more than max_attempts");
}

#[tokio::test]
async fn a_4xx_answer_is_a_permanent_failure() {
    let mut hook = Hook::start(vec![Reply::Status(400), Reply::Status(200)]).await;
    let server = start(hook.addr, |_| {}).await;
    let mut ws = server.connect().await;
    sanction(&mut ws, "s-1", "u1").await;
    hook.next().await;
    wait_metric(&server, "chatguard_webhook_failed_total", 1.0).await;
    assert_eq!(server.metric("chatguard_webhook_retried_total").await, 0.0);
    // The next event still goes out.
    sanction(&mut ws, "s-2", "u2").await;
    let body: Value = serde_json::from_str(&hook.next().await.body).expect("JSON");
    assert_eq!(body["user"], "u2");
    wait_metric(&server, "chatguard_webhook_delivered_total", 1.0).await;
    server.stop().await;
}

#[tokio::test]
async fn a_full_queue_drops_new_events_and_counts_them() {
    let mut hook = Hook::start(vec![Reply::Hang]).await;
    let server = start(hook.addr, |raw| {
        raw.webhook.queue = 1;
        raw.webhook.timeout_ms = 60_000;
        raw.webhook.shutdown_flush_ms = 100;
    })
    .await;
    let mut ws = server.connect().await;
    sanction(&mut ws, "s-1", "u1").await;
    // The first event is being delivered (the endpoint holds it)...
    hook.next().await;
    // ...the second waits in the queue, the third and fourth do not fit.
    for (id, user) in [("s-2", "u2"), ("s-3", "u3"), ("s-4", "u4")] {
        sanction(&mut ws, id, user).await;
    }
    assert_eq!(server.metric("chatguard_webhook_dropped_total").await, 2.0);
    assert_eq!(server.metric("chatguard_webhook_queue_depth").await, 1.0);
    // Moderation went on meanwhile, and shutdown does not wait for the stalled endpoint past
    // webhook.shutdown_flush_ms (stop() allows 10 s; the attempt's timeout is 60 s).
    send(
        &mut ws,
        json!({"type":"moderate","id":"m-1","user":"u9","text":"hi"}),
    )
    .await;
    loop {
        let v = recv(&mut ws).await;
        if v["id"] == "m-1" {
            assert_eq!(v["type"], "verdict");
            break;
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn event_types_not_listed_are_not_posted() {
    let mut hook = Hook::start(vec![Reply::Status(200)]).await;
    let server = start(hook.addr, |raw| {
        raw.webhook.events = vec!["room_alarm".into()];
    })
    .await;
    let mut ws = server.connect().await;
    sanction(&mut ws, "s-1", "u1").await;
    server.stop().await;
    assert!(hook.received.try_recv().is_err(), "a sanction was posted");
}

#[tokio::test]
async fn a_room_alarm_is_posted_with_its_tenant() {
    let mut hook = Hook::start(vec![Reply::Status(204)]).await;
    let server = start(hook.addr, |raw| {
        raw.behaviour.room_alarm_flagged = 2;
        raw.webhook.events = vec!["room_alarm".into()];
    })
    .await;
    let mut ws = server.connect().await;
    // Flagged messages from different users in one room raise the alarm.
    for (i, user) in ["a1", "a2"].into_iter().enumerate() {
        let id = format!("m-{i}");
        send(
            &mut ws,
            json!({"type":"moderate","id":id,"user":user,"room":"hot","text":"you stupid fuck"}),
        )
        .await;
    }
    let alarm = loop {
        let v = recv(&mut ws).await;
        if v["type"] == "room_alarm" {
            break v;
        }
    };
    let body: Value = serde_json::from_str(&hook.next().await.body).expect("JSON");
    let mut expected = alarm;
    expected["tenant"] = json!("acme");
    assert_eq!(body, expected);
    wait_metric(&server, "chatguard_webhook_delivered_total", 1.0).await;
    server.stop().await;
}

#[test]
fn https_urls_are_refused_with_a_pointer_to_a_proxy() {
    let mut raw = RawConfig::default();
    raw.webhook.url = Some("https://alerts.example.com/hook".into());
    let err = Config::build(raw).expect_err("https refused").to_string();
    assert!(
        err.contains("webhook.url") && err.contains("TLS-terminating proxy"),
        "{err}"
    );
}
