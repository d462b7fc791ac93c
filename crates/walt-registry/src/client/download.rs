//! Downloading a whole blob as one stream that survives broken connections:
//! where the body stops early, the download resumes with a `Range` request
//! from the first missing byte, up to the client's retry budget.

use bytes::{Buf, Bytes};
use futures::StreamExt;
use futures::stream::BoxStream;

use walt_core::Digest;

use super::RegistryClient;
use crate::error::RegistryError;

/// Where a resuming download stands, between two chunks.
struct Download {
    client: RegistryClient,
    repo: String,
    digest: Digest,
    /// Size the manifest announces.
    size: u64,
    /// Bytes given to the caller so far.
    sent: u64,
    /// Resumes so far.
    resumes: u32,
    /// The open response, if any.
    body: Option<BoxStream<'static, Result<Bytes, RegistryError>>>,
    /// Bytes of the open response to drop: a registry that ignores the
    /// range starts again at 0.
    skip: u64,
    /// Nothing more to give (the end, or an error was given).
    done: bool,
}

impl RegistryClient {
    /// The body of blob `digest` of `repo`, announced as `size` bytes, as one
    /// stream of chunks. When the connection breaks or the body ends before
    /// `size` bytes, the download resumes from the first missing byte with a
    /// `Range` request (a registry that ignores it sends the whole blob again:
    /// what was already given is skipped), at most as many times as the retry
    /// policy has tries, waiting its delays in between; then the stream ends
    /// with [`RegistryError::Truncated`]. Other errors end it at once.
    ///
    /// The bytes are not verified: the caller hashes what it keeps. A body
    /// longer than `size` is passed on up to the first chunk beyond `size`,
    /// then the stream ends (the caller's size check reports it).
    pub fn blob_stream(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
    ) -> BoxStream<'static, Result<Bytes, RegistryError>> {
        let start = Download {
            client: self.clone(),
            repo: repo.to_string(),
            digest: digest.clone(),
            size,
            sent: 0,
            resumes: 0,
            body: None,
            skip: 0,
            done: false,
        };
        futures::stream::unfold(start, |mut d| async move {
            let item = d.next_chunk().await?;
            Some((item, d))
        })
        .boxed()
    }
}

impl Download {
    /// The next chunk for the caller; `None` at the end.
    async fn next_chunk(&mut self) -> Option<Result<Bytes, RegistryError>> {
        loop {
            if self.done {
                return None;
            }
            let body = match &mut self.body {
                Some(b) => b,
                None => {
                    let resp = match self
                        .client
                        .get_blob(&self.repo, &self.digest, self.sent)
                        .await
                    {
                        Ok(r) => r,
                        Err(e) => return Some(self.fail(e)),
                    };
                    self.skip = self.sent.saturating_sub(resp.offset);
                    self.body.insert(resp.stream)
                }
            };
            let why = match body.next().await {
                Some(Ok(mut b)) => {
                    if self.skip > 0 {
                        let n = self.skip.min(b.len() as u64);
                        b.advance(n as usize);
                        self.skip -= n;
                        if b.is_empty() {
                            continue;
                        }
                    }
                    self.sent += b.len() as u64;
                    if self.sent > self.size {
                        // Longer than announced: the caller's size check reports it.
                        self.done = true;
                    }
                    return Some(Ok(b));
                }
                Some(Err(e)) if e.is_transient() => e.to_string(),
                Some(Err(e)) => return Some(self.fail(e)),
                None if self.sent >= self.size => {
                    self.done = true;
                    return None;
                }
                None => "connection closed early".to_string(),
            };
            self.body = None;
            self.resumes += 1;
            let retry = self.client.inner.retry;
            if self.resumes > retry.attempts() {
                let e = RegistryError::Truncated {
                    label: self.client.inner.label.clone(),
                    digest: self.digest.clone(),
                    received: self.sent,
                    expected: self.size,
                    reason: why,
                };
                return Some(self.fail(e));
            }
            tracing::warn!(
                registry = %self.client.inner.label,
                digest = %self.digest,
                sent = self.sent,
                attempt = self.resumes,
                reason = %why,
                "blob download interrupted, resuming"
            );
            tokio::time::sleep(retry.delay(self.resumes)).await;
        }
    }

    fn fail(&mut self, e: RegistryError) -> Result<Bytes, RegistryError> {
        self.done = true;
        self.body = None;
        Err(e)
    }
}
