//! The server's key and certificate: created once, kept in a directory.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

use crate::{CERT_FILE, Fingerprint, KEY_FILE};

/// A key and its self-signed certificate, both PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
    pub fingerprint: Fingerprint,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsDirError {
    #[error("cannot create a TLS key and certificate: {0}")]
    Generate(String),
    #[error("cannot {verb} {path}: {source}")]
    Io {
        verb: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: {what}; remove {dir} to have a new key and certificate created (clients will then refuse the server until told to accept the new certificate)"
    )]
    Invalid {
        path: PathBuf,
        dir: PathBuf,
        what: String,
    },
}

/// A new ECDSA P-256 key and a self-signed certificate for it.
pub fn create() -> Result<Identity, TlsDirError> {
    let gen_err = |e: rcgen::Error| TlsDirError::Generate(e.to_string());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
    let mut names = vec!["walt-server".to_string()];
    if let Ok(h) = hostname()
        && !h.is_empty()
        && h != "walt-server"
    {
        names.push(h);
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(gen_err)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "walt-server");
    let cert = params.self_signed(&key).map_err(gen_err)?;
    Ok(Identity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        fingerprint: Fingerprint::of(cert.der()),
    })
}

fn hostname() -> Result<String, ()> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .map_err(|_| ())
}

fn io(verb: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TlsDirError {
    let path = path.to_path_buf();
    move |source| TlsDirError::Io { verb, path, source }
}

/// Writes `path` through a new temporary file renamed over it: a reader
/// (or a start after a crash) sees the old file or the whole new one.
fn write_atomic(path: &Path, text: &str, mode: u32) -> Result<(), TlsDirError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("write", &tmp)(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io("replace", path)(e)
    })
}

/// Writes `id` into `dir` (created 0755 when missing): the key (0600)
/// first, the certificate (0644) last, each atomically, so that a
/// certificate on disk always has its key.
pub fn write_files(dir: &Path, id: &Identity) -> Result<(), TlsDirError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io("create", dir))?;
    // A certificate left from an earlier key must not outlive it.
    match std::fs::remove_file(dir.join(CERT_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io("remove", &dir.join(CERT_FILE))(e));
        }
        _ => {}
    }
    write_atomic(&dir.join(KEY_FILE), &id.key_pem, 0o600)?;
    write_atomic(&dir.join(CERT_FILE), &id.cert_pem, 0o644)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The key and certificate in `dir`, created when there is no certificate
/// (first start, or a start after a crash in the middle of the creation).
/// Returns them, and whether they were just created.
pub fn load_or_create(dir: &Path) -> Result<(Identity, bool), TlsDirError> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let cert_pem = match std::fs::read_to_string(&cert_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = create()?;
            write_files(dir, &id)?;
            return Ok((id, true));
        }
        Err(e) => return Err(io("read", &cert_path)(e)),
    };
    let invalid = |path: &Path, what: String| TlsDirError::Invalid {
        path: path.to_path_buf(),
        dir: dir.to_path_buf(),
        what,
    };
    let key_pem = std::fs::read_to_string(&key_path).map_err(io("read", &key_path))?;
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| invalid(&cert_path, format!("not a PEM certificate ({e})")))?;
    PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| invalid(&key_path, format!("not a PEM private key ({e})")))?;
    Ok((
        Identity {
            fingerprint: Fingerprint::of(&cert),
            cert_pem,
            key_pem,
        },
        false,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let (a, created) = load_or_create(&tls).unwrap();
        assert!(created);
        let mode = |f: &str| std::fs::metadata(tls.join(f)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(KEY_FILE), 0o600);
        assert_eq!(mode(CERT_FILE), 0o644);
        assert!(a.key_pem.contains("PRIVATE KEY"));
        assert_eq!(Fingerprint::of_dir(&tls).unwrap(), Some(a.fingerprint));
        let (b, created) = load_or_create(&tls).unwrap();
        assert!(!created);
        assert_eq!(a.fingerprint, b.fingerprint);
        // A key without its certificate (killed in the middle): both anew.
        std::fs::remove_file(tls.join(CERT_FILE)).unwrap();
        let (c, created) = load_or_create(&tls).unwrap();
        assert!(created);
        assert_ne!(c.fingerprint, a.fingerprint);
        assert_eq!(
            std::fs::read_dir(&tls).unwrap().count(),
            2,
            "no temp file left"
        );
        // A damaged certificate is an error, not silently replaced.
        std::fs::write(tls.join(CERT_FILE), "junk").unwrap();
        let e = load_or_create(&tls).unwrap_err().to_string();
        assert!(e.contains("not a PEM certificate"), "{e}");
    }
}
