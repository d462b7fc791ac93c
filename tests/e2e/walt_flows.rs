//! WalT's own image test flows (walt-python-packages' test/walt-image.sh and
//! test/walt-help.sh) as one script run against the real binaries
//! (tests/scripts/walt-image.sh), and the help topics, shell completion and
//! man pages of `walt` (issue 15, items 10 and 11).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use walt_e2e::util::workspace_bin;
use walt_e2e::walt::wait_output;
use walt_e2e::*;

/// WalT's image commands (test/syntax/walt-image.out).
const IMAGE_SUBCOMMANDS: [&str; 11] = [
    "show",
    "search",
    "clone",
    "shell",
    "build",
    "cp",
    "duplicate",
    "remove",
    "rename",
    "publish",
    "squash",
];

/// WalT's help topics this walt ships.
const TOPICS: [&str; 6] = [
    "help-intro",
    "image-build",
    "image-cp",
    "registries",
    "shell-completion",
    "shells",
];

/// The tests of the script, in its order: each must print `ok: <name>`.
const SCRIPT_TESTS: [&str; 14] = [
    "walt help list",
    "walt help show (no tty)",
    "walt help show (tty)",
    "walt image show",
    "walt image search",
    "walt image clone",
    "walt image rename",
    "walt image duplicate",
    "walt image squash",
    "walt image cp",
    "walt image shell",
    "walt image build",
    "walt image publish",
    "walt image remove",
];

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

/// A directory holding `walt` (a link to the binary under test), to put
/// first on PATH: the scripts call `walt` as WalT's tests do.
fn walt_on_path() -> (tempfile::TempDir, String) {
    let dir = tempfile::Builder::new()
        .prefix("walt-e2e-path-")
        .tempdir()
        .unwrap();
    std::os::unix::fs::symlink(workspace_bin("walt"), dir.path().join("walt")).unwrap();
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (dir, path)
}

fn require(program: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{program} is needed by this test (scripts/install-deps.sh installs it)"
    );
}

/// Runs a program to completion (no stdin), killed after a minute.
fn run(cmd: &mut Command) -> CmdOutput {
    let line = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {line}: {e}"));
    wait_output(child, &line, Duration::from_secs(60))
}

fn walt(args: &[&str]) -> CmdOutput {
    run(Command::new(workspace_bin("walt"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("WALT_CONFIG"))
}

/// The test image WalT's tests clone (`hub:eduble/pc-x86-64-test-suite`),
/// here in the `local` registry, with two layers so that squash merges.
fn push_test_suite_image(env: &Env) -> String {
    let b = &env.images;
    let base = b
        .busybox_layer(Format::Oci, Compression::Gzip, "test-suite")
        .unwrap();
    let extra = b
        .layer(
            Format::Oci,
            Compression::Gzip,
            &[
                RawEntry::dir("opt/"),
                RawEntry::file("opt/test-suite.txt", b"walt test suite\n"),
            ],
        )
        .unwrap();
    let img = b
        .image(Format::Oci, ImageConfig::amd64("pc-x86-64"), &[base, extra])
        .unwrap();
    env.push_local("eduble/pc-x86-64-test-suite", "latest", &img);
    "local:eduble/pc-x86-64-test-suite".into()
}

#[test]
fn walt_image_test_flows_pass_against_the_binaries() {
    require("expect");
    require("git");
    let env = Env::start();
    let url = push_test_suite_image(&env);
    let (_bin, path) = walt_on_path();
    let work = tempfile::Builder::new()
        .prefix("walt-e2e-flows-")
        .tempdir()
        .unwrap();
    let child = Command::new("bash")
        .arg(scripts_dir().join("walt-image.sh"))
        .current_dir(work.path())
        .env("PATH", path)
        .env("WALT_CONFIG", env.alice.config_path())
        .env("HOME", env.alice.home())
        .env("NO_COLOR", "1")
        .env("TERM", "dumb")
        .env("TEST_IMAGE_URL", &url)
        .env("PUBLISH_REGISTRY", "local")
        .env("WORK", work.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run bash");
    let out = wait_output(
        child,
        "tests/scripts/walt-image.sh",
        Duration::from_secs(900),
    );
    let server_log = env.server.log();
    assert!(
        out.success,
        "WalT's image test flows failed:\n{out}\n--- server log ---\n{server_log}"
    );
    for t in SCRIPT_TESTS {
        assert!(
            out.stdout.lines().any(|l| l == format!("ok: {t}")),
            "test {t:?} did not pass:\n{out}"
        );
    }
    // What the flows leave: the published image is in the registry, and
    // nothing of the test suite is left in alice's working set.
    env.local
        .client()
        .get_manifest("alice/pc-x86-64-test-suite", "latest")
        .expect("the published image is in the registry");
    assert!(
        !env.alice
            .image_names()
            .iter()
            .any(|n| n.starts_with("pc-x86-64-test-suite")),
        "{:?}",
        env.alice.image_names()
    );
}

#[test]
fn help_topics_are_listed_and_shown_as_walt_names_them() {
    let out = walt(&["help", "list"]);
    out.assert_success();
    let mut lines = out.stdout.lines();
    assert_eq!(
        lines.next(),
        Some("The following help topics are available:"),
        "{out}"
    );
    let rows: Vec<&str> = lines.collect();
    let names: Vec<&str> = rows
        .iter()
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(names, TOPICS, "{out}");
    let width = TOPICS.iter().map(|t| t.len()).max().unwrap();
    for (row, topic) in rows.iter().zip(TOPICS) {
        assert_eq!(row.find(" -- "), Some(width), "aligned as WalT: {row:?}");
        let page = walt(&["help", "show", topic]);
        page.assert_success();
        let title = page.stdout.lines().next().unwrap_or("");
        assert_eq!(
            format!("# {}", &row[width + 4..]),
            title,
            "the list shows each page's title"
        );
        assert!(page.stdout.len() > 300, "{page}");
    }
    // Without a topic: help-intro, as WalT.
    assert_eq!(
        walt(&["help", "show"]).stdout,
        walt(&["help", "show", "help-intro"]).stdout
    );
    // The pages name the commands they are about.
    let page = |t: &str| walt(&["help", "show", t]).stdout;
    assert!(
        page("image-build").contains("--from-url") && page("image-build").contains("--sub-dir")
    );
    assert!(page("image-cp").contains("walt image cp <local-path> <image>:<path>"));
    assert!(page("registries").contains("<location>:<user>/<name>[:<tag>]"));
    assert!(page("shells").contains("Name of the image to save"));
    assert!(page("shell-completion").contains("walt advanced dump-bash-autocomplete"));

    let bad = walt(&["help", "show", "nope"]);
    assert!(!bad.success && bad.stdout.is_empty(), "{bad}");
    assert!(
        bad.stderr.contains("'nope'") && bad.stderr.contains("image-build"),
        "the error lists the topics:\n{bad}"
    );
}

#[test]
fn every_command_has_help_with_walt_options() {
    let top = walt(&["--help"]);
    top.assert_success();
    for c in ["image", "node", "device", "advanced", "help"] {
        assert!(
            top.stdout.lines().any(|l| l.trim_start().starts_with(c)),
            "walt --help lists {c}:\n{top}"
        );
    }
    let image = walt(&["image", "--help"]);
    image.assert_success();
    for c in IMAGE_SUBCOMMANDS {
        assert!(
            image
                .stdout
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{c} "))),
            "walt image --help lists {c}:\n{image}"
        );
    }
    // WalT's switches of each image command (test/syntax/walt-image-*.out).
    let options: [(&str, &[&str]); 11] = [
        ("show", &["--all", "--names-only", "--refresh"]),
        ("search", &[]),
        ("clone", &["--force"]),
        ("shell", &[]),
        ("build", &["--from-dir", "--from-url", "--sub-dir"]),
        ("cp", &[]),
        ("duplicate", &[]),
        ("remove", &[]),
        ("rename", &[]),
        ("publish", &["--registry"]),
        ("squash", &[]),
    ];
    for (c, opts) in options {
        let out = walt(&["image", c, "--help"]);
        out.assert_success();
        assert!(out.stdout.contains("-h, --help"), "{out}");
        for o in opts {
            assert!(out.stdout.contains(o), "walt image {c} --help: {o}\n{out}");
        }
        // `-h` too, as in WalT.
        let short = walt(&["image", c, "-h"]);
        short.assert_success();
        assert!(
            short.stdout.contains(&format!("Usage: walt image {c}")),
            "{short}"
        );
    }
    // Each points to its help topic, as WalT's build --help does.
    for (c, topic) in [
        ("clone", "registries"),
        ("search", "registries"),
        ("publish", "registries"),
        ("shell", "shells"),
        ("cp", "image-cp"),
        ("build", "image-build"),
    ] {
        let out = walt(&["image", c, "--help"]);
        assert!(
            out.stdout.contains(&format!("walt help show {topic}")) && TOPICS.contains(&topic),
            "{out}"
        );
    }
    for c in [
        "dump-bash-autocomplete",
        "dump-zsh-autocomplete",
        "update-default-images",
    ] {
        let out = walt(&["advanced", "--help"]);
        assert!(out.stdout.contains(c), "walt advanced --help: {c}\n{out}");
    }
}

/// Runs bash's completion of `line` (words split on spaces; a trailing
/// space starts an empty word) with the script `walt advanced
/// dump-bash-autocomplete` printed, and returns the candidates.
fn bash_complete(script: &Path, line: &str, envs: &[(&str, &Path)], path: &str) -> Vec<String> {
    let mut words: Vec<&str> = line.split(' ').collect();
    if words.is_empty() {
        words.push("");
    }
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prog = format!(
        "source '{}' || exit 1\n\
         COMP_WORDS=({})\n\
         COMP_CWORD={}\n\
         COMP_LINE='{line}'\n\
         COMP_POINT={}\n\
         f=$(complete -p walt | sed -n 's/.* -F \\([^ ]*\\) .*/\\1/p')\n\
         [ -n \"$f\" ] || exit 2\n\
         \"$f\" walt '{}' '{}'\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        script.display(),
        quoted.join(" "),
        words.len() - 1,
        line.len(),
        words[words.len() - 1],
        words.get(words.len().wrapping_sub(2)).unwrap_or(&""),
    );
    let mut cmd = Command::new("bash");
    cmd.args(["--norc", "--noprofile", "-c", &prog])
        .env("PATH", path);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = run(&mut cmd);
    assert!(out.success, "completion of {line:?}:\n{out}");
    out.stdout.lines().map(String::from).collect()
}

#[test]
fn bash_and_zsh_completion_and_man_pages_are_generated() {
    require("bash");
    require("zsh");
    require("man");
    let dir = tempfile::tempdir().unwrap();
    let (_bin, path) = walt_on_path();

    let bash = walt(&["advanced", "dump-bash-autocomplete"]);
    bash.assert_success();
    let script = dir.path().join("walt.bash");
    std::fs::write(&script, &bash.stdout).unwrap();
    run(Command::new("bash").arg("-n").arg(&script)).assert_success();
    let got = bash_complete(&script, "walt image ", &[], &path);
    for c in IMAGE_SUBCOMMANDS {
        assert!(
            got.iter().any(|g| g == c),
            "walt image <TAB>: {c} in {got:?}"
        );
    }
    let got = bash_complete(&script, "walt help show image-", &[], &path);
    assert_eq!(got, ["image-build", "image-cp"], "help topics complete");
    let got = bash_complete(&script, "walt advanced dump-b", &[], &path);
    assert_eq!(got, ["dump-bash-autocomplete"]);
    let got = bash_complete(&script, "walt image build --from-", &[], &path);
    assert!(
        got.contains(&"--from-dir".to_string()) && got.contains(&"--from-url".to_string()),
        "{got:?}"
    );

    let zsh = walt(&["advanced", "dump-zsh-autocomplete"]);
    zsh.assert_success();
    assert!(zsh.stdout.starts_with("#compdef walt"), "{zsh}");
    let zfile = dir.path().join("_walt");
    std::fs::write(&zfile, &zsh.stdout).unwrap();
    run(Command::new("zsh").arg("-n").arg(&zfile)).assert_success();
    for c in IMAGE_SUBCOMMANDS {
        assert!(zsh.stdout.contains(&format!("'{c}:")), "zsh knows {c}");
    }
    // zsh loads it as a completion function.
    let loaded = run(Command::new("zsh")
        .args(["-f", "-c"])
        .arg(format!(
            "fpath=({} $fpath); autoload -Uz compinit && compinit -u -D && autoload -Uz _walt && whence -w _walt",
            dir.path().display()
        ))
        .env("PATH", &path));
    assert!(
        loaded.success && loaded.stdout.contains("_walt: function"),
        "{loaded}"
    );

    let man = dir.path().join("man1");
    walt(&["advanced", "dump-man-pages", man.to_str().unwrap()]).assert_success();
    let mut pages: Vec<String> = std::fs::read_dir(&man)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for p in [
        "walt.1",
        "walt-image.1",
        "walt-help-show.1",
        "walt-advanced.1",
    ]
    .into_iter()
    .map(String::from)
    .chain(
        IMAGE_SUBCOMMANDS
            .iter()
            .map(|c| format!("walt-image-{c}.1")),
    ) {
        assert!(pages.contains(&p), "{p} in {pages:?}");
    }
    let rendered = run(Command::new("man")
        .args(["-P", "cat", "-l"])
        .arg(man.join("walt-image-build.1"))
        .env("MANWIDTH", "100")
        .env("LANG", "C.UTF-8"));
    rendered.assert_success();
    for w in [
        "NAME",
        "walt-image-build",
        "SYNOPSIS",
        "--from-url",
        "--sub-dir",
    ] {
        assert!(rendered.stdout.contains(w), "{w}:\n{rendered}");
    }
}

#[test]
fn bash_completion_names_the_users_images() {
    let env = Env::start();
    let img = env.busybox();
    env.push_local("alice/comp-img", "latest", &img);
    env.alice.clone_ok(&["local:alice/comp-img", "rpi-exp-1"]);
    env.alice.clone_ok(&["local:alice/comp-img", "rpi-exp-2"]);
    env.alice.clone_ok(&["local:alice/comp-img", "pc-other"]);
    let (_bin, path) = walt_on_path();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("walt.bash");
    std::fs::write(
        &script,
        walt(&["advanced", "dump-bash-autocomplete"]).stdout,
    )
    .unwrap();
    let envs = [
        ("WALT_CONFIG", env.alice.config_path()),
        ("HOME", env.alice.home().to_path_buf()),
    ];
    let envs: Vec<(&str, &Path)> = envs.iter().map(|(k, v)| (*k, v.as_path())).collect();
    for cmd in [
        "shell",
        "remove",
        "squash",
        "publish",
        "rename",
        "duplicate",
    ] {
        let got = bash_complete(&script, &format!("walt image {cmd} rpi-"), &envs, &path);
        assert_eq!(
            got,
            ["rpi-exp-1", "rpi-exp-2"],
            "walt image {cmd} rpi-<TAB>"
        );
    }
    // Not after an option, nor for the second name of rename.
    let got = bash_complete(&script, "walt image rename rpi-exp-1 rpi-", &envs, &path);
    assert!(!got.iter().any(|g| g == "rpi-exp-2"), "{got:?}");
}
