//! `WWW-Authenticate` parsing and the authentication state of a client.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

/// Registry credentials. `Debug` does not print the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased scheme (`basic`, `bearer`, ...).
    pub scheme: String,
    /// Parameters in order; names lowercased, values unquoted.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// First value of parameter `name` (lowercase).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// All values of parameter `name` (e.g. several `scope`s).
    pub fn params_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.params
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// Parses a `WWW-Authenticate` header value (RFC 9110 §11.6.1): one or
/// more challenges, each a scheme followed by comma-separated auth-params
/// whose values may be quoted strings containing commas and escapes.
/// A token68 after the scheme is skipped.
pub fn parse_www_authenticate(header: &str) -> Vec<Challenge> {
    let chars: Vec<char> = header.chars().collect();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && (chars[*i] == ' ' || chars[*i] == '\t') {
            *i += 1;
        }
    };
    while i < chars.len() {
        // separators between items
        while i < chars.len() && (chars[i] == ',' || chars[i] == ' ' || chars[i] == '\t') {
            i += 1;
        }
        if i >= chars.len() {
            break;
        }
        let start = i;
        while i < chars.len() && is_tchar(chars[i]) {
            i += 1;
        }
        if i == start {
            // garbage character: skip it
            i += 1;
            continue;
        }
        let token: String = chars[start..i].iter().collect();
        let after_token = i;
        skip_ws(&mut i);
        let is_param = i < chars.len() && chars[i] == '=' && !out.is_empty() && {
            // "name=value" (not a token68 ending in '=' like "abc==")
            let mut j = i + 1;
            while j < chars.len() && chars[j] == '=' {
                j += 1;
            }
            j == i + 1
        };
        // A token directly followed by '=' right after a scheme whose
        // params are still empty could be a token68; treat "x=" followed
        // by a value as a param, and "x==" / "x=" at end as a token68.
        if is_param {
            i += 1; // '='
            skip_ws(&mut i);
            let value = if i < chars.len() && chars[i] == '"' {
                i += 1;
                let mut v = String::new();
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        i += 1;
                    }
                    v.push(chars[i]);
                    i += 1;
                }
                i += 1; // closing quote (or past the end)
                v
            } else {
                let vs = i;
                while i < chars.len() && chars[i] != ',' && chars[i] != ' ' && chars[i] != '\t' {
                    i += 1;
                }
                chars[vs..i].iter().collect()
            };
            if let Some(last) = out.last_mut() {
                last.params.push((token.to_ascii_lowercase(), value));
            }
        } else if i < chars.len() && chars[i] == '=' {
            // token68 (e.g. "abc==" after the scheme): skip it
            while i < chars.len() && chars[i] == '=' {
                i += 1;
            }
        } else {
            // a new challenge
            i = after_token;
            out.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: Vec::new(),
            });
        }
    }
    out
}

/// What a client may do with a token realm a registry names in its
/// Bearer challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RealmPolicy {
    /// Basic credentials may go to the realm.
    pub credentials: bool,
    /// The realm must be reached with certificate verification although
    /// the registry itself is not verified (`https-no-verify`).
    pub verify_separately: bool,
    /// Why credentials may not go there (when they may not).
    pub why_not: &'static str,
}

/// Where Basic credentials may go: to a realm over https with certificate
/// verification, or to the registry's own host when the registry itself
/// is reached so (plain `http`, or `https-no-verify`: the admin chose to
/// trust that host). A realm on another host under `https-no-verify` is
/// verified and gets no credentials; a plain-http realm gets none unless
/// it is the `http` registry's own host.
pub(crate) fn realm_policy(
    registry: &reqwest::Url,
    verify_tls: bool,
    realm: &reqwest::Url,
) -> RealmPolicy {
    let same_host = match (registry.host(), realm.host()) {
        (Some(a), Some(b)) => a.to_string().eq_ignore_ascii_case(&b.to_string()),
        _ => false,
    };
    let registry_https = registry.scheme() == "https";
    let ok = RealmPolicy {
        credentials: true,
        verify_separately: false,
        why_not: "",
    };
    let refuse = |verify_separately, why_not| RealmPolicy {
        credentials: false,
        verify_separately,
        why_not,
    };
    match (realm.scheme(), registry_https, verify_tls) {
        ("https", true, false) if same_host => ok,
        ("https", true, false) => refuse(
            true,
            "https-no-verify applies to the registry's own host, and the token server is on another one",
        ),
        ("https", _, _) => ok,
        ("http", false, _) if same_host => ok,
        ("http", _, _) => refuse(
            false,
            if registry_https {
                "plain http"
            } else {
                "plain http, on another host than the registry"
            },
        ),
        _ => refuse(false, "not an http(s) URL"),
    }
}

/// What the client knows about how this registry authenticates.
#[derive(Debug, Default)]
pub(crate) struct AuthState {
    pub scheme: KnownScheme,
    /// Bearer tokens per request scope key ("" for /v2/).
    pub tokens: HashMap<String, CachedToken>,
}

#[derive(Debug, Default, Clone)]
pub(crate) enum KnownScheme {
    #[default]
    Unknown,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

#[derive(Clone)]
pub(crate) struct CachedToken {
    pub token: String,
    pub expires: Instant,
}

impl fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedToken")
            .field("token", &"<hidden>")
            .field("expires", &self.expires)
            .finish()
    }
}

/// The token endpoint's answer.
#[derive(serde::Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token and how long to keep it (a bit less than announced).
    pub fn into_cached(self) -> Option<CachedToken> {
        let token = self
            .token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))?;
        // The spec's default lifetime is 60 s; keep a margin for clock
        // skew and request latency.
        let secs = self.expires_in.unwrap_or(60).max(1);
        let keep = if secs > 30 {
            secs - 15
        } else {
            secs.div_ceil(2)
        };
        Some(CachedToken {
            token,
            expires: Instant::now() + Duration::from_secs(keep),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer() {
        let c = parse_www_authenticate(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("service"), Some("registry.docker.io"));
        assert_eq!(
            c[0].param("scope"),
            Some("repository:library/ubuntu:pull,push")
        );
    }

    #[test]
    fn basic_and_multiple() {
        let c = parse_www_authenticate(r#"Basic realm="test""#);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("test"));

        let c = parse_www_authenticate(
            r#"Bearer realm="https://a/t", service=reg , error="invalid_token", Basic realm="x, y \"z\"""#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("service"), Some("reg"));
        assert_eq!(c[0].param("error"), Some("invalid_token"));
        assert_eq!(c[1].scheme, "basic");
        assert_eq!(c[1].param("realm"), Some(r#"x, y "z""#));

        let c =
            parse_www_authenticate(r#"bearer REALM=https://a/t,scope="a:b:pull",scope="c:d:pull""#);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://a/t"));
        assert_eq!(
            c[0].params_named("scope").collect::<Vec<_>>(),
            vec!["a:b:pull", "c:d:pull"]
        );

        // token68 and bare schemes
        let c = parse_www_authenticate("Negotiate abc==, Basic");
        assert_eq!(
            c.iter().map(|c| c.scheme.as_str()).collect::<Vec<_>>(),
            vec!["negotiate", "basic"]
        );
        assert!(parse_www_authenticate("").is_empty());
        // unterminated quote does not panic
        let c = parse_www_authenticate(r#"Bearer realm="abc"#);
        assert_eq!(c[0].param("realm"), Some("abc"));
    }

    #[test]
    fn credentials_debug_hides_password() {
        let c = Credentials::new("alice", "s3cret");
        let d = format!("{c:?}");
        assert!(d.contains("alice"));
        assert!(!d.contains("s3cret"));
    }

    #[test]
    fn token_response() {
        let t: TokenResponse =
            serde_json::from_str(r#"{"access_token":"abc","expires_in":300}"#).unwrap();
        let c = t.into_cached().unwrap();
        assert_eq!(c.token, "abc");
        assert!(c.expires > Instant::now() + Duration::from_secs(200));
        let t: TokenResponse = serde_json::from_str(r#"{"token":"x","access_token":"y"}"#).unwrap();
        assert_eq!(t.into_cached().unwrap().token, "x");
        let t: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert!(t.into_cached().is_none());
    }
    #[test]
    fn realm_policy_sends_credentials_only_where_trusted() {
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        let https = u("https://reg.example:5000");
        let http = u("http://reg.example:5000");
        let p =
            |reg: &reqwest::Url, verify: bool, realm: &str| realm_policy(reg, verify, &u(realm));
        // https registry, verified: any https realm, no http one
        assert!(p(&https, true, "https://auth.example/token").credentials);
        assert!(p(&https, true, "https://REG.example:443/token").credentials);
        assert!(!p(&https, true, "http://reg.example:5001/token").credentials);
        assert!(!p(&https, true, "http://auth.example/token").credentials);
        assert!(!p(&https, true, "https://auth.example/t").verify_separately);
        // https-no-verify: its own host only; another host is verified
        let own = p(&https, false, "https://reg.example:5001/token");
        assert!(own.credentials && !own.verify_separately);
        let other = p(&https, false, "https://auth.example/token");
        assert!(!other.credentials && other.verify_separately);
        assert!(other.why_not.contains("another"));
        assert!(!p(&https, false, "http://reg.example/token").credentials);
        // http registry: its own host over http, or https anywhere
        assert!(p(&http, true, "http://reg.example:5001/token").credentials);
        assert!(p(&http, true, "https://auth.example/token").credentials);
        let far = p(&http, true, "http://auth.example/token");
        assert!(!far.credentials && far.why_not.contains("another host"));
        // hosts compare exactly: a suffix or an IP does not match a name
        assert!(!p(&http, true, "http://reg.example.evil/token").credentials);
        assert!(!p(&http, true, "http://127.0.0.1/token").credentials);
        assert!(!p(&https, true, "ftp://auth.example/token").credentials);
    }
}
