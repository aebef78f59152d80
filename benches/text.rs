//! Text stage throughput: normalization alone, and normalization + lexicon
//! (`Lexicon::scan_into`), over the chat corpus in `tests/data/text/chat_corpus.txt`
//! (~4000 messages of 10–200 bytes, ~15% abusive, some emoji/CJK/unicode; regenerate with
//! `tests/data/text/gen_corpus.py`).
//!
//! Run: `cargo bench --bench text -- --warm-up-time 1 --measurement-time 3`.
//! Throughput is reported in bytes of original text per second, one core. `text_split` also
//! times the clean and abusive lines apart, and the lines holding Han, kana or Hangul
//! (`scan/unspaced_scripts`, the seed market's Chinese among them).

use chatguard::text::lexicon::{Lexicon, Scratch};
use chatguard::text::normalize::Normalized;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const CORPUS: &str = include_str!("../tests/data/text/chat_corpus.txt");

/// (all, clean, abusive) message lists.
fn corpus() -> (Vec<&'static str>, Vec<&'static str>, Vec<&'static str>) {
    let (mut all, mut clean, mut abusive) = (Vec::new(), Vec::new(), Vec::new());
    for line in CORPUS.lines() {
        let Some((kind, text)) = line.split_once('\t') else {
            continue;
        };
        all.push(text);
        if kind == "abusive" {
            abusive.push(text);
        } else {
            clean.push(text);
        }
    }
    (all, clean, abusive)
}

fn bytes(lines: &[&str]) -> u64 {
    lines.iter().map(|l| l.len() as u64).sum()
}

fn bench_text(c: &mut Criterion) {
    let lexicon = Lexicon::embedded().expect("embedded wordlists build");
    let (all, clean, abusive) = corpus();
    let unspaced: Vec<&str> = all
        .iter()
        .copied()
        .filter(|t| t.chars().any(chatguard::text::normalize::is_unspaced))
        .collect();

    let mut group = c.benchmark_group("text");
    group.throughput(Throughput::Bytes(bytes(&all)));
    group.bench_function("normalize/mixed", |b| {
        let mut norm = Normalized::new();
        b.iter(|| {
            let mut total = 0;
            for text in &all {
                norm.set(black_box(text));
                total += norm.len();
            }
            total
        })
    });
    group.bench_function("scan/mixed", |b| {
        let mut scratch = Scratch::default();
        let mut out = Vec::new();
        b.iter(|| {
            let mut hits = 0;
            for text in &all {
                lexicon.scan_into(black_box(text), &mut scratch, &mut out);
                hits += out.len();
            }
            hits
        })
    });
    group.finish();

    let mut group = c.benchmark_group("text_split");
    for (name, lines) in [
        ("scan/clean", &clean),
        ("scan/abusive", &abusive),
        ("scan/unspaced_scripts", &unspaced),
    ] {
        group.throughput(Throughput::Bytes(bytes(lines)));
        group.bench_function(name, |b| {
            let mut scratch = Scratch::default();
            let mut out = Vec::new();
            b.iter(|| {
                let mut hits = 0;
                for text in lines.iter() {
                    lexicon.scan_into(black_box(text), &mut scratch, &mut out);
                    hits += out.len();
                }
                hits
            })
        });
    }
    group.finish();

    c.bench_function("lexicon/build_embedded_uncached", |b| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("wordlists");
        b.iter(|| Lexicon::from_dir(&dir).expect("wordlists load").len())
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench_text
}
criterion_main!(benches);
