//! Hot-reload cost with large wordlists: a generated 100,000-entry wordlist directory
//! (`words/en/{insult,profanity,scam}.txt`: plain words, `word*` prefixes and two-word
//! phrases) in a temporary directory.
//!
//! - `reload/lexicon_from_dir_100k`: building the base lexicon alone (`Lexicon::from_dir`),
//!   after one entry changed (so nothing is reused).
//! - `reload/reload_now_100k_changed`: a whole reload of a running server after one wordlist
//!   entry changed (`Reloader::reload_now`: read + parse the config, rebuild the lexicon and
//!   policies on the blocking pool, swap).
//! - `reload/reload_now_100k_unchanged`: a reload where the wordlists did not change (a token
//!   or rule edit): the built automaton is reused, only files are read and compared.
//! - `reload/reload_now_100k_changed_plus_policy`: a changed wordlist with one policy adding a
//!   1,000-entry wordlist (its lexicon is the base rebuilt with the extras: twice the work).
//!
//! Run: `cargo bench --bench reload` (about a minute; each iteration is a full rebuild).

use chatguard::reload::{ConfigSource, Reloader};
use chatguard::text::lexicon::Lexicon;
use criterion::{Criterion, criterion_group, criterion_main};
use std::fmt::Write;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const ENTRIES: usize = 100_000;

/// A made-up word with no doubled letters (so no two entries fold alike): three
/// consonant-vowel syllables after a `q` prefix, e.g. `qbabeca`.
fn word(i: usize) -> String {
    const C: &[u8] = b"bcdfghjklmnprstvwxyz";
    const V: &[u8] = b"aeiou";
    let mut s = String::from("q");
    let mut n = i;
    for _ in 0..3 {
        let syl = n % 100;
        n /= 100;
        s.push(C[syl % 20] as char);
        s.push(V[syl / 20] as char);
    }
    if n > 0 {
        let _ = write!(s, "{}", (b'a' + (n % 26) as u8) as char);
    }
    s
}

/// Writes `n` entries over three category files under `dir/en/`.
fn write_wordlists(dir: &Path, n: usize, offset: usize) {
    std::fs::create_dir_all(dir.join("en")).expect("mkdir");
    let mut files = [String::new(), String::new(), String::new()];
    for i in 0..n {
        let w = word(offset + i);
        let line = match i % 20 {
            0 => format!("{w}* | high\n"),
            1 => format!("{w} {} | medium\n", word(offset + n + i)),
            _ => format!("{w} | high\n"),
        };
        files[i % 3].push_str(&line);
    }
    for (name, text) in ["insult", "profanity", "scam"].iter().zip(files) {
        std::fs::write(dir.join(format!("en/{name}.txt")), text).expect("write");
    }
}

fn bench_reload(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let words = tmp.path().join("words");
    write_wordlists(&words, ENTRIES, 0);
    let extra = tmp.path().join("kids");
    write_wordlists(&extra, 1_000, 10 * ENTRIES);
    let config_path = tmp.path().join("chatguard.toml");
    let base_config = format!(
        "[server]\nreload_poll_ms = 0\n[lexicon]\ndir = {:?}\n[text_model]\nenabled = false\n\
         [image]\nmodel_enabled = false\n",
        words.display().to_string()
    );
    std::fs::write(&config_path, &base_config).expect("write");

    let lexicon = Lexicon::from_dir(&words).expect("generated wordlists build");
    assert_eq!(lexicon.len(), ENTRIES);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (reloader, config) =
        Reloader::load(ConfigSource::file(&config_path)).expect("config builds");
    let shutdown = CancellationToken::new();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let server = rt.spawn(chatguard::server::run_with_reload(
        listener,
        None,
        config,
        reloader.clone(),
        shutdown.clone(),
    ));
    // The server attaches the reloader as it starts.
    rt.block_on(async {
        while reloader.reload_now().await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    drop(lexicon);

    // Each timed iteration first changes one entry (untimed), so the automaton is rebuilt.
    let mut generation = 0usize;
    let mut touch = move || {
        generation += 1;
        std::fs::write(
            words.join("en/extra.txt"),
            format!("{} | high\n", word(5 * ENTRIES + generation)),
        )
        .expect("write");
    };
    let words_dir = tmp.path().join("words");
    let mut group = c.benchmark_group("reload");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("lexicon_from_dir_100k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                touch();
                let started = std::time::Instant::now();
                let lex = Lexicon::from_dir(&words_dir).expect("builds");
                total += started.elapsed();
                drop(lex);
            }
            total
        })
    });
    let reload = |rt: &tokio::runtime::Runtime| {
        rt.block_on(reloader.reload_now())
            .expect("reload succeeds")
            .lexicon_entries
    };
    group.bench_function("reload_now_100k_changed", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                touch();
                let started = std::time::Instant::now();
                reload(&rt);
                total += started.elapsed();
            }
            total
        })
    });
    group.bench_function("reload_now_100k_unchanged", |b| b.iter(|| reload(&rt)));
    std::fs::write(
        &config_path,
        format!(
            "{base_config}[policy.kids]\nwordlists = [{:?}]\n",
            extra.display().to_string()
        ),
    )
    .expect("write");
    group.bench_function("reload_now_100k_changed_plus_policy", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                touch();
                let started = std::time::Instant::now();
                reload(&rt);
                total += started.elapsed();
            }
            total
        })
    });
    group.finish();
    shutdown.cancel();
    let _ = rt.block_on(server);
}

criterion_group!(benches, bench_reload);
criterion_main!(benches);
