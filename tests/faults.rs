//! Fault injection against the real server: each test breaks one thing and shows the
//! documented behaviour (degraded verdicts, a clear error, no crash, no leak).
//!
//! Most tests run the real `chatguard serve` binary as a child process (JSON logs on stderr,
//! port 0): its log is what the operator sees, ONNX Runtime is loaded once per process (a test
//! process that already loaded it could not show "library missing"), and the idle-connection
//! test needs the server's file descriptors apart from the client's.
//!
//! Covered here: corrupt model files, valid models with the wrong tensors, a missing ONNX
//! Runtime library, a full disk under the behaviour snapshot (at start-up and while serving),
//! a client that disconnects with a batch in flight, slowloris handshakes, a client that stops
//! reading its replies, many idle connections and the global connection limit.
//! Covered elsewhere: missing model files (`e2e::missing_model_files_degrade_instead_of_failing`),
//! Redis down (`behaviour::a_redis_outage_degrades_verdicts_and_reconciles_after`).

use base64::Engine;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::common::{TOKEN, Ws, send};

/// Upper bound for anything the tests wait on (a debug build on a busy machine is slow); the
/// tests assert what happens, never how fast.
const PATIENCE: Duration = Duration::from_secs(60);

/// The repository's model directory (filled by `make models`).
fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

fn ort_dylib() -> PathBuf {
    models_dir().join("onnxruntime/libonnxruntime.so.1.31.1")
}

/// A `chatguard serve` child process with its stderr (JSON log lines) collected.
struct Proc {
    child: Child,
    /// The WebSocket listener.
    addr: SocketAddr,
    /// The admin listener.
    admin: SocketAddr,
    /// Every log line so far.
    log: Arc<Mutex<Vec<Value>>>,
    /// Holds the config file (and whatever the test put beside it).
    _dir: tempfile::TempDir,
}

impl Proc {
    /// Starts the server with `config` (TOML, written to a temp dir that is also its working
    /// directory) and waits until it listens. The text and image models are off unless the
    /// config turns them on; the token is [`TOKEN`].
    fn start(config: &str) -> Proc {
        let dir = tempfile::tempdir().expect("tempdir");
        let (child, log) = Self::spawn(dir.path(), config);
        let mut proc = Proc {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            log,
            _dir: dir,
        };
        let addr_of = |proc: &mut Proc, message: &str| -> SocketAddr {
            let line = proc.wait_log(|l| l["fields"]["message"].as_str() == Some(message));
            line["fields"]["addr"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no addr in {line}"))
        };
        proc.admin = addr_of(&mut proc, "admin endpoints: /healthz /readyz /metrics");
        proc.addr = addr_of(&mut proc, "listening");
        proc
    }

    /// Spawns the binary without waiting; the caller watches the log.
    fn spawn(dir: &Path, config: &str) -> (Child, Arc<Mutex<Vec<Value>>>) {
        let file = dir.join("chatguard.toml");
        let config = format!(
            "{config}\n[auth.tokens]\n\"{TOKEN}\" = \"acme\"\n",
            config = with_defaults(config)
        );
        std::fs::write(&file, config).expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatguard"))
            .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0", "--config"])
            .arg(&file)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .env_remove("CHATGUARD_TOKEN")
            .env_remove("CHATGUARD_REDIS_URL")
            .env_remove("CHATGUARD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chatguard serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().expect("log lock").push(v);
            }
        });
        (child, log)
    }

    /// Waits for a log line matching `want` and returns it; fails with the log if the process
    /// exits or [`PATIENCE`] passes first.
    fn wait_log(&mut self, want: impl Fn(&Value) -> bool) -> Value {
        wait_log(&mut self.child, &self.log, want)
    }

    /// Whether a log line matches `want`.
    fn logged(&self, want: impl Fn(&Value) -> bool) -> bool {
        self.log.lock().expect("log lock").iter().any(want)
    }

    /// Fails the test if the process has exited.
    fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("chatguard exited ({status}); log:\n{}", self.dump());
        }
    }

    fn dump(&self) -> String {
        dump(&self.log)
    }

    /// The server's resident memory in KiB (`VmRSS`), where `/proc` has it.
    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    async fn connect(&self) -> Ws {
        connect(self.addr).await.expect("connect")
    }

    /// `GET path` on the admin listener: (status, body).
    async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    /// The value of one metric line (`name{labels}`), 0 if absent.
    async fn metric(&self, name: &str) -> f64 {
        crate::common::metric(self.admin, name).await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test defaults under `config`: models off (unless the config has those sections), no
/// snapshot in the working directory (unless it has `[behaviour]`).
fn with_defaults(config: &str) -> String {
    let mut out = config.to_string();
    if !config.contains("[text_model]") {
        out.push_str("\n[text_model]\nenabled = false\n");
    }
    if !config.contains("[image]") {
        out.push_str("\n[image]\nmodel_enabled = false\n");
    }
    out
}

fn wait_log(child: &mut Child, log: &Mutex<Vec<Value>>, want: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        if let Some(line) = log.lock().expect("log lock").iter().find(|l| want(l)) {
            return line.clone();
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            // Let the reader thread drain what the process wrote last.
            std::thread::sleep(Duration::from_millis(200));
            if let Some(line) = log.lock().expect("log lock").iter().find(|l| want(l)) {
                return line.clone();
            }
            panic!("chatguard exited ({status}); log:\n{}", dump(log));
        }
        assert!(
            started.elapsed() < PATIENCE,
            "log line not seen; log:\n{}",
            dump(log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn dump(log: &Mutex<Vec<Value>>) -> String {
    log.lock()
        .expect("log lock")
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The log line's message and fields, as one string to search.
fn line_text(l: &Value) -> String {
    l.get("fields")
        .map_or_else(|| l.to_string(), |f| f.to_string())
}

async fn connect(addr: SocketAddr) -> Result<Ws, WsError> {
    let mut req = format!("ws://{addr}/v1/ws")
        .into_client_request()
        .expect("valid url");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("header"),
    );
    tokio::time::timeout(PATIENCE, connect_async(req))
        .await
        .expect("handshake finishes")
        .map(|(ws, _)| ws)
}

/// The next JSON text frame.
async fn recv(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a reply in time")
            .expect("stream open")
            .expect("frame ok");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("reply is JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Sends one `moderate` request and returns its verdict.
async fn moderate(ws: &mut Ws, id: &str, fields: Value) -> Value {
    let mut req = json!({"type":"moderate","id":id,"user":"u1"});
    for (k, v) in fields.as_object().expect("object").iter() {
        req[k] = v.clone();
    }
    send(ws, req).await;
    // Pushed events (a sanction, a room alarm) may come first.
    let v = loop {
        let v = recv(ws).await;
        if !matches!(v["type"].as_str(), Some("sanction" | "room_alarm")) {
            break v;
        }
    };
    assert_eq!(v["type"], "verdict", "{v}");
    assert_eq!(v["id"], id, "{v}");
    v
}

use crate::common::http_get;

/// Polls `check` until it is true; fails with `what` after [`PATIENCE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < PATIENCE, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small PNG, base64.
fn png_b64() -> String {
    let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 8, y as u8 * 8, 90]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut bytes, image::ImageFormat::Png)
        .expect("png encodes");
    base64::engine::general_purpose::STANDARD.encode(bytes.into_inner())
}

/// TOML string literal for a path.
fn toml_path(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

// ---------------------------------------------------------------------------------------------
// Models and runtime.

/// The text model (MiniLM) and the image model files in models/.
const MINILM: &str = "minilm/minilm-l6-v2.onnx";
const IMAGE_MODEL: &str = "image/image-safety-classifier-s.onnx";

/// A directory with the layout of models/, every file a link to the real one except the text
/// and image models ([`MINILM`], [`IMAGE_MODEL`]), which the test writes; `None` when models/
/// is not set up (the test is then skipped, as it says).
fn models_but_the_two() -> Option<tempfile::TempDir> {
    if !ort_dylib().is_file() {
        eprintln!(
            "SKIPPED: {} missing (run `make models`)",
            ort_dylib().display()
        );
        return None;
    }
    let models = tempfile::tempdir().expect("tempdir");
    for sub in ["minilm", "toxblock", "head", "image"] {
        std::fs::create_dir(models.path().join(sub)).expect("mkdir");
    }
    for file in [
        "minilm/tokenizer.json",
        "toxblock/toxblock.onnx",
        "toxblock/toxblock_tokenizer.json",
        "head/text_head.json",
    ] {
        std::os::unix::fs::symlink(models_dir().join(file), models.path().join(file))
            .expect("symlink");
    }
    Some(models)
}

/// Starts the server with both models enabled from `models` and checks that `/readyz` says
/// ready (models are optional) with both model stages unavailable for a reason that names the
/// model file and says `why`.
async fn start_with_unloadable_models(models: &Path, why: &str) -> Proc {
    let config = format!(
        "[text_model]\nenabled = true\nmodels_dir = {m}\nort_dylib_path = {o}\n\
         [image]\nmodel_enabled = true\nmodels_dir = {m}\nort_dylib_path = {o}\n",
        m = toml_path(models),
        o = toml_path(&ort_dylib()),
    );
    let server = Proc::start(&config);
    let (status, body) = server.admin_get("/readyz").await;
    assert_eq!(status, 200, "models are optional for readiness: {body}");
    let ready: Value = serde_json::from_str(&body).expect("readyz JSON");
    for (stage, file) in [
        ("text_model", "minilm-l6-v2.onnx"),
        ("image_model", "image-safety-classifier-s.onnx"),
    ] {
        let reason = ready["stages"][stage].as_str().unwrap_or("");
        assert!(
            reason.starts_with("unavailable: cannot load")
                && reason.contains(file)
                && reason.contains(why),
            "{stage} should be unavailable with {why:?}: {body}"
        );
    }
    server
}

/// Sends abuse with an image (id `i1`) as request `id` to a server whose both models are
/// unavailable: the verdict says both are degraded, and the lexicon still does not allow it.
async fn abuse_with_an_image_degraded(ws: &mut Ws, id: &str) -> Value {
    let v = moderate(
        ws,
        id,
        json!({"text":"go fuck yourself","images":[{"id":"i1","data":png_b64()}]}),
    )
    .await;
    assert_eq!(v["degraded"], json!(["text_model", "image_model"]), "{v}");
    assert_ne!(v["action"], "allow", "the lexicon still works: {v}");
    v
}

/// Truncated text model and a garbage image model: the server starts, `/readyz` names the bad
/// files, and every verdict comes with `degraded: ["text_model", "image_model"]` while the
/// lexicon still blocks abuse.
#[tokio::test]
async fn corrupt_model_files_degrade_verdicts() {
    let Some(models) = models_but_the_two() else {
        return;
    };
    let minilm = std::fs::read(models_dir().join(MINILM)).expect("read minilm");
    std::fs::write(
        models.path().join(MINILM),
        &minilm[..minilm.len().min(64 << 10)],
    )
    .expect("write truncated model");
    std::fs::write(
        models.path().join(IMAGE_MODEL),
        b"this is not an ONNX model\x00\xff\xfe".repeat(100),
    )
    .expect("write garbage model");
    let mut server = start_with_unloadable_models(models.path(), "").await;
    let mut ws = server.connect().await;
    let v = abuse_with_an_image_degraded(&mut ws, "c1").await;
    assert_eq!(v["images"][0]["id"], "i1", "{v}");
    let v = moderate(&mut ws, "c2", json!({"text":"hello there"})).await;
    assert_eq!(v["degraded"], json!(["text_model"]), "{v}");
    assert_eq!(v["action"], "allow", "{v}");
    server.assert_alive();
}

/// Valid ONNX files that are the wrong models (the tox-block text model where MiniLM belongs,
/// MiniLM where the image model belongs): they load, but lack the tensors chatguard feeds and
/// reads, so they are refused at start-up with the missing tensor names rather than failing
/// at the first request; verdicts come degraded.
#[tokio::test]
async fn valid_models_with_the_wrong_tensors_are_refused_at_load() {
    let Some(models) = models_but_the_two() else {
        return;
    };
    for (file, other) in [(MINILM, "toxblock/toxblock.onnx"), (IMAGE_MODEL, MINILM)] {
        std::os::unix::fs::symlink(models_dir().join(other), models.path().join(file))
            .expect("symlink");
    }
    let mut server =
        start_with_unloadable_models(models.path(), "model lacks input/output tensors").await;
    let mut ws = server.connect().await;
    abuse_with_an_image_degraded(&mut ws, "w1").await;
    server.assert_alive();
}

/// The ONNX Runtime library is not where the config says: the server starts, logs an error
/// that names the file and the setting, and verdicts come degraded instead of failing.
#[tokio::test]
async fn missing_onnx_runtime_library_degrades_verdicts() {
    let missing = "/nonexistent/chatguard/libonnxruntime.so.1.31.1";
    let config = format!(
        "[text_model]\nenabled = true\nmodels_dir = {m}\nort_dylib_path = \"{missing}\"\n\
         [image]\nmodel_enabled = true\nmodels_dir = {m}\nort_dylib_path = \"{missing}\"\n",
        m = toml_path(&models_dir()),
    );
    let mut server = Proc::start(&config);
    assert!(
        server.logged(|l| {
            let t = line_text(l);
            t.contains("ONNX Runtime library") && t.contains(missing)
        }),
        "the log names the missing library:\n{}",
        server.dump()
    );
    let (_, body) = server.admin_get("/readyz").await;
    assert!(
        body.contains("ONNX Runtime library not found") && body.contains("ort_dylib_path"),
        "{body}"
    );
    let mut ws = server.connect().await;
    abuse_with_an_image_degraded(&mut ws, "o1").await;
    for i in 0..20 {
        let v = moderate(&mut ws, &format!("o{}", i + 2), json!({"text":"hi"})).await;
        assert_eq!(v["degraded"], json!(["text_model"]), "{v}");
    }
    server.assert_alive();
}

// ---------------------------------------------------------------------------------------------
// Disk.

/// A full disk under the behaviour snapshot at start-up: the server refuses to start (it
/// could not keep sanctions across a restart) with an error naming the setting.
#[test]
fn full_disk_for_the_snapshot_at_start_up_is_a_clear_error() {
    if !Path::new("/dev/full").exists() {
        eprintln!("SKIPPED: no /dev/full");
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let snapshot = state.path().join("behaviour.snap");
    // Every write of the snapshot (written as `<path>.tmp`, then renamed) hits ENOSPC.
    std::os::unix::fs::symlink("/dev/full", state.path().join("behaviour.snap.tmp"))
        .expect("symlink");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!("[behaviour]\nsnapshot_path = {}\n", toml_path(&snapshot));
    let (mut child, log) = Proc::spawn(dir.path(), &config);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > PATIENCE {
            let _ = child.kill();
            panic!("server started on a full disk; log:\n{}", dump(&log));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    wait_log(&mut child, &log, |l| {
        let t = l.to_string();
        t.contains("behaviour.snapshot_path") && t.contains("No space left on device")
    });
}

/// The disk fills up while serving: each snapshot attempt fails with an error in the log,
/// verdicts and sanctions carry on (the journal file is already open), and once there is space
/// again the next snapshot is written.
#[tokio::test]
async fn full_disk_for_the_snapshot_while_serving_keeps_verdicts_coming() {
    if !Path::new("/dev/full").exists() {
        eprintln!("SKIPPED: no /dev/full");
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let snapshot = state.path().join("behaviour.snap");
    let tmp = state.path().join("behaviour.snap.tmp");
    let config = format!(
        "[behaviour]\nsnapshot_path = {}\nsnapshot_interval_secs = 1\n",
        toml_path(&snapshot)
    );
    let mut server = Proc::start(&config);
    assert!(snapshot.is_file(), "the start-up snapshot is written");
    let mut ws = server.connect().await;
    moderate(&mut ws, "d0", json!({"text":"hello"})).await;

    std::os::unix::fs::symlink("/dev/full", &tmp).expect("symlink");
    let failed = |l: &Value| {
        l["level"] == "ERROR"
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("cannot write the behaviour snapshot"))
            && l["fields"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("No space left on device"))
    };
    server.wait_log(failed);
    let errors = server
        .metric("chatguard_behaviour_persist_errors_total")
        .await;
    assert!(errors >= 1.0, "the failed snapshot is counted: {errors}");
    // Verdicts and sanctions continue meanwhile.
    let mut sanctioned = false;
    for i in 0..10 {
        let v = moderate(
            &mut ws,
            &format!("d{}", i + 1),
            json!({"user":"troll","text":"kill yourself you worthless idiot"}),
        )
        .await;
        assert_eq!(v["action"], "block", "{v}");
        sanctioned |= v["sender"]["state"] != "ok";
    }
    assert!(sanctioned, "abuse is still sanctioned");
    let v = moderate(&mut ws, "d-clean", json!({"user":"nice","text":"thanks!"})).await;
    assert_eq!(v["action"], "allow", "{v}");
    server.assert_alive();

    // Space again: the next snapshot lands.
    let before = std::fs::metadata(&snapshot)
        .and_then(|m| m.modified())
        .expect("snapshot mtime");
    std::fs::remove_file(&tmp).expect("remove link");
    eventually("a snapshot is written once there is space", || async {
        std::fs::metadata(&snapshot)
            .and_then(|m| m.modified())
            .is_ok_and(|m| m > before)
    })
    .await;
    let v = moderate(&mut ws, "d-after", json!({"text":"hello again"})).await;
    assert_eq!(v["degraded"], json!([]), "{v}");
    server.assert_alive();
}

/// `snapshot_path` in `dir`, a snapshot attempt every second.
fn snapshot_config(snapshot: &Path) -> String {
    format!(
        "[behaviour]\nsnapshot_path = {}\nsnapshot_interval_secs = 1\n",
        toml_path(snapshot)
    )
}

/// Blocks `user` for an hour by hand (a journaled sanction change).
async fn block_by_hand(ws: &mut Ws, user: &str) {
    send(
        ws,
        json!({"type":"sanction","id":"by-hand","user":user,"action":"block","duration_secs":3600}),
    )
    .await;
    let v = loop {
        let v = recv(ws).await;
        if v.get("id").is_some() {
            break v;
        }
    };
    assert_eq!(v["type"], "sanction", "{v}");
    assert_eq!(v["action"], "block", "{v}");
}

/// The state `user` is in after a restart.
async fn state_after_restart(snapshot: &Path, user: &str) -> Value {
    let server = Proc::start(&snapshot_config(snapshot));
    let mut ws = server.connect().await;
    let v = moderate(
        &mut ws,
        "after-restart",
        json!({"user":user,"text":"hello"}),
    )
    .await;
    v["sender"]["state"].clone()
}

fn snapshot_failed(l: &Value) -> bool {
    l["level"] == "ERROR"
        && l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("cannot write the behaviour snapshot"))
}

/// Regression: after a failed snapshot the next attempt renamed the journal over
/// `.journal.prev`, which still held changes no snapshot had; a crash while the disk was full
/// then lost them. A sanction made on a full disk survives a crash and a restart.
#[tokio::test]
async fn a_sanction_made_on_a_full_disk_survives_a_crash() {
    if !Path::new("/dev/full").exists() {
        eprintln!("SKIPPED: no /dev/full");
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let snapshot = state.path().join("behaviour.snap");
    let tmp = state.path().join("behaviour.snap.tmp");
    {
        let mut server = Proc::start(&snapshot_config(&snapshot));
        let mut ws = server.connect().await;
        std::os::unix::fs::symlink("/dev/full", &tmp).expect("symlink");
        server.wait_log(snapshot_failed);
        block_by_hand(&mut ws, "troll").await;
        // Two more failed snapshots after the sanction, then a crash (SIGKILL).
        let failures = |server: &Proc| {
            server
                .log
                .lock()
                .expect("log")
                .iter()
                .filter(|l| snapshot_failed(l))
                .count()
        };
        let seen = failures(&server);
        while failures(&server) < seen + 2 {
            server.assert_alive();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    std::fs::remove_file(&tmp).expect("remove link");
    assert_eq!(state_after_restart(&snapshot, "troll").await, "block");
}

/// Regression: a start-up on a full disk truncated the journal before it failed to write the
/// snapshot, so the next start lost every change since the last snapshot. A failed start-up
/// loses nothing.
#[tokio::test]
async fn a_failed_start_on_a_full_disk_loses_no_sanction() {
    if !Path::new("/dev/full").exists() {
        eprintln!("SKIPPED: no /dev/full");
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let snapshot = state.path().join("behaviour.snap");
    {
        let server = Proc::start(&snapshot_config(&snapshot).replace("= 1\n", "= 3600\n"));
        let mut ws = server.connect().await;
        block_by_hand(&mut ws, "troll").await;
        // The journal is written just after the reply; then a crash (SIGKILL): the sanction
        // is only in the journal.
        let journal = state.path().join("behaviour.snap.journal");
        eventually("the sanction is journaled", || async {
            std::fs::metadata(&journal).is_ok_and(|m| m.len() >= 32 + 30)
        })
        .await;
    }
    let tmp = state.path().join("behaviour.snap.tmp");
    std::os::unix::fs::symlink("/dev/full", &tmp).expect("symlink");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, log) = Proc::spawn(dir.path(), &snapshot_config(&snapshot));
    wait_log(&mut child, &log, |l| {
        l.to_string().contains("No space left on device")
    });
    let status = child.wait().expect("wait");
    assert!(!status.success(), "started on a full disk");
    std::fs::remove_file(&tmp).expect("remove link");
    assert_eq!(state_after_restart(&snapshot, "troll").await, "block");
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// A client sends a batch of requests and disconnects without reading the replies: the server
/// keeps serving another client, the connection gauge returns to what is really open, the text
/// model's queue drains, and the gone client's verdicts are still finished and can be looked up
/// (by design: an IM server that lost its connection asks for them with `lookup`).
#[tokio::test]
async fn client_disconnect_mid_batch_leaks_nothing() {
    let model = ort_dylib().is_file();
    // With the models present, the batch waits in the text model's queue when the client leaves.
    let config = if model {
        format!(
            "[text_model]\nenabled = true\nmodels_dir = {}\nintra_threads = 1\n",
            toml_path(&models_dir())
        )
    } else {
        String::new()
    };
    let server = Proc::start(&config);
    let mut steady = server.connect().await;
    moderate(&mut steady, "s0", json!({"text":"hello"})).await;
    // Messages the text model admitted or refused so far.
    let admitted = || async {
        server.metric("chatguard_text_model_submitted_total").await
            + server.metric("chatguard_text_model_overloads_total").await
    };
    for round in 0..3 {
        let before = if model { admitted().await } else { 0.0 };
        let mut ws = server.connect().await;
        for i in 0..200 {
            let text = if i % 3 == 0 {
                "you are a stupid idiot".to_string()
            } else {
                format!("message number {i} of round {round}, nothing to see")
            };
            send(
                &mut ws,
                json!({"type":"moderate","id":format!("r{round}-b{i}"),"user":format!("u{i}"),"text":text}),
            )
            .await;
        }
        if model {
            // The server has read the whole batch (each message reached the model's queue)
            // before the client goes: dropping a socket with unread replies resets the
            // connection, and a reset discards whatever the server had not read yet.
            eventually("the server reads the whole batch", || async {
                admitted().await >= before + 200.0
            })
            .await;
        }
        // Drop the socket without a close handshake or reading anything.
        drop(ws);
        let v = moderate(
            &mut steady,
            &format!("s{}", round + 1),
            json!({"user":format!("steady{round}"),"text":"still there?"}),
        )
        .await;
        assert_eq!(v["action"], "allow", "{v}");
    }
    eventually("the dropped connections are closed", || async {
        server.metric("chatguard_connections_open").await == 1.0
    })
    .await;
    if model {
        // Nothing stays queued for the gone clients, and every message of theirs was either run
        // or dropped because its requester had gone (or timed out in the queue).
        eventually("the text model queue drains", || async {
            server.metric("chatguard_text_model_queue_depth").await == 0.0
        })
        .await;
        let batched = server
            .metric("chatguard_text_model_batched_items_total")
            .await;
        let cancelled = server.metric("chatguard_text_model_cancelled_total").await;
        let timeouts = server.metric("chatguard_text_model_timeouts_total").await;
        let failed = server.metric("chatguard_text_model_failed_total").await;
        let submitted = server.metric("chatguard_text_model_submitted_total").await;
        eprintln!(
            "text model: {submitted} admitted, {batched} run, {cancelled} dropped (requester \
             gone), {timeouts} timed out, {failed} failed"
        );
        assert!(submitted >= 600.0, "{submitted}");
        assert_eq!(batched + cancelled + timeouts + failed, submitted);
    }
    // The last request of each dropped batch was still judged, and its verdict is kept.
    for round in 0..3 {
        let message = format!("r{round}-b199");
        let started = Instant::now();
        for n in 0.. {
            let id = format!("q{round}-{n}");
            send(
                &mut steady,
                json!({"type":"lookup","id":id,"message":message}),
            )
            .await;
            let v = loop {
                let v = recv(&mut steady).await;
                if !matches!(v["type"].as_str(), Some("sanction" | "room_alarm")) {
                    break v;
                }
            };
            assert_eq!(v["type"], "lookup_result", "{v}");
            assert_eq!(v["id"], id, "{v}");
            if v["found"] == true {
                assert_eq!(v["verdict"]["id"], message.as_str(), "{v}");
                break;
            }
            assert!(started.elapsed() < PATIENCE, "{message} never stored: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let v = moderate(&mut steady, "s-last", json!({"text":"and now?"})).await;
    assert_eq!(v["type"], "verdict");
}

/// Slowloris: connections that dribble an HTTP upgrade request are closed at
/// `server.handshake_timeout_ms`, and a normal client is served meanwhile.
#[tokio::test]
async fn slowloris_handshakes_are_cut_off_by_the_handshake_deadline() {
    let server = Proc::start("[server]\nhandshake_timeout_ms = 300\n");
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(server.addr).await.expect("tcp connect");
        s.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("partial request");
        slow.push(s);
    }
    // A normal client gets through meanwhile.
    let mut ws = server.connect().await;
    moderate(&mut ws, "n1", json!({"text":"hello"})).await;
    // Each slow client keeps sending one header byte at a time and is cut off anyway.
    let tasks: Vec<_> = slow
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let started = Instant::now();
                let mut buf = [0u8; 256];
                loop {
                    assert!(started.elapsed() < PATIENCE, "slow client never cut off");
                    if s.write_all(b"X").await.is_err() {
                        return;
                    }
                    match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
                        Ok(Ok(0) | Err(_)) => return,
                        Ok(Ok(_)) => panic!("the server answered a partial request"),
                        Err(_) => {}
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("slow client task");
    }
    eventually("the cut-off handshakes are counted", || async {
        server.metric("chatguard_handshakes_rejected_total").await >= 20.0
    })
    .await;
    assert_eq!(server.metric("chatguard_connections_open").await, 1.0);
    moderate(&mut ws, "n2", json!({"text":"still served"})).await;
}

/// Sends pings on `ws` without reading a pong until a send does not finish within a second
/// (every buffer full: the server stops reading a client whose replies back up) or fails (the
/// server dropped it already). Returns how many went out.
async fn ping_without_reading(ws: &mut Ws) -> u64 {
    use futures_util::SinkExt;
    let id = "p".repeat(200);
    let started = Instant::now();
    let mut sent = 0;
    loop {
        assert!(
            started.elapsed() < PATIENCE,
            "{sent} pings and the pipe never filled"
        );
        let ping = Message::text(json!({"type": "ping", "id": id}).to_string());
        match tokio::time::timeout(Duration::from_secs(1), ws.send(ping)).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(_)) | Err(_) => return sent,
        }
    }
}

/// A client that stops reading its replies: once one reply has waited `server.write_timeout_ms`
/// for it, the server drops the connection (counted in `chatguard_write_timeouts_total`)
/// instead of holding it, its requests and the server's shutdown forever; another client is
/// served meanwhile.
#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_at_the_write_timeout() {
    let server = crate::common::Server::start(|raw| {
        raw.server.write_timeout_ms = 300;
        raw.server.outgoing_queue_len = 4;
    })
    .await;
    let mut stalled = server.connect().await;
    let sent = ping_without_reading(&mut stalled).await;
    // What the server sent before it gave up drains; then the stream ends. A server that kept
    // the connection would go on answering the queued pings and then leave it open.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut pongs = 0u64;
    loop {
        match tokio::time::timeout_at(deadline, stalled.next()).await {
            Err(_) => panic!("the server kept a client that stopped reading ({pongs} pongs)"),
            Ok(None | Some(Err(_))) => break,
            Ok(Some(Ok(Message::Text(t)))) => {
                assert!(t.as_str().contains("pong"), "unexpected reply {t}");
                pongs += 1;
            }
            Ok(Some(Ok(other))) => panic!("unexpected frame {other:?}"),
        }
    }
    assert!(pongs < sent, "every one of {sent} pings was answered");
    assert_eq!(server.metric("chatguard_write_timeouts_total").await, 1.0);
    // Another client is served.
    let mut ws = server.connect().await;
    send(&mut ws, json!({"type": "ping", "id": "after"})).await;
    let pong = recv(&mut ws).await;
    assert_eq!(pong["id"], "after");
    // One more stops reading, and the server is told to stop right away: it does (`stop`
    // allows 15 s; a connection stuck on a reply that is never taken held it forever).
    let mut second = server.connect().await;
    ping_without_reading(&mut second).await;
    server.stop().await;
}

/// Many idle WebSocket connections: they cost little memory each, the server still answers a
/// new client, and one more than `server.max_connections` is refused with HTTP 503 (and let in
/// once a slot frees up).
///
/// `CHATGUARD_FAULT_IDLE=N` sets the number of idle connections (default 2000; 10,000 was run by
/// hand: the client side needs one descriptor per connection, the server another).
#[tokio::test]
async fn idle_connections_and_the_global_connection_limit() {
    let idle: usize = std::env::var("CHATGUARD_FAULT_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let server = Proc::start(&format!(
        "[server]\nmax_connections = {}\nhandshake_timeout_ms = 60000\n",
        idle + 1
    ));
    // One request first, so that the lazily built parts of the server count in the baseline.
    moderate(&mut server.connect().await, "warm", json!({"text":"hi"})).await;
    let rss_before = server.rss_kib();
    let mut conns = Vec::with_capacity(idle);
    // A few handshakes at a time: a connect storm is not what this test is about.
    let mut pending =
        futures_util::stream::iter((0..idle).map(|_| connect(server.addr))).buffer_unordered(64);
    while let Some(ws) = pending.next().await {
        conns.push(ws.expect("idle connection accepted"));
    }
    eventually("every idle connection is counted", || async {
        server.metric("chatguard_connections_open").await == idle as f64
    })
    .await;

    // Memory per idle connection stays small (it was ~135 KB with tungstenite's default 128 KiB
    // read buffer per connection: 1.3 GB for 10,000).
    if let (Some(before), Some(after)) = (rss_before, server.rss_kib()) {
        let per_conn = after.saturating_sub(before) as f64 / idle as f64;
        eprintln!(
            "server RSS: {before} KiB, with {idle} idle connections {after} KiB \
             ({per_conn:.1} KiB each)"
        );
        assert!(per_conn < 64.0, "{per_conn:.1} KiB per idle connection");
    }

    // The last free slot serves a new client normally.
    let mut active = server.connect().await;
    moderate(
        &mut active,
        "a1",
        json!({"text":"hello with everyone idle"}),
    )
    .await;

    // One more is refused with 503 before the upgrade.
    match connect(server.addr).await {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            let body = resp.body().as_deref().map(String::from_utf8_lossy);
            assert!(
                body.as_deref()
                    .is_some_and(|b| b.contains("server.max_connections")),
                "{body:?}"
            );
        }
        Err(e) => panic!("expected HTTP 503, got {e}"),
        Ok(_) => panic!("connection over server.max_connections was accepted"),
    }

    // Idle connections still work when they wake up.
    for (i, ws) in conns.iter_mut().step_by(idle / 10 + 1).enumerate() {
        moderate(ws, &format!("w{i}"), json!({"text":"waking up"})).await;
    }

    // Freeing a slot lets a new client in.
    let mut one = conns.pop().expect("at least one idle connection");
    one.close(None).await.expect("close");
    drop(one);
    eventually("a freed slot admits a new client", || async {
        connect(server.addr).await.is_ok()
    })
    .await;
    moderate(&mut active, "a2", json!({"text":"still here"})).await;
}
