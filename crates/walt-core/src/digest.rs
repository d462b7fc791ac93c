//! Content digests: `sha256:<64 lowercase hex>`, the only algorithm the
//! store addresses content by.
//!
//! A [`Digest`] is valid by construction, so a path built from its hex part
//! (`blobs/sha256/<hex>`) can never name anything outside its directory.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const PREFIX: &str = "sha256:";
const HEX_LEN: usize = 64;

/// A validated `sha256:<hex>` digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

/// Why a string is not a digest walt accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("'{0}' is not a digest (expected sha256:<64 hex digits>)")]
    Malformed(String),
    #[error("digest '{0}' uses an algorithm walt does not support (only sha256)")]
    Unsupported(String),
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let Some(hex) = s.strip_prefix(PREFIX) else {
            return Err(match s.split_once(':') {
                Some((alg, rest))
                    if !alg.is_empty()
                        && !rest.is_empty()
                        && alg
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"+._-".contains(&b)) =>
                {
                    DigestError::Unsupported(truncated(s))
                }
                _ => DigestError::Malformed(truncated(s)),
            });
        };
        if hex.len() == HEX_LEN && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Self(s.to_string()))
        } else {
            Err(DigestError::Malformed(truncated(s)))
        }
    }

    /// The digest of a finished sha256 hash.
    pub fn from_sha256(hash: [u8; 32]) -> Self {
        let mut s = String::with_capacity(PREFIX.len() + HEX_LEN);
        s.push_str(PREFIX);
        for b in hash {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        Self(s)
    }

    /// `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0[PREFIX.len()..]
    }

    /// The first 12 hex digits, as short image and layer ids are shown.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Error messages quote at most this much of a rejected string.
fn truncated(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl AsRef<str> for Digest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<String> for Digest {
    fn eq(&self, other: &String) -> bool {
        self.0 == *other
    }
}

impl PartialEq<&str> for Digest {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_sha256() {
        let d = Digest::parse(&format!("sha256:{H}")).unwrap();
        assert_eq!(d.hex(), H);
        assert_eq!(d.short(), "0123456789ab");
        assert_eq!(d.to_string(), format!("sha256:{H}"));
        assert_eq!(d, format!("sha256:{H}").as_str());
    }

    #[test]
    fn refuses_what_could_escape_or_is_not_sha256() {
        for bad in [
            "",
            "sha256:",
            "sha256:../../etc/passwd",
            &format!("sha256:{}", H.to_uppercase()),
            &format!("sha256:{H}0"),
            &format!("sha256:{}", &H[1..]),
            &format!("sha256:{H}/x"),
            "sha256:aa",
            "no-colon",
            ":abc",
        ] {
            assert!(
                matches!(Digest::parse(bad), Err(DigestError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            Digest::parse("sha512:abcd"),
            Err(DigestError::Unsupported("sha512:abcd".into()))
        );
    }

    #[test]
    fn long_input_is_quoted_truncated() {
        let long = "x".repeat(10_000);
        let e = Digest::parse(&long).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
    }

    #[test]
    fn from_hash_matches_hex_encoding() {
        let mut h = [0u8; 32];
        for (i, b) in h.iter_mut().enumerate() {
            *b = u8::try_from(i * 7 % 256).unwrap();
        }
        let d = Digest::from_sha256(h);
        let expected: String = h.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(d.hex(), expected);
        assert!(Digest::parse(d.as_str()).is_ok());
    }

    #[test]
    fn serde_round_trip_validates() {
        let d = Digest::parse(&format!("sha256:{H}")).unwrap();
        let j = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&j).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:../x\"").is_err());
    }
}
