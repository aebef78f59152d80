//! End-to-end tests: the real server on port 0, spoken to over a real WebSocket.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::common::{OTHER_TOKEN, Server, TOKEN, Ws, http_get, recv, recv_reply, send};

/// Reads until a close frame arrives; returns its code.
async fn recv_close(ws: &mut Ws) -> CloseCode {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("close within 10s");
        match msg {
            Some(Ok(Message::Close(Some(frame)))) => return frame.code,
            Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("error before close frame: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    }
}

/// A `moderate` request; each id gets its own sender so bursts do not trip the flood limit.
fn moderate(id: &str, text: &str) -> Value {
    json!({"type":"moderate","id":id,"user":format!("user-{id}"),"room":"r1","text":text})
}

/// Sends a request and checks the server still answers correctly afterwards.
async fn assert_still_serving(server: &Server) {
    let mut ws = server.connect().await;
    send(&mut ws, moderate("alive", "hello there")).await;
    let v = recv_reply(&mut ws).await;
    assert_eq!(v["type"], "verdict");
    assert_eq!(v["id"], "alive");
}

#[tokio::test]
async fn verdicts_for_clean_and_abusive_text_with_offsets() {
    let server = Server::start(|_| {}).await;
    let mut ws = server.connect().await;
    send(&mut ws, moderate("m-1", "hello, see you tomorrow")).await;
    let v = recv_reply(&mut ws).await;
    assert_eq!(v["type"], "verdict");
    assert_eq!(v["id"], "m-1");
    assert_eq!(v["action"], "allow");
    assert_eq!(v["matches"], json!([]));
    assert_eq!(v["sender"]["state"], "ok");
    assert!(v["took_us"].is_u64());

    let text = "héllo, you f.u.c.k.i.n.g idiot";
    send(&mut ws, moderate("m-2", text)).await;
    let v = recv_reply(&mut ws).await;
    assert_eq!(v["id"], "m-2");
    assert_ne!(v["action"], "allow", "{v}");
    let matches = v["matches"].as_array().expect("matches array");
    assert!(!matches.is_empty(), "{v}");
    for m in matches {
        let (s, e) = (
            m["start"].as_u64().unwrap() as usize,
            m["end"].as_u64().unwrap() as usize,
        );
        let (sc, ec) = (
            m["start_char"].as_u64().unwrap() as usize,
            m["end_char"].as_u64().unwrap() as usize,
        );
        let by_bytes = &text[s..e];
        let by_chars: String = text.chars().skip(sc).take(ec - sc).collect();
        assert_eq!(by_bytes, by_chars, "byte and char offsets disagree: {m}");
    }
    assert!(
        matches.iter().any(|m| &text
            [m["start"].as_u64().unwrap() as usize..m["end"].as_u64().unwrap() as usize]
            == "idiot"),
        "{v}"
    );
    server.stop().await;
}

#[tokio::test]
async fn pipelined_requests_get_one_reply_each_by_id() {
    // The same clean text from many senders is a raid by design; this test is about
    // pipelining, so raid detection is lifted.
    let server = Server::start(|raw| raw.behaviour.raid_min_users = 65535).await;
    let mut ws = server.connect().await;
    // Ids deliberately not in send order; texts of very different sizes so the server's
    // tasks finish in different orders.
    let long_clean = "the weather is nice today ".repeat(1500);
    let mut want: HashMap<String, &str> = HashMap::new();
    for i in 0..60 {
        let id = format!("id-{}", (i * 37) % 61);
        let (text, action): (&str, &str) = match i % 3 {
            0 => ("go fuck yourself, loser", "block"),
            1 => (&long_clean, "allow"),
            _ => ("good morning everyone", "allow"),
        };
        send(&mut ws, moderate(&id, text)).await;
        want.insert(id, action);
    }
    send(&mut ws, json!({"type":"ping","id":"p-1"})).await;
    let mut seen = HashSet::new();
    let mut got_pong = false;
    while seen.len() < want.len() || !got_pong {
        let v = recv_reply(&mut ws).await;
        if v["type"] == "pong" {
            assert_eq!(v["id"], "p-1");
            got_pong = true;
            continue;
        }
        assert_eq!(v["type"], "verdict", "{v}");
        let id = v["id"].as_str().expect("id").to_string();
        assert!(seen.insert(id.clone()), "duplicate reply for {id}");
        assert_eq!(v["action"], want[&id], "wrong verdict for {id}: {v}");
    }
    server.stop().await;
}

#[tokio::test]
async fn unknown_or_missing_token_gets_401_and_wrong_path_404() {
    let server = Server::start(|_| {}).await;
    for token in [None, Some("not-a-valid-token")] {
        match server.connect_with(token, "/v1/ws").await {
            Err(WsError::Http(resp)) => assert_eq!(resp.status(), 401, "token {token:?}"),
            Err(e) => panic!("expected HTTP 401, got {e}"),
            Ok(_) => panic!("connected with token {token:?}"),
        }
    }
    match server.connect_with(Some(TOKEN), "/other").await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected HTTP 404, got {:?}", other.map(|_| ())),
    }
    assert_still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_the_connection_survives() {
    let server = Server::start(|_| {}).await;
    let mut ws = server.connect().await;
    let huge = "a".repeat(1 << 20);
    let cases: Vec<(String, Value, &str, &str)> = vec![
        (
            "{not json".into(),
            Value::Null,
            "bad_request",
            "malformed JSON",
        ),
        (
            json!({"type":"moderate","id":"m-3","text":"hi"}).to_string(),
            json!("m-3"),
            "bad_request",
            "missing field `user`",
        ),
        (
            json!({"type":"moderate","id":"m-4","user":5,"text":"hi"}).to_string(),
            json!("m-4"),
            "bad_request",
            "invalid type",
        ),
        (
            json!({"type":"explode","id":"m-5"}).to_string(),
            json!("m-5"),
            "bad_request",
            "unknown type `explode`",
        ),
        (
            json!({"id":"m-6","user":"u"}).to_string(),
            json!("m-6"),
            "bad_request",
            "type",
        ),
        (
            json!({"type":"moderate","id":"m-7","user":"u1","text":""}).to_string(),
            json!("m-7"),
            "bad_request",
            "empty message",
        ),
        (
            json!({"type":"moderate","id":"m-8","user":"u1","text":huge}).to_string(),
            json!("m-8"),
            "too_large",
            "server.max_text_bytes",
        ),
        (
            json!({"type":"moderate","id":"m-9","user":"u1","text":"hi","policy":"nope"})
                .to_string(),
            json!("m-9"),
            "bad_request",
            "unknown policy `nope`",
        ),
        (
            json!({"type":"moderate","id":"m-10","user":"u1","text":"hi","extra":1}).to_string(),
            json!("m-10"),
            "bad_request",
            "unknown field `extra`",
        ),
        ("[1,2,3]".into(), Value::Null, "bad_request", "JSON object"),
        // An array is not a request, and its first element is not an id to echo.
        (
            r#"["m-11","moderate"]"#.into(),
            Value::Null,
            "bad_request",
            "JSON object",
        ),
    ];
    let mut failures = Vec::new();
    for (frame, id, code, needle) in &cases {
        ws.send(Message::text(frame.clone())).await.expect("send");
        let v = recv_reply(&mut ws).await;
        let ok = v["type"] == "error"
            && v["id"] == *id
            && v["code"] == *code
            && v["message"].as_str().is_some_and(|m| m.contains(needle));
        if !ok {
            failures.push(format!(
                "frame {:.60}: want {code}/{id}/{needle:?}, got {v}",
                frame
            ));
        }
    }
    // A binary frame where a JSON request is expected.
    ws.send(Message::binary(vec![0u8, 1, 2, 3]))
        .await
        .expect("send");
    let v = recv_reply(&mut ws).await;
    if !(v["type"] == "error" && v["code"] == "bad_request") {
        failures.push(format!("binary frame: got {v}"));
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Same connection still works.
    send(&mut ws, moderate("after", "hi")).await;
    assert_eq!(recv_reply(&mut ws).await["id"], "after");
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_text_frame_closes_with_1007() {
    let server = Server::start(|_| {}).await;
    let mut ws = server.connect().await;
    let frame = tokio_tungstenite::tungstenite::protocol::frame::Frame::message(
        vec![b'{', 0xff, 0xfe, b'}'],
        tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode::Data(
            tokio_tungstenite::tungstenite::protocol::frame::coding::Data::Text,
        ),
        true,
    );
    ws.send(Message::Frame(frame))
        .await
        .expect("send raw frame");
    assert_eq!(recv_close(&mut ws).await, CloseCode::Invalid);
    assert_still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let server = Server::start(|raw| {
        raw.server.max_message_bytes = 256 << 10;
        raw.server.max_text_bytes = 64 << 10;
    })
    .await;
    let mut ws = server.connect().await;
    let text = "x".repeat(300 << 10);
    // The client may see the close before or after its send completes.
    let _ = ws
        .send(Message::text(moderate("big", &text).to_string()))
        .await;
    assert_eq!(recv_close(&mut ws).await, CloseCode::Size);
    assert_still_serving(&server).await;
    server.stop().await;
}

/// Current-thread runtime: the server's request tasks cannot run while its reader drains a
/// burst of buffered frames, so the in-flight limit is reached deterministically.
#[tokio::test(flavor = "current_thread")]
async fn too_many_in_flight_requests_get_overloaded() {
    let server = Server::start(|raw| raw.server.max_in_flight_per_connection = 2).await;
    let mut ws = server.connect().await;
    let n = 300;
    for i in 0..n {
        ws.feed(Message::text(
            moderate(&format!("r{i}"), "hello").to_string(),
        ))
        .await
        .expect("feed");
    }
    ws.flush().await.expect("flush");
    let mut ids = HashSet::new();
    let (mut verdicts, mut overloaded) = (0, 0);
    for _ in 0..n {
        let v = recv_reply(&mut ws).await;
        match (v["type"].as_str(), v["code"].as_str()) {
            (Some("verdict"), _) => verdicts += 1,
            (Some("error"), Some("overloaded")) => overloaded += 1,
            _ => panic!("unexpected reply {v}"),
        }
        assert!(ids.insert(v["id"].as_str().expect("id").to_string()));
    }
    assert!(overloaded > 0, "no request was refused");
    assert!(verdicts > 0, "no request was served");
    server.stop().await;
}

#[tokio::test]
async fn repeated_abuse_pushes_a_sanction_to_every_connection_of_the_tenant() {
    let server = Server::start(|raw| {
        raw.behaviour.throttle_at = 2.0;
        raw.behaviour.mute_at = 4.0;
        raw.behaviour.block_at = 8.0;
        raw.behaviour.flood_per_second = 1000;
        raw.behaviour.flood_burst = 1000;
    })
    .await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let mut other = server
        .connect_with(Some(OTHER_TOKEN), "/v1/ws")
        .await
        .expect("other tenant connects");
    let mut sanction = None;
    let mut last_state = String::new();
    for i in 0..20 {
        send(
            &mut a,
            json!({"type":"moderate","id":format!("a{i}"),"user":"troll","text":"you fucking worthless idiot"}),
        )
        .await;
        // Read until this request's verdict; collect any sanction on the way.
        loop {
            let v = recv(&mut a).await;
            if v["type"] == "sanction" {
                sanction.get_or_insert(v);
                continue;
            }
            assert_eq!(v["id"], format!("a{i}"));
            last_state = v["sender"]["state"].as_str().unwrap_or("").to_string();
            break;
        }
        if sanction.is_some() && last_state != "ok" {
            break;
        }
    }
    let sanction = sanction.expect("a sanction event after repeated abuse");
    assert_eq!(sanction["user"], "troll");
    assert_eq!(sanction["reason"], "abuse_rate");
    assert!(["throttle", "mute", "block"].contains(&sanction["action"].as_str().unwrap()));
    assert!(sanction["until"].as_u64().is_some(), "{sanction}");
    assert_ne!(
        last_state, "ok",
        "the verdict's sender field reflects the sanction"
    );
    // The second connection of the same tenant gets the same event.
    let on_b = recv(&mut b).await;
    assert_eq!(on_b["type"], "sanction");
    assert_eq!(on_b["user"], "troll");
    // Another tenant does not.
    send(&mut other, json!({"type":"ping","id":"x"})).await;
    assert_eq!(recv(&mut other).await["type"], "pong");
    // The same user id in another tenant is unaffected.
    send(
        &mut other,
        json!({"type":"moderate","id":"o1","user":"troll","text":"good morning"}),
    )
    .await;
    let v = recv(&mut other).await;
    assert_eq!(v["sender"]["state"], "ok", "{v}");
    server.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_answers_in_flight_then_closes_with_1001() {
    let server = Server::start(|_| {}).await;
    let mut ws = server.connect().await;
    let n = 50;
    for i in 0..n {
        ws.feed(Message::text(
            moderate(&format!("s{i}"), "have a nice day").to_string(),
        ))
        .await
        .expect("feed");
    }
    ws.flush().await.expect("flush");
    // Wait for the first reply so the server has started reading the burst.
    let first = recv_reply(&mut ws).await;
    assert_eq!(first["type"], "verdict", "{first}");
    let addr = server.addr;
    server.cancel();
    let mut replies = 1;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frame within 10s")
        {
            Some(Ok(Message::Text(_))) => replies += 1,
            Some(Ok(Message::Close(Some(f)))) => break f.code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, CloseCode::Away);
    assert!(replies >= 1, "got {replies} replies");
    server.stop().await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener closed after shutdown"
    );
}

/// Issue 3: an insult with no keyword in any list is caught by the real text model, end to
/// end over the WebSocket.
#[tokio::test]
async fn model_flags_an_insult_no_wordlist_contains() {
    let server = Server::start(|raw| raw.text_model.enabled = true).await;
    let mut ws = server.connect().await;
    let text = "nobody would miss you if you disappeared";
    send(&mut ws, moderate("m-model", text)).await;
    let v = recv_reply(&mut ws).await;
    assert_eq!(v["id"], "m-model");
    assert_eq!(
        v["degraded"],
        json!([]),
        "model must be loaded (run `make models`): {v}"
    );
    assert_eq!(
        v["matches"],
        json!([]),
        "no wordlist entry should match: {v}"
    );
    assert_ne!(v["action"], "allow", "{v}");
    let labels = v["labels"].as_array().expect("labels");
    assert!(
        labels
            .iter()
            .any(|l| l["source"] == "model" && l["label"] == "abuse"),
        "{v}"
    );
    send(
        &mut ws,
        moderate("m-clean", "have a great day, see you at lunch"),
    )
    .await;
    let v = recv_reply(&mut ws).await;
    assert_eq!(v["action"], "allow", "{v}");
    server.stop().await;
}

/// A missing model directory degrades to lexicon-only verdicts instead of failing.
#[tokio::test]
async fn missing_model_files_degrade_instead_of_failing() {
    let server = Server::start(|raw| {
        raw.text_model.enabled = true;
        raw.text_model.models_dir = "/nonexistent/chatguard-models".into();
    })
    .await;
    let mut ws = server.connect().await;
    send(&mut ws, moderate("d1", "go fuck yourself")).await;
    let v = recv_reply(&mut ws).await;
    assert_eq!(v["degraded"], json!(["text_model"]), "{v}");
    assert_ne!(v["action"], "allow", "lexicon still works: {v}");
    server.stop().await;
}

#[tokio::test]
async fn admin_endpoints_report_health_readiness_and_metrics() {
    let server = Server::start(|raw| {
        raw.auth.tokens.clear();
        raw.text_model.enabled = true;
        raw.text_model.models_dir = "/nonexistent/chatguard-models".into();
    })
    .await;
    let admin_addr = server.admin;
    // Open server (no tokens): connect without auth.
    let mut ws = server.connect_with(None, "/v1/ws").await.expect("connect");
    send(&mut ws, moderate("x1", "you stupid idiot")).await;
    assert_eq!(recv_reply(&mut ws).await["type"], "verdict");
    send(&mut ws, json!({"type":"nope"})).await;
    assert_eq!(recv_reply(&mut ws).await["type"], "error");

    assert_eq!(http_get(admin_addr, "/healthz").await, (200, "ok\n".into()));
    let (status, body) = http_get(admin_addr, "/readyz").await;
    let v: Value = serde_json::from_str(&body).expect("readyz JSON");
    assert_eq!(
        status, 200,
        "the text model is optional for readiness: {body}"
    );
    assert_eq!(v["stages"]["lexicon"], "ok");
    assert!(
        v["stages"]["text_model"]
            .as_str()
            .unwrap()
            .starts_with("unavailable"),
        "{body}"
    );
    let (status, metrics) = http_get(admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    let mut values = HashMap::new();
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line.rsplit_once(' ').expect("`name value` line");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        values.insert(name.to_string(), value);
    }
    assert_eq!(values["chatguard_connections_open"], 1.0);
    assert_eq!(values["chatguard_errors_total{code=\"bad_request\"}"], 1.0);
    assert_eq!(
        values["chatguard_degraded_total{stage=\"text_model\"}"],
        1.0
    );
    let verdicts: f64 = ["allow", "review", "block"]
        .iter()
        .map(|a| values[&format!("chatguard_verdicts_total{{action=\"{a}\"}}")])
        .sum();
    assert_eq!(verdicts, 1.0);
    assert_eq!(values["chatguard_moderate_seconds_count"], 1.0);
    assert_eq!(http_get(admin_addr, "/nope").await.0, 404);
    server.stop().await;
}

/// `/readyz` reports the Redis behaviour store: `shared_state` unavailable (naming the URL)
/// while Redis cannot be reached, without making the sidecar unready (verdicts go on).
#[tokio::test]
async fn readyz_reports_an_unreachable_redis_store() {
    let server = crate::common::Server::start(|raw| {
        raw.behaviour.store = chatguard::behaviour::StoreKind::Redis;
        // Nothing listens on port 1.
        raw.behaviour.redis_url = "redis://127.0.0.1:1/".into();
    })
    .await;
    let started = std::time::Instant::now();
    let body = loop {
        let (status, body) = http_get(server.admin, "/readyz").await;
        assert_eq!(status, 200, "degraded shared state is still ready: {body}");
        let v: Value = serde_json::from_str(&body).expect("readyz JSON");
        let state = v["stages"]["shared_state"].as_str().unwrap_or_default();
        if state.starts_with("unavailable") {
            break v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "shared_state never reported unreachable: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        body["stages"]["shared_state"]
            .as_str()
            .is_some_and(|s| s.contains("redis://127.0.0.1:1/")),
        "{body}"
    );
    assert_eq!(body["ready"], true, "{body}");
    let mut ws = server.connect().await;
    send(&mut ws, moderate("r1", "hello")).await;
    let v = recv_reply(&mut ws).await;
    assert_eq!(v["degraded"], json!(["shared_state"]), "{v}");
    server.stop().await;
}
