//! chatguard's text stage against a peer, the `rustrict` crate, on the same lines, in the same
//! run, on the same machine.
//!
//! Speed: MB/s of original text over the chat corpus (`tests/data/text/chat_corpus.txt`, ~4000
//! messages of 10–200 bytes, ~15% abusive, some emoji/CJK/unicode), one core:
//! - chatguard: normalization + lexicon (`Lexicon::embedded()`, `scan_into` with a reused
//!   `Scratch`), the work done per message before the policy;
//! - rustrict: `CensorStr::is_inappropriate` and `Censor::from_str(s).analyze()` (the same
//!   analysis, measured both ways).
//!
//! The systems run interleaved (round 1: A, B, C; round 2: A, B, C; ...) and each process takes
//! the median of its rounds, so a burst of load from other processes hits both alike. Speeds
//! swing by a few percent from one process to the next (each is one draw of the code and heap
//! layout; rustrict's swing more than chatguard's), so the comparison runs in `PEERS_PROCS`
//! fresh processes (default 3), one after another; the table shows the medians, each ratio
//! taken within its process, and the line under it every process's ratio.
//!
//! Accuracy, so speed is not bought with misses: recall on abusive lines and false-positive rate
//! on clean lines, for three labelled sets:
//! - `peer_labelled.txt`: hand-written chat lines NOT derived from chatguard's wordlists (the
//!   fairest comparison);
//! - the fixtures (`positive.txt` vs `negative.txt` + `safe.txt`): written to test chatguard's
//!   wordlists, so they favour chatguard; also split by category;
//! - the chat corpus's own `abusive`/`clean` labels (generated from the same fixtures).
//!
//! chatguard "flags" a line when the default policy's content action (lexicon only, no model)
//! is `review` or `block` (also shown: any wordlist match at all, low severity included);
//! rustrict flags it when `is_inappropriate` is true.
//!
//! Run: `cargo bench --bench peers` (about 12–30 s; `PEERS_ROUNDS=N` sets the rounds, default 7;
//! `PEERS_PROCS=N` the processes, default 3, 1 to measure in this process;
//! `PEERS_VERBOSE=1` lists the hand-written lines either system gets wrong, on stderr).
//! Prints a markdown table.

#[path = "support/stats.rs"]
mod stats;
use stats::median;

use chatguard::policy::{Policy, Signals};
use chatguard::server::protocol::Action;
use chatguard::text::lexicon::{Lexicon, Scratch};
use rustrict::{Censor, CensorStr, Type};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CORPUS: &str = include_str!("../tests/data/text/chat_corpus.txt");
const PEER_LABELLED: &str = include_str!("../tests/data/text/peer_labelled.txt");
const POSITIVE: &str = include_str!("../tests/data/text/positive.txt");
const NEGATIVE: &str = include_str!("../tests/data/text/negative.txt");
const SAFE: &str = include_str!("../tests/data/text/safe.txt");

/// Minimum time of one timed sample; short systems repeat the corpus until they reach it.
const MIN_SAMPLE: Duration = Duration::from_millis(150);

/// Non-blank, non-comment lines.
fn lines(file: &'static str) -> impl Iterator<Item = &'static str> {
    file.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
}

/// `LABEL<TAB>text` lines as (label, text).
fn tabbed(file: &'static str) -> Vec<(&'static str, &'static str)> {
    lines(file).filter_map(|l| l.split_once('\t')).collect()
}

/// One labelled set: abusive and clean lines, plus a category per abusive line when known.
struct Labelled {
    name: &'static str,
    abusive: Vec<(&'static str, &'static str)>,
    clean: Vec<&'static str>,
}

fn labelled_sets() -> Vec<Labelled> {
    let split = |name, file| {
        let rows = tabbed(file);
        Labelled {
            name,
            abusive: rows
                .iter()
                .filter(|(l, _)| *l == "abusive")
                .map(|(_, t)| ("abusive", *t))
                .collect(),
            clean: rows
                .iter()
                .filter(|(l, _)| *l == "clean")
                .map(|(_, t)| *t)
                .collect(),
        }
    };
    vec![
        split(
            "hand-written, independent (peer_labelled.txt)",
            PEER_LABELLED,
        ),
        Labelled {
            name: "chatguard fixtures (positive vs negative+safe)",
            abusive: tabbed(POSITIVE),
            clean: lines(NEGATIVE).chain(lines(SAFE)).collect(),
        },
        split("chat corpus labels (chat_corpus.txt)", CORPUS),
    ]
}

/// Both systems' decisions for one line.
struct Chatguard {
    lexicon: Lexicon,
    policy: Policy,
    scratch: Scratch,
    out: Vec<chatguard::text::Match>,
}

impl Chatguard {
    /// [policy says review/block, any wordlist match, rustrict `is_inappropriate`].
    fn flags(&mut self, text: &str) -> [bool; 3] {
        self.lexicon
            .scan_into(text, &mut self.scratch, &mut self.out);
        let signals = Signals {
            matches: &self.out,
            ..Default::default()
        };
        let policy = self.policy.decide(&signals).content_action != Action::Allow;
        [policy, !self.out.is_empty(), text.is_inappropriate()]
    }
}

/// Times `pass` (one pass over the corpus) repeated until [`MIN_SAMPLE`]; returns MB/s.
fn sample(corpus_bytes: usize, mut pass: impl FnMut() -> usize) -> f64 {
    let started = Instant::now();
    let mut passes = 0usize;
    let mut sink = 0usize;
    while passes == 0 || started.elapsed() < MIN_SAMPLE {
        sink = sink.wrapping_add(pass());
        passes += 1;
    }
    black_box(sink);
    let secs = started.elapsed().as_secs_f64();
    (corpus_bytes * passes) as f64 / secs / 1e6
}

fn pct(num: usize, den: usize) -> String {
    if den == 0 {
        "–".into()
    } else {
        format!("{:.1}% ({num}/{den})", 100.0 * num as f64 / den as f64)
    }
}

/// MB/s of [chatguard, rustrict `is_inappropriate`, rustrict `analyze`] over `corpus`: the
/// median of `rounds` interleaved rounds.
fn speeds(lexicon: &Lexicon, corpus: &[&str], rounds: usize) -> [f64; 3] {
    let corpus_bytes: usize = corpus.iter().map(|l| l.len()).sum();
    // Warm-up: rustrict builds its tries lazily on first use.
    let mut scratch = Scratch::default();
    let mut out = Vec::new();
    for text in corpus {
        lexicon.scan_into(text, &mut scratch, &mut out);
        black_box(text.is_inappropriate());
    }
    let (mut cg, mut rr_inapp, mut rr_analyze) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        cg.push(sample(corpus_bytes, || {
            let mut hits = 0;
            for text in corpus {
                lexicon.scan_into(black_box(text), &mut scratch, &mut out);
                hits += out.len();
            }
            hits
        }));
        rr_inapp.push(sample(corpus_bytes, || {
            corpus
                .iter()
                .filter(|t| black_box(**t).is_inappropriate())
                .count()
        }));
        rr_analyze.push(sample(corpus_bytes, || {
            corpus
                .iter()
                .filter(|t| {
                    Censor::from_str(black_box(t))
                        .analyze()
                        .is(Type::INAPPROPRIATE)
                })
                .count()
        }));
    }
    [
        median(&mut cg),
        median(&mut rr_inapp),
        median(&mut rr_analyze),
    ]
}

/// Marks the line a child process prints its [`speeds`] on.
const CHILD_LINE: &str = "PEERS_SPEED";

/// [`speeds`] measured in a fresh process (this benchmark run again with `PEERS_CHILD` set).
fn speeds_in_child(rounds: usize) -> [f64; 3] {
    let exe = std::env::current_exe().expect("the benchmark's own path");
    let out = Command::new(exe)
        .arg("--bench")
        .env("PEERS_CHILD", "1")
        .env("PEERS_ROUNDS", rounds.to_string())
        .stderr(Stdio::inherit())
        .output()
        .expect("start the speed comparison in a child process");
    assert!(
        out.status.success(),
        "the child process failed: {}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(CHILD_LINE))
        .unwrap_or_else(|| panic!("no {CHILD_LINE} line in the child's output: {stdout:?}"));
    let figures: Vec<f64> = line
        .split_whitespace()
        .map(|v| v.parse().expect("a speed in MB/s"))
        .collect();
    figures.try_into().expect("three speeds")
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run a smoke pass.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let child = std::env::var_os("PEERS_CHILD").is_some();
    let env_count = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
            .max(1)
    };
    let rounds = env_count("PEERS_ROUNDS", if smoke { 1 } else { 7 });
    let procs = if smoke || child {
        1
    } else {
        env_count("PEERS_PROCS", 3)
    };
    // PEERS_VERBOSE=1: list the independent set's lines that either system gets wrong.
    let verbose = std::env::var_os("PEERS_VERBOSE").is_some();
    let started = Instant::now();
    let lexicon = Lexicon::embedded().expect("embedded wordlists build");
    let corpus: Vec<&str> = tabbed(CORPUS).into_iter().map(|(_, t)| t).collect();
    let corpus_bytes: usize = corpus.iter().map(|l| l.len()).sum();
    if child {
        let [cg, inapp, analyze] = speeds(&lexicon, &corpus, rounds);
        println!("{CHILD_LINE} {cg} {inapp} {analyze}");
        return;
    }

    // One process's figures swing by a few percent from the next one's (rounds within a
    // process agree far better), rustrict's more than chatguard's: each process is one draw
    // of the code and heap layout. So the speeds are measured in `procs` fresh processes, one
    // after another, and the table shows the medians.
    let runs: Vec<[f64; 3]> = if procs == 1 {
        vec![speeds(&lexicon, &corpus, rounds)]
    } else {
        (0..procs).map(|_| speeds_in_child(rounds)).collect()
    };
    let column = |k: usize| median(&mut runs.iter().map(|r| r[k]).collect::<Vec<_>>());
    // Each ratio is taken within its process (both systems measured side by side), then the
    // median of those.
    let ratio = |k: usize| median(&mut runs.iter().map(|r| r[0] / r[k]).collect::<Vec<_>>());
    let (cg, rr_inapp, rr_analyze) = (column(0), column(1), column(2));

    println!("## chatguard vs rustrict 0.7 — speed\n");
    println!(
        "Corpus: tests/data/text/chat_corpus.txt, {} messages, {:.1} KB; one core; per process, \
         the median of {rounds} interleaved rounds (each ≥ {} ms); the median of {procs} \
         process(es).\n",
        corpus.len(),
        corpus_bytes as f64 / 1e3,
        MIN_SAMPLE.as_millis()
    );
    println!("| system | MB/s | messages/s | chatguard is × faster |");
    println!("|---|---:|---:|---:|");
    let avg = corpus_bytes as f64 / corpus.len() as f64;
    for (name, mbs, times) in [
        ("chatguard normalize + lexicon (`scan_into`)", cg, 1.0),
        ("rustrict `is_inappropriate`", rr_inapp, ratio(1)),
        ("rustrict `Censor::analyze`", rr_analyze, ratio(2)),
    ] {
        println!(
            "| {name} | {mbs:.2} | {:.0} | {times:.1} |",
            mbs * 1e6 / avg
        );
    }
    if procs > 1 {
        let each: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.1}× ({:.1} / {:.2} MB/s)", r[0] / r[1], r[0], r[1]))
            .collect();
        println!(
            "\nchatguard / rustrict `is_inappropriate` in each process: {}.",
            each.join(", ")
        );
    }

    println!("\n## Accuracy on the same labelled lines\n");
    println!(
        "Recall = abusive lines flagged; false positives = clean lines flagged. chatguard \
         (policy): the default policy's content action is review/block, lexicon only, no model; \
         chatguard (any match): at least one wordlist match, whatever its severity; rustrict: \
         `is_inappropriate`.\n"
    );
    println!("| labelled set | system | recall | false positives |");
    println!("|---|---|---:|---:|");
    let mut guard = Chatguard {
        lexicon: lexicon.clone(),
        policy: Policy::default(),
        scratch: Scratch::default(),
        out: Vec::new(),
    };
    const SYSTEMS: [&str; 3] = [
        "chatguard (policy)",
        "chatguard (any match)",
        "rustrict `is_inappropriate`",
    ];
    let mut by_category: BTreeMap<&str, [usize; 4]> = BTreeMap::new();
    for set in labelled_sets() {
        let mut hits = [0usize; 3];
        let mut false_pos = [0usize; 3];
        for (category, text) in &set.abusive {
            let flags = guard.flags(text);
            for (h, f) in hits.iter_mut().zip(flags) {
                *h += usize::from(f);
            }
            if set.name.starts_with("chatguard fixtures") {
                let e = by_category.entry(category).or_default();
                e[0] += 1;
                for (k, f) in flags.into_iter().enumerate() {
                    e[k + 1] += usize::from(f);
                }
            }
        }
        for text in &set.clean {
            for (fp, f) in false_pos.iter_mut().zip(guard.flags(text)) {
                *fp += usize::from(f);
            }
        }
        if verbose && set.name.starts_with("hand-written") {
            // [policy, any match, rustrict] for each line either system gets wrong.
            for (label, text) in set
                .abusive
                .iter()
                .map(|(_, t)| (true, *t))
                .chain(set.clean.iter().map(|t| (false, *t)))
            {
                let flags = guard.flags(text);
                if flags[0] != label || flags[2] != label {
                    eprintln!(
                        "{} {flags:?} {text}",
                        if label { "abusive" } else { "clean" }
                    );
                }
            }
        }
        let (na, nc) = (set.abusive.len(), set.clean.len());
        for (k, system) in SYSTEMS.iter().enumerate() {
            println!(
                "| {} | {system} | {} | {} |",
                set.name,
                pct(hits[k], na),
                pct(false_pos[k], nc)
            );
        }
    }
    println!("\nRecall by category on positive.txt:\n");
    println!("| category | lines | {} |", SYSTEMS.join(" | "));
    println!("|---|---:|---:|---:|---:|");
    for (category, [n, a, b, c]) in &by_category {
        println!(
            "| {category} | {n} | {} | {} | {} |",
            pct(*a, *n),
            pct(*b, *n),
            pct(*c, *n)
        );
    }
    println!(
        "\nSpeed ratio chatguard / rustrict `is_inappropriate`: {:.1}× (median of {procs} \
         process(es); target ≥ 25×). Took {:.1} s.",
        ratio(1),
        started.elapsed().as_secs_f64()
    );
}
