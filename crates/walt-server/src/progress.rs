//! What the long operations (clone, publish, search) report while they run,
//! in their own terms. The service layer turns these events into gRPC
//! messages; the engines never see one.

use tokio::sync::mpsc;

use crate::error::ServiceError;

/// Where one layer (or blob) stands. `key` names it for the client's
/// progress bars: its digest, or a Docker archive's layer id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerProgress {
    pub key: String,
    pub done: u64,
    pub total: u64,
    pub complete: bool,
    /// Nothing was transferred: the other side already had it.
    pub cached: bool,
}

impl LayerProgress {
    /// `done` of `total` bytes, still going.
    pub fn running(key: &str, done: u64, total: u64) -> Self {
        Self {
            key: key.to_string(),
            done,
            total,
            complete: false,
            cached: false,
        }
    }

    /// All `total` bytes there; `cached` when none had to be sent.
    pub fn finished(key: &str, total: u64, cached: bool) -> Self {
        Self {
            key: key.to_string(),
            done: total,
            total,
            complete: true,
            cached,
        }
    }
}

/// An event of a clone or a publish whose result is an `R`. `Done` comes
/// last, unless the operation fails (the stream then ends with the error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<R> {
    /// A line for the user.
    Message(String),
    Layer(LayerProgress),
    Done(R),
}

/// The sending end of an operation's events, in order, followed by its
/// outcome. Sending never fails: when the receiver has gone (the client
/// disconnected), events are dropped, and [`Reporter::closed`] says so.
pub struct Reporter<E> {
    tx: mpsc::Sender<Result<E, ServiceError>>,
}

impl<E> Clone for Reporter<E> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

/// The receiving end: events, then the outcome (an error, or for a clone or
/// a publish its `Done` event).
pub type Receiver<E> = mpsc::Receiver<Result<E, ServiceError>>;

impl<E: Send> Reporter<E> {
    /// A reporter holding at most `capacity` events not yet received.
    pub fn channel(capacity: usize) -> (Self, Receiver<E>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx }, rx)
    }

    /// Sends `event`, waiting for room.
    pub async fn send(&self, event: E) {
        let _ = self.tx.send(Ok(event)).await;
    }

    /// Sends `event` if there is room now (progress is best effort: a slow
    /// client never slows the work down).
    pub fn try_send(&self, event: E) {
        let _ = self.tx.try_send(Ok(event));
    }

    /// Sends `event` from a blocking thread, waiting for room.
    pub fn blocking_send(&self, event: E) {
        let _ = self.tx.blocking_send(Ok(event));
    }

    /// Sends the outcome of the operation: its last item.
    pub async fn finish(&self, outcome: Result<E, ServiceError>) {
        let _ = self.tx.send(outcome).await;
    }

    /// Completes once the receiver has gone.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

impl<R: Send> Reporter<Event<R>> {
    /// A line for the user.
    pub async fn say(&self, text: String) {
        self.send(Event::Message(text)).await
    }

    pub async fn layer(&self, p: LayerProgress) {
        self.send(Event::Layer(p)).await
    }

    /// Layer progress, best effort (see [`Reporter::try_send`]).
    pub fn try_layer(&self, p: LayerProgress) {
        self.try_send(Event::Layer(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_then_outcome_in_order_and_closed_when_dropped() {
        let (r, mut rx) = Reporter::<Event<u32>>::channel(4);
        r.say("hello".into()).await;
        r.try_layer(LayerProgress::running("sha256:a", 1, 2));
        r.finish(Ok(Event::Done(7))).await;
        assert_eq!(
            rx.recv().await.unwrap().unwrap(),
            Event::Message("hello".into())
        );
        assert_eq!(
            rx.recv().await.unwrap().unwrap(),
            Event::Layer(LayerProgress::running("sha256:a", 1, 2))
        );
        assert_eq!(rx.recv().await.unwrap().unwrap(), Event::Done(7));
        drop(rx);
        // the client went away: closed() completes, sending is harmless
        r.closed().await;
        r.say("nobody listens".into()).await;
    }

    #[tokio::test]
    async fn try_send_drops_when_full() {
        let (r, mut rx) = Reporter::<Event<()>>::channel(1);
        r.try_layer(LayerProgress::running("k", 1, 3));
        r.try_layer(LayerProgress::running("k", 2, 3));
        assert_eq!(
            rx.recv().await.unwrap().unwrap(),
            Event::Layer(LayerProgress::running("k", 1, 3))
        );
        assert!(
            rx.try_recv().is_err(),
            "the second event must have been dropped"
        );
    }
}
