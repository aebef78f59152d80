//! # Moderator
//!
//! Takes one validated `moderate` request and gives back its [`Verdict`]: runs the sender
//! precheck, the text stages, the policy, and records the outcome in the behaviour tracker,
//! publishing any resulting sanction on the tenant's [`EventHub`]. Called by
//! [`crate::server::connection`] for each request and by `chatguard check`.
//!
//! The policy (the request's, else the tenant's `default_policy`, else `default`) decides which
//! stages run and brings its own lexicon and rules. Tokens, tenants, wordlists and policies
//! come from a [`LiveCell`] snapshot loaded once per request, so a config reload
//! ([`crate::reload`]) never changes the rules under a request in flight.

use crate::behaviour::{
    MAX_DURATION_SECS, MessageFacts, Outcome, Sanction, SanctionState, SenderInfo, Tracker,
};
use crate::config::{Config, DEFAULT_POLICY};
use crate::image::{ImageInput, ImageModel, ImageStage};
use crate::metrics::Metrics;
use crate::policy::{CompiledPolicy, Decision, ModelScores, Policy, Signals};
use crate::reload::{Live, LiveCell};
use crate::server::protocol::{
    Action, ErrorCode, Event, ImageRef, ImageVerdict, LabelScore, MAX_ID_BYTES, MAX_NAME_BYTES,
    ModerateRequest, SanctionRequest, Source, Verdict, to_json,
};
use crate::text::classifier::{TextClassifier, TextModelConfig};
use crate::text::lexicon::Scratch;
use dashmap::DashMap;
use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::broadcast;

/// Why a request got no verdict.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModerateError {
    /// The request is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// A field is over its limit.
    #[error("{0}")]
    TooLarge(String),
    /// A stage failed unexpectedly (a bug); the message says which.
    #[error("{0}")]
    Internal(String),
}

impl ModerateError {
    /// The wire error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            ModerateError::BadRequest(_) => ErrorCode::BadRequest,
            ModerateError::TooLarge(_) => ErrorCode::TooLarge,
            ModerateError::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// Pushed events per tenant: each connection subscribes to its tenant's channel.
#[derive(Clone, Default)]
pub struct EventHub {
    /// Tenant → broadcast of serialized events. Created on first subscribe or publish.
    channels: Arc<DashMap<Arc<str>, broadcast::Sender<Arc<str>>>>,
    /// Where this sidecar's own events are also posted (`[webhook]`); `None` on a
    /// [`EventHub::relay`] hub.
    webhook: Option<crate::webhook::Webhook>,
}

/// Events buffered per tenant for slow connections before they start missing some.
const EVENT_BUFFER: usize = 1024;

impl EventHub {
    fn sender(&self, tenant: &Arc<str>) -> broadcast::Sender<Arc<str>> {
        self.channels
            .entry(tenant.clone())
            .or_insert_with(|| broadcast::channel(EVENT_BUFFER).0)
            .clone()
    }

    /// Subscribes to a tenant's events.
    pub fn subscribe(&self, tenant: &Arc<str>) -> broadcast::Receiver<Arc<str>> {
        self.sender(tenant).subscribe()
    }

    /// Publishes an event to every connection of `tenant` (and to the webhook, if any);
    /// returns how many connections received it.
    pub fn publish(&self, tenant: &Arc<str>, event: &Event) -> usize {
        let json: Arc<str> = Arc::from(to_json(event));
        if let Some(webhook) = &self.webhook {
            webhook.offer(tenant, event, &json);
        }
        self.sender(tenant).send(json).unwrap_or(0)
    }

    /// Also posts every event published on this hub to `webhook` (builder).
    pub fn with_webhook(mut self, webhook: Option<crate::webhook::Webhook>) -> EventHub {
        self.webhook = webhook;
        self
    }

    /// The same channels without the webhook: for events relayed from other sidecars, which
    /// post their own.
    pub fn relay(&self) -> EventHub {
        EventHub {
            channels: self.channels.clone(),
            webhook: None,
        }
    }
}

/// Whether the text model stage can run.
#[derive(Clone)]
pub enum TextModel {
    /// Turned off in config (`text_model.enabled = false` or `--lexicon-only`).
    Disabled,
    /// Loaded and serving.
    Ready(TextClassifier),
    /// Enabled but could not load; verdicts carry `degraded: ["text_model"]`.
    Unavailable(String),
}

impl TextModel {
    /// Loads the text model on the blocking pool (it reads ~100 MB and builds ORT sessions).
    /// Never fails: a load error becomes [`TextModel::Unavailable`] and is logged.
    pub async fn load(cfg: &TextModelConfig) -> TextModel {
        if !cfg.enabled {
            return TextModel::Disabled;
        }
        let cfg = cfg.clone();
        let loaded = tokio::task::spawn_blocking(move || TextClassifier::load(&cfg)).await;
        match loaded {
            Ok(Ok(c)) => {
                tracing::info!("text model loaded");
                TextModel::Ready(c)
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "text model unavailable: serving lexicon-only verdicts \
                    marked degraded (run `make models`, or set text_model.enabled = false)");
                TextModel::Unavailable(e.to_string())
            }
            Err(e) => TextModel::Unavailable(format!("loader panicked: {e}")),
        }
    }
}

/// Cheap-to-clone handle that moderates messages.
#[derive(Clone)]
pub struct Moderator {
    /// Shared state; read-only after construction.
    inner: Arc<Inner>,
}

struct Inner {
    /// Tokens, tenants, lexicon and compiled policies; replaced whole by a config reload. A
    /// request loads it once, so it finishes with the state it started with.
    live: LiveCell,
    /// Sender tracking; `None` for offline use (`chatguard check`).
    tracker: Option<Tracker>,
    /// Where sanctions are published.
    events: EventHub,
    /// Largest accepted text in bytes.
    max_text_bytes: usize,
    /// Most images per message.
    max_images_per_message: usize,
    /// The text model stage.
    text_model: TextModel,
    /// The image stage (decoding, hash lists, image model).
    images: ImageStage,
    /// Where counters go.
    metrics: Arc<Metrics>,
}

/// Texts longer than this (bytes) are scanned on the blocking pool instead of the runtime
/// thread: ~100 MB/s means 16 KiB costs ~160 µs, the most we let a runtime thread stall.
const INLINE_SCAN_MAX_BYTES: usize = 16 << 10;

thread_local! {
    /// Per-thread normalization buffers, so the hot path does not allocate them per message.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The policy's lexicon matches (none when its `lexicon` stage is off) and rule matches.
fn scan(policy: &CompiledPolicy, text: &str) -> (Vec<crate::text::Match>, Vec<crate::text::Match>) {
    let mut out = Vec::new();
    if policy.stages.lexicon {
        SCRATCH.with(|s| {
            policy
                .lexicon
                .scan_into(text, &mut s.borrow_mut(), &mut out)
        });
    }
    let mut rules = Vec::new();
    policy.rules.scan_into(text, &mut rules);
    (out, rules)
}

impl Moderator {
    /// Builds a moderator from a validated config. `tracker: None` disables behaviour tracking.
    pub fn new(config: &Config, tracker: Option<Tracker>, events: EventHub) -> Moderator {
        Moderator {
            inner: Arc::new(Inner {
                live: LiveCell::new(Live::from_config(config)),
                tracker,
                events,
                max_text_bytes: config.server.max_text_bytes,
                max_images_per_message: config.server.max_images_per_message,
                text_model: TextModel::Disabled,
                images: ImageStage::with_model(
                    &config.image,
                    if config.image.model_enabled {
                        ImageModel::Unavailable("image model not loaded".into())
                    } else {
                        ImageModel::Disabled
                    },
                ),
                metrics: Arc::new(Metrics::default()),
            }),
        }
    }

    fn inner_mut(&mut self) -> &mut Inner {
        Arc::get_mut(&mut self.inner)
            .expect("Moderator is configured before it is cloned. This is a bug.")
    }

    /// Sets the text model stage (builder; call before cloning the moderator).
    pub fn with_text_model(mut self, model: TextModel) -> Moderator {
        self.inner_mut().text_model = model;
        self
    }

    /// Sets the image stage (builder; call before cloning the moderator). Without it images
    /// are decoded and hash-matched, and the model is reported unavailable (or disabled).
    pub fn with_images(mut self, images: ImageStage) -> Moderator {
        self.inner_mut().images = images;
        self
    }

    /// Sends counters to `metrics` (builder; call before cloning the moderator).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Moderator {
        self.inner_mut().metrics = metrics;
        self
    }

    /// Each stage's name, `Ok` or why it is unavailable, and whether readiness requires it.
    pub fn stage_status(&self) -> Vec<(&'static str, Result<(), String>, bool)> {
        let mut out = vec![("lexicon", Ok(()), true)];
        match &self.inner.text_model {
            TextModel::Disabled => {}
            TextModel::Ready(_) => out.push(("text_model", Ok(()), false)),
            TextModel::Unavailable(e) => out.push(("text_model", Err(e.clone()), false)),
        }
        if let Some(status) = self.inner.images.status() {
            out.push(("image_model", status, false));
        }
        if let Some(t) = &self.inner.tracker
            && t.config().store == crate::behaviour::StoreKind::Redis
        {
            // Not required: verdicts go on from local state while Redis is away.
            let status = if t.degraded() {
                Err(format!(
                    "Redis at {} unreachable: answering from local state, reconciling when it is back",
                    t.config().redis_url
                ))
            } else {
                Ok(())
            };
            out.push(("shared_state", status, false));
        }
        out
    }

    /// Prometheus lines for the stages' own gauges (model batcher).
    pub fn render_metrics(&self) -> String {
        use crate::metrics::{write_counter, write_gauge};
        let mut out = String::new();
        if let Some(t) = &self.inner.tracker {
            write_counter(
                &mut out,
                "chatguard_behaviour_persist_errors_total",
                "Failed writes, fsyncs and snapshots of the behaviour journal and snapshot (see the error log).",
                t.persist_errors(),
            );
            write_gauge(
                &mut out,
                "chatguard_behaviour_tracked_users",
                "Senders with a behaviour record in memory.",
                t.tracked_users(),
            );
        }
        if let TextModel::Ready(c) = &self.inner.text_model {
            let s = c.stats();
            for (name, help, v) in [
                (
                    "submitted_total",
                    "Messages admitted into the text model's queue.",
                    s.submitted,
                ),
                ("batches_total", "Text model runs.", s.batches),
                (
                    "batched_items_total",
                    "Messages through the text model.",
                    s.batched_items,
                ),
                (
                    "timeouts_total",
                    "Messages that waited past the queue deadline.",
                    s.timeouts,
                ),
                (
                    "overloads_total",
                    "Messages refused because the queue was full.",
                    s.overloads,
                ),
                (
                    "cancelled_total",
                    "Queued messages whose requester had gone.",
                    s.cancelled,
                ),
                (
                    "failed_total",
                    "Messages answered with an input or model error.",
                    s.failed,
                ),
                (
                    "busy_seconds_total",
                    "Time the model thread spent running.",
                    s.busy_us / 1_000_000,
                ),
            ] {
                write_counter(&mut out, &format!("chatguard_text_model_{name}"), help, v);
            }
            write_gauge(
                &mut out,
                "chatguard_text_model_queue_depth",
                "Messages waiting for the text model.",
                s.queue_depth,
            );
        }
        self.inner.images.render_metrics(&mut out);
        out
    }

    /// The event hub sanctions are published on.
    pub fn events(&self) -> &EventHub {
        &self.inner.events
    }

    /// The reloadable state (tokens, tenants, lexicon, policies) this moderator runs with.
    pub fn live(&self) -> &LiveCell {
        &self.inner.live
    }

    /// The image stage.
    pub fn images(&self) -> &ImageStage {
        &self.inner.images
    }

    fn validate(
        &self,
        live: &Live,
        tenant: &str,
        req: &ModerateRequest,
    ) -> Result<Arc<CompiledPolicy>, ModerateError> {
        let bad = |m: String| Err(ModerateError::BadRequest(m));
        if req.id.is_empty() || req.id.len() > MAX_ID_BYTES {
            return bad(format!("`id` must be 1..={MAX_ID_BYTES} bytes"));
        }
        if req.user.is_empty() || req.user.len() > MAX_NAME_BYTES {
            return bad(format!("`user` must be 1..={MAX_NAME_BYTES} bytes"));
        }
        for (name, v) in [
            ("room", &req.room),
            ("to", &req.to),
            ("policy", &req.policy),
        ] {
            if v.as_ref().is_some_and(|v| v.len() > MAX_NAME_BYTES) {
                return bad(format!("`{name}` must be at most {MAX_NAME_BYTES} bytes"));
            }
        }
        let text = req.text.as_deref().unwrap_or("");
        if text.len() > self.inner.max_text_bytes {
            return Err(ModerateError::TooLarge(format!(
                "`text` is {} bytes; the limit is {} (server.max_text_bytes)",
                text.len(),
                self.inner.max_text_bytes
            )));
        }
        if req.images.len() > self.inner.max_images_per_message {
            return Err(ModerateError::TooLarge(format!(
                "{} images; the limit is {} (server.max_images_per_message)",
                req.images.len(),
                self.inner.max_images_per_message
            )));
        }
        let mut image_ids = std::collections::HashSet::new();
        for image in &req.images {
            if image.id.is_empty() || image.id.len() > MAX_ID_BYTES {
                return bad(format!("image `id` must be 1..={MAX_ID_BYTES} bytes"));
            }
            if !image_ids.insert(image.id.as_str()) {
                return bad(format!("duplicate image id `{}`", image.id));
            }
        }
        if text.is_empty() && req.images.is_empty() {
            return bad("empty message: `text` is empty and there are no `images`".into());
        }
        let choice = live.tenants.get(tenant);
        let name = req
            .policy
            .as_deref()
            .or(choice.and_then(|t| t.default_policy.as_deref()))
            .unwrap_or(DEFAULT_POLICY);
        if let Some(t) = choice
            && !t.policies.is_empty()
            && !t.policies.iter().any(|p| p == name)
        {
            return bad(format!(
                "policy `{name}` is not allowed for this tenant (allowed: {})",
                t.policies.join(", ")
            ));
        }
        match live.policies.get(name) {
            Some(p) => Ok(p.clone()),
            None => bad(format!("unknown policy `{name}`")),
        }
    }

    /// Runs the text model unless it is off, the text is empty, or the lexicon alone already
    /// blocks the message (short-circuit: a model score cannot make a block more severe, and
    /// skipping it keeps lexicon-caught messages at lexicon latency and spares model capacity).
    async fn text_model_scores(
        &self,
        policy: &Policy,
        matches: &[crate::text::Match],
        rule_matches: &[crate::text::Match],
        text: &str,
        degraded: &mut Vec<&'static str>,
    ) -> Option<ModelScores> {
        if !policy.stages.text_model {
            return None;
        }
        let classifier = match &self.inner.text_model {
            TextModel::Disabled => return None,
            TextModel::Unavailable(_) => {
                if !text.trim().is_empty() {
                    degraded.push("text_model");
                }
                return None;
            }
            TextModel::Ready(c) => c,
        };
        if text.trim().is_empty() {
            return None;
        }
        let lexicon_only = policy.decide(&Signals {
            matches,
            rule_matches,
            ..Default::default()
        });
        if lexicon_only.content_action == Action::Block {
            return None;
        }
        let started = Instant::now();
        let result = classifier.classify(text).await;
        self.inner
            .metrics
            .text_model_latency
            .observe(started.elapsed());
        match result {
            Ok(s) => Some(ModelScores {
                insult: s.insult,
                threat: s.threat,
                sexual: s.sexual,
                hate: s.hate,
                toxic: s.toxic,
                severe: s.severe,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "text model failed for one message; verdict degraded");
                degraded.push("text_model");
                None
            }
        }
    }

    /// Runs the image stage on every image at once; marks `image_model` degraded when the model
    /// should have run on an image and could not.
    async fn image_verdicts(
        &self,
        request_id: &str,
        images: Vec<ImageRef>,
        policy: &Policy,
        degraded: &mut Vec<&'static str>,
    ) -> Vec<ImageVerdict> {
        if images.is_empty() {
            return Vec::new();
        }
        let stage = &self.inner.images;
        let reports = futures_util::future::join_all(images.into_iter().map(|image| {
            let input = match (image.data, image.binary) {
                (Some(data), _) => ImageInput::Base64(data),
                (None, Some(Ok(bytes))) => ImageInput::Bytes(bytes),
                (None, Some(Err(why))) => ImageInput::Missing(why),
                (None, None) => ImageInput::Missing(format!(
                    "image `{}` has no `data` and no binary frame `{request_id}/{}` was sent",
                    image.id, image.id
                )),
            };
            let id = image.id;
            let use_model = policy.stages.image_model;
            async move { (id, stage.analyze_with(input, use_model).await) }
        }))
        .await;
        if reports.iter().any(|(_, r)| r.model_degraded) {
            degraded.push("image_model");
        }
        reports
            .into_iter()
            .map(|(id, report)| report.verdict(id, policy))
            .collect()
    }

    /// Moderates one message for `tenant`.
    pub async fn moderate(
        &self,
        tenant: &Arc<str>,
        req: ModerateRequest,
    ) -> Result<Verdict, ModerateError> {
        let started = Instant::now();
        let inner = &self.inner;
        let policy = self.validate(&inner.live.load(), tenant, &req)?;

        // Behaviour: the folded text's fingerprint (off the runtime for long texts, like the
        // scan), then flood, duplicate and raid checks.
        let print = match (&inner.tracker, req.text.as_deref()) {
            (Some(t), Some(text)) if text.len() <= INLINE_SCAN_MAX_BYTES => t.fingerprint(text),
            (Some(t), Some(text)) => {
                let (t, text) = (t.clone(), text.to_owned());
                tokio::task::spawn_blocking(move || t.fingerprint(&text))
                    .await
                    .ok()
                    .flatten()
            }
            _ => None,
        };
        let precheck = inner.tracker.as_ref().map(|t| {
            let facts = MessageFacts {
                user: &req.user,
                print,
                ..MessageFacts::default()
            };
            t.precheck_message(tenant, &facts)
        });
        let spam = precheck.as_ref().and_then(|p| p.spam);

        let text = req.text.unwrap_or_default();
        let (text, matches, rule_matches) = if text.len() <= INLINE_SCAN_MAX_BYTES {
            let (matches, rules) = scan(&policy, &text);
            (text, matches, rules)
        } else {
            let policy = policy.clone();
            tokio::task::spawn_blocking(move || {
                let (matches, rules) = scan(&policy, &text);
                (text, matches, rules)
            })
            .await
            .map_err(|e| ModerateError::Internal(format!("text scan failed: {e}")))?
        };
        let mut degraded = Vec::new();
        let mut image_degraded = Vec::new();
        // The text model and the images run concurrently (each on its own threads).
        let (model, images) = tokio::join!(
            self.text_model_scores(&policy, &matches, &rule_matches, &text, &mut degraded),
            self.image_verdicts(&req.id, req.images, &policy, &mut image_degraded),
        );
        degraded.extend(image_degraded);

        let mut decision = policy.decide(&Signals {
            matches: &matches,
            rule_matches: &rule_matches,
            model,
            flooded: precheck.as_ref().is_some_and(|p| p.flooded),
            sanction: precheck.as_ref().map(|p| p.sender.state),
        });
        policy.merge_images(&mut decision, &images);
        if let Some(spam) = spam {
            add_behaviour_label(&mut decision, "spam", spam.as_str(), policy.flood_action);
        }

        let sender = match &inner.tracker {
            Some(t) => {
                let outcome = match decision.content_action {
                    Action::Allow if spam.is_some() => Outcome::Review { severity: 0.6 },
                    Action::Allow if precheck.as_ref().is_some_and(|p| p.flooded) => {
                        Outcome::Review { severity: 0.3 }
                    }
                    Action::Allow => Outcome::Allow,
                    // This policy's content violations do not count toward the abuse score.
                    Action::Review | Action::Block if !policy.sanctions => Outcome::Allow,
                    Action::Review => Outcome::Review {
                        severity: decision.severity,
                    },
                    Action::Block => Outcome::Block {
                        severity: decision.severity,
                    },
                };
                let facts = MessageFacts {
                    user: &req.user,
                    room: req.room.as_deref(),
                    to: req.to.as_deref(),
                    text: &text,
                    print: None,
                };
                let recorded = t.record_message(tenant, &facts, outcome);
                if recorded.harassment {
                    add_behaviour_label(&mut decision, "abuse", "harassment", Action::Review);
                }
                if let Some(alarm) = recorded.room_alarm {
                    inner.events.publish(tenant, &Event::RoomAlarm(alarm));
                }
                if t.degraded() {
                    degraded.push("shared_state");
                }
                if let Some(s) = recorded.sanction {
                    let i = match s.action {
                        SanctionState::Throttle => Some(0),
                        SanctionState::Mute => Some(1),
                        SanctionState::Block => Some(2),
                        SanctionState::Ok => None,
                    };
                    if let Some(i) = i {
                        inner.metrics.sanctions[i]
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    tracing::info!(
                        tenant = %tenant, user = %s.user, action = ?s.action,
                        until = s.until, reason = %s.reason, "sanction"
                    );
                    inner.events.publish(tenant, &Event::Sanction(s));
                }
                recorded.sender
            }
            None => SenderInfo {
                risk: 0.0,
                state: SanctionState::Ok,
                until: None,
            },
        };

        drop(text);
        let mut matches = matches;
        if !rule_matches.is_empty() {
            matches.extend(rule_matches);
            matches.sort_by_key(|m| (m.start, m.end));
        }
        let took = started.elapsed();
        inner.metrics.moderate_latency.observe(took);
        inner
            .metrics
            .verdict(decision.action, decision.labels.iter().map(|l| l.label));
        for d in &degraded {
            inner.metrics.degraded(d);
        }
        Ok(Verdict {
            kind: "verdict",
            id: req.id,
            action: decision.action,
            label: decision.label,
            score: decision.score,
            labels: decision.labels,
            matches,
            images,
            sender,
            degraded,
            took_us: took.as_micros() as u64,
        })
    }

    /// Applies or lifts a sanction by hand (the `sanction` request) and pushes it to the
    /// tenant's connections; returns the sanction now in force.
    pub fn sanction(
        &self,
        tenant: &Arc<str>,
        req: SanctionRequest,
    ) -> Result<Sanction, ModerateError> {
        let bad = |m: String| Err(ModerateError::BadRequest(m));
        if req.id.is_empty() || req.id.len() > MAX_ID_BYTES {
            return bad(format!("`id` must be 1..={MAX_ID_BYTES} bytes"));
        }
        if req.user.is_empty() || req.user.len() > MAX_NAME_BYTES {
            return bad(format!("`user` must be 1..={MAX_NAME_BYTES} bytes"));
        }
        if req
            .duration_secs
            .is_some_and(|d| d == 0 || d > MAX_DURATION_SECS)
        {
            return bad(format!("`duration_secs` must be 1..={MAX_DURATION_SECS}"));
        }
        let reason = req.reason.as_deref().unwrap_or("moderator");
        if reason.is_empty() || reason.len() > MAX_NAME_BYTES {
            return bad(format!("`reason` must be 1..={MAX_NAME_BYTES} bytes"));
        }
        let Some(tracker) = &self.inner.tracker else {
            return bad("behaviour tracking is off in this process".into());
        };
        let sanction =
            tracker.set_sanction(tenant, &req.user, req.action, req.duration_secs, reason);
        self.inner
            .events
            .publish(tenant, &Event::Sanction(sanction.clone()));
        Ok(sanction)
    }
}

/// Adds a behaviour label (`spam/duplicate`, `spam/raid`, `abuse/harassment`) that calls for at
/// least `action`; it becomes the top label when it raises the verdict's action.
fn add_behaviour_label(decision: &mut Decision, label: &'static str, sub: &str, action: Action) {
    let entry = LabelScore {
        label,
        sub: Some(sub.to_owned()),
        score: 1.0,
        source: Source::Behaviour,
    };
    if action > decision.action {
        decision.action = action;
        decision.label = Some(label);
        decision.score = 1.0;
        decision.labels.insert(0, entry);
    } else {
        decision.labels.push(entry);
    }
}
