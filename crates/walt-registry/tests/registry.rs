//! Integration tests against a real distribution registry (the Debian
//! `docker-registry` program) and against small in-process mock servers
//! (bearer tokens, retries, redirects, corrupted content).

use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use walt_core::Digest;
use walt_registry::{
    ClientOptions, Credentials, ManifestCheck, RegistryClient, RegistryError, RetryPolicy,
};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A digest the client takes, from one of the strings the tests build.
fn dg(s: &str) -> Digest {
    Digest::parse(s).unwrap()
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        base_delay: Duration::from_millis(10),
    }
}

fn opts(label: &str, base_url: &str) -> ClientOptions {
    let mut o = ClientOptions::new(label, base_url);
    o.retry = fast_retry();
    o
}

/// A plain reqwest client for pushing test content (accepts any certificate).
fn test_http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .build()
        .unwrap()
}

// ----- a real registry -----

struct Registry {
    child: Child,
    base_url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Tls {
    cert: PathBuf,
    key: PathBuf,
    ca_pem: Vec<u8>,
}

async fn start_registry(tls: Option<&Tls>, htpasswd: Option<&Path>) -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut config = format!(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
        dir.path().join("data").display()
    );
    if let Some(t) = tls {
        config.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            t.cert.display(),
            t.key.display()
        ));
    }
    if let Some(h) = htpasswd {
        config.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
            h.display()
        ));
    }
    let config_file = dir.path().join("config.yml");
    std::fs::write(&config_file, config).unwrap();
    let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config_file)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("cannot start docker-registry");
    let scheme = if tls.is_some() { "https" } else { "http" };
    let base_url = format!("{scheme}://127.0.0.1:{port}");
    let reg = Registry {
        child,
        base_url,
        _dir: dir,
    };
    let http = test_http();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if http
            .get(format!("{}/v2/", reg.base_url))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        if Instant::now() > deadline {
            let log =
                std::fs::read_to_string(reg._dir.path().join("registry.log")).unwrap_or_default();
            panic!("registry did not start: {log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reg
}

async fn push_blob(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    data: &[u8],
    auth: Option<(&str, &str)>,
) -> String {
    let digest = sha256(data);
    let mut rb = http.post(format!("{base}/v2/{repo}/blobs/uploads/"));
    if let Some((u, p)) = auth {
        rb = rb.basic_auth(u, Some(p));
    }
    let r = rb.send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202, "{:?}", r.text().await);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let loc = if loc.starts_with("http") {
        loc
    } else {
        format!("{base}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let mut rb = http
        .put(format!("{loc}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec());
    if let Some((u, p)) = auth {
        rb = rb.basic_auth(u, Some(p));
    }
    let r = rb.send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
    digest
}

struct Pushed {
    config: Vec<u8>,
    config_digest: String,
    layer: Vec<u8>,
    layer_digest: String,
    manifest: Vec<u8>,
    manifest_digest: String,
}

/// Pushes a config, a layer and an OCI manifest (no top-level mediaType).
async fn push_image(base: &str, repo: &str, tag: &str, auth: Option<(&str, &str)>) -> Pushed {
    let http = test_http();
    let config = br#"{"architecture":"amd64","os":"linux","config":{"Labels":{"walt.node.models":"pc-x86-64"}},"rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    let layer: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let config_digest = push_blob(&http, base, repo, &config, auth).await;
    let layer_digest = push_blob(&http, base, repo, &layer, auth).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let mut rb = http
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", OCI_MANIFEST)
        .body(manifest.clone());
    if let Some((u, p)) = auth {
        rb = rb.basic_auth(u, Some(p));
    }
    let r = rb.send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
    let manifest_digest = sha256(&manifest);
    Pushed {
        config,
        config_digest,
        layer,
        layer_digest,
        manifest,
        manifest_digest,
    }
}

async fn collect(blob: walt_registry::BlobResponse) -> Vec<u8> {
    let mut out = Vec::new();
    let mut s = blob.stream;
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

#[tokio::test]
async fn plain_registry() {
    let reg = start_registry(None, None).await;
    let img = push_image(&reg.base_url, "alice/foo", "v1", None).await;
    let client = RegistryClient::new(opts("local", &reg.base_url)).unwrap();
    client.ping().await.unwrap();

    // by tag: the OCI manifest is served because we accept the OCI type
    let m = client.get_manifest("alice/foo", "v1").await.unwrap();
    assert_eq!(m.bytes, img.manifest);
    assert_eq!(m.digest, img.manifest_digest);
    assert_eq!(m.media_type.as_deref(), Some(OCI_MANIFEST));
    // by digest
    let m2 = client
        .get_manifest("alice/foo", &img.manifest_digest)
        .await
        .unwrap();
    assert_eq!(m2.bytes, img.manifest);

    // whole blob
    let b = client
        .get_blob("alice/foo", &dg(&img.layer_digest), 0)
        .await
        .unwrap();
    assert_eq!(b.offset, 0);
    assert_eq!(b.length, Some(img.layer.len() as u64));
    assert_eq!(collect(b).await, img.layer);
    // from an offset
    let b = client
        .get_blob("alice/foo", &dg(&img.layer_digest), 123_457)
        .await
        .unwrap();
    assert_eq!(b.offset, 123_457);
    assert_eq!(b.length, Some(img.layer.len() as u64 - 123_457));
    assert_eq!(collect(b).await, img.layer[123_457..]);

    // small blob, verified
    let c = client
        .get_blob_bytes("alice/foo", &dg(&img.config_digest), 1 << 20)
        .await
        .unwrap();
    assert_eq!(c, img.config);
    let e = client
        .get_blob_bytes("alice/foo", &dg(&img.layer_digest), 1000)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::TooLarge { .. }), "{e}");
    assert!(e.to_string().starts_with("registry 'local': "), "{e}");

    // not found: tag, repository, blob
    let e = client.get_manifest("alice/foo", "v2").await.unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with("registry 'local': repository 'alice/foo' or tag 'v2' not found"),
        "{msg}"
    );
    assert!(msg.contains("manifest unknown"), "{msg}");
    assert!(!e.is_transient());
    let e = client
        .get_manifest("bob/nothing", "latest")
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("bob/nothing"), "{e}");
    let missing = sha256(b"missing");
    let e = client
        .get_blob_bytes("alice/foo", &dg(&missing), 1000)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains(&missing), "{e}");
    let e = client
        .get_blob("alice/foo", &dg(&missing), 0)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
    let e = client
        .get_manifest("alice/foo", &missing)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!("manifest '{missing}'")),
        "{e}"
    );

    // concurrent downloads through clones of the client
    let mut tasks = Vec::new();
    for i in 0..4u64 {
        let c = client.clone();
        let d = img.layer_digest.clone();
        tasks.push(tokio::spawn(async move {
            collect(c.get_blob("alice/foo", &dg(&d), i * 1000).await.unwrap()).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), img.layer[i * 1000..]);
    }
}

#[tokio::test]
async fn unreachable_registry() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = RegistryClient::new(opts("local", &base)).unwrap();
    let t = Instant::now();
    let e = client.ping().await.unwrap_err();
    assert!(matches!(e, RegistryError::Unreachable { .. }), "{e:?}");
    assert!(e.is_transient());
    assert_eq!(
        e.to_string(),
        format!("registry 'local' (http://127.0.0.1:{port}) is unreachable: connection refused")
    );
    // retried with backoff (10 ms + 20 ms), not forever
    assert!(t.elapsed() < Duration::from_secs(5));
    let e = client.get_manifest("alice/foo", "v1").await.unwrap_err();
    assert!(e.to_string().contains("is unreachable"), "{e}");
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it.
fn make_tls(dir: &Path) -> Tls {
    let p = |n: &str| dir.join(n);
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=walt test CA",
            "-keyout",
        ])
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.pem")));
    run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
        ])
        .arg(p("srv.key"))
        .arg("-out")
        .arg(p("srv.csr")));
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-in"])
        .arg(p("srv.csr"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-CAcreateserial")
        .arg("-extfile")
        .arg(p("ext.cnf"))
        .arg("-out")
        .arg(p("srv.pem")));
    Tls {
        cert: p("srv.pem"),
        key: p("srv.key"),
        ca_pem: std::fs::read(p("ca.pem")).unwrap(),
    }
}

#[tokio::test]
async fn tls_and_basic_auth() {
    let dir = tempfile::tempdir().unwrap();
    let tls = make_tls(dir.path());
    let out = Command::new("htpasswd")
        .args(["-Bbn", "user", "pass"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, &out.stdout).unwrap();
    let reg = start_registry(Some(&tls), Some(&htpasswd)).await;
    let img = push_image(&reg.base_url, "alice/secret", "v1", Some(("user", "pass"))).await;

    let with = |creds: Option<(&str, &str)>, ca: bool, verify: bool| {
        let mut o = opts("secure", &reg.base_url);
        o.credentials = creds.map(|(u, p)| Credentials::new(u, p));
        o.extra_ca_pem = ca.then(|| tls.ca_pem.clone());
        o.verify_tls = verify;
        RegistryClient::new(o).unwrap()
    };

    // correct credentials + CA
    let c = with(Some(("user", "pass")), true, true);
    c.ping().await.unwrap();
    let m = c.get_manifest("alice/secret", "v1").await.unwrap();
    assert_eq!(m.digest, img.manifest_digest);
    let b = c
        .get_blob("alice/secret", &dg(&img.layer_digest), 10)
        .await
        .unwrap();
    assert_eq!(b.offset, 10);
    assert_eq!(collect(b).await, img.layer[10..]);
    assert_eq!(
        c.get_blob_bytes("alice/secret", &dg(&img.config_digest), 4096)
            .await
            .unwrap(),
        img.config
    );

    // wrong credentials
    let e = with(Some(("user", "wrong-pass")), true, true)
        .get_manifest("alice/secret", "v1")
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Unauthorized { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "registry 'secure': authentication failed (wrong username or password?)"
    );
    assert!(!e.to_string().contains("wrong-pass"));
    assert!(!format!("{e:?}").contains("wrong-pass"));

    // no credentials
    let e = with(None, true, true).ping().await.unwrap_err();
    assert!(
        matches!(e, RegistryError::CredentialsRequired { .. }),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "registry 'secure' requires credentials");

    // without the CA: TLS error
    let e = with(Some(("user", "pass")), false, true)
        .ping()
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Tls { .. }), "{e:?}");
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(msg.starts_with("registry 'secure': TLS error: "), "{msg}");
    assert!(msg.contains("https-no-verify"), "{msg}");
    assert!(!e.is_transient());

    // verification disabled
    let c = with(Some(("user", "pass")), false, false);
    assert_eq!(
        c.get_manifest("alice/secret", "v1").await.unwrap().digest,
        img.manifest_digest
    );

    // through the server configuration
    let ca_file = dir.path().join("ca.pem");
    let port: u16 = reg.base_url.rsplit(':').next().unwrap().parse().unwrap();
    let v2 = walt_core::config::V2Registry {
        label: "secure".into(),
        description: String::new(),
        host: "127.0.0.1".into(),
        port,
        protocol: walt_core::config::Protocol::Https,
        auth: walt_core::config::Auth::Basic,
        ca_file: Some(ca_file.display().to_string()),
        repository: None,
    };
    let c = RegistryClient::for_v2(&v2, Some(Credentials::new("user", "pass"))).unwrap();
    assert_eq!(
        c.get_manifest("alice/secret", "v1").await.unwrap().digest,
        img.manifest_digest
    );
}

// ----- mock servers -----

#[derive(Clone, Debug)]
struct MockReq {
    /// Path and query.
    target: String,
    headers: HashMap<String, String>,
}

impl MockReq {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

struct MockResp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn resp(status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> MockResp {
    MockResp {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: body.into(),
    }
}

type Handler = dyn Fn(&MockReq, u16) -> MockResp + Send + Sync;

struct Mock {
    port: u16,
    log: Arc<Mutex<Vec<MockReq>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Mock {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn requests(&self) -> Vec<MockReq> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A minimal HTTP/1.1 server (GET only, one request per connection).
async fn mock(handler: impl Fn(&MockReq, u16) -> MockResp + Send + Sync + 'static) -> Mock {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let log: Arc<Mutex<Vec<MockReq>>> = Arc::default();
    let handler: Arc<Handler> = Arc::new(handler);
    let log2 = log.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            let log = log2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&buf).to_string();
                let mut lines = text.split("\r\n");
                let target = lines
                    .next()
                    .unwrap()
                    .split(' ')
                    .nth(1)
                    .unwrap_or("/")
                    .to_string();
                let headers = lines
                    .take_while(|l| !l.is_empty())
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let req = MockReq { target, headers };
                log.lock().unwrap().push(req.clone());
                let r = handler(&req, port);
                let mut head = format!(
                    "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                    r.status,
                    r.body.len()
                );
                for (k, v) in &r.headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&r.body).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Mock { port, log, task }
}

const MANIFEST: &[u8] = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:aa","size":1},"layers":[]}"#;

#[tokio::test]
async fn bearer_token_flow() {
    let server = mock(|req, port| {
        let challenge = format!(
            r#"Bearer realm="http://127.0.0.1:{port}/token",service="mock registry",scope="repository:alice/foo:pull""#
        );
        if req.path() == "/token" {
            return match req.header("authorization") {
                // "user:pass"
                Some("Basic dXNlcjpwYXNz") => resp(200, &[], r#"{"token":"tok-user","expires_in":300}"#),
                Some(_) => resp(401, &[], "{}"),
                None => resp(200, &[], r#"{"access_token":"tok-anon"}"#),
            };
        }
        let ok = match req.header("authorization") {
            Some("Bearer tok-user") => true,
            Some("Bearer tok-anon") => !req.path().contains("private"),
            _ => false,
        };
        if !ok {
            return resp(401, &[("WWW-Authenticate", &challenge)], r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);
        }
        if req.path().ends_with("/manifests/v1") {
            assert!(req.header("accept").unwrap().contains(OCI_MANIFEST));
            return resp(200, &[("Content-Type", OCI_MANIFEST)], MANIFEST);
        }
        resp(200, &[], "{}")
    })
    .await;

    let mut o = opts("tok", &server.url());
    o.credentials = Some(Credentials::new("user", "pass"));
    let c = RegistryClient::new(o).unwrap();
    for _ in 0..3 {
        let m = c.get_manifest("alice/foo", "v1").await.unwrap();
        assert_eq!(m.digest, sha256(MANIFEST));
    }
    let reqs = server.requests();
    let tokens: Vec<_> = reqs.iter().filter(|r| r.path() == "/token").collect();
    assert_eq!(tokens.len(), 1, "token cached: {reqs:?}");
    assert!(
        tokens[0].target.contains("service=mock+registry"),
        "{}",
        tokens[0].target
    );
    assert!(
        tokens[0]
            .target
            .contains("scope=repository%3Aalice%2Ffoo%3Apull"),
        "{}",
        tokens[0].target
    );
    // one 401 round trip, then the token is sent preemptively
    let unauth = reqs
        .iter()
        .filter(|r| r.path() != "/token" && r.header("authorization").is_none())
        .count();
    assert_eq!(unauth, 1, "{reqs:?}");
    // another repository: a new token is requested preemptively
    c.get_manifest("alice/private", "v1").await.unwrap();
    let reqs = server.requests();
    assert_eq!(reqs.iter().filter(|r| r.path() == "/token").count(), 2);
    assert_eq!(
        reqs.iter()
            .filter(|r| r.path() != "/token" && r.header("authorization").is_none())
            .count(),
        1
    );

    // anonymous: public works, private requires credentials
    let anon = RegistryClient::new(opts("tok", &server.url())).unwrap();
    anon.get_manifest("alice/foo", "v1").await.unwrap();
    let e = anon.get_manifest("alice/private", "v1").await.unwrap_err();
    assert!(
        matches!(e, RegistryError::CredentialsRequired { .. }),
        "{e:?}"
    );

    // wrong password: the token server refuses
    let mut o = opts("tok", &server.url());
    o.credentials = Some(Credentials::new("user", "nope"));
    let e = RegistryClient::new(o).unwrap().ping().await.unwrap_err();
    assert!(matches!(e, RegistryError::Unauthorized { .. }), "{e:?}");
}

#[tokio::test]
async fn retries_and_server_errors() {
    let count = Arc::new(Mutex::new(0u32));
    let count2 = count.clone();
    let server = mock(move |req, _| {
        let path = req.path();
        if path.contains("/flaky/") {
            let mut n = count2.lock().unwrap();
            *n += 1;
            if *n <= 2 {
                return resp(if *n == 1 { 503 } else { 429 }, &[("Retry-After", "0")], "busy");
            }
            return resp(200, &[("Content-Type", OCI_MANIFEST)], MANIFEST);
        }
        if path.contains("/broken/") {
            return resp(500, &[], r#"{"errors":[{"code":"UNKNOWN","message":"disk on fire"}]}"#);
        }
        if path.contains("/denied/") {
            return resp(403, &[], r#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#);
        }
        resp(404, &[], r#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}"#)
    })
    .await;
    let c = RegistryClient::new(opts("mock", &server.url())).unwrap();

    let m = c.get_manifest("alice/flaky", "v1").await.unwrap();
    assert_eq!(m.bytes, MANIFEST);
    assert_eq!(*count.lock().unwrap(), 3);

    let before = server.requests().len();
    let e = c.get_manifest("alice/broken", "v1").await.unwrap_err();
    assert_eq!(server.requests().len() - before, 3, "3 attempts");
    assert!(
        matches!(e, RegistryError::Server { status: 500, .. }),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "registry 'mock': server error 500 on GET /v2/alice/broken/manifests/v1 (disk on fire)"
    );
    assert!(e.is_transient());

    let before = server.requests().len();
    let e = c.get_manifest("alice/missing", "v1").await.unwrap_err();
    assert_eq!(server.requests().len() - before, 1, "404 is not retried");
    assert_eq!(
        e.to_string(),
        "registry 'mock': repository 'alice/missing' or tag 'v1' not found (repository name not known to registry)"
    );

    let e = c
        .get_blob("alice/denied", &dg(&sha256(b"x")), 0)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Denied { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("requested access to the resource is denied"),
        "{e}"
    );
}

#[tokio::test]
async fn digest_verification() {
    let config = b"{\"real\":1}".to_vec();
    let good = sha256(&config);
    let bad_manifest_digest = sha256(b"other");
    let (good2, bmd) = (good.clone(), bad_manifest_digest.clone());
    let server = mock(move |req, _| {
        let p = req.path();
        if p.ends_with("/manifests/v1") {
            // header disagrees with the content
            return resp(
                200,
                &[
                    ("Content-Type", OCI_MANIFEST),
                    ("Docker-Content-Digest", &bmd),
                ],
                MANIFEST,
            );
        }
        if p.ends_with("/manifests/v2") {
            // a malformed header; one of another algorithm is not checked
            return resp(200, &[("Docker-Content-Digest", "sha256:zz")], MANIFEST);
        }
        if p.ends_with("/manifests/v3") {
            return resp(200, &[("Docker-Content-Digest", "sha512:abcd")], MANIFEST);
        }
        if p.contains("/manifests/sha256:") {
            return resp(200, &[("Content-Type", OCI_MANIFEST)], MANIFEST);
        }
        if p.ends_with(&good2) {
            return resp(200, &[], b"{\"fake\":1}".to_vec());
        }
        resp(200, &[], b"whatever".to_vec())
    })
    .await;
    let c = RegistryClient::new(opts("mock", &server.url())).unwrap();
    let e = c.get_manifest("alice/foo", "v1").await.unwrap_err();
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e:?}");
    assert!(
        e.to_string().starts_with(&format!(
            "registry 'mock': manifest alice/foo:v1 does not match digest {bad_manifest_digest}"
        )),
        "{e}"
    );
    let e = c.get_manifest("alice/foo", "v2").await.unwrap_err();
    assert!(matches!(e, RegistryError::Protocol { .. }), "{e:?}");
    assert!(
        e.to_string().starts_with(
            "registry 'mock': invalid response for manifest alice/foo:v2: Docker-Content-Digest: 'sha256:zz' is not a digest"
        ),
        "{e}"
    );
    let m = c.get_manifest("alice/foo", "v3").await.unwrap();
    assert_eq!(m.digest, sha256(MANIFEST));
    let asked = sha256(b"asked");
    let e = c.get_manifest("alice/foo", &asked).await.unwrap_err();
    assert!(
        e.to_string().starts_with(&format!(
            "registry 'mock': manifest alice/foo@{asked} does not match digest {asked}"
        )),
        "{e}"
    );
    // the right digest passes
    c.get_manifest("alice/foo", &sha256(MANIFEST))
        .await
        .unwrap();
    let e = c
        .get_blob_bytes("alice/foo", &dg(&good), 1000)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains(&good), "{e}");
    // a digest walt cannot verify or address is refused before any request
    let e = c.get_manifest("alice/foo", "md5:abc").await.unwrap_err();
    assert!(matches!(e, RegistryError::InvalidArgument { .. }), "{e:?}");
    assert!(e.to_string().contains("only sha256"), "{e}");
    let e = c.get_manifest("alice/foo", "sha256:zz").await.unwrap_err();
    assert_eq!(e.to_string(), "registry 'mock': invalid digest 'sha256:zz'");
    let e = c.parse_digest("md5:abc").unwrap_err();
    assert!(matches!(e, RegistryError::InvalidArgument { .. }), "{e:?}");
}

#[tokio::test]
async fn redirect_does_not_leak_credentials() {
    let layer: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    let layer2 = layer.clone();
    // the "object store": another origin (different port)
    let store = mock(move |req, _| {
        if let Some(r) = req.header("range") {
            let from: usize = r
                .trim_start_matches("bytes=")
                .trim_end_matches('-')
                .parse()
                .unwrap();
            let range = format!("bytes {from}-{}/{}", layer2.len() - 1, layer2.len());
            return resp(206, &[("Content-Range", &range)], layer2[from..].to_vec());
        }
        resp(200, &[], layer2.clone())
    })
    .await;
    let store_url = store.url();
    let registry = mock(move |req, _| {
        if req.header("authorization") != Some("Basic dXNlcjpwYXNz") {
            return resp(401, &[("WWW-Authenticate", r#"Basic realm="x""#)], "");
        }
        let loc = format!("{store_url}/blobs/abc?X-Amz-Signature=secret");
        resp(307, &[("Location", &loc)], "")
    })
    .await;
    let mut o = opts("mock", &registry.url());
    o.credentials = Some(Credentials::new("user", "pass"));
    let c = RegistryClient::new(o).unwrap();
    let d = sha256(&layer);
    let b = c.get_blob("alice/foo", &dg(&d), 0).await.unwrap();
    assert_eq!(collect(b).await, layer);
    let b = c.get_blob("alice/foo", &dg(&d), 99_000).await.unwrap();
    assert_eq!(b.offset, 99_000);
    assert_eq!(collect(b).await, layer[99_000..]);
    let store_reqs = store.requests();
    assert_eq!(store_reqs.len(), 2);
    for r in &store_reqs {
        assert!(r.header("authorization").is_none(), "leaked: {r:?}");
    }
    // basic auth reused preemptively: a single 401 in total
    let reg_reqs = registry.requests();
    assert_eq!(
        reg_reqs
            .iter()
            .filter(|r| r.header("authorization").is_none())
            .count(),
        1
    );
}

#[tokio::test]
async fn range_ignored_restarts_from_zero() {
    let data = b"0123456789".to_vec();
    let d2 = data.clone();
    let server = mock(move |_, _| resp(200, &[], d2.clone())).await;
    let c = RegistryClient::new(opts("mock", &server.url())).unwrap();
    let b = c
        .get_blob("alice/foo", &dg(&sha256(&data)), 5)
        .await
        .unwrap();
    assert_eq!(b.offset, 0);
    assert_eq!(b.length, Some(10));
    assert_eq!(collect(b).await, data);
    assert_eq!(server.requests()[0].header("range"), Some("bytes=5-"));
}

#[tokio::test]
async fn body_cut_short_is_transient() {
    // announces 1000 bytes, sends 10 and closes
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut tmp = [0u8; 4096];
            let _ = sock.read(&mut tmp).await;
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n0123456789")
                .await;
            let _ = sock.shutdown().await;
        }
    });
    let c = RegistryClient::new(opts("mock", &format!("http://127.0.0.1:{port}"))).unwrap();
    let b = c
        .get_blob("alice/foo", &dg(&sha256(b"x")), 0)
        .await
        .unwrap();
    let mut s = b.stream;
    let mut err = None;
    while let Some(r) = s.next().await {
        if let Err(e) = r {
            err = Some(e);
            break;
        }
    }
    let e = err.expect("body must fail");
    assert!(matches!(e, RegistryError::Interrupted { .. }), "{e:?}");
    assert!(e.is_transient());
    // small blobs: retried, then reported as cut short
    let e = c
        .get_blob_bytes("alice/foo", &dg(&sha256(b"x")), 4096)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Interrupted { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("registry 'mock': download of blob"),
        "{e}"
    );
    task.abort();
}

// ----- catalog and tags -----

/// Pushes a tiny image (a config blob, no layer) as `repo:tag`.
async fn push_tiny(http: &reqwest::Client, base: &str, repo: &str, tag: &str) {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let digest = push_blob(http, base, repo, config, None).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest, "size": config.len()},
        "layers": [],
    }))
    .unwrap();
    let r = http
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", OCI_MANIFEST)
        .body(manifest)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
}

#[tokio::test]
async fn catalog_and_tags_paginate_on_a_real_registry() {
    let reg = start_registry(None, None).await;
    let http = test_http();
    let c = RegistryClient::new(opts("local", &reg.base_url)).unwrap();
    assert!(c.catalog().await.unwrap().is_empty());
    let mut expected: Vec<String> = (0..105).map(|i| format!("u/r{i:03}")).collect();
    for repo in &expected {
        push_tiny(&http, &reg.base_url, repo, "latest").await;
    }
    push_tiny(&http, &reg.base_url, "solo", "v1").await;
    expected.push("solo".into());
    for tag in ["v1", "v2"] {
        push_tiny(&http, &reg.base_url, "u/r000", tag).await;
    }
    let mut got = c.catalog().await.unwrap();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    let mut tags = c.tags("u/r000").await.unwrap();
    tags.sort();
    assert_eq!(tags, ["latest", "v1", "v2"]);
    assert_eq!(c.tags("solo").await.unwrap(), ["v1"]);
    let e = c.tags("nothing/here").await.unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e:?}");
    assert!(c.tags("Bad/Name").await.is_err());
}

/// Pushes `repo:tag` with a config holding `label`; returns the manifest digest.
async fn push_labelled(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
    label: &str,
) -> String {
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Labels":{{"walt.node.models":"{label}"}}}},"rootfs":{{"type":"layers","diff_ids":[]}}}}"#
    );
    let digest = push_blob(http, base, repo, config.as_bytes(), None).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest, "size": config.len()},
        "layers": [],
    }))
    .unwrap();
    let r = http
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
    sha256(&manifest)
}

#[tokio::test]
async fn conditional_manifest_on_a_real_registry() {
    let reg = start_registry(None, None).await;
    let http = test_http();
    let c = RegistryClient::new(opts("local", &reg.base_url)).unwrap();
    let first = push_labelled(&http, &reg.base_url, "u/img", "v1", "rpi-3-b").await;
    let ManifestCheck::Changed(m) = c
        .get_manifest_if_changed("u/img", "v1", None)
        .await
        .unwrap()
    else {
        panic!("unconditional request answered 304");
    };
    assert_eq!(m.digest, first);
    // unchanged tag: 304, no body
    let check = c
        .get_manifest_if_changed("u/img", "v1", Some(&dg(&first)))
        .await
        .unwrap();
    assert!(matches!(check, ManifestCheck::Unchanged), "{check:?}");
    // the tag is re-pushed with another image: the new manifest comes back
    let second = push_labelled(&http, &reg.base_url, "u/img", "v1", "pc-x86-64").await;
    assert_ne!(first, second);
    let ManifestCheck::Changed(m) = c
        .get_manifest_if_changed("u/img", "v1", Some(&dg(&first)))
        .await
        .unwrap()
    else {
        panic!("a re-pushed tag answered 304");
    };
    assert_eq!(m.digest, second);
    // and a missing tag is still an error
    let e = c
        .get_manifest_if_changed("u/img", "v9", Some(&dg(&first)))
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e:?}");
}

#[tokio::test]
async fn catalog_follows_links_and_null_tags() {
    let server = mock(|req, port| match req.target.as_str() {
        "/v2/_catalog?n=100" => resp(
            200,
            &[("Link", r#"</v2/_catalog?last=a%2Fb&n=100>; rel="next""#)],
            r#"{"repositories":["a/a","a/b"]}"#,
        ),
        "/v2/_catalog?last=a%2Fb&n=100" => resp(
            200,
            &[(
                "Link",
                &format!(r#"<http://127.0.0.1:{port}/v2/_catalog?last=c&n=100>; rel="next""#),
            )],
            r#"{"repositories":["c"]}"#,
        ),
        // loops back to the first page: the client stops
        "/v2/_catalog?last=c&n=100" => resp(
            200,
            &[("Link", r#"</v2/_catalog?n=100>; rel="next""#)],
            r#"{"repositories":null}"#,
        ),
        "/v2/a/a/tags/list?n=100" => resp(200, &[], r#"{"name":"a/a","tags":null}"#),
        "/v2/a/b/tags/list?n=100" => resp(200, &[], r#"{"name":"a/b","tags":["x"]}"#),
        "/v2/bad/json/tags/list?n=100" => resp(200, &[], "nope"),
        _ => resp(404, &[], r#"{"errors":[{"code":"NAME_UNKNOWN"}]}"#),
    })
    .await;
    let c = RegistryClient::new(opts("m", &server.url())).unwrap();
    assert_eq!(c.catalog().await.unwrap(), ["a/a", "a/b", "c"]);
    assert!(c.tags("a/a").await.unwrap().is_empty());
    assert_eq!(c.tags("a/b").await.unwrap(), ["x"]);
    let e = c.tags("bad/json").await.unwrap_err().to_string();
    assert!(e.contains("not valid JSON"), "{e}");
}

/// A `jfrog-artifactory` registry: the catalog of its repository, read
/// where WalT reads it, names given under the repository.
#[tokio::test]
async fn jfrog_catalog_lives_under_the_repository() {
    let server = mock(|req, _| match req.target.as_str() {
        "/v2/walt-images/_catalog?n=100" => {
            resp(200, &[], r#"{"repositories":["busybox","tools/x"]}"#)
        }
        "/v2/walt-images/busybox/tags/list?n=100" => resp(
            200,
            &[],
            r#"{"name":"walt-images/busybox","tags":["latest"]}"#,
        ),
        _ => resp(404, &[], r#"{"errors":[{"code":"NOT_FOUND"}]}"#),
    })
    .await;
    let port: u16 = server.url().rsplit(':').next().unwrap().parse().unwrap();
    let reg = walt_core::config::V2Registry {
        label: "art".into(),
        description: String::new(),
        host: "127.0.0.1".into(),
        port,
        protocol: walt_core::config::Protocol::Http,
        auth: walt_core::config::Auth::None,
        ca_file: None,
        repository: Some("walt-images".into()),
    };
    let c = RegistryClient::for_v2(&reg, None).unwrap();
    assert_eq!(
        c.catalog().await.unwrap(),
        ["walt-images/busybox", "walt-images/tools/x"]
    );
    assert_eq!(c.tags("walt-images/busybox").await.unwrap(), ["latest"]);
    // Without the repository: the registry's root catalog (absent here).
    let mut plain = reg.clone();
    plain.repository = None;
    let c = RegistryClient::for_v2(&plain, None).unwrap();
    assert!(c.catalog().await.is_err());
}

// ----- pushing -----

/// A file of `len` pseudo-random bytes and its digest.
fn blob_file(dir: &Path, name: &str, len: u32) -> (PathBuf, Vec<u8>, String) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    let digest = sha256(&data);
    (path, data, digest)
}

#[tokio::test]
async fn push_blobs_and_manifest_to_a_real_registry() {
    let reg = start_registry(None, None).await;
    let dir = tempfile::tempdir().unwrap();
    let (layer_path, layer, layer_digest) = blob_file(dir.path(), "layer", 350_000);
    let config = br#"{"architecture":"amd64","os":"linux","config":{"Labels":{"walt.node.models":"pc-x86-64"}},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_path = dir.path().join("config");
    std::fs::write(&config_path, config).unwrap();
    let config_digest = sha256(config);

    // chunked: 64 KiB chunks
    let mut o = opts("local", &reg.base_url);
    o.upload_chunk_size = 64 << 10;
    let c = RegistryClient::new(o).unwrap();
    assert!(
        !c.blob_exists("alice/pushed", &dg(&layer_digest))
            .await
            .unwrap()
    );
    let seen = Arc::new(Mutex::new(0u64));
    let s2 = seen.clone();
    let progress: walt_registry::Progress = Arc::new(move |p| {
        let mut s = s2.lock().unwrap();
        *s = (*s).max(p);
    });
    c.push_blob(
        "alice/pushed",
        &dg(&layer_digest),
        layer.len() as u64,
        &layer_path,
        Some(progress),
    )
    .await
    .unwrap();
    assert_eq!(*seen.lock().unwrap(), layer.len() as u64);
    assert!(
        c.blob_exists("alice/pushed", &dg(&layer_digest))
            .await
            .unwrap()
    );
    let b = c
        .get_blob("alice/pushed", &dg(&layer_digest), 0)
        .await
        .unwrap();
    assert_eq!(collect(b).await, layer);

    // monolithic (default chunk size)
    let c = RegistryClient::new(opts("local", &reg.base_url)).unwrap();
    c.push_blob(
        "alice/pushed",
        &dg(&config_digest),
        config.len() as u64,
        &config_path,
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        c.get_blob_bytes("alice/pushed", &dg(&config_digest), 4096)
            .await
            .unwrap(),
        config
    );
    // a wrong digest is refused by the registry
    let e = c
        .push_blob(
            "alice/pushed",
            &dg(&sha256(b"other")),
            config.len() as u64,
            &config_path,
            None,
        )
        .await
        .unwrap_err();
    assert!(!e.is_transient(), "{e:?}");

    // the manifest last
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let d = c
        .put_manifest("alice/pushed", "v1", OCI_MANIFEST, &manifest)
        .await
        .unwrap();
    assert_eq!(d, sha256(&manifest));
    let m = c.get_manifest("alice/pushed", "v1").await.unwrap();
    assert_eq!(m.bytes, manifest);

    // cross-repository mount
    assert!(!c.blob_exists("bob/copy", &dg(&layer_digest)).await.unwrap());
    assert!(
        c.mount_blob("bob/copy", &dg(&layer_digest), "alice/pushed")
            .await
            .unwrap()
    );
    assert!(c.blob_exists("bob/copy", &dg(&layer_digest)).await.unwrap());
    let unknown = sha256(b"nowhere");
    assert!(
        !c.mount_blob("bob/copy", &dg(&unknown), "alice/pushed")
            .await
            .unwrap()
    );
    assert!(!c.blob_exists("bob/copy", &dg(&unknown)).await.unwrap());
}

#[tokio::test]
async fn push_with_tls_and_basic_auth() {
    let dir = tempfile::tempdir().unwrap();
    let tls = make_tls(dir.path());
    let out = Command::new("htpasswd")
        .args(["-Bbn", "user", "pass"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, &out.stdout).unwrap();
    let reg = start_registry(Some(&tls), Some(&htpasswd)).await;
    let (path, data, digest) = blob_file(dir.path(), "blob", 200_000);
    let with = |creds: Option<(&str, &str)>| {
        let mut o = opts("secure", &reg.base_url);
        o.credentials = creds.map(|(u, p)| Credentials::new(u, p));
        o.extra_ca_pem = Some(tls.ca_pem.clone());
        o.upload_chunk_size = 80_000;
        RegistryClient::new(o).unwrap()
    };
    let e = with(None)
        .push_blob("user/x", &dg(&digest), data.len() as u64, &path, None)
        .await
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::CredentialsRequired { .. }),
        "{e:?}"
    );
    let e = with(Some(("user", "bad")))
        .blob_exists("user/x", &dg(&digest))
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Unauthorized { .. }), "{e:?}");
    let c = with(Some(("user", "pass")));
    c.push_blob("user/x", &dg(&digest), data.len() as u64, &path, None)
        .await
        .unwrap();
    assert!(c.blob_exists("user/x", &dg(&digest)).await.unwrap());
    let b = c.get_blob("user/x", &dg(&digest), 0).await.unwrap();
    assert_eq!(collect(b).await, data);
}

/// An upload endpoint that drops the connection in the middle of the
/// second chunk, after keeping half of it (as a registry whose client
/// went away does).
async fn upload_mock(drop_chunk: usize) -> (u16, Arc<Mutex<Vec<u8>>>, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stored: Arc<Mutex<Vec<u8>>> = Arc::default();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let done: Arc<Mutex<Option<String>>> = Arc::default();
    let (st, lg) = (stored.clone(), log.clone());
    let patches = Arc::new(Mutex::new(0usize));
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (stored, log, done, patches) =
                (st.clone(), lg.clone(), done.clone(), patches.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 65536];
                let head_end = loop {
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                    match sock.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let mut lines = head.split("\r\n");
                let mut first = lines.next().unwrap().split(' ');
                let method = first.next().unwrap().to_string();
                let target = first.next().unwrap().to_string();
                let headers: HashMap<String, String> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let len: usize = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = buf[head_end..].to_vec();
                let mut drop_after = None;
                if method == "PATCH" {
                    let mut n = patches.lock().unwrap();
                    *n += 1;
                    if *n == drop_chunk {
                        drop_after = Some(len / 2);
                    }
                }
                while body.len() < drop_after.unwrap_or(len) {
                    match sock.read(&mut tmp).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => body.extend_from_slice(&tmp[..n]),
                    }
                }
                log.lock().unwrap().push(format!(
                    "{method} {target} {}",
                    headers.get("content-range").cloned().unwrap_or_default()
                ));
                let loc = "/v2/r/blobs/uploads/u1?_state=x";
                let range = |n: usize| format!("0-{}", n.saturating_sub(1));
                let (status, extra): (u16, Vec<(String, String)>) = match method.as_str() {
                    "POST" => (202, vec![("Location".into(), loc.into())]),
                    "PATCH" => {
                        let start: usize = headers["content-range"]
                            .split('-')
                            .next()
                            .unwrap()
                            .parse()
                            .unwrap();
                        let mut s = stored.lock().unwrap();
                        if start != s.len() {
                            (416, vec![])
                        } else if let Some(keep) = drop_after {
                            s.extend_from_slice(&body[..keep.min(body.len())]);
                            drop(s);
                            // gone without an answer
                            return;
                        } else {
                            s.extend_from_slice(&body[..len]);
                            (
                                202,
                                vec![
                                    ("Location".into(), loc.into()),
                                    ("Range".into(), range(s.len())),
                                ],
                            )
                        }
                    }
                    "GET" => {
                        let n = stored.lock().unwrap().len();
                        (
                            204,
                            vec![("Location".into(), loc.into()), ("Range".into(), range(n))],
                        )
                    }
                    "PUT" => {
                        let mut s = stored.lock().unwrap();
                        s.extend_from_slice(&body[..len]);
                        let digest = target
                            .split("digest=")
                            .nth(1)
                            .unwrap_or("")
                            .replace("%3A", ":");
                        if sha256(&s) == digest {
                            *done.lock().unwrap() = Some(digest);
                            (201, vec![])
                        } else {
                            (400, vec![])
                        }
                    }
                    "HEAD" => {
                        let d = done.lock().unwrap().clone();
                        if d.is_some_and(|d| target.ends_with(&d)) {
                            (200, vec![])
                        } else {
                            (404, vec![])
                        }
                    }
                    _ => (405, vec![]),
                };
                let mut out =
                    format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n");
                for (k, v) in extra {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                let _ = sock.write_all(out.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (port, stored, log)
}

#[tokio::test]
async fn chunked_upload_resumes_where_the_registry_stands() {
    let (port, stored, log) = upload_mock(2).await;
    let dir = tempfile::tempdir().unwrap();
    let (path, data, digest) = blob_file(dir.path(), "blob", 350_000);
    let mut o = opts("mock", &format!("http://127.0.0.1:{port}"));
    o.upload_chunk_size = 100_000;
    let c = RegistryClient::new(o).unwrap();
    c.push_blob("r", &dg(&digest), data.len() as u64, &path, None)
        .await
        .unwrap();
    assert_eq!(*stored.lock().unwrap(), data);
    let log = log.lock().unwrap().clone();
    // one upload, resumed after asking where it stands
    assert_eq!(
        log.iter().filter(|l| l.starts_with("POST ")).count(),
        1,
        "{log:?}"
    );
    assert!(log.iter().any(|l| l.starts_with("GET ")), "{log:?}");
    assert!(
        log.iter()
            .any(|l| l.starts_with("PATCH ") && l.ends_with(" 150000-249999")),
        "{log:?}"
    );
}

#[tokio::test]
async fn push_asks_for_push_tokens() {
    let server = mock(|req, port| {
        if req.path() == "/token" {
            return resp(200, &[], r#"{"token":"tok","expires_in":300}"#);
        }
        if req.header("authorization") != Some("Bearer tok") {
            let challenge = format!(
                r#"Bearer realm="http://127.0.0.1:{port}/token",service="mock",scope="repository:alice/foo:pull,push""#
            );
            return resp(401, &[("WWW-Authenticate", &challenge)], "{}");
        }
        resp(404, &[], "")
    })
    .await;
    let mut o = opts("tok", &server.url());
    o.credentials = Some(Credentials::new("user", "pass"));
    let c = RegistryClient::new(o).unwrap();
    let d = sha256(b"x");
    assert!(!c.blob_exists("alice/foo", &dg(&d)).await.unwrap());
    // known scheme: the token for another repository is asked for at once
    assert!(!c.blob_exists("alice/bar", &dg(&d)).await.unwrap());
    let tokens: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.path() == "/token")
        .map(|r| r.target)
        .collect();
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    assert!(
        tokens[0].contains("scope=repository%3Aalice%2Ffoo%3Apull%2Cpush"),
        "{tokens:?}"
    );
    assert!(
        tokens[1].contains("scope=repository%3Aalice%2Fbar%3Apull%2Cpush"),
        "{tokens:?}"
    );
}

/// A proxy to a real registry that forwards only half of the body of the
/// `drop_patch`-th PATCH, then closes both connections.
async fn cutting_proxy(upstream: u16, drop_patch: usize) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let lg = log.clone();
    let patches = Arc::new(Mutex::new(0usize));
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (log, patches) = (lg.clone(), patches.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 65536];
                let head_end = loop {
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                    match sock.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let first = head.lines().next().unwrap_or_default().to_string();
                let len: usize = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse().ok())
                    .unwrap_or(0);
                let cut = first.starts_with("PATCH ") && {
                    let mut n = patches.lock().unwrap();
                    *n += 1;
                    *n == drop_patch
                };
                let want = if cut { len / 2 } else { len };
                while buf.len() < head_end + want {
                    match sock.read(&mut tmp).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                buf.truncate(head_end + want);
                log.lock()
                    .unwrap()
                    .push(format!("{first}{}", if cut { " (cut)" } else { "" }));
                let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                // one request per upstream connection
                let mut req = head[..head_end - 2].to_string();
                req.push_str("Connection: close\r\n\r\n");
                let _ = up.write_all(req.as_bytes()).await;
                let _ = up.write_all(&buf[head_end..]).await;
                if cut {
                    // both sides see the connection go away mid-body
                    return;
                }
                let mut answer = Vec::new();
                let _ = up.read_to_end(&mut answer).await;
                let _ = sock.write_all(&answer).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (port, log)
}

#[tokio::test]
async fn chunked_upload_survives_a_cut_connection_to_a_real_registry() {
    let reg = start_registry(None, None).await;
    let upstream: u16 = reg.base_url.rsplit(':').next().unwrap().parse().unwrap();
    let (port, log) = cutting_proxy(upstream, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let (path, data, digest) = blob_file(dir.path(), "blob", 350_000);
    let mut o = opts("cut", &format!("http://127.0.0.1:{port}"));
    o.upload_chunk_size = 100_000;
    let c = RegistryClient::new(o).unwrap();
    c.push_blob("alice/cut", &dg(&digest), data.len() as u64, &path, None)
        .await
        .unwrap();
    let log = log.lock().unwrap().clone();
    // distribution forgets an upload whose state no longer matches what it
    // holds: the client asks, then starts over (the mock above covers the
    // registries that report where the upload stands)
    assert!(log.iter().any(|l| l.ends_with("(cut)")), "{log:?}");
    let direct = RegistryClient::new(opts("local", &reg.base_url)).unwrap();
    let b = direct.get_blob("alice/cut", &dg(&digest), 0).await.unwrap();
    assert_eq!(collect(b).await, data, "{log:?}");
}

// ----- resuming blob downloads -----

/// A blob server that breaks its answers: request `n` (0-based) gets at most
/// `cut(n)` bytes of its body (`None`: all of it) before the connection
/// closes, each answer announcing its full length. A `Range: bytes=N-`
/// request gets a 206 from `N` when `ranges`, else the whole blob again.
async fn breaking_blob_server(
    data: Vec<u8>,
    ranges: bool,
    cut: impl Fn(usize) -> Option<usize> + Send + Sync + 'static,
) -> Mock {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let log: Arc<Mutex<Vec<MockReq>>> = Arc::default();
    let log2 = log.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut tmp).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            }
            let text = String::from_utf8_lossy(&buf).to_string();
            let mut lines = text.split("\r\n");
            let target = lines.next().unwrap_or_default().split(' ').nth(1);
            let headers: HashMap<String, String> = lines
                .take_while(|l| !l.is_empty())
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let req = MockReq {
                target: target.unwrap_or("/").to_string(),
                headers,
            };
            let n = {
                let mut log = log2.lock().unwrap();
                log.push(req.clone());
                log.len() - 1
            };
            let from = req
                .header("range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|r| r.parse::<usize>().ok())
                .filter(|_| ranges);
            let (head, body) = match from {
                Some(from) => (
                    format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\nConnection: close\r\n\r\n",
                        data.len() - from,
                        data.len() - 1,
                        data.len()
                    ),
                    &data[from..],
                ),
                None => (
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        data.len()
                    ),
                    &data[..],
                ),
            };
            let body = &body[..cut(n).unwrap_or(body.len()).min(body.len())];
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body).await;
            let _ = sock.shutdown().await;
        }
    });
    Mock { port, log, task }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Everything a blob stream gives, or its error.
async fn drain(
    mut s: futures::stream::BoxStream<'static, Result<bytes::Bytes, RegistryError>>,
) -> Result<Vec<u8>, RegistryError> {
    let mut out = Vec::new();
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

#[tokio::test]
async fn blob_stream_resumes_from_the_missing_byte() {
    let data = pattern(100_000);
    // the first two answers break after 30 000 bytes each
    let server = breaking_blob_server(data.clone(), true, |n| (n < 2).then_some(30_000)).await;
    let c = RegistryClient::new(opts("mock", &server.url())).unwrap();
    let got = drain(c.blob_stream("alice/foo", &dg(&sha256(&data)), data.len() as u64))
        .await
        .unwrap();
    assert!(got == data, "the resumed body differs from the blob");
    let ranges: Vec<Option<String>> = server
        .requests()
        .iter()
        .map(|r| r.header("range").map(str::to_string))
        .collect();
    assert_eq!(
        ranges,
        [
            None,
            Some("bytes=30000-".to_string()),
            Some("bytes=60000-".to_string())
        ]
    );
}

#[tokio::test]
async fn blob_stream_skips_what_it_has_when_the_range_is_ignored() {
    let data = pattern(50_000);
    let server = breaking_blob_server(data.clone(), false, |n| (n == 0).then_some(20_000)).await;
    let c = RegistryClient::new(opts("mock", &server.url())).unwrap();
    let got = drain(c.blob_stream("alice/foo", &dg(&sha256(&data)), data.len() as u64))
        .await
        .unwrap();
    assert!(got == data, "bytes were given twice or lost");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].header("range"), Some("bytes=20000-"));
}

#[tokio::test]
async fn blob_stream_gives_up_after_the_retry_budget() {
    let data = pattern(10_000);
    // every answer breaks, each one 1 000 bytes further
    let server = breaking_blob_server(data.clone(), true, |_| Some(1_000)).await;
    let c = RegistryClient::new(opts("mock", &server.url())).unwrap();
    let e = drain(c.blob_stream("alice/foo", &dg(&sha256(&data)), data.len() as u64))
        .await
        .unwrap_err();
    let tries = fast_retry().attempts as usize;
    assert!(
        matches!(e, RegistryError::Truncated { received, expected: 10_000, .. } if received == 1_000 * (tries + 1) as u64),
        "{e:?}"
    );
    assert!(!e.is_transient());
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!(
            "registry 'mock': blob {} is truncated: received {} of 10000 bytes (",
            sha256(&data),
            1_000 * (tries + 1)
        )),
        "{msg}"
    );
    // the first request, then one per resume
    assert_eq!(server.requests().len(), tries + 1);
}

#[tokio::test]
async fn blob_stream_stops_after_a_longer_body() {
    let data = pattern(5_000);
    let server = breaking_blob_server(data.clone(), true, |_| None).await;
    let c = RegistryClient::new(opts("mock", &server.url())).unwrap();
    // announced smaller than it is: the extra bytes reach the caller (its
    // size check refuses them) and no second request is made
    let got = drain(c.blob_stream("alice/foo", &dg(&sha256(&data)), 1_000))
        .await
        .unwrap();
    assert!(got.len() > 1_000 && data.starts_with(&got), "{}", got.len());
    assert_eq!(server.requests().len(), 1);
}
