//! # Configuration
//!
//! Two phases (ripgrep's lowargs → hiargs): [`RawConfig`] is what the TOML file and the
//! environment say; [`Config::build`] validates it and builds the objects the server runs with
//! (tenant table, lexicon, policies). Called by `main` and by tests.
//!
//! Every setting has an embedded default, so `chatguard serve` runs with no file at all.

use crate::behaviour::BehaviourConfig;
use crate::image::ImageConfig;
use crate::policy::{CompiledPolicy, Policy};
use crate::text::classifier::TextModelConfig;
use crate::text::lexicon::Lexicon;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Name of the tenant a quick-start `CHATGUARD_TOKEN` maps to.
pub const DEFAULT_TENANT: &str = "default";
/// Name of the policy used when a request names none.
pub const DEFAULT_POLICY: &str = "default";

/// Errors building a [`Config`]. Each names the setting to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why, with line and column.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid setting: {0}")]
    Invalid(String),
    /// The wordlists could not be loaded.
    #[error("lexicon: {0}")]
    Lexicon(#[from] crate::text::lexicon::LexiconError),
}

/// `[server]`: the WebSocket listener and its limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on (`--listen` overrides).
    pub listen: SocketAddr,
    /// Most simultaneous WebSocket connections; more are refused with HTTP 503.
    pub max_connections: usize,
    /// Most requests in flight on one connection; more get an `overloaded` error.
    pub max_in_flight_per_connection: usize,
    /// Largest WebSocket message (and frame) in bytes; larger closes with 1009.
    pub max_message_bytes: usize,
    /// Largest `text` in bytes; larger gets a `too_large` error.
    pub max_text_bytes: usize,
    /// Most images in one `moderate` request.
    pub max_images_per_message: usize,
    /// Time allowed for the TCP + WebSocket handshake, in milliseconds (slowloris guard).
    pub handshake_timeout_ms: u64,
    /// On shutdown, how long in-flight requests may take before connections close anyway.
    pub shutdown_grace_ms: u64,
    /// Queue of outgoing frames per connection; a client that stops reading stalls only itself.
    pub outgoing_queue_len: usize,
    /// How long one outgoing frame may wait for the client to take it, in milliseconds: a
    /// client that stops reading its replies for longer is disconnected, so that it holds no
    /// requests and no shutdown forever.
    pub write_timeout_ms: u64,
    /// How often the config file, wordlists and image hash lists are checked for changes
    /// (modification time and size), in milliseconds; a change reloads them like SIGHUP.
    /// 0 turns the polling off (SIGHUP still reloads); otherwise at least 10.
    pub reload_poll_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8686)),
            max_connections: 1024,
            max_in_flight_per_connection: 256,
            max_message_bytes: 16 << 20,
            max_text_bytes: 64 << 10,
            max_images_per_message: 16,
            handshake_timeout_ms: 5_000,
            shutdown_grace_ms: 10_000,
            outgoing_queue_len: 512,
            write_timeout_ms: 30_000,
            reload_poll_ms: 2_000,
        }
    }
}

/// `[admin]`: the HTTP listener for `/healthz`, `/readyz` and `/metrics`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener (`--admin-listen` overrides).
    pub listen: SocketAddr,
    /// Serve the admin endpoints at all.
    pub enabled: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8687)),
            enabled: true,
        }
    }
}

/// `[auth]`: bearer tokens.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Token → tenant name. Empty (and no `CHATGUARD_TOKEN`) means the server runs open.
    pub tokens: BTreeMap<String, String>,
}

/// `[lexicon]`: wordlists.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LexiconConfig {
    /// Directory with the wordlists (layout of the repo's `wordlists/`); the embedded lists
    /// when absent.
    pub dir: Option<PathBuf>,
}

/// `[tenant.NAME]`: which policies a tenant may use.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    /// Policy used when a request names none (default: `default`).
    pub default_policy: Option<String>,
    /// Policies the tenant may name; empty means any.
    pub policies: Vec<String>,
}

/// The file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Listener and limits.
    pub server: ServerConfig,
    /// Tokens and tenants.
    pub auth: AuthConfig,
    /// Admin endpoints.
    pub admin: AdminConfig,
    /// Wordlists.
    pub lexicon: LexiconConfig,
    /// Named policies; `default` always exists.
    pub policy: BTreeMap<String, Policy>,
    /// Per-tenant policy choice (optional).
    pub tenant: BTreeMap<String, TenantConfig>,
    /// Sender behaviour tracking.
    pub behaviour: BehaviourConfig,
    /// The transformer text classifier.
    pub text_model: TextModelConfig,
    /// Image decoding limits, hash lists, the image model, binary frames.
    pub image: ImageConfig,
    /// Recent verdicts kept for `lookup` requests.
    pub lookup: crate::lookup::LookupConfig,
    /// POST pushed events to an HTTP endpoint (off unless `url` is set).
    pub webhook: crate::webhook::WebhookConfig,
}

impl RawConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Applies environment overrides: `CHATGUARD_TOKEN` adds a token for tenant `default`;
    /// `CHATGUARD_REDIS_URL` sets `behaviour.redis_url` and selects `behaviour.store = "redis"`.
    pub fn apply_env(&mut self) {
        if let Ok(token) = std::env::var("CHATGUARD_TOKEN")
            && !token.is_empty()
        {
            self.auth.tokens.insert(token, DEFAULT_TENANT.to_string());
        }
        if let Ok(url) = std::env::var("CHATGUARD_REDIS_URL")
            && !url.is_empty()
        {
            self.behaviour.redis_url = url;
            self.behaviour.store = crate::behaviour::StoreKind::Redis;
        }
    }
}

/// The validated configuration the server runs with.
#[derive(Clone)]
pub struct Config {
    /// Listener and limits.
    pub server: ServerConfig,
    /// Admin endpoints.
    pub admin: AdminConfig,
    /// Token → tenant. Empty means open: every connection is tenant `default`.
    pub tokens: Arc<HashMap<String, Arc<str>>>,
    /// The built keyword automaton (the base wordlists every policy starts from).
    pub lexicon: Lexicon,
    /// Policies by name, compiled (own lexicon and rules); always has [`DEFAULT_POLICY`].
    pub policies: Arc<HashMap<String, Arc<CompiledPolicy>>>,
    /// Tenant → its policy choice; tenants not listed use `default` and may name any policy.
    pub tenants: Arc<HashMap<String, TenantConfig>>,
    /// Behaviour settings (validated).
    pub behaviour: BehaviourConfig,
    /// Text model settings (validated; the model itself is loaded by the server).
    pub text_model: TextModelConfig,
    /// Image settings (validated; the model itself is loaded by the server).
    pub image: ImageConfig,
    /// Verdict lookup settings (validated).
    pub lookup: crate::lookup::LookupConfig,
    /// Webhook settings (validated; `url` unset means off).
    pub webhook: crate::webhook::WebhookConfig,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("server", &self.server)
            .field("tenants", &self.tokens.len())
            .field("lexicon_entries", &self.lexicon.len())
            .field("policies", &self.policies.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Config {
    /// Validates `raw` and builds the runtime objects.
    pub fn build(raw: RawConfig) -> Result<Config, ConfigError> {
        let s = &raw.server;
        // Settings that must be > 0, whatever their type: whether each is 0.
        let zero = [
            ("server.max_connections", s.max_connections == 0),
            (
                "server.max_in_flight_per_connection",
                s.max_in_flight_per_connection == 0,
            ),
            ("server.max_message_bytes", s.max_message_bytes == 0),
            ("server.max_text_bytes", s.max_text_bytes == 0),
            ("server.outgoing_queue_len", s.outgoing_queue_len == 0),
            ("server.write_timeout_ms", s.write_timeout_ms == 0),
        ];
        if let Some((name, _)) = zero.iter().find(|(_, is_zero)| *is_zero) {
            return Err(ConfigError::Invalid(format!("{name} must be > 0")));
        }
        if s.max_in_flight_per_connection > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(ConfigError::Invalid(
                "server.max_in_flight_per_connection is too large".into(),
            ));
        }
        if s.reload_poll_ms != 0 && s.reload_poll_ms < 10 {
            return Err(ConfigError::Invalid(format!(
                "server.reload_poll_ms must be 0 (off) or at least 10 (got {})",
                s.reload_poll_ms
            )));
        }
        if s.max_text_bytes > s.max_message_bytes {
            return Err(ConfigError::Invalid(format!(
                "server.max_text_bytes ({}) must not exceed server.max_message_bytes ({})",
                s.max_text_bytes, s.max_message_bytes
            )));
        }
        raw.behaviour
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("behaviour: {e}")))?;
        raw.text_model
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("text_model: {e}")))?;
        raw.image
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("image.{e}")))?;
        raw.lookup
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("lookup.{e}")))?;
        raw.webhook
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("webhook.{e}")))?;

        let mut tokens = HashMap::new();
        for (token, tenant) in &raw.auth.tokens {
            if token.len() < 8 {
                return Err(ConfigError::Invalid(format!(
                    "auth.tokens: token for tenant `{tenant}` is shorter than 8 characters"
                )));
            }
            tokens.insert(token.clone(), Arc::from(tenant.as_str()));
        }

        for (name, policy) in &raw.policy {
            policy.validate(name).map_err(ConfigError::Invalid)?;
        }
        let lexicon = match &raw.lexicon.dir {
            Some(dir) => Lexicon::from_dir(dir)?,
            None => Lexicon::embedded()?,
        };
        let mut policies = HashMap::new();
        for (name, policy) in raw.policy {
            let compiled = policy
                .compile(&name, &lexicon)
                .map_err(ConfigError::Invalid)?;
            policies.insert(name, Arc::new(compiled));
        }
        policies
            .entry(DEFAULT_POLICY.to_string())
            .or_insert_with(|| CompiledPolicy::default_over(&lexicon));
        for (tenant, t) in &raw.tenant {
            let known = |p: &String| policies.contains_key(p);
            if let Some(p) = t.policies.iter().find(|p| !known(p)) {
                return Err(ConfigError::Invalid(format!(
                    "tenant.{tenant}.policies: unknown policy `{p}`"
                )));
            }
            if let Some(p) = &t.default_policy {
                if !known(p) {
                    return Err(ConfigError::Invalid(format!(
                        "tenant.{tenant}.default_policy: unknown policy `{p}`"
                    )));
                }
                if !t.policies.is_empty() && !t.policies.contains(p) {
                    return Err(ConfigError::Invalid(format!(
                        "tenant.{tenant}.default_policy `{p}` is not in tenant.{tenant}.policies"
                    )));
                }
            }
        }

        Ok(Config {
            server: raw.server,
            admin: raw.admin,
            tokens: Arc::new(tokens),
            lexicon,
            policies: Arc::new(policies),
            tenants: Arc::new(raw.tenant.into_iter().collect()),
            behaviour: raw.behaviour,
            text_model: raw.text_model,
            image: raw.image,
            lookup: raw.lookup,
            webhook: raw.webhook,
        })
    }

    /// The default configuration (what `chatguard serve` runs with no file and no env).
    pub fn default_config() -> Result<Config, ConfigError> {
        Config::build(RawConfig::default())
    }

    /// True when no token is configured: every client is accepted as tenant `default`.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let raw: RawConfig = toml::from_str(
            r#"
            [server]
            listen = "127.0.0.1:9000"
            max_in_flight_per_connection = 8
            [auth.tokens]
            "secret-token-1" = "acme"
            [policy.kids]
            default_thresholds = { review = 0.2, block = 0.5 }
            [policy.kids.thresholds]
            profanity = { review = 0.1, block = 0.3 }
            "#,
        )
        .expect("valid");
        assert_eq!(raw.server.listen.port(), 9000);
        let cfg = Config::build(raw).expect("valid");
        assert!(cfg.policies.contains_key("kids"));
        assert!(cfg.policies.contains_key("default"));
        assert_eq!(cfg.tokens.get("secret-token-1").map(|t| &**t), Some("acme"));
    }

    #[test]
    fn parses_policy_extras_and_tenants() {
        let raw: RawConfig = toml::from_str(
            r#"
            [policy.kids]
            allow = ["frobnicator"]
            stages = { text_model = false }
            sanctions = false
            rules = [
              { pattern = '(?i)free\s+robux', kind = "regex", label = "scam", severity = "high" },
              { pattern = "*discord.gg/*", kind = "wildcard", label = "spam", sub = "invite", severity = "medium" },
            ]
            [tenant.acme]
            default_policy = "kids"
            policies = ["kids"]
            "#,
        )
        .expect("valid");
        let cfg = Config::build(raw).expect("valid");
        let kids = &cfg.policies["kids"];
        assert!(!kids.stages.text_model && kids.stages.lexicon && kids.stages.image_model);
        assert!(!kids.sanctions);
        assert_eq!(kids.rules.len(), 2);
        assert_eq!(kids.lexicon.allow_len(), cfg.lexicon.allow_len() + 1);
        assert_eq!(cfg.tenants["acme"].default_policy.as_deref(), Some("kids"));
    }

    #[test]
    fn policy_and_tenant_errors_name_the_setting() {
        let cases = [
            (
                "[policy.kids]\nrules = [{ pattern = \"(\", kind = \"regex\", label = \"scam\", severity = \"high\" }]",
                "policy.kids.rules: rule 0",
            ),
            (
                "[policy.kids]\nwordlists = [\"/nonexistent/x.txt\"]",
                "policy.kids.wordlists",
            ),
            (
                "[tenant.acme]\ndefault_policy = \"nope\"",
                "tenant.acme.default_policy",
            ),
            (
                "[tenant.acme]\npolicies = [\"nope\"]",
                "tenant.acme.policies",
            ),
            (
                "[policy.kids]\n[tenant.acme]\ndefault_policy = \"kids\"\npolicies = [\"default\"]",
                "is not in tenant.acme.policies",
            ),
        ];
        for (text, want) in cases {
            let raw: RawConfig = toml::from_str(text).expect(text);
            let err = Config::build(raw).expect_err(text).to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        assert!(toml::from_str::<RawConfig>("[policy.kids]\nstages = { model = false }").is_err());
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        assert!(toml::from_str::<RawConfig>("[server]\nlisten_port = 1").is_err());
        let mut raw = RawConfig::default();
        raw.server.max_text_bytes = raw.server.max_message_bytes + 1;
        let err = Config::build(raw).expect_err("invalid").to_string();
        assert!(err.contains("server.max_text_bytes"), "{err}");
        let mut raw = RawConfig::default();
        raw.auth.tokens.insert("short".into(), "t".into());
        assert!(Config::build(raw).is_err());
        let raw: RawConfig = toml::from_str("[server]\nwrite_timeout_ms = 0").expect("parses");
        let err = Config::build(raw).expect_err("invalid").to_string();
        assert!(err.contains("server.write_timeout_ms must be > 0"), "{err}");
    }
}
