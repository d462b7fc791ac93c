//! Downloads shared by concurrent clones (a class cloning one image at
//! once): each layer blob is fetched and imported once, whoever needs it
//! meanwhile waits for that import; manifests and configs are requested
//! once per key within a short window.
//!
//! A layer download is a [`Flight`]: a task of its own (not part of the
//! clone that started it), followed by every clone that needs the layer
//! through a [`Ticket`]. The flight reports the bytes received so far and
//! then its outcome on a `watch` channel. The last ticket dropped before
//! the end cancels the flight (its staging files are removed by the import
//! as it stops); a ticket dropped while others remain changes nothing.
//!
//! A failed flight's error reaches every subscriber that fetches from the
//! same registry (it would have asked the same registry the same thing);
//! a subscriber of another registry tries again with its own (see
//! `clone::fetch_layer`).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use walt_core::Digest;

use crate::error::ServiceError;

/// How long a manifest or config fetched for one clone answers the same
/// request of another.
pub(crate) const DOCUMENT_WINDOW: Duration = Duration::from_secs(10);
/// Documents kept for the window at most (beyond, they are only shared
/// while in flight).
const MAX_KEPT_DOCUMENTS: usize = 64;
/// Largest document kept for the window.
const MAX_KEPT_DOCUMENT_SIZE: usize = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The shared downloads of a server.
#[derive(Default)]
pub struct Inflight {
    layers: Mutex<HashMap<LayerKey, Arc<Flight>>>,
    manifests: Documents<walt_registry::FetchedManifest>,
    configs: Documents<Vec<u8>>,
}

/// What makes two layer downloads the same: the blob, and what its image
/// says it is (a config claiming another diff_id, or a media type another
/// compression, gets a download of its own).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct LayerKey {
    pub digest: Digest,
    pub diff_id: Digest,
    pub media_type: String,
}

/// How a flight ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Landed {
    /// Bytes downloaded (0: the store had the blob).
    pub downloaded: u64,
    /// Bytes of file data unpacked (for the image bound).
    pub unpacked: u64,
}

/// A flight's error, as its subscribers get it.
#[derive(Debug, Clone)]
pub(crate) struct FlightError {
    /// The registry the flight downloaded from.
    pub registry: String,
    pub error: Arc<ServiceError>,
}

/// Where a flight stands.
#[derive(Debug, Clone)]
pub(crate) enum Status {
    /// Bytes received so far.
    Running(u64),
    Done(Result<Landed, FlightError>),
}

/// One layer download, followed by its subscribers.
pub(crate) struct Flight {
    status: watch::Sender<Status>,
    /// Tickets alive.
    subscribers: Mutex<usize>,
    /// Cancelled when the last ticket goes before the end.
    cancel: CancellationToken,
    /// The registry it downloads from.
    registry: String,
}

impl Flight {
    /// Cancelled once nobody waits for it any more.
    pub(crate) fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    /// `done` bytes received (from the importing thread: no await).
    pub(crate) fn progress(&self, done: u64) {
        self.status.send_replace(Status::Running(done));
    }

    fn finished(&self) -> bool {
        matches!(*self.status.borrow(), Status::Done(_))
    }
}

/// A subscription to a flight. Dropping the last one before the flight
/// ends cancels it.
pub(crate) struct Ticket {
    flight: Arc<Flight>,
    status: watch::Receiver<Status>,
    left: bool,
}

impl Ticket {
    pub(crate) fn flight(&self) -> &Arc<Flight> {
        &self.flight
    }

    /// Waits for the flight's outcome, passing the bytes received so far to
    /// `progress` as they come.
    pub(crate) async fn outcome(
        &mut self,
        mut progress: impl FnMut(u64),
    ) -> Result<Landed, FlightError> {
        loop {
            let now = self.status.borrow_and_update().clone();
            match now {
                Status::Running(done) => progress(done),
                Status::Done(outcome) => return outcome,
            }
            if self.status.changed().await.is_err() {
                // The flight task went away without an outcome (it
                // panicked, or the runtime is stopping).
                return Err(FlightError {
                    registry: self.flight.registry.clone(),
                    error: Arc::new(ServiceError::Internal(
                        "a shared layer download stopped without an outcome".into(),
                    )),
                });
            }
        }
    }

    /// Leaves the flight. When this was its last subscriber and it had not
    /// ended, it is cancelled, and this waits for it to have cleaned up.
    pub(crate) async fn leave(mut self) {
        if self.unsubscribe() {
            while !matches!(*self.status.borrow_and_update(), Status::Done(_)) {
                if self.status.changed().await.is_err() {
                    break;
                }
            }
        }
    }

    /// True when this cancelled the flight.
    fn unsubscribe(&mut self) -> bool {
        if self.left {
            return false;
        }
        self.left = true;
        let mut n = lock(&self.flight.subscribers);
        *n -= 1;
        if *n == 0 && !self.flight.finished() {
            self.flight.cancel.cancel();
            return true;
        }
        false
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.unsubscribe() {
            tracing::debug!(
                registry = %self.flight.registry,
                "no clone waits for a shared layer download any more: cancelled"
            );
        }
    }
}

impl Inflight {
    /// Subscribes to the flight of `key`, starting one (from `registry`)
    /// when none runs: then `true`, and the caller must run it and end it
    /// with [`Inflight::land`].
    pub(crate) fn join(&self, key: &LayerKey, registry: &str) -> (Ticket, bool) {
        let mut map = lock(&self.layers);
        if let Some(f) = map.get(key) {
            let mut n = lock(&f.subscribers);
            // A cancelled flight is on its way out: start another.
            if !f.cancel.is_cancelled() {
                *n += 1;
                let ticket = Ticket {
                    flight: f.clone(),
                    status: f.status.subscribe(),
                    left: false,
                };
                return (ticket, false);
            }
        }
        let (status, rx) = watch::channel(Status::Running(0));
        let flight = Arc::new(Flight {
            status,
            subscribers: Mutex::new(1),
            cancel: CancellationToken::new(),
            registry: registry.to_string(),
        });
        map.insert(key.clone(), flight.clone());
        let ticket = Ticket {
            flight,
            status: rx,
            left: false,
        };
        (ticket, true)
    }

    /// Ends the flight of `key`: later callers no longer find it (a layer
    /// that landed is in the store by now), then its subscribers get
    /// `outcome`.
    pub(crate) fn land(
        &self,
        key: &LayerKey,
        flight: &Arc<Flight>,
        outcome: Result<Landed, ServiceError>,
    ) {
        {
            let mut map = lock(&self.layers);
            if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
                map.remove(key);
            }
        }
        let outcome = outcome.map_err(|e| FlightError {
            registry: flight.registry.clone(),
            error: Arc::new(e),
        });
        flight.status.send_replace(Status::Done(outcome));
    }

    /// Layer downloads running (for tests).
    #[cfg(test)]
    fn layers_in_flight(&self) -> usize {
        lock(&self.layers).len()
    }

    /// A manifest: the answer of a request with the same `key` running or
    /// answered within [`DOCUMENT_WINDOW`], else `fetch`'s.
    pub(crate) async fn manifest<F>(
        &self,
        key: String,
        fetch: F,
    ) -> Result<walt_registry::FetchedManifest, ServiceError>
    where
        F: Future<Output = Result<walt_registry::FetchedManifest, ServiceError>> + Send + 'static,
    {
        self.manifests.get(key, fetch, |m| m.bytes.len()).await
    }

    /// A config blob, as [`Inflight::manifest`].
    pub(crate) async fn config<F>(&self, key: String, fetch: F) -> Result<Vec<u8>, ServiceError>
    where
        F: Future<Output = Result<Vec<u8>, ServiceError>> + Send + 'static,
    {
        self.configs.get(key, fetch, Vec::len).await
    }
}

/// What a document request ends with.
type DocOutcome<T> = Option<Result<Arc<T>, Arc<ServiceError>>>;

struct DocSlot<T> {
    outcome: watch::Sender<DocOutcome<T>>,
    /// When it was answered (kept until the window has passed).
    answered: Mutex<Option<Instant>>,
}

/// Single-flight requests with a short memory, by key.
struct Documents<T> {
    slots: Arc<Mutex<HashMap<String, Arc<DocSlot<T>>>>>,
}

impl<T> Default for Documents<T> {
    fn default() -> Self {
        Self {
            slots: Arc::default(),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Documents<T> {
    async fn get<F>(
        &self,
        key: String,
        fetch: F,
        size: impl Fn(&T) -> usize + Send + 'static,
    ) -> Result<T, ServiceError>
    where
        F: Future<Output = Result<T, ServiceError>> + Send + 'static,
    {
        let mut rx = {
            let mut slots = lock(&self.slots);
            let now = Instant::now();
            slots.retain(|_, s| {
                lock(&s.answered).is_none_or(|t| now.duration_since(t) < DOCUMENT_WINDOW)
            });
            match slots.get(&key) {
                Some(slot) => slot.outcome.subscribe(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    let slot = Arc::new(DocSlot {
                        outcome: tx,
                        answered: Mutex::new(None),
                    });
                    slots.insert(key.clone(), slot.clone());
                    // A task of its own: a waiter whose clone goes away
                    // does not stop it for the others.
                    let table = self.slots.clone();
                    tokio::spawn(async move {
                        let outcome = fetch.await.map(Arc::new).map_err(Arc::new);
                        {
                            let mut slots = lock(&table);
                            let keep = outcome
                                .as_ref()
                                .is_ok_and(|d| size(d) <= MAX_KEPT_DOCUMENT_SIZE)
                                && slots.len() <= MAX_KEPT_DOCUMENTS;
                            if keep {
                                *lock(&slot.answered) = Some(Instant::now());
                            } else if slots.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                                slots.remove(&key);
                            }
                        }
                        slot.outcome.send_replace(Some(outcome));
                    });
                    rx
                }
            }
        };
        loop {
            if let Some(outcome) = rx.borrow_and_update().clone() {
                return match outcome {
                    Ok(d) => Ok((*d).clone()),
                    Err(e) => Err(ServiceError::Shared(e)),
                };
            }
            if rx.changed().await.is_err() {
                return Err(ServiceError::Internal(
                    "a shared registry request stopped without an answer".into(),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key(n: u8) -> LayerKey {
        let d = Digest::from_sha256([n; 32]);
        LayerKey {
            digest: d.clone(),
            diff_id: d,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        }
    }

    #[tokio::test]
    async fn one_flight_per_layer_its_outcome_for_every_subscriber() {
        let table = Inflight::default();
        let (mut a, lead_a) = table.join(&key(1), "lab");
        let (mut b, lead_b) = table.join(&key(1), "lab");
        let (_c, lead_c) = table.join(&key(2), "lab");
        assert!(lead_a && !lead_b && lead_c);
        assert!(Arc::ptr_eq(a.flight(), b.flight()));
        a.flight().progress(7);
        let flight = a.flight().clone();
        let landed = Landed {
            downloaded: 10,
            unpacked: 20,
        };
        let waiter = tokio::spawn(async move {
            let mut seen = Vec::new();
            let out = b.outcome(|d| seen.push(d)).await;
            (out.unwrap(), seen)
        });
        table.land(&key(1), &flight, Ok(landed));
        let (out, seen) = waiter.await.unwrap();
        assert_eq!(out, landed);
        assert!(seen.iter().all(|d| *d == 7 || *d == 0), "{seen:?}");
        assert_eq!(a.outcome(|_| {}).await.unwrap(), landed);
        // Gone from the table: the next one leads (and finds the store full).
        assert_eq!(table.layers_in_flight(), 1);
        assert!(table.join(&key(1), "lab").1);
    }

    #[tokio::test]
    async fn a_failure_reaches_every_subscriber_with_its_registry() {
        let table = Inflight::default();
        let (a, _) = table.join(&key(1), "lab");
        let (mut b, _) = table.join(&key(1), "other");
        table.land(
            &key(1),
            &a.flight().clone(),
            Err(ServiceError::FailedPrecondition("blob cut short".into())),
        );
        let e = b.outcome(|_| {}).await.unwrap_err();
        assert_eq!(e.registry, "lab");
        let shared = ServiceError::Shared(e.error);
        assert_eq!(shared.to_string(), "blob cut short");
        assert_eq!(shared.kind(), crate::error::Kind::FailedPrecondition);
    }

    #[tokio::test]
    async fn the_last_subscriber_gone_cancels_and_waits_for_the_clean_up() {
        let table = Arc::new(Inflight::default());
        let (a, _) = table.join(&key(1), "lab");
        let (b, _) = table.join(&key(1), "lab");
        let flight = a.flight().clone();
        drop(a);
        assert!(!flight.cancelled().is_cancelled(), "one still waits");
        // The flight ends only once cancelled.
        let cleaned = Arc::new(AtomicUsize::new(0));
        let (t, f, c) = (table.clone(), flight.clone(), cleaned.clone());
        tokio::spawn(async move {
            f.cancelled().cancelled().await;
            tokio::task::yield_now().await;
            c.store(1, Ordering::SeqCst);
            t.land(&key(1), &f, Err(ServiceError::Internal("cancelled".into())));
        });
        b.leave().await;
        assert!(flight.cancelled().is_cancelled());
        assert_eq!(cleaned.load(Ordering::SeqCst), 1, "leave() waited");
        // A cancelled flight is never joined.
        let (_d, lead) = table.join(&key(1), "lab");
        assert!(lead);
    }

    #[tokio::test]
    async fn a_finished_flight_is_not_cancelled_by_its_last_subscriber() {
        let table = Inflight::default();
        let (a, _) = table.join(&key(1), "lab");
        let flight = a.flight().clone();
        table.land(
            &key(1),
            &flight,
            Ok(Landed {
                downloaded: 1,
                unpacked: 1,
            }),
        );
        drop(a);
        assert!(!flight.cancelled().is_cancelled());
    }

    #[tokio::test]
    async fn documents_are_asked_once_within_the_window_errors_not_kept() {
        let table = Arc::new(Inflight::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (gate_tx, gate_rx) = watch::channel(false);
        let fetch = |ok: bool| {
            let (calls, mut gate) = (calls.clone(), gate_rx.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let _ = gate.wait_for(|open| *open).await;
                if ok {
                    Ok(b"{}".to_vec())
                } else {
                    Err(ServiceError::NotFound("no such config".into()))
                }
            }
        };
        // Concurrent requests share one.
        let (t1, t2) = (table.clone(), table.clone());
        let (f1, f2) = (fetch(true), fetch(true));
        let a = tokio::spawn(async move { t1.config("k".into(), f1).await });
        let b = tokio::spawn(async move { t2.config("k".into(), f2).await });
        tokio::task::yield_now().await;
        gate_tx.send_replace(true);
        assert_eq!(a.await.unwrap().unwrap(), b"{}");
        assert_eq!(b.await.unwrap().unwrap(), b"{}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Answered within the window: no new request.
        assert_eq!(table.config("k".into(), fetch(true)).await.unwrap(), b"{}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Another key asks; an error is not kept.
        let e = table.config("e".into(), fetch(false)).await.unwrap_err();
        assert_eq!(e.to_string(), "no such config");
        assert_eq!(e.kind(), crate::error::Kind::NotFound);
        table.config("e".into(), fetch(true)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }
}
