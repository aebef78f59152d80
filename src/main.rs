//! The `chatguard` binary: a thin CLI over the library.
//!
//! - `serve`: run the WebSocket sidecar.
//! - `check`: moderate stdin, one message per line, one JSON verdict per line.

use anyhow::Context;
use chatguard::config::{Config, RawConfig};
use chatguard::moderator::{EventHub, Moderator, TextModel};
use chatguard::server::protocol::{ModerateRequest, to_json};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "chatguard", version, about = "Content-moderation sidecar for IM servers")]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "CHATGUARD_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the WebSocket server.
    Serve {
        /// Address to listen on (overrides server.listen).
        #[arg(long, env = "CHATGUARD_LISTEN")]
        listen: Option<SocketAddr>,
        /// Address of the admin endpoints (overrides admin.listen).
        #[arg(long, env = "CHATGUARD_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
        /// TOML config file.
        #[arg(long, env = "CHATGUARD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Moderate stdin: one message per line in, one JSON verdict per line out.
    Check {
        /// TOML config file (wordlists, policies).
        #[arg(long, env = "CHATGUARD_CONFIG")]
        config: Option<PathBuf>,
        /// Skip the models; use the wordlists only.
        #[arg(long)]
        lexicon_only: bool,
        /// Policy to apply.
        #[arg(long, default_value = "default")]
        policy: String,
    },
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    let mut raw = match path {
        Some(p) => RawConfig::from_file(p)?,
        None => RawConfig::default(),
    };
    raw.apply_env();
    Ok(Config::build(raw)?)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    match cli.command {
        Command::Serve {
            listen,
            admin_listen,
            config,
        } => runtime.block_on(serve(listen, admin_listen, config)),
        Command::Check {
            config,
            lexicon_only,
            policy,
        } => runtime.block_on(check(config, lexicon_only, policy)),
    }
}

async fn serve(
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    config: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut config = load_config(config.as_ref())?;
    if let Some(addr) = listen {
        config.server.listen = addr;
    }
    if let Some(addr) = admin_listen {
        config.admin.listen = addr;
    }
    let addr = config.server.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (set --listen or server.listen)"))?;
    let admin = if config.admin.enabled {
        let addr = config.admin.listen;
        Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} (set --admin-listen or admin.listen, or admin.enabled = false)")
        })?)
    } else {
        None
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    chatguard::server::run_with_admin(listener, admin, config, shutdown).await?;
    Ok(())
}

async fn wait_for_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    shutdown.cancel();
}

async fn check(config: Option<PathBuf>, lexicon_only: bool, policy: String) -> anyhow::Result<()> {
    let config = load_config(config.as_ref())?;
    if !config.policies.contains_key(&policy) {
        anyhow::bail!("unknown policy `{policy}` (--policy)");
    }
    let text_model = if lexicon_only {
        TextModel::Disabled
    } else {
        TextModel::load(&config.text_model).await
    };
    let moderator = Moderator::new(&config, None, EventHub::default()).with_text_model(text_model);
    let tenant: Arc<str> = Arc::from(chatguard::config::DEFAULT_TENANT);
    let stdin = std::io::stdin();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (n, line) in stdin.lock().lines().enumerate() {
        let line = line.with_context(|| format!("stdin line {} is not UTF-8", n + 1))?;
        let req = ModerateRequest {
            id: (n + 1).to_string(),
            user: "check".into(),
            room: None,
            to: None,
            policy: Some(policy.clone()),
            text: Some(line),
            images: Vec::new(),
        };
        let json = match moderator.moderate(&tenant, req).await {
            Ok(v) => to_json(&v),
            Err(e) => to_json(&chatguard::server::protocol::ErrorReply::new(
                Some((n + 1).to_string()),
                e.code(),
                e.to_string(),
            )),
        };
        writeln!(out, "{json}")?;
    }
    out.flush()?;
    Ok(())
}
