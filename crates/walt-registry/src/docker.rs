//! A minimal Docker Engine API client over the daemon's Unix socket
//! (HTTP/1.1, one connection per request): list images, inspect one,
//! stream `docker save` archives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;

/// Where the daemon listens by default.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// Largest JSON answer read into memory.
const MAX_JSON: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The socket is missing or nobody answers on it.
    #[error("the Docker daemon is not running (socket {socket}: {reason})")]
    NotRunning { socket: String, reason: String },
    #[error("docker: image '{image}' not found")]
    ImageNotFound { image: String },
    #[error("the Docker daemon (socket {socket}) answered {status}: {message}")]
    Api {
        socket: String,
        status: u16,
        message: String,
    },
    #[error("the Docker daemon (socket {socket}): {reason}")]
    Protocol { socket: String, reason: String },
}

impl DockerError {
    /// True when the daemon cannot be reached at all.
    pub fn is_not_running(&self) -> bool {
        matches!(self, DockerError::NotRunning { .. })
    }
}

/// One entry of `GET /images/json`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct DockerImageSummary {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// What walt reads of `GET /images/<name>/json`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct DockerImageInspect {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub config: Option<DockerContainerConfig>,
    #[serde(default, rename = "RootFS")]
    pub root_fs: Option<DockerRootFs>,
    /// When the image was created (RFC 3339 text; kept as any JSON value
    /// so that an odd daemon does not make the whole answer unreadable).
    #[serde(default)]
    pub created: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct DockerContainerConfig {
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct DockerRootFs {
    #[serde(default)]
    pub layers: Vec<String>,
}

impl DockerImageInspect {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.config
            .as_ref()?
            .labels
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }
}

/// The body of a `docker save`, read chunk by chunk.
pub struct SaveStream {
    socket: String,
    body: Incoming,
}

impl SaveStream {
    /// The next chunk; `None` at the end.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, DockerError>> {
        loop {
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        return Some(Ok(data));
                    }
                }
                Err(e) => {
                    return Some(Err(DockerError::Protocol {
                        socket: self.socket.clone(),
                        reason: format!("the image archive stream broke: {e}"),
                    }));
                }
            }
        }
    }
}

/// A client for the daemon at `socket`.
#[derive(Debug, Clone)]
pub struct DockerClient {
    socket: PathBuf,
}

/// Percent-encodes what may not appear as such in a request path or query.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl DockerClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        DockerClient {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn socket_name(&self) -> String {
        self.socket.display().to_string()
    }

    fn protocol(&self, reason: impl std::fmt::Display) -> DockerError {
        DockerError::Protocol {
            socket: self.socket_name(),
            reason: reason.to_string(),
        }
    }

    /// `GET path` on a fresh connection; the connection lives as long as
    /// the response body is read.
    async fn get(&self, path: &str) -> Result<Response<Incoming>, DockerError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|e| DockerError::NotRunning {
                    socket: self.socket_name(),
                    reason: match e.kind() {
                        std::io::ErrorKind::NotFound => "no such file".to_string(),
                        std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
                        _ => e.to_string(),
                    },
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(format!("HTTP handshake failed: {e}")))?;
        let socket = self.socket_name();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(socket = %socket, error = %e, "docker connection ended");
            }
        });
        let req = Request::get(path)
            .header(hyper::header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|e| self.protocol(format!("bad request {path}: {e}")))?;
        tracing::debug!(socket = %self.socket.display(), path, "docker request");
        sender.send_request(req).await.map_err(|e| {
            if e.is_closed() || e.is_incomplete_message() {
                DockerError::NotRunning {
                    socket: self.socket_name(),
                    reason: format!("the connection was closed: {e}"),
                }
            } else {
                self.protocol(format!("request {path} failed: {e}"))
            }
        })
    }

    async fn body_bytes(&self, resp: Response<Incoming>) -> Result<Bytes, DockerError> {
        let body = http_body_util::Limited::new(resp.into_body(), MAX_JSON);
        Ok(body
            .collect()
            .await
            .map_err(|e| self.protocol(format!("cannot read the answer: {e}")))?
            .to_bytes())
    }

    /// The error of a non-2xx answer (`{"message": ...}` bodies).
    async fn api_error(&self, resp: Response<Incoming>) -> DockerError {
        let status = resp.status().as_u16();
        let body = self.body_bytes(resp).await.unwrap_or_default();
        #[derive(Deserialize)]
        struct Msg {
            message: String,
        }
        let message = serde_json::from_slice::<Msg>(&body)
            .map(|m| m.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_string());
        DockerError::Api {
            socket: self.socket_name(),
            status,
            message,
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, DockerError> {
        let resp = self.get(path).await?;
        if !resp.status().is_success() {
            return Err(self.api_error(resp).await);
        }
        let body = self.body_bytes(resp).await?;
        serde_json::from_slice(&body).map_err(|e| self.protocol(format!("{path}: bad JSON: {e}")))
    }

    /// `GET /_ping`.
    pub async fn ping(&self) -> Result<(), DockerError> {
        let resp = self.get("/_ping").await?;
        if !resp.status().is_success() {
            return Err(self.api_error(resp).await);
        }
        Ok(())
    }

    /// Images carrying the label `label` (any value).
    pub async fn images_with_label(
        &self,
        label: &str,
    ) -> Result<Vec<DockerImageSummary>, DockerError> {
        let filters = serde_json::json!({ "label": [label] }).to_string();
        self.get_json(&format!("/images/json?filters={}", encode(&filters)))
            .await
    }

    /// `GET /images/<name>/json`.
    pub async fn inspect(&self, name: &str) -> Result<DockerImageInspect, DockerError> {
        let resp = self.get(&format!("/images/{}/json", encode(name))).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(DockerError::ImageNotFound {
                image: name.to_string(),
            });
        }
        if !resp.status().is_success() {
            return Err(self.api_error(resp).await);
        }
        let body = self.body_bytes(resp).await?;
        serde_json::from_slice(&body)
            .map_err(|e| self.protocol(format!("inspect {name}: bad JSON: {e}")))
    }

    /// `GET /images/<name>/get`: the `docker save` tar archive, streamed.
    pub async fn save(&self, name: &str) -> Result<SaveStream, DockerError> {
        let resp = self.get(&format!("/images/{}/get", encode(name))).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(DockerError::ImageNotFound {
                image: name.to_string(),
            });
        }
        if !resp.status().is_success() {
            return Err(self.api_error(resp).await);
        }
        Ok(SaveStream {
            socket: self.socket_name(),
            body: resp.into_body(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding() {
        assert_eq!(encode("u/n:t"), "u/n:t");
        assert_eq!(
            encode(r#"{"label":["a"]}"#),
            "%7B%22label%22:%5B%22a%22%5D%7D"
        );
    }

    #[tokio::test]
    async fn missing_socket() {
        let d = tempfile::tempdir().unwrap();
        let c = DockerClient::new(d.path().join("docker.sock"));
        let e = c.ping().await.unwrap_err();
        assert!(e.is_not_running(), "{e}");
        assert!(e.to_string().contains("docker.sock"), "{e}");
    }
}
