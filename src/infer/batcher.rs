//! # Dynamic batcher
//!
//! Takes single requests from async callers and gives back one result each, running the model on
//! batches. Used by the model stages ([`crate::text::classifier::TextClassifier`], later the image
//! classifier); generic over what is prepared and run.
//!
//! ```text
//! callers ──submit()──▶ [admission: queue_capacity] ──▶ prepare thread ──▶ model thread(s) ──▶ oneshot replies
//!  (tokio)   fail fast: Overloaded                  (tokenize/decode)   (batch + run)
//! ```
//!
//! - [`Batcher`] is the cheap-to-clone handle: a bounded channel into dedicated OS threads
//!   (never tokio tasks — all CPU work stays off the async runtime).
//! - The preparation thread owns a [`Prepare`] (e.g. tokenizers) and turns each request into a
//!   model-ready item while the model is busy with the previous batch.
//! - Each model thread owns a [`Backend`] (e.g. ONNX sessions); [`Batcher::spawn_pool`] starts
//!   one per backend. A free model thread takes the next batch: whatever has queued — there is no
//!   wait timer, so a lone request pays no batching delay — capped by
//!   [`BatcherConfig::max_batch_size`] and [`BatcherConfig::max_batch_tokens`]. Several model
//!   threads with one intra-op thread each keep every core busy on small batches, where one
//!   session's intra-op pool mostly waits on its own synchronisation.
//! - Every request carries a queue deadline: one still queued past it is answered
//!   [`InferError::Timeout`] without running. A request whose caller has gone away (dropped the
//!   future) is skipped. A full queue answers [`InferError::Overloaded`] at once.
//! - A backend error or panic is answered to every waiter of that batch; the thread lives on.
//! - Counters for the admin endpoint are atomics in [`BatcherStats`].

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::oneshot;

use super::InferError;

/// Limits of one batcher.
#[derive(Debug, Clone)]
pub struct BatcherConfig {
    /// Thread-name prefix (`{name}-prep`, `{name}-model`), for logs and `top -H`.
    pub name: String,
    /// Most requests in one model run.
    pub max_batch_size: usize,
    /// Most padded tokens in one model run: requests × the largest request's cost (every item
    /// of a batch is padded to the longest). A single request larger than this still runs alone.
    pub max_batch_tokens: usize,
    /// Most requests admitted and not yet taken into a batch; beyond this, `Overloaded`.
    pub queue_capacity: usize,
    /// How long a request may wait for a batch before it is answered `Timeout`.
    pub queue_timeout: Duration,
}

impl BatcherConfig {
    fn validate(&self) -> Result<(), InferError> {
        let positive = [
            ("max_batch_size", self.max_batch_size),
            ("max_batch_tokens", self.max_batch_tokens),
            ("queue_capacity", self.queue_capacity),
        ];
        for (setting, value) in positive {
            if value == 0 {
                return Err(InferError::Config {
                    setting,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if self.queue_timeout.is_zero() {
            return Err(InferError::Config {
                setting: "queue_timeout_ms",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// Turns a caller's request into a model-ready item. Runs on the batcher's preparation thread.
pub trait Prepare: Send + 'static {
    /// What callers submit (e.g. the message text).
    type Request: Send + 'static;
    /// What the model consumes (e.g. token ids).
    type Item: Send + 'static;
    /// Prepares one request; an error is answered to that request alone.
    fn prepare(&mut self, request: Self::Request) -> Result<Self::Item, InferError>;
}

/// Runs the model on a batch. Owned by the batcher's model thread.
pub trait Backend: Send + 'static {
    /// What the model consumes; produced by the matching [`Prepare`].
    type Item: Send + 'static;
    /// One result per item.
    type Output: Send + 'static;
    /// The size of one item in [`BatcherConfig::max_batch_tokens`] units (e.g. its token count).
    fn cost(&self, _item: &Self::Item) -> usize {
        1
    }
    /// Runs one batch; must return exactly one output per item, in order. An error (or a panic)
    /// is answered to every request of the batch.
    fn run(&mut self, batch: Vec<Self::Item>) -> Result<Vec<Self::Output>, InferError>;
}

/// A snapshot of a batcher's counters (monotonic since start, except `queue_depth`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct BatcherStats {
    /// Requests admitted into the queue.
    pub submitted: u64,
    /// Model runs.
    pub batches: u64,
    /// Requests that went through a model run (the sum of batch sizes).
    pub batched_items: u64,
    /// Largest batch run so far.
    pub max_batch_seen: u64,
    /// Requests answered `Timeout` (queue deadline passed) without running.
    pub timeouts: u64,
    /// Requests refused `Overloaded` because the queue was full.
    pub overloads: u64,
    /// Requests skipped because their caller had gone away.
    pub cancelled: u64,
    /// Requests answered with an input or model error.
    pub failed: u64,
    /// Time the model thread spent running batches, in microseconds.
    pub busy_us: u64,
    /// Requests admitted and not yet taken into a batch (now).
    pub queue_depth: u64,
}

impl BatcherStats {
    /// Mean requests per model run (0 before the first run).
    pub fn mean_batch_size(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.batched_items as f64 / self.batches as f64
        }
    }
}

/// The live counters behind [`BatcherStats`], shared by the handle and both threads.
#[derive(Debug, Default)]
struct Counters {
    /// See [`BatcherStats::submitted`].
    submitted: AtomicU64,
    /// See [`BatcherStats::batches`].
    batches: AtomicU64,
    /// See [`BatcherStats::batched_items`].
    batched_items: AtomicU64,
    /// See [`BatcherStats::max_batch_seen`].
    max_batch_seen: AtomicU64,
    /// See [`BatcherStats::timeouts`].
    timeouts: AtomicU64,
    /// See [`BatcherStats::overloads`].
    overloads: AtomicU64,
    /// See [`BatcherStats::cancelled`].
    cancelled: AtomicU64,
    /// See [`BatcherStats::failed`].
    failed: AtomicU64,
    /// See [`BatcherStats::busy_us`].
    busy_us: AtomicU64,
    /// Admitted requests not yet taken into a batch (or answered early). The admission check
    /// keeps it at most `queue_capacity`.
    queue_depth: AtomicUsize,
}

impl Counters {
    fn snapshot(&self) -> BatcherStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BatcherStats {
            submitted: get(&self.submitted),
            batches: get(&self.batches),
            batched_items: get(&self.batched_items),
            max_batch_seen: get(&self.max_batch_seen),
            timeouts: get(&self.timeouts),
            overloads: get(&self.overloads),
            cancelled: get(&self.cancelled),
            failed: get(&self.failed),
            busy_us: get(&self.busy_us),
            queue_depth: self.queue_depth.load(Ordering::Relaxed) as u64,
        }
    }

    /// One request leaves the queue (taken into a batch, or answered without running).
    fn dequeue(&self) {
        self.queue_depth.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a request's answer goes.
type ReplyTx<Out> = oneshot::Sender<Result<Out, InferError>>;

/// A request on its way to the model: the payload plus its bookkeeping.
struct Queued<T, Out> {
    /// The request (before the preparation thread) or the prepared item (after it).
    payload: T,
    /// When the request was admitted.
    enqueued: Instant,
    /// After this instant the request is answered `Timeout` instead of running.
    deadline: Instant,
    /// The caller's reply channel; closed when the caller has gone away.
    reply_tx: ReplyTx<Out>,
}

impl<T, Out> Queued<T, Out> {
    /// Answers `Timeout` or skips a cancelled request; returns the request if it should go on.
    fn still_wanted(self, now: Instant, limit: Duration, counters: &Counters) -> Option<Self> {
        if self.reply_tx.is_closed() {
            counters.cancelled.fetch_add(1, Ordering::Relaxed);
            counters.dequeue();
            return None;
        }
        if now > self.deadline {
            counters.timeouts.fetch_add(1, Ordering::Relaxed);
            counters.dequeue();
            let waited_ms = now.duration_since(self.enqueued).as_millis() as u64;
            let _ = self.reply_tx.send(Err(InferError::Timeout {
                waited_ms,
                limit_ms: limit.as_millis() as u64,
            }));
            return None;
        }
        Some(self)
    }
}

/// State shared by all clones of a [`Batcher`] handle.
struct Shared {
    /// Counters, also updated by the threads.
    counters: Arc<Counters>,
    /// Limits (admission uses `queue_capacity` and `queue_timeout`).
    config: BatcherConfig,
}

/// Cheap-to-clone handle to a running batcher. The threads stop when the last clone is dropped
/// (after answering what is queued).
pub struct Batcher<Req, Out> {
    /// Into the preparation thread. Bounded at `queue_capacity`.
    request_tx: mpsc::SyncSender<Queued<Req, Out>>,
    /// Counters and limits.
    shared: Arc<Shared>,
}

impl<Req, Out> Clone for Batcher<Req, Out> {
    fn clone(&self) -> Self {
        Batcher {
            request_tx: self.request_tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<Req: Send + 'static, Out: Send + 'static> Batcher<Req, Out> {
    /// Starts the preparation thread and one model thread.
    pub fn spawn<P, B>(config: BatcherConfig, prepare: P, backend: B) -> Result<Self, InferError>
    where
        P: Prepare<Request = Req>,
        B: Backend<Item = P::Item, Output = Out>,
    {
        Self::spawn_pool(config, prepare, vec![backend])
    }

    /// Starts the preparation thread and one model thread per backend (`{name}-model-{i}`); they
    /// share the queue, each forming its next batch when it is free.
    pub fn spawn_pool<P, B>(
        config: BatcherConfig,
        prepare: P,
        backends: Vec<B>,
    ) -> Result<Self, InferError>
    where
        P: Prepare<Request = Req>,
        B: Backend<Item = P::Item, Output = Out>,
    {
        config.validate()?;
        if backends.is_empty() {
            return Err(InferError::Config {
                setting: "workers",
                reason: "must be at least 1".into(),
            });
        }
        let counters = Arc::new(Counters::default());
        let (request_tx, request_rx) = mpsc::sync_channel(config.queue_capacity);
        // Unbounded, but admission keeps at most `queue_capacity` requests in the whole pipeline.
        let (prepared_tx, prepared_rx) = mpsc::channel();

        let prep = PrepWorker {
            prepare,
            request_rx,
            prepared_tx,
            counters: counters.clone(),
            queue_timeout: config.queue_timeout,
        };
        let intake = Arc::new(Mutex::new(Intake {
            prepared_rx,
            carry: None,
        }));
        let spawn_error =
            |e: std::io::Error| InferError::Backend(format!("cannot start thread: {e}"));
        let single = backends.len() == 1;
        for (i, backend) in backends.into_iter().enumerate() {
            let model = ModelWorker {
                backend,
                intake: intake.clone(),
                counters: counters.clone(),
                config: config.clone(),
            };
            let name = if single {
                format!("{}-model", config.name)
            } else {
                format!("{}-model-{i}", config.name)
            };
            // If a thread fails to start, the error returns early and drops `prep` (the sending
            // end of `intake`), so the model threads already started see the queue close and
            // exit.
            std::thread::Builder::new()
                .name(name)
                .spawn(move || model.run())
                .map_err(spawn_error)?;
        }
        std::thread::Builder::new()
            .name(format!("{}-prep", config.name))
            .spawn(move || prep.run())
            .map_err(spawn_error)?;
        Ok(Batcher {
            request_tx,
            shared: Arc::new(Shared { counters, config }),
        })
    }

    /// Queues `request` and waits for its result.
    ///
    /// Fails fast with `Overloaded` when the queue is full; `Timeout` when it waited past
    /// `queue_timeout`. Dropping the future withdraws the request (it will not run if not yet
    /// batched).
    pub async fn submit(&self, request: Req) -> Result<Out, InferError> {
        let reply_rx = self.enqueue(request)?;
        reply_rx.await.unwrap_or(Err(InferError::Closed))
    }

    /// Like [`submit`](Self::submit) for synchronous callers. Must not be called from inside an
    /// async runtime (it blocks the thread).
    pub fn submit_blocking(&self, request: Req) -> Result<Out, InferError> {
        let reply_rx = self.enqueue(request)?;
        reply_rx.blocking_recv().unwrap_or(Err(InferError::Closed))
    }

    /// Admits `request` (or refuses it at once) and returns where its answer will arrive.
    pub fn enqueue(
        &self,
        request: Req,
    ) -> Result<oneshot::Receiver<Result<Out, InferError>>, InferError> {
        let counters = &self.shared.counters;
        let capacity = self.shared.config.queue_capacity;
        let admitted = counters
            .queue_depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |depth| {
                (depth < capacity).then_some(depth + 1)
            })
            .is_ok();
        if !admitted {
            counters.overloads.fetch_add(1, Ordering::Relaxed);
            return Err(InferError::Overloaded { capacity });
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        let now = Instant::now();
        let queued = Queued {
            payload: request,
            enqueued: now,
            deadline: now + self.shared.config.queue_timeout,
            reply_tx,
        };
        match self.request_tx.try_send(queued) {
            Ok(()) => {
                counters.submitted.fetch_add(1, Ordering::Relaxed);
                Ok(reply_rx)
            }
            Err(mpsc::TrySendError::Full(_)) => {
                // Unreachable while admission holds, but never block a caller.
                counters.dequeue();
                counters.overloads.fetch_add(1, Ordering::Relaxed);
                Err(InferError::Overloaded { capacity })
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {
                counters.dequeue();
                Err(InferError::Closed)
            }
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> BatcherStats {
        self.shared.counters.snapshot()
    }

    /// The limits this batcher runs with.
    pub fn config(&self) -> &BatcherConfig {
        &self.shared.config
    }
}

/// Renders a panic payload for an error message.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// The preparation thread: requests in, prepared items out.
struct PrepWorker<P: Prepare, Out> {
    /// Turns requests into items.
    prepare: P,
    /// From the handles; ends when the last handle is dropped.
    request_rx: mpsc::Receiver<Queued<P::Request, Out>>,
    /// To the model thread.
    prepared_tx: mpsc::Sender<Queued<P::Item, Out>>,
    /// Shared counters.
    counters: Arc<Counters>,
    /// For the `Timeout` message.
    queue_timeout: Duration,
}

impl<P: Prepare, Out> PrepWorker<P, Out> {
    fn run(mut self) {
        while let Ok(queued) = self.request_rx.recv() {
            let Some(queued) =
                queued.still_wanted(Instant::now(), self.queue_timeout, &self.counters)
            else {
                continue;
            };
            let Queued {
                payload,
                enqueued,
                deadline,
                reply_tx,
            } = queued;
            let prepared = catch_unwind(AssertUnwindSafe(|| self.prepare.prepare(payload)))
                .unwrap_or_else(|panic| {
                    Err(InferError::Input(format!(
                        "preparation panicked: {}",
                        panic_message(&*panic)
                    )))
                });
            match prepared {
                Ok(item) => {
                    let queued = Queued {
                        payload: item,
                        enqueued,
                        deadline,
                        reply_tx,
                    };
                    if let Err(mpsc::SendError(queued)) = self.prepared_tx.send(queued) {
                        // The model thread is gone; nothing can serve this request.
                        self.counters.dequeue();
                        let _ = queued.reply_tx.send(Err(InferError::Closed));
                    }
                }
                Err(e) => {
                    self.counters.dequeue();
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    let _ = reply_tx.send(Err(e));
                }
            }
        }
    }
}

/// The model threads' shared end of the queue. A model thread holds the lock while it forms a
/// batch (waiting for the first request when the queue is empty), never while the model runs.
struct Intake<Item, Out> {
    /// From the preparation thread; ends when it exits.
    prepared_rx: mpsc::Receiver<Queued<Item, Out>>,
    /// A request that did not fit the previous batch; it opens the next one.
    carry: Option<Queued<Item, Out>>,
}

impl<Item, Out> Intake<Item, Out> {
    /// Blocks for the first request, then takes whatever else has queued, within the limits
    /// (`cost` measures an item). `None` when the pipeline is closed and drained.
    fn next_batch(
        &mut self,
        cost: impl Fn(&Item) -> usize,
        config: &BatcherConfig,
        counters: &Counters,
    ) -> Option<Vec<Queued<Item, Out>>> {
        let mut batch: Vec<Queued<Item, Out>> = Vec::new();
        let mut max_cost = 0usize;
        loop {
            let next = match self.carry.take() {
                Some(queued) => queued,
                None if batch.is_empty() => self.prepared_rx.recv().ok()?,
                None => match self.prepared_rx.try_recv() {
                    Ok(queued) => queued,
                    Err(_) => return Some(batch),
                },
            };
            let Some(next) = next.still_wanted(Instant::now(), config.queue_timeout, counters)
            else {
                continue;
            };
            let new_max = max_cost.max(cost(&next.payload));
            let fits = batch.len() < config.max_batch_size
                && (batch.len() + 1).saturating_mul(new_max) <= config.max_batch_tokens;
            if !batch.is_empty() && !fits {
                self.carry = Some(next);
                return Some(batch);
            }
            counters.dequeue();
            max_cost = new_max;
            batch.push(next);
            if batch.len() >= config.max_batch_size {
                return Some(batch);
            }
        }
    }
}

/// A model thread: forms batches from what has queued and runs them.
struct ModelWorker<B: Backend> {
    /// Runs batches.
    backend: B,
    /// The queue, shared with the other model threads.
    intake: Arc<Mutex<Intake<B::Item, B::Output>>>,
    /// Shared counters.
    counters: Arc<Counters>,
    /// Batch limits.
    config: BatcherConfig,
}

impl<B: Backend> ModelWorker<B> {
    fn run(mut self) {
        loop {
            let batch = self
                .intake
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .next_batch(|item| self.backend.cost(item), &self.config, &self.counters);
            let Some(batch) = batch else { break };
            self.run_batch(batch);
        }
    }

    fn run_batch(&mut self, batch: Vec<Queued<B::Item, B::Output>>) {
        let n = batch.len();
        let (items, replies): (Vec<B::Item>, Vec<ReplyTx<B::Output>>) =
            batch.into_iter().map(|q| (q.payload, q.reply_tx)).unzip();
        let started = Instant::now();
        let result =
            catch_unwind(AssertUnwindSafe(|| self.backend.run(items))).unwrap_or_else(|panic| {
                Err(InferError::Backend(format!(
                    "model panicked: {}",
                    panic_message(&*panic)
                )))
            });
        let c = &self.counters;
        c.busy_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.batched_items.fetch_add(n as u64, Ordering::Relaxed);
        c.max_batch_seen.fetch_max(n as u64, Ordering::Relaxed);
        let result = match result {
            Ok(outputs) if outputs.len() != n => Err(InferError::Backend(format!(
                "model returned {} results for a batch of {n}",
                outputs.len()
            ))),
            other => other,
        };
        match result {
            Ok(outputs) => {
                for (reply_tx, output) in replies.into_iter().zip(outputs) {
                    let _ = reply_tx.send(Ok(output));
                }
            }
            Err(e) => {
                tracing::warn!(batcher = %self.config.name, batch = n, error = %e, "model batch failed");
                c.failed.fetch_add(n as u64, Ordering::Relaxed);
                for reply_tx in replies {
                    let _ = reply_tx.send(Err(e.clone()));
                }
            }
        }
    }
}
