//! Clone URLs: `<location>:<user>/<name>[:<tag>]`.

use std::fmt;

use crate::name::is_valid_user;

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// This server's store (other users' images).
    Walt,
    /// The server's Docker daemon.
    Docker,
    /// Docker Hub.
    Hub,
    /// A configured registry, by label.
    Registry(String),
}

impl Location {
    pub fn label(&self) -> &str {
        match self {
            Location::Walt => "walt",
            Location::Docker => "docker",
            Location::Hub => "hub",
            Location::Registry(l) => l,
        }
    }
}

/// Why a clone URL was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error(
        "malformed clone URL '{0}': expected <location>:<user>/<name>[:<tag>], e.g. hub:waltplatform/rpi-default"
    )]
    Malformed(String),
}

/// A parsed clone URL. `repository` is everything after `<user>/` (a
/// registry may hold nested paths); `tag` defaults to `latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneUrl {
    pub location: Location,
    pub user: String,
    pub repository: String,
    pub tag: String,
}

fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn valid_repo_component(s: &str) -> bool {
    // OCI distribution path component: [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = s.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or '-'+, followed by an alphanumeric.
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-')) {
            return false;
        }
    }
    true
}

fn valid_tag(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl CloneUrl {
    pub fn parse(input: &str) -> Result<Self, UrlError> {
        let bad = || UrlError::Malformed(input.to_string());
        let (loc, rest) = input.split_once(':').ok_or_else(bad)?;
        if !valid_label(loc) {
            return Err(bad());
        }
        let location = match loc {
            "walt" => Location::Walt,
            "docker" => Location::Docker,
            "hub" => Location::Hub,
            other => Location::Registry(other.to_string()),
        };
        let (user, path) = rest.split_once('/').ok_or_else(bad)?;
        if !is_valid_user(user) || !valid_repo_component(user) {
            return Err(bad());
        }
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) => (r, t),
            None => (path, "latest"),
        };
        if !valid_tag(tag)
            || repository.is_empty()
            || !repository.split('/').all(valid_repo_component)
        {
            return Err(bad());
        }
        Ok(Self {
            location,
            user: user.to_string(),
            repository: repository.to_string(),
            tag: tag.to_string(),
        })
    }

    /// `<user>/<repository>` as a registry path.
    pub fn path(&self) -> String {
        format!("{}/{}", self.user, self.repository)
    }

    /// The last path component: the image's own name.
    pub fn image_name(&self) -> &str {
        self.repository
            .rsplit('/')
            .next()
            .unwrap_or(&self.repository)
    }
}

impl fmt::Display for CloneUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.location.label(),
            self.user,
            self.repository
        )?;
        if self.tag != "latest" {
            write!(f, ":{}", self.tag)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let u = CloneUrl::parse("hub:waltplatform/rpi-default").unwrap();
        assert_eq!(u.location, Location::Hub);
        assert_eq!(u.path(), "waltplatform/rpi-default");
        assert_eq!(u.tag, "latest");
        assert_eq!(u.to_string(), "hub:waltplatform/rpi-default");
        let u = CloneUrl::parse("lab-reg:eve/img:v1.2").unwrap();
        assert_eq!(u.location, Location::Registry("lab-reg".into()));
        assert_eq!(u.to_string(), "lab-reg:eve/img:v1.2");
        let u = CloneUrl::parse("walt:bob/x:latest").unwrap();
        assert_eq!(u.to_string(), "walt:bob/x");
        assert_eq!(u.image_name(), "x");
        assert!(CloneUrl::parse("local:bob/my_img.x--y__z:V1.0").is_ok());
        let u = CloneUrl::parse("local:bob/team/x:2").unwrap();
        assert_eq!(u.image_name(), "x");
    }

    #[test]
    fn malformed() {
        for bad in [
            "",
            "hub",
            "hub:",
            "hub:user",
            "hub:/x",
            "HUB:u/x",
            "hub:u/",
            "hub:u/x:",
            "hub:u/X",
            "hub:u/x:a b",
            "a b:u/x",
            "hub:u/../x",
            "hub:u/.x",
            "hub:u/a..b",
            "hub:u/a_",
            "hub:../x",
            "hub:.u/x",
        ] {
            assert!(CloneUrl::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
