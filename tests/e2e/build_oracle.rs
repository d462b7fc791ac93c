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
