//! Early writeback: the disk works while a large tree is still being
//! written, so that the flush that makes it durable has only the tail left.

use std::fs::File;
use std::path::Path;
use std::sync::mpsc::SyncSender;

/// Bytes written through the page cache between two early flushes.
const STEP: u64 = 64 * 1024 * 1024;

/// Every 64 MiB reported with [`EarlyFlush::wrote`], a thread of
/// its own syncs the filesystem of a directory (`syncfs`). Best effort: the
/// final flush that makes the tree durable sees any failure. The thread ends
/// when this is dropped, after the flush it may be running
/// ([`EarlyFlush::finish`] waits for it).
pub struct EarlyFlush {
    pending: u64,
    tx: Option<SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EarlyFlush {
    /// Flushes the filesystem of `dir` (none when it cannot be opened or
    /// no thread can be started: the final flush then does it all).
    pub fn start(dir: &Path) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let started = File::open(dir).ok().and_then(|dir| {
            std::thread::Builder::new()
                .name("walt-writeback".into())
                .spawn(move || {
                    for () in rx {
                        let _ = nix::unistd::syncfs(&dir);
                    }
                })
                .ok()
        });
        EarlyFlush {
            pending: 0,
            tx: started.is_some().then_some(tx),
            thread: started,
        }
    }

    /// Stops the thread and waits for the flush it may be running.
    pub fn finish(mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// `bytes` more were written.
    pub fn wrote(&mut self, bytes: u64) {
        self.pending += bytes;
        if self.pending >= STEP {
            self.pending = 0;
            if let Some(tx) = &self.tx {
                // Full: a flush is running or asked for, which covers this.
                let _ = tx.try_send(());
            }
        }
    }
}
