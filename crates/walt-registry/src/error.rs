//! Errors of the registry client: one clear line each, naming the registry.

use std::error::Error as StdError;
use walt_core::Digest;

/// A failure talking to a registry. Every message names the registry label
/// and never contains a password or an `Authorization` header value.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Invalid client configuration (bad CA file, ...).
    #[error("registry '{label}': {reason}")]
    Config { label: String, reason: String },

    /// The connection could not be established (refused, DNS, reset...).
    #[error("registry '{label}' ({url}) is unreachable: {reason}")]
    Unreachable {
        label: String,
        url: String,
        reason: String,
    },

    /// Connect, read or total timeout.
    #[error("registry '{label}' ({url}) timed out: {reason}")]
    Timeout {
        label: String,
        url: String,
        reason: String,
    },

    /// TLS handshake or certificate verification failure.
    #[error(
        "registry '{label}': TLS error: {reason} (certificate not trusted? use protocol https-no-verify or set ca-file)"
    )]
    Tls { label: String, reason: String },

    /// 401 and no credentials were given.
    #[error("registry '{label}' requires credentials")]
    CredentialsRequired { label: String },

    /// 401 after sending credentials.
    #[error("registry '{label}': authentication failed (wrong username or password?)")]
    Unauthorized { label: String },

    /// 403: the credentials are valid but do not give access.
    #[error("registry '{label}': access denied to {what}{}", fmt_message(.message))]
    Denied {
        label: String,
        what: String,
        message: Option<String>,
    },

    /// 404 (or a registry error code meaning "unknown").
    #[error("registry '{label}': {what} not found{}", fmt_message(.message))]
    NotFound {
        label: String,
        what: String,
        message: Option<String>,
    },

    /// 5xx, after retries.
    #[error("registry '{label}': server error {status} on {method} {path}{}", fmt_message(.message))]
    Server {
        label: String,
        status: u16,
        method: String,
        path: String,
        message: Option<String>,
    },

    /// Any other unexpected HTTP status (429 included, after retries).
    #[error("registry '{label}': unexpected status {status} on {method} {path}{}", fmt_message(.message))]
    Http {
        label: String,
        status: u16,
        method: String,
        path: String,
        message: Option<String>,
    },

    /// Content does not hash to the expected digest.
    #[error("registry '{label}': {what} does not match digest {expected} (got {actual})")]
    DigestMismatch {
        label: String,
        what: String,
        expected: Digest,
        actual: Digest,
    },

    /// A small blob or manifest larger than allowed.
    #[error("registry '{label}': {what} is larger than {max} bytes")]
    TooLarge {
        label: String,
        what: String,
        max: u64,
    },

    /// The body stopped before its end (connection reset, idle timeout...).
    #[error("registry '{label}': download of {what} was cut short: {reason}")]
    Interrupted {
        label: String,
        what: String,
        reason: String,
    },

    /// A blob download kept breaking: resumed as often as the retry policy
    /// allows, it still ended before its announced size.
    #[error(
        "registry '{label}': blob {digest} is truncated: received {received} of {expected} bytes ({reason})"
    )]
    Truncated {
        label: String,
        digest: Digest,
        received: u64,
        expected: u64,
        reason: String,
    },

    /// The registry answered something that does not follow the protocol.
    #[error("registry '{label}': invalid response for {what}: {reason}")]
    Protocol {
        label: String,
        what: String,
        reason: String,
    },

    /// A caller-supplied argument is invalid (e.g. a malformed digest).
    #[error("registry '{label}': {reason}")]
    InvalidArgument { label: String, reason: String },
}

fn fmt_message(m: &Option<String>) -> String {
    match m {
        Some(m) if !m.is_empty() => format!(" ({m})"),
        _ => String::new(),
    }
}

impl RegistryError {
    /// Whether retrying the same request later may succeed: connection
    /// errors, timeouts, 5xx, 429, a body cut short.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. }
            | RegistryError::Timeout { .. }
            | RegistryError::Server { .. }
            | RegistryError::Interrupted { .. } => true,
            RegistryError::Http { status, .. } => *status == 429,
            _ => false,
        }
    }

    /// The registry label this error is about.
    pub fn label(&self) -> &str {
        match self {
            RegistryError::Config { label, .. }
            | RegistryError::Unreachable { label, .. }
            | RegistryError::Timeout { label, .. }
            | RegistryError::Tls { label, .. }
            | RegistryError::CredentialsRequired { label }
            | RegistryError::Unauthorized { label }
            | RegistryError::Denied { label, .. }
            | RegistryError::NotFound { label, .. }
            | RegistryError::Server { label, .. }
            | RegistryError::Http { label, .. }
            | RegistryError::DigestMismatch { label, .. }
            | RegistryError::TooLarge { label, .. }
            | RegistryError::Interrupted { label, .. }
            | RegistryError::Truncated { label, .. }
            | RegistryError::Protocol { label, .. }
            | RegistryError::InvalidArgument { label, .. } => label,
        }
    }

    /// True for "not found" answers.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RegistryError::NotFound { .. })
    }
}

/// One entry of an OCI distribution error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

/// Parses `{"errors":[{"code":..,"message":..,"detail":..}]}`; empty when
/// the body is not such a document.
pub fn parse_error_body(body: &[u8]) -> Vec<ApiError> {
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(default)]
        errors: Option<Vec<Entry>>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        code: Option<String>,
        #[serde(default)]
        message: Option<String>,
    }
    let Ok(b) = serde_json::from_slice::<Body>(body) else {
        return Vec::new();
    };
    b.errors
        .unwrap_or_default()
        .into_iter()
        .map(|e| ApiError {
            code: e.code.unwrap_or_default(),
            message: e.message.unwrap_or_default(),
        })
        .collect()
}

/// A one-line summary of an error body: the messages (or codes) of the
/// errors, or a short printable excerpt of a non-JSON body.
pub fn summarize_error_body(body: &[u8]) -> Option<String> {
    let errors = parse_error_body(body);
    if !errors.is_empty() {
        let parts: Vec<String> = errors
            .iter()
            .map(|e| {
                if e.message.is_empty() {
                    e.code.to_lowercase().replace('_', " ")
                } else {
                    e.message.clone()
                }
            })
            .filter(|s| !s.trim().is_empty())
            .collect();
        return (!parts.is_empty()).then(|| one_line(&parts.join("; "), 300));
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() || text.starts_with('<') {
        // empty or an HTML error page: not useful on one line
        return None;
    }
    Some(one_line(text, 200))
}

/// Collapses whitespace and truncates to `max` characters.
pub(crate) fn one_line(s: &str, max: usize) -> String {
    let mut out = String::new();
    for word in s.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    if out.chars().count() > max {
        out = out.chars().take(max).collect::<String>() + "...";
    }
    out
}

/// What kind of transport failure a reqwest error is.
pub(crate) enum TransportKind {
    Tls(String),
    Timeout(String),
    Connect(String),
    Body(String),
    Other(String),
}

/// Looks through the source chain of a transport error.
pub(crate) fn classify_transport(err: &reqwest::Error) -> TransportKind {
    if let Some(tls) = find_rustls_error(err) {
        return TransportKind::Tls(tls);
    }
    let cause = innermost_reason(err);
    if err.is_timeout() {
        return TransportKind::Timeout(cause);
    }
    if err.is_connect() {
        return TransportKind::Connect(cause);
    }
    if err.is_body() || err.is_decode() {
        return TransportKind::Body(cause);
    }
    // Errors while sending (connection reset before any response) are
    // reported as request errors: transient as well.
    if err.is_request() {
        return TransportKind::Connect(cause);
    }
    TransportKind::Other(cause)
}

fn find_rustls_error(err: &(dyn StdError + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r.to_string());
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            // io::Error::source() skips the wrapped error itself.
            if let Some(inner) = io.get_ref()
                && let Some(found) = find_rustls_error(inner)
            {
                return Some(found);
            }
        }
        cur = e.source();
    }
    None
}

/// A short, lowercase reason from the deepest meaningful error of the chain.
pub fn innermost_reason(err: &(dyn StdError + 'static)) -> String {
    let mut cur: &(dyn StdError + 'static) = err;
    let mut io_kind = None;
    loop {
        if let Some(io) = cur.downcast_ref::<std::io::Error>() {
            io_kind = Some(io.kind());
        }
        match cur.source() {
            Some(next) => cur = next,
            None => break,
        }
    }
    use std::io::ErrorKind as K;
    match io_kind {
        Some(K::ConnectionRefused) => return "connection refused".into(),
        Some(K::ConnectionReset) => return "connection reset by peer".into(),
        Some(K::ConnectionAborted) => return "connection aborted".into(),
        Some(K::TimedOut) => return "timed out".into(),
        Some(K::UnexpectedEof) => return "connection closed before the end of the data".into(),
        _ => {}
    }
    let text = cur.to_string();
    let text = text.trim();
    let text = if text.is_empty() {
        err.to_string()
    } else {
        text.to_string()
    };
    // Strip reqwest's URL suffix, if any, and make it one line.
    one_line(&text, 300)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body() {
        let b = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"v1"}}]}"#;
        let e = parse_error_body(b);
        assert_eq!(
            e,
            vec![ApiError {
                code: "MANIFEST_UNKNOWN".into(),
                message: "manifest unknown".into()
            }]
        );
        assert_eq!(summarize_error_body(b).as_deref(), Some("manifest unknown"));
        let two = br#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"},{"code":"DENIED"}]}"#;
        assert_eq!(
            summarize_error_body(two).as_deref(),
            Some("repository name not known to registry; denied")
        );
        assert!(parse_error_body(b"not json").is_empty());
        assert!(parse_error_body(br#"{"errors":null}"#).is_empty());
        assert_eq!(
            summarize_error_body(b"  plain\n text ").as_deref(),
            Some("plain text")
        );
        assert_eq!(summarize_error_body(b"<html><body>x</body></html>"), None);
        assert_eq!(summarize_error_body(b""), None);
    }

    #[test]
    fn transient() {
        let l = || "r".to_string();
        assert!(
            RegistryError::Server {
                label: l(),
                status: 502,
                method: "GET".into(),
                path: "/v2/".into(),
                message: None
            }
            .is_transient()
        );
        let http = |status| RegistryError::Http {
            label: l(),
            status,
            method: "GET".into(),
            path: "/v2/".into(),
            message: None,
        };
        assert!(http(429).is_transient());
        assert!(!http(400).is_transient());
        assert!(
            RegistryError::Unreachable {
                label: l(),
                url: "u".into(),
                reason: "connection refused".into()
            }
            .is_transient()
        );
        assert!(
            RegistryError::Interrupted {
                label: l(),
                what: "x".into(),
                reason: "reset".into()
            }
            .is_transient()
        );
        assert!(!RegistryError::Unauthorized { label: l() }.is_transient());
        assert!(!RegistryError::CredentialsRequired { label: l() }.is_transient());
        assert!(
            !RegistryError::NotFound {
                label: l(),
                what: "x".into(),
                message: None
            }
            .is_transient()
        );
        assert!(
            !RegistryError::Tls {
                label: l(),
                reason: "x".into()
            }
            .is_transient()
        );
    }

    #[test]
    fn messages() {
        let e = RegistryError::NotFound {
            label: "local".into(),
            what: "repository 'alice/foo' or tag 'v1'".into(),
            message: Some("manifest unknown".into()),
        };
        assert_eq!(
            e.to_string(),
            "registry 'local': repository 'alice/foo' or tag 'v1' not found (manifest unknown)"
        );
        let e = RegistryError::Unreachable {
            label: "local".into(),
            url: "http://127.0.0.1:5000".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(
            e.to_string(),
            "registry 'local' (http://127.0.0.1:5000) is unreachable: connection refused"
        );
    }
}
