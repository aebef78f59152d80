//! The [`Backend`] trait: where behaviour state goes beyond this process's memory.
//!
//! Takes every [`Change`] the tracker makes (violations, sanction changes, first sight of a
//! user); gives back nothing on the hot path (a backend only queues), and on request waits for
//! the queued work ([`Backend::sync`], [`Backend::shutdown`]). Called by the tracker, under the
//! user's shard lock, so that the changes of one user reach a backend in the order they were
//! made.
//!
//! Implementations: `persist::FileBackend` (snapshot + fsynced journal on local disk) and
//! `redis::RedisBackend` (the record shared by every sidecar). The in-memory store itself is
//! not a backend: it is always there and answers every verdict.

use super::Outcome;
use super::state::{Now, SavedUser};
use super::store::UserKey;
use futures_util::future::BoxFuture;
use std::sync::Arc;

/// One change the tracker made to a user's record.
#[derive(Debug, Clone)]
pub(crate) enum Change {
    /// A `review`/`block` outcome was recorded. The shared store replays it on the shared
    /// record (other sidecars' violations included) and folds in `local`.
    Violation {
        /// The tenant.
        tenant: Arc<str>,
        /// The user, as the IM server named it.
        user: Box<str>,
        /// The outcome as recorded (after the harassment upgrade).
        outcome: Outcome,
        /// When.
        at: Now,
        /// The local record after it.
        local: SavedUser,
    },
    /// The sanction on the local record changed.
    Sanction {
        /// The store key of the user.
        key: UserKey,
        /// The tenant.
        tenant: Arc<str>,
        /// The user.
        user: Box<str>,
        /// The record after the change.
        saved: SavedUser,
        /// Set or lifted by hand (`sanction` request): it replaces what other stores hold
        /// instead of being merged with it.
        manual: bool,
        /// Why (the sanction event's `reason`).
        reason: Box<str>,
    },
    /// A user this sidecar had not seen (since start or eviction): the shared store fetches
    /// their record.
    FirstSight {
        /// The tenant.
        tenant: Arc<str>,
        /// The user.
        user: Box<str>,
    },
}

/// A place changes go to. Every method returns at once; the work happens on the backend's own
/// thread or task.
pub(crate) trait Backend: Send + Sync {
    /// `memory` (the file journal) or `redis`.
    fn name(&self) -> &'static str;

    /// Whether this backend wants [`Change::Violation`]s and [`Change::FirstSight`]s (the
    /// tracker skips building them otherwise); every backend gets [`Change::Sanction`]s.
    fn wants_activity(&self) -> bool {
        false
    }

    /// Queues `change`. Never blocks and never fails: a backend that cannot keep up drops
    /// what it can afford to and says so in its logs.
    fn submit(&self, change: &Change);

    /// The state this backend shares with other sidecars is unavailable now (verdicts carry
    /// `degraded: ["shared_state"]`).
    fn degraded(&self) -> bool {
        false
    }

    /// Resolves when everything submitted so far is durable (journal fsynced) or shared
    /// (written to Redis) — or, for Redis while it is down, queued for the reconnect.
    fn sync(&self) -> BoxFuture<'_, ()>;

    /// Finishes the queued work (final snapshot; last writes to Redis, bounded by its
    /// timeout) and stops. Later submissions are ignored.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}
