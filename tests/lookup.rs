//! Verdict lookup end to end: the real server on port 0, real WebSocket. A lookup returns the
//! verdict exactly as it was sent (hit), nothing for an unknown id (miss), nothing after
//! `lookup.ttl_secs` (expiry) or once `lookup.max_entries` newer verdicts came (eviction),
//! nothing across tenants; bad requests get `bad_request`. With Redis: a verdict given by one
//! sidecar is found by another, and a sidecar whose Redis is down still answers from memory.
//!
//! Redis: `CHATGUARD_TEST_REDIS_URL` (set by `scripts/with-test-redis.sh` and `make test`); the
//! shared test FAILS if it cannot be reached. Without the variable it starts its own
//! `redis-server` from `PATH` on a free port. Each test uses its own key prefix.

use crate::common::{self, OTHER_TOKEN, Server, Ws, connect_as, send, shared_redis, unique_prefix};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// The next text frame, raw.
async fn recv_raw(ws: &mut Ws) -> String {
    let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .expect("reply within 30s")
        .expect("stream open")
        .expect("frame ok");
    match msg {
        Message::Text(t) => t.as_str().to_owned(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// The raw reply with `id`, skipping pushed events.
async fn recv_id_raw(ws: &mut Ws, id: &str) -> String {
    loop {
        let raw = recv_raw(ws).await;
        let v: Value = serde_json::from_str(&raw).expect("reply is JSON");
        if v["id"] == id {
            return raw;
        }
    }
}

/// Moderates `text` as message `id` and returns the verdict frame exactly as received.
async fn moderate_raw(ws: &mut Ws, id: &str, text: &str) -> String {
    send(
        ws,
        json!({"type":"moderate","id":id,"user":"u1","room":"r1","text":text}),
    )
    .await;
    let raw = recv_id_raw(ws, id).await;
    let v: Value = serde_json::from_str(&raw).expect("JSON");
    assert_eq!(v["type"], "verdict", "{raw}");
    raw
}

/// Looks up message `message`; returns the reply.
async fn lookup(ws: &mut Ws, message: &str) -> Value {
    let id = format!("q-{message}");
    send(ws, json!({"type":"lookup","id":id,"message":message})).await;
    let raw = recv_id_raw(ws, &id).await;
    serde_json::from_str(&raw).expect("JSON")
}

fn assert_miss(reply: &Value, message: &str) {
    assert_eq!(reply["type"], "lookup_result", "{reply}");
    assert_eq!(reply["message"], message, "{reply}");
    assert_eq!(reply["found"], false, "{reply}");
    assert!(
        reply.get("verdict").is_none() && reply.get("age_ms").is_none(),
        "{reply}"
    );
}

#[tokio::test]
async fn a_lookup_returns_the_verdict_exactly_as_sent() {
    let server = Server::start(|_| {}).await;
    let mut ws = server.connect().await;
    let sent = moderate_raw(&mut ws, "m-1", "you stupid fuck, go to hell").await;
    moderate_raw(&mut ws, "m-2", "hello there").await;

    send(&mut ws, json!({"type":"lookup","id":"q-1","message":"m-1"})).await;
    let raw = recv_id_raw(&mut ws, "q-1").await;
    let reply: Value = serde_json::from_str(&raw).expect("JSON");
    assert_eq!(reply["type"], "lookup_result");
    assert_eq!(reply["id"], "q-1");
    assert_eq!(reply["message"], "m-1");
    assert_eq!(reply["found"], true, "{reply}");
    assert!(reply["age_ms"].as_u64().is_some(), "{reply}");
    let verdict: Value = serde_json::from_str(&sent).expect("JSON");
    assert_eq!(reply["verdict"], verdict);
    // Byte for byte: the stored frame is spliced into the reply unchanged.
    assert!(raw.contains(&sent), "{raw}\nshould contain\n{sent}");

    let other = lookup(&mut ws, "m-2").await;
    assert_eq!(other["verdict"]["id"], "m-2");
    // Any connection of the tenant can look it up.
    let mut ws2 = server.connect().await;
    assert_eq!(lookup(&mut ws2, "m-1").await["verdict"], verdict);
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_message_is_a_miss() {
    let server = Server::start(|_| {}).await;
    let mut ws = server.connect().await;
    moderate_raw(&mut ws, "m-1", "hello").await;
    assert_miss(&lookup(&mut ws, "never-sent").await, "never-sent");
    server.stop().await;
}

#[tokio::test]
async fn a_verdict_expires_after_the_ttl() {
    let server = Server::start(|raw| raw.lookup.ttl_secs = 1).await;
    let mut ws = server.connect().await;
    moderate_raw(&mut ws, "m-1", "hello").await;
    assert_eq!(lookup(&mut ws, "m-1").await["found"], true);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_miss(&lookup(&mut ws, "m-1").await, "m-1");
    server.stop().await;
}

#[tokio::test]
async fn the_oldest_verdict_is_evicted_at_max_entries() {
    let server = Server::start(|raw| raw.lookup.max_entries = 2).await;
    let mut ws = server.connect().await;
    for id in ["m-1", "m-2", "m-3"] {
        moderate_raw(&mut ws, id, "hello").await;
    }
    assert_miss(&lookup(&mut ws, "m-1").await, "m-1");
    assert_eq!(lookup(&mut ws, "m-2").await["found"], true);
    assert_eq!(lookup(&mut ws, "m-3").await["found"], true);
    server.stop().await;
}

#[tokio::test]
async fn a_tenant_never_sees_another_tenants_verdicts() {
    let server = Server::start(|_| {}).await;
    let mut acme = server.connect().await;
    let mut other = connect_as(server.addr, OTHER_TOKEN).await;
    let acme_verdict = moderate_raw(&mut acme, "m-1", "you stupid fuck").await;
    assert_miss(&lookup(&mut other, "m-1").await, "m-1");
    // The same message id in each tenant: each sees its own.
    let other_verdict = moderate_raw(&mut other, "m-1", "hello").await;
    let parse = |s: &str| serde_json::from_str::<Value>(s).expect("JSON");
    assert_eq!(
        lookup(&mut acme, "m-1").await["verdict"],
        parse(&acme_verdict)
    );
    assert_eq!(
        lookup(&mut other, "m-1").await["verdict"],
        parse(&other_verdict)
    );
    assert_ne!(
        parse(&acme_verdict)["action"],
        parse(&other_verdict)["action"]
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_lookup_requests_get_bad_request() {
    let server = Server::start(|_| {}).await;
    let mut ws = server.connect().await;
    let long = "x".repeat(257);
    let cases = [
        (json!({"type":"lookup","id":"q-1"}), "message"),
        (json!({"type":"lookup","id":"q-1","message":""}), "message"),
        (
            json!({"type":"lookup","id":"q-1","message":long}),
            "message",
        ),
        (json!({"type":"lookup","id":"q-1","message":7}), "lookup"),
        (
            json!({"type":"lookup","id":"q-1","message":"m","extra":1}),
            "extra",
        ),
        (json!({"type":"lookup","id":"","message":"m"}), "id"),
    ];
    for (req, mentions) in cases {
        send(&mut ws, req.clone()).await;
        let reply = common::recv(&mut ws).await;
        assert_eq!(reply["type"], "error", "{req} -> {reply}");
        assert_eq!(reply["code"], "bad_request", "{req} -> {reply}");
        let message = reply["message"].as_str().unwrap_or_default();
        assert!(message.contains(mentions), "{req} -> {reply}");
    }
    // The connection survives.
    assert_miss(&lookup(&mut ws, "m").await, "m");
    server.stop().await;

    let server = Server::start(|raw| raw.lookup.enabled = false).await;
    let mut ws = server.connect().await;
    send(&mut ws, json!({"type":"lookup","id":"q-1","message":"m"})).await;
    let reply = common::recv(&mut ws).await;
    assert_eq!(reply["code"], "bad_request", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("lookup.enabled")),
        "{reply}"
    );
    server.stop().await;
}

#[tokio::test]
async fn lookups_evictions_and_skips_are_counted_in_metrics() {
    let server = Server::start(|raw| {
        raw.lookup.max_entries = 1;
        raw.lookup.max_verdict_bytes = 600;
    })
    .await;
    let mut ws = server.connect().await;
    moderate_raw(&mut ws, "m-1", "hello").await;
    let small = moderate_raw(&mut ws, "m-2", "hello").await;
    assert!(small.len() <= 600, "{} bytes", small.len());
    // Over max_verdict_bytes: sent, not kept.
    let big = moderate_raw(&mut ws, "m-big", &"fuck ".repeat(40)).await;
    assert!(big.len() > 600, "{} bytes", big.len());
    assert_eq!(lookup(&mut ws, "m-2").await["found"], true);
    assert_miss(&lookup(&mut ws, "m-1").await, "m-1");
    assert_miss(&lookup(&mut ws, "m-big").await, "m-big");
    for (name, want) in [
        ("chatguard_lookups_total{result=\"hit_local\"}", 1),
        ("chatguard_lookups_total{result=\"miss\"}", 2),
        ("chatguard_lookups_total{result=\"hit_shared\"}", 0),
        ("chatguard_lookup_stored", 1),
        ("chatguard_lookup_evictions_total", 1),
        ("chatguard_lookup_skipped_total", 1),
    ] {
        assert_eq!(server.metric(name).await, f64::from(want), "{name}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_verdict_given_by_one_sidecar_is_found_by_another_through_redis() {
    let (url, _guard) = shared_redis();
    let prefix = unique_prefix("lookup");
    let shared = |raw: &mut chatguard::config::RawConfig| {
        raw.behaviour.store = chatguard::behaviour::StoreKind::Redis;
        raw.behaviour.redis_url = url.clone();
        raw.behaviour.redis_key_prefix = prefix.clone();
        raw.behaviour.redis_timeout_ms = 500;
    };
    let a = Server::start(shared).await;
    let b = Server::start(shared).await;
    let (mut ws_a, mut ws_b) = (a.connect().await, b.connect().await);
    let sent = moderate_raw(&mut ws_a, "m-1", "you stupid fuck").await;
    let verdict: Value = serde_json::from_str(&sent).expect("JSON");

    // The write to Redis is behind the reply: poll B (bounded) until it is there.
    let started = Instant::now();
    let reply = loop {
        let reply = lookup(&mut ws_b, "m-1").await;
        if reply["found"] == true {
            break reply;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "B never found A's verdict: is Redis at {url} reachable \
             (CHATGUARD_TEST_REDIS_URL; run under scripts/with-test-redis.sh)? last: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(reply["verdict"], verdict);
    assert!(
        reply["age_ms"].as_u64().is_some_and(|a| a < 600_000),
        "{reply}"
    );
    eprintln!("shared lookup hit after {:?}", started.elapsed());
    // Now kept in B's memory too, and still per tenant.
    assert_eq!(lookup(&mut ws_b, "m-1").await["verdict"], verdict);
    drop(ws_b);
    let b = {
        b.stop().await;
        Server::start(shared).await
    };
    let mut other = connect_as(b.addr, OTHER_TOKEN).await;
    assert_miss(&lookup(&mut other, "m-1").await, "m-1");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn with_redis_down_lookups_answer_from_memory() {
    // Nothing listens on this port.
    let url = format!("redis://127.0.0.1:{}/", common::free_port());
    let server = Server::start(|raw| {
        raw.behaviour.store = chatguard::behaviour::StoreKind::Redis;
        raw.behaviour.redis_url = url.clone();
        raw.behaviour.redis_key_prefix = unique_prefix("lookup");
        raw.behaviour.redis_timeout_ms = 200;
    })
    .await;
    let mut ws = server.connect().await;
    let sent = moderate_raw(&mut ws, "m-1", "hello").await;
    let verdict: Value = serde_json::from_str(&sent).expect("JSON");
    assert_eq!(lookup(&mut ws, "m-1").await["verdict"], verdict);
    assert_miss(&lookup(&mut ws, "m-2").await, "m-2");
    server.stop().await;
}
