//! The build plan: stages, base classification, ARG/ENV scoping, steps and
//! the config they produce.

use std::collections::BTreeMap;

use walt_build::dockerfile::parse;
use walt_build::plan::{
    Action, BaseRef, Change, DEFAULT_PATH, HealthConfig, Options, Plan, PlanError, Settings, apply,
    classify, join_clean,
};
use walt_core::name::ImageName;
use walt_core::oci::RuntimeConfig;

fn opts(args: &[(&str, &str)]) -> Options {
    Options {
        build_args: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        user: "alice".into(),
        arch: "arm64".into(),
        variant: Some("v8".into()),
    }
}

fn store(n: &ImageName) -> bool {
    matches!(
        (n.owner.as_str(), n.name.as_str(), n.tag.as_str()),
        ("alice", "mine", "latest") | ("alice", "mine", "v2") | ("bob", "img", "latest")
    )
}

fn plan(text: &str, args: &[(&str, &str)]) -> Result<Plan, PlanError> {
    let df = parse("Dockerfile", text).unwrap();
    Plan::new(&df, &opts(args), &mut store)
}

/// The settings of the last stage, every stage on scratch or its stage base.
fn settings(text: &str, args: &[(&str, &str)]) -> Settings {
    let p = plan(text, args).unwrap();
    let mut done: Vec<Settings> = Vec::new();
    for st in &p.stages {
        let base = match st.base {
            BaseRef::Stage(j) => done[j].clone(),
            _ => Settings::scratch(),
        };
        done.push(p.stage_steps(st.index, &base).unwrap().settings);
    }
    done.pop().unwrap()
}

fn labels(text: &str, args: &[(&str, &str)]) -> BTreeMap<String, String> {
    settings(text, args).labels
}

fn name(o: &str, n: &str, t: &str) -> ImageName {
    ImageName {
        owner: o.into(),
        name: n.into(),
        tag: t.into(),
    }
}

#[test]
fn classification() {
    let c = |r: &str| classify(r, "alice", &mut store);
    assert_eq!(c("scratch"), BaseRef::Scratch);
    assert_eq!(c("mine"), BaseRef::Own(name("alice", "mine", "latest")));
    assert_eq!(c("mine:v2"), BaseRef::Own(name("alice", "mine", "v2")));
    assert_eq!(c("bob/img"), BaseRef::Store(name("bob", "img", "latest")));
    assert_eq!(
        c("bob/img:latest"),
        BaseRef::Store(name("bob", "img", "latest"))
    );
    for remote in [
        "debian:bookworm",
        "mine:v3",
        "bob/other",
        "waltplatform/pc-x86-64-default",
        "docker.io/library/debian",
        "localhost:5000/bob/img",
        "bob/img@sha256:0123",
        "Mine",
    ] {
        assert_eq!(c(remote), BaseRef::Remote(remote.into()), "{remote}");
    }
}

#[test]
fn stages_bases_and_needed() {
    let p = plan(
        "ARG BASE=bob/img\nFROM ${BASE} AS one\nFROM scratch AS unused\nFROM mine AS two\nCOPY --from=one /a /b\nCOPY --from=0 /a /c\nCOPY --from=debian:bookworm /x /y\nFROM two\n",
        &[],
    )
    .unwrap();
    let s = &p.stages;
    assert_eq!(s.len(), 4);
    assert_eq!(s[0].base, BaseRef::Store(name("bob", "img", "latest")));
    assert_eq!(s[0].base_text, "bob/img");
    assert_eq!(s[1].base, BaseRef::Scratch);
    assert_eq!(s[2].base, BaseRef::Own(name("alice", "mine", "latest")));
    assert_eq!(s[3].base, BaseRef::Stage(2));
    assert_eq!(
        s[2].copy_from.values().cloned().collect::<Vec<_>>(),
        vec![
            BaseRef::Stage(0),
            BaseRef::Stage(0),
            BaseRef::Remote("debian:bookworm".into())
        ]
    );
    assert_eq!(
        s.iter().map(|s| s.needed).collect::<Vec<_>>(),
        vec![true, false, true, true]
    );
    assert_eq!(p.last().index, 3);
    // The COPY step carries its source.
    let sp = p.stage_steps(2, &Settings::scratch()).unwrap();
    let Action::Copy(c) = &sp.steps[0].action else {
        panic!()
    };
    assert_eq!(c.from, Some(BaseRef::Stage(0)));
    let Action::Copy(c) = &sp.steps[2].action else {
        panic!()
    };
    assert_eq!(c.from, Some(BaseRef::Remote("debian:bookworm".into())));
}

#[test]
fn plan_errors_name_the_line() {
    let cases: &[(&str, usize, &str)] = &[
        (
            "LABEL a=b\nFROM scratch\n",
            1,
            "LABEL before the first FROM",
        ),
        ("ARG X\n", 1, "no FROM instruction"),
        (
            "FROM scratch AS a\nFROM scratch AS a\n",
            2,
            "duplicate stage name 'a'",
        ),
        (
            "FROM scratch AS a\nCOPY --from=a /x /y\n",
            2,
            "refers to its own stage",
        ),
        (
            "FROM scratch\nCOPY --from=1 /x /y\nFROM scratch\n",
            2,
            "no earlier stage",
        ),
        ("FROM ${NOPE}\n", 1, "expands to nothing"),
        ("FROM ${X\n", 1, "missing '}'"),
    ];
    for (text, line, msg) in cases {
        match plan(text, &[]) {
            Err(PlanError::At {
                line: l, reason, ..
            }) => {
                assert_eq!(l, *line, "{text:?}: {reason}");
                assert!(reason.contains(msg), "{text:?}: {reason}");
            }
            o => panic!("{text:?}: {o:?}"),
        }
    }
    // Phase 2 errors.
    let p = plan(
        "FROM scratch\nLABEL a=b\nEXPOSE 70000\nSTOPSIGNAL NOPE\n",
        &[],
    )
    .unwrap();
    let e = p.stage_steps(0, &Settings::scratch()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Dockerfile, line 3: invalid port '70000' in EXPOSE"
    );
    for (text, line, msg) in [
        (
            "FROM scratch\n\nSTOPSIGNAL NOPE\n",
            3,
            "invalid STOPSIGNAL 'NOPE'",
        ),
        ("FROM scratch\nEXPOSE 1-5000\n", 2, "invalid port range"),
        ("FROM scratch\nEXPOSE 80/xyz\n", 2, "invalid protocol"),
        ("FROM scratch\nENV A=${B:?required}\n", 2, "B: required"),
        (
            "FROM scratch\nENV A=1\nENV B=${A:=x}\n",
            3,
            "unsupported modifier",
        ),
        (
            "FROM scratch\nENV E=\nVOLUME $E\n",
            3,
            "VOLUME cannot be an empty string",
        ),
        (
            "FROM scratch\nENV E=\nCOPY a $E\n",
            3,
            "the destination is empty",
        ),
    ] {
        let p = plan(text, &[]).unwrap();
        match p.stage_steps(0, &Settings::scratch()) {
            Err(PlanError::At {
                line: l, reason, ..
            }) => {
                assert_eq!(l, line, "{text:?}: {reason}");
                assert!(reason.contains(msg), "{text:?}: {reason}");
            }
            o => panic!("{text:?}: {o:?}"),
        }
    }
    assert!(matches!(
        p.stage_steps(5, &Settings::scratch()),
        Err(PlanError::NoStage(5))
    ));
}

#[test]
fn arg_scoping() {
    let text = "ARG G=g\nARG G2=${G}2\nARG V=1\nFROM scratch\nARG G\nARG L=${G}-l\nARG U\nARG BP\nLABEL g=$G g2=${G2:-hidden} l=$L u=${U-unset} v=${V:-nov}\nARG V\nENV L=env\nARG L=later\nLABEL v=$V l=$L\nARG TARGETARCH\nLABEL arch=$TARGETARCH\n";
    let l = labels(text, &[]);
    assert_eq!(l["g"], "g");
    assert_eq!(l["g2"], "hidden", "globals need a re-declaration");
    assert_eq!(l["l"], "env", "ENV wins over ARG");
    assert_eq!(l["u"], "unset");
    assert_eq!(
        l["v"], "1",
        "a stage ARG without default takes the global value"
    );
    assert_eq!(l["arch"], "arm64");
    let l = labels(text, &[("G", "cli"), ("L", "cli-l"), ("U", "")]);
    assert_eq!(l["g"], "cli");
    assert_eq!(l["u"], "", "set but empty");
    // Build args overriding a default, and the unconsumed warning.
    let p = plan(
        text,
        &[("NOTDECLARED", "x"), ("HTTP_PROXY", "p"), ("G", "y")],
    )
    .unwrap();
    assert_eq!(
        p.warnings,
        vec!["build argument 'NOTDECLARED' was not consumed (no ARG NOTDECLARED in Dockerfile)"]
    );
    // FROM sees only globals (and platform args).
    let p = plan(
        "ARG TAG=v2\nFROM mine:${TAG}\nFROM --platform=$BUILDPLATFORM mine\n",
        &[],
    )
    .unwrap();
    assert_eq!(p.stages[0].base, BaseRef::Own(name("alice", "mine", "v2")));
    assert_eq!(p.stages[1].platform.as_deref(), Some("linux/arm64/v8"));
    let p = plan("ARG TAG=v2\nFROM mine:${TAG}\n", &[("TAG", "latest")]).unwrap();
    assert_eq!(
        p.stages[0].base,
        BaseRef::Own(name("alice", "mine", "latest"))
    );
}

#[test]
fn run_step_env_and_shell() {
    let p = plan(
        "FROM scratch\nARG A=1\nARG B=2\nENV B=env\nWORKDIR /w\nUSER u\nRUN echo $A\nSHELL [\"/bin/bash\", \"-xc\"]\nRUN [\"ls\", \"$A\"]\nRUN ls\n",
        &[("HTTP_PROXY", "http://p"), ("A", "cli")],
    )
    .unwrap();
    let sp = p.stage_steps(0, &Settings::scratch()).unwrap();
    let runs: Vec<_> = sp
        .steps
        .iter()
        .filter_map(|s| match &s.action {
            Action::Run(r) => Some((s.line, r.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(runs.len(), 3);
    let (line, r) = &runs[0];
    assert_eq!(*line, 7);
    assert_eq!(
        r.argv,
        vec!["/bin/sh", "-c", "echo $A"],
        "RUN is not expanded"
    );
    assert_eq!(
        r.env,
        vec![
            format!("PATH={DEFAULT_PATH}"),
            "B=env".into(),
            "A=cli".into(),
            "HTTP_PROXY=http://p".into()
        ]
    );
    assert_eq!(r.user, "u");
    assert_eq!(r.workdir, "/w");
    assert_eq!(runs[1].1.argv, vec!["ls", "$A"]);
    assert_eq!(runs[2].1.argv, vec!["/bin/bash", "-xc", "ls"]);
    // Proxy args never reach the image config.
    assert!(!sp.settings.env.iter().any(|e| e.contains("PROXY")));
    // Default workdir of RUN.
    let p = plan("FROM scratch\nRUN true\n", &[]).unwrap();
    let sp = p.stage_steps(0, &Settings::scratch()).unwrap();
    let Action::Run(r) = &sp.steps[0].action else {
        panic!()
    };
    assert_eq!(r.workdir, "/");
}

#[test]
fn copy_step_expansion() {
    let p = plan(
        "FROM scratch\nARG OWNER=1000\nENV SRC=files DIR=sub\nWORKDIR /app\nCOPY --chown=${OWNER}:0 --chmod=644 $SRC/* \"${DIR}/\"\nADD <<EOF <<'RAW' rel/\nv=$SRC\nEOF\nv=$SRC\nRAW\nCOPY a .\n",
        &[],
    )
    .unwrap();
    let sp = p.stage_steps(0, &Settings::scratch()).unwrap();
    let Action::Copy(c) = &sp.steps[3].action else {
        panic!()
    };
    assert!(!c.add);
    assert_eq!(c.sources, vec!["files/*"]);
    assert_eq!(c.dest, "/app/sub/");
    assert_eq!(c.chown.as_deref(), Some("1000:0"));
    assert_eq!(c.chmod.as_deref(), Some("644"));
    assert_eq!(c.from, None);
    let Action::Copy(c) = &sp.steps[4].action else {
        panic!()
    };
    assert!(c.add);
    assert_eq!(
        c.heredocs,
        vec![
            ("EOF".to_string(), "v=files\n".to_string()),
            ("RAW".to_string(), "v=$SRC\n".to_string())
        ]
    );
    assert_eq!(c.dest, "/app/rel/");
    let Action::Copy(c) = &sp.steps[5].action else {
        panic!()
    };
    assert_eq!(c.dest, "/app/");
}

#[test]
fn config_of_every_metadata_instruction() {
    let s = settings(
        "FROM scratch AS base\nCMD [\"base\"]\nFROM base\nENV A=1 B=\"two words\"\nENV A=3\nLABEL k=v\nWORKDIR a\nWORKDIR ../b/./c\nUSER ${A}\nEXPOSE 80 53/UDP 10-12\nVOLUME /v [\"/w\"]\nVOLUME [\"/x\", \"/y\"]\nSTOPSIGNAL SIGKILL\nSHELL [\"/bin/ash\", \"-c\"]\nENTRYPOINT run $A\nHEALTHCHECK --interval=5s CMD [\"check\"]\nONBUILD RUN echo $A\nMAINTAINER me\n",
        &[],
    );
    assert_eq!(
        s.env,
        vec![
            format!("PATH={DEFAULT_PATH}"),
            "A=3".into(),
            "B=two words".into()
        ]
    );
    assert_eq!(s.labels.get("k").map(String::as_str), Some("v"));
    assert_eq!(s.working_dir, "/b/c");
    assert_eq!(s.user, "3");
    assert_eq!(
        s.exposed_ports.iter().cloned().collect::<Vec<_>>(),
        vec!["10/tcp", "11/tcp", "12/tcp", "53/udp", "80/tcp"]
    );
    assert_eq!(
        s.volumes.iter().cloned().collect::<Vec<_>>(),
        vec!["/v", "/x", "/y", "[/w]"]
    );
    assert_eq!(s.stop_signal.as_deref(), Some("SIGKILL"));
    assert_eq!(s.shell, Some(vec!["/bin/ash".into(), "-c".into()]));
    assert_eq!(
        s.entrypoint,
        Some(vec!["/bin/ash".into(), "-c".into(), "run $A".into()])
    );
    assert_eq!(s.cmd, None, "ENTRYPOINT clears the inherited CMD");
    assert_eq!(
        s.healthcheck,
        Some(HealthConfig {
            test: vec!["CMD".into(), "check".into()],
            interval: 5_000_000_000,
            ..HealthConfig::default()
        })
    );
    assert_eq!(s.on_build, vec!["RUN echo $A"]);
    // CMD set in the same stage survives ENTRYPOINT.
    let s = settings("FROM scratch\nCMD x\nENTRYPOINT [\"e\"]\n", &[]);
    assert_eq!(s.cmd, Some(vec!["/bin/sh".into(), "-c".into(), "x".into()]));
    let s = settings(
        "FROM scratch\nHEALTHCHECK CMD true\nHEALTHCHECK NONE\n",
        &[],
    );
    assert_eq!(s.healthcheck.unwrap().test, vec!["NONE"]);
    // MAINTAINER goes to author.
    let p = plan("FROM scratch\nMAINTAINER me <m@x>\n", &[]).unwrap();
    assert_eq!(
        p.stage_steps(0, &Settings::scratch())
            .unwrap()
            .author
            .as_deref(),
        Some("me <m@x>")
    );
}

#[test]
fn apply_is_pure_and_ordered() {
    let mut s = Settings::default();
    let mut cmd_set = false;
    apply(
        &mut s,
        &Change::Env(vec![("A".into(), "1".into()), ("B".into(), "2".into())]),
        &mut cmd_set,
    );
    apply(
        &mut s,
        &Change::Env(vec![("A".into(), "3".into())]),
        &mut cmd_set,
    );
    assert_eq!(s.env, vec!["A=3", "B=2"]);
    s.cmd = Some(vec!["inherited".into()]);
    apply(&mut s, &Change::Entrypoint(vec!["e".into()]), &mut cmd_set);
    assert_eq!(s.cmd, None);
    apply(&mut s, &Change::Cmd(vec!["c".into()]), &mut cmd_set);
    apply(&mut s, &Change::Entrypoint(vec!["f".into()]), &mut cmd_set);
    assert_eq!(s.cmd, Some(vec!["c".into()]));
}

#[test]
fn runtime_config_round_trip() {
    let base: RuntimeConfig = serde_json::from_str(
        r#"{"Env":["PATH=/bin"],"Labels":{"walt.node.models":"pc-x86-64"},"Cmd":["sh"],"Hostname":"keep","ExposedPorts":{"22/tcp":{}},"Healthcheck":{"Test":["CMD","x"],"Retries":2}}"#,
    )
    .unwrap();
    let s = Settings::from_runtime(Some(&base));
    assert_eq!(s.env, vec!["PATH=/bin"]);
    assert_eq!(s.cmd, Some(vec!["sh".into()]));
    assert_eq!(s.healthcheck.as_ref().unwrap().retries, 2);
    assert!(s.exposed_ports.contains("22/tcp"));
    let mut s2 = s.clone();
    s2.user = "u".into();
    s2.cmd = None;
    let rc = s2.to_runtime(Some(&base));
    assert_eq!(rc.extra["Hostname"], "keep", "unknown keys are kept");
    assert_eq!(rc.extra["User"], "u");
    assert!(!rc.extra.contains_key("Cmd"));
    assert_eq!(rc.labels.as_ref().unwrap()["walt.node.models"], "pc-x86-64");
    assert_eq!(Settings::from_runtime(Some(&rc)), s2);
    assert_eq!(Settings::from_runtime(None), Settings::default());
}

#[test]
fn workdir_join() {
    assert_eq!(join_clean("", "a"), "/a");
    assert_eq!(join_clean("/x/y", "../z"), "/x/z");
    assert_eq!(join_clean("/x", "/abs/./p/"), "/abs/p");
    assert_eq!(join_clean("/", "../../.."), "/");
}

#[test]
fn base_onbuild_triggers_run_first() {
    let p = plan("FROM bob/img\nLABEL own=1\n", &[]).unwrap();
    let base = Settings {
        env: vec!["X=x".into()],
        on_build: vec!["LABEL trig=$X".into(), "RUN make".into()],
        ..Settings::default()
    };
    let sp = p.stage_steps(0, &base).unwrap();
    assert_eq!(sp.steps.len(), 3);
    assert_eq!(sp.steps[0].line, 1);
    assert_eq!(sp.steps[0].text, "LABEL trig=$X");
    assert!(matches!(sp.steps[1].action, Action::Run(_)));
    assert_eq!(sp.settings.labels["trig"], "x");
    assert!(sp.settings.on_build.is_empty(), "triggers are consumed");
    for (bad, msg) in [
        ("FROM x", "FROM is not allowed as a trigger"),
        ("COPY --from=a b c", "COPY --from is not supported"),
        ("BOGUS", "unknown instruction 'BOGUS'"),
    ] {
        let base = Settings {
            on_build: vec![bad.into()],
            ..Settings::default()
        };
        let e = p.stage_steps(0, &base).unwrap_err().to_string();
        assert!(e.starts_with("Dockerfile, line 1: ONBUILD trigger"), "{e}");
        assert!(e.contains(msg), "{e}");
    }
}

#[test]
fn hostile_expansion_is_bounded() {
    // Doubling a variable: each word stops at 1 MiB, the config at 1 MiB.
    let mut text = "FROM scratch\nENV A=xxxxxxxxxxxxxxxx\n".to_string();
    for _ in 0..15 {
        text.push_str("ENV A=$A$A\n");
    }
    text.push_str("ENV B=$A C=$A\n");
    let p = plan(&text, &[]).unwrap();
    let Err(e) = p.stage_steps(0, &Settings::scratch()) else {
        panic!("not refused")
    };
    assert!(e.to_string().contains("grows over 1 MiB"), "{e}");
    // Many RUNs each carrying a large environment.
    let mut text = "FROM scratch\nENV A=xxxxxxxxxxxxxxxx\n".to_string();
    for _ in 0..15 {
        text.push_str("ENV A=$A$A\n");
    }
    text.push_str(&"RUN true\n".repeat(200));
    let p = plan(&text, &[]).unwrap();
    let Err(e) = p.stage_steps(0, &Settings::scratch()) else {
        panic!("not refused")
    };
    assert!(e.to_string().contains("grow over 64 MiB"), "{e}");
}

#[test]
fn hostile_args_are_bounded() {
    let mut doubling = "ARG A=xxxxxxxxxxxxxxxx\n".to_string();
    for _ in 0..15 {
        doubling.push_str("ARG A=$A$A\n");
    }
    let global = format!("{doubling}ARG B=$A C=$A\nFROM scratch\n");
    match plan(&global, &[]) {
        Err(PlanError::At { line, reason, .. }) => {
            assert_eq!(line, 17);
            assert!(
                reason.contains("build arguments grow over 1 MiB"),
                "{reason}"
            );
        }
        _ => panic!("not refused"),
    }
    let local = format!("FROM scratch\n{doubling}ARG B=$A C=$A\n");
    let p = plan(&local, &[]).unwrap();
    let Err(e) = p.stage_steps(0, &Settings::scratch()) else {
        panic!("not refused")
    };
    assert!(
        e.to_string().contains("build arguments grow over 1 MiB"),
        "{e}"
    );
}

#[test]
fn from_platform_must_be_one_walt_can_build_for() {
    // kept as written (expanded): the server parses it for the config
    let p = plan(
        "ARG P=linux/arm/v7\nFROM --platform=linux/arm64 scratch\nFROM --platform=$P scratch\n",
        &[],
    )
    .unwrap();
    assert_eq!(p.stages[0].platform.as_deref(), Some("linux/arm64"));
    assert_eq!(p.stages[1].platform.as_deref(), Some("linux/arm/v7"));
    for bad in ["windows/amd64", "linux/x86_64", "linux/arm/v9", "linux"] {
        let e = plan(
            &format!("FROM scratch\nFROM --platform={bad} scratch\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("line 2: unsupported platform") && e.contains(&format!("'{bad}'")),
            "{e}"
        );
    }
}
