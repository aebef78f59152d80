//! # Metrics
//!
//! Process-wide counters and latency histograms, updated lock-free on the hot path by the
//! server and the moderator, rendered in the Prometheus text format by the admin listener
//! ([`crate::server::admin`]).

use crate::policy::LABELS;
use crate::server::protocol::{Action, ErrorCode};
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Stages that can be reported as degraded.
pub const STAGES: &[&str] = &["text_model", "image_model", "shared_state"];

/// Upper bounds of the latency buckets, in microseconds.
const BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

/// A fixed-bucket latency histogram.
#[derive(Default)]
pub struct Histogram {
    /// Count per bucket of [`BUCKETS_US`], plus one for +Inf.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    /// Sum of observations in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in BUCKETS_US.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                *b as f64 / 1e6
            );
        }
        cumulative += self.buckets[BUCKETS_US.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Every metric chatguard exports.
#[derive(Default)]
pub struct Metrics {
    /// WebSocket connections open now.
    pub connections_open: AtomicI64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Handshakes refused (auth, path, capacity, timeout).
    pub handshakes_rejected: AtomicU64,
    /// Connections closed because the client stopped reading (`server.write_timeout_ms`).
    pub write_timeouts: AtomicU64,
    /// Verdicts by action (index: allow, review, block).
    verdicts: [AtomicU64; 3],
    /// Error replies by code.
    errors: [AtomicU64; 5],
    /// Labels that fired, by index in [`LABELS`].
    labels: [AtomicU64; LABELS.len()],
    /// Sanctions issued by action (index: throttle, mute, block).
    pub sanctions: [AtomicU64; 3],
    /// Degraded verdicts by index in [`STAGES`].
    degraded: [AtomicU64; STAGES.len()],
    /// Time to moderate one message (server side).
    pub moderate_latency: Histogram,
    /// Time spent in the text model stage (queue + batch).
    pub text_model_latency: Histogram,
    /// Config reloads by result (index: ok, error).
    pub reloads: [AtomicU64; 2],
    /// Duration of the last reload attempt (build + swap), in microseconds.
    pub last_reload_us: AtomicU64,
}

impl Metrics {
    /// Counts a verdict and its labels.
    pub fn verdict(&self, action: Action, labels: impl Iterator<Item = &'static str>) {
        self.verdicts[action as usize].fetch_add(1, Relaxed);
        for l in labels {
            if let Some(i) = LABELS.iter().position(|x| *x == l) {
                self.labels[i].fetch_add(1, Relaxed);
            }
        }
    }

    /// Counts an error reply.
    pub fn error(&self, code: ErrorCode) {
        self.errors[code as usize].fetch_add(1, Relaxed);
    }

    /// Counts a degraded stage.
    pub fn degraded(&self, stage: &str) {
        if let Some(i) = STAGES.iter().position(|x| *x == stage) {
            self.degraded[i].fetch_add(1, Relaxed);
        }
    }

    /// Renders every metric in the Prometheus text exposition format. `extra` is appended
    /// as-is (gauges owned by other components, e.g. the model batcher).
    pub fn render(&self, extra: &str) -> String {
        let mut out = String::with_capacity(4096);
        write_gauge(
            &mut out,
            "chatguard_connections_open",
            "WebSocket connections open now.",
            self.connections_open.load(Relaxed),
        );
        write_counter(
            &mut out,
            "chatguard_connections_total",
            "WebSocket connections accepted.",
            self.connections_total.load(Relaxed),
        );
        write_counter(
            &mut out,
            "chatguard_handshakes_rejected_total",
            "Handshakes refused (auth, path, capacity, timeout).",
            self.handshakes_rejected.load(Relaxed),
        );
        write_counter(
            &mut out,
            "chatguard_write_timeouts_total",
            "Connections closed because the client stopped reading its replies.",
            self.write_timeouts.load(Relaxed),
        );
        let actions = ["allow", "review", "block"];
        write_labelled(
            &mut out,
            "chatguard_verdicts_total",
            "Verdicts by action.",
            "action",
            actions
                .iter()
                .zip(&self.verdicts)
                .map(|(k, v)| (*k, v.load(Relaxed))),
        );
        let codes = [
            "bad_request",
            "too_large",
            "overloaded",
            "unauthorized",
            "internal",
        ];
        write_labelled(
            &mut out,
            "chatguard_errors_total",
            "Error replies by code.",
            "code",
            codes
                .iter()
                .zip(&self.errors)
                .map(|(k, v)| (*k, v.load(Relaxed))),
        );
        write_labelled(
            &mut out,
            "chatguard_labels_total",
            "Labels that fired, by label.",
            "label",
            LABELS
                .iter()
                .zip(&self.labels)
                .map(|(k, v)| (*k, v.load(Relaxed))),
        );
        write_labelled(
            &mut out,
            "chatguard_sanctions_total",
            "Sanctions issued, by action.",
            "action",
            ["throttle", "mute", "block"]
                .iter()
                .zip(&self.sanctions)
                .map(|(k, v)| (*k, v.load(Relaxed))),
        );
        write_labelled(
            &mut out,
            "chatguard_degraded_total",
            "Verdicts given without a stage, by stage.",
            "stage",
            STAGES
                .iter()
                .zip(&self.degraded)
                .map(|(k, v)| (*k, v.load(Relaxed))),
        );
        write_labelled(
            &mut out,
            "chatguard_reloads_total",
            "Config reloads (SIGHUP, file change), by result.",
            "result",
            ["ok", "error"]
                .iter()
                .zip(&self.reloads)
                .map(|(k, v)| (*k, v.load(Relaxed))),
        );
        let _ = writeln!(
            out,
            "# HELP chatguard_reload_last_seconds Duration of the last config reload attempt.\n\
             # TYPE chatguard_reload_last_seconds gauge\nchatguard_reload_last_seconds {}",
            self.last_reload_us.load(Relaxed) as f64 / 1e6
        );
        self.moderate_latency.render(
            &mut out,
            "chatguard_moderate_seconds",
            "Time to moderate one message.",
        );
        self.text_model_latency.render(
            &mut out,
            "chatguard_text_model_seconds",
            "Time in the text model stage (queue + batch) per message.",
        );
        out.push_str(extra);
        out
    }
}

/// Writes one counter (HELP, TYPE and value lines) in the Prometheus text format.
pub fn write_counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

/// Writes one gauge in the Prometheus text format.
pub fn write_gauge(out: &mut String, name: &str, help: &str, v: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

/// Writes a counter with one label `key`, a line per (label value, count).
pub fn write_labelled<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    key: &str,
    pairs: impl IntoIterator<Item = (&'a str, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (k, v) in pairs {
        let _ = writeln!(out, "{name}{{{key}=\"{k}\"}} {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_histogram() {
        let m = Metrics::default();
        m.verdict(Action::Block, ["abuse", "profanity"].into_iter());
        m.verdict(Action::Allow, std::iter::empty());
        m.error(ErrorCode::Overloaded);
        m.moderate_latency.observe(Duration::from_micros(40));
        m.moderate_latency.observe(Duration::from_micros(700));
        let text = m.render("");
        assert!(text.contains("chatguard_verdicts_total{action=\"block\"} 1"));
        assert!(text.contains("chatguard_verdicts_total{action=\"allow\"} 1"));
        assert!(text.contains("chatguard_labels_total{label=\"abuse\"} 1"));
        assert!(text.contains("chatguard_errors_total{code=\"overloaded\"} 1"));
        assert!(text.contains("chatguard_moderate_seconds_bucket{le=\"0.00005\"} 1"));
        assert!(text.contains("chatguard_moderate_seconds_bucket{le=\"0.001\"} 2"));
        assert!(text.contains("chatguard_moderate_seconds_count 2"));
    }
}
