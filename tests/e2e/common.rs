//! Helpers shared by the test modules.

use walt_e2e::store::table_cells;
use walt_e2e::*;

/// Pushes the standard busybox image (OCI, gzip, `pc-x86-64`) to `local`
/// as `repo:tag` and returns it.
pub fn push_busybox(env: &Env, repo: &str, tag: &str) -> BuiltImage {
    let img = env.busybox();
    env.push_local(repo, tag, &img);
    img
}

/// True when the store holds this layer (by blob digest or diff_id).
pub fn store_has_layer(env: &Env, img: &BuiltImage, i: usize) -> bool {
    let d = env.server.data_dir();
    store_mentions(&d, &img.layers[i].digest) || store_mentions(&d, &img.diff_ids[i])
}

/// Asserts a successful clone printed `cloned` and the local name on its last stdout line.
#[track_caller]
pub fn assert_cloned(out: &CmdOutput, local_name: &str) {
    out.assert_success();
    let last = out.last_stdout_line();
    assert!(
        last.to_lowercase().contains("cloned") && last.contains(local_name),
        "last stdout line should say `cloned` and `{local_name}`:\n{out}"
    );
}

/// The first table of a `walt image show` output whose header has a
/// `NAME` cell: (header cells, row cells), rows up to the next blank line.
pub fn table(stdout: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = stdout
        .lines()
        .skip_while(|l| !table_cells(l).iter().any(|c| c == "NAME"));
    let header = lines.next().map(table_cells).unwrap_or_default();
    (
        header,
        lines
            .take_while(|l| !l.trim().is_empty())
            .map(table_cells)
            .collect(),
    )
}
