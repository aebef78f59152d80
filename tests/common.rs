//! Helpers shared by the end-to-end test modules: the real server on port 0 and a WebSocket
//! client.

use chatguard::config::{Config, RawConfig};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use tokio_util::sync::CancellationToken;

/// A client connection.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The token every test server accepts (tenant `acme`).
pub const TOKEN: &str = "test-token-acme";

/// A second token every test server accepts (tenant `other`).
pub const OTHER_TOKEN: &str = "test-token-other";

/// A running server; stop it with [`Server::stop`].
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The admin endpoints (`/healthz`, `/readyz`, `/metrics`).
    pub admin: SocketAddr,
    /// Cancels the server.
    shutdown: CancellationToken,
    /// The server task.
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Starts a server with the text model off (unless `edit` turns it on) and two tokens,
    /// [`TOKEN`] (tenant `acme`) and [`OTHER_TOKEN`] (tenant `other`).
    pub async fn start(edit: impl FnOnce(&mut RawConfig)) -> Server {
        let mut raw = RawConfig::default();
        raw.text_model.enabled = false;
        // Decode deadlines are for release builds; a debug build on a busy machine is slower.
        raw.image.decode_timeout_ms = 60_000;
        raw.auth.tokens.insert(TOKEN.into(), "acme".into());
        raw.auth.tokens.insert(OTHER_TOKEN.into(), "other".into());
        edit(&mut raw);
        let config = Config::build(raw).expect("test config is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind admin port 0");
        let addr = listener.local_addr().expect("local addr");
        let admin_addr = admin.local_addr().expect("admin addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chatguard::server::run_with_admin(
            listener,
            Some(admin),
            config,
            shutdown.clone(),
        ));
        Server {
            addr,
            admin: admin_addr,
            shutdown,
            task,
        }
    }

    /// The value of one `/metrics` series, 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric(self.admin, series).await
    }

    /// Connects with [`TOKEN`].
    pub async fn connect(&self) -> Ws {
        connect_as(self.addr, TOKEN).await
    }

    /// Tries to open `ws://addr{path}`, with `Authorization: Bearer token` when given.
    pub async fn connect_with(&self, token: Option<&str>, path: &str) -> Result<Ws, WsError> {
        try_connect(self.addr, token, path).await
    }

    /// Starts a graceful shutdown (stop accepting, finish in-flight requests, close with 1001);
    /// [`stop`](Self::stop) waits for it.
    pub fn cancel(&self) {
        self.shutdown.cancel();
    }

    /// Shuts the server down and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("server stops within 15s")
            .expect("server task did not panic")
            .expect("server returned Ok");
    }
}

/// Sends a JSON text frame.
pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Sends a binary frame.
pub async fn send_binary(ws: &mut Ws, bytes: Vec<u8>) {
    ws.send(Message::binary(bytes)).await.expect("send binary");
}

/// Next JSON text frame (any other frame fails the test).
pub async fn recv(ws: &mut Ws) -> Value {
    let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .expect("reply within 30s")
        .expect("stream open")
        .expect("frame ok");
    match msg {
        Message::Text(t) => serde_json::from_str(t.as_str()).expect("reply is JSON"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Next reply to a request: pushed events (`sanction`, `room_alarm`) are skipped.
pub async fn recv_reply(ws: &mut Ws) -> Value {
    loop {
        let v = recv(ws).await;
        if !matches!(v["type"].as_str(), Some("sanction" | "room_alarm")) {
            return v;
        }
    }
}

/// The reply with `id`, skipping pushed events and other replies.
pub async fn recv_id(ws: &mut Ws, id: &str) -> Value {
    loop {
        let v = recv(ws).await;
        if v["id"] == id {
            return v;
        }
    }
}

/// The next pushed event of `kind`, skipping other frames.
pub async fn next_event(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let v = recv(ws).await;
        if v["type"] == kind && v.get("id").is_none() {
            return v;
        }
    }
}

/// Opens `ws://addr/v1/ws` with `Authorization: Bearer token`.
pub async fn connect_as(addr: SocketAddr, token: &str) -> Ws {
    try_connect(addr, Some(token), "/v1/ws")
        .await
        .expect("connect")
}

/// Tries to open `ws://addr{path}`, with `Authorization: Bearer token` when given.
async fn try_connect(addr: SocketAddr, token: Option<&str>, path: &str) -> Result<Ws, WsError> {
    let mut req = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("valid url");
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    connect_async(req).await.map(|(ws, _)| ws)
}

/// One HTTP/1.1 `GET` (the admin endpoints) → (status, body); 30 s at most.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect admin");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_string(&mut buf))
        .await
        .expect("admin answers within 30s")
        .expect("read");
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one `/metrics` series (`name{labels}` exactly as exposed), 0 when absent.
pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (_, body) = http_get(admin, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A `redis-server` child process on a loopback port, killed on drop.
pub struct RedisServer {
    /// The process.
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    /// Its working directory (nothing is saved there: `--save ''`).
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server on `port` (a free one when `None`) and waits until it accepts
    /// connections.
    pub fn start(port: Option<u16>) -> RedisServer {
        let port = port.unwrap_or_else(free_port);
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): install it (`apt-get install redis-server`, \
                     or run `make test`, which does) or set CHATGUARD_TEST_REDIS_URL"
                )
            });
        let server = RedisServer {
            child: Some(child),
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {port} in 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL: no goodbye to the clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The Redis to share: `CHATGUARD_TEST_REDIS_URL`, or a server of our own (kept alive by the
/// returned guard).
pub fn shared_redis() -> (String, Option<RedisServer>) {
    match std::env::var("CHATGUARD_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => (url, None),
        _ => {
            let server = RedisServer::start(None);
            (server.url(), Some(server))
        }
    }
}

/// A key prefix no other test (or earlier run) uses.
pub fn unique_prefix(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "cgtest-{test}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
