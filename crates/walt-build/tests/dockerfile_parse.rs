//! Dockerfile parsing: every instruction, directives, continuations,
//! heredocs, and each error with its line.

use walt_build::dockerfile::{
    Cmd, CopyArgs, DockerfileError, Health, Heredoc, Kind, MAX_SIZE, parse, parse_bytes,
};

fn kinds(text: &str) -> Vec<(usize, Kind)> {
    parse("Dockerfile", text)
        .unwrap()
        .instructions
        .into_iter()
        .map(|i| (i.line, i.kind))
        .collect()
}

fn one(text: &str) -> Kind {
    let k = kinds(&format!("FROM scratch\n{text}\n"));
    assert_eq!(k.len(), 2, "{text}");
    k.into_iter().nth(1).unwrap().1
}

fn err(text: &str) -> (usize, String) {
    match parse("Dockerfile", text).unwrap_err() {
        DockerfileError::Syntax { line, reason, file } => {
            assert_eq!(file, "Dockerfile");
            (line, reason)
        }
        e => panic!("unexpected {e:?}"),
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn from_forms() {
    assert_eq!(
        kinds("FROM debian:bookworm\nfrom --platform=linux/arm64 base As Build\n"),
        vec![
            (
                1,
                Kind::From {
                    image: "debian:bookworm".into(),
                    name: None,
                    platform: None
                }
            ),
            (
                2,
                Kind::From {
                    image: "base".into(),
                    name: Some("build".into()),
                    platform: Some("linux/arm64".into())
                }
            ),
        ]
    );
}

#[test]
fn run_forms() {
    assert_eq!(
        one("RUN echo hi && ls"),
        Kind::Run {
            cmd: Cmd::Shell("echo hi && ls".into()),
            heredocs: vec![],
            network: None
        }
    );
    assert_eq!(
        one(r#"RUN ["/bin/echo", "a b"]"#),
        Kind::Run {
            cmd: Cmd::Exec(s(&["/bin/echo", "a b"])),
            heredocs: vec![],
            network: None
        }
    );
    // Not valid JSON: shell form.
    assert_eq!(
        one("RUN [ -f /x ] || true"),
        Kind::Run {
            cmd: Cmd::Shell("[ -f /x ] || true".into()),
            heredocs: vec![],
            network: None
        }
    );
    assert_eq!(
        one("RUN --network=none true"),
        Kind::Run {
            cmd: Cmd::Shell("true".into()),
            heredocs: vec![],
            network: Some("none".into())
        }
    );
}

#[test]
fn run_heredocs() {
    let k = kinds(
        "FROM scratch\nRUN <<EOF\necho a\n  echo b\nEOF\nRUN <<-'X' cat 3<<Y\n\t\tone $A\n\tX\ntwo\nY\nLABEL a=b\n",
    );
    assert_eq!(k.len(), 4);
    assert_eq!(
        k[1],
        (
            2,
            Kind::Run {
                cmd: Cmd::Shell("<<EOF".into()),
                heredocs: vec![Heredoc {
                    name: "EOF".into(),
                    fd: None,
                    body: "echo a\n  echo b\n".into(),
                    expand: true,
                    strip_tabs: false
                }],
                network: None
            }
        )
    );
    let Kind::Run { heredocs, cmd, .. } = &k[2].1 else {
        panic!()
    };
    assert_eq!(k[2].0, 6);
    assert_eq!(cmd, &Cmd::Shell("<<-'X' cat 3<<Y".into()));
    assert_eq!(heredocs[0].body, "one $A\n");
    assert!(!heredocs[0].expand && heredocs[0].strip_tabs);
    assert_eq!(heredocs[1].fd, Some(3));
    assert_eq!(heredocs[1].body, "two\n");
    assert_eq!(k[3].0, 11);
    // The instruction's last line covers the bodies.
    let df = parse("Dockerfile", "FROM scratch\nRUN <<EOF\nx\nEOF\n").unwrap();
    assert_eq!(df.instructions[1].end_line, 4);
}

#[test]
fn copy_add() {
    assert_eq!(
        one("COPY --from=build --chown=1:2 --chmod=0755 --link a b* /dst/"),
        Kind::Copy(CopyArgs {
            from: Some("build".into()),
            chown: Some("1:2".into()),
            chmod: Some("0755".into()),
            link: true,
            sources: s(&["a", "b*"]),
            heredocs: vec![],
            dest: "/dst/".into(),
            exec_form: false,
        })
    );
    assert_eq!(
        one(r#"ADD ["a b", "/d e"]"#),
        Kind::Add(CopyArgs {
            sources: s(&["a b"]),
            dest: "/d e".into(),
            exec_form: true,
            ..CopyArgs::default()
        })
    );
    let Kind::Copy(c) = one("COPY <<EOF /etc/conf\nk=$V\nEOF") else {
        panic!()
    };
    assert!(c.sources.is_empty());
    assert_eq!(c.heredocs.len(), 1);
    assert_eq!(c.heredocs[0].body, "k=$V\n");
    assert_eq!(c.dest, "/etc/conf");
}

#[test]
fn env_label_arg() {
    assert_eq!(
        one(r#"ENV A=1 B="x y" C=a\ b D='$x'"#),
        Kind::Env(vec![
            ("A".into(), "1".into()),
            ("B".into(), "\"x y\"".into()),
            ("C".into(), "a\\ b".into()),
            ("D".into(), "'$x'".into()),
        ])
    );
    assert_eq!(
        one("ENV OLD value with  spaces"),
        Kind::Env(vec![("OLD".into(), "value with  spaces".into())])
    );
    assert_eq!(
        one(r#"LABEL "a b"=c d=e"#),
        Kind::Label(vec![
            ("\"a b\"".into(), "c".into()),
            ("d".into(), "e".into())
        ])
    );
    assert_eq!(
        one("ARG A B=2 C="),
        Kind::Arg(vec![
            ("A".into(), None),
            ("B".into(), Some("2".into())),
            ("C".into(), Some(String::new())),
        ])
    );
}

#[test]
fn simple_instructions() {
    assert_eq!(one("WORKDIR /a b"), Kind::Workdir("/a b".into()));
    assert_eq!(one("USER u:g"), Kind::User("u:g".into()));
    assert_eq!(one("STOPSIGNAL SIGINT"), Kind::Stopsignal("SIGINT".into()));
    assert_eq!(
        one("MAINTAINER me <m@x>"),
        Kind::Maintainer("me <m@x>".into())
    );
    assert_eq!(one("CMD [\"a\"]"), Kind::Cmd(Cmd::Exec(s(&["a"]))));
    assert_eq!(one("CMD --help"), Kind::Cmd(Cmd::Shell("--help".into())));
    assert_eq!(
        one("ENTRYPOINT top -b"),
        Kind::Entrypoint(Cmd::Shell("top -b".into()))
    );
    assert_eq!(one("EXPOSE 80 53/udp"), Kind::Expose(s(&["80", "53/udp"])));
    assert_eq!(one("VOLUME /a /b"), Kind::Volume(s(&["/a", "/b"])));
    assert_eq!(one("VOLUME [\"/a b\"]"), Kind::Volume(s(&["/a b"])));
    assert_eq!(
        one("SHELL [\"/bin/bash\", \"-c\"]"),
        Kind::Shell(s(&["/bin/bash", "-c"]))
    );
}

#[test]
fn healthcheck_and_onbuild() {
    assert_eq!(one("HEALTHCHECK NONE"), Kind::Healthcheck(Health::None));
    assert_eq!(
        one(
            "HEALTHCHECK --interval=1m --timeout=5s --start-period=1s --start-interval=2s --retries=3 CMD curl x"
        ),
        Kind::Healthcheck(Health::Check {
            cmd: Cmd::Shell("curl x".into()),
            interval: Some(60_000_000_000),
            timeout: Some(5_000_000_000),
            start_period: Some(1_000_000_000),
            start_interval: Some(2_000_000_000),
            retries: Some(3),
        })
    );
    assert_eq!(
        one("ONBUILD run echo $X"),
        Kind::Onbuild {
            expression: "run echo $X".into(),
            trigger: Box::new(Kind::Run {
                cmd: Cmd::Shell("echo $X".into()),
                heredocs: vec![],
                network: None
            })
        }
    );
}

#[test]
fn continuations_comments_directives() {
    let df = parse(
        "Dockerfile",
        "# syntax=docker/dockerfile:1\n# escape=`\n\nFROM scratch\nRUN echo a `\n# comment inside\n\n  b\nENV X=c:\\dir\n",
    )
    .unwrap();
    assert_eq!(df.escape, '`');
    assert_eq!(df.syntax.as_deref(), Some("docker/dockerfile:1"));
    assert_eq!(df.instructions[1].line, 5);
    assert_eq!(
        df.instructions[1].kind,
        Kind::Run {
            cmd: Cmd::Shell("echo a   b".into()),
            heredocs: vec![],
            network: None
        }
    );
    assert_eq!(df.instructions[1].text, "RUN echo a   b");
    assert_eq!(
        df.instructions[2].kind,
        Kind::Env(vec![("X".into(), "c:\\dir".into())])
    );
    // A directive after an instruction or a comment is a comment.
    let df = parse("Dockerfile", "# hello\n# escape=`\nFROM scratch\n").unwrap();
    assert_eq!(df.escape, '\\');
    let df = parse("Dockerfile", "FROM scratch\n# escape=`\n").unwrap();
    assert_eq!(df.escape, '\\');
    // CRLF and BOM.
    let df = parse("Dockerfile", "\u{feff}FROM scratch\r\nRUN a \\\r\n b\r\n").unwrap();
    assert_eq!(
        df.instructions[1].kind,
        Kind::Run {
            cmd: Cmd::Shell("a  b".into()),
            heredocs: vec![],
            network: None
        }
    );
}

#[test]
fn errors_name_the_line() {
    let cases: &[(&str, usize, &str)] = &[
        ("FROM scratch\nFOO bar\n", 2, "unknown instruction 'FOO'"),
        ("FROM scratch\n\nRUN\n", 3, "RUN requires an argument"),
        ("FROM a b\n", 1, "FROM requires one argument"),
        ("FROM a AS 1x\n", 1, "invalid stage name '1x'"),
        ("FROM --nope=1 a\n", 1, "unknown flag --nope for FROM"),
        (
            "FROM a\nRUN --mount=type=cache,target=/x true\n",
            2,
            "RUN --mount is not supported",
        ),
        (
            "FROM a\nRUN --network=bridge true\n",
            2,
            "invalid value 'bridge' for --network",
        ),
        (
            "FROM a\nCOPY onlyone\n",
            2,
            "COPY requires at least two arguments",
        ),
        (
            "FROM a\nADD --from=x a b\n",
            2,
            "unknown flag --from for ADD",
        ),
        (
            "FROM a\nADD --checksum=sha256:x a b\n",
            2,
            "ADD --checksum is not supported",
        ),
        (
            "FROM a\nCOPY --parents a b\n",
            2,
            "COPY --parents is not supported",
        ),
        (
            "FROM a\nCOPY --link=maybe a b\n",
            2,
            "invalid value 'maybe' for --link",
        ),
        ("FROM a\nENV\n", 2, "ENV requires at least one argument"),
        ("FROM a\nENV ONLYKEY\n", 2, "ENV must have two arguments"),
        ("FROM a\nENV A=1 B\n", 2, "cannot find '=' in 'B'"),
        ("FROM a\nLABEL =x\n", 2, "LABEL names cannot be blank"),
        ("FROM a\nARG =x\n", 2, "ARG names cannot be blank"),
        (
            "FROM a\nSHELL /bin/sh -c\n",
            2,
            "SHELL requires its arguments in JSON form",
        ),
        (
            "FROM a\nVOLUME [\"\"]\n",
            2,
            "VOLUME cannot be an empty string",
        ),
        (
            "FROM a\nHEALTHCHECK\n",
            2,
            "HEALTHCHECK requires CMD or NONE",
        ),
        (
            "FROM a\nHEALTHCHECK FOO x\n",
            2,
            "unknown type 'FOO' for HEALTHCHECK",
        ),
        (
            "FROM a\nHEALTHCHECK NONE x\n",
            2,
            "HEALTHCHECK NONE takes no arguments",
        ),
        (
            "FROM a\nHEALTHCHECK CMD\n",
            2,
            "missing command after HEALTHCHECK CMD",
        ),
        (
            "FROM a\nHEALTHCHECK --interval=10 CMD x\n",
            2,
            "invalid duration '10' for --interval",
        ),
        (
            "FROM a\nHEALTHCHECK --timeout=1us CMD x\n",
            2,
            "--timeout cannot be less than 1ms",
        ),
        (
            "FROM a\nHEALTHCHECK --retries=-1 CMD x\n",
            2,
            "invalid value '-1' for --retries",
        ),
        (
            "FROM a\nONBUILD ONBUILD RUN x\n",
            2,
            "ONBUILD ONBUILD is not allowed",
        ),
        (
            "FROM a\nONBUILD FROM x\n",
            2,
            "FROM is not allowed as an ONBUILD trigger",
        ),
        (
            "FROM a\nONBUILD BOGUS x\n",
            2,
            "unknown instruction 'BOGUS'",
        ),
        (
            "FROM a\nRUN <<EOF\nno end\n",
            2,
            "unterminated heredoc <<EOF",
        ),
        ("# escape=x\nFROM a\n", 1, "invalid escape character 'x'"),
        (
            "# escape=`\n# escape=\\\nFROM a\n",
            2,
            "only one 'escape' parser directive",
        ),
        (
            "FROM a\nRUN a \\\n b\nWHAT\n",
            4,
            "unknown instruction 'WHAT'",
        ),
    ];
    for (text, line, msg) in cases {
        let (l, r) = err(text);
        assert_eq!(l, *line, "{text:?}: {r}");
        assert!(r.contains(msg), "{text:?}: {r}");
    }
    let e = parse("Containerfile", "FROM a\nNOPE\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Containerfile, line 2: unknown instruction 'NOPE'"
    );
}

#[test]
fn bounds() {
    let big = vec![b'#'; MAX_SIZE + 1];
    assert!(matches!(
        parse_bytes("Dockerfile", &big),
        Err(DockerfileError::TooLarge { .. })
    ));
    assert!(matches!(
        parse_bytes("Dockerfile", b"FROM \xff\n"),
        Err(DockerfileError::NotUtf8 { .. })
    ));
    let many = "\n".repeat(200_000);
    assert!(matches!(
        parse("Dockerfile", &many),
        Err(DockerfileError::TooManyLines { .. })
    ));
    let lots = "FROM a\n".to_string() + &"LABEL a=b\n".repeat(10_000);
    assert!(matches!(
        parse("Dockerfile", &lots),
        Err(DockerfileError::TooManyInstructions { .. })
    ));
    assert!(matches!(
        parse("Dockerfile", "# only a comment\n\n"),
        Err(DockerfileError::Empty { .. })
    ));
}
