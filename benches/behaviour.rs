//! Behaviour tracker: the per-message cost (`precheck_message` + `record_message`, with a room,
//! a target and a text fingerprint) over 100k distinct users on the memory backend, the cost of
//! the fingerprint itself, the memory each tracked user costs (1M synthetic users, RSS from
//! `/proc/self/statm`), and the Redis backend's write-behind throughput (pipelined) against
//! `CHATGUARD_TEST_REDIS_URL`, or a `redis-server` from `PATH` started on a free port.
//!
//! `cargo bench --bench behaviour -- --warm-up-time 1 --measurement-time 3`

use chatguard::behaviour::{BehaviourConfig, MessageFacts, Outcome, StoreKind, TextPrint, Tracker};
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

    // Every signal on: a text fingerprint (duplicates, raids), a room, a target (harassment).
    let tracker = Tracker::new(BehaviourConfig::default());
    let texts: Vec<String> = (0..1024)
        .map(|i| format!("message number {i} about the game last night, see you all later"))
        .collect();
    let prints: Vec<Option<TextPrint>> = texts.iter().map(|t| tracker.fingerprint(t)).collect();
    let rooms: Vec<String> = (0..1000).map(|i| format!("room-{i}")).collect();
    for user in &users {
        tracker.precheck(TENANT, user);
    }
    let mut i = 0usize;
    group.bench_function("precheck+record/all_signals/mixed/100k_users", |b| {
        b.iter(|| {
            let user = &users[i.wrapping_mul(7919) % USERS];
            let facts = MessageFacts {
                user,
                room: Some(&rooms[i % rooms.len()]),
                to: Some(&users[i.wrapping_mul(104_729) % USERS]),
                text: &texts[i % texts.len()],
                print: prints[i % prints.len()],
            };
            let pre = tracker.precheck_message(TENANT, &facts);
            let recorded = tracker.record_message(TENANT, &facts, mixed_outcome(i));
            i = i.wrapping_add(1);
            black_box((pre, recorded))
        })
    });
    let mut i = 0usize;
    group.bench_function("fingerprint/64_bytes", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(tracker.fingerprint(&texts[i % texts.len()]))
        })
    });

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
    let print = tracker.fingerprint("the same greeting from everyone, hello hello");
    let started = std::time::Instant::now();
    for i in 0..MEMORY_USERS {
        name.clear();
        let _ = write!(name, "user-{i:08}");
        let facts = MessageFacts {
            user: &name,
            print,
            ..MessageFacts::default()
        };
        tracker.precheck_message(TENANT, &facts);
        tracker.record_message(TENANT, &facts, mixed_outcome(i));
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

/// A `redis-server` child on a free port, killed on drop.
struct OwnRedis(std::process::Child);

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Redis to measure against: `CHATGUARD_TEST_REDIS_URL`, else a `redis-server` from `PATH`.
fn bench_redis() -> Option<(String, Option<OwnRedis>)> {
    if let Ok(url) = std::env::var("CHATGUARD_TEST_REDIS_URL")
        && !url.is_empty()
    {
        return Some((url, None));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .ok()?
        .port();
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let guard = OwnRedis(child);
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((format!("redis://127.0.0.1:{port}/"), Some(guard)));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    None
}

/// Writes 60k violations of 20k users through the Redis backend and reports how fast the
/// write-behind task applies them (pipelined batches of compare-and-set scripts), and what a
/// violation costs the caller meanwhile.
fn redis_throughput() {
    let Some((url, _guard)) = bench_redis() else {
        println!(
            "behaviour/redis: no CHATGUARD_TEST_REDIS_URL and no redis-server on PATH, skipped"
        );
        return;
    };
    let Ok(rt) = tokio::runtime::Runtime::new() else {
        println!("behaviour/redis: no tokio runtime, skipped");
        return;
    };
    rt.block_on(async {
        let cfg = BehaviourConfig {
            store: StoreKind::Redis,
            redis_url: url.clone(),
            redis_key_prefix: format!("cgbench-{}", std::process::id()),
            ..BehaviourConfig::default()
        };
        let Ok((tracker, _events)) = Tracker::open(cfg).await else {
            println!("behaviour/redis: cannot open the tracker, skipped");
            return;
        };
        for _ in 0..500 {
            if !tracker.degraded() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if tracker.degraded() {
            println!("behaviour/redis: {url} unreachable, skipped");
            return;
        }
        // Fewer than the backend's queue (65,536), so that none is dropped while the task
        // catches up.
        const VIOLATIONS: usize = 60_000;
        const USERS: usize = 20_000;
        let users = user_names(USERS);
        let started = std::time::Instant::now();
        for j in 0..VIOLATIONS {
            tracker.record(TENANT, &users[j % USERS], Outcome::Review { severity: 0.1 });
        }
        let local = started.elapsed();
        tracker.sync().await;
        let elapsed = started.elapsed();
        println!(
            "behaviour/redis: {VIOLATIONS} violations of {USERS} users applied to Redis in              {:.2} s = {:.0} violations/s (pipelined, up to 512 per batch); the caller paid              {:.0} ns per violation",
            elapsed.as_secs_f64(),
            VIOLATIONS as f64 / elapsed.as_secs_f64(),
            local.as_nanos() as f64 / VIOLATIONS as f64,
        );
        tracker.shutdown().await;
    });
}

fn main() {
    // `cargo test --benches` runs this binary without `--bench`: skip the slow measurements.
    if std::env::args().any(|a| a == "--bench") {
        memory_per_user();
        redis_throughput();
    }
    let mut criterion = Criterion::default().configure_from_args();
    per_message(&mut criterion);
    criterion.final_summary();
}
