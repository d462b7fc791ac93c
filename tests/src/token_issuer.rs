//! A token server for registries configured with `auth: token` (the
//! distribution spec's Bearer flow): it checks Basic credentials, records
//! every request it gets (so that tests assert who received a password),
//! and answers JWTs (ES256, `x5c` = its self-signed signing certificate,
//! which the registry trusts through `rootcertbundle`). Served over plain
//! HTTP or over HTTPS with the run's test certificate (127.0.0.1 and
//! `localhost`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::json;
use tempfile::TempDir;

use crate::certs::test_certs;
use crate::util::run_cmd;

/// The `iss` of every token, and what registries must expect.
pub const ISSUER_NAME: &str = "walt-e2e-issuer";

/// One request the issuer received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The Basic credentials it carried, if any.
    pub basic: Option<(String, String)>,
    /// `service=` of the query.
    pub service: String,
    /// `scope=` values of the query.
    pub scopes: Vec<String>,
}

/// What a registry needs to trust this issuer (its `auth: token` section).
#[derive(Debug, Clone)]
pub struct TokenAuth {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub rootcertbundle: PathBuf,
}

struct Signer {
    key: ring::signature::EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
    /// DER of the signing certificate, base64 (standard) for `x5c`.
    x5c: String,
    jti: AtomicU64,
}

/// A running token issuer; stops on drop.
pub struct TokenIssuer {
    dir: TempDir,
    port: u16,
    tls: bool,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<TokenRequest>>>,
    thread: Option<JoinHandle<()>>,
}

impl TokenIssuer {
    /// Starts an issuer accepting these `(user, password)` pairs; `tls`:
    /// HTTPS with the run's test certificate (signed by the test CA).
    pub fn start(tls: bool, users: &[(&str, &str)]) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::Builder::new()
            .prefix("walt-e2e-issuer-")
            .tempdir()?;
        let signer = Arc::new(make_signer(dir.path())?);
        let tls_config = if tls {
            Some(Arc::new(server_tls_config()?))
        } else {
            None
        };
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Vec<TokenRequest>>> = Arc::default();
        let users: Arc<Vec<(String, String)>> = Arc::new(
            users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
        );
        let (s, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (signer, seen, users, tls_config) = (
                            signer.clone(),
                            seen2.clone(),
                            users.clone(),
                            tls_config.clone(),
                        );
                        std::thread::spawn(move || {
                            let _ = serve(conn, tls_config, &signer, &seen, &users);
                        });
                    }
                    // Non-blocking accept: poll for the stop flag.
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self {
            dir,
            port,
            tls,
            stop,
            seen,
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The realm URL, naming the issuer by `host` (`127.0.0.1` or
    /// `localhost`: both reach it, and the test certificate covers both).
    pub fn realm(&self, host: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{host}:{}/token", self.port)
    }

    /// The `auth: token` settings of a registry trusting this issuer.
    pub fn token_auth(&self, realm_host: &str, service: &str) -> TokenAuth {
        TokenAuth {
            realm: self.realm(realm_host),
            service: service.to_string(),
            issuer: ISSUER_NAME.to_string(),
            rootcertbundle: self.dir.path().join("signer.pem"),
        }
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// The passwords received so far (requests with Basic credentials).
    pub fn passwords_seen(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter_map(|r| r.basic.map(|(_, p)| p))
            .collect()
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A P-256 key and a self-signed certificate for it (`signer.pem`), made
/// with the `openssl` CLI.
fn make_signer(dir: &Path) -> Result<Signer> {
    run_cmd(
        Command::new("openssl")
            .current_dir(dir)
            .args(["req", "-x509", "-newkey", "ec"])
            .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
            .args(["-keyout", "signer.key", "-out", "signer.pem", "-days", "30"])
            .args(["-subj", "/CN=walt e2e token signer"]),
    )
    .context("openssl: signing certificate")?;
    run_cmd(
        Command::new("openssl")
            .current_dir(dir)
            .args(["pkcs8", "-topk8", "-nocrypt", "-in", "signer.key"])
            .args(["-outform", "DER", "-out", "signer.pk8"]),
    )
    .context("openssl: PKCS#8 key")?;
    run_cmd(
        Command::new("openssl")
            .current_dir(dir)
            .args(["x509", "-in", "signer.pem", "-outform", "DER"])
            .args(["-out", "signer.der"]),
    )
    .context("openssl: DER certificate")?;
    let rng = ring::rand::SystemRandom::new();
    let pk8 = std::fs::read(dir.join("signer.pk8"))?;
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &pk8,
        &rng,
    )
    .map_err(|e| anyhow!("cannot load the signing key: {e}"))?;
    let x5c = STANDARD.encode(std::fs::read(dir.join("signer.der"))?);
    Ok(Signer {
        key,
        rng,
        x5c,
        jti: AtomicU64::new(1),
    })
}

fn server_tls_config() -> Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let c = test_certs();
    let certs = CertificateDer::pem_file_iter(&c.server_cert)
        .context("test certificate")?
        .collect::<Result<Vec<_>, _>>()
        .context("test certificate")?;
    let key = PrivateKeyDer::from_pem_file(&c.server_key).context("test key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl Signer {
    /// A JWT granting `access` to `sub` for `service`.
    fn token(&self, sub: &str, service: &str, access: serde_json::Value) -> Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]});
        let claims = json!({
            "iss": ISSUER_NAME,
            "sub": sub,
            "aud": service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": self.jti.fetch_add(1, Ordering::SeqCst).to_string(),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|e| anyhow!("cannot sign: {e}"))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(sig.as_ref())
        ))
    }
}

/// `type:name:actions` scopes as the token's `access` claim.
fn access(scopes: &[String]) -> serde_json::Value {
    let entries: Vec<serde_json::Value> = scopes
        .iter()
        .flat_map(|s| s.split(' '))
        .filter_map(|s| {
            let (kind, rest) = s.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            Some(json!({
                "type": kind,
                "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    serde_json::Value::Array(entries)
}

/// `application/x-www-form-urlencoded` decoding of one query component.
fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

fn serve(
    conn: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    signer: &Signer,
    seen: &Mutex<Vec<TokenRequest>>,
    users: &[(String, String)],
) -> Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut stream: Box<dyn Stream> = match tls {
        Some(config) => Box::new(rustls::StreamOwned::new(
            rustls::ServerConnection::new(config)?,
            conn,
        )),
        None => Box::new(conn),
    };
    // One request per connection.
    let mut reader = BufReader::new(&mut stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut basic = None;
    let mut total = request_line.len();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        total += line.len();
        if total > 64 << 10 {
            return Err(anyhow!("request head too large"));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("authorization")
            && let Some(b64) = v.trim().strip_prefix("Basic ")
            && let Ok(raw) = STANDARD.decode(b64.trim())
        {
            let raw = String::from_utf8_lossy(&raw).into_owned();
            basic = raw
                .split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()));
        }
    }
    drop(reader);
    let target = request_line.split(' ').nth(1).unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut service = String::new();
    let mut scopes = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "service" => service = form_decode(v),
            "scope" => scopes.push(form_decode(v)),
            _ => {}
        }
    }
    seen.lock().unwrap().push(TokenRequest {
        basic: basic.clone(),
        service: service.clone(),
        scopes: scopes.clone(),
    });
    let user = basic
        .as_ref()
        .filter(|(u, p)| users.iter().any(|(uu, pp)| uu == u && pp == p))
        .map(|(u, _)| u.clone());
    let (status, body) = match (path, user) {
        ("/token", Some(user)) => {
            let token = signer.token(&user, &service, access(&scopes))?;
            (
                "200 OK",
                json!({"token": token, "access_token": token, "expires_in": 300}).to_string(),
            )
        }
        ("/token", None) => (
            "401 Unauthorized",
            json!({"details": "credentials required"}).to_string(),
        ),
        _ => ("404 Not Found", "{}".to_string()),
    };
    let extra = if status.starts_with("401") {
        "WWW-Authenticate: Basic realm=\"walt-e2e-issuer\"\r\n"
    } else {
        ""
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_decoding() {
        assert_eq!(
            form_decode("repository%3Awalter%2Fbusybox%3Apull%2Cpush"),
            "repository:walter/busybox:pull,push"
        );
        assert_eq!(form_decode("a+b%2"), "a b%2");
        let a = access(&["repository:walter/busybox:pull,push".into()]);
        assert_eq!(a[0]["name"], "walter/busybox");
        assert_eq!(a[0]["actions"], json!(["pull", "push"]));
        let a = access(&["registry:catalog:*".into()]);
        assert_eq!(a[0]["type"], "registry");
        assert_eq!(a[0]["actions"], json!(["*"]));
    }
}
