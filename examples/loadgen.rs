//! End-to-end WebSocket load generator for a running chatguard.
//!
//! Opens `--conns` connections to `--url` and sends `moderate` requests open loop at `--rate`
//! messages/s in all for `--duration` seconds (or closed loop with `--closed WINDOW` requests in
//! flight per connection, to measure capacity). Each message is picked by `--mix`:
//!
//! - `text`: chat lines, mostly clean, some with wordlist terms;
//! - `model`: keyword-free lines (borderline insults, threats, and clean ones) that only the text
//!   model can judge (the server decides whether the model runs);
//! - `image`: a chat line plus a small inline base64 PNG; by default every PNG differs in a few
//!   pixels, so the server's exact-content image cache does not answer it
//!   (`--image-variants N` cycles N distinct images instead);
//! - `malformed`: bad JSON (answered by an `error` with `"id":null`), wrong field types, unknown
//!   types or fields (answered by an `error` with the request's id).
//!
//! Reports: sent, replies by type, lost (no reply by the end + `--grace`), duplicated (a reply to
//! the same id twice), malformed requests not answered by an `error`, msgs/s, p50/p99/p999
//! latency per kind, and with `--pid` the server's RSS (`VmRSS` in `/proc/PID/status`) every
//! `--rss-every` seconds as a curve. The last line, `RESULT key=value ...`, is for scripts. Exits
//! 1 when a reply is lost or duplicated, a malformed request got no `error`, or a connection
//! failed.
//!
//! Latency is measured from the message's scheduled send time (open loop: the schedule does not
//! wait for replies), so a server or client stall counts against every message it delayed
//! (no coordinated omission); `client lag` says how far the sender itself fell behind. The
//! approach is the open-loop client of `benches/ws.rs`, without its per-message map and lock:
//! ids are global sequence numbers, so each connection's reader finds a message's kind and send
//! time by index.
//!
//! ```sh
//! cargo run --release --example loadgen -- --url ws://127.0.0.1:8686/v1/ws --token T \
//!     --rate 500 --duration 60 --conns 8 --mix text=55,model=25,image=10,malformed=10 --pid PID
//! cargo run --release --example loadgen -- --closed 16 --duration 20      # capacity
//! ```

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Cursor;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use image::ImageEncoder as _;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Most messages of an open-loop run (send times and reply flags are preallocated per message).
const MAX_MESSAGES: u64 = 100_000_000;

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "WebSocket load generator for chatguard (open loop, paced)")]
struct Args {
    /// WebSocket URL of the server.
    #[arg(long, default_value = "ws://127.0.0.1:8686/v1/ws")]
    url: String,
    /// Bearer token (none: no Authorization header).
    #[arg(long, env = "CHATGUARD_TOKEN")]
    token: Option<String>,
    /// Messages per second over all connections (open loop).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rate: u64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    duration: u64,
    /// Connections.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    conns: u64,
    /// Weights of the message kinds: `text=W,model=W,image=W,malformed=W` (missing kinds: 0).
    #[arg(long, default_value = "text=55,model=25,image=10,malformed=10")]
    mix: String,
    /// Closed loop instead: keep this many requests in flight per connection (capacity; no
    /// latency figures).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    closed: Option<u32>,
    /// Distinct images to cycle through; 0: every image is new (defeats the server's cache).
    #[arg(long, default_value_t = 0)]
    image_variants: u64,
    /// Side of the generated square PNG, in pixels.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(8..=2048))]
    image_px: u32,
    /// Distinct senders (`user`); spread so the per-user flood limit is not what is measured.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    users: u64,
    /// Distinct rooms.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    rooms: u64,
    /// Seconds to wait for the last replies after the sending ends.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=3600))]
    grace: u64,
    /// Server process whose RSS is sampled.
    #[arg(long)]
    pid: Option<u32>,
    /// Seconds between progress lines and RSS samples.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    rss_every: u64,
    /// Client runtime threads (1: a single-threaded runtime).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
}

/// What a message is, picked by `--mix` from its global sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text = 0,
    Model = 1,
    Image = 2,
    Malformed = 3,
}

const KINDS: [Kind; 4] = [Kind::Text, Kind::Model, Kind::Image, Kind::Malformed];
const KIND_NAMES: [&str; 4] = ["text", "model", "image", "malformed"];

/// The `--mix` weights as cumulative thresholds out of their sum.
#[derive(Debug, Clone, Copy)]
struct Mix {
    /// Cumulative weights in [`KINDS`] order; the last is the total.
    cumulative: [u64; 4],
}

impl Mix {
    fn parse(s: &str) -> Result<Mix, String> {
        let mut weights = [0u64; 4];
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, w) = part
                .split_once('=')
                .ok_or_else(|| format!("--mix: `{part}` is not NAME=WEIGHT"))?;
            let i = KIND_NAMES
                .iter()
                .position(|k| *k == name.trim())
                .ok_or_else(|| {
                    format!("--mix: unknown kind `{name}` (text, model, image, malformed)")
                })?;
            weights[i] = w
                .trim()
                .parse()
                .ok()
                .filter(|w| *w <= 1_000_000)
                .ok_or_else(|| format!("--mix: weight `{w}` is not a number in 0..=1000000"))?;
        }
        let mut cumulative = [0u64; 4];
        let mut sum = 0;
        for (c, w) in cumulative.iter_mut().zip(weights) {
            sum += w;
            *c = sum;
        }
        if sum == 0 {
            return Err("--mix: all weights are 0".into());
        }
        Ok(Mix { cumulative })
    }

    fn kind(&self, g: u64) -> Kind {
        let r = mix64(g ^ 0x6b1d) % self.cumulative[3];
        let i = self.cumulative.iter().position(|c| r < *c).unwrap_or(3);
        KINDS[i]
    }
}

/// splitmix64: a cheap, well-spread hash of the sequence number (all picks are deterministic).
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn pick<'a>(list: &[&'a str], g: u64, salt: u64) -> &'a str {
    list[(mix64(g ^ salt) % list.len() as u64) as usize]
}

const OPENERS: &[&str] = &[
    "", "", "hey", "lol", "ok", "guys", "omg", "yo", "well", "bro",
];
const CLOSERS: &[&str] = &["", "", "", "!", "?", " :)", " lmao", " pls", " xD", " ..."];
/// Clean chat lines.
const CLEAN: &[&str] = &[
    "are you coming to the raid tonight",
    "what time is the stream",
    "gg that was a close one",
    "can someone send me the link to the docs",
    "I think the update broke my settings",
    "thanks for the help earlier, it works now",
    "anyone want to team up for ranked",
    "brb getting food",
    "this song is so good",
    "where did you buy that skin",
    "have a great day everyone",
    "the meeting moved to 3pm, see you there",
    "happy birthday!! hope you have an amazing year",
    "ты где? I'm at the café near the station",
    "明天见，晚安",
    "did you see the match last night? the second half was unbelievable and the keeper saved everything",
];
/// Lines with wordlist terms.
const ABUSIVE: &[&str] = &[
    "you are a worthless piece of shit",
    "shut up you f.u.c.k.i.n.g idiot",
    "go fuck yourself",
    "what a dumb bitch",
    "stfu moron nobody cares",
];
/// Keyword-free lines only a model can judge.
const BORDERLINE: &[&str] = &[
    "nobody would miss you if you disappeared",
    "I will find you and hurt you",
    "you are the worst player I have ever seen",
    "people like you should not be allowed to speak",
    "uninstall the game, you are useless",
    "go back to where you came from",
    "you should be ashamed of yourself",
    "stop spamming the chat please",
];
/// Malformed requests (`{id}` is replaced); `None` id: no id can be read from them.
const MALFORMED_WITH_ID: &[&str] = &[
    r#"{"type":"moderate","id":"{id}","user":42,"text":"wrong user type"}"#,
    r#"{"type":"moderate","id":"{id}","user":"u1","text":["not","a","string"]}"#,
    r#"{"type":"moderate","id":"{id}","user":"u1","images":"not a list"}"#,
    r#"{"type":"frobnicate","id":"{id}"}"#,
    r#"{"type":"moderate","id":"{id}","user":"u1","text":"hi","surprise":true}"#,
    r#"{"type":"moderate","id":"{id}"}"#,
];
const MALFORMED_NO_ID: &[&str] = &[
    r#"{"type":"moderate","id":"x","user":"u1","text":"unterminated"#,
    "not json at all",
    "[1,2,3]",
    r#"{"type":"moderate",,}"#,
];

/// Whether global message `g` (a malformed one) is sent without a readable id.
fn malformed_no_id(g: u64) -> bool {
    mix64(g ^ 0x3a11).is_multiple_of(3)
}

/// Builds the small PNGs of `image` messages into reused buffers.
struct ImageMaker {
    /// Side in pixels.
    px: u32,
    /// RGB pixels of the base picture (a few are overwritten per variant).
    rgb: Vec<u8>,
    /// Encoded PNG of the current variant.
    png: Vec<u8>,
    /// Base64 of the current variant.
    b64: String,
    /// 0: every image unique; N: variants cycle.
    variants: u64,
    /// Next unique variant (per connection, offset by the connection number).
    next: u64,
}

impl ImageMaker {
    fn new(px: u32, variants: u64, conn: u64) -> ImageMaker {
        let mut rgb = Vec::with_capacity((px * px * 3) as usize);
        for y in 0..px {
            for x in 0..px {
                let inside = (x as i64 - px as i64 / 2).pow(2) + (y as i64 - px as i64 / 3).pow(2)
                    < (px as i64 / 4).pow(2);
                let (r, g, b) = if inside {
                    (230, 190, 60)
                } else {
                    ((x * 255 / px) as u8, 120, (y * 255 / px) as u8)
                };
                rgb.extend_from_slice(&[r, g, b]);
            }
        }
        ImageMaker {
            px,
            rgb,
            png: Vec::new(),
            b64: String::new(),
            variants,
            next: conn << 40,
        }
    }

    /// The base64 PNG for the next image.
    fn next_b64(&mut self) -> Result<&str, image::ImageError> {
        let v = if self.variants == 0 {
            self.next += 1;
            self.next
        } else {
            self.next += 1;
            self.next % self.variants
        };
        // The variant number goes into the first three pixels (9 bytes, 8 used).
        self.rgb[..8].copy_from_slice(&v.to_le_bytes());
        self.png.clear();
        image::codecs::png::PngEncoder::new_with_quality(
            Cursor::new(&mut self.png),
            image::codecs::png::CompressionType::Fast,
            image::codecs::png::FilterType::Sub,
        )
        .write_image(&self.rgb, self.px, self.px, image::ExtendedColorType::Rgb8)?;
        self.b64.clear();
        base64::engine::general_purpose::STANDARD.encode_string(&self.png, &mut self.b64);
        Ok(&self.b64)
    }
}

/// Appends message `g`'s request to `out`; returns whether it carries a readable id.
fn build_request(
    out: &mut String,
    g: u64,
    kind: Kind,
    args: &Args,
    images: &mut ImageMaker,
) -> Result<bool, image::ImageError> {
    out.clear();
    if kind == Kind::Malformed {
        if malformed_no_id(g) {
            out.push_str(pick(MALFORMED_NO_ID, g, 7));
            return Ok(false);
        }
        let template = pick(MALFORMED_WITH_ID, g, 7);
        let (a, b) = template.split_once("{id}").unwrap_or((template, ""));
        let _ = write!(out, "{a}{g}{b}");
        return Ok(true);
    }
    let body = match kind {
        Kind::Model => {
            if mix64(g ^ 11).is_multiple_of(2) {
                pick(BORDERLINE, g, 13)
            } else {
                pick(CLEAN, g, 13)
            }
        }
        _ => {
            if mix64(g ^ 11).is_multiple_of(5) {
                pick(ABUSIVE, g, 13)
            } else {
                pick(CLEAN, g, 13)
            }
        }
    };
    let user = mix64(g ^ 17) % args.users;
    let room = mix64(g ^ 19) % args.rooms;
    let opener = pick(OPENERS, g, 23);
    let closer = pick(CLOSERS, g, 29);
    let sep = if opener.is_empty() { "" } else { " " };
    // The corpus has no characters that need JSON escaping.
    let _ = write!(
        out,
        r#"{{"type":"moderate","id":"{g}","user":"u{user}","room":"r{room}","text":"{opener}{sep}{body}{closer}""#
    );
    if kind == Kind::Image {
        let b64 = images.next_b64()?;
        let _ = write!(out, r#","images":[{{"id":"i1","data":"{b64}"}}]"#);
    }
    out.push('}');
    Ok(true)
}

/// A reply as far as the load generator reads it.
#[derive(Debug, Deserialize)]
struct Reply<'a> {
    /// `verdict`, `error`, `sanction`, `room_alarm`, ...
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    /// The request id (absent or null for pushed events and unreadable requests).
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    /// Verdict action.
    #[serde(default, borrow)]
    action: Option<Cow<'a, str>>,
    /// Error code.
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    /// Stages a verdict could not run.
    #[serde(default)]
    degraded: Vec<String>,
}

const REPLY_TYPES: [&str; 7] = [
    "verdict",
    "error",
    "sanction",
    "room_alarm",
    "pong",
    "lookup_result",
    "other",
];
const ACTIONS: [&str; 4] = ["allow", "review", "block", "other"];
const CODES: [&str; 7] = [
    "bad_request",
    "too_large",
    "overloaded",
    "timeout",
    "unauthorized",
    "internal",
    "other",
];
const DEGRADED: [&str; 3] = ["text_model", "image_model", "other"];

fn index_of(list: &[&str], s: &str) -> usize {
    list.iter().position(|x| *x == s).unwrap_or(list.len() - 1)
}

/// Counters of one connection (summed at the end).
#[derive(Debug, Default)]
struct Stats {
    /// Messages sent, per kind.
    sent: [u64; 4],
    /// Malformed messages sent without a readable id.
    sent_no_id: u64,
    /// Replies per [`REPLY_TYPES`].
    replies: [u64; 7],
    /// Verdicts per [`ACTIONS`].
    actions: [u64; 4],
    /// Errors to requests with an id, per [`CODES`].
    codes: [u64; 7],
    /// `error` replies with no id (answers to the id-less malformed requests).
    errors_no_id: u64,
    /// Verdicts naming a degraded stage, per [`DEGRADED`].
    degraded: [u64; 3],
    /// Sent, never answered.
    lost: u64,
    /// Answered more than once (extra replies).
    duplicated: u64,
    /// Replies with an id this connection never sent.
    unexpected: u64,
    /// Malformed requests answered by something other than an `error`.
    malformed_not_error: u64,
    /// Valid requests answered by an `error`.
    valid_errors: u64,
    /// Frames that are not JSON replies.
    unparsable: u64,
    /// Send or receive failures (the connection ended early).
    conn_errors: u64,
    /// Latencies in µs, per kind (open loop only; id-less errors excluded).
    latency_us: [Vec<u32>; 4],
    /// Furthest the sender fell behind its schedule, in µs.
    max_lag_us: u64,
}

impl Stats {
    fn add(&mut self, o: Stats) {
        fn sum<const N: usize>(a: &mut [u64; N], b: [u64; N]) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        sum(&mut self.sent, o.sent);
        sum(&mut self.replies, o.replies);
        sum(&mut self.actions, o.actions);
        sum(&mut self.codes, o.codes);
        sum(&mut self.degraded, o.degraded);
        self.sent_no_id += o.sent_no_id;
        self.errors_no_id += o.errors_no_id;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.unexpected += o.unexpected;
        self.malformed_not_error += o.malformed_not_error;
        self.valid_errors += o.valid_errors;
        self.unparsable += o.unparsable;
        self.conn_errors += o.conn_errors;
        for (a, b) in self.latency_us.iter_mut().zip(o.latency_us) {
            a.extend(b);
        }
        self.max_lag_us = self.max_lag_us.max(o.max_lag_us);
    }
}

/// State a connection's sender shares with its reader.
struct ConnShared {
    /// Messages sent with a readable id.
    sent_with_id: AtomicU64,
    /// Malformed messages sent without a readable id.
    sent_no_id: AtomicU64,
    /// The sender has finished (or failed).
    done: AtomicBool,
    /// Send time of local message `k`, µs after the run's start, + 1 (0: not recorded); open
    /// loop only.
    sent_at_us: Vec<AtomicU64>,
    /// Closed loop: free slots of the window.
    window: Semaphore,
}

/// Counters all connections bump, for the progress lines.
#[derive(Default)]
struct Progress {
    sent: AtomicU64,
    replies: AtomicU64,
}

/// The run's fixed parameters, shared by all tasks.
struct Plan {
    args: Args,
    mix: Mix,
    /// Messages over all connections (open loop).
    total: u64,
    /// Time between two messages over all connections, in ns.
    period_ns: f64,
    /// When the sending starts.
    start: Instant,
    /// When the sending ends (closed loop).
    end: Instant,
    progress: Progress,
}

impl Plan {
    fn due(&self, g: u64) -> Instant {
        self.start + Duration::from_nanos((g as f64 * self.period_ns) as u64)
    }
}

async fn sender(
    plan: Arc<Plan>,
    conn: u64,
    mut tx: SplitSink<Ws, Message>,
    shared: Arc<ConnShared>,
) -> Stats {
    let mut stats = Stats::default();
    let mut images = ImageMaker::new(plan.args.image_px, plan.args.image_variants, conn);
    let mut buf = String::with_capacity(1024);
    let n = plan.args.conns;
    let closed = plan.args.closed.is_some();
    let mut k = 0u64;
    loop {
        let g = k * n + conn;
        if closed {
            if Instant::now() >= plan.end {
                break;
            }
            tokio::select! {
                biased;
                permit = shared.window.acquire() => match permit {
                    Ok(p) => p.forget(),
                    Err(_) => break,
                },
                _ = tokio::time::sleep_until(plan.end.into()) => break,
            }
        } else {
            if g >= plan.total {
                break;
            }
            let due = plan.due(g);
            // Timers fire on millisecond ticks: wake up to 1 ms early rather than late.
            let wake = due.checked_sub(Duration::from_millis(1)).unwrap_or(due);
            if wake > Instant::now() {
                tokio::time::sleep_until(wake.into()).await;
            }
        }
        let kind = plan.mix.kind(g);
        let with_id = match build_request(&mut buf, g, kind, &plan.args, &mut images) {
            Ok(with_id) => with_id,
            Err(e) => {
                eprintln!("loadgen: cannot encode the test image: {e}");
                stats.conn_errors += 1;
                break;
            }
        };
        let now = Instant::now();
        if !closed {
            let due = plan.due(g);
            stats.max_lag_us = stats
                .max_lag_us
                .max(now.saturating_duration_since(due).as_micros() as u64);
            // Latency counts from the scheduled time, or from the send when the timer woke early.
            let from = now.min(due).saturating_duration_since(plan.start);
            if let Some(slot) = shared.sent_at_us.get(k as usize) {
                slot.store(from.as_micros() as u64 + 1, Ordering::Release);
            }
        }
        if with_id {
            shared.sent_with_id.fetch_add(1, Ordering::AcqRel);
        } else {
            shared.sent_no_id.fetch_add(1, Ordering::AcqRel);
        }
        if let Err(e) = tx.send(Message::text(buf.as_str())).await {
            eprintln!("loadgen: connection {conn}: send failed: {e}");
            if with_id {
                shared.sent_with_id.fetch_sub(1, Ordering::AcqRel);
            } else {
                shared.sent_no_id.fetch_sub(1, Ordering::AcqRel);
            }
            stats.conn_errors += 1;
            break;
        }
        stats.sent[kind as usize] += 1;
        if !with_id {
            stats.sent_no_id += 1;
        }
        plan.progress.sent.fetch_add(1, Ordering::Relaxed);
        k += 1;
    }
    shared.done.store(true, Ordering::Release);
    // Dropping the sink half leaves the connection open for the reader.
    stats
}

async fn reader(
    plan: Arc<Plan>,
    conn: u64,
    mut rx: SplitStream<Ws>,
    shared: Arc<ConnShared>,
) -> Stats {
    let mut stats = Stats::default();
    let n = plan.args.conns;
    let closed = plan.args.closed.is_some();
    // Replies seen per local message index.
    let mut seen: Vec<u8> = vec![0; if closed { 0 } else { shared.sent_at_us.len() }];
    let mut unique = 0u64;
    let mut give_up: Option<Instant> = None;
    let tick = tokio::time::sleep(Duration::from_millis(50));
    tokio::pin!(tick);
    let finished = |unique: u64, errors_no_id: u64| {
        shared.done.load(Ordering::Acquire)
            && unique >= shared.sent_with_id.load(Ordering::Acquire)
            && errors_no_id >= shared.sent_no_id.load(Ordering::Acquire)
    };
    loop {
        tokio::select! {
            biased;
            frame = rx.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | None => {
                        if !finished(unique, stats.errors_no_id) {
                            eprintln!("loadgen: connection {conn}: closed by the server");
                            stats.conn_errors += 1;
                        }
                        break;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        eprintln!("loadgen: connection {conn}: receive failed: {e}");
                        stats.conn_errors += 1;
                        break;
                    }
                };
                let now = Instant::now();
                let Ok(reply) = serde_json::from_str::<Reply>(text.as_str()) else {
                    stats.unparsable += 1;
                    continue;
                };
                plan.progress.replies.fetch_add(1, Ordering::Relaxed);
                let t = index_of(&REPLY_TYPES, &reply.kind);
                stats.replies[t] += 1;
                let Some(id) = reply.id.as_deref() else {
                    if reply.kind == "error" {
                        stats.errors_no_id += 1;
                        if closed {
                            shared.window.add_permits(1);
                        }
                    }
                    // Pushed events (sanction, room_alarm) carry no id.
                    if finished(unique, stats.errors_no_id) {
                        break;
                    }
                    continue;
                };
                let Some(g) = id.parse::<u64>().ok().filter(|g| g % n == conn) else {
                    stats.unexpected += 1;
                    continue;
                };
                let k = (g / n) as usize;
                if closed && k >= seen.len() && (k as u64) < shared.sent_with_id.load(Ordering::Acquire) + shared.sent_no_id.load(Ordering::Acquire) {
                    seen.resize(k + 1, 0);
                }
                let Some(count) = seen.get_mut(k) else {
                    stats.unexpected += 1;
                    continue;
                };
                *count = count.saturating_add(1);
                if *count > 1 {
                    stats.duplicated += 1;
                    continue;
                }
                unique += 1;
                if closed {
                    shared.window.add_permits(1);
                }
                let kind = plan.mix.kind(g);
                match reply.kind.as_ref() {
                    "verdict" => {
                        stats.actions[index_of(&ACTIONS, reply.action.as_deref().unwrap_or("other"))] += 1;
                        for stage in &reply.degraded {
                            stats.degraded[index_of(&DEGRADED, stage)] += 1;
                        }
                    }
                    "error" => {
                        stats.codes[index_of(&CODES, reply.code.as_deref().unwrap_or("other"))] += 1;
                    }
                    _ => {}
                }
                if kind == Kind::Malformed && reply.kind != "error" {
                    stats.malformed_not_error += 1;
                } else if kind != Kind::Malformed && reply.kind == "error" {
                    stats.valid_errors += 1;
                }
                if !closed {
                    let sent = shared.sent_at_us[k].load(Ordering::Acquire);
                    let from = if sent == 0 {
                        plan.due(g)
                    } else {
                        plan.start + Duration::from_micros(sent - 1)
                    };
                    let us = now.saturating_duration_since(from).as_micros();
                    stats.latency_us[kind as usize].push(u32::try_from(us).unwrap_or(u32::MAX));
                }
                if finished(unique, stats.errors_no_id) {
                    break;
                }
            }
            _ = &mut tick => {
                let now = Instant::now();
                tick.as_mut().reset((now + Duration::from_millis(50)).into());
                if shared.done.load(Ordering::Acquire) {
                    if finished(unique, stats.errors_no_id) {
                        break;
                    }
                    let deadline = *give_up.get_or_insert(now + Duration::from_secs(plan.args.grace));
                    if now >= deadline {
                        break;
                    }
                }
            }
        }
    }
    let sent_with_id = shared.sent_with_id.load(Ordering::Acquire);
    let sent_no_id = shared.sent_no_id.load(Ordering::Acquire);
    stats.lost =
        sent_with_id.saturating_sub(unique) + sent_no_id.saturating_sub(stats.errors_no_id);
    stats.duplicated += stats.errors_no_id.saturating_sub(sent_no_id);
    stats
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn latency_line(name: &str, v: &mut [u32]) -> String {
    v.sort_unstable();
    format!(
        "  {name:<9} n={:<8} p50={:>8}us p99={:>8}us p999={:>8}us max={:>8}us",
        v.len(),
        pct(v, 0.5),
        pct(v, 0.99),
        pct(v, 0.999),
        v.last().copied().unwrap_or(0)
    )
}

async fn connect(args: &Args) -> Result<Ws, String> {
    let mut req = args
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("--url {}: {e}", args.url))?;
    if let Some(token) = &args.token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|e| format!("--token: {e}"))?;
        req.headers_mut().insert("authorization", value);
    }
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", args.url))?;
    Ok(ws)
}

async fn run(args: Args) -> Result<bool, String> {
    let mix = Mix::parse(&args.mix)?;
    let mut sockets = Vec::with_capacity(args.conns as usize);
    for _ in 0..args.conns {
        sockets.push(connect(&args).await?);
    }
    let total = if args.closed.is_some() {
        0
    } else {
        args.rate * args.duration
    };
    if total > MAX_MESSAGES {
        return Err(format!(
            "--rate x --duration is {total} messages; at most {MAX_MESSAGES} (the per-message \
             bookkeeping is preallocated)"
        ));
    }
    let per_conn = total.div_ceil(args.conns) as usize;
    let start = Instant::now() + Duration::from_millis(100);
    let plan = Arc::new(Plan {
        total,
        period_ns: 1e9 / args.rate as f64,
        start,
        end: start + Duration::from_secs(args.duration),
        mix,
        progress: Progress::default(),
        args,
    });
    let mut tasks = Vec::new();
    for (conn, ws) in sockets.into_iter().enumerate() {
        let (tx, rx) = ws.split();
        let shared = Arc::new(ConnShared {
            sent_with_id: AtomicU64::new(0),
            sent_no_id: AtomicU64::new(0),
            done: AtomicBool::new(false),
            sent_at_us: (0..per_conn).map(|_| AtomicU64::new(0)).collect(),
            window: Semaphore::new(plan.args.closed.unwrap_or(0) as usize),
        });
        let conn = conn as u64;
        let r = tokio::spawn(reader(plan.clone(), conn, rx, shared.clone()));
        let s = tokio::spawn(sender(plan.clone(), conn, tx, shared));
        tasks.push((s, r));
    }

    // Progress lines and the RSS curve until every reader is done.
    let readers_done = Arc::new(AtomicU64::new(0));
    let mut joins = Vec::new();
    for (s, r) in tasks {
        let readers_done = readers_done.clone();
        joins.push(tokio::spawn(async move {
            let mut st = s.await.map_err(|e| format!("sender task: {e}"))?;
            let rs = r.await.map_err(|e| format!("reader task: {e}"))?;
            readers_done.fetch_add(1, Ordering::Release);
            st.add(rs);
            Ok::<Stats, String>(st)
        }));
    }
    let mut curve: Vec<(f64, f64)> = Vec::new();
    let every = Duration::from_secs(plan.args.rss_every);
    let mut next_sample = start;
    let conns = plan.args.conns;
    while readers_done.load(Ordering::Acquire) < conns {
        let now = Instant::now();
        if now >= next_sample {
            let t = now.saturating_duration_since(start).as_secs_f64();
            let rss = plan.args.pid.and_then(rss_kib).map(|k| k as f64 / 1024.0);
            if let Some(rss) = rss {
                curve.push((t, rss));
            }
            println!(
                "[{t:>6.0}s] sent {:>9} replies {:>9}{}",
                plan.progress.sent.load(Ordering::Relaxed),
                plan.progress.replies.load(Ordering::Relaxed),
                rss.map(|r| format!(" rss {r:.1} MiB")).unwrap_or_default()
            );
            next_sample += every;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sending_s = plan.args.duration as f64;
    let mut all = Stats::default();
    for j in joins {
        all.add(j.await.map_err(|e| format!("connection task: {e}"))??);
    }
    if let Some(rss) = plan.args.pid.and_then(rss_kib) {
        curve.push((start.elapsed().as_secs_f64(), rss as f64 / 1024.0));
    }
    Ok(report(&plan, all, &curve, sending_s))
}

/// Prints the report; returns whether the run passed.
fn report(plan: &Plan, mut s: Stats, curve: &[(f64, f64)], sending_s: f64) -> bool {
    let a = &plan.args;
    let sent: u64 = s.sent.iter().sum();
    let replies: u64 = s.replies.iter().sum();
    let answers = sent - s.lost;
    let mode = match a.closed {
        Some(w) => format!("closed loop, {w} in flight per connection"),
        None => format!("open loop at {} msgs/s", a.rate),
    };
    println!(
        "\nloadgen: {mode}, {}s, {} conns, mix {}",
        a.duration, a.conns, a.mix
    );
    let kinds: Vec<String> = KIND_NAMES
        .iter()
        .zip(s.sent)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!(
        "sent:       {sent} ({}; malformed without id {})",
        kinds.join(", "),
        s.sent_no_id
    );
    let types: Vec<String> = REPLY_TYPES
        .iter()
        .zip(s.replies)
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!("replies:    {replies} ({})", types.join(", "));
    let actions: Vec<String> = ACTIONS
        .iter()
        .zip(s.actions)
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!("verdicts:   {}", actions.join(", "));
    let codes: Vec<String> = CODES
        .iter()
        .zip(s.codes)
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!(
        "errors:     with id: {}; without id: {}; to valid requests: {}",
        if codes.is_empty() {
            "none".to_string()
        } else {
            codes.join(", ")
        },
        s.errors_no_id,
        s.valid_errors
    );
    let degraded: Vec<String> = DEGRADED
        .iter()
        .zip(s.degraded)
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!(
        "degraded:   {}",
        if degraded.is_empty() {
            "none".to_string()
        } else {
            degraded.join(", ")
        }
    );
    println!(
        "LOST:       {}   DUPLICATED: {}   malformed not answered by error: {}   unexpected ids: {}   unparsable frames: {}   connection errors: {}",
        s.lost, s.duplicated, s.malformed_not_error, s.unexpected, s.unparsable, s.conn_errors
    );
    let rate = answers as f64 / sending_s;
    println!(
        "throughput: sent {:.1} msgs/s, answered {rate:.1} msgs/s (over the {sending_s:.0}s of sending)",
        sent as f64 / sending_s
    );
    let mut overall: Vec<u32> = s.latency_us.iter().flatten().copied().collect();
    if a.closed.is_none() {
        println!("latency (from the scheduled send to the reply):");
        println!("{}", latency_line("all", &mut overall));
        for (name, v) in KIND_NAMES.iter().zip(s.latency_us.iter_mut()) {
            if !v.is_empty() {
                println!("{}", latency_line(name, v));
            }
        }
        println!(
            "client lag: at most {:.1} ms behind schedule{}",
            s.max_lag_us as f64 / 1e3,
            if s.max_lag_us > 10_000 {
                " (the load generator or the machine could not keep the pace at times)"
            } else {
                ""
            }
        );
    }
    if let Some(pid) = a.pid {
        println!("server RSS (pid {pid}, VmRSS):");
        println!("  {:>8}  {:>9}", "t_s", "rss_mib");
        for (t, rss) in curve {
            println!("  {t:>8.0}  {rss:>9.1}");
        }
    }
    let rss_at = |f: f64| -> f64 {
        if curve.is_empty() {
            return 0.0;
        }
        curve[((curve.len() - 1) as f64 * f).round() as usize].1
    };
    println!(
        "RESULT sent={sent} replies={replies} answered={answers} lost={} duplicated={} malformed_not_error={} conn_errors={} msgs_per_s={rate:.1} p50_us={} p99_us={} p999_us={} max_lag_us={} rss_start_mib={:.1} rss_mid_mib={:.1} rss_end_mib={:.1}",
        s.lost,
        s.duplicated,
        s.malformed_not_error,
        s.conn_errors,
        pct(&overall, 0.5),
        pct(&overall, 0.99),
        pct(&overall, 0.999),
        s.max_lag_us,
        rss_at(0.0),
        rss_at(0.5),
        rss_at(1.0),
    );
    s.lost == 0 && s.duplicated == 0 && s.malformed_not_error == 0 && s.conn_errors == 0
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads as usize)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!(
                "loadgen: FAILED (lost, duplicated or unanswered replies, or a connection error)"
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(2)
        }
    }
}
