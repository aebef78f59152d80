//! Sender behaviour across restarts and sidecars: the memory backend's snapshot + journal, two
//! sidecars sharing one real Redis, a Redis outage in mid-run, and the behaviour signals end to
//! end over the WebSocket.
//!
//! Redis: tests that share a server read its URL from `CHATGUARD_TEST_REDIS_URL` (`make test`
//! and `.ci/run` start one on 127.0.0.1:6399 and set it) and FAIL if it cannot be reached.
//! Without the variable (a plain `cargo test`), each such test starts its own `redis-server`
//! from `PATH` on a free loopback port and stops it at the end; the outage test always starts
//! its own. Each test uses its own key prefix, so tests never see each other's keys.

use crate::common::{
    RedisServer, Server, TOKEN, Ws, next_event, recv_id, send, shared_redis, unique_prefix,
};
use chatguard::behaviour::{
    BehaviourConfig, MessageFacts, Outcome, SanctionState, StoreKind, Tracker,
};
use chatguard::config::RawConfig;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A made-up insult of high severity, so these tests do not depend on the shipped wordlists.
const INSULT: &str = "zorgblat";

/// Small thresholds: one `block` of severity 1.0 (2.0) throttles, two mute, four block.
fn rules() -> BehaviourConfig {
    BehaviourConfig {
        throttle_at: 2.0,
        mute_at: 4.0,
        block_at: 8.0,
        throttle_secs: 60,
        mute_secs: 600,
        block_secs: 3600,
        cooldown_secs: 300,
        ..BehaviourConfig::default()
    }
}

fn redis_rules(url: &str, prefix: &str) -> BehaviourConfig {
    BehaviourConfig {
        store: StoreKind::Redis,
        redis_url: url.to_owned(),
        redis_key_prefix: prefix.to_owned(),
        redis_timeout_ms: 500,
        ..rules()
    }
}

/// Polls `ok` every 10 ms for up to `within`; panics with `what` if it never holds.
async fn eventually(within: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `tracker` has reached Redis; a clear failure when it cannot.
async fn connected(tracker: &Tracker, url: &str) {
    eventually(
        Duration::from_secs(5),
        &format!(
            "Redis at {url} unreachable (CHATGUARD_TEST_REDIS_URL): run `make test`, which \
             starts one, or unset the variable to let the tests start their own"
        ),
        || !tracker.degraded(),
    )
    .await;
}

const BLOCK: Outcome = Outcome::Block { severity: 1.0 };

#[tokio::test]
async fn two_sidecars_share_sanctions_through_redis() {
    let (url, _guard) = shared_redis();
    let prefix = unique_prefix("share");
    let (a, _) = Tracker::open(redis_rules(&url, &prefix)).await.expect("A");
    let (b, mut b_events) = Tracker::open(redis_rules(&url, &prefix)).await.expect("B");
    connected(&a, &url).await;
    connected(&b, &url).await;

    // B has seen the user before (a clean message), A then sees the abuse.
    b.precheck("acme", "u42");
    let (_, sanction) = a.record("acme", "u42", BLOCK);
    assert_eq!(sanction.map(|s| s.action), Some(SanctionState::Throttle));
    let started = Instant::now();
    eventually(
        Duration::from_secs(1),
        "B sees A's throttle within a second",
        || b.sender("acme", "u42").state == SanctionState::Throttle,
    )
    .await;
    let (tenant, event) = tokio::time::timeout(Duration::from_secs(1), b_events.recv())
        .await
        .expect("B pushes an event")
        .expect("event stream open");
    assert_eq!((&*tenant, event.user.as_str()), ("acme", "u42"));
    assert_eq!(event.action, SanctionState::Throttle);
    eprintln!("A's sanction reached B in {:?}", started.elapsed());

    // Violations on both sidecars add up: one on B (score 2 + 2 = 4) mutes.
    let (info, _) = b.record("acme", "u42", BLOCK);
    assert!(info.state >= SanctionState::Mute, "{info:?}");
    eventually(Duration::from_secs(1), "A sees the mute", || {
        a.sender("acme", "u42").state >= SanctionState::Mute
    })
    .await;

    // Lifted by hand on A: lifted on B too (a hand-set sanction replaces, it is not merged).
    a.set_sanction("acme", "u42", SanctionState::Ok, None, "appeal");
    eventually(Duration::from_secs(1), "B sees the lift", || {
        b.sender("acme", "u42").state == SanctionState::Ok
    })
    .await;

    // A sidecar that starts later pulls the active sanctions: C knows about u7 before it sees
    // any message from u7.
    a.set_sanction("acme", "u7", SanctionState::Block, Some(600), "moderator");
    a.sync().await;
    let (c, _) = Tracker::open(redis_rules(&url, &prefix)).await.expect("C");
    connected(&c, &url).await;
    assert_eq!(c.sender("acme", "u7").state, SanctionState::Block);
    // And a user C meets for the first time is fetched (their score follows them).
    a.record("acme", "u8", Outcome::Review { severity: 1.0 });
    a.sync().await;
    c.precheck("acme", "u8");
    eventually(Duration::from_secs(1), "C fetches u8's score", || {
        c.sender("acme", "u8").risk > 0.0
    })
    .await;
    for t in [a, b, c] {
        t.shutdown().await;
    }
}

#[tokio::test]
async fn abuse_on_server_a_sanctions_the_user_on_server_b() {
    let (url, _guard) = shared_redis();
    let prefix = unique_prefix("servers");
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let cfg = redis_rules(&url, &prefix);
    let a = start_server(dir_a.path(), |raw| raw.behaviour = cfg.clone()).await;
    let b = start_server(dir_b.path(), |raw| raw.behaviour = cfg.clone()).await;
    let (mut ws_a, mut ws_b) = (a.connect().await, b.connect().await);
    // Both connected to Redis (the first verdicts may still say degraded).
    for ws in [&mut ws_a, &mut ws_b] {
        let started = Instant::now();
        while moderate(ws, json!({"user":"someone","text":"hi"})).await["degraded"] != json!([]) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "Redis at {url} unreachable (CHATGUARD_TEST_REDIS_URL)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Abuse on A: blocked, and the sender is throttled.
    let v = moderate(
        &mut ws_a,
        json!({"user":"troll","text":format!("you {INSULT}")}),
    )
    .await;
    assert_eq!(
        (v["action"].clone(), v["sender"]["state"].clone()),
        (json!("block"), json!("throttle"))
    );
    // B pushes the sanction to its IM server within a second...
    let started = Instant::now();
    let event = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let e = next_event(&mut ws_b, "sanction").await;
            if e["user"] == "troll" {
                return e;
            }
        }
    })
    .await
    .expect("B's sanction event within a second");
    assert_eq!(event["action"], "throttle");
    eprintln!(
        "server A's sanction pushed by server B after {:?}",
        started.elapsed()
    );
    // ...and B's verdicts report it; more abuse on B escalates from A's state.
    let v = moderate(&mut ws_b, json!({"user":"troll","text":"hello"})).await;
    assert_eq!(v["sender"]["state"], "throttle", "{v}");
    let v = moderate(
        &mut ws_b,
        json!({"user":"troll","text":format!("{INSULT}!!")}),
    )
    .await;
    assert_eq!(v["sender"]["state"], "mute", "{v}");
    drop((ws_a, ws_b));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn sanctions_survive_a_crash_and_a_restart_with_the_memory_backend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = BehaviourConfig {
        snapshot_path: Some(dir.path().join("behaviour.snap")),
        ..rules()
    };
    let (first, _) = Tracker::open(cfg.clone()).await.expect("open");
    first.record("acme", "bad", BLOCK);
    let (muted, _) = first.record("acme", "bad", BLOCK);
    assert_eq!(muted.state, SanctionState::Mute);
    first.set_sanction(
        "acme",
        "banned",
        SanctionState::Block,
        Some(7200),
        "moderator",
    );
    first.record("acme", "scored", Outcome::Review { severity: 1.0 });
    // Crash: the journal is fsynced, but no final snapshot is written.
    first.sync().await;
    drop(first);

    let (second, _) = Tracker::open(cfg.clone())
        .await
        .expect("reopen after a crash");
    let bad = second.sender("acme", "bad");
    assert_eq!(
        (bad.state, bad.until),
        (muted.state, muted.until),
        "same deadline"
    );
    assert_eq!(second.sender("acme", "banned").state, SanctionState::Block);
    // Scores are in the snapshot only: the crash lost the unsanctioned user's score (it was
    // never journaled), which is the documented trade-off.
    assert_eq!(second.sender("acme", "scored").risk, 0.0);
    second.record("acme", "scored", Outcome::Review { severity: 1.0 });
    // A clean shutdown writes the snapshot: now the score survives too.
    second.shutdown().await;
    drop(second);

    let (third, _) = Tracker::open(cfg).await.expect("reopen after a shutdown");
    assert_eq!(third.sender("acme", "bad").state, SanctionState::Mute);
    assert_eq!(third.sender("acme", "banned").state, SanctionState::Block);
    assert!(third.sender("acme", "scored").risk > 0.0);
    // The cool-down survives as well: the next violation escalates past the mute.
    let (_, next) = third.record("acme", "bad", BLOCK);
    assert_eq!(next.map(|s| s.action), Some(SanctionState::Block));
    third.shutdown().await;
}

#[tokio::test]
async fn a_redis_outage_degrades_verdicts_and_reconciles_after() {
    let mut redis = RedisServer::start(None);
    let port = redis.port;
    let url = redis.url();
    let prefix = unique_prefix("outage");
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(dir.path(), |raw| {
        raw.behaviour = redis_rules(&url, &prefix);
    })
    .await;
    let mut ws = server.connect().await;
    let verdict = moderate(&mut ws, json!({"user":"u1","text":"hello there"})).await;
    if verdict["degraded"] == json!(["shared_state"]) {
        // Connecting takes a moment; wait for it.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let verdict = moderate(&mut ws, json!({"user":"u1","text":"hello there"})).await;
    assert_eq!(verdict["degraded"], json!([]), "{verdict}");

    redis.kill();
    // Verdicts keep coming, from local state, marked degraded.
    let started = Instant::now();
    let mut last = Value::Null;
    while started.elapsed() < Duration::from_secs(5) {
        last = moderate(&mut ws, json!({"user":"u1","text":"hello again"})).await;
        assert_eq!(last["type"], "verdict");
        if last["degraded"] == json!(["shared_state"]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last["degraded"], json!(["shared_state"]), "{last}");
    // Abuse during the outage is judged and sanctioned locally.
    let v = moderate(
        &mut ws,
        json!({"user":"troll","text":format!("you {INSULT}")}),
    )
    .await;
    assert_eq!(v["action"], "block", "{v}");
    assert_eq!(v["sender"]["state"], "throttle", "{v}");
    assert_eq!(v["degraded"], json!(["shared_state"]));

    // Redis comes back (empty: it saved nothing): the queued changes are replayed.
    let _redis = RedisServer::start(Some(port));
    let started = Instant::now();
    loop {
        let v = moderate(&mut ws, json!({"user":"u1","text":"back?"})).await;
        if v["degraded"] == json!([]) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still degraded: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (other, _) = Tracker::open(redis_rules(&url, &prefix))
        .await
        .expect("other");
    connected(&other, &url).await;
    assert_eq!(
        other.sender("default", "troll").state,
        SanctionState::Throttle,
        "the sanction made during the outage reached Redis"
    );
    other.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn signals_and_the_sanction_request_over_the_websocket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snapshot = dir.path().join("state").join("behaviour.snap");
    let snapshot_path = snapshot.clone();
    let edit = move |raw: &mut RawConfig| {
        raw.behaviour = BehaviourConfig {
            snapshot_path: Some(snapshot_path.clone()),
            room_alarm_flagged: 3,
            ..rules()
        };
    };
    let server = start_server(dir.path(), edit.clone()).await;
    let mut ws = server.connect().await;
    let mut watcher = server.connect().await;

    // Duplicate spam: the third copy gets `spam/duplicate`.
    let spam = "Visit cheapfollowers dot com for 10000 followers today";
    let mut actions = Vec::new();
    for _ in 0..3 {
        let v = moderate(
            &mut ws,
            json!({"user":"spammer","room":"lobby","text":spam}),
        )
        .await;
        actions.push((v["action"].clone(), v["labels"][0]["sub"].clone()));
    }
    assert_eq!(
        actions[2],
        (json!("review"), json!("duplicate")),
        "{actions:?}"
    );

    // Harassment: flagged messages to the same target.
    let mut last = Value::Null;
    for i in 0..3 {
        last = moderate(
            &mut ws,
            json!({"user":"bully","to":"victim","text":format!("{INSULT} number {i}")}),
        )
        .await;
    }
    let labels = last["labels"].as_array().expect("labels");
    assert!(
        labels
            .iter()
            .any(|l| l["label"] == "abuse" && l["sub"] == "harassment"),
        "{last}"
    );

    // Room alarm: three flagged messages in one room, pushed to every connection of the tenant.
    for user in ["r1", "r2", "r3"] {
        moderate(
            &mut ws,
            json!({"user":user,"room":"hot","text":format!("{INSULT}!")}),
        )
        .await;
    }
    let alarm = next_event(&mut watcher, "room_alarm").await;
    assert_eq!(
        (alarm["room"].clone(), alarm["threshold"].clone()),
        (json!("hot"), json!(3))
    );

    // The sanction request: reply with the id, event to the tenant, verdicts report it.
    send(
        &mut ws,
        json!({"type":"sanction","id":"s1","user":"u42","action":"mute","duration_secs":600,
               "reason":"moderator"}),
    )
    .await;
    let reply = recv_id(&mut ws, "s1").await;
    assert_eq!(reply["type"], "sanction");
    assert_eq!(
        (reply["user"].clone(), reply["action"].clone()),
        (json!("u42"), json!("mute"))
    );
    let event = loop {
        let event = next_event(&mut watcher, "sanction").await;
        if event["user"] == "u42" {
            break event;
        }
    };
    assert_eq!(event["action"], "mute");
    assert!(event.get("id").is_none());
    let v = moderate(&mut ws, json!({"user":"u42","text":"hi all"})).await;
    assert_eq!(v["sender"]["state"], "mute");
    assert_eq!(
        v["action"], "block",
        "a muted sender's messages are blocked: {v}"
    );
    // Bad requests are errors with the id.
    send(
        &mut ws,
        json!({"type":"sanction","id":"s2","user":"u42","action":"banish"}),
    )
    .await;
    let err = recv_id(&mut ws, "s2").await;
    assert_eq!(
        (err["type"].clone(), err["code"].clone()),
        (json!("error"), json!("bad_request"))
    );
    send(
        &mut ws,
        json!({"type":"sanction","id":"s3","user":"u42","action":"mute","duration_secs":0}),
    )
    .await;
    assert_eq!(recv_id(&mut ws, "s3").await["code"], "bad_request");

    // Restart (graceful: final snapshot): the mute survives.
    drop((ws, watcher));
    server.stop().await;
    assert!(snapshot.exists());
    let server = start_server(dir.path(), edit).await;
    let mut ws = server.connect().await;
    let v = moderate(&mut ws, json!({"user":"u42","text":"hi again"})).await;
    assert_eq!(v["sender"]["state"], "mute", "{v}");
    // Lifted by hand.
    send(
        &mut ws,
        json!({"type":"sanction","id":"s4","user":"u42","action":"ok"}),
    )
    .await;
    assert_eq!(recv_id(&mut ws, "s4").await["action"], "ok");
    let v = moderate(&mut ws, json!({"user":"u42","text":"hi again"})).await;
    assert_eq!(v["sender"]["state"], "ok", "{v}");
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn signals_follow_the_clock() {
    let t = Tracker::new(BehaviourConfig {
        dup_window_secs: 60,
        ..rules()
    });
    let text = "Visit cheapfollowers dot com for 10000 followers today";
    let facts = |user| MessageFacts {
        user,
        text,
        print: t.fingerprint(text),
        ..MessageFacts::default()
    };
    // Copies more than dup_window_secs apart are never spam.
    for _ in 0..5 {
        assert_eq!(t.precheck_message("acme", &facts("slow")).spam, None);
        tokio::time::advance(Duration::from_secs(61)).await;
    }
    // A throttle ends after throttle_secs, and the score halves every half-life.
    let (info, _) = t.record("acme", "u", BLOCK);
    assert_eq!(info.state, SanctionState::Throttle);
    let risk = info.risk;
    tokio::time::advance(Duration::from_secs(600)).await;
    let later = t.sender("acme", "u");
    assert_eq!(later.state, SanctionState::Ok);
    assert!(
        (later.risk - risk / 2.0).abs() < 1e-3,
        "{risk} → {}",
        later.risk
    );
}

// --- a server for the WebSocket tests ---

/// Starts the real server on port 0 ([`TOKEN`] is tenant `default`) with a made-up wordlist
/// (`zorgblat`, high) in `dir`.
async fn start_server(dir: &Path, edit: impl FnOnce(&mut RawConfig)) -> Server {
    let words = dir.join("wordlists");
    std::fs::create_dir_all(words.join("en")).expect("mkdir");
    std::fs::write(
        words.join("en").join("insult.txt"),
        format!("{INSULT} | high\n"),
    )
    .expect("wordlist");
    Server::start(|raw| {
        raw.lexicon.dir = Some(PathBuf::from(&words));
        raw.auth.tokens.insert(TOKEN.into(), "default".into());
        edit(raw);
    })
    .await
}

/// Sends a `moderate` request (fields from `fields`, a fresh id) and returns its verdict.
async fn moderate(ws: &mut Ws, fields: Value) -> Value {
    static N: AtomicU32 = AtomicU32::new(0);
    let id = format!("m{}", N.fetch_add(1, Ordering::Relaxed));
    let mut req = json!({"type":"moderate","id":id});
    if let (Some(req), Some(fields)) = (req.as_object_mut(), fields.as_object()) {
        req.extend(fields.clone());
    }
    send(ws, req).await;
    recv_id(ws, &id).await
}
