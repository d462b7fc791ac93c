//! `walt image build`: Dockerfiles built by the real server from a
//! directory and from a git repository, read back with `walt image cp` and
//! from the store; failures leave nothing behind; the layer cache; arm64
//! through qemu; publish and `docker pull`.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::common::*;
use walt_e2e::docker::Dockerd;
use walt_e2e::tree::{Merged, file_kind_of, image_config};
use walt_e2e::util::{list_tree, run_cmd, wait_for};
use walt_e2e::*;

/// A server with alice holding `busybox` (the standard image, labelled
/// `walt.node.models=pc-x86-64`), the base of most builds here.
fn build_env() -> Env {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox", "busybox"]);
    env
}

/// A context directory holding `files` (path, content), parents created.
fn context(files: &[(&str, &str)]) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("walt-e2e-ctx-")
        .tempdir()
        .unwrap();
    for (p, data) in files {
        write(dir.path(), p, data.as_bytes());
    }
    dir
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

/// `walt image build --from-dir DIR EXTRA... NAME` as `w`.
fn build(w: &Walt, dir: &Path, name: &str, extra: &[&str]) -> CmdOutput {
    let d = dir.to_str().unwrap();
    let mut a = vec!["image", "build", "--from-dir", d];
    a.extend_from_slice(extra);
    a.push(name);
    w.run(&a)
}

#[track_caller]
fn build_ok(w: &Walt, dir: &Path, name: &str, extra: &[&str]) -> CmdOutput {
    let out = build(w, dir, name, extra);
    out.assert_success();
    out
}

/// A step as the client printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    index: usize,
    count: usize,
    text: String,
    cached: bool,
}

/// The `STEP i/n: <instruction>` lines of the build's output (stdout or
/// stderr, whichever has them), each cached when a `--> Using cache` line
/// follows it before the next step.
fn steps(out: &CmdOutput) -> Vec<Step> {
    let stream = if out.stdout.lines().any(|l| l.starts_with("STEP ")) {
        &out.stdout
    } else {
        &out.stderr
    };
    let mut v: Vec<Step> = Vec::new();
    for l in stream.lines() {
        if let Some(rest) = l.strip_prefix("STEP ") {
            let Some((num, text)) = rest.split_once(": ") else {
                continue;
            };
            let Some((i, n)) = num.split_once('/') else {
                continue;
            };
            let (Ok(index), Ok(count)) = (i.parse(), n.parse()) else {
                continue;
            };
            v.push(Step {
                index,
                count,
                text: text.to_string(),
                cached: false,
            });
        } else if l.trim() == "--> Using cache"
            && let Some(s) = v.last_mut()
        {
            s.cached = true;
        }
    }
    v
}

/// Everything the command printed.
fn printed(out: &CmdOutput) -> String {
    format!("{}{}", out.stdout, out.stderr)
}

/// The file `path` of alice's image `image`, read back with `walt image cp
/// image:path DIR` (None when the copy fails).
fn read_back(env: &Env, image: &str, path: &str) -> Option<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let out = env.alice.run(&[
        "image",
        "cp",
        &format!("{image}:{path}"),
        dir.path().to_str().unwrap(),
    ]);
    if !out.success {
        return None;
    }
    let name = Path::new(path).file_name().unwrap();
    fs::read(dir.path().join(name)).ok()
}

#[track_caller]
fn read_text(env: &Env, image: &str, path: &str) -> String {
    let data = read_back(env, image, path)
        .unwrap_or_else(|| panic!("{image}:{path} cannot be copied out"));
    String::from_utf8(data).unwrap()
}

/// Alice's image `name`, its layers merged.
fn merged(env: &Env, name: &str) -> Merged {
    Merged::image(&env.server.data_dir(), "alice", name).unwrap()
}

fn config(env: &Env, name: &str) -> Value {
    image_config(&env.server.data_dir(), "alice", name).unwrap()
}

/// Processes whose cwd or root is below `dir`, or whose command line
/// holds `marker`.
fn processes_in(dir: &Path, marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let cmd = fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let inside = ["cwd", "root"]
            .iter()
            .any(|l| fs::read_link(e.path().join(l)).is_ok_and(|t| t.starts_with(dir)));
        if inside || cmd.contains(marker) {
            found.push(format!("{name}: {cmd}"));
        }
    }
    found
}

/// Waits until no mount and no process of the server's data dir is left
/// (the sandbox is torn down when the step ends; allow it a few seconds).
#[track_caller]
fn assert_nothing_left(env: &Env, marker: &str, build_failed: bool) {
    let data = env.server.data_dir();
    let data_s = data.display().to_string();
    wait_for(
        "the build's mounts and processes to go",
        Duration::from_secs(15),
        || {
            (mounts_with(&data_s).is_empty() && processes_in(&data, marker).is_empty())
                .then_some(())
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: mounts {:?}, processes {:?}",
            mounts_with(&data_s),
            processes_in(&data, marker)
        )
    });
    if build_failed {
        // Not even its context is kept.
        walt_e2e::store::assert_tmp_really_empty(&data);
    } else {
        assert_tmp_empty(&data);
    }
}

const WALT_TEST: &str = "FROM busybox\nRUN echo OK > /root/test-result\n";

/// WalT's own test, from a directory: a RUN writes /root/test-result,
/// read back with `walt image cp img:/root/test-result .`.
#[test]
fn walt_test_from_a_directory() {
    let env = build_env();
    let ctx = context(&[("Dockerfile", WALT_TEST)]);
    let out = build_ok(&env.alice, ctx.path(), "built", &[]);
    let st = steps(&out);
    assert_eq!(
        st.iter().map(|s| (s.index, s.count)).collect::<Vec<_>>(),
        [(1, 2), (2, 2)],
        "{out}"
    );
    assert_eq!(st[1].text, "RUN echo OK > /root/test-result", "{out}");
    assert!(env.alice.image_names().contains(&"built".to_string()));
    // Exactly as WalT's test reads it: into the current directory.
    let cwd = tempfile::tempdir().unwrap();
    let cp = env
        .alice
        .command(&["image", "cp", "built:/root/test-result", "."])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert!(
        cp.status.success(),
        "{}",
        String::from_utf8_lossy(&cp.stderr)
    );
    assert_eq!(
        fs::read_to_string(cwd.path().join("test-result")).unwrap(),
        "OK\n"
    );
    // The label of the base is kept; the image shows with its model.
    let row = env.alice.show_row("built").unwrap();
    assert!(row.contains("pc-x86-64"), "{row}");
    // A RUN layer: one more than the base.
    let base_layers = walt_e2e::tree::image_layer_dirs(&env.server.data_dir(), "alice", "busybox")
        .unwrap()
        .len();
    let layers = walt_e2e::tree::image_layer_dirs(&env.server.data_dir(), "alice", "built")
        .unwrap()
        .len();
    assert_eq!(layers, base_layers + 1);
    assert_nothing_left(&env, "walt-e2e-ctx-", false);
}

/// A git repository (system git) in a temporary directory holding
/// `files`, committed.
fn git_repo(files: &[(&str, &str)]) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("walt-e2e-git-")
        .tempdir()
        .unwrap();
    for (p, data) in files {
        write(dir.path(), p, data.as_bytes());
    }
    let git = |args: &[&str]| {
        run_cmd(
            Command::new("git")
                .args(["-c", "user.name=walt-e2e", "-c", "user.email=e2e@walt.test"])
                .args(["-c", "init.defaultBranch=main"])
                .args(args)
                .current_dir(dir.path()),
        )
        .unwrap();
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "walt e2e"]);
    dir
}

/// WalT's own test, from a `file://` git repository with `--sub-dir`; a
/// sub-dir without a Dockerfile, or leaving the repository, is refused.
#[test]
fn walt_test_from_a_git_repository_with_sub_dir() {
    let env = build_env();
    let repo = git_repo(&[
        ("README", "not a context\n"),
        ("images/test/Dockerfile", WALT_TEST),
        ("images/test/extra.txt", "from the repo\n"),
        ("images/empty/nothing.txt", "no Dockerfile here\n"),
    ]);
    let url = format!("file://{}", repo.path().display());
    let out = env.alice.run(&[
        "image",
        "build",
        "--from-url",
        &url,
        "--sub-dir",
        "images/test",
        "fromgit",
    ]);
    out.assert_success();
    assert_eq!(steps(&out).len(), 2, "{out}");
    assert_eq!(read_text(&env, "fromgit", "/root/test-result"), "OK\n");

    let before = env.snapshot();
    let out = env.alice.run(&[
        "image",
        "build",
        "--from-url",
        &url,
        "--sub-dir",
        "images/empty",
        "nodf",
    ]);
    out.assert_failure("Dockerfile");
    assert!(out.stderr.contains("images/empty"), "{out}");
    assert!(
        !out.stderr
            .contains(&env.server.data_dir().display().to_string()),
        "no host path of the server in messages:\n{out}"
    );
    let out = env.alice.run(&[
        "image",
        "build",
        "--from-url",
        &url,
        "--sub-dir",
        "../..",
        "escape",
    ]);
    out.assert_failure("sub-dir");
    // Refused by its text, before anything is cloned.
    assert!(!out.stderr.contains("cloning"), "{out}");
    let out = env.alice.run(&[
        "image",
        "build",
        "--from-url",
        &url,
        "--sub-dir",
        "images/missing",
        "missing",
    ]);
    out.assert_failure("images/missing");
    env.assert_unchanged(&before);
    assert_nothing_left(&env, "walt-e2e-git-", false);
}

/// Multi-stage: COPY --from=<stage>; only the last stage is saved.
#[test]
fn multi_stage_copies_from_a_named_stage_and_saves_the_last() {
    let env = build_env();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox AS first\n\
         RUN mkdir -p /out && echo from-first > /out/made && echo first-only > /root/first-only\n\
         FROM busybox\n\
         COPY --from=first /out/made /root/made\n\
         RUN cat /root/made > /root/seen\n",
    )]);
    let names_before = env.alice.image_names();
    let out = build_ok(&env.alice, ctx.path(), "multi", &[]);
    assert_eq!(steps(&out).len(), 5, "{out}");
    assert_eq!(read_text(&env, "multi", "/root/made"), "from-first\n");
    assert_eq!(read_text(&env, "multi", "/root/seen"), "from-first\n");
    let m = merged(&env, "multi");
    assert!(
        m.entry("/root/first-only").is_none(),
        "the first stage's files leaked"
    );
    assert!(m.entry("/out").is_none(), "the first stage's files leaked");
    drop(m);
    // One image more: the last stage.
    let mut names = env.alice.image_names();
    names.retain(|n| !names_before.contains(n));
    assert_eq!(names, ["multi"]);
}

/// ARG/ENV expansion: `--build-arg`, defaults, `${V:-x}`, `${V:+x}`,
/// escapes, through a RUN (build args are in its environment) and through
/// the saved config.
#[test]
fn arg_and_env_expansion() {
    let env = build_env();
    let ctx = context(&[(
        "Dockerfile",
        r#"ARG G=global-default
ARG BASE=busybox
FROM ${BASE}
ARG G
ARG A=a-default
ARG B
ARG FROMCLI=unset
ENV E1=e1 E2="two words" EMPTY=
ENV E3=${E1}-x E4=${NOPE:-dflt} E5=${E1:+alt} E6=${NOPE:+alt} E7=\$E1 E8=${EMPTY:-dflt} E9=${E1}${E1} E10='$E1'
LABEL l1=$A l2=${FROMCLI} l3=${E3} l4="${E2}" l5=${B:-noB} l6=$G l7=${G:+set}
WORKDIR /work/$E1
RUN echo "A=$A B=$B G=$G FROMCLI=$FROMCLI" > /root/args && echo "E1=$E1 E2=$E2 E3=$E3 E4=$E4 E5=$E5 E6=[$E6] E7=$E7 E8=$E8 E9=$E9 E10=$E10" > /root/envs && pwd > /root/pwd
"#,
    )]);
    build_ok(
        &env.alice,
        ctx.path(),
        "expand",
        &["--build-arg", "FROMCLI=cli-value", "--build-arg", "B=bee"],
    );
    assert_eq!(
        read_text(&env, "expand", "/root/args"),
        "A=a-default B=bee G=global-default FROMCLI=cli-value\n"
    );
    assert_eq!(
        read_text(&env, "expand", "/root/envs"),
        "E1=e1 E2=two words E3=e1-x E4=dflt E5=alt E6=[] E7=$E1 E8=dflt E9=e1e1 E10=$E1\n"
    );
    assert_eq!(read_text(&env, "expand", "/root/pwd"), "/work/e1\n");

    let c = config(&env, "expand");
    let envs: Vec<&str> = c["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for want in [
        "E1=e1",
        "E2=two words",
        "EMPTY=",
        "E3=e1-x",
        "E4=dflt",
        "E5=alt",
        "E6=",
        "E7=$E1",
        "E8=dflt",
        "E9=e1e1",
        "E10=$E1",
    ] {
        assert!(
            envs.contains(&want),
            "{want} not in the config's Env {envs:?}"
        );
    }
    // Build args are not saved in the environment.
    for k in ["A=", "B=", "G=", "FROMCLI=", "BASE="] {
        assert!(
            !envs.iter().any(|e| e.starts_with(k)),
            "{k} in the config's Env {envs:?}"
        );
    }
    let labels = &c["config"]["Labels"];
    for (k, v) in [
        ("l1", "a-default"),
        ("l2", "cli-value"),
        ("l3", "e1-x"),
        ("l4", "two words"),
        ("l5", "bee"),
        ("l6", "global-default"),
        ("l7", "set"),
        ("walt.node.models", "pc-x86-64"),
    ] {
        assert_eq!(labels[k], v, "label {k}: {labels}");
    }
    assert_eq!(c["config"]["WorkingDir"], "/work/e1", "{c}");
}

/// COPY with globs, `--chown` (names of the image's /etc/passwd and
/// numbers), `--chmod`.
#[test]
fn copy_globs_chown_chmod() {
    let env = build_env();
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM busybox\n\
             RUN echo 'app:x:1000:1001::/home/app:/bin/sh' >> /etc/passwd && printf 'app:x:1000:\\nstaff:x:1001:\\n' >> /etc/group\n\
             COPY src/*.txt /root/globbed/\n\
             COPY src/[ab].* /root/class/\n\
             COPY --chown=app:staff src/c.md /root/owned.md\n\
             COPY --chown=app src/c.md /root/owned-user-only.md\n\
             COPY --chown=1234:5678 src/sub /root/subcopy/\n\
             COPY --chmod=0640 src/sub /root/chmodded/\n\
             COPY --chmod=755 --chown=7:8 src/a.txt /root/exec.txt\n",
        ),
        ("src/a.txt", "a\n"),
        ("src/b.txt", "b\n"),
        ("src/c.md", "c\n"),
        ("src/sub/d.txt", "d\n"),
        ("src/sub/deeper/e.txt", "e\n"),
    ]);
    fs::set_permissions(
        ctx.path().join("src/c.md"),
        std::os::unix::fs::PermissionsExt::from_mode(0o604),
    )
    .unwrap();
    build_ok(&env.alice, ctx.path(), "copies", &[]);
    let m = merged(&env, "copies");
    let e = |p: &str| m.entry(p).unwrap_or_else(|| panic!("{p} missing"));
    // Globs: the matches only, under the directory.
    assert_eq!(e("/root/globbed/a.txt").kind, file_kind_of(b"a\n"));
    assert_eq!(e("/root/globbed/b.txt").kind, file_kind_of(b"b\n"));
    assert!(m.entry("/root/globbed/c.md").is_none());
    assert!(m.entry("/root/globbed/sub").is_none());
    assert!(m.entry("/root/class/a.txt").is_some() && m.entry("/root/class/b.txt").is_some());
    assert!(m.entry("/root/class/c.md").is_none());
    // COPY writes root-owned files, modes as in the context.
    let a = e("/root/globbed/a.txt");
    assert_eq!((a.uid, a.gid), (0, 0));
    // --chown by names; a user alone takes the group of the same name
    // (docker's rule: the group named as the user, here 1000, not the
    // passwd primary group 1001).
    let o = e("/root/owned.md");
    assert_eq!((o.uid, o.gid, o.mode), (1000, 1001, 0o604), "{o}");
    let o = e("/root/owned-user-only.md");
    assert_eq!((o.uid, o.gid), (1000, 1000), "{o}");
    // --chown by numbers, on a directory's content and on the directory
    // COPY creates.
    for p in [
        "/root/subcopy",
        "/root/subcopy/d.txt",
        "/root/subcopy/deeper",
        "/root/subcopy/deeper/e.txt",
    ] {
        let x = e(p);
        assert_eq!((x.uid, x.gid), (1234, 5678), "{p}: {x}");
    }
    assert_eq!(e("/root/subcopy/deeper/e.txt").kind, file_kind_of(b"e\n"));
    // --chmod on every entry copied, files and directories (buildkit).
    for p in [
        "/root/chmodded/d.txt",
        "/root/chmodded/deeper",
        "/root/chmodded/deeper/e.txt",
    ] {
        assert_eq!(e(p).mode, 0o640, "{p}");
    }
    let x = e("/root/exec.txt");
    assert_eq!((x.mode, x.uid, x.gid), (0o755, 7, 8), "{x}");
}

/// A gzip tar of a directory, a file (owner 42:43, mode 0600), a symlink
/// and a hard link.
fn tar_gz() -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o750);
    h.set_uid(42);
    h.set_gid(43);
    h.set_size(0);
    h.set_mtime(1_600_000_000);
    b.append_data(&mut h, "pkg/", &[][..]).unwrap();
    let data = b"packed content\n";
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o600);
    h.set_uid(42);
    h.set_gid(43);
    h.set_size(data.len() as u64);
    h.set_mtime(1_600_000_000);
    b.append_data(&mut h, "pkg/file", &data[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    b.append_link(&mut h, "pkg/link", "file").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_mode(0o600);
    h.set_uid(42);
    h.set_gid(43);
    h.set_size(0);
    b.append_link(&mut h, "pkg/hard", "pkg/file").unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

/// ADD of a local gzip tar unpacks it (owners of the archive kept); COPY
/// of the same file copies it as it is.
#[test]
fn add_of_a_gzip_tar_unpacks_it() {
    let env = build_env();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nADD pkg.tar.gz /opt/\nADD pkg.tar.gz /opt2\nCOPY pkg.tar.gz /root/\n",
    )]);
    let archive = tar_gz();
    fs::write(ctx.path().join("pkg.tar.gz"), &archive).unwrap();
    build_ok(&env.alice, ctx.path(), "added", &[]);
    let m = merged(&env, "added");
    for root in ["/opt", "/opt2"] {
        let f = m.entry(&format!("{root}/pkg/file")).unwrap();
        assert_eq!(f.kind, file_kind_of(b"packed content\n"), "{root}");
        assert_eq!((f.mode, f.uid, f.gid), (0o600, 42, 43), "{root}: {f}");
        let d = m.entry(&format!("{root}/pkg")).unwrap();
        assert_eq!(
            (d.kind.as_str(), d.mode, d.uid, d.gid),
            ("dir", 0o750, 42, 43)
        );
        assert_eq!(
            m.entry(&format!("{root}/pkg/link")).unwrap().kind,
            "link file"
        );
        assert_eq!(
            m.entry(&format!("{root}/pkg/hard")).unwrap().kind,
            file_kind_of(b"packed content\n")
        );
    }
    assert_eq!(
        m.entry("/root/pkg.tar.gz").unwrap().kind,
        file_kind_of(&archive)
    );
}

/// Heredocs: `RUN <<EOF` runs the script; `COPY <<EOF` writes the file.
#[test]
fn heredoc_run_and_copy() {
    let env = build_env();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\n\
         RUN <<EOF\n\
         echo heredoc-line-1 > /root/hd\n\
         echo heredoc-line-2 >> /root/hd\n\
         EOF\n\
         COPY <<EOF /root/copied\n\
         hello from a heredoc\n\
         EOF\n\
         RUN cat /root/copied >> /root/hd\n",
    )]);
    let out = build_ok(&env.alice, ctx.path(), "hd", &[]);
    assert_eq!(steps(&out).len(), 4, "{out}");
    assert_eq!(
        read_text(&env, "hd", "/root/hd"),
        "heredoc-line-1\nheredoc-line-2\nhello from a heredoc\n"
    );
    assert_eq!(
        read_text(&env, "hd", "/root/copied"),
        "hello from a heredoc\n"
    );
}

/// A failing RUN: its step and output shown, one error line, nothing
/// saved, no mount and no process left (not even one it left running in
/// the background).
#[test]
fn failing_run_saves_nothing_and_leaves_nothing() {
    let env = build_env();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nENV X=1\nRUN echo output-before-failure; sleep 4747 & exit 3\nRUN echo never > /root/never\n",
    )]);
    let before = env.snapshot();
    let out = build(&env.alice, ctx.path(), "failing", &[]);
    out.assert_failure_any(&["status 3", "code 3", "returned 3", "exit 3"]);
    assert!(printed(&out).contains("output-before-failure"), "{out}");
    let st = steps(&out);
    assert_eq!(st.last().map(|s| s.index), Some(3), "{out}");
    assert!(!printed(&out).contains("STEP 4/4"), "{out}");
    assert!(
        out.stdout.lines().all(|l| !l.starts_with("Image ")),
        "{out}"
    );
    assert_nothing_left(&env, "sleep 4747", true);
    env.assert_unchanged(&before);
    assert!(!env.alice.image_names().contains(&"failing".to_string()));
    // The image name is free and the server well: the same build, fixed.
    write(
        ctx.path(),
        "Dockerfile",
        b"FROM busybox\nRUN echo fixed > /root/r\n",
    );
    build_ok(&env.alice, ctx.path(), "failing", &[]);
    assert_eq!(read_text(&env, "failing", "/root/r"), "fixed\n");
}

/// Without `walt.node.models` (from a LABEL or the base) the build fails
/// saying so and saves nothing.
#[test]
fn missing_models_label_fails_saying_so() {
    let env = build_env();
    let ctx = context(&[
        ("Dockerfile", "FROM scratch\nCOPY f /f\nENV A=1\n"),
        ("f", "data\n"),
    ]);
    let names = env.alice.image_names();
    let out = build(&env.alice, ctx.path(), "nolabel", &[]);
    out.assert_failure("walt.node.models");
    assert_eq!(env.alice.image_names(), names);
    assert_nothing_left(&env, "walt-e2e-ctx-", true);
    // The same with the label builds.
    write(
        ctx.path(),
        "Dockerfile",
        b"FROM scratch\nCOPY f /f\nLABEL walt.node.models=pc-x86-64\n",
    );
    build_ok(&env.alice, ctx.path(), "nolabel", &[]);
    assert_eq!(
        merged(&env, "nolabel").entry("/f").unwrap().kind,
        file_kind_of(b"data\n")
    );
}

/// No Dockerfile in the directory: one line naming what is missing and
/// where; `Containerfile` is accepted too.
#[test]
fn missing_dockerfile_fails_naming_it() {
    let env = build_env();
    let ctx = context(&[("README", "no Dockerfile\n")]);
    let before = env.snapshot();
    let out = build(&env.alice, ctx.path(), "nodf", &[]);
    out.assert_failure("Dockerfile");
    let base = ctx
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        out.stderr.contains(&base),
        "the error should say where:\n{out}"
    );
    env.assert_unchanged(&before);
    write(ctx.path(), "Containerfile", WALT_TEST.as_bytes());
    build_ok(&env.alice, ctx.path(), "nodf", &[]);
    assert_eq!(read_text(&env, "nodf", "/root/test-result"), "OK\n");
}

/// An unknown instruction fails before any step runs, naming its line.
#[test]
fn unknown_instruction_fails_before_anything_runs() {
    let env = build_env();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN echo should-not-run\nFROBNICATE the image\nRUN true\n",
    )]);
    let before = env.snapshot();
    let out = build(&env.alice, ctx.path(), "unknown", &[]);
    out.assert_failure("line 3");
    assert!(out.stderr.to_lowercase().contains("frobnicate"), "{out}");
    assert!(steps(&out).is_empty(), "a step ran:\n{out}");
    assert!(!ran_line(&out, "should-not-run"), "{out}");
    env.assert_unchanged(&before);
    // A syntax error too (a flag COPY does not have).
    write(
        ctx.path(),
        "Dockerfile",
        b"FROM busybox\nRUN echo should-not-run\nCOPY --bogus=1 a b\n",
    );
    let out = build(&env.alice, ctx.path(), "unknown", &[]);
    out.assert_failure("line 3");
    assert!(steps(&out).is_empty(), "a step ran:\n{out}");
    assert!(!ran_line(&out, "should-not-run"), "{out}");
    env.assert_unchanged(&before);
}

/// True when a line of the output is exactly `marker` (what an `echo`
/// of a RUN step prints).
fn ran_line(out: &CmdOutput, marker: &str) -> bool {
    printed(out).lines().any(|l| l.trim() == marker)
}

/// A context symlink pointing at the host's /etc/passwd never brings the
/// host's file into the image: COPY gives the context's own path (a
/// symlink, or what the context holds there) or fails.
#[test]
fn context_symlinks_never_copy_host_files() {
    let env = build_env();
    let host = fs::read("/etc/passwd").unwrap();
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM busybox\nCOPY dir/ /root/dir/\nCOPY passwd-link /root/link-copy\n",
        ),
        ("dir/plain", "plain\n"),
        ("etc/passwd", "the context's own passwd\n"),
    ]);
    symlink("/etc/passwd", ctx.path().join("passwd-link")).unwrap();
    symlink("/etc/passwd", ctx.path().join("dir/abs")).unwrap();
    symlink("../../../../../../etc/passwd", ctx.path().join("dir/rel")).unwrap();
    let out = build(&env.alice, ctx.path(), "links", &[]);
    if !out.success {
        out.assert_failure("passwd-link");
        assert!(!env.alice.image_names().contains(&"links".to_string()));
        return;
    }
    let m = merged(&env, "links");
    // Inside a copied directory, symlinks stay symlinks (Docker's rule).
    assert_eq!(m.entry("/root/dir/abs").unwrap().kind, "link /etc/passwd");
    assert_eq!(
        m.entry("/root/dir/rel").unwrap().kind,
        "link ../../../../../../etc/passwd"
    );
    let e = m.entry("/root/link-copy").unwrap();
    assert_ne!(
        e.kind,
        file_kind_of(&host),
        "the host's /etc/passwd was copied"
    );
    assert!(
        e.kind == "link /etc/passwd" || e.kind == file_kind_of(b"the context's own passwd\n"),
        "{e}"
    );
    for p in m.tree().unwrap().keys() {
        assert_ne!(
            m.read(p).as_deref(),
            Some(&host[..]),
            "/{p} holds the host's /etc/passwd"
        );
    }
}

const CACHE_DOCKERFILE: &str = "FROM busybox\n\
RUN echo ran-step-2 && echo two > /root/two\n\
COPY a.txt /root/a.txt\n\
RUN echo ran-step-4 && cat /root/a.txt > /root/copy-of-a\n\
ENV SOME=value\n\
COPY b.txt /root/b.txt\n\
RUN echo ran-step-7 && cat /root/b.txt > /root/copy-of-b\n";

/// Steps that change the file system (RUN, COPY): (index, cached).
fn fs_steps(out: &CmdOutput) -> Vec<(usize, bool)> {
    steps(out)
        .into_iter()
        .filter(|s| s.text.starts_with("RUN") || s.text.starts_with("COPY"))
        .map(|s| (s.index, s.cached))
        .collect()
}

/// Markers of the RUN steps that ran.
fn ran(out: &CmdOutput) -> Vec<&'static str> {
    ["ran-step-2", "ran-step-4", "ran-step-7"]
        .into_iter()
        .filter(|m| ran_line(out, m))
        .collect()
}

/// The layer cache: an unchanged rebuild runs nothing and writes no blob;
/// changing a context file rebuilds from the first step that reads it; a
/// file no step reads changes nothing; `--no-cache` runs everything.
#[test]
fn layer_cache_hits_and_misses() {
    let env = build_env();
    let ctx = context(&[
        ("Dockerfile", CACHE_DOCKERFILE),
        ("a.txt", "a1\n"),
        ("b.txt", "b1\n"),
        ("unused.txt", "u1\n"),
    ]);
    let out = build_ok(&env.alice, ctx.path(), "cached", &[]);
    assert_eq!(
        fs_steps(&out),
        [(2, false), (3, false), (4, false), (6, false), (7, false)],
        "{out}"
    );
    assert_eq!(
        ran(&out),
        ["ran-step-2", "ran-step-4", "ran-step-7"],
        "{out}"
    );
    let data = env.server.data_dir();

    // Unchanged: everything from the cache, no new blob, no new layer.
    let blobs = list_tree(&data.join("blobs"));
    let layers = walt_e2e::util::list_dir(&data.join("layers"));
    let out = build_ok(&env.alice, ctx.path(), "cached", &["--yes"]);
    assert_eq!(
        fs_steps(&out),
        [(2, true), (3, true), (4, true), (6, true), (7, true)],
        "{out}"
    );
    assert!(ran(&out).is_empty(), "{out}");
    assert_eq!(
        list_tree(&data.join("blobs")),
        blobs,
        "a cached rebuild wrote blobs"
    );
    assert_eq!(walt_e2e::util::list_dir(&data.join("layers")), layers);
    // The unchanged context was not sent again: the server had it.
    let reused = |log: &str| log.matches("build context reused").count();
    assert_eq!(
        reused(&env.server.log()),
        1,
        "the unchanged context was sent again"
    );

    // A file no step reads: still everything cached, the context sent again.
    write(ctx.path(), "unused.txt", b"u2\n");
    let out = build_ok(&env.alice, ctx.path(), "cached", &["--yes"]);
    assert_eq!(
        reused(&env.server.log()),
        1,
        "a changed context was taken as held"
    );
    assert_eq!(
        fs_steps(&out),
        [(2, true), (3, true), (4, true), (6, true), (7, true)],
        "{out}"
    );

    // b.txt changes: steps up to 6 cached, from COPY b.txt on not.
    write(ctx.path(), "b.txt", b"b2\n");
    let out = build_ok(&env.alice, ctx.path(), "cached", &["--yes"]);
    assert_eq!(
        fs_steps(&out),
        [(2, true), (3, true), (4, true), (6, false), (7, false)],
        "{out}"
    );
    assert_eq!(ran(&out), ["ran-step-7"], "{out}");
    assert_eq!(read_text(&env, "cached", "/root/copy-of-b"), "b2\n");

    // a.txt changes (its mode only, content the same): from step 3 on.
    fs::set_permissions(
        ctx.path().join("a.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let out = build_ok(&env.alice, ctx.path(), "cached", &["--yes"]);
    assert_eq!(
        fs_steps(&out),
        [(2, true), (3, false), (4, false), (6, false), (7, false)],
        "{out}"
    );
    // Its content: the same, and the new content is what the image holds.
    write(ctx.path(), "a.txt", b"a2\n");
    let out = build_ok(&env.alice, ctx.path(), "cached", &["--yes"]);
    assert_eq!(
        fs_steps(&out),
        [(2, true), (3, false), (4, false), (6, false), (7, false)],
        "{out}"
    );
    assert_eq!(ran(&out), ["ran-step-4", "ran-step-7"], "{out}");
    assert_eq!(read_text(&env, "cached", "/root/copy-of-a"), "a2\n");
    assert_eq!(read_text(&env, "cached", "/root/copy-of-b"), "b2\n");

    // New content of the same size with the old mtime: still a change.
    let b = ctx.path().join("b.txt");
    let mtime = filetime::FileTime::from_last_modification_time(&fs::metadata(&b).unwrap());
    write(ctx.path(), "b.txt", b"b3\n");
    filetime::set_file_mtime(&b, mtime).unwrap();
    let out = build_ok(&env.alice, ctx.path(), "cached", &["--yes"]);
    assert_eq!(
        fs_steps(&out),
        [(2, true), (3, true), (4, true), (6, false), (7, false)],
        "{out}"
    );
    assert_eq!(read_text(&env, "cached", "/root/copy-of-b"), "b3\n");

    // A build arg no ARG declares keeps the cache.
    let out = build_ok(
        &env.alice,
        ctx.path(),
        "cached",
        &["--yes", "--build-arg", "UNDECLARED=1"],
    );
    assert_eq!(
        fs_steps(&out),
        [(2, true), (3, true), (4, true), (6, true), (7, true)],
        "{out}"
    );
    // --no-cache runs everything.
    let out = build_ok(&env.alice, ctx.path(), "cached", &["--yes", "--no-cache"]);
    assert!(steps(&out).iter().all(|s| !s.cached), "{out}");
    assert_eq!(
        ran(&out),
        ["ran-step-2", "ran-step-4", "ran-step-7"],
        "{out}"
    );
    assert_eq!(read_text(&env, "cached", "/root/two"), "two\n");
    assert_nothing_left(&env, "walt-e2e-ctx-", false);
}

/// An arm64 base builds through qemu-user: `uname -m` says aarch64 and the
/// image stays arm64.
#[test]
fn arm64_base_builds_through_qemu() {
    if !Path::new("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists() {
        let st = Command::new("update-binfmts")
            .args(["--enable", "qemu-aarch64"])
            .status()
            .expect("update-binfmts (binfmt-support) missing: scripts/install-deps.sh");
        assert!(st.success());
    }
    let env = Env::start();
    let img = arm_busybox_image(&env, "arm64");
    env.push_local("walt-test/arm64", "latest", &img);
    env.alice.clone_ok(&["local:walt-test/arm64", "arm"]);
    let ctx = context(&[(
        "Dockerfile",
        "FROM arm\nRUN uname -m > /root/arch && echo built-on-arm\n",
    )]);
    let out = build_ok(&env.alice, ctx.path(), "armbuilt", &[]);
    assert!(printed(&out).contains("built-on-arm"), "{out}");
    assert_eq!(read_text(&env, "armbuilt", "/root/arch"), "aarch64\n");
    let c = config(&env, "armbuilt");
    assert_eq!(c["architecture"], "arm64", "{c}");
    assert!(env.alice.show_row("armbuilt").unwrap().contains("rpi-3-b"));
}

/// The built image publishes, and the real docker pulls and runs it.
#[test]
fn built_image_publishes_and_docker_pulls() {
    let env = build_env();
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM busybox\nCOPY hello.txt /root/\nRUN echo OK > /root/test-result\nCMD [\"cat\", \"/root/test-result\"]\n",
        ),
        ("hello.txt", "hello\n"),
    ]);
    build_ok(&env.alice, ctx.path(), "topublish", &[]);
    let out = env
        .alice
        .run(&["image", "publish", "--registry", "local", "topublish"]);
    out.assert_success();
    assert!(
        out.last_stdout_line().contains("local:alice/topublish"),
        "{out}"
    );

    let d = Dockerd::start().unwrap();
    let reference = format!("127.0.0.1:{}/alice/topublish:latest", env.local.port());
    d.docker(&["pull", "-q", &reference]).unwrap();
    let run = d
        .docker(&["run", "--rm", "--network=none", &reference])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout), "OK\n");
    let run = d
        .docker(&[
            "run",
            "--rm",
            "--network=none",
            &reference,
            "cat",
            "/root/hello.txt",
        ])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout), "hello\n");
    let labels = d
        .docker(&[
            "image",
            "inspect",
            "--format",
            "{{json .Config.Labels}}",
            &reference,
        ])
        .unwrap();
    let labels: Value = serde_json::from_slice(&labels.stdout).unwrap();
    assert_eq!(labels["walt.node.models"], "pc-x86-64", "{labels}");
}

/// While a build runs its target is locked (a second build of the same
/// name is refused, naming the first); when its client goes away, the
/// server stops the step: no process, mount or file left, nothing saved.
#[test]
fn running_build_locks_its_target_and_stops_with_its_client() {
    use std::io::Read;
    use std::net::TcpListener;
    let env = build_env();
    // The step reports through the host network (the sandbox shares it)
    // that it runs, then waits.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM busybox\nRUN echo started | nc 127.0.0.1 {port}; sleep 4749\n"),
    )]);
    let before = env.snapshot();
    let d = ctx.path().to_str().unwrap().to_string();
    let mut first = env
        .alice
        .spawn(&["image", "build", "--from-dir", &d, "locked"]);
    listener.set_nonblocking(false).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let got = listener.accept().map(|(mut s, _)| {
            let mut b = String::new();
            let _ = s.read_to_string(&mut b);
            b
        });
        let _ = tx.send(got);
    });
    let got = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the RUN step never started")
        .unwrap();
    assert_eq!(got.trim(), "started");

    // The same name is being built: refused, naming who holds it.
    let out = build(&env.alice, ctx.path(), "locked", &["--yes"]);
    out.assert_failure("being modified by walt image build of alice");

    // The first client goes away: the server stops its build.
    first.kill().unwrap();
    let _ = first.wait();
    assert_nothing_left(&env, "sleep 4749", true);
    env.assert_unchanged(&before);
    assert!(!env.alice.image_names().contains(&"locked".to_string()));
}

/// A root filesystem added to `scratch` keeps its empty `/proc`, `/sys`,
/// `/dev` and `/tmp`: only the mount points a RUN's sandbox made are
/// removed from its layer (a node mounts its root with them; without them
/// the kernel panics moving `/dev`). A RUN on top still adds none of them
/// to its own layer.
#[test]
fn an_added_root_filesystem_keeps_its_empty_mount_points() {
    let env = build_env();
    let mut b = tar::Builder::new(Vec::new());
    for dir in ["proc/", "sys/", "dev/", "tmp/", "bin/"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(if dir == "tmp/" { 0o1777 } else { 0o755 });
        h.set_size(0);
        h.set_mtime(1_600_000_000);
        b.append_data(&mut h, dir, &[][..]).unwrap();
    }
    let busybox = fs::read("/bin/busybox").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    h.set_mtime(1_600_000_000);
    b.append_data(&mut h, "bin/sh", &busybox[..]).unwrap();
    let ctx = context(&[(
        "Dockerfile",
        "FROM scratch\nADD rootfs.tar /\nLABEL walt.node.models=pc-x86-64\n",
    )]);
    write(ctx.path(), "rootfs.tar", &b.into_inner().unwrap());
    build_ok(&env.alice, ctx.path(), "rootfs", &[]);
    let m = merged(&env, "rootfs");
    for p in ["/proc", "/sys", "/dev", "/tmp"] {
        let e = m
            .entry(p)
            .unwrap_or_else(|| panic!("{p} is missing from the built image"));
        assert_eq!(e.kind, "dir", "{p}");
    }
    drop(m);
    // A RUN in an image without them: its layer does not get them.
    let ctx = context(&[("Dockerfile", "FROM busybox\nRUN echo ran > /ran\n")]);
    build_ok(&env.alice, ctx.path(), "ran", &[]);
    let before = merged(&env, "busybox");
    let after = merged(&env, "ran");
    for p in ["/proc", "/sys", "/dev"] {
        assert_eq!(
            before.entry(p).is_some(),
            after.entry(p).is_some(),
            "{p}: a RUN's sandbox mount point must not reach the image"
        );
    }
    assert_eq!(after.entry("/ran").unwrap().kind, file_kind_of(b"ran\n"));
}
