//! The sha256 of a stream, computed inline or on a thread of its own.
//!
//! A commit hashes the tar of a tree it produces: reading thousands of
//! files and hashing their bytes, one after the other on one thread. On a
//! thread of its own the hash overlaps the reading (one copy of the bytes
//! into a batch buffer: ~20 times cheaper than the hash itself).

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use sha2::{Digest as _, Sha256};

use crate::util::finish_digest;
use walt_core::Digest;

/// Bytes handed to the hashing thread at a time.
const BATCH: usize = 1 << 20;
/// Batches in flight (filled, being hashed, returned for reuse).
const IN_FLIGHT: usize = 3;

/// A sha256 over everything given to [`StreamHasher::update`].
pub(crate) enum StreamHasher {
    Inline(Sha256),
    Thread(ThreadHasher),
}

impl StreamHasher {
    pub(crate) fn inline() -> Self {
        StreamHasher::Inline(Sha256::new())
    }

    /// A hasher on a thread of its own (falls back to inline when no
    /// thread can be started).
    pub(crate) fn on_thread() -> Self {
        ThreadHasher::start().map_or_else(Self::inline, StreamHasher::Thread)
    }

    pub(crate) fn update(&mut self, buf: &[u8]) {
        match self {
            StreamHasher::Inline(h) => h.update(buf),
            StreamHasher::Thread(t) => t.update(buf),
        }
    }

    pub(crate) fn finish(self) -> Digest {
        match self {
            StreamHasher::Inline(h) => finish_digest(h),
            StreamHasher::Thread(t) => t.finish(),
        }
    }
}

/// Batches bytes and sends them to a hashing thread, which sends the
/// emptied buffers back.
pub(crate) struct ThreadHasher {
    batch: Vec<u8>,
    to_hash: Option<SyncSender<Vec<u8>>>,
    emptied: Receiver<Vec<u8>>,
    thread: Option<JoinHandle<Sha256>>,
}

impl ThreadHasher {
    fn start() -> Option<Self> {
        let (to_hash, batches) = sync_channel::<Vec<u8>>(IN_FLIGHT);
        let (give_back, emptied) = sync_channel::<Vec<u8>>(IN_FLIGHT + 1);
        let thread = std::thread::Builder::new()
            .name("walt-hash".into())
            .spawn(move || {
                let mut h = Sha256::new();
                for mut b in batches {
                    h.update(&b);
                    b.clear();
                    // The writer may be gone (finishing): the buffer is
                    // then dropped.
                    let _ = give_back.try_send(b);
                }
                h
            })
            .ok()?;
        Some(ThreadHasher {
            batch: Vec::with_capacity(BATCH),
            to_hash: Some(to_hash),
            emptied,
            thread: Some(thread),
        })
    }

    fn update(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            let room = BATCH - self.batch.len();
            let n = room.min(buf.len());
            self.batch.extend_from_slice(&buf[..n]);
            buf = &buf[n..];
            if self.batch.len() == BATCH {
                self.send();
            }
        }
    }

    /// Sends the full batch and takes an emptied (or new) buffer.
    fn send(&mut self) {
        let next = self
            .emptied
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BATCH));
        let full = std::mem::replace(&mut self.batch, next);
        if let Some(tx) = &self.to_hash {
            // The thread only stops when the sender is dropped.
            let _ = tx.send(full);
        }
    }

    fn finish(mut self) -> Digest {
        if !self.batch.is_empty() {
            let last = std::mem::take(&mut self.batch);
            if let Some(tx) = &self.to_hash {
                let _ = tx.send(last);
            }
        }
        drop(self.to_hash.take());
        let h = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        finish_digest(h)
    }
}

impl Drop for ThreadHasher {
    fn drop(&mut self) {
        // Abandoned (an error on the way): the thread ends with the channel.
        drop(self.to_hash.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_and_inline_give_the_same_digest() {
        // Sizes around the batch boundary, in uneven writes.
        for total in [0usize, 1, BATCH - 1, BATCH, BATCH + 1, 3 * BATCH + 12_345] {
            let data: Vec<u8> = (0..total).map(|i| (i * 7 + i / 251) as u8).collect();
            let mut a = StreamHasher::inline();
            let mut b = StreamHasher::on_thread();
            assert!(matches!(b, StreamHasher::Thread(_)));
            for chunk in data.chunks(65_537) {
                a.update(chunk);
                b.update(chunk);
            }
            let expected = crate::util::sha256_digest(&data);
            assert_eq!(a.finish(), expected, "inline, {total} bytes");
            assert_eq!(b.finish(), expected, "thread, {total} bytes");
        }
    }

    #[test]
    fn an_abandoned_thread_hasher_stops_its_thread() {
        let mut h = StreamHasher::on_thread();
        h.update(&vec![1u8; 2 * BATCH + 5]);
        drop(h); // joins: returns only when the thread stopped
    }
}
