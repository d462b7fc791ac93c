//! A stand-in for the Docker Hub's search API (`GET
//! /v2/search/repositories/?query=Q&page_size=N&page=P`), answered from the
//! catalog of a real local registry (the registry part of the "hub"). The
//! only stand-in of the project: the Hub's registry protocol is served by
//! the real `docker-registry`.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use crate::http::RegistryClient;

/// The search API server; stops on drop.
pub struct HubFixture {
    port: u16,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl HubFixture {
    /// Serves the catalog of `registry`, at most `max_page_size` results a
    /// page (whatever the client asks), so that clients must follow `next`.
    pub fn start(registry: RegistryClient, max_page_size: usize) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let (s, r) = (stop.clone(), requests.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        r.fetch_add(1, Ordering::SeqCst);
                        let registry = registry.clone();
                        std::thread::spawn(move || {
                            let _ = serve(conn, &registry, port, max_page_size.max(1));
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self {
            port,
            stop,
            requests,
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for HubFixture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn serve(conn: TcpStream, registry: &RegistryClient, port: u16, max: usize) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (status, body) = if method == "GET"
        && let Some(rest) = path.trim_end_matches('/').strip_prefix("/v2/repositories/")
    {
        listing(registry, port, max, path, rest, query)
    } else if method != "GET" || path.trim_end_matches('/') != "/v2/search/repositories" {
        ("404 Not Found", json!({"message": "not found"}))
    } else {
        let q = query_param(query, "query").unwrap_or("").to_string();
        let size: usize = query_param(query, "page_size")
            .and_then(|s| s.parse().ok())
            .unwrap_or(25)
            .clamp(1, max);
        let page: usize = query_param(query, "page")
            .and_then(|s| s.parse().ok())
            .unwrap_or(1)
            .max(1);
        match catalog(registry) {
            Ok(all) => {
                let hits: Vec<&String> = all.iter().filter(|r| r.contains(&q)).collect();
                let start = (page - 1) * size;
                let results: Vec<_> = hits
                    .iter()
                    .skip(start)
                    .take(size)
                    .map(|r| {
                        json!({
                            "repo_name": r,
                            "short_description": "",
                            "star_count": 0,
                            "pull_count": 0,
                            "repo_owner": "",
                            "is_automated": false,
                            "is_official": false,
                        })
                    })
                    .collect();
                let next = (start + size < hits.len()).then(|| {
                    format!(
                        "http://127.0.0.1:{port}/v2/search/repositories/?query={q}&page={}&page_size={size}",
                        page + 1
                    )
                });
                let previous = (page > 1).then(|| {
                    format!(
                        "http://127.0.0.1:{port}/v2/search/repositories/?query={q}&page={}&page_size={size}",
                        page - 1
                    )
                });
                (
                    "200 OK",
                    json!({"count": hits.len(), "next": next, "previous": previous, "results": results}),
                )
            }
            Err(e) => ("502 Bad Gateway", json!({"message": e.to_string()})),
        }
    };
    let body = serde_json::to_vec(&body)?;
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    conn.write_all(&body)?;
    conn.flush()?;
    Ok(())
}

/// The Hub's listings WalT's `update-hub-meta` reads (issue 15 item 9):
/// `/v2/repositories/<user>/` (the user's repositories) and
/// `/v2/repositories/<user>/<repo>/tags`, from the registry's catalog and
/// tags, `{"count", "next", "results": [{"name": ...}]}` pages.
fn listing(
    registry: &RegistryClient,
    port: u16,
    max: usize,
    path: &str,
    rest: &str,
    query: &str,
) -> (&'static str, serde_json::Value) {
    let parts: Vec<&str> = rest.split('/').collect();
    let names: Result<Option<Vec<String>>> = match parts.as_slice() {
        [user] => catalog(registry).map(|all| {
            Some(
                all.iter()
                    .filter_map(|r| r.strip_prefix(&format!("{user}/")))
                    .filter(|r| !r.contains('/'))
                    .map(str::to_string)
                    .collect(),
            )
        }),
        [user, repo, "tags"] => (|| {
            let resp =
                registry.request("GET", &format!("/v2/{user}/{repo}/tags/list"), &[], None)?;
            if resp.status == 404 {
                return Ok(None);
            }
            anyhow::ensure!(resp.status == 200, "tags: status {}", resp.status);
            let v: serde_json::Value = serde_json::from_slice(&resp.body)?;
            let mut tags: Vec<String> = v["tags"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            tags.sort();
            Ok(Some(tags))
        })(),
        _ => Ok(None),
    };
    let names = match names {
        Ok(Some(n)) => n,
        Ok(None) => return ("404 Not Found", json!({"message": "object not found"})),
        Err(e) => return ("502 Bad Gateway", json!({"message": e.to_string()})),
    };
    let size: usize = query_param(query, "page_size")
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
        .clamp(1, max);
    let page: usize = query_param(query, "page")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    let start = (page - 1) * size;
    let results: Vec<_> = names
        .iter()
        .skip(start)
        .take(size)
        .map(|n| json!({"name": n, "last_updated": null}))
        .collect();
    let next = (start + size < names.len()).then(|| {
        format!(
            "http://127.0.0.1:{port}{path}?page={}&page_size={size}",
            page + 1
        )
    });
    (
        "200 OK",
        json!({"count": names.len(), "next": next, "results": results}),
    )
}

/// Every repository of the registry (following `Link` pages).
fn catalog(registry: &RegistryClient) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut next = Some("/v2/_catalog?n=1000".to_string());
    while let Some(target) = next.take() {
        let resp = registry.request("GET", &target, &[], None)?;
        anyhow::ensure!(resp.status == 200, "catalog: status {}", resp.status);
        let v: serde_json::Value = serde_json::from_slice(&resp.body)?;
        if let Some(a) = v["repositories"].as_array() {
            out.extend(a.iter().filter_map(|r| r.as_str().map(str::to_string)));
        }
        next = resp
            .header("link")
            .and_then(|l| l.split_once('<'))
            .and_then(|(_, rest)| rest.split_once('>'))
            .map(|(u, _)| u.to_string());
    }
    Ok(out)
}
