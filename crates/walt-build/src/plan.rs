//! The build plan: stages, their base images, the steps with expanded
//! arguments, and the image config the steps produce.
//!
//! Two phases, because the expansion of a stage's instructions needs the
//! config (ENV) of its base image, which the engine may have to fetch:
//!
//! 1. [`Plan::new`]: global ARGs, the stages (`FROM` expanded with the global
//!    ARGs), base images classified ([`BaseRef`]), `COPY --from` resolved,
//!    the stages the last one needs (the others are skipped), build
//!    arguments nobody declares (warnings, as docker prints them).
//! 2. [`Plan::stage_steps`]: with the base's [`Settings`], the steps of one
//!    stage, expanded, and the config after each one; [`apply`] is the pure
//!    function turning a metadata change into config.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use walt_core::name::{ImageName, is_valid_component, is_valid_user};
use walt_core::oci::RuntimeConfig;

use crate::dockerfile::{Cmd, CopyArgs, Dockerfile, Health, Heredoc, Instruction, Kind};
use crate::expand::{ExpandError, expand};

/// Build arguments predefined by docker: usable without an ARG line, given
/// to RUN steps, never written to the image.
pub const PROXY_ARGS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// `PATH` of RUN steps when the image sets none (and of `FROM scratch`).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Most ports one EXPOSE range may open.
const MAX_PORTS: usize = 1024;

/// Largest image config (env, labels, ...) a Dockerfile may produce, so that
/// hostile expansions (`ENV A=$A$A` chains) stay bounded.
pub const MAX_CONFIG_SIZE: usize = 1 << 20;

/// Largest total size of one stage's expanded steps (each RUN carries its
/// environment).
pub const MAX_STAGE_PLAN_SIZE: usize = 64 << 20;

fn strings_size<'a>(v: impl IntoIterator<Item = &'a String>) -> usize {
    v.into_iter().map(|x| x.len() + 1).sum()
}

/// Approximate size of the settings (strings only).
fn settings_size(s: &Settings) -> usize {
    strings_size(&s.env)
        + s.labels
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>()
        + s.cmd.as_ref().map_or(0, strings_size)
        + s.entrypoint.as_ref().map_or(0, strings_size)
        + s.working_dir.len()
        + s.user.len()
        + strings_size(&s.exposed_ports)
        + strings_size(&s.volumes)
        + s.stop_signal.as_ref().map_or(0, String::len)
        + s.healthcheck.as_ref().map_or(0, |h| strings_size(&h.test))
        + strings_size(&s.on_build)
        + s.shell.as_ref().map_or(0, strings_size)
}

/// Approximate size of a step's expanded data.
fn action_size(a: &Action) -> usize {
    match a {
        Action::Run(r) => {
            strings_size(&r.argv)
                + strings_size(&r.env)
                + r.heredocs.iter().map(|h| h.body.len()).sum::<usize>()
                + r.user.len()
                + r.workdir.len()
        }
        Action::Copy(c) => {
            strings_size(&c.sources)
                + c.heredocs
                    .iter()
                    .map(|(n, b)| n.len() + b.len())
                    .sum::<usize>()
                + c.dest.len()
        }
        Action::Config(_) | Action::Arg => 0,
    }
}

/// Why a plan could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{file}, line {line}: {reason}")]
    At {
        file: String,
        line: usize,
        reason: String,
    },
    #[error("invalid stage index {0}")]
    NoStage(usize),
}

/// What a build is asked for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--build-arg K=V`.
    pub build_args: BTreeMap<String, String>,
    /// The caller (owner of name-only images).
    pub user: String,
    /// OCI architecture of the target (`amd64`, `arm64`), for TARGETARCH & co.
    pub arch: String,
    pub variant: Option<String>,
}

/// Where a stage (or `COPY --from`) takes its files from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseRef {
    /// `scratch`: empty.
    Scratch,
    /// An earlier stage, by index.
    Stage(usize),
    /// A name without a user that is an image of the caller.
    Own(ImageName),
    /// `user/name[:tag]` found in the store.
    Store(ImageName),
    /// Anything else: to fetch through the configured sources.
    Remote(String),
}

/// Classifies an image reference (already expanded); `in_store` says whether
/// an image exists in the store. Stage names are resolved by the caller.
pub fn classify(
    reference: &str,
    user: &str,
    in_store: &mut dyn FnMut(&ImageName) -> bool,
) -> BaseRef {
    if reference == "scratch" {
        return BaseRef::Scratch;
    }
    let (path, tag) = split_tag(reference);
    let parts: Vec<&str> = path.split('/').collect();
    let tag_ok = tag.is_none_or(is_valid_component);
    let tag = tag.unwrap_or("latest").to_string();
    match parts.as_slice() {
        [name] if is_valid_component(name) && tag_ok => {
            let n = ImageName {
                owner: user.to_string(),
                name: name.to_string(),
                tag,
            };
            if in_store(&n) {
                return BaseRef::Own(n);
            }
        }
        [owner, name] if is_valid_user(owner) && is_valid_component(name) && tag_ok => {
            let n = ImageName {
                owner: owner.to_string(),
                name: name.to_string(),
                tag,
            };
            if in_store(&n) {
                return BaseRef::Store(n);
            }
        }
        _ => {}
    }
    BaseRef::Remote(reference.to_string())
}

/// `repo[:tag]`: the tag is after the last `:` that follows the last `/`.
fn split_tag(r: &str) -> (&str, Option<&str>) {
    if r.contains('@') {
        return (r, None);
    }
    let slash = r.rfind('/').map_or(0, |p| p + 1);
    match r[slash..].rfind(':') {
        Some(p) => (&r[..slash + p], Some(&r[slash + p + 1..])),
        None => (r, None),
    }
}

/// One stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub index: usize,
    /// `AS name` (lower-case).
    pub name: Option<String>,
    /// The base reference after expansion.
    pub base_text: String,
    pub base: BaseRef,
    /// `--platform=`, expanded; `walt_core::models::Platform::parse`
    /// accepts it. The image config of a `scratch` stage gets this platform;
    /// a base image must be of it (an index is resolved to it).
    pub platform: Option<String>,
    /// Line of the FROM.
    pub line: usize,
    /// Instructions after the FROM, up to the next FROM.
    pub instructions: Vec<Instruction>,
    /// `COPY --from` sources, by instruction line.
    pub copy_from: BTreeMap<usize, BaseRef>,
    /// False when the last stage does not need it: skip it.
    pub needed: bool,
}

/// Phase 1 result.
#[derive(Debug, Clone)]
pub struct Plan {
    pub file: String,
    pub escape: char,
    pub stages: Vec<Stage>,
    /// Global ARG values (build arguments applied), for FROM lines and
    /// stage ARGs without a default.
    pub globals: BTreeMap<String, String>,
    /// Build arguments no ARG declares, as docker warns about them.
    pub warnings: Vec<String>,
    pub options: Options,
}

/// Image settings: the `config` object of an OCI image config.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    /// `K=V`, in order.
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub working_dir: String,
    pub user: String,
    /// `80/tcp`.
    pub exposed_ports: BTreeSet<String>,
    pub volumes: BTreeSet<String>,
    pub stop_signal: Option<String>,
    pub healthcheck: Option<HealthConfig>,
    pub on_build: Vec<String>,
    pub shell: Option<Vec<String>>,
}

/// Docker's `Healthcheck` (durations in nanoseconds, 0 = inherit default).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HealthConfig {
    pub test: Vec<String>,
    pub interval: u64,
    pub timeout: u64,
    pub start_period: u64,
    pub start_interval: u64,
    pub retries: u32,
}

/// One metadata change of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Env(Vec<(String, String)>),
    Label(Vec<(String, String)>),
    /// Absolute, cleaned.
    Workdir(String),
    User(String),
    Cmd(Vec<String>),
    Entrypoint(Vec<String>),
    Expose(Vec<String>),
    Volume(Vec<String>),
    StopSignal(String),
    Healthcheck(HealthConfig),
    OnBuild(String),
    Shell(Vec<String>),
    /// MAINTAINER: the image's `author` (outside `config`).
    Maintainer(String),
}

/// Applies a change to a config. `cmd_set` tracks whether this stage set CMD
/// (ENTRYPOINT clears a CMD inherited from the base image, as docker does).
pub fn apply(s: &mut Settings, change: &Change, cmd_set: &mut bool) {
    match change {
        Change::Env(kv) => {
            for (k, v) in kv {
                set_env(&mut s.env, k, v);
            }
        }
        Change::Label(kv) => {
            for (k, v) in kv {
                s.labels.insert(k.clone(), v.clone());
            }
        }
        Change::Workdir(w) => s.working_dir = w.clone(),
        Change::User(u) => s.user = u.clone(),
        Change::Cmd(c) => {
            s.cmd = Some(c.clone());
            *cmd_set = true;
        }
        Change::Entrypoint(e) => {
            s.entrypoint = Some(e.clone());
            if !*cmd_set {
                s.cmd = None;
            }
        }
        Change::Expose(p) => s.exposed_ports.extend(p.iter().cloned()),
        Change::Volume(v) => s.volumes.extend(v.iter().cloned()),
        Change::StopSignal(sig) => s.stop_signal = Some(sig.clone()),
        Change::Healthcheck(h) => s.healthcheck = Some(h.clone()),
        Change::OnBuild(t) => s.on_build.push(t.clone()),
        Change::Shell(sh) => s.shell = Some(sh.clone()),
        Change::Maintainer(_) => {}
    }
}

fn set_env(env: &mut Vec<String>, k: &str, v: &str) {
    let item = format!("{k}={v}");
    match env
        .iter_mut()
        .find(|e| e.split_once('=').map_or(e.as_str(), |(a, _)| a) == k)
    {
        Some(e) => *e = item,
        None => env.push(item),
    }
}

impl Settings {
    /// The config of `FROM scratch`: empty ([`Plan::stage_steps`] adds the
    /// default PATH to every stage whose base has none, as docker does).
    pub fn scratch() -> Self {
        Settings::default()
    }

    /// The shell of shell-form instructions.
    pub fn shell_or_default(&self) -> Vec<String> {
        self.shell
            .clone()
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()])
    }

    /// `(key, value)` pairs of `env`.
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (e.clone(), String::new()),
            })
            .collect()
    }

    /// Reads the settings of an image config's `config` object.
    pub fn from_runtime(rc: Option<&RuntimeConfig>) -> Self {
        let Some(rc) = rc else {
            return Settings::default();
        };
        let x = &rc.extra;
        let strs = |k: &str| -> Option<Vec<String>> {
            x.get(k)?.as_array().map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
        };
        let string = |k: &str| x.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let keys = |k: &str| -> BTreeSet<String> {
            x.get(k)
                .and_then(Value::as_object)
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        };
        let healthcheck = x.get("Healthcheck").and_then(|h| {
            let test = h.get("Test")?.as_array()?;
            let n = |k: &str| h.get(k).and_then(Value::as_u64).unwrap_or(0);
            Some(HealthConfig {
                test: test
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                interval: n("Interval"),
                timeout: n("Timeout"),
                start_period: n("StartPeriod"),
                start_interval: n("StartInterval"),
                retries: n("Retries") as u32,
            })
        });
        Settings {
            env: strs("Env").unwrap_or_default(),
            labels: rc.labels.clone().unwrap_or_default(),
            cmd: strs("Cmd"),
            entrypoint: strs("Entrypoint"),
            working_dir: string("WorkingDir"),
            user: string("User"),
            exposed_ports: keys("ExposedPorts"),
            volumes: keys("Volumes"),
            stop_signal: x
                .get("StopSignal")
                .and_then(Value::as_str)
                .map(str::to_string),
            healthcheck,
            on_build: strs("OnBuild").unwrap_or_default(),
            shell: strs("Shell"),
        }
    }

    /// Writes the settings into `base` (other keys of `base` are kept).
    pub fn to_runtime(&self, base: Option<&RuntimeConfig>) -> RuntimeConfig {
        let mut rc = base.cloned().unwrap_or_default();
        let x = &mut rc.extra;
        let mut put = |k: &str, v: Option<Value>| match v {
            Some(v) => {
                x.insert(k.to_string(), v);
            }
            None => {
                x.remove(k);
            }
        };
        let set = |s: &BTreeSet<String>| {
            (!s.is_empty())
                .then(|| Value::Object(s.iter().map(|k| (k.clone(), json!({}))).collect()))
        };
        put("Env", (!self.env.is_empty()).then(|| json!(self.env)));
        put("Cmd", self.cmd.as_ref().map(|c| json!(c)));
        put("Entrypoint", self.entrypoint.as_ref().map(|c| json!(c)));
        put(
            "WorkingDir",
            (!self.working_dir.is_empty()).then(|| json!(self.working_dir)),
        );
        put("User", (!self.user.is_empty()).then(|| json!(self.user)));
        put("ExposedPorts", set(&self.exposed_ports));
        put("Volumes", set(&self.volumes));
        put("StopSignal", self.stop_signal.as_ref().map(|s| json!(s)));
        put(
            "Healthcheck",
            self.healthcheck.as_ref().map(|h| {
                let mut o = serde_json::Map::new();
                o.insert("Test".into(), json!(h.test));
                for (k, v) in [
                    ("Interval", h.interval),
                    ("Timeout", h.timeout),
                    ("StartPeriod", h.start_period),
                    ("StartInterval", h.start_interval),
                ] {
                    if v != 0 {
                        o.insert(k.into(), json!(v));
                    }
                }
                if h.retries != 0 {
                    o.insert("Retries".into(), json!(h.retries));
                }
                Value::Object(o)
            }),
        );
        put(
            "OnBuild",
            (!self.on_build.is_empty()).then(|| json!(self.on_build)),
        );
        put("Shell", self.shell.as_ref().map(|s| json!(s)));
        rc.labels = (!self.labels.is_empty()).then(|| self.labels.clone());
        rc
    }
}

/// `COPY`/`ADD` of a step, expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyStep {
    pub add: bool,
    /// `--from`: `None` for the build context.
    pub from: Option<BaseRef>,
    pub sources: Vec<String>,
    /// Heredoc sources: (file name, content), content expanded unless the
    /// delimiter was quoted.
    pub heredocs: Vec<(String, String)>,
    /// Absolute (relative destinations joined to the workdir); a trailing
    /// `/` is kept: it means a directory.
    pub dest: String,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
}

/// A RUN step, ready for the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStep {
    /// argv: exec form as is, shell form through the stage's SHELL.
    pub argv: Vec<String>,
    /// Heredocs of the command (the shell form text still holds `<<EOF`).
    pub heredocs: Vec<Heredoc>,
    /// The environment: the image's ENV, then ARGs (and proxy build args)
    /// that no ENV shadows; PATH defaulted.
    pub env: Vec<String>,
    pub user: String,
    /// Absolute; `/` when unset.
    pub workdir: String,
    pub network: Option<String>,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Run(RunStep),
    Copy(CopyStep),
    /// Config only, no layer.
    Config(Change),
    /// ARG: changes what later steps see, nothing in the image.
    Arg,
}

/// One step of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub line: usize,
    /// The instruction as written (one line).
    pub text: String,
    pub action: Action,
}

/// Phase 2 result for one stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePlan {
    pub steps: Vec<Step>,
    /// The config after the last step.
    pub settings: Settings,
    /// MAINTAINER, if any.
    pub author: Option<String>,
}

impl Plan {
    /// Phase 1. `in_store` says whether an image exists in the store.
    pub fn new(
        df: &Dockerfile,
        options: &Options,
        in_store: &mut dyn FnMut(&ImageName) -> bool,
    ) -> Result<Plan, PlanError> {
        let at = |line: usize, reason: String| PlanError::At {
            file: df.file.clone(),
            line,
            reason,
        };
        let mut globals: BTreeMap<String, String> = BTreeMap::new();
        let platform = platform_args(options);
        let mut declared: BTreeSet<String> = BTreeSet::new();
        let mut stages: Vec<Stage> = Vec::new();
        for ins in &df.instructions {
            match &ins.kind {
                Kind::Arg(list) if stages.is_empty() => {
                    for (k, default) in list {
                        declared.insert(k.clone());
                        let mut scope = platform.clone();
                        scope.extend(globals.clone());
                        let value = match options.build_args.get(k) {
                            Some(v) => Some(v.clone()),
                            None => match default {
                                Some(d) => Some(
                                    expand(d, df.escape, &scope)
                                        .map_err(|e| at(ins.line, e.to_string()))?,
                                ),
                                None => platform.get(k).cloned(),
                            },
                        };
                        if let Some(v) = value {
                            globals.insert(k.clone(), v);
                        }
                    }
                    if globals
                        .iter()
                        .map(|(k, v)| k.len() + v.len())
                        .sum::<usize>()
                        > MAX_CONFIG_SIZE
                    {
                        return Err(at(ins.line, "the build arguments grow over 1 MiB".into()));
                    }
                }
                _ if stages.is_empty() && !matches!(ins.kind, Kind::From { .. }) => {
                    return Err(at(
                        ins.line,
                        format!(
                            "{} before the first FROM (only ARG can come before it)",
                            ins.kind.keyword()
                        ),
                    ));
                }
                Kind::From {
                    image,
                    name,
                    platform: plat,
                } => {
                    let mut scope = platform.clone();
                    scope.extend(globals.clone());
                    let base_text = expand(image, df.escape, &scope)
                        .map_err(|e| at(ins.line, e.to_string()))?;
                    if base_text.is_empty() {
                        return Err(at(
                            ins.line,
                            format!("base image '{image}' expands to nothing"),
                        ));
                    }
                    if let Some(n) = name
                        && stages.iter().any(|s| s.name.as_deref() == Some(n))
                    {
                        return Err(at(ins.line, format!("duplicate stage name '{n}'")));
                    }
                    let lower = base_text.to_ascii_lowercase();
                    let base = match stages.iter().find(|s| s.name.as_deref() == Some(&lower)) {
                        Some(s) => BaseRef::Stage(s.index),
                        None => classify(&base_text, &options.user, in_store),
                    };
                    let platform = match plat {
                        Some(p) => {
                            let p = expand(p, df.escape, &scope)
                                .map_err(|e| at(ins.line, e.to_string()))?;
                            if walt_core::models::Platform::parse(&p).is_none() {
                                return Err(at(
                                    ins.line,
                                    format!(
                                        "unsupported platform '{p}' (expected linux/<architecture>[/<variant>], e.g. linux/arm64 or linux/arm/v7)"
                                    ),
                                ));
                            }
                            Some(p)
                        }
                        None => None,
                    };
                    stages.push(Stage {
                        index: stages.len(),
                        name: name.clone(),
                        base_text,
                        base,
                        platform,
                        line: ins.line,
                        instructions: Vec::new(),
                        copy_from: BTreeMap::new(),
                        needed: false,
                    });
                }
                _ => {
                    let idx = stages.len() - 1;
                    if let Kind::Arg(list) = &ins.kind {
                        declared.extend(list.iter().map(|(k, _)| k.clone()));
                    }
                    if let Kind::Copy(CopyArgs { from: Some(f), .. }) = &ins.kind {
                        let mut scope = platform.clone();
                        scope.extend(globals.clone());
                        let f = expand(f, df.escape, &scope)
                            .map_err(|e| at(ins.line, e.to_string()))?;
                        let lower = f.to_ascii_lowercase();
                        let r = if let Some(s) =
                            stages.iter().find(|s| s.name.as_deref() == Some(&lower))
                        {
                            if s.index == idx {
                                return Err(at(
                                    ins.line,
                                    format!("COPY --from={f} refers to its own stage"),
                                ));
                            }
                            BaseRef::Stage(s.index)
                        } else if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) {
                            match f.parse::<usize>() {
                                Ok(n) if n < idx => BaseRef::Stage(n),
                                _ => {
                                    return Err(at(
                                        ins.line,
                                        format!(
                                            "COPY --from={f}: no earlier stage with this index"
                                        ),
                                    ));
                                }
                            }
                        } else if f.is_empty() {
                            return Err(at(ins.line, "COPY --from is empty".into()));
                        } else {
                            classify(&f, &options.user, in_store)
                        };
                        stages[idx].copy_from.insert(ins.line, r);
                    }
                    stages[idx].instructions.push(ins.clone());
                }
            }
        }
        if stages.is_empty() {
            return Err(PlanError::At {
                file: df.file.clone(),
                line: df.instructions.last().map_or(1, |i| i.line),
                reason: "no FROM instruction".into(),
            });
        }
        // Needed stages, from the last one.
        let last = stages.len() - 1;
        let mut todo = vec![last];
        while let Some(i) = todo.pop() {
            if stages[i].needed {
                continue;
            }
            stages[i].needed = true;
            if let BaseRef::Stage(j) = stages[i].base {
                todo.push(j);
            }
            for r in stages[i].copy_from.values() {
                if let BaseRef::Stage(j) = r {
                    todo.push(*j);
                }
            }
        }
        let warnings = options
            .build_args
            .keys()
            .filter(|k| !declared.contains(*k) && !PROXY_ARGS.contains(&k.as_str()))
            .map(|k| {
                format!(
                    "build argument '{k}' was not consumed (no ARG {k} in {})",
                    df.file
                )
            })
            .collect();
        Ok(Plan {
            file: df.file.clone(),
            escape: df.escape,
            stages,
            globals,
            warnings,
            options: options.clone(),
        })
    }

    /// The stage saved as the image.
    pub fn last(&self) -> &Stage {
        self.stages.last().expect("a plan has a stage")
    }

    /// Phase 2: the steps of stage `index`, on a base with `base` settings
    /// (`Settings::scratch()` for scratch, the result of the stage for a
    /// stage, the image's config otherwise). The base's ONBUILD triggers
    /// come first (with the FROM line) and are not inherited.
    pub fn stage_steps(&self, index: usize, base: &Settings) -> Result<StagePlan, PlanError> {
        let stage = self.stages.get(index).ok_or(PlanError::NoStage(index))?;
        let esc = self.escape;
        let mut s = base.clone();
        // Docker gives every stage a PATH when its base has none.
        if !s.env_pairs().iter().any(|(k, _)| k == "PATH") {
            s.env.push(format!("PATH={DEFAULT_PATH}"));
        }
        let mut cmd_set = false;
        let mut author = None;
        // Declared ARGs of this stage: name → value (None: declared, unset).
        let mut args: Vec<(String, Option<String>)> = Vec::new();
        let platform = platform_args(&self.options);
        let mut steps = Vec::new();
        let mut total = 0usize;
        // The base image's ONBUILD triggers run first, and are consumed.
        let mut all = Vec::new();
        for t in std::mem::take(&mut s.on_build) {
            let trig = onbuild_trigger(&self.file, stage.line, &t, esc)?;
            all.push(trig);
        }
        all.extend(stage.instructions.iter().cloned());
        for ins in &all {
            let at = |e: String| PlanError::At {
                file: self.file.clone(),
                line: ins.line,
                reason: e,
            };
            let ex = |w: &str,
                      s: &Settings,
                      args: &[(String, Option<String>)]|
             -> Result<String, PlanError> {
                let scope = scope(s, args);
                expand(w, esc, &scope).map_err(|e: ExpandError| at(e.to_string()))
            };
            let action = match &ins.kind {
                Kind::Arg(list) => {
                    for (k, d) in list {
                        let v = match self.options.build_args.get(k) {
                            Some(v) => Some(v.clone()),
                            None => match d {
                                Some(d) => Some(ex(d, &s, &args)?),
                                None => self.globals.get(k).or_else(|| platform.get(k)).cloned(),
                            },
                        };
                        args.retain(|(n, _)| n != k);
                        args.push((k.clone(), v));
                    }
                    let size: usize = args
                        .iter()
                        .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len))
                        .sum();
                    if size > MAX_CONFIG_SIZE {
                        return Err(at("the build arguments grow over 1 MiB".into()));
                    }
                    Action::Arg
                }
                Kind::Env(kv) | Kind::Label(kv) => {
                    let mut out = Vec::new();
                    for (k, v) in kv {
                        let k = ex(k, &s, &args)?;
                        if k.is_empty() {
                            return Err(at(format!("{} name is empty", ins.kind.keyword())));
                        }
                        let v = ex(v, &s, &args)?;
                        out.push((k, v));
                    }
                    Action::Config(if matches!(ins.kind, Kind::Env(_)) {
                        Change::Env(out)
                    } else {
                        Change::Label(out)
                    })
                }
                Kind::Workdir(w) => {
                    let w = ex(w, &s, &args)?;
                    Action::Config(Change::Workdir(join_clean(&s.working_dir, &w)))
                }
                Kind::User(u) => Action::Config(Change::User(ex(u, &s, &args)?)),
                Kind::Stopsignal(sig) => {
                    let sig = ex(sig, &s, &args)?;
                    check_signal(&sig).map_err(at)?;
                    Action::Config(Change::StopSignal(sig))
                }
                Kind::Maintainer(m) => {
                    author = Some(m.clone());
                    Action::Config(Change::Maintainer(m.clone()))
                }
                Kind::Cmd(c) => Action::Config(Change::Cmd(argv(c, &s))),
                Kind::Entrypoint(c) => Action::Config(Change::Entrypoint(argv(c, &s))),
                Kind::Shell(sh) => Action::Config(Change::Shell(sh.clone())),
                Kind::Expose(ports) => {
                    let mut out = Vec::new();
                    for p in ports {
                        let p = ex(p, &s, &args)?;
                        for w in p.split_whitespace() {
                            parse_ports(w, &mut out).map_err(at)?;
                        }
                    }
                    Action::Config(Change::Expose(out))
                }
                Kind::Volume(v) => {
                    let mut out = Vec::new();
                    for v in v {
                        let v = ex(v, &s, &args)?;
                        if v.trim().is_empty() {
                            return Err(at("VOLUME cannot be an empty string".into()));
                        }
                        out.push(v);
                    }
                    Action::Config(Change::Volume(out))
                }
                Kind::Healthcheck(h) => Action::Config(Change::Healthcheck(match h {
                    Health::None => HealthConfig {
                        test: vec!["NONE".into()],
                        ..HealthConfig::default()
                    },
                    Health::Check {
                        cmd,
                        interval,
                        timeout,
                        start_period,
                        start_interval,
                        retries,
                    } => HealthConfig {
                        test: match cmd {
                            Cmd::Shell(t) => vec!["CMD-SHELL".into(), t.clone()],
                            Cmd::Exec(v) => {
                                let mut t = vec!["CMD".to_string()];
                                t.extend(v.iter().cloned());
                                t
                            }
                        },
                        interval: interval.unwrap_or(0),
                        timeout: timeout.unwrap_or(0),
                        start_period: start_period.unwrap_or(0),
                        start_interval: start_interval.unwrap_or(0),
                        retries: retries.unwrap_or(0),
                    },
                })),
                Kind::Onbuild { expression, .. } => {
                    Action::Config(Change::OnBuild(expression.clone()))
                }
                Kind::Run {
                    cmd,
                    heredocs,
                    network,
                } => Action::Run(RunStep {
                    argv: argv(cmd, &s),
                    heredocs: heredocs.clone(),
                    env: run_env(&s, &args, &self.options.build_args),
                    user: s.user.clone(),
                    workdir: if s.working_dir.is_empty() {
                        "/".into()
                    } else {
                        s.working_dir.clone()
                    },
                    network: network.clone(),
                }),
                Kind::Copy(a) | Kind::Add(a) => {
                    let mut sources = Vec::new();
                    for src in &a.sources {
                        sources.push(ex(src, &s, &args)?);
                    }
                    let mut docs = Vec::new();
                    for h in &a.heredocs {
                        let body = if h.expand {
                            ex(&h.body, &s, &args)?
                        } else {
                            h.body.clone()
                        };
                        docs.push((h.name.clone(), body));
                    }
                    let dest = ex(&a.dest, &s, &args)?;
                    if dest.is_empty() {
                        return Err(at("the destination is empty".into()));
                    }
                    let abs = if dest.starts_with('/') {
                        dest.clone()
                    } else {
                        let mut d = join_clean(&s.working_dir, &dest);
                        if (dest.ends_with('/') || dest == "." || dest.ends_with("/."))
                            && !d.ends_with('/')
                        {
                            d.push('/');
                        }
                        d
                    };
                    let opt = |o: &Option<String>| -> Result<Option<String>, PlanError> {
                        o.as_ref().map(|v| ex(v, &s, &args)).transpose()
                    };
                    Action::Copy(CopyStep {
                        add: matches!(ins.kind, Kind::Add(_)),
                        from: stage.copy_from.get(&ins.line).cloned(),
                        sources,
                        heredocs: docs,
                        dest: abs,
                        chown: opt(&a.chown)?,
                        chmod: opt(&a.chmod)?,
                        link: a.link,
                    })
                }
                Kind::From { .. } => unreachable!("FROM starts a stage"),
            };
            if let Action::Config(c) = &action {
                apply(&mut s, c, &mut cmd_set);
                if settings_size(&s) > MAX_CONFIG_SIZE {
                    return Err(at("the image config grows over 1 MiB".into()));
                }
            }
            total += action_size(&action) + ins.text.len();
            if total > MAX_STAGE_PLAN_SIZE {
                return Err(at(
                    "the steps of this stage grow over 64 MiB once expanded".into()
                ));
            }
            steps.push(Step {
                line: ins.line,
                text: ins.text.clone(),
                action,
            });
        }
        Ok(StagePlan {
            steps,
            settings: s,
            author,
        })
    }
}

/// A base image's ONBUILD trigger as an instruction of the FROM line.
fn onbuild_trigger(
    file: &str,
    line: usize,
    trigger: &str,
    escape: char,
) -> Result<Instruction, PlanError> {
    let at = |reason: String| PlanError::At {
        file: file.to_string(),
        line,
        reason: format!("ONBUILD trigger '{trigger}' of the base image: {reason}"),
    };
    let text = if escape == '\\' {
        trigger.to_string()
    } else {
        format!("# escape={escape}\n{trigger}")
    };
    let df = crate::dockerfile::parse(file, &text).map_err(|e| match e {
        crate::dockerfile::DockerfileError::Syntax { reason, .. } => at(reason),
        e => at(e.to_string()),
    })?;
    let [ins] = <[Instruction; 1]>::try_from(df.instructions)
        .map_err(|_| at("not one instruction".into()))?;
    match &ins.kind {
        Kind::From { .. } | Kind::Onbuild { .. } | Kind::Maintainer(_) => Err(at(format!(
            "{} is not allowed as a trigger",
            ins.kind.keyword()
        ))),
        Kind::Copy(CopyArgs { from: Some(_), .. }) => {
            Err(at("COPY --from is not supported in a trigger".into()))
        }
        Kind::Run { heredocs, .. }
        | Kind::Copy(CopyArgs { heredocs, .. })
        | Kind::Add(CopyArgs { heredocs, .. })
            if !heredocs.is_empty() =>
        {
            Err(at("heredocs are not supported in a trigger".into()))
        }
        _ => Ok(Instruction {
            line,
            end_line: line,
            ..ins
        }),
    }
}

/// TARGETPLATFORM & co.
fn platform_args(o: &Options) -> BTreeMap<String, String> {
    let arch = if o.arch.is_empty() { "amd64" } else { &o.arch };
    let variant = o.variant.clone().unwrap_or_default();
    let plat = if variant.is_empty() {
        format!("linux/{arch}")
    } else {
        format!("linux/{arch}/{variant}")
    };
    let mut m = BTreeMap::new();
    for p in ["TARGET", "BUILD"] {
        m.insert(format!("{p}PLATFORM"), plat.clone());
        m.insert(format!("{p}OS"), "linux".to_string());
        m.insert(format!("{p}ARCH"), arch.to_string());
        m.insert(format!("{p}VARIANT"), variant.clone());
    }
    m
}

/// Expansion scope: ENV first, then the declared ARGs that have a value.
fn scope(s: &Settings, args: &[(String, Option<String>)]) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = args
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
        .collect();
    m.extend(s.env_pairs());
    m
}

fn run_env(
    s: &Settings,
    args: &[(String, Option<String>)],
    build_args: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut env = s.env.clone();
    let has = |env: &[String], k: &str| {
        env.iter()
            .any(|e| e.split_once('=').map_or(e.as_str(), |(a, _)| a) == k)
    };
    for (k, v) in args {
        if let Some(v) = v
            && !has(&env, k)
        {
            env.push(format!("{k}={v}"));
        }
    }
    for k in PROXY_ARGS {
        if let Some(v) = build_args.get(*k)
            && !has(&env, k)
        {
            env.push(format!("{k}={v}"));
        }
    }
    if !has(&env, "PATH") {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    env
}

fn argv(c: &Cmd, s: &Settings) -> Vec<String> {
    match c {
        Cmd::Exec(v) => v.clone(),
        Cmd::Shell(t) => {
            let mut a = s.shell_or_default();
            a.push(t.clone());
            a
        }
    }
}

/// `base` joined with `p` (when relative), `.` and `..` resolved, absolute.
pub fn join_clean(base: &str, p: &str) -> String {
    let full = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{}/{p}", if base.is_empty() { "/" } else { base })
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in full.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// `80`, `80/udp`, `8000-8010/tcp` → `80/tcp`...
fn parse_ports(w: &str, out: &mut Vec<String>) -> Result<(), String> {
    let (ports, proto) = match w.split_once('/') {
        Some((p, pr)) => (p, pr.to_ascii_lowercase()),
        None => (w, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid protocol '{proto}' in EXPOSE {w}"));
    }
    let num = |s: &str| -> Result<u16, String> {
        s.parse::<u16>()
            .map_err(|_| format!("invalid port '{w}' in EXPOSE"))
    };
    let (a, b) = match ports.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => {
            let p = num(ports)?;
            (p, p)
        }
    };
    if b < a || usize::from(b - a) >= MAX_PORTS {
        return Err(format!("invalid port range '{w}' in EXPOSE"));
    }
    for p in a..=b {
        out.push(format!("{p}/{proto}"));
    }
    Ok(())
}

/// A signal name (`SIGTERM`, `TERM`) or number.
fn check_signal(sig: &str) -> Result<(), String> {
    const NAMES: &[&str] = &[
        "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "IOT", "BUS", "FPE", "KILL", "USR1", "SEGV",
        "USR2", "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU",
        "URG", "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "POLL", "PWR", "SYS",
    ];
    if let Ok(n) = sig.parse::<u32>()
        && (1..=64).contains(&n)
    {
        return Ok(());
    }
    let up = sig.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    if NAMES.contains(&name) || name.starts_with("RTMIN") || name.starts_with("RTMAX") {
        return Ok(());
    }
    Err(format!("invalid STOPSIGNAL '{sig}'"))
}
