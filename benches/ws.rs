//! End-to-end WebSocket benchmark: starts the real server in-process (its own 2-thread
//! runtime, lexicon path, default config) and drives it with a load client over loopback.
//!
//! Phases:
//! 1. closed loop: `CONNS` connections each keeping `WINDOW` requests in flight → max msgs/s;
//! 2. open loop at a fixed rate (default 20k msgs/s) → p50/p99/p999 latency, measured from the
//!    client's send to its receipt of the verdict.
//!
//! `cargo bench --bench ws` (env: `WS_RATE`, `WS_SECS`, `WS_CONNS`, `WS_MODEL=1` for the
//! text model path).

use chatguard::config::{Config, RawConfig};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const CORPUS: &[&str] = &[
    "hey, are we still on for tonight?",
    "lol that was hilarious 😂",
    "you are a worthless piece of shit",
    "can you send me the slides from the meeting",
    "gg wp, rematch?",
    "ты где? I'm at the café near the station",
    "shut up you f.u.c.k.i.n.g idiot",
    "明天见，晚安",
    "i'll be 10 min late, traffic is awful",
    "check out my stream later!!!",
];

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn start_server() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("server runtime");
        rt.block_on(async move {
            let mut raw = RawConfig::default();
            // The load client is one "user" per connection: lift the flood limit.
            raw.behaviour.flood_per_second = 1_000_000;
            raw.behaviour.flood_burst = 1_000_000;
            raw.server.max_in_flight_per_connection = 4096;
            // Lexicon path unless WS_MODEL=1 (then every message also goes through the text
            // model, except those the lexicon already blocks).
            raw.text_model.enabled = std::env::var("WS_MODEL").is_ok_and(|v| v == "1");
            raw.image.model_enabled = false;
            let config = Config::build(raw).expect("config");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(listener.local_addr().expect("addr"))
                .expect("send addr");
            let _ = chatguard::server::run(
                listener,
                config,
                tokio_util::sync::CancellationToken::new(),
            )
            .await;
        });
    });
    rx.recv().expect("server address")
}

fn request(conn: usize, seq: u64) -> String {
    let text = CORPUS[(seq as usize) % CORPUS.len()];
    serde_json::json!({"type":"moderate","id":seq.to_string(),"user":format!("u{conn}-{}", seq % 50),"room":"r1","text":text}).to_string()
}

fn reply_id(msg: &Message) -> Option<u64> {
    let Message::Text(t) = msg else { return None };
    let s = t.as_str();
    let i = s.find("\"id\":\"")? + 6;
    let j = s[i..].find('"')? + i;
    s[i..j].parse().ok()
}

async fn closed_loop(addr: SocketAddr, conns: usize, window: u64, secs: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..conns {
        tasks.push(tokio::spawn(async move {
            let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws"))
                .await
                .expect("connect");
            let (mut tx, mut rx) = ws.split();
            let mut sent = 0u64;
            let mut done = 0u64;
            for _ in 0..window {
                tx.send(Message::text(request(c, sent)))
                    .await
                    .expect("send");
                sent += 1;
            }
            while Instant::now() < deadline {
                rx.next().await.expect("open").expect("frame");
                done += 1;
                tx.send(Message::text(request(c, sent)))
                    .await
                    .expect("send");
                sent += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("client task");
    }
    total as f64 / secs as f64
}

async fn open_loop(addr: SocketAddr, conns: usize, rate: u64, secs: u64) -> (Vec<u64>, u64) {
    let per_conn = rate / conns as u64;
    let mut tasks = Vec::new();
    for c in 0..conns {
        tasks.push(tokio::spawn(async move {
            let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws"))
                .await
                .expect("connect");
            let (mut tx, mut rx) = ws.split();
            let total = per_conn * secs;
            let sent_at =
                std::sync::Arc::new(std::sync::Mutex::new(HashMap::<u64, Instant>::new()));
            let reader_sent = sent_at.clone();
            let reader = tokio::spawn(async move {
                let mut lat = Vec::with_capacity(total as usize);
                while (lat.len() as u64) < total {
                    let Some(Ok(msg)) = rx.next().await else {
                        break;
                    };
                    let now = Instant::now();
                    if let Some(id) = reply_id(&msg)
                        && let Some(t0) = reader_sent
                            .lock()
                            .expect("lock poisoned. This is a bug.")
                            .remove(&id)
                    {
                        lat.push((now - t0).as_micros() as u64);
                    }
                }
                lat
            });
            let interval = Duration::from_nanos(1_000_000_000 / per_conn.max(1));
            let start = Instant::now();
            for seq in 0..total {
                let due = start + interval * seq as u32;
                let now = Instant::now();
                if due > now {
                    tokio::time::sleep(due - now).await;
                }
                let msg = request(c, seq);
                sent_at
                    .lock()
                    .expect("lock poisoned. This is a bug.")
                    .insert(seq, Instant::now());
                tx.send(Message::text(msg)).await.expect("send");
            }
            match tokio::time::timeout(Duration::from_secs(30), reader).await {
                Ok(Ok(lat)) => lat,
                _ => Vec::new(),
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    let expected = per_conn * conns as u64 * secs;
    all.sort_unstable();
    (all, expected)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    // `cargo test --benches` passes `--bench`-less args; run only under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rate = env("WS_RATE", 20_000);
    let secs = env("WS_SECS", 5);
    let conns = env("WS_CONNS", 4) as usize;
    let addr = start_server();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    rt.block_on(async move {
        let max = closed_loop(addr, conns, 64, secs).await;
        println!("ws closed-loop: {conns} conns x 64 in flight: {max:.0} msgs/s");
        let (lat, expected) = open_loop(addr, conns, rate, secs).await;
        println!(
            "ws open-loop at {rate} msgs/s for {secs}s over {conns} conns: {} of {expected} replies; \
             latency p50={}us p99={}us p999={}us max={}us",
            lat.len(),
            pct(&lat, 0.50),
            pct(&lat, 0.99),
            pct(&lat, 0.999),
            lat.last().copied().unwrap_or(0)
        );
    });
}
