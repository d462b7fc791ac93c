//! Pushing to a registry: blob existence checks, cross-repository mounts,
//! blob uploads (one `PUT` for small blobs; `PATCH` chunks for large ones,
//! resumed from the position the registry reports after a broken
//! connection), manifests.

use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use reqwest::header::{self, HeaderName};
use reqwest::{Method, StatusCode, Url};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use walt_core::Digest;

use super::{
    RegistryClient, Req, ReqBody, SMALL_REQUEST_TIMEOUT, header_str, read_limited, sha256_digest,
};
use crate::error::RegistryError;

/// Told the position reached in the file being uploaded, as it is read.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Bytes read from the file per body chunk.
const READ_CHUNK: usize = 256 << 10;
/// Largest manifest pushed.
const MAX_MANIFEST_PUSH: usize = 8 << 20;

/// Streams `len` bytes of `path` from `offset`, telling `progress` the
/// position reached.
pub(super) async fn file_stream(
    path: PathBuf,
    offset: u64,
    len: u64,
    progress: Option<Progress>,
) -> io::Result<impl Stream<Item = io::Result<Bytes>> + Send + 'static> {
    let mut file = tokio::fs::File::open(&path).await?;
    file.seek(SeekFrom::Start(offset)).await?;
    Ok(futures::stream::try_unfold(
        (file, len, offset, progress),
        |(mut file, left, pos, progress)| async move {
            if left == 0 {
                return Ok(None);
            }
            let want = left.min(READ_CHUNK as u64) as usize;
            let mut buf = BytesMut::zeroed(want);
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shorter than the blob size",
                ));
            }
            buf.truncate(n);
            let pos = pos + n as u64;
            if let Some(p) = &progress {
                p(pos);
            }
            Ok(Some((buf.freeze(), (file, left - n as u64, pos, progress))))
        },
    ))
}

/// Adds `name=value` to the query of a path.
fn with_query(path: &str, name: &str, value: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    let value: String = url_encode(value);
    format!("{path}{sep}{name}={value}")
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The end (inclusive) of `Range: 0-<end>` (some registries write
/// `bytes=0-<end>`).
fn range_end(v: &str) -> Option<u64> {
    let v = v.trim();
    let v = v.strip_prefix("bytes=").unwrap_or(v);
    let (start, end) = v.split_once('-')?;
    if start.trim() != "0" {
        return None;
    }
    end.trim().parse().ok()
}

impl RegistryClient {
    /// Whether `repo` holds blob `digest` (`HEAD`). Asks for push access:
    /// it is the first step of an upload.
    pub async fn blob_exists(&self, repo: &str, digest: &Digest) -> Result<bool, RegistryError> {
        self.check_repo(repo)?;
        let req = Req {
            path: format!("/v2/{repo}/blobs/{digest}"),
            repo: Some(repo),
            method: Method::HEAD,
            push: true,
            timeout: Some(SMALL_REQUEST_TIMEOUT),
            what: format!("blob {digest} of {repo}"),
            ..Default::default()
        };
        let resp = self.send(&req).await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self
                .status_error(resp, &req, &format!("repository '{repo}'"))
                .await),
        }
    }

    /// Asks the registry to link blob `digest` of `from_repo` into `repo`
    /// without uploading it. True when mounted; false when the registry
    /// declined (the upload it opened instead is cancelled).
    pub async fn mount_blob(
        &self,
        repo: &str,
        digest: &Digest,
        from_repo: &str,
    ) -> Result<bool, RegistryError> {
        self.check_repo(repo)?;
        self.check_repo(from_repo)?;
        let req = Req {
            path: format!(
                "/v2/{repo}/blobs/uploads/?mount={}&from={}",
                url_encode(digest.as_str()),
                url_encode(from_repo)
            ),
            repo: Some(repo),
            method: Method::POST,
            push: true,
            pull_from: Some(from_repo.to_string()),
            timeout: Some(SMALL_REQUEST_TIMEOUT),
            what: format!("mount of blob {digest} from {from_repo} into {repo}"),
            ..Default::default()
        };
        let resp = self.send(&req).await?;
        match resp.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                if let Ok(loc) = self.location(&resp, &req.what) {
                    self.cancel_upload(repo, &loc).await;
                }
                Ok(false)
            }
            _ => Err(self
                .status_error(resp, &req, &format!("repository '{repo}'"))
                .await),
        }
    }

    /// Uploads blob `digest` (`size` bytes, read from `path`) to `repo`.
    /// Blobs up to the chunk size go in one `PUT`; larger ones in `PATCH`
    /// chunks. After a broken connection the upload continues from the
    /// position the registry reports, or starts over when the registry lost
    /// it. `progress` is told the position reached in the file.
    pub async fn push_blob(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        path: &Path,
        progress: Option<Progress>,
    ) -> Result<(), RegistryError> {
        self.check_repo(repo)?;
        let what = format!("upload of blob {digest} to {repo}");
        let chunk = self.inner.upload_chunk_size;
        let attempts = self.inner.retry.attempts();
        let mut failures = 0u32;
        'upload: loop {
            let mut loc = self.start_upload(repo).await?;
            if size <= chunk {
                let req = Req {
                    path: with_query(&loc, "digest", digest.as_str()),
                    repo: Some(repo),
                    method: Method::PUT,
                    push: true,
                    body: ReqBody::File {
                        path: path.to_path_buf(),
                        offset: 0,
                        len: size,
                        progress: progress.clone(),
                    },
                    headers: octet_stream(),
                    no_retry: true,
                    what: what.clone(),
                    ..Default::default()
                };
                match self
                    .finish_upload(&req, repo, digest, &mut failures)
                    .await?
                {
                    Uploaded::Done => return Ok(()),
                    Uploaded::Retry => continue 'upload,
                }
            }
            let mut offset = 0u64;
            while offset < size {
                let end = (offset + chunk).min(size);
                let req = Req {
                    path: loc.clone(),
                    repo: Some(repo),
                    method: Method::PATCH,
                    push: true,
                    body: ReqBody::File {
                        path: path.to_path_buf(),
                        offset,
                        len: end - offset,
                        progress: progress.clone(),
                    },
                    headers: {
                        let mut h = octet_stream();
                        h.push((header::CONTENT_RANGE, format!("{offset}-{}", end - 1)));
                        h
                    },
                    no_retry: true,
                    what: what.clone(),
                    ..Default::default()
                };
                let next: Option<u64> = match self.send(&req).await {
                    Ok(resp) if resp.status().is_success() => {
                        let next = header_str(resp.headers(), header::RANGE)
                            .and_then(range_end)
                            .map(|e| e + 1)
                            .filter(|n| *n > offset && *n <= end)
                            .unwrap_or(end);
                        if let Ok(l) = self.location(&resp, &what) {
                            loc = l;
                        }
                        Some(next)
                    }
                    Ok(resp) if resp.status() == StatusCode::RANGE_NOT_SATISFIABLE => {
                        // Not where the registry is: ask it below.
                        failures += 1;
                        if failures >= attempts {
                            return Err(self.protocol(
                                &what,
                                format!("chunk {offset}-{} refused (416)", end - 1),
                            ));
                        }
                        None
                    }
                    Ok(resp) => {
                        return Err(self
                            .status_error(resp, &req, &format!("repository '{repo}'"))
                            .await);
                    }
                    Err(e) => {
                        self.backoff(e, &mut failures).await?;
                        None
                    }
                };
                match next {
                    Some(next) => offset = next,
                    None => match self.upload_status(repo, &loc).await {
                        Ok((l, at)) if at <= size => {
                            tracing::info!(
                                registry = %self.inner.label,
                                "resuming the {what} at byte {at}"
                            );
                            loc = l;
                            offset = at;
                        }
                        _ => {
                            tracing::info!(
                                registry = %self.inner.label,
                                "the registry lost the {what}; starting over"
                            );
                            self.cancel_upload(repo, &loc).await;
                            continue 'upload;
                        }
                    },
                }
            }
            let req = Req {
                path: with_query(&loc, "digest", digest.as_str()),
                repo: Some(repo),
                method: Method::PUT,
                push: true,
                no_retry: true,
                timeout: Some(SMALL_REQUEST_TIMEOUT),
                what: what.clone(),
                ..Default::default()
            };
            match self
                .finish_upload(&req, repo, digest, &mut failures)
                .await?
            {
                Uploaded::Done => return Ok(()),
                Uploaded::Retry => continue 'upload,
            }
        }
    }

    /// Returns `err` when it is not transient or no try is left; else
    /// sleeps before the next try.
    /// Sends the request that completes an upload. A transport failure is
    /// retried from the start, unless the registry got the blob after all.
    async fn finish_upload(
        &self,
        req: &Req<'_>,
        repo: &str,
        digest: &Digest,
        failures: &mut u32,
    ) -> Result<Uploaded, RegistryError> {
        match self.send(req).await {
            Ok(resp) if resp.status().is_success() => Ok(Uploaded::Done),
            Ok(resp) => Err(self
                .status_error(resp, req, &format!("repository '{repo}'"))
                .await),
            Err(e) => {
                self.backoff(e, failures).await?;
                if self.blob_exists(repo, digest).await.unwrap_or(false) {
                    Ok(Uploaded::Done)
                } else {
                    Ok(Uploaded::Retry)
                }
            }
        }
    }

    async fn backoff(&self, err: RegistryError, failures: &mut u32) -> Result<(), RegistryError> {
        if !err.is_transient() || *failures + 1 >= self.inner.retry.attempts() {
            return Err(err);
        }
        let delay = self.inner.retry.delay(*failures);
        tracing::info!("{err}; retrying in {delay:?}");
        tokio::time::sleep(delay).await;
        *failures += 1;
        Ok(())
    }

    /// Uploads a small blob held in memory (one `PUT`), unless the
    /// repository already has it. Verifies `bytes` match `digest` first.
    pub async fn push_blob_bytes(
        &self,
        repo: &str,
        digest: &Digest,
        bytes: &[u8],
    ) -> Result<(), RegistryError> {
        self.check_repo(repo)?;
        if sha256_digest(bytes) != *digest {
            return Err(self.invalid(format!("blob content does not match digest {digest}")));
        }
        if self.blob_exists(repo, digest).await? {
            return Ok(());
        }
        let loc = self.start_upload(repo).await?;
        let req = Req {
            path: with_query(&loc, "digest", digest.as_str()),
            repo: Some(repo),
            method: Method::PUT,
            push: true,
            body: ReqBody::Bytes(Bytes::copy_from_slice(bytes)),
            headers: octet_stream(),
            timeout: Some(SMALL_REQUEST_TIMEOUT),
            what: format!("upload of blob {digest} to {repo}"),
            ..Default::default()
        };
        let resp = self.send(&req).await?;
        if !resp.status().is_success() {
            return Err(self
                .status_error(resp, &req, &format!("repository '{repo}'"))
                .await);
        }
        Ok(())
    }

    /// Stores a manifest under `reference` (a tag or its digest); returns
    /// its digest.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest, RegistryError> {
        self.check_repo(repo)?;
        if reference.is_empty() || reference.contains('/') {
            return Err(self.invalid(format!("invalid manifest reference '{reference}'")));
        }
        if bytes.len() > MAX_MANIFEST_PUSH {
            return Err(RegistryError::TooLarge {
                label: self.inner.label.clone(),
                what: format!("manifest {repo}:{reference}"),
                max: MAX_MANIFEST_PUSH as u64,
            });
        }
        let req = Req {
            path: format!("/v2/{repo}/manifests/{reference}"),
            repo: Some(repo),
            method: Method::PUT,
            push: true,
            body: ReqBody::Bytes(Bytes::copy_from_slice(bytes)),
            headers: vec![(header::CONTENT_TYPE, media_type.to_string())],
            timeout: Some(SMALL_REQUEST_TIMEOUT),
            what: format!("manifest {repo}:{reference}"),
            ..Default::default()
        };
        let resp = self.send(&req).await?;
        if !resp.status().is_success() {
            return Err(self
                .status_error(resp, &req, &format!("repository '{repo}'"))
                .await);
        }
        Ok(sha256_digest(bytes))
    }

    /// `POST /v2/<repo>/blobs/uploads/`: the location of a new upload.
    async fn start_upload(&self, repo: &str) -> Result<String, RegistryError> {
        let req = Req {
            path: format!("/v2/{repo}/blobs/uploads/"),
            repo: Some(repo),
            method: Method::POST,
            push: true,
            timeout: Some(SMALL_REQUEST_TIMEOUT),
            what: format!("blob upload to {repo}"),
            ..Default::default()
        };
        let resp = self.send(&req).await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(self
                .status_error(resp, &req, &format!("repository '{repo}'"))
                .await);
        }
        self.location(&resp, &req.what)
    }

    /// Where an upload stands (`GET <location>`): its new location and the
    /// number of bytes the registry holds.
    async fn upload_status(&self, repo: &str, loc: &str) -> Result<(String, u64), RegistryError> {
        let req = Req {
            path: loc.to_string(),
            repo: Some(repo),
            push: true,
            timeout: Some(SMALL_REQUEST_TIMEOUT),
            what: format!("blob upload status in {repo}"),
            ..Default::default()
        };
        let resp = self.send(&req).await?;
        if !resp.status().is_success() {
            return Err(self
                .status_error(resp, &req, &format!("blob upload in repository '{repo}'"))
                .await);
        }
        let at = header_str(resp.headers(), header::RANGE)
            .and_then(range_end)
            .map_or(0, |e| e + 1);
        let loc = self
            .location(&resp, &req.what)
            .unwrap_or_else(|_| loc.to_string());
        Ok((loc, at))
    }

    /// Cancels an upload, ignoring failures (the registry expires it anyway).
    async fn cancel_upload(&self, repo: &str, loc: &str) {
        let req = Req {
            path: loc.to_string(),
            repo: Some(repo),
            method: Method::DELETE,
            push: true,
            no_retry: true,
            timeout: Some(SMALL_REQUEST_TIMEOUT),
            what: format!("blob upload cancel in {repo}"),
            ..Default::default()
        };
        if let Ok(resp) = self.send(&req).await {
            let _ = read_limited(resp, 4096).await;
        }
    }

    /// The `Location` of an upload answer, as a path below the base URL.
    /// A location on another origin keeps only its path and query: the
    /// credentials are never sent elsewhere.
    fn location(&self, resp: &reqwest::Response, what: &str) -> Result<String, RegistryError> {
        let Some(loc) = header_str(resp.headers(), header::LOCATION) else {
            return Err(self.protocol(what, "answer without a Location header".into()));
        };
        self.location_path(loc)
            .ok_or_else(|| self.protocol(what, format!("unusable upload location '{loc}'")))
    }

    fn location_path(&self, loc: &str) -> Option<String> {
        let base = Url::parse(&format!("{}/", self.inner.base_url)).ok()?;
        let url = base.join(loc).ok()?;
        let prefix = base.path().trim_end_matches('/');
        let path = url.path().strip_prefix(prefix).unwrap_or(url.path());
        if !path.starts_with("/v2/") {
            return None;
        }
        Some(match url.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        })
    }
}

fn octet_stream() -> Vec<(HeaderName, String)> {
    vec![(header::CONTENT_TYPE, "application/octet-stream".into())]
}

/// How the request completing an upload ended.
enum Uploaded {
    Done,
    Retry,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientOptions;
    use futures::StreamExt;

    #[test]
    fn queries_and_ranges() {
        assert_eq!(
            with_query("/v2/a/blobs/uploads/u?_state=x", "digest", "sha256:ab"),
            "/v2/a/blobs/uploads/u?_state=x&digest=sha256%3Aab"
        );
        assert_eq!(
            with_query("/v2/a/blobs/uploads/u", "digest", "sha256:ab"),
            "/v2/a/blobs/uploads/u?digest=sha256%3Aab"
        );
        assert_eq!(range_end("0-1023"), Some(1023));
        assert_eq!(range_end("bytes=0-9"), Some(9));
        assert_eq!(range_end("5-9"), None);
        assert_eq!(range_end("junk"), None);
    }

    #[test]
    fn upload_locations() {
        let c = RegistryClient::new(ClientOptions::new("r", "http://127.0.0.1:5000")).unwrap();
        assert_eq!(
            c.location_path("http://127.0.0.1:5000/v2/a/b/blobs/uploads/u1?_state=s%3D")
                .as_deref(),
            Some("/v2/a/b/blobs/uploads/u1?_state=s%3D")
        );
        assert_eq!(
            c.location_path("/v2/a/blobs/uploads/u2").as_deref(),
            Some("/v2/a/blobs/uploads/u2")
        );
        // another origin: the path only, on this registry
        assert_eq!(
            c.location_path("https://elsewhere.example/v2/a/blobs/uploads/u3?x=1")
                .as_deref(),
            Some("/v2/a/blobs/uploads/u3?x=1")
        );
        assert_eq!(c.location_path("/upload/elsewhere"), None);
    }

    #[tokio::test]
    async fn file_streams_a_range_with_progress() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let progress: Progress = Arc::new(move |p| s2.lock().unwrap().push(p));
        let stream = file_stream(path.clone(), 1000, 500_000, Some(progress))
            .await
            .unwrap();
        let chunks: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
        let got: Vec<u8> = chunks.concat();
        assert_eq!(got, data[1000..501_000]);
        assert_eq!(*seen.lock().unwrap().last().unwrap(), 501_000);
        // a file shorter than announced is an error
        let stream = file_stream(path, 599_000, 2000, None).await.unwrap();
        let results: Vec<io::Result<Bytes>> = stream.collect().await;
        assert!(results.last().unwrap().is_err());
    }
}
