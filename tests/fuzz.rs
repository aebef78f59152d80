//! Property-based fuzzing (proptest) of the three parsers that take untrusted input:
//! - normalize → lexicon scan on arbitrary Unicode, built from confusables, zero-width and
//!   combining marks, separators and wordlist terms: never panics, and every match lies on
//!   char boundaries of the ORIGINAL text with char offsets that agree with its byte offsets;
//! - the wire parsers: a text frame into [`Request`] (and the [`Probe`] the connection falls
//!   back to for the error reply), a binary frame into [`parse_image_frame`]: never panic,
//!   garbage is an error;
//! - image decoding on arbitrary bytes behind each accepted magic number, and on truncated and
//!   bit-flipped copies of small valid PNG/JPEG/GIF files: never panics, stays within the
//!   limits.
//!
//! cargo-fuzz needs a nightly toolchain, which this project does not use; these targets are
//! the stable substitute (same shape as aho-corasick's `fuzz/`). Each target runs a small
//! number of cases by default so that `cargo test` stays fast in debug builds; set
//! `PROPTEST_CASES=N` for a longer run, e.g.
//! `PROPTEST_CASES=20000 cargo test --release --test tests fuzz::`.
//!
//! `tests/text.rs` (`random_inputs_never_panic_and_offsets_are_valid`) already runs 20,000
//! fixed-seed random texts through the lexicon; the target here adds shrinking, whole wordlist
//! terms and pieces at random positions, and arbitrary `String`s.

use chatguard::image::decode::{self, DecodeLimits};
use chatguard::server::protocol::{Probe, Request, parse_image_frame, parse_request};
use chatguard::text::Match;
use chatguard::text::lexicon::{Lexicon, Scratch};
use chatguard::text::normalize::Normalized;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use std::cell::{Cell, RefCell};
use std::sync::OnceLock;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Bytes;

/// Cases per target: `PROPTEST_CASES` when set, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A runner with `cases(default)` cases and no regression files written into the tree (a
/// failure prints the shrunk input).
fn runner(default: u32) -> TestRunner {
    TestRunner::new(Config {
        cases: cases(default),
        failure_persistence: None,
        ..Config::default()
    })
}

// ---------------------------------------------------------------------------------------------
// (a) normalize → lexicon.

fn lexicon() -> &'static Lexicon {
    static LEX: OnceLock<Lexicon> = OnceLock::new();
    LEX.get_or_init(|| Lexicon::embedded().expect("the embedded wordlists build"))
}

/// Every entry of the embedded wordlists (`TERM | severity [| sub]` lines).
fn wordlist_terms() -> &'static [String] {
    static TERMS: OnceLock<Vec<String>> = OnceLock::new();
    TERMS.get_or_init(|| {
        let files = [
            include_str!("../wordlists/en/allow.txt"),
            include_str!("../wordlists/en/hate.txt"),
            include_str!("../wordlists/en/insult.txt"),
            include_str!("../wordlists/en/profanity.txt"),
            include_str!("../wordlists/en/scam.txt"),
            include_str!("../wordlists/en/self_harm.txt"),
            include_str!("../wordlists/en/sexual.txt"),
            include_str!("../wordlists/en/threat.txt"),
            include_str!("../wordlists/zh/insult.txt"),
            include_str!("../wordlists/zh/profanity.txt"),
            include_str!("../wordlists/zh/scam.txt"),
            include_str!("../wordlists/zh/sexual.txt"),
        ];
        let terms: Vec<String> = files
            .iter()
            .flat_map(|f| f.lines())
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| l.split('|').next().unwrap_or("").trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        assert!(terms.len() > 1000, "wordlists parsed: {}", terms.len());
        terms
    })
}

/// Characters that normalization treats specially: confusables, zero-width and bidi controls,
/// combining marks, separators, fullwidth/math/enclosed/regional-indicator letters, leet
/// digits, CJK, emoji sequences, and the edges of the code space.
const SPECIAL: &[&str] = &[
    "\u{200b}",
    "\u{200c}",
    "\u{200d}",
    "\u{2060}",
    "\u{feff}",
    "\u{00ad}",
    "\u{034f}",
    "\u{202e}",
    "\u{2066}",
    "\u{2069}",
    "\u{0301}",
    "\u{0308}",
    "\u{0336}",
    "\u{0338}",
    "\u{20dd}",
    "\u{fe0f}",
    "\u{e0041}",
    "\u{1d173}",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\u{a0}",
    "\u{3000}",
    "\u{2028}",
    "\u{85}",
    ".",
    "-",
    "_",
    "*",
    "'",
    "!",
    "@",
    "$",
    "0",
    "1",
    "3",
    "4",
    "5",
    "7",
    "а",
    "е",
    "о",
    "р",
    "с",
    "у",
    "ѕ",
    "і",
    "ο",
    "ν",
    "ι",
    "κ",
    "ƒ",
    "ß",
    "İ",
    "ı",
    "ﬁ",
    "ǅ",
    "ｆ",
    "ｕ",
    "ｃ",
    "ｋ",
    "𝐟",
    "𝓼",
    "ⓕ",
    "ⓚ",
    "🇫",
    "🇺",
    "🅰",
    "ᴀ",
    "ʜ",
    "½",
    "㈱",
    "㍿",
    "ﷺ",
    "ﾞ",
    "ｶﾞ",
    "傻",
    "逼",
    "你",
    "妈",
    "한",
    "グ",
    "😀",
    "👨‍👩‍👧",
    "🏳️‍🌈",
    "\u{10ffff}",
    "\u{fffd}",
    "\u{0}",
    "\u{7f}",
    "A",
    "Z",
    "a",
    "s",
    "k",
    "i",
];

/// One piece of a generated text.
fn piece() -> impl Strategy<Value = String> {
    let terms = wordlist_terms();
    prop_oneof![
        3 => prop::sample::select(SPECIAL).prop_map(str::to_string),
        3 => prop::sample::select(terms).prop_map(|t| t.clone()),
        // A term with a piece inserted between its characters (separators, marks, controls).
        2 => (prop::sample::select(terms), prop::sample::select(SPECIAL)).prop_map(|(t, sep)| {
            let mut s = String::new();
            for (i, c) in t.chars().enumerate() {
                if i > 0 {
                    s.push_str(sep);
                }
                s.push(c);
            }
            s
        }),
        2 => any::<char>().prop_map(String::from),
        1 => "[a-z ]{1,12}",
    ]
}

/// A text: pieces in sequence, or an arbitrary `String`.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::collection::vec(piece(), 0..24).prop_map(|p| p.concat()),
        1 => any::<String>(),
    ]
}

/// Offsets are in range, on char boundaries of the original, sorted by start, and the char
/// offsets count the chars before the byte offsets.
fn check_matches(text: &str, matches: &[Match]) -> Result<(), TestCaseError> {
    let mut last_start = 0;
    for m in matches {
        prop_assert!(
            m.start < m.end && m.end <= text.len(),
            "range {}..{} of {:?} outside 0..{}",
            m.start,
            m.end,
            m.term,
            text.len()
        );
        prop_assert!(
            text.is_char_boundary(m.start) && text.is_char_boundary(m.end),
            "{}..{} of {:?} not on char boundaries",
            m.start,
            m.end,
            m.term
        );
        prop_assert!(m.start >= last_start, "matches not sorted by start");
        last_start = m.start;
        prop_assert_eq!(m.start_char, text[..m.start].chars().count());
        prop_assert_eq!(m.end_char, text[..m.end].chars().count());
        prop_assert!(m.start_char < m.end_char);
    }
    Ok(())
}

#[test]
fn normalize_and_scan_keep_offsets_in_the_original_text() {
    let lex = lexicon();
    // The runner takes a `Fn`: the reused buffers and the counter live in cells.
    let buffers = RefCell::new((Scratch::default(), Vec::new()));
    let hits = Cell::new(0u32);
    runner(2000)
        .run(&text(), |text| {
            let (scratch, out) = &mut *buffers.borrow_mut();
            lex.scan_into(&text, scratch, out);
            check_matches(&text, out)?;
            hits.set(hits.get() + u32::from(!out.is_empty()));
            // The offset map of the normalizer itself: every folded byte maps to a char range
            // of the original.
            let n = Normalized::of(&text);
            for (i, _) in n.as_str().char_indices() {
                let r = n
                    .original_range(i..i + 1)
                    .ok_or_else(|| TestCaseError::fail(format!("no range for folded byte {i}")))?;
                prop_assert!(r.start <= r.end && r.end <= text.len());
                prop_assert!(text.is_char_boundary(r.start) && text.is_char_boundary(r.end));
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // The generator must actually reach the matcher, or the property says little.
    assert!(hits.get() > 0, "no generated text matched the lexicon");
}

/// Chat-like text of the kind the normalizer's fast path takes (ASCII words, numbers, words
/// mixing both, apostrophes, marks, punctuation, emoji, Han/kana/Hangul), with the odd char
/// that sends it to the general path.
fn chat_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[a-zA-Z]{1,7}",
        2 => "[a-z0-9]{1,6}",
        2 => "[0-9]{1,4}",
        1 => "[a-z]{1,3}['][a-z0-9]{0,3}",
        1 => "[a-z]{1,3}[!|+*#%?^@$][a-z0-9]{0,3}",
        1 => "[a-zA-Z0-9]{1,3}[-_.,'*!|+#%?^@$:;/()~ ]{1,3}[a-zA-Z0-9]{0,3}",
        1 => "[@#][a-z0-9_]{1,6}",
        1 => "[0-9]{1,3}[.,:][0-9]{1,3}",
        1 => prop::sample::select(&[
            "aa", "oo", "ll", "00", "11", "22", "66", "0o", "1i", "3e", "5s", "zz",
        ][..])
        .prop_map(str::to_string),
        3 => "[哈好你的了吗こんカ감사\u{20000}]{1,4}",
        4 => prop::sample::select(&[
            " ", " ", " ", "  ", ", ", ". ", "!", "?", "...", "-", "_", "'", "\n", "\t",
            "😀", "❤\u{fe0f}", "\u{200d}", "🔥", "é", "ｆ",
        ][..])
        .prop_map(str::to_string),
    ];
    prop::collection::vec(piece, 0..16).prop_map(|p| p.concat())
}

#[test]
fn the_fast_path_folds_like_the_general_path() {
    runner(3000)
        .run(&chat_text(), |text| {
            crate::text::check_fast_path(&text);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

// ---------------------------------------------------------------------------------------------
// (b) wire parsers.

/// What the connection does with a text frame: [`parse_request`]; on failure, a lenient
/// [`Probe`] for the id and type of the error reply.
fn parse_text_frame(text: &str) -> Result<Request, Probe> {
    parse_request(text).map_err(|_| serde_json::from_str::<Probe>(text).unwrap_or_default())
}

/// JSON values shaped like requests: objects with the protocol's keys (and some others), any
/// value types, nested a little.
fn jsonish() -> impl Strategy<Value = Value> {
    const KEYS: &[&str] = &[
        "type",
        "id",
        "user",
        "room",
        "to",
        "policy",
        "text",
        "images",
        "data",
        "action",
        "duration_secs",
        "reason",
        "message",
        "extra",
    ];
    const TYPES: &[&str] = &[
        "moderate", "sanction", "ping", "lookup", "image", "verdict", "", "MODERATE",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(TYPES).prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
        "[A-Za-z0-9+/=]{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..8).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// A request-like object (always an object with a `type`), then serialized and maybe mangled.
fn request_text() -> impl Strategy<Value = String> {
    let object = (
        prop::sample::select(&["moderate", "sanction", "ping", "lookup", "nope"][..]),
        prop::collection::btree_map(
            prop::sample::select(
                &[
                    "id", "user", "room", "to", "policy", "text", "images", "action", "reason",
                ][..],
            ),
            jsonish(),
            0..7,
        ),
    )
        .prop_map(|(kind, fields)| {
            let mut m: serde_json::Map<String, Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            m.insert("type".into(), Value::from(kind));
            Value::Object(m).to_string()
        });
    let any_json = jsonish().prop_map(|v| v.to_string());
    // Mostly well-formed requests of each type, so the mangling below starts from valid ones.
    let moderate = (
        ".{1,12}",
        "[a-z0-9]{1,12}",
        prop::option::of(text()),
        prop::option::of(".{0,8}"),
        prop::option::weighted(0.2, jsonish()),
    )
        .prop_map(|(id, user, text, room, images)| {
            let mut v = json!({"type":"moderate","id":id,"user":user});
            if let Some(t) = text {
                v["text"] = Value::from(t);
            }
            if let Some(r) = room {
                v["room"] = Value::from(r);
            }
            if let Some(i) = images {
                v["images"] = i;
            }
            v.to_string()
        });
    let lookup = (".{0,12}", ".{0,12}")
        .prop_map(|(id, message)| json!({"type":"lookup","id":id,"message":message}).to_string());
    let sanction = (
        ".{0,12}",
        ".{0,12}",
        prop::sample::select(&["ok", "throttle", "mute", "block", "ban"][..]),
        prop::option::of(any::<u32>()),
    )
        .prop_map(|(id, user, action, secs)| {
            let mut v = json!({"type":"sanction","id":id,"user":user,"action":action});
            if let Some(secs) = secs {
                v["duration_secs"] = Value::from(secs);
            }
            v.to_string()
        });
    prop_oneof![
        2 => object,
        1 => any_json,
        4 => moderate,
        1 => lookup,
        1 => sanction
    ]
    .prop_flat_map(|s| {
        let len = s.len();
        (Just(s), 0..=len, any::<u8>(), 0u8..6).prop_map(|(s, at, byte, how)| {
            let boundary = |i: usize| (0..=i).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
            let (at, half) = (boundary(at), boundary(at / 2));
            match how {
                // Intact (half of the time).
                0..=2 => s,
                // Truncated.
                3 => s[..at].to_string(),
                // A byte inserted (kept valid UTF-8: the socket layer rejects invalid text).
                4 => format!("{}{}{}", &s[..at], char::from(byte), &s[at..]),
                // A chunk duplicated.
                _ => format!("{}{}", &s[..at], &s[half..]),
            }
        })
    })
}

#[test]
fn request_parser_never_panics_and_rejects_garbage() {
    runner(2000)
        .run(&prop::collection::vec(any::<u8>(), 0..256), |bytes| {
            // Arbitrary bytes are never a valid request unless they are valid JSON with a type.
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(req) = parse_text_frame(&text) {
                let v: Value = serde_json::from_str(&text).map_err(|e| {
                    TestCaseError::fail(format!("accepted invalid JSON {text:?}: {e} → {req:?}"))
                })?;
                prop_assert!(v.is_object(), "accepted a non-object: {text:?}");
                prop_assert!(v.get("type").is_some_and(Value::is_string), "{text:?}");
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));

    runner(2000)
        .run(&request_text(), |text| {
            match parse_text_frame(&text) {
                Ok(req) => {
                    // A request is only accepted from a JSON object of a known type, and it
                    // carries the id that was sent.
                    let v: Value = serde_json::from_str(&text)
                        .map_err(|e| TestCaseError::fail(format!("accepted {text:?}: {e}")))?;
                    prop_assert!(v.is_object(), "accepted a non-object: {text:?}");
                    let kind = v["type"].as_str().unwrap_or("");
                    match &req {
                        Request::Moderate(m) => {
                            prop_assert_eq!(kind, "moderate");
                            prop_assert_eq!(v["id"].as_str(), Some(m.id.as_str()));
                        }
                        Request::Sanction(s) => {
                            prop_assert_eq!(kind, "sanction");
                            prop_assert_eq!(v["id"].as_str(), Some(s.id.as_str()));
                        }
                        Request::Ping { id } => {
                            prop_assert_eq!(kind, "ping");
                            prop_assert_eq!(v["id"].as_str(), id.as_deref());
                        }
                        #[allow(unreachable_patterns)]
                        _ => {}
                    }
                }
                Err(probe) => {
                    // The probe's id, when found, is bounded (it is echoed back).
                    prop_assert!(probe.id.as_ref().is_none_or(|id| id.len() <= 256));
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Regression: serde reads a JSON array as a struct with its fields in order, so `["ping"]` was
/// answered with a pong, `["moderate","m1","u1"]` was moderated and `["image","m-1/i1"]` was a
/// valid binary frame header.
#[test]
fn json_arrays_are_not_requests() {
    for text in [
        r#"["ping"]"#,
        r#"["moderate","m1","u1",null,null,null,"hello",[]]"#,
        r#" ["sanction","s1","u1","block"]"#,
        "null",
        "42",
        r#""ping""#,
    ] {
        let err = parse_request(text).expect_err(text);
        assert!(err.to_string().contains("JSON object"), "{text}: {err}");
    }
    assert!(parse_request("[1,").is_err_and(|e| e.is_eof()));
    // The binary frame header likewise.
    for header in [r#"["image","m-1/i1"]"#, r#"{"type":"image","id":"m-1/i1"}"#] {
        let mut frame = (header.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(header.as_bytes());
        frame.extend_from_slice(b"\x89PNG");
        let parsed = parse_image_frame(&Bytes::from(frame));
        assert_eq!(
            parsed.is_ok(),
            header.starts_with('{'),
            "{header}: {parsed:?}"
        );
    }
    assert!(matches!(
        parse_request(r#" {"type":"ping","id":"p"}"#),
        Ok(Request::Ping { .. })
    ));
}

/// The same request texts sent to the real server on one connection: every text frame gets
/// exactly one reply (a verdict, pong, lookup result, sanction or error), and the connection
/// survives them all ("a bad frame never kills the connection").
#[tokio::test]
async fn random_text_frames_each_get_one_reply_and_the_connection_survives() {
    use crate::common::{Server, recv, send};
    use futures_util::SinkExt;
    use proptest::strategy::ValueTree;
    use tokio_tungstenite::tungstenite::Message;

    let server = Server::start(|raw| {
        // Requests listing images without data wait for binary frames that never come.
        raw.image.binary_wait_ms = 50;
        raw.image.model_enabled = false;
    })
    .await;
    let mut ws = server.connect().await;
    let mut runner = runner(300);
    let strategy = request_text();
    let frames: Vec<String> = (0..runner.config().cases)
        .map(|_| {
            strategy
                .new_tree(&mut runner)
                .expect("strategy makes values")
                .current()
        })
        .collect();
    let (mut sent, mut replies) = (0, 0);
    let mut by_type = std::collections::BTreeMap::<String, usize>::new();
    // A window of frames at a time, then their replies: the server stops reading from a
    // client that does not read its replies (backpressure), so sending every frame first
    // would deadlock on a long run (`PROPTEST_CASES`).
    for window in frames.chunks(100) {
        for frame in window {
            ws.send(Message::text(frame.clone())).await.expect("send");
        }
        sent += window.len();
        while replies < sent {
            let v = recv(&mut ws).await;
            let kind = v["type"].as_str().unwrap_or("");
            match kind {
                "sanction" if v.get("id").is_none() => continue, // a pushed event
                "room_alarm" => continue,
                "verdict" | "pong" | "lookup_result" | "sanction" | "error" => {
                    replies += 1;
                    *by_type.entry(kind.to_string()).or_default() += 1;
                }
                other => panic!("unexpected reply type {other:?}: {v}"),
            }
        }
    }
    eprintln!("replies by type: {by_type:?}");
    send(&mut ws, json!({"type":"ping","id":"after"})).await;
    loop {
        let v = recv(&mut ws).await;
        if v["type"] == "pong" && v["id"] == "after" {
            break;
        }
        assert!(
            v.get("id").is_none() || v["type"] == "room_alarm",
            "more replies than frames: {v}"
        );
    }
    server.stop().await;
}

/// A binary image frame: a 4-byte length (true or lying), a JSON-ish header, a payload.
fn image_frame() -> impl Strategy<Value = Vec<u8>> {
    let header = prop_oneof![
        "[a-z0-9/-]{0,20}".prop_map(|id| json!({"type":"image","id":id}).to_string()),
        (".{0,8}", ".{0,600}").prop_map(|(t, id)| json!({"type":t,"id":id}).to_string()),
        jsonish().prop_map(|v| v.to_string()),
        ".{0,40}",
    ];
    (
        header,
        prop_oneof![
            Just(None),
            any::<u32>().prop_map(Some),
            (0u32..64).prop_map(Some)
        ],
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(header, lie, payload)| {
            let len = lie.unwrap_or(header.len() as u32);
            let mut frame = len.to_be_bytes().to_vec();
            frame.extend_from_slice(header.as_bytes());
            frame.extend_from_slice(&payload);
            frame
        })
}

#[test]
fn image_frame_parser_never_panics_and_rejects_garbage() {
    let frames = prop_oneof![prop::collection::vec(any::<u8>(), 0..64), image_frame()];
    runner(4000)
        .run(&frames, |frame| {
            let bytes = Bytes::from(frame.clone());
            match parse_image_frame(&bytes) {
                Ok((key, image)) => {
                    prop_assert!(frame.len() >= 4);
                    let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
                    let header: Value = serde_json::from_slice(&frame[4..4 + len])
                        .map_err(|e| TestCaseError::fail(format!("accepted a bad header: {e}")))?;
                    prop_assert_eq!(header["type"].as_str(), Some("image"));
                    prop_assert_eq!(header["id"].as_str(), Some(key.as_str()));
                    prop_assert!(!key.is_empty() && key.len() <= 513);
                    prop_assert_eq!(&image[..], &frame[4 + len..]);
                }
                Err((key, message)) => {
                    prop_assert!(!message.is_empty());
                    prop_assert!(key.is_none_or(|k| k.len() <= 4 * 256));
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

// ---------------------------------------------------------------------------------------------
// (c) image decoding.

/// Tight limits so that every case is cheap, even when a mutated header declares a huge image.
fn limits() -> DecodeLimits {
    DecodeLimits {
        max_encoded_bytes: 64 << 10,
        max_pixels: 1 << 20,
        max_side_px: 2048,
        max_animation_pixels: 4 << 20,
        max_decoded_frames: 8,
        sampled_frames: 2,
        // Generous: a debug build on a busy machine is slow; the deadline is not what is tested.
        timeout: Duration::from_secs(30),
    }
}

/// Small valid images: PNG (RGB, RGBA, gray), JPEG, GIF, lossless WebP of a 24×16 gradient.
fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        use image::{DynamicImage, ImageFormat, RgbImage};
        let rgb = RgbImage::from_fn(24, 16, |x, y| {
            image::Rgb([(x * 10) as u8, (y * 15) as u8, ((x + y) * 5) as u8])
        });
        let img = DynamicImage::ImageRgb8(rgb);
        let mut out = Vec::new();
        for (img, format) in [
            (img.clone(), ImageFormat::Png),
            (DynamicImage::ImageRgba8(img.to_rgba8()), ImageFormat::Png),
            (DynamicImage::ImageLuma8(img.to_luma8()), ImageFormat::Png),
            (img.clone(), ImageFormat::Jpeg),
            (DynamicImage::ImageRgba8(img.to_rgba8()), ImageFormat::Gif),
            (DynamicImage::ImageRgba8(img.to_rgba8()), ImageFormat::WebP),
        ] {
            let mut bytes = std::io::Cursor::new(Vec::new());
            img.write_to(&mut bytes, format).expect("encodes");
            let bytes = bytes.into_inner();
            decode::decode(&bytes, &limits()).expect("the seed decodes");
            out.push(bytes);
        }
        out
    })
}

/// A seed image, mutated: truncated, bytes flipped or overwritten, a chunk repeated.
fn mutated_image() -> impl Strategy<Value = Vec<u8>> {
    let seeds = seeds();
    (
        0..seeds.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
    )
        .prop_map(move |(i, edits)| {
            let mut bytes = seeds[i].clone();
            for (at, byte, how) in edits {
                if bytes.is_empty() {
                    break;
                }
                let at = at.index(bytes.len());
                match how {
                    0 => bytes.truncate(at),
                    1 => bytes[at] ^= byte | 1,
                    2 => bytes[at] = byte,
                    _ => {
                        let chunk = bytes[at..].iter().take(usize::from(byte)).copied();
                        let chunk: Vec<u8> = chunk.collect();
                        bytes.splice(at..at, chunk);
                    }
                }
            }
            bytes
        })
}

/// Arbitrary bytes behind each accepted magic number (or none).
fn magic_then_garbage() -> impl Strategy<Value = Vec<u8>> {
    const MAGIC: &[&[u8]] = &[
        b"",
        b"\xff\xd8\xff",
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
        b"\x89PNG\r\n\x1a\n",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
        b"GIF89a",
        b"GIF87a",
        b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        b"RIFF\x00\x00\x00\x00WEBPVP8L",
    ];
    (
        prop::sample::select(MAGIC),
        prop::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(|(magic, tail)| [magic, &tail[..]].concat())
}

#[test]
fn image_decoding_never_panics_and_stays_within_limits() {
    let limits = limits();
    let inputs = prop_oneof![3 => mutated_image(), 2 => magic_then_garbage()];
    let decoded = Cell::new(0u32);
    runner(512)
        .run(&inputs, |bytes| {
            match decode::decode(&bytes, &limits) {
                Ok(img) => {
                    decoded.set(decoded.get() + 1);
                    prop_assert!(u64::from(img.width) * u64::from(img.height) <= limits.max_pixels);
                    prop_assert!(img.width.max(img.height) <= limits.max_side_px);
                    prop_assert!(img.frames_decoded >= 1);
                    prop_assert!(img.frames_decoded <= limits.max_decoded_frames);
                    prop_assert!(
                        !img.model_frames.is_empty()
                            && img.model_frames.len() <= 1 + limits.sampled_frames
                    );
                    for frame in &img.model_frames {
                        prop_assert_eq!(frame.len(), decode::MODEL_INPUT_PX.pow(2) * 3);
                    }
                    prop_assert_eq!(img.hash_gray.len(), decode::HASH_INPUT_PX.pow(2));
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // Some mutations (a flipped pixel byte) still decode; the run must include those too.
    assert!(
        decoded.get() > 0 || cases(512) < 64,
        "no mutated image decoded"
    );
}
