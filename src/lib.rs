//! # chatguard
//!
//! A content-moderation sidecar for instant-messaging servers: an IM server sends every chat
//! message over a WebSocket and gets a verdict (`allow | review | block`) back inline, while
//! chatguard tracks each sender and pushes sanctions.
//!
//! # Layout
//! - [`config`]: TOML + environment → validated [`config::Config`].
//! - [`server`]: listener, connections, wire protocol ([`server::protocol`]).
//! - [`moderator`]: runs the stages for one message and assembles the verdict.
//! - [`text`]: normalization and the keyword automaton.
//! - [`image`]: safe image decoding, perceptual-hash lists and the image model.
//! - [`policy`]: signals + tenant policy → action, labels, score.
//! - [`behaviour`]: per-sender flood limits, abuse scores and sanctions.
//! - [`metrics`]: counters and histograms for the admin `/metrics` endpoint.
//! - [`reload`]: hot reload of tokens, wordlists, policies and hash lists (SIGHUP, file change).
//! - [`lookup`]: recent verdicts by (tenant, message id) for `lookup` requests (memory + Redis).
//! - [`webhook`]: POSTs pushed `sanction`/`room_alarm` events to an HTTP endpoint.
//! - [`scan`]: `chatguard scan DIR`: moderates a folder of images and text files into a JSONL report.
#![forbid(unsafe_code)]

pub mod behaviour;
pub mod config;
pub mod eval;
pub mod image;
pub mod infer;
pub mod lookup;
pub mod metrics;
pub mod moderator;
pub mod policy;
pub mod reload;
pub mod scan;
pub mod server;
pub mod text;
pub mod webhook;
