//! `docs/protocol-v1.schema.json` against a real server: every kind of reply and pushed event
//! the server emits must validate, and the schema is closed (`additionalProperties: false`), so
//! a field the server adds without documenting it fails here.
//!
//! The validator below implements the subset of JSON Schema 2020-12 the schema uses (`$ref` to
//! `#/$defs/...`, `type`, `const`, `enum`, `required`, `properties`,
//! `additionalProperties: false`, `items`, `oneOf`, `minimum`/`maximum`,
//! `minLength`/`maxLength`) and refuses any other keyword, so the schema cannot silently rely
//! on something unchecked.

use crate::common::{Server, Ws, recv, send, send_binary};
use base64::Engine;
use serde_json::{Value, json};

const SCHEMA_PATH: &str = "docs/protocol-v1.schema.json";

/// Keywords that only annotate.
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$defs",
    "$comment",
    "title",
    "description",
    "examples",
];

struct Schema {
    root: Value,
}

impl Schema {
    fn load() -> Schema {
        let text = std::fs::read_to_string(SCHEMA_PATH)
            .unwrap_or_else(|e| panic!("cannot read {SCHEMA_PATH}: {e}"));
        let root = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{SCHEMA_PATH} is not JSON: {e}"));
        Schema { root }
    }

    /// The definition `#/$defs/NAME`.
    fn def(&self, name: &str) -> &Value {
        self.root["$defs"]
            .get(name)
            .unwrap_or_else(|| panic!("{SCHEMA_PATH} has no $defs/{name}"))
    }

    /// Validates `v` against `#/$defs/NAME`; returns every error found.
    fn check(&self, name: &str, v: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        self.validate(self.def(name), v, "$", &mut errors);
        errors
    }

    /// Panics with the errors unless `v` is a valid `#/$defs/NAME`.
    fn assert_valid(&self, name: &str, v: &Value) {
        let errors = self.check(name, v);
        assert!(
            errors.is_empty(),
            "not a valid {name}: {errors:#?}\n{}",
            serde_json::to_string_pretty(v).unwrap_or_default()
        );
    }

    fn validate(&self, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
        let Some(obj) = schema.as_object() else {
            panic!("schema at {at} is not an object: {schema}");
        };
        for (key, rule) in obj {
            match key.as_str() {
                k if ANNOTATIONS.contains(&k) => {}
                "$ref" => {
                    let target = rule.as_str().expect("$ref is a string");
                    let name = target
                        .strip_prefix("#/$defs/")
                        .unwrap_or_else(|| panic!("unsupported $ref {target}"));
                    self.validate(self.def(name), v, at, errors);
                }
                "type" => {
                    let types: Vec<&str> = match rule {
                        Value::String(t) => vec![t.as_str()],
                        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                        _ => panic!("bad type keyword at {at}"),
                    };
                    if !types.iter().any(|t| has_type(v, t)) {
                        errors.push(format!("{at}: expected type {types:?}, got {v}"));
                    }
                }
                "const" => {
                    if v != rule {
                        errors.push(format!("{at}: expected {rule}, got {v}"));
                    }
                }
                "enum" => {
                    let options = rule.as_array().expect("enum is an array");
                    if !options.contains(v) {
                        errors.push(format!("{at}: {v} is not one of {rule}"));
                    }
                }
                "required" => {
                    for name in rule.as_array().expect("required is an array") {
                        let name = name.as_str().expect("required names are strings");
                        if v.as_object().is_some_and(|o| !o.contains_key(name)) {
                            errors.push(format!("{at}: missing required field `{name}`"));
                        }
                    }
                }
                "properties" => {
                    let props = rule.as_object().expect("properties is an object");
                    if let Some(o) = v.as_object() {
                        for (name, value) in o {
                            if let Some(s) = props.get(name) {
                                self.validate(s, value, &format!("{at}.{name}"), errors);
                            }
                        }
                    }
                }
                "additionalProperties" => {
                    assert_eq!(
                        rule,
                        &Value::Bool(false),
                        "only additionalProperties: false is supported ({at})"
                    );
                    let known = obj.get("properties").and_then(Value::as_object);
                    if let Some(o) = v.as_object() {
                        for name in o.keys() {
                            if !known.is_some_and(|k| k.contains_key(name)) {
                                errors.push(format!("{at}: field `{name}` is not in the schema"));
                            }
                        }
                    }
                }
                "items" => {
                    if let Some(items) = v.as_array() {
                        for (i, item) in items.iter().enumerate() {
                            self.validate(rule, item, &format!("{at}[{i}]"), errors);
                        }
                    }
                }
                "oneOf" => {
                    let branches = rule.as_array().expect("oneOf is an array");
                    let results: Vec<Vec<String>> = branches
                        .iter()
                        .map(|b| {
                            let mut e = Vec::new();
                            self.validate(b, v, at, &mut e);
                            e
                        })
                        .collect();
                    let passing = results.iter().filter(|e| e.is_empty()).count();
                    if passing != 1 {
                        errors.push(format!(
                            "{at}: matches {passing} of the oneOf branches (exactly 1 wanted); \
                             branch errors: {results:?}"
                        ));
                    }
                }
                "minimum" | "maximum" => {
                    let bound = rule.as_f64().expect("bound is a number");
                    if let Some(x) = v.as_f64() {
                        let ok = if key == "minimum" {
                            x >= bound
                        } else {
                            x <= bound
                        };
                        if !ok {
                            errors.push(format!("{at}: {x} violates {key} {bound}"));
                        }
                    }
                }
                "minLength" | "maxLength" => {
                    let bound = rule.as_u64().expect("length bound is an integer");
                    if let Some(s) = v.as_str() {
                        let n = s.chars().count() as u64;
                        let ok = if key == "minLength" {
                            n >= bound
                        } else {
                            n <= bound
                        };
                        if !ok {
                            errors.push(format!("{at}: length {n} violates {key} {bound}"));
                        }
                    }
                }
                other => panic!(
                    "{SCHEMA_PATH} uses `{other}` at {at}, which this test's validator does not implement"
                ),
            }
        }
    }
}

fn has_type(v: &Value, t: &str) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        other => panic!("unknown type `{other}` in the schema"),
    }
}

/// Reads frames until one satisfies `pred`, validating every one as a `server_message`
/// (and the matching one as `def`) on the way.
async fn recv_until(
    schema: &Schema,
    ws: &mut Ws,
    def: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..100 {
        let v = recv(ws).await;
        schema.assert_valid("server_message", &v);
        if pred(&v) {
            schema.assert_valid(def, &v);
            return v;
        }
    }
    panic!("no {def} within 100 frames");
}

#[test]
fn schema_is_closed_and_refs_resolve() {
    let schema = Schema::load();
    // Every object definition is closed, so an undocumented field fails validation.
    fn walk(v: &Value, at: &str, schema: &Schema) {
        match v {
            Value::Object(o) => {
                if o.contains_key("properties") {
                    assert_eq!(
                        o.get("additionalProperties"),
                        Some(&Value::Bool(false)),
                        "{at} is not closed"
                    );
                }
                if let Some(r) = o.get("$ref").and_then(Value::as_str) {
                    let name = r.strip_prefix("#/$defs/").expect("local ref");
                    schema.def(name);
                }
                for (k, child) in o {
                    walk(child, &format!("{at}/{k}"), schema);
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    walk(child, &format!("{at}/{i}"), schema);
                }
            }
            _ => {}
        }
    }
    walk(&schema.root, "#", &schema);

    // The validator catches what it must.
    let good = json!({"type":"pong","id":"p1"});
    schema.assert_valid("server_message", &good);
    let extra = json!({"type":"pong","id":"p1","extra":1});
    assert!(
        !schema.check("server_message", &extra).is_empty(),
        "an unknown field must fail"
    );
    let wrong = json!({"type":"error","id":null,"code":"nope","message":"x"});
    assert!(!schema.check("reply", &wrong).is_empty());
    // A sanction reply has an id, a pushed sanction does not: each matches exactly one branch.
    let s = json!({"type":"sanction","user":"u","action":"mute","until":1,"reason":"r"});
    schema.assert_valid("event", &s);
    assert!(!schema.check("reply", &s).is_empty());

    // Requests as documented in the README.
    for req in [
        json!({"type":"moderate","id":"m-1","user":"u42","room":"r7","to":"u99",
               "policy":"default","text":"hello","images":[{"id":"i1","data":"aGk="},{"id":"i2"}]}),
        json!({"type":"ping","id":"p1"}),
        json!({"type":"ping"}),
        json!({"type":"sanction","id":"s1","user":"u42","action":"mute","duration_secs":600,
               "reason":"moderator"}),
        json!({"type":"lookup","id":"q-1","message":"m-1"}),
    ] {
        schema.assert_valid("request", &req);
    }
    schema.assert_valid("image_frame_header", &json!({"type":"image","id":"m-1/i1"}));
    assert!(
        !schema
            .check(
                "request",
                &json!({"type":"moderate","id":"m-1","user":"u","txt":"typo"})
            )
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_replies_and_events_match_the_schema() {
    let schema = Schema::load();
    let server = Server::start(|raw| {
        raw.behaviour.room_alarm_flagged = 2;
    })
    .await;
    let mut ws = server.connect().await;

    // A verdict with matches (byte and char offsets).
    send(
        &mut ws,
        json!({"type":"moderate","id":"m-1","user":"u1","room":"r1",
               "text":"héllo you f.u.c.k.i.n.g idiot"}),
    )
    .await;
    let v = recv_until(&schema, &mut ws, "verdict", |v| v["id"] == "m-1").await;
    assert!(!v["matches"].as_array().expect("matches").is_empty(), "{v}");

    // A verdict with an image error (inline data that is no image), and one from a binary
    // frame that does decode.
    let not_image = base64::engine::general_purpose::STANDARD.encode(b"definitely not an image");
    send(
        &mut ws,
        json!({"type":"moderate","id":"m-2","user":"u1",
               "images":[{"id":"i1","data":not_image},{"id":"i2"}]}),
    )
    .await;
    let header = br#"{"type":"image","id":"m-2/i2"}"#;
    let mut frame = (header.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(header);
    frame.extend_from_slice(&tiny_png());
    send_binary(&mut ws, frame).await;
    let v = recv_until(&schema, &mut ws, "verdict", |v| v["id"] == "m-2").await;
    assert!(v["images"][0]["error"].is_string(), "{v}");
    assert!(v["images"][1]["phash"].is_string(), "{v}");

    // Pongs, with and without an id.
    send(&mut ws, json!({"type":"ping","id":"p1"})).await;
    recv_until(&schema, &mut ws, "pong", |v| v["type"] == "pong").await;
    send(&mut ws, json!({"type":"ping"})).await;
    recv_until(&schema, &mut ws, "pong", |v| v["type"] == "pong").await;

    // Errors: with an id, and with `id: null` (malformed JSON), and a bad binary frame.
    send(&mut ws, json!({"type":"moderate","id":"m-3"})).await;
    recv_until(&schema, &mut ws, "error", |v| v["id"] == "m-3").await;
    ws_send_text(&mut ws, "{not json").await;
    let e = recv_until(&schema, &mut ws, "error", |v| v["type"] == "error").await;
    assert!(e["id"].is_null(), "{e}");
    send_binary(&mut ws, vec![0, 0]).await;
    recv_until(&schema, &mut ws, "error", |v| v["type"] == "error").await;

    // A sanction request: the reply (with id) and the pushed event (without).
    send(
        &mut ws,
        json!({"type":"sanction","id":"s-1","user":"u9","action":"mute","duration_secs":60}),
    )
    .await;
    let mut reply = false;
    let mut event = false;
    while !(reply && event) {
        let v = recv(&mut ws).await;
        schema.assert_valid("server_message", &v);
        if v["type"] == "sanction" && v.get("id").is_some() {
            schema.assert_valid("sanction_reply", &v);
            reply = true;
        } else if v["type"] == "sanction" {
            schema.assert_valid("sanction_event", &v);
            event = true;
        }
    }

    // A room alarm (threshold 2) from flagged messages in one room; the abuse also escalates
    // into automatic sanction events, validated on the way.
    for i in 0..4 {
        send(
            &mut ws,
            json!({"type":"moderate","id":format!("a-{i}"),"user":format!("r{i}"),
                   "room":"live","text":"I will kill you"}),
        )
        .await;
    }
    recv_until(&schema, &mut ws, "room_alarm", |v| {
        v["type"] == "room_alarm"
    })
    .await;

    // Lookups (src/lookup.rs): a hit carries the verdict as it was sent, a miss does not.
    send(&mut ws, json!({"type":"lookup","id":"q-1","message":"m-1"})).await;
    let hit = recv_until(&schema, &mut ws, "lookup_result", |v| v["id"] == "q-1").await;
    assert_eq!(hit["found"], true, "{hit}");
    schema.assert_valid("verdict", &hit["verdict"]);
    send(
        &mut ws,
        json!({"type":"lookup","id":"q-2","message":"never-sent"}),
    )
    .await;
    let miss = recv_until(&schema, &mut ws, "lookup_result", |v| v["id"] == "q-2").await;
    assert_eq!(miss["found"], false, "{miss}");

    drop(ws);
    server.stop().await;
}

async fn ws_send_text(ws: &mut Ws, text: &str) {
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::text(text))
        .await
        .expect("send");
}

/// A 2×2 RGB PNG.
fn tiny_png() -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, 2, 2);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().expect("png header");
    writer
        .write_image_data(&[255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255])
        .expect("png data");
    writer.finish().expect("png finish");
    out
}
