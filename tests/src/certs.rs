//! A test CA and a server certificate for 127.0.0.1, made with the
//! `openssl` CLI once per run (shared by the test processes of a run).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::util::{run_cmd, target_profile_dir};

/// Paths of the generated PEM files.
#[derive(Debug, Clone)]
pub struct TestCerts {
    /// The CA certificate clients must trust.
    pub ca_cert: PathBuf,
    /// The server certificate (SAN IP:127.0.0.1, DNS:localhost), signed by the CA.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestCerts {
    fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }
}

/// The certificates of this run (generated when missing or older than a day).
pub fn test_certs() -> &'static TestCerts {
    static CERTS: OnceLock<TestCerts> = OnceLock::new();
    CERTS.get_or_init(|| get_or_make().expect("cannot generate the test certificates"))
}

fn get_or_make() -> Result<TestCerts> {
    let base = target_profile_dir().join("walt-e2e-tmp");
    std::fs::create_dir_all(&base)?;
    let dir = base.join("certs");
    let certs = TestCerts::in_dir(&dir);
    let fresh = std::fs::metadata(&certs.server_key)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age < Duration::from_secs(24 * 3600));
    if fresh && certs.ca_cert.exists() && certs.server_cert.exists() {
        return Ok(certs);
    }
    let work = tempfile::Builder::new()
        .prefix("certs-")
        .tempdir_in(&base)?;
    make(work.path())?;
    let work = work.keep();
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::rename(&work, &dir).is_err() {
        // Another test process won the race: use its certificates.
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(certs)
}

fn make(dir: &Path) -> Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run_cmd(
        Command::new("openssl")
            .current_dir(dir)
            .args(["req", "-x509"])
            .args(ec)
            .args(["-keyout", "ca.key", "-out", "ca.pem", "-days", "30"])
            .args(["-subj", "/CN=walt e2e test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
    )
    .context("openssl: CA")?;
    run_cmd(
        Command::new("openssl")
            .current_dir(dir)
            .arg("req")
            .args(ec)
            .args([
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ]),
    )
    .context("openssl: server key")?;
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )?;
    run_cmd(
        Command::new("openssl")
            .current_dir(dir)
            .args([
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
            ])
            .args([
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "30",
                "-extfile",
                "ext.cnf",
            ]),
    )
    .context("openssl: server certificate")?;
    Ok(())
}
