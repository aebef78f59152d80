//! Behaviour tracker: the per-message cost (`precheck` + `record`) over 100k distinct users on
//! the memory backend, and the memory each tracked user costs (1M synthetic users, RSS from
//! `/proc/self/statm`).
//!
//! `cargo bench --bench behaviour -- --warm-up-time 1 --measurement-time 3`

use chatguard::behaviour::{BehaviourConfig, Outcome, Tracker};
use criterion::{Criterion, Throughput};
use std::fmt::Write as _;
use std::hint::black_box;

/// Distinct senders in the per-message benchmarks.
const USERS: usize = 100_000;
/// Senders in the memory measurement.
const MEMORY_USERS: usize = 1_000_000;
const TENANT: &str = "tenant-1";

fn user_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user-{i:08}")).collect()
}

/// The outcome of message `i` in the mixed workload: 1 in 16 held for review, 1 in 64 blocked.
fn mixed_outcome(i: usize) -> Outcome {
    if i.is_multiple_of(64) {
        Outcome::Block { severity: 0.6 }
    } else if i.is_multiple_of(16) {
        Outcome::Review { severity: 0.3 }
    } else {
        Outcome::Allow
    }
}

fn per_message(c: &mut Criterion) {
    let users = user_names(USERS);
    let mut group = c.benchmark_group("behaviour");
    group.throughput(Throughput::Elements(1));

    for (name, outcome_of) in [
        (
            "precheck+record/allow/100k_users",
            (|_| Outcome::Allow) as fn(usize) -> Outcome,
        ),
        ("precheck+record/mixed/100k_users", mixed_outcome),
    ] {
        let tracker = Tracker::new(BehaviourConfig::default());
        for user in &users {
            tracker.precheck(TENANT, user);
        }
        let mut i = 0usize;
        group.bench_function(name, |b| {
            b.iter(|| {
                // A large odd stride walks all users in an order unrelated to insertion.
                let user = &users[i.wrapping_mul(7919) % USERS];
                let pre = tracker.precheck(TENANT, user);
                let recorded = tracker.record(TENANT, user, outcome_of(i));
                i = i.wrapping_add(1);
                black_box((pre, recorded))
            })
        });
    }

    let tracker = Tracker::new(BehaviourConfig::default());
    for user in &users {
        tracker.precheck(TENANT, user);
    }
    let mut i = 0usize;
    group.bench_function("sender/100k_users", |b| {
        b.iter(|| {
            let user = &users[i.wrapping_mul(7919) % USERS];
            i = i.wrapping_add(1);
            black_box(tracker.sender(TENANT, user))
        })
    });
    group.finish();
}

/// Resident set size in bytes (statm counts 4 KiB pages on x86-64 Linux).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Tracks 1M users (one message and one outcome each, 1 in 64 a violation) and prints the RSS
/// growth per tracked user. The cap is raised so that no shard sweeps during the measurement.
fn memory_per_user() {
    let cfg = BehaviourConfig {
        max_tracked_users: 2 * MEMORY_USERS,
        ..BehaviourConfig::default()
    };
    let Some(before) = rss_bytes() else {
        println!("behaviour/memory: /proc/self/statm unavailable, skipped");
        return;
    };
    let tracker = Tracker::new(cfg);
    let mut name = String::with_capacity(32);
    let started = std::time::Instant::now();
    for i in 0..MEMORY_USERS {
        name.clear();
        let _ = write!(name, "user-{i:08}");
        tracker.precheck(TENANT, &name);
        tracker.record(TENANT, &name, mixed_outcome(i));
    }
    let elapsed = started.elapsed();
    let after = rss_bytes().unwrap_or(before);
    let tracked = tracker.tracked_users();
    println!(
        "behaviour/memory: {tracked} users tracked, RSS +{:.1} MiB = {:.0} bytes/user \
         (filled in {:.2} s, {:.0} ns per new user)",
        after.saturating_sub(before) as f64 / (1 << 20) as f64,
        after.saturating_sub(before) as f64 / tracked.max(1) as f64,
        elapsed.as_secs_f64(),
        elapsed.as_nanos() as f64 / MEMORY_USERS as f64,
    );
    let started = std::time::Instant::now();
    tracker.maintain();
    println!(
        "behaviour/maintain: {:.1} ms for {} users (none idle)",
        started.elapsed().as_secs_f64() * 1e3,
        tracker.tracked_users()
    );
}

fn main() {
    // `cargo test --benches` runs this binary without `--bench`: skip the slow measurement.
    if std::env::args().any(|a| a == "--bench") {
        memory_per_user();
    }
    let mut criterion = Criterion::default().configure_from_args();
    per_message(&mut criterion);
    criterion.final_summary();
}
