//! Tar streams sent to the server as messages of bounded size.

use std::io::{self, Write};

use tokio::sync::mpsc;

/// Writes a byte stream as messages of exactly `size` bytes (the last one
/// shorter), each made by `wrap` and sent on `tx` from a blocking thread.
/// A send to a server that stopped reading fails with `stopped`.
pub(crate) struct ChunkWriter<T> {
    pub tx: mpsc::Sender<T>,
    buf: Vec<u8>,
    size: usize,
    wrap: fn(Vec<u8>) -> T,
    stopped: &'static str,
}

impl<T> ChunkWriter<T> {
    pub fn new(
        tx: mpsc::Sender<T>,
        size: usize,
        wrap: fn(Vec<u8>) -> T,
        stopped: &'static str,
    ) -> Self {
        ChunkWriter {
            tx,
            buf: Vec::with_capacity(size),
            size,
            wrap,
            stopped,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(self.size));
        self.tx
            .blocking_send((self.wrap)(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, self.stopped))
    }
}

impl<T> Write for ChunkWriter<T> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            let take = (self.size - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == self.size {
                self.send()?;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}
