//! TLS for the walt API channel.
//!
//! walt-server presents a self-signed certificate (ECDSA P-256) kept with
//! its key in a directory (`/etc/walt/tls` by default); clients trust it by
//! its SHA-256 fingerprint, pinned on first use as ssh does with host keys.
//! The handshake signature is still checked against the certificate's key,
//! so a peer that only copied the certificate cannot pass for the server.

#[cfg(feature = "generate")]
mod files;

#[cfg(feature = "generate")]
pub use files::{Identity, TlsDirError, create, load_or_create, write_files};

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

/// The certificate file in a TLS directory (PEM, mode 0644).
pub const CERT_FILE: &str = "cert.pem";
/// The private key file in a TLS directory (PEM PKCS#8, mode 0600).
pub const KEY_FILE: &str = "key.pem";

/// The SHA-256 digest of a certificate (its DER encoding), written
/// `SHA256:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn of(cert_der: &[u8]) -> Self {
        Self(Sha256::digest(cert_der).into())
    }

    /// The fingerprint of the first certificate of a PEM text.
    pub fn of_pem(pem: &[u8]) -> Result<Self, String> {
        CertificateDer::from_pem_slice(pem)
            .map(|c| Self::of(&c))
            .map_err(|e| format!("not a PEM certificate: {e}"))
    }

    /// The fingerprint of the certificate in TLS directory `dir`; None when
    /// there is no certificate there.
    pub fn of_dir(dir: &Path) -> Result<Option<Self>, String> {
        let path = dir.join(CERT_FILE);
        match std::fs::read(&path) {
            Ok(pem) => Self::of_pem(&pem)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SHA256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = String;

    /// `SHA256:` and 64 hex digits (colons between bytes allowed, as
    /// `openssl x509 -fingerprint -sha256` prints them).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a certificate fingerprint (SHA256: and 64 hex digits)");
        let hex_part = s.trim().strip_prefix("SHA256:").ok_or_else(bad)?;
        let digits: String = hex_part.chars().filter(|c| *c != ':').collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(&digits, &mut out).map_err(|_| bad())?;
        Ok(Self(out))
    }
}

/// How a client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// In clear (a server started with `--plaintext`).
    Plaintext,
    /// TLS, the server's certificate being the pinned one; `None`: first
    /// use, any certificate is accepted and reported (to be pinned).
    Tls(Option<Fingerprint>),
}

/// A connection made.
pub struct Connected {
    pub channel: Channel,
    /// The certificate the server presented (None in clear).
    pub presented: Option<Fingerprint>,
}

/// Why no connection was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("'{0}' is not a usable server address")]
    Address(String),
    /// The server presents another certificate than the pinned one.
    #[error("the server presents certificate {presented}, not the pinned {pinned}")]
    Mismatch {
        pinned: Fingerprint,
        presented: Fingerprint,
    },
    /// TCP connected, but no TLS session: most likely a server in clear.
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    /// The innermost cause ("Connection refused (os error 111)").
    #[error("{0}")]
    Unreachable(String),
}

/// Accepts exactly one certificate (or, on first use, any), and checks
/// the handshake signatures with the presented certificate's key.
#[derive(Debug)]
struct PinVerifier {
    pin: Option<Fingerprint>,
    presented: Mutex<Option<Fingerprint>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = Fingerprint::of(end_entity);
        *self.presented.lock().unwrap_or_else(|e| e.into_inner()) = Some(fp);
        match self.pin {
            Some(pin) if pin != fp => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The ring provider (the only one built in), with AES-128-GCM first: the
/// API channel carries whole images (cp, builds), and AES-128 encrypts them
/// with 10 rounds instead of AES-256's 14. The server follows the client's
/// order, and AES-128-GCM is TLS 1.3's mandatory suite.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// The client side of the API channel: TLS 1.3 only, the certificate
/// checked by `verifier`, ALPN h2.
fn client_config(
    provider: Arc<CryptoProvider>,
    verifier: Arc<PinVerifier>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// What the connector saw, read back when the connection failed.
#[derive(Default)]
struct Attempt {
    handshake_error: Option<String>,
}

fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

/// Connects to `uri` (`http://host:port`), in clear or over TLS with the
/// pinned certificate; gives up after `timeout`.
/// HTTP/2 flow-control window of one call (bytes the peer may send
/// before the receiver reads them), on the server and the client.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// The same for a whole connection.
pub const CONNECTION_WINDOW: u32 = 8 << 20;
/// Largest HTTP/2 frame the server accepts (16 KiB by default: a 256 KiB
/// chunk of an archive then takes 16 frames).
pub const MAX_FRAME: u32 = 1 << 20;

pub async fn connect(
    uri: &str,
    transport: Transport,
    timeout: Duration,
) -> Result<Connected, ConnectError> {
    let endpoint = Endpoint::from_shared(uri.to_string())
        .map_err(|_| ConnectError::Address(uri.to_string()))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        // Archives stream both ways (cp, build contexts): windows large
        // enough that the sender is not waiting for the receiver's
        // updates every few frames.
        .initial_stream_window_size(crate::STREAM_WINDOW)
        .initial_connection_window_size(crate::CONNECTION_WINDOW);
    let pin = match transport {
        Transport::Plaintext => {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| ConnectError::Unreachable(innermost(&e)))?;
            return Ok(Connected {
                channel,
                presented: None,
            });
        }
        Transport::Tls(pin) => pin,
    };
    let provider = provider();
    let verifier = Arc::new(PinVerifier {
        pin,
        presented: Mutex::new(None),
        algorithms: provider.signature_verification_algorithms,
    });
    let config = client_config(provider, verifier.clone())
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    let attempt = Arc::new(Mutex::new(Attempt::default()));
    let seen = attempt.clone();
    let connector = tower::service_fn(move |uri: Uri| {
        let (tls, seen) = (tls.clone(), seen.clone());
        async move {
            let host = uri.host().unwrap_or_default();
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(12345);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            // The name is not checked (the pin is), rustls needs one.
            let name = ServerName::try_from(host)
                .unwrap_or_else(|_| ServerName::try_from("walt-server").expect("a valid name"));
            match tls.connect(name, tcp).await {
                Ok(stream) => Ok(hyper_util::rt::TokioIo::new(stream)),
                Err(e) => {
                    seen.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .handshake_error = Some(innermost(&e));
                    Err(e)
                }
            }
        }
    });
    let result = tokio::time::timeout(timeout, endpoint.connect_with_connector(connector)).await;
    let presented = *verifier.presented.lock().unwrap_or_else(|e| e.into_inner());
    let channel = match result {
        Ok(Ok(channel)) => channel,
        Ok(Err(e)) => {
            if let (Some(pinned), Some(presented)) = (pin, presented)
                && pinned != presented
            {
                return Err(ConnectError::Mismatch { pinned, presented });
            }
            let handshake = attempt
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .handshake_error
                .take();
            return Err(match handshake {
                Some(h) => ConnectError::Handshake(h),
                None => ConnectError::Unreachable(innermost(&e)),
            });
        }
        Err(_) => {
            return Err(ConnectError::Unreachable(format!(
                "no answer within {} s",
                timeout.as_secs()
            )));
        }
    };
    Ok(Connected { channel, presented })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_round_trip() {
        let fp = Fingerprint::of(b"cert");
        let s = fp.to_string();
        assert!(s.starts_with("SHA256:") && s.len() == 7 + 64, "{s}");
        assert_eq!(s.parse::<Fingerprint>().unwrap(), fp);
        let colons = format!(
            "SHA256:{}",
            hex::encode_upper(fp.0)
                .as_bytes()
                .chunks(2)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join(":")
        );
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), fp);
        assert!("SHA256:abcd".parse::<Fingerprint>().is_err());
        assert!(hex::encode(fp.0).parse::<Fingerprint>().is_err());
    }

    /// The client's configuration against a server configured as tonic's
    /// acceptor is (ring's default provider, the server's own order not
    /// imposed): the handshake settles on AES-128-GCM.
    #[test]
    fn the_api_channel_negotiates_aes_128_gcm() {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let cert = rcgen::generate_simple_self_signed(vec!["walt-server".into()]).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der())),
        )
        .unwrap();
        let provider = provider();
        let verifier = Arc::new(PinVerifier {
            pin: None,
            presented: Mutex::new(None),
            algorithms: provider.signature_verification_algorithms,
        });
        let client = client_config(provider, verifier.clone()).unwrap();
        let mut c = rustls::ClientConnection::new(
            Arc::new(client),
            ServerName::try_from("walt-server").unwrap(),
        )
        .unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..10 {
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            s.read_tls(&mut wire.as_slice()).unwrap();
            s.process_new_packets().unwrap();
            let mut back = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut back).unwrap();
            }
            c.read_tls(&mut back.as_slice()).unwrap();
            c.process_new_packets().unwrap();
        }
        assert!(!c.is_handshaking(), "the handshake did not finish");
        let suite = c.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(s.negotiated_cipher_suite().unwrap().suite(), suite);
        // The certificate was seen (and would be pinned).
        assert!(verifier.presented.lock().unwrap().is_some());
    }
}
