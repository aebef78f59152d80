//! # Wire protocol v1
//!
//! JSON text frames exchanged on `/v1/ws`. Takes raw frame payloads from
//! [`super::connection`], gives back typed [`Request`]s, and defines every message chatguard
//! sends ([`Verdict`], [`Pong`], [`ErrorReply`], pushed [`Event`]s). `chatguard check` prints
//! the same [`Verdict`] shape.

use crate::behaviour::{RoomAlarm, Sanction, SanctionState, SenderInfo};
use crate::text::Match;
use serde::{Deserialize, Serialize};

/// Longest request `id` accepted, in bytes; ids are echoed back, so they are bounded.
pub const MAX_ID_BYTES: usize = 256;
/// Longest `user`/`room`/`to`/`policy` value accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// A request from the IM server, tagged by `type`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Moderate one chat message.
    Moderate(ModerateRequest),
    /// Apply or lift a sanction by hand; answered with a [`SanctionReply`].
    Sanction(SanctionRequest),
    /// Liveness check; answered with [`Pong`].
    Ping {
        /// Echoed back in the pong.
        #[serde(default)]
        id: Option<String>,
    },
    /// A verdict sent earlier, by message id; answered with `lookup_result`
    /// ([`lookup_result_json`]).
    Lookup(LookupRequest),
}

/// The `lookup` request: `{"type":"lookup","id":"q-1","message":"m-1"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupRequest {
    /// Caller's request id; echoed in the reply. Required, at most [`MAX_ID_BYTES`].
    pub id: String,
    /// The `id` of the `moderate` request whose verdict is wanted, at most [`MAX_ID_BYTES`].
    pub message: String,
}

impl LookupRequest {
    /// Checks the ids' lengths; the error is the `bad_request` message.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty() || self.id.len() > MAX_ID_BYTES {
            return Err(format!("`id` must be 1..={MAX_ID_BYTES} bytes"));
        }
        if self.message.is_empty() || self.message.len() > MAX_ID_BYTES {
            return Err(format!("`message` must be 1..={MAX_ID_BYTES} bytes"));
        }
        Ok(())
    }
}

/// The `lookup_result` reply: `{"type":"lookup_result","id":..,"message":..,"found":true,
/// "age_ms":..,"verdict":{..}}` with the verdict spliced in exactly as it was sent
/// (`verdict_json`, with its age in ms), or `"found":false` and neither field.
pub fn lookup_result_json(req: &LookupRequest, found: Option<(&str, u64)>) -> String {
    let (id, message) = (to_json(&req.id), to_json(&req.message));
    match found {
        Some((verdict_json, age_ms)) => format!(
            "{{\"type\":\"lookup_result\",\"id\":{id},\"message\":{message},\"found\":true,\
             \"age_ms\":{age_ms},\"verdict\":{verdict_json}}}"
        ),
        None => format!(
            "{{\"type\":\"lookup_result\",\"id\":{id},\"message\":{message},\"found\":false}}"
        ),
    }
}

/// The `moderate` request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModerateRequest {
    /// Caller's message id; echoed in the verdict. Required, at most [`MAX_ID_BYTES`].
    pub id: String,
    /// Sender's user id; behaviour tracking is keyed by (tenant, user).
    pub user: String,
    /// Room/channel/group the message is posted in.
    #[serde(default)]
    pub room: Option<String>,
    /// Target user of a direct message, if any.
    #[serde(default)]
    pub to: Option<String>,
    /// Policy name; `default` when absent.
    #[serde(default)]
    pub policy: Option<String>,
    /// Message text; may be absent or empty when the message only carries images.
    #[serde(default)]
    pub text: Option<String>,
    /// Attached images: inline base64, or binary frames sent on the same connection.
    #[serde(default)]
    pub images: Vec<ImageRef>,
}

/// The `sanction` request: the IM server (a human moderator, an appeal) sets a user's
/// sanction. `action = "ok"` lifts any sanction and clears the cool-down and the abuse score;
/// `throttle`/`mute`/`block` is imposed for `duration_secs` (default: the configured length of
/// that sanction) whatever was in force, milder or harsher.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SanctionRequest {
    /// Caller's request id; echoed in the reply. Required, at most [`MAX_ID_BYTES`].
    pub id: String,
    /// The user, as in `moderate` requests.
    pub user: String,
    /// `ok` | `throttle` | `mute` | `block`.
    pub action: SanctionState,
    /// How long, in seconds (1..=315360000); ignored for `ok`.
    #[serde(default)]
    pub duration_secs: Option<u64>,
    /// Why (the event's `reason`), at most [`MAX_NAME_BYTES`]; `moderator` when absent.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The reply to a `sanction` request: the sanction now in force, with the request's `id`. The
/// same sanction (without `id`) is pushed to every connection of the tenant as a `sanction`
/// event, this one included.
#[derive(Debug, Serialize)]
pub struct SanctionReply {
    /// Always `"sanction"`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request's id.
    pub id: String,
    /// The sanction.
    #[serde(flatten)]
    pub sanction: Sanction,
}

/// An image attached to a `moderate` request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    /// Caller's id for the image, echoed in `images[]` of the verdict.
    pub id: String,
    /// Base64 image bytes. When absent, the bytes come in a binary frame whose header id is
    /// `"<request id>/<image id>"` (see [`parse_image_frame`]).
    #[serde(default)]
    pub data: Option<String>,
    /// Filled by the connection, never read from the wire: the binary frame's bytes, or why
    /// it did not arrive.
    #[serde(skip)]
    pub binary: Option<Result<tokio_tungstenite::tungstenite::Bytes, String>>,
}

impl ImageRef {
    /// The key of the binary frame carrying this image's bytes for request `request_id`.
    pub fn frame_key(&self, request_id: &str) -> String {
        format!("{request_id}/{}", self.id)
    }
}

/// Longest JSON header of a binary image frame, in bytes.
pub const MAX_FRAME_HEADER_BYTES: usize = 1024;

/// The JSON header of a binary image frame.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageFrameHeader {
    /// Always `"image"`.
    #[serde(rename = "type")]
    kind: String,
    /// `"<request id>/<image id>"`.
    id: String,
}

/// Splits a binary frame — 4-byte big-endian header length, JSON header
/// `{"type":"image","id":"m-1/i1"}`, then the raw image bytes — into the key (`m-1/i1`) and
/// the bytes (shared with the frame, not copied). The error says what is wrong; it comes with
/// the key when the header could be read.
pub fn parse_image_frame(
    frame: &tokio_tungstenite::tungstenite::Bytes,
) -> Result<(String, tokio_tungstenite::tungstenite::Bytes), (Option<String>, String)> {
    let Some(len) = frame.get(..4) else {
        return Err((
            None,
            "binary frame shorter than its 4-byte header length".into(),
        ));
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_FRAME_HEADER_BYTES {
        return Err((
            None,
            format!(
                "binary frame header length {len} is over {MAX_FRAME_HEADER_BYTES} bytes \
                 (frame = 4-byte big-endian header length, JSON header, image bytes)"
            ),
        ));
    }
    let Some(header) = frame.get(4..4 + len) else {
        return Err((
            None,
            format!("binary frame ends inside its {len}-byte header"),
        ));
    };
    // Only a JSON object: serde alone would also read `["image","m-1/i1"]` (found by
    // `tests/fuzz.rs`).
    let parsed = if header.trim_ascii_start().starts_with(b"{") {
        serde_json::from_slice(header)
    } else {
        Err(serde::de::Error::custom("the header must be a JSON object"))
    };
    let header: ImageFrameHeader = parsed.map_err(|e| {
        (
            None,
            format!("binary frame header is not {{\"type\":\"image\",\"id\":\"<request id>/<image id>\"}}: {e}"),
        )
    })?;
    if header.kind != "image" {
        return Err((
            Some(header.id),
            format!("binary frame type `{}` (expected `image`)", header.kind),
        ));
    }
    if header.id.is_empty() || header.id.len() > 2 * MAX_ID_BYTES + 1 {
        return Err((
            None,
            format!(
                "binary frame `id` must be 1..={} bytes",
                2 * MAX_ID_BYTES + 1
            ),
        ));
    }
    Ok((header.id, frame.slice(4 + len..)))
}

/// Parses a text frame into a [`Request`]. Only a JSON object is a request: serde alone would
/// also read an array as a request with its fields in order (`["ping"]`), which the protocol
/// does not define (found by `tests/fuzz.rs`).
pub fn parse_request(text: &str) -> Result<Request, serde_json::Error> {
    if !text.trim_start().starts_with('{') {
        // Not JSON at all: the syntax error. JSON that is not an object: say so.
        serde_json::from_str::<serde::de::IgnoredAny>(text)?;
        return Err(serde::de::Error::custom("a request must be a JSON object"));
    }
    serde_json::from_str(text)
}

/// Minimal view of a frame used to address an error reply when full parsing fails.
#[derive(Debug, Default, Deserialize)]
pub struct Probe {
    /// The request id, if it is a string.
    #[serde(default, deserialize_with = "lenient_string")]
    pub id: Option<String>,
    /// The request type, if it is a string.
    #[serde(default, rename = "type", deserialize_with = "lenient_string")]
    pub kind: Option<String>,
}

fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(match v {
        serde_json::Value::String(s) if s.len() <= MAX_ID_BYTES => Some(s),
        _ => None,
    })
}

/// Final decision for a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Deliver the message.
    Allow,
    /// Deliver or hold for a human, per the IM server's rules.
    Review,
    /// Do not deliver.
    Block,
}

impl Action {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Review => "review",
            Action::Block => "block",
        }
    }
}

/// Where a label came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A wordlist match.
    Lexicon,
    /// A model score.
    Model,
    /// Sender behaviour (flood, active sanction).
    Behaviour,
    /// Perceptual-hash list.
    Hashlist,
    /// A policy's regex/wildcard rule (`[policy.NAME] rules`), matched on the original text.
    Rule,
}

/// One label with its score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelScore {
    /// Taxonomy label: `abuse`, `hate`, `sexual`, `profanity`, `threat`, `self_harm`, `scam`,
    /// `spam`, `sanction`, `other`; images: `porn`, `gore`.
    pub label: &'static str,
    /// Finer label (e.g. `insult`, `flood`), if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// 0..1; lexicon scores come from entry severity.
    pub score: f32,
    /// Which stage produced it.
    pub source: Source,
}

/// Per-image result in a verdict.
#[derive(Debug, Clone, Serialize)]
pub struct ImageVerdict {
    /// The caller's image id.
    pub id: String,
    /// Decision for this image.
    pub action: Action,
    /// Labels for this image.
    pub labels: Vec<LabelScore>,
    /// Why the image could not be judged, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The image's 64-bit perceptual hash (16 hex digits), for adding it to a hash list.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phash: Option<String>,
}

/// The `verdict` reply.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Always `"verdict"`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request's id.
    pub id: String,
    /// Overall decision.
    pub action: Action,
    /// Top label, if any label fired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<&'static str>,
    /// Score of the top label (0 when none).
    pub score: f32,
    /// Every label that fired, strongest first.
    pub labels: Vec<LabelScore>,
    /// Wordlist matches. `start`/`end` are UTF-8 byte offsets into the original text,
    /// `start_char`/`end_char` are char (Unicode scalar) offsets.
    pub matches: Vec<Match>,
    /// Per-image results.
    pub images: Vec<ImageVerdict>,
    /// The sender's state after this message.
    pub sender: SenderInfo,
    /// Stages that could not run (e.g. `text_model`); the verdict is still given.
    pub degraded: Vec<&'static str>,
    /// Time spent moderating, in microseconds.
    pub took_us: u64,
}

/// The `pong` reply.
#[derive(Debug, Serialize)]
pub struct Pong {
    /// Always `"pong"`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The ping's id, if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Error codes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request could not be parsed or is invalid.
    BadRequest,
    /// A field is over its limit.
    TooLarge,
    /// Too much in flight; retry later.
    Overloaded,
    /// Not allowed.
    Unauthorized,
    /// A bug or an unexpected failure on our side.
    Internal,
}

/// The `error` reply.
#[derive(Debug, Serialize)]
pub struct ErrorReply {
    /// Always `"error"`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request's id, when it could be read.
    pub id: Option<String>,
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
}

impl ErrorReply {
    /// Builds an error reply.
    pub fn new(id: Option<String>, code: ErrorCode, message: impl Into<String>) -> ErrorReply {
        ErrorReply {
            kind: "error",
            id,
            code,
            message: message.into(),
        }
    }
}

/// Events pushed to every connection of a tenant.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A sender's sanction changed.
    Sanction(Sanction),
    /// A room's rate of flagged messages crossed `behaviour.room_alarm_flagged`.
    RoomAlarm(RoomAlarm),
}

/// Serializes a reply; our own types always serialize.
pub fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| {
        // Only reachable if a Serialize impl above fails, which none can (no maps with non-string
        // keys, no custom serializers that error).
        tracing::error!(error = %e, "failed to serialize a reply");
        r#"{"type":"error","id":null,"code":"internal","message":"serialization failed"}"#
            .to_string()
    })
}
