//! Looking at a walt server's data directory from outside.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::{list_dir, list_tree};
use crate::walt::Walt;

/// What must not change when an operation fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSnapshot {
    /// Every path under `blobs/`.
    pub blobs: Vec<String>,
    /// Entry names of `layers/`.
    pub layers: Vec<String>,
    /// `walt image show --all` of the given user, CREATED column removed.
    pub show_all: Vec<String>,
}

/// Splits a table line on runs of 2+ spaces.
pub fn table_cells(line: &str) -> Vec<String> {
    let mut cells = Vec::new();
    let mut cur = String::new();
    let mut spaces = 0;
    for c in line.trim_end().chars() {
        if c == ' ' {
            spaces += 1;
            continue;
        }
        if spaces >= 2 && !cur.is_empty() {
            cells.push(std::mem::take(&mut cur));
        } else if spaces == 1 {
            cur.push(' ');
        }
        spaces = 0;
        cur.push(c);
    }
    if !cur.is_empty() {
        cells.push(cur);
    }
    cells
}

/// The output with the created column dropped from every table (a line
/// holding a `created` cell starts a table; its rows follow).
fn without_created(out: &str) -> Vec<String> {
    let mut header: Option<(usize, usize)> = None; // (cells, CREATED index)
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut cells = table_cells(l);
            if let Some(i) = cells.iter().position(|c| c == "created") {
                header = Some((cells.len(), i));
                return l.trim_end().to_string();
            }
            match header {
                Some((n, i)) if cells.len() == n => {
                    cells.remove(i);
                    cells.join("  ")
                }
                _ => l.trim_end().to_string(),
            }
        })
        .collect()
}

/// Takes a snapshot of `data_dir` and of what `walt` sees.
pub fn store_snapshot(data_dir: &Path, walt: &Walt) -> StoreSnapshot {
    let out = walt.run(&["image", "show", "--all"]);
    out.assert_success();
    StoreSnapshot {
        blobs: list_tree(&data_dir.join("blobs")),
        layers: list_dir(&data_dir.join("layers")),
        show_all: without_created(&out.stdout),
    }
}

/// Asserts the store did not change since `before`.
#[track_caller]
pub fn assert_store_unchanged(before: &StoreSnapshot, data_dir: &Path, walt: &Walt) {
    let now = store_snapshot(data_dir, walt);
    assert_eq!(before, &now, "the store changed after a failed operation");
}

/// Asserts `tmp/` of the data dir is empty (or missing), giving the server
/// up to 5 s to finish cleaning up. The build contexts the server keeps
/// after a successful `walt image build` (`session-build-context-*`, for
/// unchanged rebuilds; at most 4) do not count: see
/// [`assert_tmp_really_empty`] where they must not be there either.
#[track_caller]
pub fn assert_tmp_empty(data_dir: &Path) {
    wait_tmp_empty(data_dir, true);
}

/// [`assert_tmp_empty`], kept build contexts included.
#[track_caller]
pub fn assert_tmp_really_empty(data_dir: &Path) {
    wait_tmp_empty(data_dir, false);
}

/// A kept build context: its session directory and what is below it.
pub fn is_kept_context(rel: &str) -> bool {
    rel.starts_with("session-build-context-")
}

#[track_caller]
fn wait_tmp_empty(data_dir: &Path, contexts_allowed: bool) {
    let tmp = data_dir.join("tmp");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<String> = list_tree(&tmp)
            .into_iter()
            .filter(|p| !(contexts_allowed && is_kept_context(p)))
            .collect();
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!("{} is not empty: {left:?}", tmp.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// True when a blob or layer entry of the store is named by this digest's hex.
pub fn store_mentions(data_dir: &Path, digest: &str) -> bool {
    let hex = crate::util::digest_hex(digest);
    list_tree(&data_dir.join("blobs"))
        .iter()
        .any(|p| p.contains(hex))
        || list_dir(&data_dir.join("layers"))
            .iter()
            .any(|p| p.contains(hex))
}
