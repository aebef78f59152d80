//! Text-model throughput and latency: the dynamic batcher under many concurrent requesters vs the
//! ONNX sessions called directly with fixed batches.
//!
//! ```text
//! cargo bench --bench model                      # 10k messages
//! cargo bench --bench model -- --quick           # 2k messages
//! cargo bench --bench model -- --messages 5000 --concurrency 128 --intra-threads 2 --workers 1 --batch 16
//! cargo bench --bench model -- --rounds 5        # Rust/Python rounds (default 3)
//! cargo bench --bench model -- --python-procs 2 --python-threads 1   # Python as 2 worker processes
//! ```
//! Needs `make models`. Prints msgs/s and p50/p99 latency for: lone requests through the batcher,
//! the batcher under `--concurrency` closed-loop requesters, and the direct fixed-batch path
//! (raw: pre-tokenized, arrival order; direct: `classify_batch_blocking`, length-sorted), then the
//! batcher/raw ratio. Then, in the same run, the Python peer `models/scripts/py_text_bench.py`
//! (batched onnxruntime + tokenizers on the same ONNX files and messages; needs the venv of
//! `make models`, `PY_TEXT_BENCH=0` skips it) and the Rust/Python ratio: `--rounds` rounds, each a
//! fresh batcher pass right before a Python arrival-order pass, so that a machine whose speed
//! drifts (a shared VM) affects both sides of each round's ratio alike; the median is reported.
//! The Python side is one process whose sessions use every core (`--python-threads`, default the
//! CPU count) — how such a service usually runs; `--python-procs N` runs N such processes at once
//! (a service with N worker processes, like the Rust side's `workers`) and counts them together.

#[path = "support/stats.rs"]
mod stats;
use stats::median;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chatguard::text::classifier::{TextClassifier, TextModelConfig};

/// Command-line knobs.
struct Args {
    /// Messages per phase.
    messages: usize,
    /// Concurrent requesters in the batcher phase.
    concurrency: usize,
    /// ONNX Runtime intra-op threads per session.
    intra_threads: usize,
    /// Model threads (each with its own sessions).
    workers: usize,
    /// ONNX Runtime intra-op threads of each Python peer process's sessions.
    python_threads: usize,
    /// Python peer processes (a service run with several worker processes).
    python_procs: usize,
    /// Batch size of the direct path (and the batcher's max batch size).
    batch: usize,
    /// Rounds of (Rust batcher pass, Python arrival-order pass) for the ratio.
    rounds: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        messages: 10_000,
        concurrency: 64,
        intra_threads: TextModelConfig::default().intra_threads,
        workers: TextModelConfig::default().workers,
        python_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        python_procs: 1,
        batch: 32,
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match arg.as_str() {
            "--quick" => args.messages = 2_000,
            "--messages" => args.messages = value("--messages"),
            "--concurrency" => args.concurrency = value("--concurrency"),
            "--intra-threads" => args.intra_threads = value("--intra-threads"),
            "--workers" => args.workers = value("--workers"),
            "--python-threads" => args.python_threads = value("--python-threads"),
            "--python-procs" => args.python_procs = value("--python-procs"),
            "--batch" => args.batch = value("--batch"),
            "--rounds" => args.rounds = value("--rounds").max(1),
            _ => {} // `--bench` and other harness flags
        }
    }
    args
}

/// Deterministic, chat-like messages: mostly short and benign, some rude, a few long.
fn chat_messages(n: usize) -> Vec<String> {
    const OPENERS: &[&str] = &[
        "", "hey", "lol", "ok", "guys", "omg", "yo", "hmm", "well", "bro",
    ];
    const BODIES: &[&str] = &[
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
        "you are the worst player I have ever seen",
        "shut up nobody asked you",
        "uninstall the game you absolute idiot",
        "nobody would miss you if you disappeared",
        "I will find you and hurt you",
        "have a great day everyone",
        "the meeting moved to 3pm, see you there",
        "did you see the match last night? the second half was unbelievable and the keeper saved everything",
        "happy birthday!! hope you have an amazing year",
        "stop spamming the chat please",
    ];
    const CLOSERS: &[&str] = &["", "", "", "!", "?", " :)", " lmao", " pls", " xD", " ..."];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move |m: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % m as u64) as usize
    };
    (0..n)
        .map(|_| {
            let mut msg = String::new();
            let opener = OPENERS[next(OPENERS.len())];
            if !opener.is_empty() {
                msg.push_str(opener);
                msg.push(' ');
            }
            msg.push_str(BODIES[next(BODIES.len())]);
            if next(8) == 0 {
                msg.push_str(", and also ");
                msg.push_str(BODIES[next(BODIES.len())]);
            }
            msg.push_str(CLOSERS[next(CLOSERS.len())]);
            msg
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let args = parse_args();
    let cfg = TextModelConfig {
        intra_threads: args.intra_threads,
        workers: args.workers,
        max_batch_size: args.batch,
        // The default (32 × 64) scaled to --batch.
        max_batch_tokens: args.batch * 64,
        queue_capacity: args.concurrency.max(1) * 2,
        // Measure throughput, not the deadline.
        queue_timeout_ms: 600_000,
        ..TextModelConfig::default()
    };
    let classifier = TextClassifier::load(&cfg)
        .unwrap_or_else(|e| panic!("cannot load the text model ({e}); run `make models` first"));
    let messages = Arc::new(chat_messages(args.messages));
    let refs: Vec<&str> = messages.iter().map(String::as_str).collect();
    println!(
        "text model bench: {} messages, concurrency {}, batch {}, {} workers × {} intra-op \
         threads (python: {} process(es) × {} intra-op threads), {} CPUs",
        args.messages,
        args.concurrency,
        args.batch,
        args.workers,
        args.intra_threads,
        args.python_procs,
        args.python_threads,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // Warm-up (session allocations, caches).
    classifier
        .classify_batch_blocking(&refs[..args.batch.min(refs.len())])
        .unwrap_or_else(|e| panic!("warm-up failed: {e}"));

    // Direct path: fixed batches, tokenization included and pre-tokenized (raw sessions + head).
    let started = Instant::now();
    let direct_scores = classifier
        .classify_batch_blocking(&refs)
        .unwrap_or_else(|e| panic!("direct run failed: {e}"));
    let direct = args.messages as f64 / started.elapsed().as_secs_f64();
    let mean_insult = direct_scores
        .iter()
        .map(|s| f64::from(s.insult))
        .sum::<f64>()
        / refs.len().max(1) as f64;
    let items = classifier
        .tokenize_blocking(&refs)
        .unwrap_or_else(|e| panic!("tokenize failed: {e}"));
    let started = Instant::now();
    classifier
        .run_tokenized_blocking(&items)
        .unwrap_or_else(|e| panic!("raw run failed: {e}"));
    let raw = args.messages as f64 / started.elapsed().as_secs_f64();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"));

    // Lone requests: one at a time through the batcher (no batching delay expected).
    let lone_n = (args.messages / 20).clamp(50, 300);
    let lone = runtime.block_on({
        let classifier = classifier.clone();
        let messages = messages.clone();
        async move {
            let mut lat = Vec::with_capacity(lone_n);
            for msg in messages.iter().take(lone_n) {
                let t = Instant::now();
                classifier
                    .classify(msg)
                    .await
                    .unwrap_or_else(|e| panic!("classify failed: {e}"));
                lat.push(t.elapsed());
            }
            lat
        }
    });

    // Concurrent closed-loop requesters through the batcher.
    let first = batcher_pass(&runtime, &classifier, &messages, args.concurrency);
    let mut lone = lone;
    lone.sort_unstable();
    let batched = first.rate;
    let latencies = first.latencies;

    println!(
        "lone requests (batcher, 1 in flight): n={} p50={:.2} ms p99={:.2} ms",
        lone.len(),
        ms(percentile(&lone, 0.5)),
        ms(percentile(&lone, 0.99))
    );
    println!(
        "batcher, {} requesters:              {:.0} msgs/s  p50={:.1} ms p99={:.1} ms  mean batch {:.1} ({} batches)",
        args.concurrency,
        batched,
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        first.mean_batch,
        first.batches
    );
    println!(
        "direct, length-sorted batches of {} (tokenize+run, eval path): {direct:.0} msgs/s",
        args.batch
    );
    println!(
        "raw sessions fixed batches of {} (pre-tokenized): {raw:.0} msgs/s",
        args.batch
    );
    println!(
        "ratio batcher/raw = {:.0}%   batcher/direct = {:.0}%",
        100.0 * batched / raw,
        100.0 * batched / direct
    );
    let mut rust_pass = || batcher_pass(&runtime, &classifier, &messages, args.concurrency).rate;
    python_peer(&messages, &args, &mut rust_pass, direct, mean_insult);
}

/// One batcher pass's figures.
struct Pass {
    /// Messages per second.
    rate: f64,
    /// Per-request latency, sorted.
    latencies: Vec<Duration>,
    /// Mean batch size.
    mean_batch: f64,
    /// Model runs.
    batches: u64,
}

/// Sends every message through the batcher from `concurrency` closed-loop requesters.
fn batcher_pass(
    runtime: &tokio::runtime::Runtime,
    classifier: &TextClassifier,
    messages: &Arc<Vec<String>>,
    concurrency: usize,
) -> Pass {
    let before = classifier.stats();
    let started = Instant::now();
    let mut latencies = runtime.block_on({
        let classifier = classifier.clone();
        let messages = messages.clone();
        async move {
            let next = Arc::new(AtomicUsize::new(0));
            let tasks: Vec<_> = (0..concurrency.max(1))
                .map(|_| {
                    let (classifier, messages, next) =
                        (classifier.clone(), messages.clone(), next.clone());
                    tokio::spawn(async move {
                        let mut lat = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(msg) = messages.get(i) else { break };
                            let t = Instant::now();
                            classifier
                                .classify(msg)
                                .await
                                .unwrap_or_else(|e| panic!("classify failed: {e}"));
                            lat.push(t.elapsed());
                        }
                        lat
                    })
                })
                .collect();
            let mut all = Vec::new();
            for task in tasks {
                all.extend(task.await.unwrap_or_else(|e| panic!("requester task: {e}")));
            }
            all
        }
    });
    let elapsed = started.elapsed();
    let after = classifier.stats();
    latencies.sort_unstable();
    let batches = after.batches - before.batches;
    let items = after.batched_items - before.batched_items;
    Pass {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        latencies,
        mean_batch: items as f64 / batches.max(1) as f64,
        batches,
    }
}

/// One Python peer process, talked to over its stdin/stdout.
struct PyProc {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl PyProc {
    /// Echoes the process's lines up to (and including) the first that starts with `prefix`.
    fn until(&mut self, prefix: &str) -> Option<String> {
        for line in self.lines.by_ref() {
            let line = line.ok()?;
            println!("{line}");
            if line.starts_with(prefix) {
                return Some(line);
            }
        }
        None
    }

    /// Sends one command line.
    fn ask(&mut self, command: &str) -> bool {
        use std::io::Write;
        writeln!(self.stdin, "{command}")
            .and_then(|()| self.stdin.flush())
            .is_ok()
    }
}

/// `key=value` from a peer's result line.
fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Asks every process for `command`, waits for each one's `prefix` line, and returns the
/// throughput of all of them together: each scores all the messages at the same time, so the
/// pool finishes `procs × messages` when its slowest process finishes (`procs × slowest rate`).
/// Also the first process's mean insult score. `None` when a process does not answer.
fn pool_rate(procs: &mut [PyProc], command: &str, prefix: &str) -> Option<(f64, Option<f64>)> {
    if !procs.iter_mut().all(|p| p.ask(command)) {
        return None;
    }
    let mut slowest = f64::INFINITY;
    let mut insult = None;
    for p in procs.iter_mut() {
        let line = p.until(prefix)?;
        slowest = slowest.min(field(&line, "msgs_per_s")?);
        insult = insult.or(field(&line, "mean_insult"));
    }
    Some((procs.len() as f64 * slowest, insult))
}

/// The peer: `models/scripts/py_text_bench.py` (onnxruntime + tokenizers, same ONNX files, the
/// same messages), `--python-procs` processes of `--python-threads` intra-op threads each, run
/// with the venv `make models` creates. After their warm-up and calibration, `args.rounds`
/// rounds of one `rust_pass` then one Python arrival-order pass (what a service batching
/// whatever has queued gets; all processes at once, each scoring every message); then Python's
/// offline best case (length-sorted, best batch). Prints each round, the median ratio and the
/// scores. Skipped when the venv is missing or `PY_TEXT_BENCH=0`.
fn python_peer(
    messages: &[String],
    args: &Args,
    rust_pass: &mut dyn FnMut() -> f64,
    direct: f64,
    mean_insult: f64,
) {
    use std::io::BufRead;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/models-venv/bin/python");
    let script = root.join("models/scripts/py_text_bench.py");
    if std::env::var("PY_TEXT_BENCH").is_ok_and(|v| v == "0") || !python.exists() {
        println!(
            "python peer: skipped (no target/models-venv: run `make models`; or PY_TEXT_BENCH=0)"
        );
        return;
    }
    let input =
        std::env::temp_dir().join(format!("chatguard-textbench-{}.txt", std::process::id()));
    if let Err(e) = std::fs::write(&input, messages.join("\n")) {
        println!("python peer: cannot write {}: {e}", input.display());
        return;
    }
    let mut procs = Vec::new();
    for _ in 0..args.python_procs.max(1) {
        let child = std::process::Command::new(&python)
            .arg(&script)
            .arg("--input")
            .arg(&input)
            .arg("--threads")
            .arg(args.python_threads.to_string())
            .arg("--arrival-batch")
            .arg(args.batch.to_string())
            .arg("--interleave")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn();
        match child {
            Ok(mut child) => {
                let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                    unreachable!("both piped");
                };
                let lines = std::io::BufReader::new(stdout).lines();
                procs.push(PyProc {
                    child,
                    stdin,
                    lines,
                });
            }
            Err(e) => {
                println!("python peer: cannot run {}: {e}", python.display());
                break;
            }
        }
    }
    let result = if procs.len() == args.python_procs.max(1) {
        python_rounds(&mut procs, args, rust_pass, direct, mean_insult)
    } else {
        Err("not every process started".into())
    };
    for mut p in procs {
        drop(p.stdin);
        match p.child.wait() {
            Ok(s) if s.success() => {}
            other => println!("python peer: {} ended with {other:?}", script.display()),
        }
    }
    let _ = std::fs::remove_file(&input);
    if let Err(e) = result {
        println!("python peer: {e}");
    }
}

/// The rounds and the summary of [`python_peer`], once its processes run.
fn python_rounds(
    procs: &mut [PyProc],
    args: &Args,
    rust_pass: &mut dyn FnMut() -> f64,
    direct: f64,
    mean_insult: f64,
) -> Result<(), String> {
    for p in procs.iter_mut() {
        p.until("PYTEXT_READY")
            .ok_or("a process ended before PYTEXT_READY")?;
    }
    let (mut rust_rates, mut ratios) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let rust = rust_pass();
        let (py, _) = pool_rate(procs, "arrival", "PYTEXT_ARRIVAL ")
            .ok_or(format!("no PYTEXT_ARRIVAL rate in round {round}"))?;
        println!(
            "round {round}: rust batcher {rust:.0} msgs/s, python arrival-order {py:.0} msgs/s: \
             {:.2}x",
            rust / py
        );
        rust_rates.push(rust);
        ratios.push(rust / py);
    }
    let best = pool_rate(procs, "done", "PYTEXT ");
    let batched = median(&mut rust_rates);
    let setup = format!(
        "python {} process(es) × {} intra-op threads; rust {} workers × {}",
        procs.len(),
        args.python_threads,
        args.workers,
        args.intra_threads
    );
    println!(
        "text model vs python, arrival-order batches of {} (as a service batches), {} rounds, \
         {setup}: median {:.2}x (rounds: {})",
        args.batch,
        args.rounds,
        median(&mut ratios.clone()),
        ratios
            .iter()
            .map(|r| format!("{r:.2}x"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (py, py_insult) = best.ok_or("no PYTEXT rate in its output")?;
    println!(
        "text model vs python (onnxruntime+tokenizers, length-sorted, best batch, {setup}): rust \
         batcher (median of the rounds) {batched:.0} msgs/s ({:.2}x), rust direct {direct:.0} \
         msgs/s ({:.2}x), python {py:.0} msgs/s; mean insult score rust {mean_insult:.5} \
         python {}",
        batched / py,
        direct / py,
        py_insult.map_or("?".to_string(), |v| format!("{v:.5}"))
    );
    Ok(())
}
