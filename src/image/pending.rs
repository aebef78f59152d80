//! # Binary image frames waiting for their request
//!
//! Takes the images a connection receives as binary frames and hands each one to the `moderate`
//! request that names it. Owned by one connection ([`crate::server::connection`]); the frame may
//! arrive before the request (it is parked) or after it (the request waits, up to
//! `image.binary_wait_ms`). Bounded: at most `image.max_pending_images` frames and
//! `image.max_pending_bytes` bytes parked per connection, each for at most
//! `image.binary_wait_ms`; a frame over a bound is refused, so a client cannot make the server
//! hold unclaimed images.
//!
//! Keys are `"<request id>/<image id>"`: the binary frame's header says
//! `{"type":"image","id":"m-1/i1"}` and request `m-1` lists `{"id":"i1"}` with no `data`.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Bytes;

/// Bounds of one connection's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingLimits {
    /// Most frames parked at once.
    pub max_images: usize,
    /// Most bytes parked at once.
    pub max_bytes: usize,
    /// How long a parked frame waits for its request, and a request for its frame.
    pub wait: Duration,
}

/// Why a frame was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PendingError {
    /// A frame with this key is already parked.
    #[error("binary image `{0}` was already sent and is still waiting for its request")]
    Duplicate(String),
    /// Parking it would exceed `image.max_pending_images` or `image.max_pending_bytes`.
    #[error(
        "too many unclaimed binary images on this connection ({images} images, {bytes} bytes; \
         limits image.max_pending_images = {max_images}, image.max_pending_bytes = {max_bytes}): \
         send the moderate request that lists them"
    )]
    Full {
        /// Frames parked now.
        images: usize,
        /// Bytes parked now.
        bytes: usize,
        /// The count limit.
        max_images: usize,
        /// The byte limit.
        max_bytes: usize,
    },
}

/// A frame waiting for its request.
struct Parked {
    /// The image bytes.
    bytes: Bytes,
    /// When it expires.
    expires: Instant,
}

#[derive(Default)]
struct State {
    /// Frames that arrived before their request.
    parked: HashMap<String, Parked>,
    /// Sum of the parked frames' sizes.
    parked_bytes: usize,
    /// Requests waiting for a frame, by key.
    waiting: HashMap<String, oneshot::Sender<Bytes>>,
}

impl State {
    fn expire(&mut self, now: Instant) {
        let mut freed = 0;
        self.parked.retain(|_, p| {
            let keep = p.expires > now;
            if !keep {
                freed += p.bytes.len();
            }
            keep
        });
        self.parked_bytes -= freed;
        self.waiting.retain(|_, tx| !tx.is_closed());
    }
}

/// One connection's binary images, parked or awaited.
pub struct PendingImages {
    /// Bounds.
    limits: PendingLimits,
    /// Parked frames and waiting requests; never held across an await.
    state: Mutex<State>,
}

impl PendingImages {
    /// An empty store.
    pub fn new(limits: PendingLimits) -> PendingImages {
        PendingImages {
            limits,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Delivers a frame: to the request waiting for it, or parked until one asks.
    pub fn offer(&self, key: String, bytes: Bytes) -> Result<(), PendingError> {
        let mut state = self.lock();
        let now = Instant::now();
        state.expire(now);
        let bytes = match state.waiting.remove(&key) {
            Some(tx) => match tx.send(bytes) {
                Ok(()) => return Ok(()),
                Err(bytes) => bytes, // the request gave up; park it for a retry
            },
            None => bytes,
        };
        if state.parked.contains_key(&key) {
            return Err(PendingError::Duplicate(key));
        }
        let l = self.limits;
        if state.parked.len() >= l.max_images || state.parked_bytes + bytes.len() > l.max_bytes {
            return Err(PendingError::Full {
                images: state.parked.len(),
                bytes: state.parked_bytes,
                max_images: l.max_images,
                max_bytes: l.max_bytes,
            });
        }
        state.parked_bytes += bytes.len();
        state.parked.insert(
            key,
            Parked {
                bytes,
                expires: now + l.wait,
            },
        );
        Ok(())
    }

    /// The frame for `key`: parked already, or awaited for up to `image.binary_wait_ms`.
    /// The error is the per-image message for the verdict.
    pub async fn take(&self, key: &str) -> Result<Bytes, String> {
        let rx = {
            let mut state = self.lock();
            state.expire(Instant::now());
            if let Some(p) = state.parked.remove(key) {
                state.parked_bytes -= p.bytes.len();
                return Ok(p.bytes);
            }
            if state.waiting.contains_key(key) {
                return Err(format!(
                    "binary image `{key}` is already awaited by another request with the same id"
                ));
            }
            let (tx, rx) = oneshot::channel();
            state.waiting.insert(key.to_string(), tx);
            rx
        };
        let mut rx = rx;
        match tokio::time::timeout(self.limits.wait, &mut rx).await {
            Ok(Ok(bytes)) => Ok(bytes),
            _ => {
                self.lock().waiting.remove(key);
                // `offer` sends under the lock: a frame that raced the timeout is here now.
                if let Ok(bytes) = rx.try_recv() {
                    return Ok(bytes);
                }
                Err(format!(
                    "binary image frame `{key}` did not arrive within {} ms (image.binary_wait_ms); \
                     send it before the moderate request, or give the image inline as `data`",
                    self.limits.wait.as_millis()
                ))
            }
        }
    }

    /// Frames and bytes parked now.
    pub fn parked(&self) -> (usize, usize) {
        let state = self.lock();
        (state.parked.len(), state.parked_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max_images: usize, max_bytes: usize, wait_ms: u64) -> PendingImages {
        PendingImages::new(PendingLimits {
            max_images,
            max_bytes,
            wait: Duration::from_millis(wait_ms),
        })
    }

    #[tokio::test]
    async fn before_and_after_the_request() {
        let p = store(4, 100, 1_000);
        p.offer("m/1".into(), Bytes::from_static(b"abc"))
            .expect("parked");
        assert_eq!(p.take("m/1").await.as_deref(), Ok(&b"abc"[..]));
        assert_eq!(p.parked(), (0, 0));
        let (got, ()) = tokio::join!(p.take("m/2"), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            p.offer("m/2".into(), Bytes::from_static(b"xy"))
                .expect("delivered");
        });
        assert_eq!(got.as_deref(), Ok(&b"xy"[..]));
    }

    #[tokio::test]
    async fn bounds_duplicates_and_expiry() {
        let p = store(2, 10, 50);
        p.offer("a".into(), Bytes::from_static(b"12345"))
            .expect("ok");
        assert!(matches!(
            p.offer("a".into(), Bytes::from_static(b"1")),
            Err(PendingError::Duplicate(_))
        ));
        assert!(matches!(
            p.offer("b".into(), Bytes::from_static(b"123456")),
            Err(PendingError::Full { .. })
        ));
        p.offer("c".into(), Bytes::from_static(b"1")).expect("ok");
        assert!(matches!(
            p.offer("d".into(), Bytes::from_static(b"1")),
            Err(PendingError::Full { .. })
        ));
        tokio::time::sleep(Duration::from_millis(80)).await;
        p.offer("d".into(), Bytes::from_static(b"1"))
            .expect("expired ones freed room");
        assert_eq!(p.parked(), (1, 1));
        let err = p.take("never").await.expect_err("times out");
        assert!(err.contains("image.binary_wait_ms"), "{err}");
    }
}
