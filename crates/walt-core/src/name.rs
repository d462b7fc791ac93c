//! Image names: `<owner>/<name>:<tag>` inside, `<name>[:<tag>]` for users.

use std::fmt;

/// Why a name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error(
        "invalid image name '{0}': use lowercase letters, digits and '-' (optionally ':<tag>')"
    )]
    Invalid(String),
    #[error("image name '{0}' is reserved")]
    Reserved(String),
    #[error("empty image name")]
    Empty,
}

/// A fully qualified image name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageName {
    pub owner: String,
    pub name: String,
    pub tag: String,
}

/// True when `s` is a valid name or tag component: `[a-z0-9-]+`.
pub fn is_valid_component(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// True when `s` is a valid walt username (same rules as registry paths: `[a-z0-9._-]+`).
pub fn is_valid_user(s: &str) -> bool {
    s.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
}

/// Turns any string into the allowed characters: lowercase, `[a-z0-9-]`,
/// other characters replaced by `-`, runs of `-` collapsed, trimmed.
pub fn normalize_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

impl ImageName {
    /// Parses what a user types for one of their images: `name` or `name:tag`.
    pub fn parse_user(owner: &str, input: &str) -> Result<Self, NameError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(NameError::Empty);
        }
        let (name, tag) = match input.split_once(':') {
            Some((n, t)) => (n, t),
            None => (input, "latest"),
        };
        if !is_valid_component(name) || !is_valid_component(tag) {
            return Err(NameError::Invalid(input.to_string()));
        }
        if name == "default" {
            return Err(NameError::Reserved(name.to_string()));
        }
        Ok(Self {
            owner: owner.to_string(),
            name: name.to_string(),
            tag: tag.to_string(),
        })
    }

    /// Builds a name from remote parts, normalising them to the allowed
    /// characters. Returns the name and whether normalisation changed it.
    pub fn normalized(owner: &str, name: &str, tag: &str) -> Result<(Self, bool), NameError> {
        let n = normalize_component(name);
        let t = normalize_component(tag);
        if n.is_empty() || t.is_empty() {
            return Err(NameError::Invalid(format!("{name}:{tag}")));
        }
        let n = if n == "default" {
            "default-image".to_string()
        } else {
            n
        };
        let changed = n != name || t != tag;
        Ok((
            Self {
                owner: owner.to_string(),
                name: n,
                tag: t,
            },
            changed,
        ))
    }

    /// The name as its owner types it: `name`, or `name:tag` unless the tag is `latest`.
    pub fn short(&self) -> String {
        if self.tag == "latest" {
            self.name.clone()
        } else {
            format!("{}:{}", self.name, self.tag)
        }
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_user_names() {
        let n = ImageName::parse_user("alice", "rpi-img").unwrap();
        assert_eq!((n.name.as_str(), n.tag.as_str()), ("rpi-img", "latest"));
        assert_eq!(n.short(), "rpi-img");
        let n = ImageName::parse_user("alice", "img:v2").unwrap();
        assert_eq!(n.short(), "img:v2");
        assert_eq!(n.to_string(), "alice/img:v2");
        assert!(matches!(
            ImageName::parse_user("a", "Img"),
            Err(NameError::Invalid(_))
        ));
        assert!(matches!(
            ImageName::parse_user("a", "a_b"),
            Err(NameError::Invalid(_))
        ));
        assert!(matches!(
            ImageName::parse_user("a", "x:"),
            Err(NameError::Invalid(_))
        ));
        assert!(matches!(
            ImageName::parse_user("a", "default"),
            Err(NameError::Reserved(_))
        ));
        assert_eq!(ImageName::parse_user("a", " "), Err(NameError::Empty));
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalize_component("My_Image.v1"), "my-image-v1");
        assert_eq!(normalize_component("--a__b--"), "a-b");
        let (n, changed) = ImageName::normalized("u", "Deb_Img", "V1.0").unwrap();
        assert_eq!(n.short(), "deb-img:v1-0");
        assert!(changed);
        let (_, changed) = ImageName::normalized("u", "img", "latest").unwrap();
        assert!(!changed);
        assert!(ImageName::normalized("u", "___", "latest").is_err());
    }
}
