//! Dockerfile parsing: typed instructions with their line numbers.
//!
//! Follows buildkit's parser: parser directives at the top (`# escape=`,
//! `# syntax=` and `# check=` recorded and otherwise ignored), comment lines
//! removed (also inside continuations), line continuations with the escape
//! character, empty continuation lines skipped, keywords case-insensitive,
//! exec (JSON) and shell forms, heredocs (`<<EOF`, `<<-EOF`, `<<"EOF"`) for
//! RUN, COPY and ADD. Values are kept as written (quotes included): variable
//! expansion and quote removal happen in [`crate::expand`] and
//! [`crate::plan`], with the environment of the stage.
//!
//! Not supported, refused with the line: `RUN --mount`, `RUN --security`,
//! `COPY --parents`, `--exclude`, `ADD --checksum`, `ADD --keep-git-dir`.

use std::fmt;

/// Largest Dockerfile accepted.
pub const MAX_SIZE: usize = 1 << 20;
/// Most physical lines accepted.
pub const MAX_LINES: usize = 100_000;
/// Most instructions accepted.
pub const MAX_INSTRUCTIONS: usize = 10_000;

/// Why a Dockerfile was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerfileError {
    #[error("{file} is too large ({size} bytes, at most 1 MiB)")]
    TooLarge { file: String, size: usize },
    #[error("{file} has too many lines (at most {MAX_LINES})")]
    TooManyLines { file: String },
    #[error("{file} has too many instructions (at most {MAX_INSTRUCTIONS})")]
    TooManyInstructions { file: String },
    #[error("{file} is not UTF-8 text")]
    NotUtf8 { file: String },
    #[error("{file} has no instruction")]
    Empty { file: String },
    #[error("{file}, line {line}: {reason}")]
    Syntax {
        file: String,
        line: usize,
        reason: String,
    },
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The file name used in messages (`Dockerfile`, `Containerfile`).
    pub file: String,
    /// The escape character (`\` unless `# escape=` says otherwise).
    pub escape: char,
    /// The `# syntax=` directive, recorded only.
    pub syntax: Option<String>,
    pub instructions: Vec<Instruction>,
}

/// One instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// First line (1-based).
    pub line: usize,
    /// Last line, heredoc bodies included.
    pub end_line: usize,
    /// The instruction as one line, continuations joined, keyword upper-cased,
    /// heredoc bodies excluded (e.g. `RUN echo hi`).
    pub text: String,
    pub kind: Kind,
}

/// Shell form or exec (JSON) form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    Shell(String),
    Exec(Vec<String>),
}

/// A heredoc body of RUN, COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word (`EOF`).
    pub name: String,
    /// The file descriptor before `<<` (`3<<EOF`), for RUN.
    pub fd: Option<u32>,
    /// The body, each line ended by `\n`, leading tabs removed for `<<-`.
    pub body: String,
    /// False when the delimiter was quoted (`<<"EOF"`): no expansion of the body.
    pub expand: bool,
    /// `<<-EOF`.
    pub strip_tabs: bool,
}

/// Arguments of COPY and ADD.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyArgs {
    /// `--from=` (COPY only), unexpanded.
    pub from: Option<String>,
    /// `--chown=`, unexpanded.
    pub chown: Option<String>,
    /// `--chmod=`, unexpanded.
    pub chmod: Option<String>,
    /// `--link` (accepted; the result is the same without it).
    pub link: bool,
    /// Sources as written (heredoc words excluded), unexpanded.
    pub sources: Vec<String>,
    /// Heredoc sources, in order.
    pub heredocs: Vec<Heredoc>,
    /// Destination, unexpanded.
    pub dest: String,
    /// JSON form (`COPY ["a", "b"]`).
    pub exec_form: bool,
}

/// HEALTHCHECK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// `HEALTHCHECK NONE`: disable the base image's check.
    None,
    Check {
        cmd: Cmd,
        /// Durations in nanoseconds (`None`: not given).
        interval: Option<u64>,
        timeout: Option<u64>,
        start_period: Option<u64>,
        start_interval: Option<u64>,
        retries: Option<u32>,
    },
}

/// The instruction and its arguments, as written (not expanded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    From {
        image: String,
        /// `AS name`, lower-cased.
        name: Option<String>,
        platform: Option<String>,
    },
    Run {
        cmd: Cmd,
        heredocs: Vec<Heredoc>,
        /// `--network=default|none|host`.
        network: Option<String>,
    },
    Copy(CopyArgs),
    Add(CopyArgs),
    /// `(key, value)` pairs, quotes kept.
    Env(Vec<(String, String)>),
    /// `(name, default)` pairs.
    Arg(Vec<(String, Option<String>)>),
    Workdir(String),
    Label(Vec<(String, String)>),
    User(String),
    Cmd(Cmd),
    Entrypoint(Cmd),
    Expose(Vec<String>),
    Shell(Vec<String>),
    Volume(Vec<String>),
    Stopsignal(String),
    Healthcheck(Health),
    /// The trigger as written (`RUN echo hi`) and its parsed form.
    Onbuild {
        expression: String,
        trigger: Box<Kind>,
    },
    Maintainer(String),
}

impl Kind {
    /// The upper-case keyword.
    pub fn keyword(&self) -> &'static str {
        match self {
            Kind::From { .. } => "FROM",
            Kind::Run { .. } => "RUN",
            Kind::Copy(_) => "COPY",
            Kind::Add(_) => "ADD",
            Kind::Env(_) => "ENV",
            Kind::Arg(_) => "ARG",
            Kind::Workdir(_) => "WORKDIR",
            Kind::Label(_) => "LABEL",
            Kind::User(_) => "USER",
            Kind::Cmd(_) => "CMD",
            Kind::Entrypoint(_) => "ENTRYPOINT",
            Kind::Expose(_) => "EXPOSE",
            Kind::Shell(_) => "SHELL",
            Kind::Volume(_) => "VOLUME",
            Kind::Stopsignal(_) => "STOPSIGNAL",
            Kind::Healthcheck(_) => "HEALTHCHECK",
            Kind::Onbuild { .. } => "ONBUILD",
            Kind::Maintainer(_) => "MAINTAINER",
        }
    }
}

impl fmt::Display for Instruction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Parses raw bytes (checks the size and UTF-8 first).
pub fn parse_bytes(file: &str, bytes: &[u8]) -> Result<Dockerfile, DockerfileError> {
    if bytes.len() > MAX_SIZE {
        return Err(DockerfileError::TooLarge {
            file: file.to_string(),
            size: bytes.len(),
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| DockerfileError::NotUtf8 {
        file: file.to_string(),
    })?;
    parse(file, text)
}

/// Parses a Dockerfile; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Dockerfile, DockerfileError> {
    if text.len() > MAX_SIZE {
        return Err(DockerfileError::TooLarge {
            file: file.to_string(),
            size: text.len(),
        });
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    if lines.len() > MAX_LINES {
        return Err(DockerfileError::TooManyLines {
            file: file.to_string(),
        });
    }
    let err = |line: usize, reason: String| DockerfileError::Syntax {
        file: file.to_string(),
        line,
        reason,
    };

    // Parser directives.
    let mut escape = '\\';
    let mut syntax = None;
    let mut seen: Vec<String> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some((key, value)) = directive(lines[i]) else {
            break;
        };
        if !matches!(key.as_str(), "escape" | "syntax" | "check") {
            break;
        }
        if seen.contains(&key) {
            return Err(err(
                i + 1,
                format!("only one '{key}' parser directive can be used"),
            ));
        }
        if key == "escape" {
            escape = match value.as_str() {
                "\\" => '\\',
                "`" => '`',
                _ => {
                    return Err(err(
                        i + 1,
                        format!("invalid escape character '{value}': use '\\' or '`'"),
                    ));
                }
            };
        } else if key == "syntax" {
            syntax = Some(value);
        }
        seen.push(key);
        i += 1;
    }

    let mut instructions = Vec::new();
    while i < lines.len() {
        let start = i + 1;
        let first = lines[i].trim_start();
        i += 1;
        if first.is_empty() || first.starts_with('#') {
            continue;
        }
        let (content, mut cont) = continuation(first, escape);
        let mut logical = content.to_string();
        while cont && i < lines.len() {
            let raw = lines[i];
            i += 1;
            let t = raw.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let (content, c) = continuation(raw, escape);
            logical.push_str(content);
            cont = c;
        }
        if instructions.len() >= MAX_INSTRUCTIONS {
            return Err(DockerfileError::TooManyInstructions {
                file: file.to_string(),
            });
        }
        let logical = logical.trim();
        let (word, rest) = split_first(logical);
        let keyword = word.to_ascii_uppercase();
        let mut heredocs = Vec::new();
        if matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") {
            for (name, fd, quoted, strip) in heredoc_words(rest) {
                let mut body = String::new();
                loop {
                    let Some(raw) = lines.get(i) else {
                        return Err(err(start, format!("unterminated heredoc <<{name}")));
                    };
                    i += 1;
                    let l = if strip {
                        raw.trim_start_matches('\t')
                    } else {
                        raw
                    };
                    if l == name {
                        break;
                    }
                    body.push_str(l);
                    body.push('\n');
                }
                heredocs.push(Heredoc {
                    name,
                    fd,
                    body,
                    expand: !quoted,
                    strip_tabs: strip,
                });
            }
        }
        let kind = instruction(&keyword, rest, heredocs, escape).map_err(|r| err(start, r))?;
        let text = if rest.is_empty() {
            keyword.clone()
        } else {
            format!("{keyword} {rest}")
        };
        instructions.push(Instruction {
            line: start,
            end_line: i,
            text,
            kind,
        });
    }
    if instructions.is_empty() {
        return Err(DockerfileError::Empty {
            file: file.to_string(),
        });
    }
    Ok(Dockerfile {
        file: file.to_string(),
        escape,
        syntax,
        instructions,
    })
}

/// `# key=value` → (lower-case key, value).
fn directive(line: &str) -> Option<(String, String)> {
    let rest = line.trim_start().strip_prefix('#')?;
    let (k, v) = rest.split_once('=')?;
    let k = k.trim();
    if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    Some((k.to_ascii_lowercase(), v.trim().to_string()))
}

/// Strips a trailing escape character (and the blanks after it).
fn continuation(line: &str, escape: char) -> (&str, bool) {
    let t = line.trim_end();
    match t.strip_suffix(escape) {
        Some(s) => (s, true),
        None => (line, false),
    }
}

fn split_first(s: &str) -> (&str, &str) {
    let s = s.trim();
    match s.find(char::is_whitespace) {
        Some(p) => (&s[..p], s[p..].trim_start()),
        None => (s, ""),
    }
}

/// Heredoc words of an argument string: (name, fd, quoted, strip tabs).
fn heredoc_words(rest: &str) -> Vec<(String, Option<u32>, bool, bool)> {
    let mut out = Vec::new();
    for w in rest.split_whitespace() {
        let Some(p) = w.find("<<") else { continue };
        let (fd, after) = (&w[..p], &w[p + 2..]);
        if !fd.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let fd = if fd.is_empty() { None } else { fd.parse().ok() };
        let (strip, after) = match after.strip_prefix('-') {
            Some(a) => (true, a),
            None => (false, after),
        };
        let (quoted, name) = match after.chars().next() {
            Some(q @ ('"' | '\'')) => match after[1..].strip_suffix(q) {
                Some(n) => (true, n),
                None => continue,
            },
            _ => (false, after),
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            continue;
        }
        out.push((name.to_string(), fd, quoted, strip));
    }
    out
}

/// True when `w` is a heredoc word naming one of `docs`.
fn is_heredoc_word(w: &str, docs: &[Heredoc]) -> bool {
    heredoc_words(w)
        .first()
        .is_some_and(|(n, ..)| docs.iter().any(|d| &d.name == n))
}

/// Leading `--flag[=value]` words.
fn flags(rest: &str) -> (Vec<(String, Option<String>)>, &str) {
    let mut out = Vec::new();
    let mut rest = rest.trim_start();
    while rest.starts_with("--") {
        let (w, r) = split_first(rest);
        if w == "--" {
            rest = r;
            break;
        }
        let body = &w[2..];
        match body.split_once('=') {
            Some((k, v)) => out.push((k.to_ascii_lowercase(), Some(v.to_string()))),
            None => out.push((body.to_ascii_lowercase(), None)),
        }
        rest = r;
    }
    (out, rest)
}

fn json_list(rest: &str) -> Option<Vec<String>> {
    if !rest.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(rest).ok()
}

fn maybe_json(rest: &str) -> Cmd {
    match json_list(rest) {
        Some(v) => Cmd::Exec(v),
        None => Cmd::Shell(rest.to_string()),
    }
}

/// Words split on blanks outside quotes; quotes and escapes kept.
fn words(s: &str, escape: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == escape && quote != Some('\'') {
            cur.push(c);
            if let Some(n) = chars.next() {
                cur.push(n);
            }
            continue;
        }
        match quote {
            Some(q) if c == q => {
                quote = None;
                cur.push(c);
            }
            Some(_) => cur.push(c),
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                cur.push(c);
            }
            None if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            None => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn name_values(kw: &str, rest: &str, escape: char) -> Result<Vec<(String, String)>, String> {
    let ws = words(rest, escape);
    let Some(first) = ws.first() else {
        return Err(format!("{kw} requires at least one argument"));
    };
    if !first.contains('=') {
        // Old form: `ENV key value with spaces`.
        let (k, v) = split_first(rest);
        if v.is_empty() {
            return Err(format!("{kw} must have two arguments (use {kw} key=value)"));
        }
        return Ok(vec![(k.to_string(), v.to_string())]);
    }
    let mut out = Vec::new();
    for w in ws {
        let Some((k, v)) = w.split_once('=') else {
            return Err(format!(
                "cannot find '=' in '{w}': {kw} arguments must be of the form name=value"
            ));
        };
        if k.is_empty() {
            return Err(format!("{kw} names cannot be blank"));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn require(kw: &str, rest: &str) -> Result<(), String> {
    if rest.is_empty() {
        Err(format!("{kw} requires an argument"))
    } else {
        Ok(())
    }
}

fn flag_bool(name: &str, v: Option<String>) -> Result<bool, String> {
    match v.as_deref() {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(o) => Err(format!(
            "invalid value '{o}' for --{name}: use true or false"
        )),
    }
}

fn flag_value(name: &str, v: Option<String>) -> Result<String, String> {
    match v {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(format!("--{name} requires a value")),
    }
}

fn instruction(kw: &str, rest: &str, heredocs: Vec<Heredoc>, escape: char) -> Result<Kind, String> {
    Ok(match kw {
        "FROM" => {
            let (fl, rest) = flags(rest);
            let mut platform = None;
            for (k, v) in fl {
                match k.as_str() {
                    "platform" => platform = Some(flag_value("platform", v)?),
                    _ => return Err(format!("unknown flag --{k} for FROM")),
                }
            }
            let ws: Vec<&str> = rest.split_whitespace().collect();
            let name = match ws.as_slice() {
                [_] => None,
                [_, a, n] if a.eq_ignore_ascii_case("as") => {
                    let n = n.to_ascii_lowercase();
                    if !valid_stage_name(&n) {
                        return Err(format!(
                            "invalid stage name '{n}': use a letter then letters, digits, '-', '_' or '.'"
                        ));
                    }
                    Some(n)
                }
                _ => return Err("FROM requires one argument, or three (FROM image AS name)".into()),
            };
            Kind::From {
                image: ws[0].to_string(),
                name,
                platform,
            }
        }
        "RUN" => {
            let (fl, rest) = flags(rest);
            let mut network = None;
            for (k, v) in fl {
                match k.as_str() {
                    "network" => {
                        let v = flag_value("network", v)?;
                        if !matches!(v.as_str(), "default" | "none" | "host") {
                            return Err(format!(
                                "invalid value '{v}' for --network: use default, none or host"
                            ));
                        }
                        network = Some(v);
                    }
                    "mount" | "security" => {
                        return Err(format!("RUN --{k} is not supported by walt image build"));
                    }
                    _ => return Err(format!("unknown flag --{k} for RUN")),
                }
            }
            require("RUN", rest)?;
            Kind::Run {
                cmd: maybe_json(rest),
                heredocs,
                network,
            }
        }
        "COPY" | "ADD" => {
            let (fl, rest) = flags(rest);
            let mut a = CopyArgs::default();
            for (k, v) in fl {
                match k.as_str() {
                    "from" if kw == "COPY" => a.from = Some(flag_value("from", v)?),
                    "chown" => a.chown = Some(flag_value("chown", v)?),
                    "chmod" => a.chmod = Some(flag_value("chmod", v)?),
                    "link" => a.link = flag_bool("link", v)?,
                    "parents" | "exclude" | "checksum" | "keep-git-dir" => {
                        return Err(format!("{kw} --{k} is not supported by walt image build"));
                    }
                    _ => return Err(format!("unknown flag --{k} for {kw}")),
                }
            }
            let list = match json_list(rest) {
                Some(l) => {
                    a.exec_form = true;
                    l
                }
                None => rest.split_whitespace().map(str::to_string).collect(),
            };
            if list.len() < 2 {
                return Err(format!(
                    "{kw} requires at least two arguments (sources and a destination)"
                ));
            }
            let (dest, srcs) = list.split_last().expect("two or more");
            a.dest = dest.clone();
            for s in srcs {
                if !is_heredoc_word(s, &heredocs) {
                    a.sources.push(s.clone());
                }
            }
            a.heredocs = heredocs;
            if kw == "COPY" {
                Kind::Copy(a)
            } else {
                Kind::Add(a)
            }
        }
        "ENV" => Kind::Env(name_values("ENV", rest, escape)?),
        "LABEL" => Kind::Label(name_values("LABEL", rest, escape)?),
        "ARG" => {
            let ws = words(rest, escape);
            if ws.is_empty() {
                return Err("ARG requires at least one argument".into());
            }
            let mut out = Vec::new();
            for w in ws {
                let (k, v) = match w.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (w, None),
                };
                if k.is_empty() {
                    return Err("ARG names cannot be blank".into());
                }
                out.push((k, v));
            }
            Kind::Arg(out)
        }
        "WORKDIR" => {
            require(kw, rest)?;
            Kind::Workdir(rest.to_string())
        }
        "USER" => {
            require(kw, rest)?;
            Kind::User(rest.to_string())
        }
        "STOPSIGNAL" => {
            require(kw, rest)?;
            Kind::Stopsignal(rest.to_string())
        }
        "MAINTAINER" => {
            require(kw, rest)?;
            Kind::Maintainer(rest.to_string())
        }
        "CMD" => Kind::Cmd(maybe_json(rest)),
        "ENTRYPOINT" => Kind::Entrypoint(maybe_json(rest)),
        "EXPOSE" => {
            require(kw, rest)?;
            Kind::Expose(rest.split_whitespace().map(str::to_string).collect())
        }
        "VOLUME" => {
            require(kw, rest)?;
            let list = json_list(rest)
                .unwrap_or_else(|| rest.split_whitespace().map(str::to_string).collect());
            if list.iter().any(|v| v.trim().is_empty()) {
                return Err("VOLUME cannot be an empty string".into());
            }
            Kind::Volume(list)
        }
        "SHELL" => match json_list(rest) {
            Some(l) if !l.is_empty() => Kind::Shell(l),
            _ => {
                return Err(
                    "SHELL requires its arguments in JSON form (SHELL [\"/bin/sh\", \"-c\"])"
                        .into(),
                );
            }
        },
        "HEALTHCHECK" => Kind::Healthcheck(healthcheck(rest)?),
        "ONBUILD" => {
            let (w, r) = split_first(rest);
            let inner = w.to_ascii_uppercase();
            match inner.as_str() {
                "" => return Err("ONBUILD requires an instruction".into()),
                "ONBUILD" => return Err("ONBUILD ONBUILD is not allowed".into()),
                "FROM" | "MAINTAINER" => {
                    return Err(format!("{inner} is not allowed as an ONBUILD trigger"));
                }
                _ => {}
            }
            let trigger = instruction(&inner, r, Vec::new(), escape)?;
            Kind::Onbuild {
                expression: rest.to_string(),
                trigger: Box::new(trigger),
            }
        }
        other => {
            let shown: String = other.chars().take(40).collect();
            return Err(format!("unknown instruction '{shown}'"));
        }
    })
}

fn valid_stage_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next().is_some_and(|f| f.is_ascii_lowercase())
        && c.all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || matches!(x, '-' | '_' | '.'))
}

fn healthcheck(rest: &str) -> Result<Health, String> {
    let (fl, rest) = flags(rest);
    let (typ, args) = split_first(rest);
    match typ.to_ascii_uppercase().as_str() {
        "NONE" => {
            if !args.is_empty() || !fl.is_empty() {
                return Err("HEALTHCHECK NONE takes no arguments".into());
            }
            Ok(Health::None)
        }
        "CMD" => {
            if args.is_empty() {
                return Err("missing command after HEALTHCHECK CMD".into());
            }
            let (mut interval, mut timeout, mut start_period, mut start_interval, mut retries) =
                (None, None, None, None, None);
            for (k, v) in fl {
                let v = flag_value(&k, v)?;
                match k.as_str() {
                    "interval" => interval = Some(health_duration(&k, &v)?),
                    "timeout" => timeout = Some(health_duration(&k, &v)?),
                    "start-period" => start_period = Some(health_duration(&k, &v)?),
                    "start-interval" => start_interval = Some(health_duration(&k, &v)?),
                    "retries" => {
                        retries = Some(v.parse::<u32>().map_err(|_| {
                            format!("invalid value '{v}' for --retries: use a number")
                        })?)
                    }
                    _ => return Err(format!("unknown flag --{k} for HEALTHCHECK")),
                }
            }
            Ok(Health::Check {
                cmd: maybe_json(args),
                interval,
                timeout,
                start_period,
                start_interval,
                retries,
            })
        }
        "" => Err("HEALTHCHECK requires CMD or NONE".into()),
        t => Err(format!(
            "unknown type '{t}' for HEALTHCHECK: use CMD or NONE"
        )),
    }
}

fn health_duration(name: &str, v: &str) -> Result<u64, String> {
    let d = go_duration(v).ok_or_else(|| format!("invalid duration '{v}' for --{name}"))?;
    if d != 0 && d < 1_000_000 {
        return Err(format!("--{name} cannot be less than 1ms"));
    }
    Ok(d)
}

/// A Go duration (`1m30s`, `1.5h`, `300ms`, `0`) in nanoseconds.
pub fn go_duration(s: &str) -> Option<u64> {
    if s == "0" {
        return Some(0);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += num * mult;
    }
    if total > u64::MAX as f64 / 2.0 {
        return None;
    }
    Some(total.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("30s"), Some(30_000_000_000));
        assert_eq!(go_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(go_duration("1.5h"), Some(5_400_000_000_000));
        assert_eq!(go_duration("250ms"), Some(250_000_000));
        assert_eq!(go_duration("0"), Some(0));
        assert_eq!(go_duration("10"), None);
        assert_eq!(go_duration("1x"), None);
        assert_eq!(go_duration(""), None);
    }

    #[test]
    fn words_keep_quotes() {
        assert_eq!(
            words(r#"a="b c" d='e f' g=h\ i"#, '\\'),
            vec![r#"a="b c""#, "d='e f'", r"g=h\ i"]
        );
    }

    #[test]
    fn heredoc_detection() {
        let w = heredoc_words(r#"<<EOF cat 3<<-'X' <<"Y" a<<b <<"#);
        assert_eq!(
            w,
            vec![
                ("EOF".to_string(), None, false, false),
                ("X".to_string(), Some(3), true, true),
                ("Y".to_string(), None, true, false),
            ]
        );
    }
}
