//! Oracle for the build plan: Dockerfiles of metadata instructions only,
//! built by the real `docker build`; the image config docker gives them
//! (`docker image inspect` .Config) must equal, field by field, what
//! `walt_build::plan` computes on the same base config.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use walt_build::dockerfile;
use walt_build::plan::{Options, Plan, Settings};
use walt_core::oci::RuntimeConfig;
use walt_e2e::docker::Dockerd;

/// The fields compared.
const FIELDS: &[&str] = &[
    "Env",
    "Labels",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Volumes",
    "StopSignal",
    "OnBuild",
    "Shell",
    "Healthcheck",
];

fn inspect_config(d: &Dockerd, image: &str) -> Value {
    let out = d
        .docker(&["image", "inspect", "--format", "{{json .Config}}", image])
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Docker writes empty values as null, "" or {}: make absent, null and
/// empty the same.
fn field(v: &Value, k: &str) -> Value {
    match v.get(k) {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) if s.is_empty() => Value::Null,
        Some(Value::Object(o)) if o.is_empty() => Value::Null,
        Some(Value::Array(a)) if a.is_empty() && k != "Cmd" && k != "Entrypoint" => Value::Null,
        Some(x) => x.clone(),
    }
}

/// Builds `dockerfile` with docker and with the plan, compares the configs.
fn check(
    d: &Dockerd,
    dir: &Path,
    tag: &str,
    text: &str,
    args: &[(&str, &str)],
    base: Option<&str>,
) {
    let ctx = dir.join(tag);
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), text).unwrap();
    let image = format!("walt-oracle/{tag}:latest");
    let ctx_s = ctx.display().to_string();
    let mut cmd: Vec<String> = ["build", "--network=none", "-q", "-t", &image]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (k, v) in args {
        cmd.push("--build-arg".into());
        cmd.push(format!("{k}={v}"));
    }
    cmd.push(ctx_s);
    let argv: Vec<&str> = cmd.iter().map(String::as_str).collect();
    d.docker(&argv).unwrap();
    let got = inspect_config(d, &image);

    let df = dockerfile::parse("Dockerfile", text).unwrap();
    let opts = Options {
        build_args: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        user: "alice".into(),
        arch: "amd64".into(),
        variant: None,
    };
    let plan = Plan::new(&df, &opts, &mut |_| false).unwrap();
    let base_settings = match base {
        None => Settings::scratch(),
        Some(b) => {
            let rc: RuntimeConfig = serde_json::from_value(inspect_config(d, b)).unwrap();
            Settings::from_runtime(Some(&rc))
        }
    };
    // Stages in order; a stage based on another takes its result.
    let mut results: Vec<Settings> = Vec::new();
    for st in &plan.stages {
        let b = match st.base {
            walt_build::plan::BaseRef::Stage(j) => results[j].clone(),
            walt_build::plan::BaseRef::Scratch => Settings::scratch(),
            _ => base_settings.clone(),
        };
        results.push(plan.stage_steps(st.index, &b).unwrap().settings);
    }
    let ours = results.last().unwrap().to_runtime(None);
    let ours = serde_json::to_value(&ours).unwrap();
    for k in FIELDS {
        assert_eq!(
            field(&ours, k),
            field(&got, k),
            "field {k} differs for {tag}\nDockerfile:\n{text}\ndocker: {got:#}\nplan: {ours:#}"
        );
    }
}

#[test]
fn build_plan_config_matches_docker() {
    let d = Dockerd::start().unwrap();
    d.import_busybox("walt-oracle/busybox:latest", Some("pc-x86-64"), "oracle")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Expansion table (docker's "Environment replacement" examples and more).
    // The dockerd here (20.10) runs the classic builder, which lacks the
    // colon-less `${X-d}`/`${X+d}` of buildkit: those are in the unit tables.
    check(
        &d,
        dir.path(),
        "expand",
        r#"FROM scratch
ENV FOO=/bar EMPTY= SP="a b"
WORKDIR ${FOO}
LABEL a=$FOO b=${FOO} c=${FOO:-dflt} d=${NOPE:-dflt} e=${FOO:+alt} f=${NOPE:+alt}
LABEL g=${EMPTY:-dflt} i=${EMPTY:+alt} k=\$FOO l='$FOO' m="$FOO"
LABEL n="${SP}" o=x\ y p="q\"r" "s t"=u v=${FOO}/sub w=$FOO$FOO
ENV abc=hello
ENV abc=bye def=$abc
ENV ghi=$abc
LABEL def=$def ghi=$ghi
"#,
        &[],
        None,
    );

    // ARG scoping and build args.
    check(
        &d,
        dir.path(),
        "args",
        r#"ARG GLOBAL=g1
ARG BASE=scratch
ARG ONLYGLOBAL=og
FROM ${BASE}
ARG GLOBAL
ARG LOCAL=l1
ARG OVER=o1
ARG UNSET
ARG CHAIN=${LOCAL}-x
ENV OVER=fromenv
LABEL global=${GLOBAL} local=${LOCAL} over=${OVER} unset=${UNSET:-none} onlyglobal=${ONLYGLOBAL:-notvisible} chain=${CHAIN}
ARG OVER=o2
LABEL over2=$OVER
USER ${LOCAL}:${GLOBAL}
"#,
        &[("LOCAL", "from-cli"), ("GLOBAL", "g-cli")],
        None,
    );

    // Every metadata instruction, on the busybox image.
    check(
        &d,
        dir.path(),
        "meta",
        r#"FROM walt-oracle/busybox:latest
ENV P1=8080 SIG=SIGUSR1 VOL=/data
LABEL walt.node.models=pc-x86-64 "multi word"="v a l"
WORKDIR /a
WORKDIR b
WORKDIR ../c/./d
USER 1000:1000
EXPOSE 80 ${P1}/udp 9000-9002
VOLUME ["/v1", "$VOL"]
VOLUME /v2 /v3
STOPSIGNAL ${SIG}
SHELL ["/bin/sh", "-ec"]
CMD echo hello $HOME
ENTRYPOINT ["/bin/echo", "x"]
ONBUILD RUN echo triggered
ONBUILD   LABEL x=y
HEALTHCHECK --interval=30s --timeout=1m30s --retries=4 CMD wget -q localhost || exit 1
"#,
        &[],
        Some("walt-oracle/busybox:latest"),
    );

    // ENTRYPOINT without CMD in the stage clears the inherited CMD;
    // shell-form ENTRYPOINT; exec CMD; HEALTHCHECK NONE.
    check(
        &d,
        dir.path(),
        "entry",
        r#"FROM walt-oracle/busybox:latest AS base
CMD ["sh"]
HEALTHCHECK CMD ["true"]
FROM base
ENTRYPOINT top -b
HEALTHCHECK NONE
"#,
        &[],
        Some("walt-oracle/busybox:latest"),
    );

    // Old forms, quoting inside values, WORKDIR from ENV, relative chains.
    check(
        &d,
        dir.path(),
        "oldforms",
        r#"FROM scratch
ENV OLD  spaced   value "q"  $PATH
LABEL oldlabel one two
ENV HOME=/home/u D="dq \$x \"in\"" S='sq $HOME' M=a"b c"d
WORKDIR $HOME
WORKDIR ./sub/../other
LABEL home=$HOME d=$D s=$S m=$M
EXPOSE 53/UDP 22
STOPSIGNAL 9
USER nobody
"#,
        &[("UNUSED", "x")],
        None,
    );

    // ONBUILD triggers of the base run in the child and are not inherited.
    check(
        &d,
        dir.path(),
        "onbase",
        "FROM scratch\nENV X=fromenv\nONBUILD LABEL trig=$X\nONBUILD ENV X2=y\nONBUILD WORKDIR sub\n",
        &[],
        None,
    );
    check(
        &d,
        dir.path(),
        "onchild",
        "FROM walt-oracle/onbase:latest\nLABEL c=$X2\n",
        &[],
        Some("walt-oracle/onbase:latest"),
    );

    // Multi-stage, escape directive, continuations, comments.
    check(
        &d,
        dir.path(),
        "multi",
        "# escape=`\nFROM scratch AS one\nLABEL from=one\nFROM one\n# a comment\nENV A=1 `\n    # inside\n    B=`$A `\n    C=${A}\nLABEL path=c:\\dir\\sub win=`$B\n",
        &[],
        None,
    );
}

/// A tar of `pkg/` (0750, 42:43), `pkg/file` (0600, 42:43), a symlink and
/// a hard link to it; gzip-compressed when `gz`.
fn owned_tar(gz: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |kind: tar::EntryType, path: &str, mode: u32, link: Option<&str>, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(42);
        h.set_gid(43);
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_000);
        match link {
            Some(l) => b.append_link(&mut h, path, l).unwrap(),
            None => b.append_data(&mut h, path, data).unwrap(),
        }
    };
    add(tar::EntryType::Directory, "pkg/", 0o750, None, b"");
    add(
        tar::EntryType::Regular,
        "pkg/file",
        0o600,
        None,
        b"packed\n",
    );
    add(
        tar::EntryType::Symlink,
        "pkg/link",
        0o777,
        Some("file"),
        b"",
    );
    add(
        tar::EntryType::Link,
        "pkg/hard",
        0o600,
        Some("pkg/file"),
        b"",
    );
    let plain = b.into_inner().unwrap();
    if !gz {
        return plain;
    }
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(&plain).unwrap();
    e.finish().unwrap()
}

/// A build context: files (path, content, mode) and symlinks (path, target).
struct Ctx<'a> {
    files: &'a [(&'a str, &'a [u8], u32)],
    links: &'a [(&'a str, &'a str)],
}

/// The config fields a build sets, compared with docker's.
const BUILT_FIELDS: &[&str] = &["Env", "Labels", "Entrypoint", "Cmd", "WorkingDir", "User"];

/// Builds `text` in `ctx` with docker and with walt (as alice, whose server
/// has docker's `oracle/busybox` as user `oracle`'s `busybox`), then
/// compares the file trees (paths, types, modes, owners, contents, link
/// targets; not mtimes) and the configs. Returns the differences.
fn compare_build(
    d: &Dockerd,
    alice: &walt_e2e::Walt,
    data_dir: &Path,
    dir: &Path,
    tag: &str,
    text: &str,
    ctx: &Ctx,
) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let root = dir.join(tag);
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("Dockerfile"), text).unwrap();
    for (p, data, mode) in ctx.files {
        let f = root.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, data).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    for (p, target) in ctx.links {
        let f = root.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, &f).unwrap();
    }
    let image = format!("walt-oracle-tree/{tag}:latest");
    let root_s = root.display().to_string();
    d.docker(&["build", "--network=none", "-q", "-t", &image, &root_s])
        .unwrap();
    let theirs = walt_e2e::tree::docker_image_tree(d, &image).unwrap();
    let their_config = inspect_config(d, &image);

    let out = alice.run(&["image", "build", "--from-dir", &root_s, tag]);
    let mut diffs = Vec::new();
    if !out.success {
        diffs.push(format!(
            "{tag}: walt cannot build what docker builds:\n{out}"
        ));
        return diffs;
    }
    let merged = walt_e2e::tree::Merged::image(data_dir, "alice", tag).unwrap();
    let ours = merged.tree().unwrap();
    drop(merged);
    for l in walt_e2e::tree::diff_trees(&ours, &theirs, |_| false) {
        diffs.push(format!("{tag}: walt vs docker: {l}"));
    }
    let our_config = walt_e2e::tree::image_config(data_dir, "alice", tag).unwrap();
    for k in BUILT_FIELDS {
        let (o, t) = (field(&our_config["config"], k), field(&their_config, k));
        if o != t {
            diffs.push(format!("{tag}: config {k}: walt {o} vs docker {t}"));
        }
    }
    diffs
}

/// The same Dockerfiles built by walt and by the real `docker build` give
/// the same file tree and the same config: COPY rules (file to a
/// directory, a directory's content, a destination without a slash,
/// globs, --chown, symlinks of the context), WORKDIR creation, USER and
/// RUN, ADD of tars, multi-stage, deletions.
#[test]
fn built_trees_and_configs_match_docker() {
    let d = Dockerd::start().unwrap();
    d.import_busybox("oracle/busybox:latest", Some("pc-x86-64"), "oracle")
        .unwrap();
    let yaml = format!(
        "registries: []\ndocker:\n    socket: {}\n",
        d.socket().display()
    );
    let server = walt_e2e::WaltServer::start_with_config(&yaml).unwrap();
    let oracle = server.cli("oracle", &[]);
    oracle.clone_ok(&["docker:oracle/busybox", "busybox"]);
    let alice = server.cli("alice", &[]);
    let data = server.data_dir();
    let dir = tempfile::tempdir().unwrap();
    let mut diffs = Vec::new();

    // The base, as docker has it and as walt cloned it: the same tree (the
    // comparison's own check).
    let base_theirs = walt_e2e::tree::docker_image_tree(&d, "oracle/busybox:latest").unwrap();
    let base_ours = walt_e2e::tree::Merged::image(&data, "oracle", "busybox")
        .unwrap()
        .tree()
        .unwrap();
    assert!(base_ours.contains_key("bin/busybox") && base_ours.contains_key("etc/passwd"));
    assert_eq!(
        walt_e2e::tree::diff_trees(&base_ours, &base_theirs, |_| false),
        Vec::<String>::new()
    );

    let copy_ctx = Ctx {
        files: &[
            ("file.txt", b"file\n", 0o644),
            ("other.txt", b"other\n", 0o640),
            ("exec.sh", b"#!/bin/sh\necho hi\n", 0o755),
            ("dir/a.conf", b"a\n", 0o644),
            ("dir/b.conf", b"b\n", 0o600),
            ("dir/notes", b"notes\n", 0o644),
            ("dir/sub/deep.txt", b"deep\n", 0o444),
            ("links/target.txt", b"target\n", 0o644),
        ],
        links: &[
            ("links/rel", "target.txt"),
            ("links/up", "../file.txt"),
            ("links/abs", "/etc/passwd"),
            ("links/dangling", "nowhere"),
            ("links/dirlink", "../dir"),
        ],
    };
    diffs.extend(compare_build(
        &d,
        &alice,
        &data,
        dir.path(),
        "copy",
        "FROM oracle/busybox\n\
         RUN echo 'app:x:1000:1001::/home/app:/bin/sh' >> /etc/passwd && printf 'app:x:1000:\\nstaff:x:1001:\\n' >> /etc/group\n\
         COPY file.txt /dest-dir/\n\
         COPY file.txt /newname\n\
         COPY file.txt /root\n\
         COPY exec.sh /bin/\n\
         COPY dir /dircontents/\n\
         COPY dir /dircontents-noslash\n\
         COPY dir/sub /nested/new/parents/\n\
         COPY *.txt /globs/\n\
         COPY dir/*.conf dir/sub /globs2/\n\
         COPY --chown=1000:1000 dir /owned/\n\
         COPY --chown=app other.txt /owned-by-name\n\
         COPY --chown=app:staff other.txt /owned-by-names\n\
         COPY --chown=4242 file.txt /owned-numeric\n\
         COPY links/ /links/\n\
         COPY links/rel /single-link-copy\n\
         COPY file.txt other.txt /two-files/\n",
        &copy_ctx,
    ));

    diffs.extend(compare_build(
        &d,
        &alice,
        &data,
        dir.path(),
        "user",
        "FROM oracle/busybox\n\
         RUN echo 'app:x:1000:1000:app:/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1000:' >> /etc/group\n\
         WORKDIR /work/deep/dir\n\
         RUN pwd > pwd-was && touch relative-file\n\
         USER app\n\
         RUN id > /tmp/id-as-app && echo \"$HOME\" > /tmp/home-as-app && touch /tmp/made-by-app\n\
         USER 1234:5678\n\
         RUN id -u > /tmp/id-numeric && id -g >> /tmp/id-numeric && touch /tmp/made-by-1234\n\
         WORKDIR /made-as-user\n\
         USER root\n\
         WORKDIR relative/child\n\
         ENV X=1 Y=\"a b\"\n\
         LABEL extra=yes\n\
         CMD [\"sh\"]\n\
         ENTRYPOINT [\"/bin/sh\", \"-c\"]\n",
        &Ctx {
            files: &[],
            links: &[],
        },
    ));

    let gz = owned_tar(true);
    let plain = owned_tar(false);
    diffs.extend(compare_build(
        &d,
        &alice,
        &data,
        dir.path(),
        "add",
        "FROM oracle/busybox\n\
         ADD pkg.tar.gz /opt/\n\
         ADD pkg.tar.gz /opt2\n\
         ADD plain.tar /plain/\n\
         COPY pkg.tar.gz /notunpacked/\n\
         ADD file.txt /added-file\n\
         ADD file.txt /added-dir/\n",
        &Ctx {
            files: &[
                ("pkg.tar.gz", &gz, 0o644),
                ("plain.tar", &plain, 0o644),
                ("file.txt", b"file\n", 0o644),
            ],
            links: &[],
        },
    ));

    diffs.extend(compare_build(
        &d,
        &alice,
        &data,
        dir.path(),
        "stages",
        "FROM oracle/busybox AS one\n\
         RUN mkdir -p /out/sub && echo x > /out/x && ln -s x /out/y && chmod 700 /out/sub && chown 5:6 /out/x\n\
         FROM oracle/busybox\n\
         COPY --from=one /out /from-one/\n\
         COPY --from=one /out/x /single-from-one\n\
         RUN rm /etc/walt-test-marker && rm -r /root && mkdir /tmp2 && echo changed > /etc/group\n\
         RUN mkdir /root && echo new > /root/new && rm -r /bin/cat /from-one/sub\n",
        &Ctx {
            files: &[],
            links: &[],
        },
    ));

    // A RUN sees the image as it is: no /tmp when the image has none,
    // and a RUN adds nothing of its sandbox to the layer.
    diffs.extend(compare_build(
        &d,
        &alice,
        &data,
        dir.path(),
        "notmp",
        "FROM oracle/busybox\n\
         RUN rm -r /tmp\n\
         RUN if [ -e /tmp ]; then echo present; else echo absent; fi > /root/tmp-was\n",
        &Ctx {
            files: &[],
            links: &[],
        },
    ));

    assert!(
        diffs.is_empty(),
        "walt's builds differ from docker's:\n{}",
        diffs.join("\n")
    );
}
