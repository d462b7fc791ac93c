//! A real CNCF distribution registry (`docker-registry serve`) on 127.0.0.1.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::certs::test_certs;
use crate::http::RegistryClient;
use crate::util::{digest_hex, free_port, run_cmd, wait_for};

/// How to start a registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOpts {
    /// htpasswd basic auth with this (user, password).
    pub basic_auth: Option<(String, String)>,
    /// Serve HTTPS with the run's test certificate.
    pub tls: bool,
    /// `auth: token` with this issuer (instead of htpasswd).
    pub token: Option<crate::token_issuer::TokenAuth>,
}

impl RegistryOpts {
    pub fn plain() -> Self {
        Self::default()
    }
    pub fn tls() -> Self {
        Self {
            tls: true,
            ..Self::default()
        }
    }
    pub fn tls_basic(user: &str, pass: &str) -> Self {
        Self {
            tls: true,
            basic_auth: Some((user.into(), pass.into())),
            ..Self::default()
        }
    }
    /// Bearer tokens from `token`'s issuer; `tls`: HTTPS.
    pub fn token(tls: bool, token: crate::token_issuer::TokenAuth) -> Self {
        Self {
            tls,
            token: Some(token),
            ..Self::default()
        }
    }
}

/// A running registry; killed on drop.
pub struct Registry {
    dir: TempDir,
    port: u16,
    opts: RegistryOpts,
    child: Option<Child>,
}

impl Registry {
    /// Starts a registry on a free port (retrying on another port if the
    /// chosen one was taken meanwhile).
    pub fn start(opts: RegistryOpts) -> Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(opts.clone()) {
                Ok(r) => return Ok(r),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap())
    }

    fn try_start(opts: RegistryOpts) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("walt-e2e-registry-")
            .tempdir()?;
        let port = free_port();
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let mut http = format!("http:\n  addr: 127.0.0.1:{port}\n  secret: walt-e2e-secret\n");
        if opts.tls {
            let c = test_certs();
            http += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                c.server_cert.display(),
                c.server_key.display()
            );
        }
        let mut auth = String::new();
        if let Some((user, pass)) = &opts.basic_auth {
            let out = run_cmd(Command::new("htpasswd").args(["-Bbn", user, pass]))?;
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(
                &htpasswd,
                String::from_utf8(out.stdout)?.trim().to_string() + "\n",
            )?;
            auth = format!(
                "auth:\n  htpasswd:\n    realm: walt-e2e\n    path: {}\n",
                htpasswd.display()
            );
        }
        if let Some(t) = &opts.token {
            auth = format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                t.realm,
                t.service,
                t.issuer,
                t.rootcertbundle.display()
            );
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             {http}{auth}",
            storage.display()
        );
        std::fs::write(dir.path().join("config.yml"), config)?;
        let mut reg = Self {
            dir,
            port,
            opts,
            child: None,
        };
        reg.spawn()?;
        Ok(reg)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start docker-registry (run scripts/install-deps.sh)")?;
        self.child = Some(child);
        let url = format!("{}/v2/", self.base_url());
        let res = wait_for(
            "the registry to answer /v2/",
            Duration::from_secs(20),
            || {
                if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                    return Some(Err(anyhow::anyhow!("docker-registry exited: {st}")));
                }
                let out = Command::new("curl")
                    .args([
                        "-sk",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "--max-time",
                        "2",
                        &url,
                    ])
                    .output()
                    .ok()?;
                let code = String::from_utf8_lossy(&out.stdout).to_string();
                (code == "200" || code == "401").then_some(Ok(()))
            },
        );
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) | Err(e) => {
                let log = std::fs::read_to_string(self.dir.path().join("registry.log"))
                    .unwrap_or_default();
                bail!("{e}\nregistry log:\n{log}")
            }
        }
    }

    /// Stops the registry (SIGKILL); `restart` brings it back with the same storage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn opts(&self) -> &RegistryOpts {
        &self.opts
    }

    /// `127.0.0.1:PORT`.
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn base_url(&self) -> String {
        let scheme = if self.opts.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The CA certificate that verifies this registry (TLS only).
    pub fn ca_cert(&self) -> Option<&'static Path> {
        self.opts.tls.then(|| test_certs().ca_cert.as_path())
    }

    /// The registry's storage root.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The file holding a blob's bytes in the registry storage.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest_hex(digest);
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// A client (with the registry's credentials and CA).
    pub fn client(&self) -> RegistryClient {
        RegistryClient {
            base_url: self.base_url(),
            ca_cert: self.ca_cert().map(Path::to_path_buf),
            insecure: false,
            auth: self.opts.basic_auth.clone(),
        }
    }

    /// Its entry in the walt server config (`registries:` list item); TLS
    /// registries are verified with the test CA (`ca-file`).
    pub fn server_entry(&self, label: &str) -> String {
        let mut s = registry_entry(
            label,
            self.port,
            if self.opts.tls { "https" } else { "http" },
            self.takes_credentials(),
        );
        if let Some(ca) = self.ca_cert() {
            s += &format!("    ca-file: {}\n", ca.display());
        }
        s
    }

    /// Its entry with `protocol: https-no-verify` (no CA given).
    pub fn server_entry_no_verify(&self, label: &str) -> String {
        registry_entry(
            label,
            self.port,
            "https-no-verify",
            self.takes_credentials(),
        )
    }

    /// Whether it wants credentials (htpasswd or token auth).
    fn takes_credentials(&self) -> bool {
        self.opts.basic_auth.is_some() || self.opts.token.is_some()
    }
}

/// One `registries:` item of the server config.
pub fn registry_entry(label: &str, port: u16, protocol: &str, basic_auth: bool) -> String {
    format!(
        "-   label: {label}\n    api: docker-registry-v2\n    description: Test registry {label}\n\
         \x20   host: 127.0.0.1\n    port: {port}\n    protocol: {protocol}\n    auth: {}\n",
        if basic_auth { "basic" } else { "none" }
    )
}

impl Drop for Registry {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("WALT_E2E_REGISTRY_LOGS").is_some() {
            eprintln!("--- registry {} log ---\n{}", self.port, self.log());
        }
        self.stop();
    }
}
