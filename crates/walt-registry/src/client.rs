//! The HTTP client proper.

mod catalog;
mod download;
mod push;

pub use push::Progress;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use sha2::{Digest as _, Sha256};
use walt_core::config::{Protocol, V2Registry};
use walt_core::oci::MANIFEST_ACCEPT;
use walt_core::{Digest, DigestError};

use crate::auth::{
    AuthState, CachedToken, Credentials, KnownScheme, TokenResponse, parse_www_authenticate,
    realm_policy,
};
use crate::error::{
    RegistryError, TransportKind, classify_transport, parse_error_body, summarize_error_body,
};

/// Connection establishment timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence while reading a response (blob streams included).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Total timeout of small requests (manifests, tokens).
const SMALL_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest manifest accepted (the distribution spec suggests 4 MiB).
const MAX_MANIFEST_SIZE: u64 = 8 << 20;
/// Largest error or token body read.
const MAX_SMALL_BODY: u64 = 1 << 20;
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Default size of the chunks of a blob upload.
pub const DEFAULT_UPLOAD_CHUNK_SIZE: u64 = 32 << 20;

/// How failed requests are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total number of tries (at least 1).
    pub attempts: u32,
    /// Delay before the first retry; doubles after each, capped at 3 s.
    pub base_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            base_delay: Duration::from_millis(200),
        }
    }
}

impl RetryPolicy {
    /// No retry at all.
    pub fn none() -> Self {
        Self {
            attempts: 1,
            base_delay: Duration::ZERO,
        }
    }

    /// Delay before retry number `n` (0-based).
    pub fn delay(&self, n: u32) -> Duration {
        let cap = Duration::from_secs(3);
        let factor = 1u32 << n.min(16);
        self.base_delay.saturating_mul(factor).min(cap)
    }

    fn attempts(&self) -> u32 {
        self.attempts.max(1)
    }
}

/// Everything needed to build a [`RegistryClient`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Registry label, used in every error message.
    pub label: String,
    /// `http(s)://host[:port]`, without `/v2`.
    pub base_url: String,
    /// Verify the server certificate (false for `https-no-verify`).
    pub verify_tls: bool,
    /// Extra trusted CA certificates (PEM bundle), in addition to the system store.
    pub extra_ca_pem: Option<Vec<u8>>,
    pub credentials: Option<Credentials>,
    pub retry: RetryPolicy,
    /// Blob uploads larger than this are sent in chunks of this size
    /// (`PATCH`); smaller ones in one `PUT`.
    pub upload_chunk_size: u64,
    /// A JFrog Artifactory repository: the catalog is read at
    /// `/v2/<repository>/_catalog` and its names are given as
    /// `<repository>/<name>`.
    pub catalog_repository: Option<String>,
}

impl ClientOptions {
    /// Options with defaults: TLS verified, no extra CA, no credentials.
    pub fn new(label: impl Into<String>, base_url: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            base_url: base_url.into(),
            verify_tls: true,
            extra_ca_pem: None,
            credentials: None,
            retry: RetryPolicy::default(),
            upload_chunk_size: DEFAULT_UPLOAD_CHUNK_SIZE,
            catalog_repository: None,
        }
    }
}

/// A manifest (or index) as fetched, with its computed digest.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    /// The `Content-Type` of the answer, without parameters.
    pub media_type: Option<String>,
    /// `sha256:<hex>` of `bytes`, computed locally.
    pub digest: Digest,
}

/// The answer to [`RegistryClient::get_manifest_if_changed`].
#[derive(Clone, Debug)]
pub enum ManifestCheck {
    /// The reference still points to the known manifest (`304`).
    Unchanged,
    /// The manifest as fetched (it may still be the known one when the
    /// registry ignores `If-None-Match`: compare digests).
    Changed(FetchedManifest),
}

/// An open blob download.
pub struct BlobResponse {
    /// Where the body starts in the blob: the requested offset when the
    /// registry honoured the range (206), 0 when it sent the whole blob.
    pub offset: u64,
    /// Length of the body (not of the blob) when announced.
    pub length: Option<u64>,
    /// The body, chunk by chunk, as received.
    pub stream: BoxStream<'static, Result<Bytes, RegistryError>>,
}

impl std::fmt::Debug for BlobResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobResponse")
            .field("offset", &self.offset)
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

/// A client for one registry. Cheap to clone; clones share connections
/// and authentication tokens.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("label", &self.inner.label)
            .field("base_url", &self.inner.base_url)
            .finish_non_exhaustive()
    }
}

struct Inner {
    label: String,
    base_url: String,
    /// `base_url` parsed (for the token realm policy).
    base: Url,
    /// Whether `http` verifies certificates (false: `https-no-verify`).
    verify_tls: bool,
    http: reqwest::Client,
    credentials: Option<Credentials>,
    retry: RetryPolicy,
    upload_chunk_size: u64,
    catalog_repository: Option<String>,
    auth: Mutex<AuthState>,
}

/// Authorization to put on a request.
#[derive(Clone)]
enum AuthHeader {
    None,
    Basic,
    Bearer(String),
}

/// One request to the registry (a GET unless `method` says otherwise).
#[derive(Default)]
struct Req<'a> {
    /// Path (and query) below the base URL, starting with `/v2/`.
    path: String,
    /// Repository, for the token scope.
    repo: Option<&'a str>,
    accept: Option<String>,
    range_from: Option<u64>,
    timeout: Option<Duration>,
    /// Describes the object for "cut short" errors.
    what: String,
    method: Method,
    /// Ask for push access to `repo` (token scope `pull,push`).
    push: bool,
    /// Another repository read by the request (a cross-repository mount).
    pull_from: Option<String>,
    body: ReqBody,
    headers: Vec<(header::HeaderName, String)>,
    /// One try only on transport errors and 5xx (the caller resumes).
    no_retry: bool,
}

/// The body of a request, rebuilt for every try.
#[derive(Default, Clone)]
enum ReqBody {
    #[default]
    Empty,
    Bytes(Bytes),
    /// `len` bytes of a file from `offset`, streamed; `progress` is told
    /// the position in the file as bytes are read.
    File {
        path: std::path::PathBuf,
        offset: u64,
        len: u64,
        progress: Option<Progress>,
    },
}

/// Why a body could not be read whole.
pub(crate) enum ReadError {
    TooLarge,
    Transport(reqwest::Error),
}

impl RegistryClient {
    /// Builds a client. Installs the `ring` rustls provider if none is.
    pub fn new(opts: ClientOptions) -> Result<Self, RegistryError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let label = opts.label;
        let config_err = |reason: String| RegistryError::Config {
            label: label.clone(),
            reason,
        };
        let base_url = opts.base_url.trim_end_matches('/').to_string();
        let parsed = Url::parse(&base_url)
            .map_err(|e| config_err(format!("invalid registry URL '{base_url}': {e}")))?;
        if parsed.scheme() != "http" && parsed.scheme() != "https" {
            return Err(config_err(format!(
                "invalid registry URL '{base_url}': not http or https"
            )));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("walt/", env!("CARGO_PKG_VERSION")));
        if !opts.verify_tls {
            builder = builder.tls_danger_accept_invalid_certs(true);
        } else if let Some(pem) = &opts.extra_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| config_err(format!("invalid CA certificates: {e}")))?;
            if certs.is_empty() {
                return Err(config_err(
                    "invalid CA certificates: no PEM certificate found".into(),
                ));
            }
            // merged with (not replacing) the system's trusted roots
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| config_err(format!("cannot create the HTTP client: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                label,
                base_url,
                base: parsed,
                verify_tls: opts.verify_tls,
                http,
                credentials: opts.credentials,
                retry: opts.retry,
                upload_chunk_size: opts.upload_chunk_size.max(1),
                catalog_repository: opts.catalog_repository,
                auth: Mutex::new(AuthState::default()),
            }),
        })
    }

    /// A client for a configured `docker-registry-v2` registry; reads its
    /// `ca-file` when set.
    pub fn for_v2(
        reg: &V2Registry,
        credentials: Option<Credentials>,
    ) -> Result<Self, RegistryError> {
        let mut opts = ClientOptions::new(reg.label.clone(), reg.base_url());
        opts.verify_tls = reg.protocol != Protocol::HttpsNoVerify;
        opts.credentials = credentials;
        opts.catalog_repository = reg.repository.clone();
        if let Some(file) = &reg.ca_file
            && reg.protocol == Protocol::Https
        {
            let pem = std::fs::read(file).map_err(|e| RegistryError::Config {
                label: reg.label.clone(),
                reason: format!("cannot read CA file {file}: {e}"),
            })?;
            if reqwest::Certificate::from_pem_bundle(&pem)
                .map(|c| c.is_empty())
                .unwrap_or(true)
            {
                return Err(RegistryError::Config {
                    label: reg.label.clone(),
                    reason: format!("CA file {file} holds no valid PEM certificate"),
                });
            }
            opts.extra_ca_pem = Some(pem);
        }
        Self::new(opts)
    }

    pub fn label(&self) -> &str {
        &self.inner.label
    }

    pub fn base_url(&self) -> &str {
        &self.inner.base_url
    }

    /// Whether credentials were given to this client.
    pub fn has_credentials(&self) -> bool {
        self.inner.credentials.is_some()
    }

    /// `GET /v2/`: checks the registry answers and the credentials (if any)
    /// are accepted.
    pub async fn ping(&self) -> Result<(), RegistryError> {
        let req = Req {
            path: "/v2/".into(),
            repo: None,
            accept: None,
            range_from: None,
            timeout: Some(SMALL_REQUEST_TIMEOUT),
            what: "API check".into(),
            ..Default::default()
        };
        let resp = self.send(&req).await?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(self
            .status_error(resp, &req, "the registry API endpoint /v2/")
            .await)
    }

    /// Fetches a manifest or index by tag or digest. Verifies the content
    /// against the digest reference, and against `Docker-Content-Digest`.
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        match self.get_manifest_if_changed(repo, reference, None).await? {
            ManifestCheck::Changed(m) => Ok(m),
            // only answered to a conditional request
            ManifestCheck::Unchanged => Err(self.protocol(
                &format!("manifest {repo}:{reference}"),
                "304 Not Modified to an unconditional request".into(),
            )),
        }
    }

    /// Like [`Self::get_manifest`], but when `known_digest` is given, asks
    /// the registry to answer `304 Not Modified` (`If-None-Match`, the
    /// manifest's digest being its `ETag`) if `reference` still points to
    /// that manifest: the registry then sends no body. A registry ignoring
    /// the condition answers the manifest as usual.
    pub async fn get_manifest_if_changed(
        &self,
        repo: &str,
        reference: &str,
        known_digest: Option<&Digest>,
    ) -> Result<ManifestCheck, RegistryError> {
        self.check_repo(repo)?;
        if reference.is_empty() || reference.contains('/') {
            return Err(self.invalid(format!("invalid manifest reference '{reference}'")));
        }
        let by_digest = reference.contains(':');
        // A reference by digest is one walt can verify the answer against.
        let reference_digest = if by_digest {
            Some(self.parse_digest(reference)?)
        } else {
            None
        };
        let (what, not_found) = if by_digest {
            (
                format!("manifest {repo}@{reference}"),
                format!("repository '{repo}' or manifest '{reference}'"),
            )
        } else {
            (
                format!("manifest {repo}:{reference}"),
                format!("repository '{repo}' or tag '{reference}'"),
            )
        };
        let req = Req {
            path: format!("/v2/{repo}/manifests/{reference}"),
            repo: Some(repo),
            accept: Some(MANIFEST_ACCEPT.join(", ")),
            range_from: None,
            timeout: Some(SMALL_REQUEST_TIMEOUT),
            what: what.clone(),
            headers: known_digest
                .map(|d| (header::IF_NONE_MATCH, format!("\"{d}\"")))
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let mut attempt = 0;
        loop {
            let resp = self.send(&req).await?;
            if known_digest.is_some() && resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(ManifestCheck::Unchanged);
            }
            if !resp.status().is_success() {
                return Err(self.status_error(resp, &req, &not_found).await);
            }
            let media_type = header_str(resp.headers(), header::CONTENT_TYPE)
                .map(|v| v.split(';').next().unwrap_or_default().trim().to_string())
                .filter(|v| !v.is_empty());
            // Checked against the content when it is a sha256 digest (other
            // algorithms cannot be verified here); a malformed one is refused.
            let header_digest = match header_str(resp.headers(), "docker-content-digest") {
                None => None,
                Some(h) => match Digest::parse(h) {
                    Ok(d) => Some(d),
                    Err(DigestError::Unsupported(_)) => None,
                    Err(e @ DigestError::Malformed(_)) => {
                        return Err(self.protocol(&what, format!("Docker-Content-Digest: {e}")));
                    }
                },
            };
            let bytes = match read_limited(resp, MAX_MANIFEST_SIZE).await {
                Ok(b) => b,
                Err(ReadError::TooLarge) => {
                    return Err(RegistryError::TooLarge {
                        label: self.inner.label.clone(),
                        what,
                        max: MAX_MANIFEST_SIZE,
                    });
                }
                Err(ReadError::Transport(e)) => {
                    let err = self.body_error(&e, &what);
                    if self.should_retry(&err, attempt).await {
                        attempt += 1;
                        continue;
                    }
                    return Err(err);
                }
            };
            let digest = sha256_digest(&bytes);
            let mismatch = |expected: &Digest| RegistryError::DigestMismatch {
                label: self.inner.label.clone(),
                what: what.clone(),
                expected: expected.clone(),
                actual: digest.clone(),
            };
            for expected in [&reference_digest, &header_digest].into_iter().flatten() {
                if *expected != digest {
                    return Err(mismatch(expected));
                }
            }
            return Ok(ManifestCheck::Changed(FetchedManifest {
                bytes: bytes.to_vec(),
                media_type,
                digest,
            }));
        }
    }

    /// Opens a blob download from `offset` (0 for the whole blob). The body
    /// is not verified: the caller hashes what it stores.
    pub async fn get_blob(
        &self,
        repo: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<BlobResponse, RegistryError> {
        self.check_repo(repo)?;
        let what = format!("blob {digest} of {repo}");
        let req = Req {
            path: format!("/v2/{repo}/blobs/{digest}"),
            repo: Some(repo),
            accept: None,
            range_from: (offset > 0).then_some(offset),
            timeout: None,
            what: what.clone(),
            ..Default::default()
        };
        let resp = self.send(&req).await?;
        let status = resp.status();
        let body_offset = match status {
            StatusCode::OK => 0,
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                let start =
                    header_str(resp.headers(), header::CONTENT_RANGE).and_then(content_range_start);
                match start {
                    Some(s) if s == offset => offset,
                    Some(s) => {
                        return Err(self.protocol(
                            &what,
                            format!("asked for bytes from {offset}, got from {s}"),
                        ));
                    }
                    None => {
                        return Err(
                            self.protocol(&what, "206 answer without a valid Content-Range".into())
                        );
                    }
                }
            }
            _ => {
                return Err(self
                    .status_error(resp, &req, &format!("blob {digest} in repository '{repo}'"))
                    .await);
            }
        };
        let length = resp.content_length();
        let label = self.inner.label.clone();
        let stream = resp
            .bytes_stream()
            .map(move |r| {
                r.map_err(|e| RegistryError::Interrupted {
                    label: label.clone(),
                    what: what.clone(),
                    reason: transport_reason(&e),
                })
            })
            .boxed();
        Ok(BlobResponse {
            offset: body_offset,
            length,
            stream,
        })
    }

    /// Downloads a small blob (an image config) completely and verifies it
    /// against its digest; refuses blobs larger than `max_size`.
    pub async fn get_blob_bytes(
        &self,
        repo: &str,
        digest: &Digest,
        max_size: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        self.check_repo(repo)?;
        let what = format!("blob {digest} of {repo}");
        let req = Req {
            path: format!("/v2/{repo}/blobs/{digest}"),
            repo: Some(repo),
            accept: None,
            range_from: None,
            timeout: None,
            what: what.clone(),
            ..Default::default()
        };
        let too_large = || RegistryError::TooLarge {
            label: self.inner.label.clone(),
            what: what.clone(),
            max: max_size,
        };
        let mut attempt = 0;
        loop {
            let resp = self.send(&req).await?;
            if !resp.status().is_success() {
                return Err(self
                    .status_error(resp, &req, &format!("blob {digest} in repository '{repo}'"))
                    .await);
            }
            if resp.content_length().is_some_and(|l| l > max_size) {
                return Err(too_large());
            }
            let bytes = match read_limited(resp, max_size).await {
                Ok(b) => b,
                Err(ReadError::TooLarge) => return Err(too_large()),
                Err(ReadError::Transport(e)) => {
                    let err = self.body_error(&e, &what);
                    if self.should_retry(&err, attempt).await {
                        attempt += 1;
                        continue;
                    }
                    return Err(err);
                }
            };
            let actual = sha256_digest(&bytes);
            if actual != *digest {
                return Err(RegistryError::DigestMismatch {
                    label: self.inner.label.clone(),
                    what,
                    expected: digest.clone(),
                    actual,
                });
            }
            return Ok(bytes.to_vec());
        }
    }

    // ----- request machinery -----

    /// Sends `req`, handling authentication challenges and retrying
    /// transient failures. Returns any non-401, non-transient answer.
    async fn send(&self, req: &Req<'_>) -> Result<reqwest::Response, RegistryError> {
        let url = format!("{}{}", self.inner.base_url, req.path);
        let scope_key = scope_key(req);
        let attempts = if req.no_retry {
            1
        } else {
            self.inner.retry.attempts()
        };
        let mut attempt = 0u32;
        let mut challenged = false;
        let mut next_auth: Option<AuthHeader> = None;
        loop {
            let auth = match next_auth.take() {
                Some(a) => a,
                None => match self.preemptive_auth(&scope_key, req).await {
                    Ok(a) => a,
                    Err(e) => {
                        if !req.no_retry && self.should_retry(&e, attempt).await {
                            attempt += 1;
                            continue;
                        }
                        return Err(e);
                    }
                },
            };
            let mut rb = self.inner.http.request(req.method.clone(), &url);
            if let Some(accept) = &req.accept {
                rb = rb.header(header::ACCEPT, accept);
            }
            if let Some(from) = req.range_from {
                rb = rb.header(header::RANGE, format!("bytes={from}-"));
            }
            if let Some(t) = req.timeout {
                rb = rb.timeout(t);
            }
            for (k, v) in &req.headers {
                rb = rb.header(k.clone(), v);
            }
            rb = match &req.body {
                ReqBody::Empty => {
                    if req.method == Method::GET || req.method == Method::HEAD {
                        rb
                    } else {
                        rb.header(header::CONTENT_LENGTH, "0")
                    }
                }
                ReqBody::Bytes(b) => rb
                    .header(header::CONTENT_LENGTH, b.len().to_string())
                    .body(b.clone()),
                ReqBody::File {
                    path,
                    offset,
                    len,
                    progress,
                } => {
                    let stream =
                        push::file_stream(path.clone(), *offset, *len, progress.clone()).await;
                    let stream = match stream {
                        Ok(s) => s,
                        Err(e) => {
                            return Err(
                                self.invalid(format!("cannot read {}: {e}", path.display()))
                            );
                        }
                    };
                    rb.header(header::CONTENT_LENGTH, len.to_string())
                        .body(reqwest::Body::wrap_stream(stream))
                }
            };
            rb = self.apply_auth(rb, &auth);
            tracing::debug!(registry = %self.inner.label, path = %strip_query(&req.path), "{}", req.method);
            let resp = match rb.send().await {
                Ok(r) => r,
                Err(e) => {
                    let err = self.transport_error(&e, &req.what);
                    if !req.no_retry && self.should_retry(&err, attempt).await {
                        attempt += 1;
                        continue;
                    }
                    return Err(err);
                }
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED {
                if challenged {
                    return Err(self.auth_failed());
                }
                challenged = true;
                match self.handle_challenge(&resp, &scope_key, &auth).await {
                    Ok(a) => {
                        next_auth = Some(a);
                        continue;
                    }
                    Err(e) => {
                        if !req.no_retry && self.should_retry(&e, attempt).await {
                            attempt += 1;
                            challenged = false;
                            continue;
                        }
                        return Err(e);
                    }
                }
            }
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                let retry_after = header_str(resp.headers(), header::RETRY_AFTER)
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
                let err = self.status_error(resp, req, &req.what).await;
                if attempt + 1 < attempts {
                    let delay = self
                        .inner
                        .retry
                        .delay(attempt)
                        .max(retry_after.unwrap_or_default());
                    tracing::info!("{err}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                    continue;
                }
                return Err(err);
            }
            return Ok(resp);
        }
    }

    /// Sleeps before a retry and returns true when `err` is transient and
    /// tries remain.
    async fn should_retry(&self, err: &RegistryError, attempt: u32) -> bool {
        if !err.is_transient() || attempt + 1 >= self.inner.retry.attempts() {
            return false;
        }
        let delay = self.inner.retry.delay(attempt);
        tracing::info!(
            "{err}; retrying in {delay:?} (try {}/{})",
            attempt + 2,
            self.inner.retry.attempts()
        );
        tokio::time::sleep(delay).await;
        true
    }

    fn apply_auth(
        &self,
        rb: reqwest::RequestBuilder,
        auth: &AuthHeader,
    ) -> reqwest::RequestBuilder {
        match (auth, &self.inner.credentials) {
            (AuthHeader::Basic, Some(c)) => rb.basic_auth(&c.username, Some(&c.password)),
            (AuthHeader::Bearer(t), _) => rb.bearer_auth(t),
            _ => rb,
        }
    }

    /// The authorization already known to work for this scope, to avoid a
    /// 401 round trip per request.
    async fn preemptive_auth(
        &self,
        scope_key: &str,
        req: &Req<'_>,
    ) -> Result<AuthHeader, RegistryError> {
        let (scheme, cached) = {
            let state = self.inner.auth.lock().unwrap();
            let cached = state
                .tokens
                .get(scope_key)
                .filter(|t| t.expires > Instant::now())
                .map(|t| t.token.clone());
            (state.scheme.clone(), cached)
        };
        match scheme {
            KnownScheme::Unknown => Ok(AuthHeader::None),
            KnownScheme::Basic => Ok(if self.inner.credentials.is_some() {
                AuthHeader::Basic
            } else {
                AuthHeader::None
            }),
            KnownScheme::Bearer { realm, service } => {
                if let Some(t) = cached {
                    return Ok(AuthHeader::Bearer(t));
                }
                let action = if req.push { "pull,push" } else { "pull" };
                let scopes: Vec<String> = req
                    .repo
                    .map(|r| format!("repository:{r}:{action}"))
                    .into_iter()
                    .chain(req.pull_from.iter().map(|f| format!("repository:{f}:pull")))
                    .collect();
                let token = self
                    .fetch_token(&realm, service.as_deref(), &scopes)
                    .await?;
                let value = token.token.clone();
                self.inner
                    .auth
                    .lock()
                    .unwrap()
                    .tokens
                    .insert(scope_key.to_string(), token);
                Ok(AuthHeader::Bearer(value))
            }
        }
    }

    /// Reacts to a 401: returns the authorization to retry with.
    async fn handle_challenge(
        &self,
        resp: &reqwest::Response,
        scope_key: &str,
        sent: &AuthHeader,
    ) -> Result<AuthHeader, RegistryError> {
        let challenges: Vec<_> = resp
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_www_authenticate)
            .collect();
        if let Some(b) = challenges.iter().find(|c| c.scheme == "bearer") {
            let Some(realm) = b.param("realm").filter(|r| !r.is_empty()) else {
                return Err(
                    self.protocol("authentication", "bearer challenge without realm".into())
                );
            };
            let service = b.param("service").map(str::to_string);
            let scopes: Vec<String> = b.params_named("scope").map(str::to_string).collect();
            self.inner.auth.lock().unwrap().tokens.remove(scope_key);
            let token = self.fetch_token(realm, service.as_deref(), &scopes).await?;
            let value = token.token.clone();
            let mut state = self.inner.auth.lock().unwrap();
            state.scheme = KnownScheme::Bearer {
                realm: realm.to_string(),
                service,
            };
            state.tokens.insert(scope_key.to_string(), token);
            return Ok(AuthHeader::Bearer(value));
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            if self.inner.credentials.is_none() {
                return Err(RegistryError::CredentialsRequired {
                    label: self.inner.label.clone(),
                });
            }
            if matches!(sent, AuthHeader::Basic) {
                return Err(RegistryError::Unauthorized {
                    label: self.inner.label.clone(),
                });
            }
            self.inner.auth.lock().unwrap().scheme = KnownScheme::Basic;
            return Ok(AuthHeader::Basic);
        }
        if self.inner.credentials.is_none() {
            return Err(RegistryError::CredentialsRequired {
                label: self.inner.label.clone(),
            });
        }
        let schemes: Vec<&str> = challenges.iter().map(|c| c.scheme.as_str()).collect();
        Err(self.protocol(
            "authentication",
            if schemes.is_empty() {
                "401 without a usable WWW-Authenticate challenge".into()
            } else {
                format!(
                    "unsupported authentication scheme(s): {}",
                    schemes.join(", ")
                )
            },
        ))
    }

    /// Asks the token server for a bearer token.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<CachedToken, RegistryError> {
        let mut url = Url::parse(realm).map_err(|e| {
            self.protocol(
                "authentication",
                format!("invalid token realm '{realm}': {e}"),
            )
        })?;
        if url.scheme() != "https" && url.scheme() != "http" {
            return Err(self.protocol("authentication", format!("invalid token realm '{realm}'")));
        }
        let policy = realm_policy(&self.inner.base, self.inner.verify_tls, &url);
        let origin_of_realm = origin(&url);
        if service.is_some() || !scopes.is_empty() {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scopes {
                q.append_pair("scope", s);
            }
        }
        let verified;
        let http = if policy.verify_separately {
            verified = reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(READ_TIMEOUT)
                .user_agent(concat!("walt/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| RegistryError::Config {
                    label: self.inner.label.clone(),
                    reason: format!("cannot create the HTTP client: {e}"),
                })?;
            &verified
        } else {
            &self.inner.http
        };
        let mut rb = http.get(url).timeout(SMALL_REQUEST_TIMEOUT);
        // Credentials go only where they are safe; elsewhere an anonymous
        // token may still do (public images).
        if policy.credentials
            && let Some(c) = &self.inner.credentials
        {
            rb = rb.basic_auth(&c.username, Some(&c.password));
        }
        let untrusted = |detail: String| RegistryError::Config {
            label: self.inner.label.clone(),
            reason: format!(
                "its token server {origin_of_realm} is not trusted with credentials ({}){detail}",
                policy.why_not
            ),
        };
        tracing::debug!(registry = %self.inner.label, realm, credentials = policy.credentials, "requesting a bearer token");
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) => {
                let err = self.transport_error(&e, "token");
                return Err(match err {
                    RegistryError::Tls { reason, .. } if policy.verify_separately => {
                        untrusted(format!(": its certificate cannot be verified: {reason}"))
                    }
                    other => other,
                });
            }
        };
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            if !policy.credentials {
                return Err(untrusted(
                    ": none were sent, and it refuses anonymous access".into(),
                ));
            }
            return Err(self.auth_failed());
        }
        if !status.is_success() {
            let message = match read_limited(resp, MAX_SMALL_BODY).await {
                Ok(b) => summarize_error_body(&b),
                Err(_) => None,
            };
            let path = Url::parse(realm)
                .map(|u| u.path().to_string())
                .unwrap_or_default();
            let label = self.inner.label.clone();
            return Err(if status.is_server_error() {
                RegistryError::Server {
                    label,
                    status: status.as_u16(),
                    method: "GET".into(),
                    path,
                    message,
                }
            } else {
                RegistryError::Http {
                    label,
                    status: status.as_u16(),
                    method: "GET".into(),
                    path,
                    message,
                }
            });
        }
        let body = match read_limited(resp, MAX_SMALL_BODY).await {
            Ok(b) => b,
            Err(ReadError::TooLarge) => {
                return Err(self.protocol("authentication", "token answer too large".into()));
            }
            Err(ReadError::Transport(e)) => return Err(self.body_error(&e, "token")),
        };
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            self.protocol(
                "authentication",
                format!("token answer is not valid JSON: {e}"),
            )
        })?;
        parsed
            .into_cached()
            .ok_or_else(|| self.protocol("authentication", "token answer holds no token".into()))
    }

    // ----- errors -----

    fn auth_failed(&self) -> RegistryError {
        let label = self.inner.label.clone();
        if self.inner.credentials.is_some() {
            RegistryError::Unauthorized { label }
        } else {
            RegistryError::CredentialsRequired { label }
        }
    }

    fn invalid(&self, reason: String) -> RegistryError {
        RegistryError::InvalidArgument {
            label: self.inner.label.clone(),
            reason,
        }
    }

    fn protocol(&self, what: &str, reason: String) -> RegistryError {
        RegistryError::Protocol {
            label: self.inner.label.clone(),
            what: what.to_string(),
            reason,
        }
    }

    fn check_repo(&self, repo: &str) -> Result<(), RegistryError> {
        let ok = !repo.is_empty()
            && repo.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
                    && c != "."
                    && c != ".."
            });
        if ok {
            Ok(())
        } else {
            Err(self.invalid(format!("invalid repository name '{repo}'")))
        }
    }

    /// Parses a digest given to this client (a manifest reference, a
    /// descriptor's digest): a malformed one is an invalid argument, as is
    /// one of another algorithm than sha256 (the store addresses sha256
    /// content only).
    pub fn parse_digest(&self, digest: &str) -> Result<Digest, RegistryError> {
        Digest::parse(digest).map_err(|e| match e {
            DigestError::Malformed(d) => self.invalid(format!("invalid digest '{d}'")),
            DigestError::Unsupported(d) => self.invalid(format!(
                "digest '{d}' uses an algorithm walt does not support (only sha256)"
            )),
        })
    }

    /// A transport failure before any answer.
    fn transport_error(&self, e: &reqwest::Error, what: &str) -> RegistryError {
        let label = self.inner.label.clone();
        let url = e
            .url()
            .map(origin)
            .unwrap_or_else(|| self.inner.base_url.clone());
        match classify_transport(e) {
            TransportKind::Tls(reason) => RegistryError::Tls { label, reason },
            TransportKind::Timeout(reason) => RegistryError::Timeout { label, url, reason },
            TransportKind::Connect(reason) => RegistryError::Unreachable { label, url, reason },
            TransportKind::Body(reason) => RegistryError::Interrupted {
                label,
                what: what.to_string(),
                reason,
            },
            TransportKind::Other(reason) => RegistryError::Protocol {
                label,
                what: what.to_string(),
                reason,
            },
        }
    }

    /// A failure while reading a body: always "cut short" unless TLS.
    fn body_error(&self, e: &reqwest::Error, what: &str) -> RegistryError {
        match classify_transport(e) {
            TransportKind::Tls(reason) => RegistryError::Tls {
                label: self.inner.label.clone(),
                reason,
            },
            TransportKind::Timeout(reason)
            | TransportKind::Connect(reason)
            | TransportKind::Body(reason)
            | TransportKind::Other(reason) => RegistryError::Interrupted {
                label: self.inner.label.clone(),
                what: what.to_string(),
                reason,
            },
        }
    }

    /// Turns an unexpected answer into an error; reads (a bit of) its body.
    async fn status_error(
        &self,
        resp: reqwest::Response,
        req: &Req<'_>,
        not_found: &str,
    ) -> RegistryError {
        let status = resp.status();
        let body = read_limited(resp, MAX_SMALL_BODY).await.unwrap_or_default();
        let message = summarize_error_body(&body);
        let label = self.inner.label.clone();
        let unknown = parse_error_body(&body).iter().any(|e| {
            matches!(
                e.code.as_str(),
                "MANIFEST_UNKNOWN" | "NAME_UNKNOWN" | "BLOB_UNKNOWN"
            )
        });
        let method = req.method.to_string();
        let path = strip_query(&req.path).to_string();
        match status {
            StatusCode::NOT_FOUND => RegistryError::NotFound {
                label,
                what: not_found.to_string(),
                message,
            },
            _ if unknown && status.is_client_error() => RegistryError::NotFound {
                label,
                what: not_found.to_string(),
                message,
            },
            StatusCode::UNAUTHORIZED => self.auth_failed(),
            StatusCode::FORBIDDEN => RegistryError::Denied {
                label,
                what: not_found.to_string(),
                message,
            },
            s if s.is_server_error() => RegistryError::Server {
                label,
                status: s.as_u16(),
                method,
                path,
                message,
            },
            s => RegistryError::Http {
                label,
                status: s.as_u16(),
                method,
                path,
                message,
            },
        }
    }
}

/// `scheme://host[:port]` of a URL (never its path or query, which may
/// hold signed tokens).
fn origin(u: &Url) -> String {
    let mut s = format!("{}://{}", u.scheme(), u.host_str().unwrap_or_default());
    if let Some(p) = u.port() {
        s.push_str(&format!(":{p}"));
    }
    s
}

/// The token cache key of a request: its repository and the access asked.
fn scope_key(req: &Req<'_>) -> String {
    let mut key = req.repo.unwrap_or("").to_string();
    if req.push {
        key.push_str(" push");
    }
    if let Some(f) = &req.pull_from {
        key.push_str(" from ");
        key.push_str(f);
    }
    key
}

/// A path without its query (upload locations carry opaque state).
fn strip_query(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

fn transport_reason(e: &reqwest::Error) -> String {
    match classify_transport(e) {
        TransportKind::Tls(r)
        | TransportKind::Timeout(r)
        | TransportKind::Connect(r)
        | TransportKind::Body(r)
        | TransportKind::Other(r) => r,
    }
}

fn header_str(h: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    h.get(name).and_then(|v: &HeaderValue| v.to_str().ok())
}

/// Start offset of `Content-Range: bytes START-END/TOTAL`.
fn content_range_start(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (start, _) = rest.split_once('-')?;
    start.trim().parse().ok()
}

fn sha256_digest(data: &[u8]) -> Digest {
    Digest::from_sha256(Sha256::digest(data).into())
}

/// Reads a whole body, refusing more than `max` bytes: as it streams (a
/// body is never read past `max`, whatever its `Content-Length` says). Every
/// remote body read whole goes through here.
pub(crate) async fn read_limited(
    mut resp: reqwest::Response,
    max: u64,
) -> Result<Bytes, ReadError> {
    if resp.content_length().is_some_and(|l| l > max) {
        return Err(ReadError::TooLarge);
    }
    let mut first: Option<Bytes> = None;
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(ReadError::Transport)? {
        let total = first.as_ref().map_or(0, |b| b.len()) + buf.len() + chunk.len();
        if total as u64 > max {
            return Err(ReadError::TooLarge);
        }
        // keep the common single-chunk case copy-free
        match first.take() {
            None if buf.is_empty() => first = Some(chunk),
            Some(f) => {
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&chunk);
            }
            None => buf.extend_from_slice(&chunk),
        }
    }
    Ok(match first {
        Some(f) => f,
        None => Bytes::from(buf),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server answering one request with a 256 MiB chunked body (or,
    /// with `length`, a body longer than its `Content-Length` says);
    /// returns its address and what it managed to send before the client
    /// hung up.
    async fn endless_body(
        length: Option<u64>,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<u64>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = [0u8; 4096];
            let _ = s.read(&mut req).await;
            let head = match length {
                Some(n) => format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n"),
                None => "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".into(),
            };
            if s.write_all(head.as_bytes()).await.is_err() {
                return 0;
            }
            let data = vec![b'x'; 64 << 10];
            let mut sent = 0u64;
            loop {
                let r = match length {
                    Some(_) => s.write_all(&data).await,
                    None => {
                        let mut c = format!("{:x}\r\n", data.len()).into_bytes();
                        c.extend_from_slice(&data);
                        c.extend_from_slice(b"\r\n");
                        s.write_all(&c).await
                    }
                };
                if r.is_err() {
                    return sent;
                }
                sent += data.len() as u64;
                // A reader that takes it all gets 256 MiB, then the end.
                if sent >= 256 << 20 {
                    if length.is_none() {
                        let _ = s.write_all(b"0\r\n\r\n").await;
                    }
                    return sent;
                }
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn bodies_are_capped_while_streaming() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::new();
        // Chunked, no length: stopped once past the cap, the connection
        // dropped (the server sees it go well before 1 GiB).
        for length in [None, Some(1u64 << 20)] {
            let (addr, server) = endless_body(length).await;
            let resp = http.get(format!("http://{addr}/")).send().await.unwrap();
            let r = read_limited(resp, 256 << 10).await;
            assert!(matches!(r, Err(ReadError::TooLarge)), "{length:?}");
            let sent = server.await.unwrap();
            assert!(sent < 64 << 20, "{length:?}: the server sent {sent} bytes");
        }
    }

    #[test]
    fn retry_delays() {
        let p = RetryPolicy::default();
        assert_eq!(p.attempts, 5);
        assert_eq!(p.delay(0), Duration::from_millis(200));
        assert_eq!(p.delay(1), Duration::from_millis(400));
        assert_eq!(p.delay(3), Duration::from_millis(1600));
        assert_eq!(p.delay(4), Duration::from_secs(3));
        assert_eq!(p.delay(40), Duration::from_secs(3));
        assert_eq!(RetryPolicy::none().attempts(), 1);
    }

    #[test]
    fn content_range() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes 0-0/*"), Some(0));
        assert_eq!(content_range_start("bytes */200"), None);
        assert_eq!(content_range_start("items 1-2/3"), None);
    }

    #[test]
    fn origins() {
        let u = Url::parse("https://s3.example.com/bucket/x?X-Amz-Signature=secret").unwrap();
        assert_eq!(origin(&u), "https://s3.example.com");
        let u = Url::parse("http://127.0.0.1:5000/v2/").unwrap();
        assert_eq!(origin(&u), "http://127.0.0.1:5000");
    }

    #[test]
    fn client_is_send_sync_and_validates() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<RegistryClient>();
        let c = RegistryClient::new(ClientOptions::new("local", "http://127.0.0.1:5000/")).unwrap();
        assert_eq!(c.label(), "local");
        assert_eq!(c.base_url(), "http://127.0.0.1:5000");
        assert!(c.check_repo("alice/foo").is_ok());
        assert!(c.check_repo("alice/../foo").is_err());
        assert!(c.check_repo("Alice").is_err());
        let h = "ab".repeat(32);
        assert_eq!(c.parse_digest(&format!("sha256:{h}")).unwrap().hex(), h);
        let e = c.parse_digest("sha256:../x").unwrap_err().to_string();
        assert_eq!(e, "registry 'local': invalid digest 'sha256:../x'");
        let e = c.parse_digest("sha512:abcd").unwrap_err().to_string();
        assert!(e.contains("only sha256"), "{e}");
        let mut o = ClientOptions::new("x", "ftp://a");
        assert!(RegistryClient::new(o.clone()).is_err());
        o.base_url = "https://a".into();
        o.extra_ca_pem = Some(b"junk".to_vec());
        let e = RegistryClient::new(o).unwrap_err().to_string();
        assert!(
            e.starts_with("registry 'x': invalid CA certificates"),
            "{e}"
        );
    }

    #[test]
    fn for_v2_reads_ca_file() {
        let reg = V2Registry {
            label: "corp".into(),
            description: String::new(),
            host: "reg.example".into(),
            port: 443,
            protocol: Protocol::Https,
            auth: walt_core::config::Auth::None,
            ca_file: Some("/nonexistent/ca.pem".into()),
            repository: None,
        };
        let e = RegistryClient::for_v2(&reg, None).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        assert!(e.starts_with("registry 'corp'"), "{e}");
    }
}
