//! Hot reload and per-policy extras, end to end: the real server started from a config file in
//! a temporary directory, reloaded through the [`Reloader`] handle (what SIGHUP calls) and by
//! the file poller, while a client keeps pipelined requests going.

use chatguard::reload::{ConfigSource, ReloadError, Reloader};
use chatguard::text::Severity;
use chatguard::text::rules::{
    MAX_MATCHES_PER_RULE, MAX_PATTERN_BYTES, MAX_RULES, RuleError, RuleKind, RuleSet, RuleSpec,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use tokio_util::sync::CancellationToken;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const TOKEN: &str = "test-token-acme";

/// The base wordlist every test starts from.
const BASE_WORDS: &str = "idiot | high\n";

/// A config directory: `chatguard.toml`, `words/en/insult.txt` (the base lexicon) and
/// whatever a test adds.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("words/en")).expect("mkdir");
        std::fs::write(dir.path().join("words/en/insult.txt"), BASE_WORDS).expect("write");
        Setup { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes a file atomically (temp file + rename, as editors do), so the poller never
    /// sees it half-written.
    fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        let tmp = self.dir.path().join(".tmp-write");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, p).expect("rename");
    }

    /// Writes `chatguard.toml`: the common settings, then `extra`.
    fn write_config(&self, poll_ms: u64, extra: &str) {
        let text = format!(
            "[server]\nreload_poll_ms = {poll_ms}\n\
             [auth.tokens]\n\"{TOKEN}\" = \"acme\"\n\
             [lexicon]\ndir = {words:?}\n\
             [text_model]\nenabled = false\n\
             [image]\nmodel_enabled = false\n\
             [behaviour]\nraid_min_users = 65535\n\
             {extra}",
            words = self.path("words").display().to_string(),
        );
        self.write("chatguard.toml", &text);
    }
}

/// A running server with its reload handle.
struct Server {
    addr: SocketAddr,
    admin: SocketAddr,
    reloader: Reloader,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(config_path: &Path) -> Server {
        let (reloader, config) =
            Reloader::load(ConfigSource::file(config_path)).expect("test config is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (addr, admin_addr) = (
            listener.local_addr().expect("addr"),
            admin.local_addr().expect("addr"),
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chatguard::server::run_with_reload(
            listener,
            Some(admin),
            config,
            reloader.clone(),
            shutdown.clone(),
        ));
        Server {
            addr,
            admin: admin_addr,
            reloader,
            shutdown,
            task,
        }
    }

    async fn connect(&self) -> Ws {
        crate::common::connect_as(self.addr, TOKEN).await
    }

    /// The value of one metric line (`name{labels}`), 0 when absent.
    async fn metric(&self, series: &str) -> f64 {
        crate::common::metric(self.admin, series).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("server stops within 20s")
            .expect("server task did not panic")
            .expect("server returned Ok");
    }
}

fn moderate(id: &str, text: &str, policy: Option<&str>) -> Value {
    let mut v = json!({"type":"moderate","id":id,"user":format!("u-{id}"),"text":text});
    if let Some(p) = policy {
        v["policy"] = json!(p);
    }
    v
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Next reply (pushed events skipped); a closed or broken connection fails the test.
async fn recv(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("reply within 60s")
            .expect("connection still open")
            .expect("frame ok");
        let Message::Text(t) = msg else {
            panic!("expected a text frame, got {msg:?}");
        };
        let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
        if !matches!(v["type"].as_str(), Some("sanction" | "room_alarm")) {
            return v;
        }
    }
}

/// One request, its verdict.
async fn verdict(ws: &mut Ws, id: &str, text: &str, policy: Option<&str>) -> Value {
    send(ws, moderate(id, text, policy)).await;
    let v = recv(ws).await;
    assert_eq!(v["type"], "verdict", "{v}");
    assert_eq!(v["id"], id, "{v}");
    v
}

/// Keeps pipelined requests going on one connection, `WINDOW` at a time, until at least
/// `min` were sent and `stop` is set; checks every request got exactly one verdict. Texts
/// alternate between clean text, the base term and `new_term`. Counts verdicts received in
/// `progress`. Returns the number sent.
async fn load(
    mut ws: Ws,
    min: usize,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicUsize>,
    new_term: &'static str,
) -> usize {
    const WINDOW: usize = 50;
    const MAX: usize = 20_000;
    let mut sent = 0;
    let mut seen = HashSet::new();
    while (sent < min || !stop.load(Ordering::Acquire)) && sent < MAX {
        let mut ids = HashSet::new();
        for _ in 0..WINDOW {
            let id = format!("load-{sent}");
            let text = match sent % 3 {
                0 => "good morning, see you at lunch",
                1 => "you idiot",
                _ => new_term,
            };
            send(&mut ws, moderate(&id, text, None)).await;
            ids.insert(id);
            sent += 1;
        }
        for _ in 0..WINDOW {
            let v = recv(&mut ws).await;
            assert_eq!(v["type"], "verdict", "every request gets a verdict: {v}");
            let id = v["id"].as_str().expect("id").to_string();
            assert!(ids.remove(&id), "reply for an unknown id: {v}");
            assert!(seen.insert(id), "two replies for one id: {v}");
            progress.fetch_add(1, Ordering::Release);
            if v["matches"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|m| m["term"] == "idiot" && m["category"] == "insult")
            }) {
                assert_eq!(v["action"], "block", "{v}");
            }
        }
        assert!(ids.is_empty());
    }
    assert_eq!(seen.len(), sent);
    sent
}

/// Requests a [`Load`] client sends at the least.
const LOAD_MIN: usize = 500;

/// A [`load`] client running in the background.
struct Load {
    /// Tells it to stop once it has sent its minimum.
    stop: Arc<AtomicBool>,
    /// Its task; gives the number sent.
    task: tokio::task::JoinHandle<usize>,
}

impl Load {
    /// Starts [`load`] on `ws` (at least [`LOAD_MIN`] requests) and waits until it has received 100
    /// verdicts, so that what the test does next happens under load.
    async fn start(ws: Ws, new_term: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(load(ws, LOAD_MIN, stop.clone(), progress.clone(), new_term));
        let mut waited = 0;
        while progress.load(Ordering::Acquire) < 100 {
            waited += 1;
            assert!(waited < 6000, "the load client made no progress");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Load { stop, task }
    }

    /// Stops the client and checks it sent at least its minimum, each with one verdict.
    async fn finish(self) {
        self.stop.store(true, Ordering::Release);
        let sent = self.task.await.expect("load client did not panic");
        assert!(sent >= LOAD_MIN, "{sent}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_handle_under_load_adds_a_term_without_dropping_anything() {
    let setup = Setup::new();
    setup.write_config(0, "");
    let server = Server::start(&setup.path("chatguard.toml")).await;
    let mut probe = server.connect().await;
    let v = verdict(&mut probe, "before", "you frobnicator", None).await;
    assert_eq!(v["action"], "allow", "not a term yet: {v}");

    // Once the load is going (it keeps going until `finish`), change the wordlist and reload
    // (what SIGHUP does).
    let load = Load::start(server.connect().await, "you frobnicator").await;
    setup.write("words/en/insult.txt", "idiot | high\nfrobnicator | high\n");
    let summary = server.reloader.reload_now().await.expect("reload succeeds");
    assert_eq!(summary.generation, 1);
    assert_eq!(summary.lexicon_entries, 2);
    assert!(summary.ignored.is_empty(), "{summary:?}");
    load.finish().await;

    // The probe connection opened before the reload sees the new term now.
    let v = verdict(&mut probe, "after", "you frobnicator", None).await;
    assert_eq!(v["action"], "block", "{v}");
    assert_eq!(v["matches"][0]["term"], "frobnicator", "{v}");
    assert_eq!(
        server
            .metric("chatguard_reloads_total{result=\"ok\"}")
            .await,
        1.0
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_poller_reloads_a_changed_config_under_load() {
    let setup = Setup::new();
    setup.write_config(20, "");
    let server = Server::start(&setup.path("chatguard.toml")).await;
    let load = Load::start(server.connect().await, "what a wazzock").await;
    // A new policy wordlist (a new file, named by the changed config file) for `default`.
    setup.write("kids/insult.txt", "wazzock | high\n");
    setup.write_config(
        20,
        &format!(
            "[policy.default]\nwordlists = [{:?}]\n",
            setup.path("kids/insult.txt").display().to_string()
        ),
    );
    let mut probe = server.connect().await;
    let mut n = 0;
    loop {
        let v = verdict(&mut probe, &format!("p-{n}"), "what a wazzock", None).await;
        if v["action"] == "block" {
            assert_eq!(v["matches"][0]["term"], "wazzock", "{v}");
            break;
        }
        n += 1;
        assert!(n < 3000, "the poller never picked up the change");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    load.finish().await;
    assert!(
        server
            .metric("chatguard_reloads_total{result=\"ok\"}")
            .await
            >= 1.0
    );

    // Editing the policy's wordlist file alone reloads too.
    setup.write("kids/insult.txt", "wazzock | high\nnumpty | high\n");
    let mut n = 0;
    while verdict(&mut probe, &format!("q-{n}"), "you numpty", None).await["action"] != "block" {
        n += 1;
        assert!(n < 3000, "the poller never picked up the wordlist change");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configs_are_rejected_and_the_old_state_keeps_answering() {
    let setup = Setup::new();
    setup.write_config(0, "");
    let server = Server::start(&setup.path("chatguard.toml")).await;
    let mut ws = server.connect().await;

    // (name, how to break it, what the error must mention)
    type Breaker = Box<dyn Fn(&Setup)>;
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "invalid TOML",
            Box::new(|s: &Setup| s.write("chatguard.toml", "[server\nlisten = 1")),
            "chatguard.toml",
        ),
        (
            "bad regex",
            Box::new(|s: &Setup| {
                s.write_config(
                    0,
                    "[policy.kids]\nrules = [{ pattern = \"(unclosed\", kind = \"regex\", \
                     label = \"scam\", severity = \"high\" }]\n",
                )
            }),
            "policy.kids.rules: rule 0",
        ),
        (
            "unknown rule label",
            Box::new(|s: &Setup| {
                s.write_config(
                    0,
                    "[policy.kids]\nrules = [{ pattern = \"x+y\", kind = \"regex\", \
                     label = \"nonsense\", severity = \"high\" }]\n",
                )
            }),
            "unknown label `nonsense`",
        ),
        (
            "bad wordlist line",
            Box::new(|s: &Setup| {
                s.write_config(0, "");
                s.write(
                    "words/en/insult.txt",
                    "idiot | high\nfrobnicator | extreme\n",
                );
            }),
            "en/insult.txt:2",
        ),
        (
            "missing policy wordlist",
            Box::new(|s: &Setup| {
                s.write("words/en/insult.txt", BASE_WORDS);
                s.write_config(
                    0,
                    "[policy.kids]\nwordlists = [\"/nonexistent/list.txt\"]\n",
                );
            }),
            "/nonexistent/list.txt",
        ),
    ];
    for (i, (name, breaker, mention)) in cases.iter().enumerate() {
        breaker(&setup);
        let err = server
            .reloader
            .reload_now()
            .await
            .expect_err(&format!("{name}: must be rejected"));
        assert!(matches!(err, ReloadError::Config(_)), "{name}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(mention), "{name}: {msg:?} lacks {mention:?}");
        assert_eq!(
            server
                .metric("chatguard_reloads_total{result=\"error\"}")
                .await,
            (i + 1) as f64,
            "{name}"
        );
        // The old state answers: the base term blocks, `kids` does not exist.
        let v = verdict(&mut ws, &format!("old-{i}"), "you idiot", None).await;
        assert_eq!(v["action"], "block", "{name}: {v}");
        send(&mut ws, moderate(&format!("kids-{i}"), "hi", Some("kids"))).await;
        let v = recv(&mut ws).await;
        assert_eq!(v["type"], "error", "{name}: {v}");
    }
    assert_eq!(
        server
            .metric("chatguard_reloads_total{result=\"ok\"}")
            .await,
        0.0
    );

    // Fixed, with a setting that needs a restart: reloaded, the restart-only change ignored.
    setup.write("words/en/insult.txt", BASE_WORDS);
    setup.write_config(0, "[admin]\nenabled = false\n[policy.kids]\n");
    let summary = server.reloader.reload_now().await.expect("valid again");
    assert_eq!(summary.ignored, vec!["admin"]);
    let v = verdict(&mut ws, "kids-ok", "hi", Some("kids")).await;
    assert_eq!(v["action"], "allow", "{v}");
    // The admin listener is still there: restart-only settings did not apply.
    assert_eq!(
        server
            .metric("chatguard_reloads_total{result=\"ok\"}")
            .await,
        1.0
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_policy_wordlists_allowlist_and_rules() {
    let setup = Setup::new();
    setup.write("kids/insult.txt", "dummy | high\nfrob* | high\n");
    setup.write_config(
        0,
        &format!(
            r#"[policy.kids]
wordlists = [{kids:?}]
allow = ["frobnicate"]
rules = [
  {{ pattern = '(?i)free\s+robux', kind = "regex", label = "scam", sub = "game_currency", severity = "high" }},
  {{ pattern = "*discord.gg/*", kind = "wildcard", label = "spam", severity = "medium" }},
]
[policy.lenient]
sanctions = false
stages = {{ lexicon = false }}
"#,
            kids = setup.path("kids/insult.txt").display().to_string()
        ),
    );
    let server = Server::start(&setup.path("chatguard.toml")).await;
    let mut ws = server.connect().await;

    // (text, default action, kids action)
    let cases = [
        ("you dummy", "allow", "block"),
        ("you frobber", "allow", "block"),
        ("let us frobnicate", "allow", "allow"),
        ("get FREE   Robux here", "allow", "block"),
        ("join discord.gg/abc", "allow", "review"),
        ("you idiot", "block", "block"),
        ("have a nice day", "allow", "allow"),
    ];
    let mut failures = Vec::new();
    for (i, (text, want_default, want_kids)) in cases.iter().enumerate() {
        let d = verdict(&mut ws, &format!("d-{i}"), text, None).await;
        let k = verdict(&mut ws, &format!("k-{i}"), text, Some("kids")).await;
        if d["action"] != *want_default || k["action"] != *want_kids {
            failures.push(format!(
                "{text:?}: default {} (want {want_default}), kids {} (want {want_kids})",
                d["action"], k["action"]
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");

    // A rule match: label with source `rule`, offsets into the original text.
    let text = "héllo, get FREE   Robux here";
    let v = verdict(&mut ws, "rule", text, Some("kids")).await;
    let label = &v["labels"][0];
    assert_eq!(label["label"], "scam", "{v}");
    assert_eq!(label["sub"], "game_currency", "{v}");
    assert_eq!(label["source"], "rule", "{v}");
    let m = &v["matches"][0];
    let (s, e) = (m["start"].as_u64().unwrap(), m["end"].as_u64().unwrap());
    assert_eq!(&text[s as usize..e as usize], "FREE   Robux");
    let (sc, ec) = (
        m["start_char"].as_u64().unwrap(),
        m["end_char"].as_u64().unwrap(),
    );
    let by_chars: String = text
        .chars()
        .skip(sc as usize)
        .take((ec - sc) as usize)
        .collect();
    assert_eq!(by_chars, "FREE   Robux");
    assert_eq!(m["category"], "scam");

    // `lenient` runs no lexicon: nothing matches, and it is not "degraded".
    let v = verdict(&mut ws, "lenient", "you idiot", Some("lenient")).await;
    assert_eq!(v["action"], "allow", "{v}");
    assert_eq!(v["matches"], json!([]), "{v}");
    assert_eq!(v["degraded"], json!([]), "{v}");
    server.stop().await;
}

/// A policy with the text model stage off never reports model labels (and is not degraded),
/// while `default` on the same server does. Needs the models (`make models`), like the e2e
/// model test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_with_text_model_stage_off_reports_no_model_labels() {
    let setup = Setup::new();
    setup.write_config(0, "[policy.quiet]\nstages = { text_model = false }\n");
    let cfg = std::fs::read_to_string(setup.path("chatguard.toml")).expect("read");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    setup.write(
        "chatguard.toml",
        &cfg.replace(
            "[text_model]\nenabled = false\n",
            &format!(
                "[text_model]\nenabled = true\nmodels_dir = {:?}\n",
                models.display().to_string()
            ),
        ),
    );
    let server = Server::start(&setup.path("chatguard.toml")).await;
    let mut ws = server.connect().await;
    // The base lexicon here is just `idiot`, so these reach the model under `default`.
    let texts = [
        "you are a worthless stupid moron and everyone hates you",
        "shut up you pathetic loser",
        "i will hurt you",
    ];
    let has_model = |v: &Value| {
        v["labels"]
            .as_array()
            .expect("labels")
            .iter()
            .any(|l| l["source"] == "model")
    };
    let mut model_labels = 0;
    for (i, text) in texts.iter().enumerate() {
        let v = verdict(&mut ws, &format!("default-{i}"), text, None).await;
        assert_eq!(
            v["degraded"],
            json!([]),
            "model must be loaded (run `make models`): {v}"
        );
        model_labels += usize::from(has_model(&v));
    }
    assert!(model_labels > 0, "the default policy runs the model");
    for (i, text) in texts
        .iter()
        .chain(&["you idiot", "have a nice day"])
        .enumerate()
    {
        let v = verdict(&mut ws, &format!("quiet-{i}"), text, Some("quiet")).await;
        assert!(!has_model(&v), "{v}");
        assert_eq!(v["degraded"], json!([]), "{v}");
    }
    server.stop().await;
}

/// The tenant table: a default policy per tenant and an allowed list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_default_policy_and_allowed_policies() {
    let setup = Setup::new();
    setup.write_config(
        0,
        "[policy.kids]\nrules = [{ pattern = \"robux\", kind = \"wildcard\", label = \"scam\", \
         severity = \"high\" }]\n[policy.other]\n\
         [tenant.acme]\ndefault_policy = \"kids\"\npolicies = [\"kids\", \"default\"]\n",
    );
    let server = Server::start(&setup.path("chatguard.toml")).await;
    let mut ws = server.connect().await;
    let v = verdict(&mut ws, "t1", "free robux", None).await;
    assert_eq!(
        v["action"], "block",
        "the tenant's default policy is kids: {v}"
    );
    let v = verdict(&mut ws, "t2", "free robux", Some("default")).await;
    assert_eq!(v["action"], "allow", "{v}");
    send(&mut ws, moderate("t3", "hi", Some("other"))).await;
    let v = recv(&mut ws).await;
    assert_eq!(v["type"], "error", "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains("not allowed"),
        "{v}"
    );
    server.stop().await;
}

/// Tokens reload too: a new token connects, open connections of a removed one keep going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_reload_for_new_connections() {
    let setup = Setup::new();
    setup.write_config(0, "");
    let server = Server::start(&setup.path("chatguard.toml")).await;
    let mut ws = server.connect().await;
    let cfg = std::fs::read_to_string(setup.path("chatguard.toml")).expect("read");
    setup.write(
        "chatguard.toml",
        &cfg.replace(
            &format!("\"{TOKEN}\" = \"acme\""),
            "\"test-token-new-one\" = \"acme\"",
        ),
    );
    server.reloader.reload_now().await.expect("reload");
    let connect = |token: &'static str| {
        let addr = server.addr;
        async move {
            let mut req = format!("ws://{addr}/v1/ws")
                .into_client_request()
                .expect("url");
            req.headers_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("header"),
            );
            connect_async(req).await.map(|_| ())
        }
    };
    assert!(connect("test-token-new-one").await.is_ok());
    assert!(
        connect(TOKEN).await.is_err(),
        "the removed token is refused"
    );
    let v = verdict(&mut ws, "still", "you idiot", None).await;
    assert_eq!(v["action"], "block", "{v}");
    server.stop().await;
}

fn rule(pattern: &str, kind: RuleKind) -> RuleSpec {
    RuleSpec {
        pattern: pattern.into(),
        kind,
        label: "scam".into(),
        sub: None,
        severity: Severity::High,
    }
}

#[test]
fn rule_compilation_limits() {
    use RuleKind::{Regex, Wildcard};
    // (pattern, kind, error must contain; "" = valid)
    let long = "a".repeat(MAX_PATTERN_BYTES + 1);
    let cases: &[(&str, RuleKind, &str)] = &[
        (r"(?i)free\s+robux", Regex, ""),
        ("*bit.ly/*", Wildcard, ""),
        ("(unclosed", Regex, "invalid regex"),
        (r"\w{1000}\w{1000}\w{1000}", Regex, "size limit"),
        (r"(((((a{100}){100}){100}){100}){100})", Regex, "size limit"),
        ("", Regex, "empty pattern"),
        ("a*", Regex, "matches the empty text"),
        ("***", Wildcard, "no literal characters"),
        (&long, Regex, "bytes; at most"),
        (r"(a)\1", Regex, "invalid regex"),
    ];
    let mut failures = Vec::new();
    for (pattern, kind, want) in cases {
        let got = RuleSet::compile(&[rule(pattern, *kind)]);
        match (got, *want) {
            (Ok(_), "") => {}
            (Ok(_), want) => failures.push(format!("{pattern:.40}: compiled, want {want:?}")),
            (Err(e), "") => failures.push(format!("{pattern:.40}: {e}")),
            (Err(e), want) if !e.to_string().contains(want) => {
                failures.push(format!("{pattern:.40}: {e} (want {want:?})"))
            }
            _ => {}
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");

    let mut bad_label = rule("x", Regex);
    bad_label.label = "nonsense".into();
    assert!(RuleSet::compile(&[bad_label]).is_err());
    let mut bad_sub = rule("x", Regex);
    bad_sub.sub = Some("Not A Name".into());
    assert!(RuleSet::compile(&[bad_sub]).is_err());

    let many: Vec<RuleSpec> = (0..=MAX_RULES)
        .map(|i| rule(&format!("w{i}"), Wildcard))
        .collect();
    assert!(matches!(
        RuleSet::compile(&many),
        Err(RuleError::TooMany { .. })
    ));
    assert_eq!(
        RuleSet::compile(&many[..MAX_RULES])
            .expect("at the limit")
            .len(),
        MAX_RULES
    );

    // Matches reported per rule are bounded.
    let rules = RuleSet::compile(&[rule("ab", Regex)]).expect("valid");
    assert_eq!(rules.scan(&"ab ".repeat(100)).len(), MAX_MATCHES_PER_RULE);
}

/// The image hash lists are part of a reload: a new blocklist file named by the changed
/// config blocks an image the old one did not; a bad list is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_lists_reload_with_the_config() {
    use base64::Engine;
    use chatguard::image::hashlist;
    let setup = Setup::new();
    setup.write("block-a.txt", "# nothing blocked yet\n");
    setup.write_config(0, "");
    let base = std::fs::read_to_string(setup.path("chatguard.toml")).expect("read");
    // The same config with `image.blocklist_path` set to `file`.
    let config = |file: &str| {
        base.replace(
            "[image]\nmodel_enabled = false\n",
            &format!(
                "[image]\nmodel_enabled = false\nblocklist_path = {:?}\n",
                setup.path(file).display().to_string()
            ),
        )
    };
    setup.write("chatguard.toml", &config("block-a.txt"));
    let server = Server::start(&setup.path("chatguard.toml")).await;
    let mut ws = server.connect().await;

    let photo =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/testdata/coffee.png"))
            .expect("sample photo (run `make models`)");
    let data = base64::engine::general_purpose::STANDARD.encode(&photo);
    let request = |id: &str| {
        json!({"type":"moderate","id":id,"user":format!("u-{id}"),
               "images":[{"id":"i1","data":data}]})
    };
    send(&mut ws, request("img-before")).await;
    let v = recv(&mut ws).await;
    assert_eq!(v["images"][0]["action"], "allow", "{v}");

    let limits = chatguard::image::ImageConfig::default().decode_limits();
    for (variant, hash) in hashlist::list_hashes(&photo, &limits).expect("hashes") {
        hashlist::append_entry(&setup.path("block-b.txt"), hash, "gore", variant).expect("write");
    }
    setup.write("chatguard.toml", &config("block-b.txt"));
    server.reloader.reload_now().await.expect("reload");
    send(&mut ws, request("img-after")).await;
    let v = recv(&mut ws).await;
    assert_eq!(v["action"], "block", "{v}");
    assert_eq!(v["images"][0]["labels"][0]["source"], "hashlist", "{v}");

    // A bad list (here: a bad hash) is rejected; the good one stays.
    setup.write("block-c.txt", "not-a-hash gore\n");
    setup.write("chatguard.toml", &config("block-c.txt"));
    let err = server.reloader.reload_now().await.expect_err("bad list");
    assert!(err.to_string().contains("block-c.txt"), "{err}");
    send(&mut ws, request("img-still")).await;
    let v = recv(&mut ws).await;
    assert_eq!(v["action"], "block", "{v}");
    server.stop().await;
}

/// `sanctions = false`: the policy's violations do not raise the sender's risk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_without_sanctions_does_not_raise_risk() {
    let setup = Setup::new();
    setup.write_config(0, "[policy.review_only]\nsanctions = false\n");
    let server = Server::start(&setup.path("chatguard.toml")).await;
    let mut ws = server.connect().await;
    let mut last = (Value::Null, Value::Null);
    for i in 0..3 {
        for (slot, policy) in [(0, None), (1, Some("review_only"))] {
            let user = format!("same-user-{slot}");
            let mut req = moderate(&format!("s-{slot}-{i}"), "you idiot", policy);
            req["user"] = json!(user);
            send(&mut ws, req).await;
            let v = recv(&mut ws).await;
            assert_eq!(v["action"], "block", "{v}");
            if slot == 0 {
                last.0 = v;
            } else {
                last.1 = v;
            }
        }
    }
    assert!(
        last.0["sender"]["risk"].as_f64().unwrap_or(0.0) > 0.0,
        "{}",
        last.0
    );
    assert_eq!(last.1["sender"]["risk"], 0.0, "{}", last.1);
    server.stop().await;
}

/// The poller reloads a broken file once, logs and counts the error, and does not retry until
/// the file changes again; fixing it reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poller_rejects_a_broken_file_once_and_picks_up_the_fix() {
    let setup = Setup::new();
    setup.write_config(20, "");
    let server = Server::start(&setup.path("chatguard.toml")).await;
    let mut ws = server.connect().await;
    setup.write("words/en/insult.txt", "idiot | high\nwazzock | severe\n");
    let errors = "chatguard_reloads_total{result=\"error\"}";
    let mut n = 0;
    while server.metric(errors).await < 1.0 {
        n += 1;
        assert!(n < 3000, "the poller never tried the broken file");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Many poll intervals later: still one error, and the old lists answer.
    for i in 0..20 {
        let v = verdict(&mut ws, &format!("old-{i}"), "you idiot", None).await;
        assert_eq!(v["action"], "block", "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        server.metric(errors).await,
        1.0,
        "a failed reload is not retried"
    );
    setup.write("words/en/insult.txt", "idiot | high\nwazzock | high\n");
    let mut n = 0;
    while verdict(&mut ws, &format!("new-{n}"), "you wazzock", None).await["action"] != "block" {
        n += 1;
        assert!(n < 3000, "the poller never picked up the fix");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.metric(errors).await, 1.0);
    assert!(server.metric("chatguard_reload_last_seconds").await > 0.0);
    server.stop().await;
}

/// `[lookup]` and `[webhook]` are built once at startup: a reload that changes them says so
/// (`ignored`, and a `WARN` naming the section) and applies the rest of the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_only_sections_are_reported_and_the_rest_applies() {
    let setup = Setup::new();
    setup.write_config(0, "");
    let server = Server::start(&setup.path("chatguard.toml")).await;
    let mut ws = server.connect().await;
    setup.write("words/en/insult.txt", "idiot | high\nwazzock | high\n");
    setup.write_config(
        0,
        "[lookup]\nmax_entries = 5000\n\
         [webhook]\nurl = \"http://127.0.0.1:9/hook\"\n",
    );
    let summary = server.reloader.reload_now().await.expect("reload succeeds");
    assert_eq!(summary.ignored, ["lookup", "webhook"], "{summary:?}");
    let v = verdict(&mut ws, "new-term", "you wazzock", None).await;
    assert_eq!(v["action"], "block", "the wordlist part applied: {v}");

    // Back to what the process started with: nothing is reported any more.
    setup.write_config(0, "");
    let summary = server.reloader.reload_now().await.expect("reload succeeds");
    assert!(summary.ignored.is_empty(), "{summary:?}");
    server.stop().await;
}
