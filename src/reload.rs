//! # Hot reload
//!
//! Takes a [`ConfigSource`] (the config file plus the environment overrides) and, on request
//! ([`Reloader::reload_now`]: SIGHUP in `main`, tests) or when a watched file changes (the
//! poller, every `server.reload_poll_ms`), gives the running server a new [`Live`] snapshot —
//! tokens, tenants, wordlists, policies with their rules — and new image hash lists, without
//! dropping a connection or a request. Attached to the server by [`crate::server`].
//!
//! How: the new [`Config`] is read and built in full on the blocking pool (parsing, wordlists,
//! rules, hash lists); only when everything built is it swapped in, with one store per
//! component ([`LiveCell::store`], [`crate::image::ImageStage::set_lists`]). A request loads
//! the snapshot once when it starts, so in-flight requests finish with the state they started
//! with. Anything invalid (TOML, a policy, a regex, a wordlist line, a hash list) rejects the
//! whole reload with one `error` log line naming the file and the problem; the running state
//! stays live. Settings that cannot change at runtime (`[server]` including the listen
//! address, `[admin]`, `[behaviour]`, `[text_model]`, `[image]` other than the hash lists)
//! are left as they are, with a `warn` line naming each section that differs.
//!
//! Watched for changes (modification time and size): the config file, the `lexicon.dir`
//! directory and its wordlist files, each policy's `wordlists` (files, or directories and
//! their files). Reloads are serialised. The image hash-list files re-read themselves when
//! they change (see [`crate::image::hashlist`]); a reload picks up a config naming new ones.

use crate::config::{Config, ConfigError, RawConfig, TenantConfig};
use crate::image::ImageStage;
use crate::image::hashlist::{HashListError, HashLists};
use crate::metrics::Metrics;
use crate::policy::CompiledPolicy;
use crate::text::lexicon::Lexicon;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// The settings that change at runtime, as one immutable snapshot.
#[derive(Debug)]
pub struct Live {
    /// Token → tenant. Empty means open: every connection is tenant `default`.
    pub tokens: Arc<HashMap<String, Arc<str>>>,
    /// Compiled policies by name; always has `default`.
    pub policies: Arc<HashMap<String, Arc<CompiledPolicy>>>,
    /// Tenant → its policy choice.
    pub tenants: Arc<HashMap<String, TenantConfig>>,
}

impl Live {
    /// The runtime part of `config`.
    pub fn from_config(config: &Config) -> Live {
        Live {
            tokens: config.tokens.clone(),
            policies: config.policies.clone(),
            tenants: config.tenants.clone(),
        }
    }
}

/// The current [`Live`] snapshot, shared by the moderator, the handshake and the reloader.
/// Readers take an `Arc` (a short read lock); a reload replaces it in one store.
#[derive(Clone, Debug)]
pub struct LiveCell {
    /// The snapshot.
    cell: Arc<RwLock<Arc<Live>>>,
}

impl LiveCell {
    /// A cell holding `live`.
    pub fn new(live: Live) -> LiveCell {
        LiveCell {
            cell: Arc::new(RwLock::new(Arc::new(live))),
        }
    }

    /// The current snapshot; keep it for the whole request.
    pub fn load(&self) -> Arc<Live> {
        self.cell
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the snapshot; returns the previous one (drop it off the runtime: it may hold
    /// the last reference to a large automaton).
    pub fn store(&self, live: Live) -> Arc<Live> {
        let new = Arc::new(live);
        std::mem::replace(
            &mut *self.cell.write().unwrap_or_else(PoisonError::into_inner),
            new,
        )
    }
}

/// Changes applied to every freshly read [`RawConfig`] (environment variables).
type Overrides = Arc<dyn Fn(&mut RawConfig) + Send + Sync>;

/// Where the configuration comes from: an optional TOML file plus overrides.
#[derive(Clone)]
pub struct ConfigSource {
    /// The file; `None` means the embedded defaults (then only the wordlist, policy-wordlist
    /// and hash-list files named by defaults are watched: none).
    path: Option<PathBuf>,
    /// Applied after parsing, on every load.
    overrides: Option<Overrides>,
}

impl std::fmt::Debug for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSource")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ConfigSource {
    /// The TOML file at `path`.
    pub fn file(path: impl Into<PathBuf>) -> ConfigSource {
        ConfigSource {
            path: Some(path.into()),
            overrides: None,
        }
    }

    /// No file (or the file at `path` when given).
    pub fn optional_file(path: Option<PathBuf>) -> ConfigSource {
        ConfigSource {
            path,
            overrides: None,
        }
    }

    /// Applies `f` to every raw config read (e.g. [`RawConfig::apply_env`]).
    pub fn with_overrides(
        mut self,
        f: impl Fn(&mut RawConfig) + Send + Sync + 'static,
    ) -> ConfigSource {
        self.overrides = Some(Arc::new(f));
        self
    }

    /// The config file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Reads the file (or the defaults) and applies the overrides. Blocking.
    pub fn load_raw(&self) -> Result<RawConfig, ConfigError> {
        let mut raw = match &self.path {
            Some(p) => RawConfig::from_file(p)?,
            None => RawConfig::default(),
        };
        if let Some(f) = &self.overrides {
            f(&mut raw);
        }
        Ok(raw)
    }

    /// Reads and builds the config. Blocking (reads wordlists and hash lists).
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::build(self.load_raw()?)
    }

    /// The files a config read from here depends on (see the module docs), this source's file
    /// first.
    fn watched(&self, raw: Option<&RawConfig>) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = self.path.iter().cloned().collect();
        let Some(raw) = raw else {
            return paths;
        };
        let add_tree = |paths: &mut Vec<PathBuf>, p: &Path| {
            paths.push(p.to_path_buf());
            if !p.is_dir() {
                return;
            }
            // Language subdirectories: a file added to one changes its mtime.
            if let Ok(entries) = std::fs::read_dir(p) {
                let mut subdirs: Vec<PathBuf> = entries
                    .filter_map(|e| Some(e.ok()?.path()))
                    .filter(|e| e.is_dir())
                    .collect();
                subdirs.sort();
                paths.extend(subdirs);
            }
            if let Ok(files) = Lexicon::dir_files(p) {
                paths.extend(files);
            }
        };
        if let Some(dir) = &raw.lexicon.dir {
            add_tree(&mut paths, dir);
        }
        for policy in raw.policy.values() {
            for p in &policy.wordlists {
                add_tree(&mut paths, p);
            }
        }
        // Not the hash-list files: each list re-reads itself when its file changes
        // (`hashlist::ListFile`); a full reload for a `chatguard hashlist add` would rebuild
        // every lexicon for nothing. A config naming other list files does reload them.
        paths
    }
}

/// Modification time and size of a file, `None` when it cannot be read.
type Stamp = Option<(SystemTime, u64)>;

fn stamps(paths: &[PathBuf]) -> Vec<Stamp> {
    paths
        .iter()
        .map(|p| {
            let meta = std::fs::metadata(p).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        })
        .collect()
}

/// Why a reload did not happen. The running state is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The reloader is not attached to a running server yet.
    #[error("no running server to reload")]
    NotAttached,
    /// The new configuration is invalid (the message names the file or setting).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// An image hash list is invalid.
    #[error("image hash list: {0}")]
    HashList(#[from] HashListError),
    /// The build task died (a bug).
    #[error("reload task failed: {0}")]
    Task(String),
}

/// What a successful reload installed.
#[derive(Debug, Clone)]
pub struct ReloadSummary {
    /// Generation of the new snapshot.
    pub generation: u64,
    /// Blocking entries of the base lexicon.
    pub lexicon_entries: usize,
    /// Number of policies.
    pub policies: usize,
    /// Time to build and swap.
    pub took: Duration,
    /// Sections that changed but need a restart (ignored).
    pub ignored: Vec<&'static str>,
}

/// What the reloader swaps: set by the server when it starts.
struct Target {
    /// The moderator's snapshot cell (and the handshake's).
    live: LiveCell,
    /// The image stage whose hash lists are replaced.
    images: ImageStage,
    /// Where the reload counters go.
    metrics: Arc<Metrics>,
}

/// Mutable reloader state, behind an async mutex that also serialises reloads.
struct State {
    /// Set once the server runs.
    target: Option<Target>,
    /// Generation of the live snapshot.
    generation: u64,
    /// Files watched by the poller, and their stamps when last read.
    watched: Vec<PathBuf>,
    /// Stamps of `watched` taken before they were last read.
    stamps: Vec<Stamp>,
}

/// Cheap-to-clone handle that reloads the running server's configuration.
#[derive(Clone)]
pub struct Reloader {
    /// Shared state.
    inner: Arc<Inner>,
}

struct Inner {
    /// Where configs come from.
    source: ConfigSource,
    /// The restart-only settings the process started with, as read from `source` (before
    /// command-line overrides), to warn about changes to them.
    started: Fixed,
    /// Target, generation, watch list.
    state: tokio::sync::Mutex<State>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("source", &self.inner.source)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// Reads and builds the initial config from `source` (blocking: call at startup) and
    /// returns a reloader for it together with the config to start the server with (apply
    /// command-line overrides to that copy; the reloader keeps its own).
    pub fn load(source: ConfigSource) -> Result<(Reloader, Config), ConfigError> {
        let (raw, watched, stamps) = read_raw(&source, &[]);
        let config = Config::build(raw?)?;
        let reloader = Reloader {
            inner: Arc::new(Inner {
                source,
                started: Fixed::of(&config),
                state: tokio::sync::Mutex::new(State {
                    target: None,
                    generation: 0,
                    watched,
                    stamps,
                }),
            }),
        };
        Ok((reloader, config))
    }

    /// Connects the reloader to a running server's state (called by [`crate::server`]).
    pub(crate) async fn attach(&self, live: LiveCell, images: ImageStage, metrics: Arc<Metrics>) {
        let mut state = self.inner.state.lock().await;
        state.target = Some(Target {
            live,
            images,
            metrics,
        });
    }

    /// Re-reads the configuration and swaps it in; on any error the running state stays and
    /// the error is logged and counted.
    pub async fn reload_now(&self) -> Result<ReloadSummary, ReloadError> {
        let started = Instant::now();
        let mut state = self.inner.state.lock().await;
        let Some(target) = &state.target else {
            return Err(ReloadError::NotAttached);
        };
        let metrics = target.metrics.clone();
        let source = self.inner.source.clone();
        let old_watched = state.watched.clone();
        let built = tokio::task::spawn_blocking(move || build(&source, &old_watched)).await;
        let (result, watched, stamps_now) = match built {
            Ok(b) => b,
            Err(e) => (
                Err(ReloadError::Task(e.to_string())),
                state.watched.clone(),
                state.stamps.clone(),
            ),
        };
        state.watched = watched;
        state.stamps = stamps_now;
        let file = self
            .inner
            .source
            .path()
            .map_or_else(|| "<defaults>".to_string(), |p| p.display().to_string());
        let (config, lists) = match result {
            Ok(built) => built,
            Err(e) => {
                metrics.reloads[1].fetch_add(1, Relaxed);
                metrics
                    .last_reload_us
                    .store(started.elapsed().as_micros() as u64, Relaxed);
                tracing::error!(config = %file, error = %e,
                    "config reload rejected; the running configuration stays in force");
                return Err(e);
            }
        };
        let ignored = fixed_changes(&self.inner.started, &config);
        for section in &ignored {
            tracing::warn!(config = %file, section = %section,
                "settings in [{section}] changed but apply only at restart; ignored");
        }
        let generation = state.generation + 1;
        let (lexicon_entries, policies) = (config.lexicon.len(), config.policies.len());
        let Some(target) = &state.target else {
            return Err(ReloadError::NotAttached);
        };
        let old = target.live.store(Live::from_config(&config));
        target.images.set_lists(lists);
        // Freeing an automaton of 100k entries takes milliseconds: not on a runtime thread.
        // (A request still holding the old snapshot frees it when it finishes.)
        drop(tokio::task::spawn_blocking(move || drop((old, config))));
        state.generation = generation;
        let took = started.elapsed();
        metrics.reloads[0].fetch_add(1, Relaxed);
        metrics
            .last_reload_us
            .store(took.as_micros() as u64, Relaxed);
        let summary = ReloadSummary {
            generation,
            lexicon_entries,
            policies,
            took,
            ignored,
        };
        tracing::info!(config = %file, generation, lexicon_entries = summary.lexicon_entries,
            policies = summary.policies, took_ms = took.as_millis() as u64, "config reloaded");
        Ok(summary)
    }

    /// Whether a watched file changed since it was last read (stats the files on the blocking
    /// pool).
    pub async fn changed(&self) -> bool {
        let (watched, before) = {
            let state = self.inner.state.lock().await;
            (state.watched.clone(), state.stamps.clone())
        };
        match tokio::task::spawn_blocking(move || stamps(&watched)).await {
            Ok(now) => now != before,
            Err(_) => false,
        }
    }

    /// Polls the watched files every `interval` and reloads when one changed, until
    /// `shutdown`. A reload that fails is not retried until a file changes again.
    pub fn spawn_poller(
        &self,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let reloader = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(interval) => {}
                }
                if reloader.changed().await {
                    tracing::info!("a config, wordlist or hash-list file changed; reloading");
                    // Errors are logged and counted by reload_now.
                    let _ = reloader.reload_now().await;
                }
            }
        })
    }
}

/// Reads the raw config from `source`. Returns it with the files it depends on and their
/// stamps, taken BEFORE they were read (so a change racing the read is seen at the next poll).
/// When the file cannot be read or parsed, the watch list is `old_watched` (what the running
/// config depends on) with the config file's fresh stamp.
fn read_raw(
    source: &ConfigSource,
    old_watched: &[PathBuf],
) -> (Result<RawConfig, ConfigError>, Vec<PathBuf>, Vec<Stamp>) {
    let file_only = source.watched(None);
    let file_stamp = stamps(&file_only);
    let raw = source.load_raw();
    let mut watched = match &raw {
        Ok(raw) => source.watched(Some(raw)),
        Err(_) if old_watched.is_empty() => file_only,
        Err(_) => old_watched.to_vec(),
    };
    let mut now = stamps(&watched);
    if source.path().is_some() {
        // The config file is first in every watch list.
        if watched.is_empty() {
            watched = source.watched(None);
            now = file_stamp.clone();
        }
        if let (Some(first), Some(before)) = (now.first_mut(), file_stamp.first()) {
            *first = *before;
        }
    }
    (raw, watched, now)
}

/// The blocking part of a reload: read, build the config and the hash lists.
#[allow(clippy::type_complexity)]
fn build(
    source: &ConfigSource,
    old_watched: &[PathBuf],
) -> (
    Result<(Config, HashLists), ReloadError>,
    Vec<PathBuf>,
    Vec<Stamp>,
) {
    let (raw, watched, now) = read_raw(source, old_watched);
    let result = raw
        .and_then(|raw| {
            let image = raw.image.clone();
            Config::build(raw).map(|config| (config, image))
        })
        .map_err(ReloadError::from)
        .and_then(|(config, image)| {
            let lists = HashLists::open(
                image.blocklist_path.as_deref(),
                image.allowlist_path.as_deref(),
                image.hash_max_distance,
            )?;
            Ok((config, lists))
        });
    (result, watched, now)
}

/// The settings that apply only at start, as the process started with them.
struct Fixed {
    /// `[server]`.
    server: crate::config::ServerConfig,
    /// `[admin]`.
    admin: crate::config::AdminConfig,
    /// `[behaviour]`.
    behaviour: crate::behaviour::BehaviourConfig,
    /// `[text_model]`.
    text_model: crate::text::classifier::TextModelConfig,
    /// `[image]` (its hash-list settings do reload).
    image: crate::image::ImageConfig,
    /// `[lookup]` (the verdict store is built once).
    lookup: crate::lookup::LookupConfig,
    /// `[webhook]` (its sender task starts once).
    webhook: crate::webhook::WebhookConfig,
}

impl Fixed {
    fn of(config: &Config) -> Fixed {
        Fixed {
            server: config.server.clone(),
            admin: config.admin.clone(),
            behaviour: config.behaviour.clone(),
            text_model: config.text_model.clone(),
            image: config.image.clone(),
            lookup: config.lookup.clone(),
            webhook: config.webhook.clone(),
        }
    }
}

/// The sections of `new` that differ from the running `old` but cannot change at runtime.
/// Compared by their `Debug` form (every config type derives it).
fn fixed_changes(old: &Fixed, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    if differs(&old.server, &new.server) {
        out.push("server");
    }
    if differs(&old.admin, &new.admin) {
        out.push("admin");
    }
    if differs(&old.behaviour, &new.behaviour) {
        out.push("behaviour");
    }
    if differs(&old.text_model, &new.text_model) {
        out.push("text_model");
    }
    let mut image = new.image.clone();
    image.blocklist_path = old.image.blocklist_path.clone();
    image.allowlist_path = old.image.allowlist_path.clone();
    image.hash_max_distance = old.image.hash_max_distance;
    if differs(&old.image, &image) {
        out.push("image");
    }
    if differs(&old.lookup, &new.lookup) {
        out.push("lookup");
    }
    if differs(&old.webhook, &new.webhook) {
        out.push("webhook");
    }
    out
}
