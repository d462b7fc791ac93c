//! A small synchronous registry client over the `curl` CLI (handles TLS
//! with a CA file and basic auth without pulling an HTTP stack in).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::image::{Blob, BuiltImage, BuiltIndex};

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Talks to one registry (or a proxy in front of it).
#[derive(Debug, Clone)]
pub struct RegistryClient {
    /// `http(s)://127.0.0.1:PORT`.
    pub base_url: String,
    pub ca_cert: Option<PathBuf>,
    /// Skip TLS verification.
    pub insecure: bool,
    pub auth: Option<(String, String)>,
}

/// Media types a registry 2.8 needs in `Accept` to serve every manifest kind.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

impl RegistryClient {
    /// Same registry, reached through another base URL (e.g. a proxy).
    pub fn with_base_url(&self, base_url: String) -> Self {
        Self {
            base_url,
            ..self.clone()
        }
    }

    /// One request. `target` is a path (`/v2/...`) or an absolute URL;
    /// `body` is a file sent as the request body.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: Option<&Path>,
    ) -> Result<Response> {
        let url = if target.starts_with("http://") || target.starts_with("https://") {
            target.to_string()
        } else {
            format!("{}{}", self.base_url, target)
        };
        let tmp = tempfile::tempdir()?;
        let head_file = tmp.path().join("head");
        let body_file = tmp.path().join("body");
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "600", "-X", method, "-H", "Expect:"])
            .arg("-D")
            .arg(&head_file)
            .arg("-o")
            .arg(&body_file)
            .args(["-w", "%{http_code}"]);
        if method == "HEAD" {
            cmd.arg("-I");
        }
        if let Some(ca) = &self.ca_cert {
            cmd.arg("--cacert").arg(ca);
        }
        if self.insecure {
            cmd.arg("-k");
        }
        if let Some((u, p)) = &self.auth {
            cmd.arg("-u").arg(format!("{u}:{p}"));
        }
        for (k, v) in headers {
            cmd.arg("-H").arg(format!("{k}: {v}"));
        }
        match body {
            Some(path) => {
                cmd.arg("-T").arg(path);
            }
            None if method == "POST" || method == "PUT" => {
                cmd.args(["-H", "Content-Length: 0"]);
            }
            None => {}
        }
        cmd.arg(&url);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .context("cannot run curl")?;
        let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() {
            bail!(
                "curl {method} {url} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let status: u16 = code
            .parse()
            .with_context(|| format!("curl status code {code:?}"))?;
        let head = std::fs::read_to_string(&head_file).unwrap_or_default();
        // Keep the last header block (skip any interim 1xx answers).
        let block = head
            .split("\r\n\r\n")
            .filter(|b| !b.trim().is_empty())
            .last()
            .unwrap_or("");
        let headers = block
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let body = std::fs::read(&body_file).unwrap_or_default();
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    fn expect(resp: Response, ok: &[u16], what: &str) -> Result<Response> {
        if !ok.contains(&resp.status) {
            bail!(
                "{what}: HTTP {}: {}",
                resp.status,
                String::from_utf8_lossy(&resp.body).trim()
            );
        }
        Ok(resp)
    }

    pub fn blob_exists(&self, repo: &str, digest: &str) -> Result<bool> {
        let r = self.request("HEAD", &format!("/v2/{repo}/blobs/{digest}"), &[], None)?;
        Ok(r.status == 200)
    }

    /// Uploads a blob (POST an upload, then PUT it whole with `?digest=`),
    /// unless the registry already has it in this repository.
    pub fn push_blob(&self, repo: &str, blob: &Blob) -> Result<()> {
        if self.blob_exists(repo, &blob.digest)? {
            return Ok(());
        }
        let r = self.request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], None)?;
        let r = Self::expect(r, &[202], "start blob upload")?;
        let loc = r
            .header("location")
            .context("upload without Location")?
            .to_string();
        let sep = if loc.contains('?') { '&' } else { '?' };
        let url = format!("{loc}{sep}digest={}", blob.digest);
        let r = self.request(
            "PUT",
            &url,
            &[("Content-Type", "application/octet-stream")],
            Some(&blob.path),
        )?;
        Self::expect(r, &[201], &format!("upload blob {}", blob.digest))?;
        Ok(())
    }

    /// PUTs a manifest (or index) under a tag or digest.
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<()> {
        let tmp = tempfile::NamedTempFile::new()?;
        std::fs::write(tmp.path(), bytes)?;
        let r = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Content-Type", media_type)],
            Some(tmp.path()),
        )?;
        Self::expect(r, &[201], &format!("put manifest {repo}:{reference}"))?;
        Ok(())
    }

    /// GETs a manifest: (content type, bytes).
    pub fn get_manifest(&self, repo: &str, reference: &str) -> Result<(String, Vec<u8>)> {
        let r = self.request(
            "GET",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Accept", MANIFEST_ACCEPT)],
            None,
        )?;
        let r = Self::expect(r, &[200], &format!("get manifest {repo}:{reference}"))?;
        Ok((r.header("content-type").unwrap_or("").to_string(), r.body))
    }

    pub fn get_blob(&self, repo: &str, digest: &str) -> Result<Vec<u8>> {
        let r = self.request("GET", &format!("/v2/{repo}/blobs/{digest}"), &[], None)?;
        Ok(Self::expect(r, &[200], &format!("get blob {digest}"))?.body)
    }

    /// Pushes an image: its layers, config and manifest (tagged `tag`).
    pub fn push_image(&self, repo: &str, tag: &str, image: &BuiltImage) -> Result<()> {
        for l in &image.layers {
            self.push_blob(repo, l)?;
        }
        self.push_blob(repo, &image.config)?;
        self.put_manifest(repo, tag, &image.manifest_media_type, &image.manifest)
    }

    /// Puts `image`, already pushed to `from`, in each of `repos` as `tag`:
    /// its blobs mounted from `from` (nothing uploaded again), then its
    /// manifest; `threads` repositories at a time.
    pub fn copy_to_repos(
        &self,
        image: &BuiltImage,
        from: &str,
        repos: &[String],
        tag: &str,
        threads: usize,
    ) -> Result<()> {
        let per_thread = repos.len().div_ceil(threads.max(1)).max(1);
        std::thread::scope(|s| {
            let workers: Vec<_> = repos
                .chunks(per_thread)
                .map(|chunk| {
                    s.spawn(move || -> Result<()> {
                        for repo in chunk {
                            for blob in image.layers.iter().chain([&image.config]) {
                                let path = format!(
                                    "/v2/{repo}/blobs/uploads/?mount={}&from={from}",
                                    blob.digest
                                );
                                let r = self.request("POST", &path, &[], None)?;
                                Self::expect(r, &[201], &format!("mount into {repo}"))?;
                            }
                            self.put_manifest(
                                repo,
                                tag,
                                &image.manifest_media_type,
                                &image.manifest,
                            )?;
                        }
                        Ok(())
                    })
                })
                .collect();
            workers
                .into_iter()
                .try_for_each(|w| w.join().expect("a copying thread panicked"))
        })
    }

    /// Pushes every image of an index (by digest), then the index (tagged `tag`).
    pub fn push_index(&self, repo: &str, tag: &str, index: &BuiltIndex) -> Result<()> {
        for (img, _) in &index.images {
            self.push_image(repo, &img.manifest_digest, img)?;
        }
        self.put_manifest(repo, tag, &index.media_type, &index.bytes)
    }
}
