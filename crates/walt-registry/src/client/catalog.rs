//! Listing a registry: the repository catalog and the tags of a repository,
//! both following `Link: <...>; rel="next"` pagination.

use std::collections::HashSet;

use reqwest::Url;
use reqwest::header;
use serde::Deserialize;

use super::{MAX_SMALL_BODY, ReadError, RegistryClient, Req, SMALL_REQUEST_TIMEOUT, read_limited};
use crate::error::RegistryError;

/// Entries asked for per page (registries may ignore it).
const PAGE_SIZE: u32 = 100;
/// Largest page body accepted.
const MAX_PAGE_SIZE: u64 = 8 * MAX_SMALL_BODY;
/// Stop after this many pages (a registry looping on its `Link`).
const MAX_PAGES: usize = 100_000;

#[derive(Deserialize)]
struct CatalogPage {
    #[serde(default)]
    repositories: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct TagsPage {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

impl RegistryClient {
    /// Every repository of the registry (`GET /v2/_catalog`, all pages).
    /// For a JFrog repository (`catalog_repository`), as WalT reads it:
    /// `GET /v2/<repository>/_catalog`, each name given as
    /// `<repository>/<name>`.
    pub async fn catalog(&self) -> Result<Vec<String>, RegistryError> {
        let mut out = Vec::new();
        let (first, prefix) = match &self.inner.catalog_repository {
            Some(r) => (format!("/v2/{r}/_catalog"), format!("{r}/")),
            None => ("/v2/_catalog".to_string(), String::new()),
        };
        self.paginate(
            &first,
            None,
            "the repository catalog",
            "the repository catalog",
            |bytes| {
                let page: CatalogPage = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
                let names = page.repositories.unwrap_or_default();
                if prefix.is_empty() {
                    out.extend(names);
                } else {
                    out.extend(names.into_iter().map(|n| format!("{prefix}{n}")));
                }
                Ok(())
            },
        )
        .await?;
        Ok(out)
    }

    /// Every tag of `repo` (`GET /v2/<repo>/tags/list`, all pages); `"tags":
    /// null` means none.
    pub async fn tags(&self, repo: &str) -> Result<Vec<String>, RegistryError> {
        self.check_repo(repo)?;
        let mut out = Vec::new();
        self.paginate(
            &format!("/v2/{repo}/tags/list"),
            Some(repo),
            &format!("the tags of {repo}"),
            &format!("repository '{repo}'"),
            |bytes| {
                let page: TagsPage = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
                out.extend(page.tags.unwrap_or_default());
                Ok(())
            },
        )
        .await?;
        Ok(out)
    }

    /// GETs `first?n=100`, then every `rel="next"` page, handing each body
    /// to `on_page`.
    async fn paginate(
        &self,
        first: &str,
        repo: Option<&str>,
        what: &str,
        not_found: &str,
        mut on_page: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), RegistryError> {
        let mut path = format!("{first}?n={PAGE_SIZE}");
        let mut seen = HashSet::new();
        for _ in 0..MAX_PAGES {
            seen.insert(path.clone());
            let req = Req {
                path: path.clone(),
                repo,
                accept: Some("application/json".into()),
                range_from: None,
                timeout: Some(SMALL_REQUEST_TIMEOUT),
                what: what.to_string(),
                ..Default::default()
            };
            let mut attempt = 0;
            let (body, next) = loop {
                let resp = self.send(&req).await?;
                if !resp.status().is_success() {
                    return Err(self.status_error(resp, &req, not_found).await);
                }
                let next = resp
                    .headers()
                    .get_all(header::LINK)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(next_link);
                match read_limited(resp, MAX_PAGE_SIZE).await {
                    Ok(b) => break (b, next),
                    Err(ReadError::TooLarge) => {
                        return Err(RegistryError::TooLarge {
                            label: self.inner.label.clone(),
                            what: what.to_string(),
                            max: MAX_PAGE_SIZE,
                        });
                    }
                    Err(ReadError::Transport(e)) => {
                        let err = self.body_error(&e, what);
                        if self.should_retry(&err, attempt).await {
                            attempt += 1;
                            continue;
                        }
                        return Err(err);
                    }
                }
            };
            on_page(&body)
                .map_err(|reason| self.protocol(what, format!("not valid JSON: {reason}")))?;
            let Some(next) = next else {
                return Ok(());
            };
            let next = self
                .link_path(&next)
                .ok_or_else(|| self.protocol(what, format!("unusable pagination link '{next}'")))?;
            if seen.contains(&next) {
                // A registry pointing back to a page already read: done.
                return Ok(());
            }
            path = next;
        }
        Err(self.protocol(what, format!("more than {MAX_PAGES} pages")))
    }

    /// The path (below the base URL) of a pagination link, which may be
    /// relative or absolute; links to another origin are refused.
    fn link_path(&self, link: &str) -> Option<String> {
        let base = Url::parse(&format!("{}/", self.inner.base_url)).ok()?;
        let url = base.join(link).ok()?;
        if url.origin() != base.origin() {
            return None;
        }
        let prefix = base.path().trim_end_matches('/');
        let path = url.path().strip_prefix(prefix)?;
        if !path.starts_with("/v2/") {
            return None;
        }
        Some(match url.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        })
    }
}

/// The target of the `rel="next"` link of a `Link` header value, if any.
fn next_link(value: &str) -> Option<String> {
    let mut rest = value;
    loop {
        let start = rest.find('<')?;
        let end = start + rest[start..].find('>')?;
        let target = &rest[start + 1..end];
        let after = &rest[end + 1..];
        // Parameters run up to the next link.
        let params_end = after.find('<').unwrap_or(after.len());
        let is_next = after[..params_end].split(';').any(|p| {
            let p = p.trim().trim_end_matches(',').trim();
            p.split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("rel")
                    && v.trim()
                        .trim_matches('"')
                        .split_ascii_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("next"))
            })
        });
        if is_next {
            return Some(target.trim().to_string());
        }
        rest = &after[params_end..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientOptions;

    #[test]
    fn link_header() {
        assert_eq!(
            next_link(r#"</v2/_catalog?last=b&n=100>; rel="next""#).as_deref(),
            Some("/v2/_catalog?last=b&n=100")
        );
        assert_eq!(
            next_link(r#"<http://x/a>; rel="prev", <http://x/b>; rel=next"#).as_deref(),
            Some("http://x/b")
        );
        assert_eq!(next_link(r#"</v2/x>; rel="prev""#), None);
        assert_eq!(next_link("garbage"), None);
    }

    #[test]
    fn link_paths() {
        let c = RegistryClient::new(ClientOptions::new("r", "http://127.0.0.1:5000")).unwrap();
        assert_eq!(
            c.link_path("/v2/_catalog?last=a%2Fb&n=100").as_deref(),
            Some("/v2/_catalog?last=a%2Fb&n=100")
        );
        assert_eq!(
            c.link_path("http://127.0.0.1:5000/v2/a/tags/list?last=v1")
                .as_deref(),
            Some("/v2/a/tags/list?last=v1")
        );
        assert_eq!(c.link_path("http://evil.example/v2/_catalog"), None);
        assert_eq!(c.link_path("/other"), None);
    }
}
