//! `Images.Build`: `walt image build`, natively.
//!
//! The context comes from the client as a tar stream (or from `git clone`
//! on the server), lands in the store's `tmp/`, and the Dockerfile is
//! parsed and planned (walt-build) before anything runs. Each stage then
//! runs its steps on the sandbox (walt-container) over the layers built so
//! far: a RUN runs the command, a COPY/ADD pipes a tar into a `Place` job,
//! a WORKDIR creates its directory; what a step changed is committed as
//! one uncompressed layer (walt-store), exactly as a shell save is. Every
//! filesystem step goes through the layer cache first: its key is its
//! parent layers, its expanded instruction and (COPY/ADD) the digest of
//! its inputs. Only the last stage is recorded, and only when it carries
//! `walt.node.models`.

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use walt_build::cache::{self, CacheKey, InputMeta};
use walt_build::context::{self as ctx, Source, SourceKind};
use walt_build::plan::{self, Action, BaseRef, Change, CopyStep, Plan, RunStep, Settings};
use walt_container::{Job, Spec};
use walt_core::models::Platform;
use walt_core::oci::ImageConfig;
use walt_core::{ImageName, LABEL_NODE_MODELS};
use walt_proto::v1::{self as pb, build_event::Event, build_request::Msg};
use walt_store::{CacheEntry, ImportGuard, LayerRef, SessionDir, Store};

use crate::State;
use crate::error::ServiceError;
use crate::images::blocking;

pub type BuildStream = Pin<Box<dyn Stream<Item = Result<pb::BuildEvent, Status>> + Send>>;

type Tx = mpsc::Sender<Result<pb::BuildEvent, Status>>;

/// Longest a `git clone` of `--from-url` may take.
const GIT_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest RUN output chunk sent at once.
const OUTPUT_CHUNK: usize = 32 * 1024;
/// Largest file an `ADD <url>` downloads.
const MAX_ADD_URL: u64 = 4 << 30;

/// Reads `start`, checks the name and takes its lock; the build then runs
/// in a task feeding the returned stream.
pub async fn start(
    state: Arc<State>,
    user: String,
    mut input: Streaming<pb::BuildRequest>,
) -> Result<BuildStream, ServiceError> {
    let start = match input.message().await {
        Ok(Some(pb::BuildRequest {
            msg: Some(Msg::Start(s)),
        })) => s,
        Ok(_) => {
            return Err(ServiceError::InvalidArgument(
                "a build request must start with the image to build".into(),
            ));
        }
        Err(s) => return Err(ServiceError::InvalidArgument(s.message().to_string())),
    };
    let target = ImageName::parse_user(&user, start.name.trim())?;
    let lock = state.locks.acquire(
        &target,
        format!(
            "walt image build of {user} (since {})",
            crate::session::clock()
        ),
    )?;
    let (st, t) = (state.clone(), target.clone());
    let (exists, in_use) = blocking(move || {
        let exists = st.store.get_image(&t)?.is_some();
        let notice = match exists {
            true => crate::nodes::service::in_use_notice(&st, &t)?,
            false => None,
        };
        Ok((exists, notice))
    })
    .await?;
    if exists && !start.overwrite {
        return Err(ServiceError::AlreadyExists(format!(
            "image '{}' already exists: confirm replacing it (walt image build --yes)",
            target.short()
        )));
    }
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let image = target.clone();
        let r = run(&state, &user, start, target, exists, in_use, input, &tx).await;
        drop(lock);
        match r {
            Ok(()) => tracing::info!(image = %image, user = %user,
                elapsed_ms = started.elapsed().as_millis() as u64, "image built"),
            Err(e) => {
                tracing::info!(image = %image, user = %user, error = %e, "build failed");
                // The last line the user sees says that the build failed
                // (nothing is saved), then why.
                let st = Status::from(e);
                let st = Status::with_metadata(
                    st.code(),
                    format!("build failed: {}", st.message()),
                    st.metadata().clone(),
                );
                let _ = tx.send(Err(st)).await;
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// Build contexts received with a digest ([`pb::BuildStart::context_digest`]),
/// most recently used last, so that an unchanged rebuild does not send
/// them again. They live in the store's `tmp/` (emptied at start).
#[derive(Default)]
pub struct Contexts(std::sync::Mutex<Vec<Arc<Context>>>);

/// Contexts kept.
const CONTEXTS_KEPT: usize = 4;
/// Larger contexts are not kept.
const CONTEXT_KEPT_MAX: u64 = 1 << 30;

impl Contexts {
    fn get(&self, user: &str, digest: &str) -> Option<Arc<Context>> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let i = v
            .iter()
            .position(|c| c.user == user && c.digest.as_deref() == Some(digest))?;
        let c = v.remove(i);
        v.push(c.clone());
        Some(c)
    }

    fn put(&self, c: Arc<Context>) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|o| !(o.user == c.user && o.digest == c.digest));
        v.push(c);
        while v.len() > CONTEXTS_KEPT {
            // Removed once the last build using it ends.
            v.remove(0);
        }
    }
}

/// A build context on the server: its directory (never changed once
/// received), its Dockerfile, and the digests of COPY inputs already
/// computed in it.
struct Context {
    user: String,
    digest: Option<String>,
    /// Removed when the last build holding the context drops it.
    _dir: Scratch,
    /// The context directory (after `--sub-dir`).
    root: PathBuf,
    dockerfile: ctx::Dockerfile,
    inputs: std::sync::Mutex<std::collections::HashMap<String, CacheKey>>,
}

/// The events of a build; a send that fails means the client went away.
struct Events<'a>(&'a Tx);

impl Events<'_> {
    async fn send(&self, e: Event) -> Result<(), ServiceError> {
        self.0
            .send(Ok(pb::BuildEvent { event: Some(e) }))
            .await
            .map_err(|_| gone())
    }

    async fn say(&self, text: String) -> Result<(), ServiceError> {
        self.send(Event::Message(text)).await
    }
}

fn gone() -> ServiceError {
    ServiceError::InvalidArgument("build abandoned: the client went away".into())
}

fn bad(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::InvalidArgument(e.to_string())
}

#[allow(clippy::too_many_arguments)]
async fn run(
    state: &Arc<State>,
    user: &str,
    start: pb::BuildStart,
    target: ImageName,
    exists: bool,
    in_use: Option<String>,
    mut input: Streaming<pb::BuildRequest>,
    tx: &Tx,
) -> Result<(), ServiceError> {
    let events = Events(tx);
    // Replacing an image nodes boot: they follow it.
    if let Some(notice) = &in_use {
        events.say(notice.clone()).await?;
    }
    let store = state.store.clone();
    // Everything the build writes (context, sessions, layers) is held
    // from gc until the image or the cache references it.
    let guard = store.begin_import();
    // 1. The context: the one the server still holds, received, or cloned.
    let context = obtain_context(state, user, &start, &mut input, &events).await?;

    // 2. Parse and plan: a syntax error or an unknown instruction stops
    //    the build before anything runs.
    let dockerfile = &context.dockerfile;
    let text = String::from_utf8(dockerfile.text.clone()).map_err(|_| {
        ServiceError::InvalidArgument(format!("{} is not valid UTF-8 text", dockerfile.name))
    })?;
    let df = walt_build::dockerfile::parse(dockerfile.name, &text).map_err(bad)?;
    let (arch, variant) = walt_core::oci::oci_arch(std::env::consts::ARCH);
    let options = plan::Options {
        build_args: start.build_args.clone().into_iter().collect(),
        user: user.to_string(),
        arch: arch.to_string(),
        variant: variant.map(str::to_string),
    };
    let s = store.clone();
    let plan = blocking(move || {
        let mut in_store = |n: &ImageName| s.get_image(n).ok().flatten().is_some();
        Plan::new(&df, &options, &mut in_store).map_err(bad)
    })
    .await?;
    for w in &plan.warnings {
        events.say(format!("warning: {w}")).await?;
    }

    // 3. The stages.
    let count: usize = plan
        .stages
        .iter()
        .filter(|s| s.needed)
        .map(|s| 1 + s.instructions.len())
        .sum();
    let mut b = Builder {
        state: state.clone(),
        store: store.clone(),
        events,
        no_cache: start.no_cache,
        context,
        image: target.clone(),
        index: 0,
        count,
        cached: 0,
        steps: 0,
        _guard: guard,
    };
    let mut outs: Vec<Option<StageOut>> = Vec::with_capacity(plan.stages.len());
    for stage in &plan.stages {
        if !stage.needed {
            outs.push(None);
            continue;
        }
        let out = b.stage(&plan, stage.index, &outs).await?;
        outs.push(Some(out));
    }
    let last = outs
        .pop()
        .flatten()
        .ok_or_else(|| ServiceError::Internal("the last stage was not built".into()))?;

    // 4. The image.
    let models = last
        .settings
        .labels
        .get(LABEL_NODE_MODELS)
        .map(|m| walt_core::models::parse_models(m))
        .unwrap_or_default();
    if models.is_empty() {
        return Err(ServiceError::FailedPrecondition(format!(
            "the image built has no {LABEL_NODE_MODELS} label (add `LABEL {LABEL_NODE_MODELS}=<model>,...` \
             or build FROM an image that has it): nothing saved"
        )));
    }
    // Nodes booting the image replaced must find their model in the new one.
    let (s, t, m) = (store.clone(), target.clone(), models.clone());
    let nodes = blocking(move || {
        let nodes = s.nodes_using(&t)?;
        let count = nodes.len();
        let bad: Vec<String> = nodes
            .into_iter()
            .filter_map(|d| {
                let model = d.model.unwrap_or_default();
                (!m.contains(&model)).then(|| format!("{} ({model})", d.name))
            })
            .collect();
        if bad.is_empty() {
            return Ok(count);
        }
        Err(ServiceError::FailedPrecondition(format!(
            "the image built does not support the model of node{} {} that boot{} '{}' \
             (add the model{} to its {LABEL_NODE_MODELS} label): nothing saved",
            if bad.len() == 1 { "" } else { "s" },
            bad.join(", "),
            if bad.len() == 1 { "s" } else { "" },
            t.short(),
            if bad.len() == 1 { "" } else { "s" },
        )))
    })
    .await?;
    let (config, created) = last.image_config();
    let (s, t, layers) = (store.clone(), target.clone(), last.layers.clone());
    let (manifest, outcome) =
        blocking(move || Ok(s.record_built_image(&t, config, layers, models, exists, created)?))
            .await?;
    if nodes > 0 {
        state.nodes.changed();
    }
    // Kept for an unchanged rebuild (a failed build keeps nothing).
    if b.context.digest.is_some() {
        state.build_contexts.put(b.context.clone());
    }
    let s = store.clone();
    let max = store.limits().build_cache_size;
    let _ = blocking(move || Ok(s.prune_build_cache(max)?)).await;
    b.events
        .send(Event::Result(pb::BuildResult {
            name: target.short(),
            manifest_digest: manifest.to_string(),
            steps: b.steps,
            cached: b.cached,
            replaced: matches!(outcome, walt_store::PutOutcome::Replaced),
        }))
        .await?;
    Ok(())
}

/// What a stage produced so far.
#[derive(Clone)]
struct StageOut {
    layers: Vec<LayerRef>,
    /// The base's image config (architecture, os, history...).
    base: Map<String, Value>,
    settings: Settings,
    author: Option<String>,
    history: Vec<Value>,
    /// Unix seconds of the newest layer (base or step).
    created: i64,
}

impl StageOut {
    /// The identity of the layers, for cache keys.
    fn chain(&self) -> String {
        let mut s = String::from("layers:");
        for l in &self.layers {
            s.push_str(l.diff_id.as_str());
            s.push(',');
        }
        s
    }

    fn arch(&self) -> (String, Option<String>) {
        let a = self
            .base
            .get("architecture")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let v = self
            .base
            .get("variant")
            .and_then(Value::as_str)
            .map(str::to_string);
        (a, v)
    }

    fn add_history(&mut self, text: &str, empty: bool) {
        let mut h = json!({ "created": walt_store::rfc3339(self.created), "created_by": text });
        if empty {
            h["empty_layer"] = Value::Bool(true);
        }
        self.history.push(h);
    }

    /// The final image config and its creation time.
    fn image_config(&self) -> (Map<String, Value>, i64) {
        let mut c = self.base.clone();
        let base_rc = c
            .get("config")
            .and_then(|v| serde_json::from_value::<walt_core::oci::RuntimeConfig>(v.clone()).ok());
        let rc = self.settings.to_runtime(base_rc.as_ref());
        c.insert(
            "config".into(),
            serde_json::to_value(rc).unwrap_or(Value::Object(Map::new())),
        );
        c.insert(
            "rootfs".into(),
            json!({
                "type": "layers",
                "diff_ids": self.layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
            }),
        );
        c.insert("history".into(), Value::Array(self.history.clone()));
        c.insert("created".into(), walt_store::rfc3339(self.created).into());
        if let Some(a) = &self.author {
            c.insert("author".into(), a.clone().into());
        }
        c.entry("os").or_insert_with(|| "linux".into());
        (c, self.created)
    }
}

struct Builder<'a> {
    state: Arc<State>,
    store: Arc<Store>,
    events: Events<'a>,
    no_cache: bool,
    context: Arc<Context>,
    image: ImageName,
    index: u32,
    count: usize,
    cached: u32,
    steps: u32,
    _guard: ImportGuard,
}

/// How a filesystem step turned out.
struct StepResult {
    layer: Option<LayerRef>,
    created: i64,
}

impl Builder<'_> {
    async fn announce(&mut self, text: &str, cached: bool) -> Result<(), ServiceError> {
        self.index += 1;
        self.steps += 1;
        if cached {
            self.cached += 1;
        }
        let count = self.count.max(self.index as usize) as u32;
        self.events
            .send(Event::Step(pb::BuildStep {
                index: self.index,
                count,
                text: walt_core::text::one_line(text).into_owned(),
                cached,
            }))
            .await
    }

    fn label(&self) -> String {
        format!("the build of '{}', step {}", self.image.short(), self.index)
    }

    async fn stage(
        &mut self,
        plan: &Plan,
        index: usize,
        outs: &[Option<StageOut>],
    ) -> Result<StageOut, ServiceError> {
        let stage = &plan.stages[index];
        let from_text = plan
            .stages
            .get(index)
            .map(|s| df_line(&s.base_text, s.name.as_deref(), s.platform.as_deref()))
            .unwrap_or_default();
        self.announce(&from_text, false).await?;
        let platform = stage.platform.as_deref().and_then(Platform::parse);
        let mut out = self.base(&stage.base, platform, outs).await?;
        if let Some(want) = platform
            && !matches!(stage.base, BaseRef::Scratch | BaseRef::Stage(_))
        {
            let (arch, variant) = out.arch();
            if !want.matches(&arch, variant.as_deref()) {
                return Err(ServiceError::NoPlatform {
                    url: format!("base image '{}'", stage.base_text),
                    arch: want.to_string().trim_start_matches("linux/").to_string(),
                    available: match variant {
                        Some(v) => format!("linux/{arch}/{v}"),
                        None => format!("linux/{arch}"),
                    },
                });
            }
        }
        let steps = plan.stage_steps(index, &out.settings).map_err(bad)?;
        out.author = steps.author.clone().or(out.author);
        let mut cmd_set = false;
        let mut checked_arch = false;
        for step in &steps.steps {
            match &step.action {
                Action::Arg => {
                    self.announce(&step.text, false).await?;
                }
                Action::Config(change) => {
                    if let Change::Workdir(dir) = change {
                        let key = cache::step_key(&out.chain(), &format!("WORKDIR {dir:?}"), None);
                        let hit = self.lookup(&key).await?;
                        self.announce(&step.text, hit.is_some()).await?;
                        let r = self
                            .settle(&key, hit, self.workdir(&out, dir.clone()))
                            .await?;
                        push(&mut out, r, &step.text);
                    } else {
                        self.announce(&step.text, false).await?;
                        out.add_history(&step.text, true);
                    }
                    plan::apply(&mut out.settings, change, &mut cmd_set);
                }
                Action::Run(run) => {
                    if !checked_arch {
                        let (a, v) = out.arch();
                        if !a.is_empty() {
                            walt_container::check_emulation(&a, v.as_deref()).map_err(|e| {
                                ServiceError::FailedPrecondition(format!(
                                    "{}, line {}: cannot run this {a} image here: {e}",
                                    plan.file, step.line
                                ))
                            })?;
                        }
                        checked_arch = true;
                    }
                    let key = cache::step_key(&out.chain(), &format!("{run:?}"), None);
                    let hit = self.lookup(&key).await?;
                    self.announce(&step.text, hit.is_some()).await?;
                    let r = self
                        .settle(
                            &key,
                            hit,
                            self.run_step(&out, run, &step.text, step.line, &plan.file),
                        )
                        .await?;
                    push(&mut out, r, &step.text);
                }
                Action::Copy(copy) => {
                    let prepared = self
                        .prepare_copy(copy, outs)
                        .await
                        .map_err(|e| at_line(&plan.file, step.line, e))?;
                    let key =
                        cache::step_key(&out.chain(), &format!("{copy:?}"), Some(&prepared.inputs));
                    let hit = self.lookup(&key).await?;
                    self.announce(&step.text, hit.is_some()).await?;
                    let copied = async {
                        self.copy_step(&out, copy, prepared)
                            .await
                            .map_err(|e| at_line(&plan.file, step.line, e))
                    };
                    let r = self.settle(&key, hit, copied).await?;
                    push(&mut out, r, &step.text);
                }
            }
        }
        // The plan's view of the config is the reference (CMD/ENTRYPOINT
        // interplay included).
        out.settings = steps.settings;
        Ok(out)
    }

    async fn lookup(&self, key: &CacheKey) -> Result<Option<StepResult>, ServiceError> {
        if self.no_cache {
            return Ok(None);
        }
        let (s, k) = (self.store.clone(), key.digest());
        let hit = blocking(move || Ok(s.cache_get(&k)?)).await?;
        Ok(hit.map(|e| StepResult {
            layer: e.layers.into_iter().next(),
            created: e.created,
        }))
    }

    /// A step's result: its cache hit, or what `work` does, then
    /// remembered in the cache.
    async fn settle(
        &self,
        key: &CacheKey,
        hit: Option<StepResult>,
        work: impl std::future::Future<Output = Result<StepResult, ServiceError>>,
    ) -> Result<StepResult, ServiceError> {
        if let Some(r) = hit {
            return Ok(r);
        }
        let r = work.await?;
        self.remember(key, &r).await?;
        Ok(r)
    }

    async fn remember(&self, key: &CacheKey, r: &StepResult) -> Result<(), ServiceError> {
        let (s, k) = (self.store.clone(), key.digest());
        let entry = CacheEntry {
            layers: r.layer.iter().cloned().collect(),
            config_digest: None,
            created: r.created,
        };
        blocking(move || Ok(s.cache_put(&k, &entry)?)).await
    }

    /// The start of a stage. With a `FROM --platform`, scratch is of that
    /// platform, and an index is resolved to it (`stage` checks the result).
    async fn base(
        &self,
        base: &BaseRef,
        platform: Option<Platform>,
        outs: &[Option<StageOut>],
    ) -> Result<StageOut, ServiceError> {
        match base {
            BaseRef::Scratch => {
                let (arch, variant) = match platform {
                    Some(p) => (p.architecture, p.variant),
                    None => walt_core::oci::oci_arch(std::env::consts::ARCH),
                };
                let mut m = Map::new();
                m.insert("architecture".into(), arch.into());
                if let Some(v) = variant {
                    m.insert("variant".into(), v.into());
                }
                m.insert("os".into(), "linux".into());
                Ok(StageOut {
                    layers: Vec::new(),
                    base: m,
                    settings: Settings::scratch(),
                    author: None,
                    history: Vec::new(),
                    created: 0,
                })
            }
            BaseRef::Stage(j) => outs
                .get(*j)
                .cloned()
                .flatten()
                .ok_or_else(|| ServiceError::Internal(format!("stage {j} was not built"))),
            BaseRef::Own(name) | BaseRef::Store(name) => {
                let (s, n, u) = (self.store.clone(), name.clone(), self.image.owner.clone());
                let (rec, config) = blocking(move || {
                    let rec = s.get_image(&n)?.ok_or_else(|| {
                        ServiceError::NotFound(format!(
                            "base image '{n}' is no longer in the store"
                        ))
                    })?;
                    crate::editable::ensure_editable(&rec, &u)?;
                    let config = s.read_blob(&rec.config_digest)?;
                    Ok((rec, config))
                })
                .await?;
                stage_from(rec.layers, &config, rec.created, &name.to_string())
            }
            BaseRef::Remote(reference) => {
                let key = match platform {
                    Some(p) => format!("base:{reference}@{p}"),
                    None => format!("base:{reference}"),
                };
                let (s, k) = (self.store.clone(), key.clone());
                let hit = blocking(move || Ok(s.cache_get(&k)?)).await?;
                if let Some(CacheEntry {
                    layers,
                    config_digest: Some(cd),
                    created,
                }) = hit
                {
                    let s = self.store.clone();
                    if let Ok(config) = blocking(move || Ok(s.read_blob(&cd)?)).await {
                        return stage_from(layers, &config, created, reference);
                    }
                }
                let (say_tx, mut say_rx) = mpsc::unbounded_channel::<String>();
                let say = move |line: String| {
                    let _ = say_tx.send(line);
                };
                let fetch = crate::clone::fetch_base(&self.state, reference, platform, &say);
                tokio::pin!(fetch);
                let fetched = loop {
                    tokio::select! {
                        r = &mut fetch => break r?,
                        Some(line) = say_rx.recv() => self.events.say(line).await?,
                        _ = self.events.0.closed() => return Err(gone()),
                    }
                };
                while let Ok(line) = say_rx.try_recv() {
                    self.events.say(line).await?;
                }
                tracing::info!(image = %self.image, base = %reference, from = %fetched.url,
                    manifest = %fetched.manifest_digest, "build base fetched");
                let created = walt_store::now_secs();
                let entry = CacheEntry {
                    layers: fetched.layers.clone(),
                    config_digest: Some(fetched.config_digest.clone()),
                    created,
                };
                let s = self.store.clone();
                blocking(move || Ok(s.cache_put(&key, &entry)?)).await?;
                stage_from(fetched.layers, &fetched.config, created, reference)
            }
        }
    }

    /// The sandbox spec of a job on `layers`, with `dir`'s session dirs.
    fn spec(&self, layers: &[LayerRef], dir: &Scratch, job: Job) -> Spec {
        Spec {
            layers: layers
                .iter()
                .map(|l| self.store.layer_path(&l.diff_id))
                .collect(),
            upper: dir.upper(),
            work: dir.work(),
            merged: dir.merged(),
            job,
        }
    }

    async fn session(&self) -> Result<Scratch, ServiceError> {
        let s = self.store.clone();
        let dir = blocking(move || Ok(s.session_dir("build-step")?)).await?;
        Ok(Scratch(Some(dir)))
    }

    /// Commits what the session changed as a layer (none when nothing).
    /// `ran` says the session ran a program of the image (RUN): its
    /// sandbox created the image's missing mount points, removed here when
    /// still empty. COPY, ADD and WORKDIR create no mount point: an empty
    /// `/proc` they bring (a root filesystem added to `scratch`) is the
    /// image's.
    async fn commit(&self, dir: Scratch, ran: bool) -> Result<StepResult, ServiceError> {
        let (s, label) = (self.store.clone(), self.label());
        let dir = dir.take();
        let layer = blocking(move || {
            let upper = dir.upper();
            if ran {
                walt_container::clean_session_artifacts(&upper);
            }
            if let Err(e) = pin_root_mtime(&upper) {
                tracing::warn!(upper = %upper.display(), error = %e, "cannot set the layer root's mtime");
            }
            if Store::upper_is_empty(&upper)? {
                return Ok(None);
            }
            let layer = s.commit_upper(&upper, &label)?;
            drop(dir);
            Ok(Some(layer))
        })
        .await?;
        Ok(StepResult {
            layer,
            created: walt_store::now_secs(),
        })
    }

    async fn run_step(
        &self,
        out: &StageOut,
        run: &RunStep,
        text: &str,
        line: usize,
        file: &str,
    ) -> Result<StepResult, ServiceError> {
        let dir = self.session().await?;
        let argv = with_heredocs(run);
        let spec = self.spec(
            &out.layers,
            &dir,
            Job::Exec {
                argv,
                env: run.env.clone(),
                cwd: run.workdir.clone(),
                user: run.user.clone(),
            },
        );
        let (r, w) = pipe()?;
        let w2 = w
            .try_clone()
            .map_err(|e| ServiceError::Internal(format!("cannot create a pipe: {e}")))?;
        let mut child = start_sandbox(&spec, Stdio::null(), Stdio::from(w), Stdio::from(w2))?;
        let mut output = tokio::net::unix::pipe::Receiver::from_owned_fd(r)
            .map_err(|e| ServiceError::Internal(format!("cannot read the step's output: {e}")))?;
        let mut buf = vec![0u8; OUTPUT_CHUNK];
        let mut open = true;
        let mut status = None;
        let why: Option<ServiceError> = loop {
            if !open && status.is_some() {
                break None;
            }
            tokio::select! {
                n = output.read(&mut buf), if open => match n {
                    Ok(0) | Err(_) => open = false,
                    Ok(n) => {
                        if self.events.send(Event::Output(buf[..n].to_vec())).await.is_err() {
                            break Some(gone());
                        }
                    }
                },
                st = child.wait(), if status.is_none() => match st {
                    Ok(st) => status = Some(st),
                    Err(e) => break Some(ServiceError::Internal(format!("build sandbox lost: {e}"))),
                },
                _ = self.events.0.closed() => break Some(gone()),
                _ = self.state.shutdown.cancelled() => break Some(ServiceError::ShuttingDown),
            }
        };
        if let Some(e) = why {
            crate::session::stop_sandbox(&mut child).await;
            return Err(e);
        }
        let status = status.expect("the loop ends with a status");
        if !status.success() {
            let code = exit_code(status);
            return Err(ServiceError::FailedPrecondition(format!(
                "{file}, line {line}: `{}`: the command exited with status {code}",
                walt_core::text::one_line(text)
            )));
        }
        self.commit(dir, true).await
    }

    /// WORKDIR: the directory exists afterwards (created when missing).
    async fn workdir(&self, out: &StageOut, dir: String) -> Result<StepResult, ServiceError> {
        let session = self.session().await?;
        let job = Job::Place {
            dest: dir,
            file_name: None,
            // Created as root whatever USER says, as docker does.
            owner: None,
            limit: Some(0),
        };
        let empty = tar_end();
        self.place(out, &session, job, Feed::Bytes(empty)).await?;
        self.commit(session, false).await
    }

    /// Resolves a COPY/ADD's sources and digests them (for the cache key).
    async fn prepare_copy(
        &self,
        copy: &CopyStep,
        outs: &[Option<StageOut>],
    ) -> Result<Prepared, ServiceError> {
        if let Some(from) = &copy.from {
            let src =
                match from {
                    BaseRef::Stage(j) => outs.get(*j).cloned().flatten().ok_or_else(|| {
                        ServiceError::Internal(format!("stage {j} was not built"))
                    })?,
                    // An image: resolved as a FROM would be.
                    other => self.base(other, None, outs).await?,
                };
            let inputs = cache::step_key("from", &src.chain(), None);
            return Ok(Prepared {
                inputs,
                source: CopySource::Stage(src.layers),
                _tmp: None,
            });
        }
        let chmod = match &copy.chmod {
            Some(c) => Some(walt_build::copy::parse_chmod(c).map_err(bad)?),
            None => None,
        };
        // Heredocs and URLs become files of a directory of their own.
        let (root, tmp, sources) = if !copy.heredocs.is_empty() {
            let tmp = self.session().await?;
            let root = tmp.path().join("heredocs");
            let docs = copy.heredocs.clone();
            let r = root.clone();
            blocking(move || {
                std::fs::create_dir(&r).map_err(io_err("creating the heredoc directory"))?;
                for (name, body) in &docs {
                    let p = r.join(ctx::clean_source(name));
                    std::fs::write(&p, body).map_err(io_err("writing a heredoc"))?;
                    std::fs::set_permissions(
                        &p,
                        std::os::unix::fs::PermissionsExt::from_mode(0o644),
                    )
                    .map_err(io_err("writing a heredoc"))?;
                }
                Ok(())
            })
            .await?;
            let names = copy.heredocs.iter().map(|(n, _)| n.clone()).collect();
            (root, Some(tmp), names)
        } else if copy.add && copy.sources.iter().any(|s| is_url(s)) {
            if !copy.sources.iter().all(|s| is_url(s)) {
                return Err(ServiceError::InvalidArgument(
                    "ADD: URLs and local sources cannot be mixed in one instruction".into(),
                ));
            }
            let tmp = self.session().await?;
            let root = tmp.path().join("urls");
            std::fs::create_dir(&root).map_err(io_err("creating the download directory"))?;
            let mut names = Vec::new();
            for url in &copy.sources {
                let name = self.download(url, &root, &copy.dest).await?;
                names.push(name);
            }
            (root, Some(tmp), names)
        } else {
            (self.context.root.clone(), None, copy.sources.clone())
        };
        // The context never changes: the digest of the same sources in it
        // is computed once.
        let memo = tmp.is_none().then(|| format!("{sources:?} {chmod:?}"));
        let known = memo.as_ref().and_then(|m| {
            self.context
                .inputs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(m)
                .copied()
        });
        let r = root.clone();
        let (resolved, inputs) = blocking(move || {
            let resolved = ctx::resolve_sources(&r, &sources).map_err(bad)?;
            if let Some(s) = resolved.iter().find(|s| s.kind == SourceKind::Other) {
                return Err(ServiceError::InvalidArgument(format!(
                    "'{}' is not a regular file or a directory",
                    s.src
                )));
            }
            let inputs = match known {
                Some(k) => k,
                None => cache::digest_inputs(&r, &resolved, InputMeta { chown: None, chmod })
                    .map_err(bad)?,
            };
            Ok((resolved, inputs))
        })
        .await?;
        if let Some(m) = memo {
            self.context
                .inputs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(m, inputs);
        }
        Ok(Prepared {
            inputs,
            source: CopySource::Dir {
                root,
                sources: resolved,
                chmod,
                url: copy.add && copy.sources.iter().any(|s| is_url(s)),
            },
            _tmp: tmp,
        })
    }

    async fn copy_step(
        &self,
        out: &StageOut,
        copy: &CopyStep,
        prepared: Prepared,
    ) -> Result<StepResult, ServiceError> {
        let session = self.session().await?;
        let limit = Some(self.store.limits().layer_unpacked_size);
        let owner = copy.chown.clone();
        match prepared.source {
            CopySource::Stage(layers) => {
                let chmod = match &copy.chmod {
                    Some(c) => Some(walt_build::copy::parse_chmod(c).map_err(bad)?),
                    None => None,
                };
                let src_session = self.session().await?;
                let spec = self.spec(
                    &layers,
                    &src_session,
                    Job::CopySources {
                        sources: copy.sources.clone(),
                        chmod,
                    },
                );
                let mut src = start_sandbox(&spec, Stdio::null(), Stdio::piped(), Stdio::piped())?;
                let stdout = src
                    .stdout
                    .take()
                    .ok_or_else(|| ServiceError::Internal("no output from the copy".into()))?;
                let mut stdout = tokio::io::BufReader::new(stdout);
                // `F<name>\0`: one regular file; `D\0`: directory content
                // (see Job::CopySources).
                let mut head = Vec::new();
                let got = (&mut stdout).take(4096).read_until(0, &mut head).await;
                if !matches!(got, Ok(n) if n > 0 && head.last() == Some(&0)) {
                    let err = src.stderr.take();
                    let st = src
                        .wait()
                        .await
                        .map_err(|e| ServiceError::Internal(format!("build sandbox lost: {e}")))?;
                    return Err(ServiceError::InvalidArgument(
                        crate::cp::reason(err, st).await,
                    ));
                }
                head.pop();
                let file_name = match head.split_first() {
                    Some((b'F', name)) if !copy.dest.ends_with('/') => {
                        Some(String::from_utf8_lossy(name).into_owned())
                    }
                    _ => None,
                };
                let job = Job::Place {
                    dest: copy.dest.clone(),
                    file_name,
                    owner,
                    limit,
                };
                self.place(out, &session, job, Feed::Sandbox(Box::new((src, stdout))))
                    .await?;
            }
            CopySource::Dir {
                root,
                sources,
                chmod,
                url,
            } => {
                let (archives, plain): (Vec<Source>, Vec<Source>) = if copy.add && !url {
                    let r = root.clone();
                    let all = sources.clone();
                    blocking(move || {
                        let mut a = Vec::new();
                        let mut p = Vec::new();
                        for s in all {
                            if s.kind == SourceKind::File && is_archive(&r, &s)? {
                                a.push(s);
                            } else {
                                p.push(s);
                            }
                        }
                        Ok((a, p))
                    })
                    .await?
                } else {
                    (Vec::new(), sources.clone())
                };
                if !plain.is_empty() {
                    let dir_mode = copy.dest.ends_with('/')
                        || sources.len() > 1
                        || plain.iter().any(|s| s.kind == SourceKind::Dir);
                    let file_name = if dir_mode {
                        None
                    } else {
                        Some(plain[0].file_name().to_string_lossy().into_owned())
                    };
                    let job = Job::Place {
                        dest: copy.dest.clone(),
                        file_name,
                        owner: owner.clone(),
                        limit,
                    };
                    self.place(
                        out,
                        &session,
                        job,
                        Feed::Tar {
                            root: root.clone(),
                            sources: plain,
                            chmod,
                        },
                    )
                    .await?;
                }
                for a in archives {
                    let job = Job::Place {
                        dest: dir_dest(&copy.dest),
                        file_name: None,
                        owner: owner.clone(),
                        limit,
                    };
                    self.place(out, &session, job, Feed::Archive(root.join(&a.rel)))
                        .await?;
                }
            }
        }
        self.commit(session, false).await
    }

    /// Runs a `Place` job on `out`'s layers in `session`, fed by `feed`.
    async fn place(
        &self,
        out: &StageOut,
        session: &Scratch,
        job: Job,
        feed: Feed,
    ) -> Result<(), ServiceError> {
        let spec = self.spec(&out.layers, session, job);
        let (r, w) = pipe()?;
        let mut child = start_sandbox(&spec, Stdio::from(r), Stdio::null(), Stdio::piped())?;
        let stderr = child.stderr.take();
        // The feeder: a thread writing a tar, or a second sandbox.
        let mut source_child = None;
        let feeder = match feed {
            Feed::Bytes(b) => tokio::task::spawn_blocking(move || {
                let mut f = std::fs::File::from(w);
                f.write_all(&b).map_err(io_err("feeding the copy"))
            }),
            Feed::Tar {
                root,
                sources,
                chmod,
            } => tokio::task::spawn_blocking(move || {
                let f = std::fs::File::from(w);
                walt_build::copy::write_copy_tar(io::BufWriter::new(f), &root, &sources, chmod)
                    .map(drop)
                    .map_err(bad)
            }),
            Feed::Archive(path) => tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(&path).map_err(io_err("opening the archive"))?;
                let mut reader = walt_build::copy::open_archive(file)
                    .map_err(io_err("reading the archive"))?
                    .ok_or_else(|| ServiceError::Internal("the archive is no longer one".into()))?;
                let mut f = std::fs::File::from(w);
                io::copy(&mut reader, &mut f).map_err(io_err("reading the archive"))?;
                Ok(())
            }),
            Feed::Sandbox(b) => {
                let (c, mut stdout) = *b;
                source_child = Some(c);
                tokio::spawn(async move {
                    let mut sink = tokio::net::unix::pipe::Sender::from_owned_fd(w)
                        .map_err(io_err("feeding the copy"))?;
                    // The receiving job may stop early: its error says why.
                    let _ = tokio::io::copy(&mut stdout, &mut sink).await;
                    Ok(())
                })
            }
        };
        let fed = feeder
            .await
            .map_err(|e| ServiceError::Internal(format!("the copy feeder failed: {e}")))?;
        let mut source_why = None;
        if let Some(mut c) = source_child {
            let err = c.stderr.take();
            let st = tokio::select! {
                st = c.wait() => st.map_err(|e| ServiceError::Internal(format!("build sandbox lost: {e}")))?,
                _ = self.events.0.closed() => {
                    crate::session::stop_sandbox(&mut c).await;
                    crate::session::stop_sandbox(&mut child).await;
                    return Err(gone());
                }
            };
            if !st.success() {
                source_why = Some(crate::cp::reason(err, st).await);
            }
        }
        let st = tokio::select! {
            st = child.wait() => st.map_err(|e| ServiceError::Internal(format!("build sandbox lost: {e}")))?,
            _ = self.events.0.closed() => {
                crate::session::stop_sandbox(&mut child).await;
                return Err(gone());
            }
            _ = self.state.shutdown.cancelled() => {
                crate::session::stop_sandbox(&mut child).await;
                return Err(ServiceError::ShuttingDown);
            }
        };
        if let Some(why) = source_why {
            return Err(ServiceError::InvalidArgument(why));
        }
        if !st.success() {
            return Err(ServiceError::InvalidArgument(
                crate::cp::reason(stderr, st).await,
            ));
        }
        // The job read everything: a feeder error now is ours.
        fed?;
        Ok(())
    }

    /// `ADD <url>`: downloads into `dir`; returns the name it has there.
    async fn download(&self, url: &str, dir: &Path, dest: &str) -> Result<String, ServiceError> {
        let shown = walt_core::text::one_line(&ctx::redact_url(url)).into_owned();
        let fail = |why: String| ServiceError::FailedPrecondition(format!("ADD {shown}: {why}"));
        let name = if dest.ends_with('/') {
            url_file_name(url).ok_or_else(|| {
                fail(
                    "cannot tell a file name from the URL: end the destination with the name"
                        .into(),
                )
            })?
        } else {
            dest.rsplit('/').next().unwrap_or("download").to_string()
        };
        if name.is_empty() || name == "." || name == ".." {
            return Err(fail("cannot tell a file name from the URL".into()));
        }
        self.events.say(format!("downloading {shown}")).await?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let mut resp = client.get(url).send().await.map_err(|e| {
            fail(format!(
                "cannot download it: {}",
                walt_registry::innermost_reason(&e)
            ))
        })?;
        if !resp.status().is_success() {
            return Err(fail(format!("the server answered {}", resp.status())));
        }
        let path = dir.join(&name);
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(io_err("saving the download"))?;
        let mut total = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(|e| {
            fail(format!(
                "the download broke: {}",
                walt_registry::innermost_reason(&e)
            ))
        })? {
            total += chunk.len() as u64;
            if total > MAX_ADD_URL {
                return Err(fail(format!(
                    "larger than {}",
                    walt_core::config::format_size(MAX_ADD_URL)
                )));
            }
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                .await
                .map_err(io_err("saving the download"))?;
        }
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .await
            .map_err(io_err("saving the download"))?;
        Ok(name)
    }
}

/// A session directory of the build, removed off the async threads when
/// dropped (a failed step's upper directory can be large).
struct Scratch(Option<SessionDir>);

impl Scratch {
    fn get(&self) -> &SessionDir {
        self.0.as_ref().expect("present until dropped")
    }

    fn take(mut self) -> SessionDir {
        self.0.take().expect("present until dropped")
    }
}

impl std::ops::Deref for Scratch {
    type Target = SessionDir;
    fn deref(&self) -> &SessionDir {
        self.get()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        crate::session::release(self.0.take(), None);
    }
}

/// A layer does not record when its step ran: the root directory of the
/// session's upper dir (created with the session, changed by every entry
/// made under it) gets the Unix epoch as its mtime, unless the step set an
/// older time itself (ADD of a tar with a `./` entry): one before the
/// directory was created (or, where the filesystem keeps no creation time,
/// one that is not its ctime). So the same step on the same input gives the
/// same layer.
fn pin_root_mtime(upper: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(upper)?;
    let set_by_step = match (m.created(), m.modified()) {
        (Ok(born), Ok(modified)) => modified < born,
        _ => (m.mtime(), m.mtime_nsec()) != (m.ctime(), m.ctime_nsec()),
    };
    if !set_by_step {
        std::fs::File::open(upper)?.set_modified(std::time::UNIX_EPOCH)?;
    }
    Ok(())
}

/// Where a COPY/ADD takes its files from.
enum CopySource {
    /// The context, or a directory of heredocs or downloads.
    Dir {
        root: PathBuf,
        sources: Vec<Source>,
        chmod: Option<u32>,
        url: bool,
    },
    /// `--from`: the layers of a stage or an image.
    Stage(Vec<LayerRef>),
}

struct Prepared {
    inputs: CacheKey,
    source: CopySource,
    /// Keeps the heredoc/download directory until the step is done.
    _tmp: Option<Scratch>,
}

/// What feeds a `Place` job.
enum Feed {
    Bytes(Vec<u8>),
    Tar {
        root: PathBuf,
        sources: Vec<Source>,
        chmod: Option<u32>,
    },
    Archive(PathBuf),
    /// A running `CopySources` job and its output (past its first byte).
    Sandbox(
        Box<(
            tokio::process::Child,
            tokio::io::BufReader<tokio::process::ChildStdout>,
        )>,
    ),
}

/// Adds a step's result to the stage.
fn push(out: &mut StageOut, r: StepResult, text: &str) {
    let empty = r.layer.is_none();
    if let Some(l) = r.layer {
        out.layers.push(l);
        out.created = out.created.max(r.created);
    }
    out.add_history(text, empty);
}

fn stage_from(
    layers: Vec<LayerRef>,
    config: &[u8],
    created: i64,
    name: &str,
) -> Result<StageOut, ServiceError> {
    let parsed: ImageConfig = serde_json::from_slice(config).map_err(|e| {
        ServiceError::Internal(format!(
            "base image '{name}': cannot read its configuration: {e}"
        ))
    })?;
    let base: Map<String, Value> = serde_json::from_slice(config).map_err(|e| {
        ServiceError::Internal(format!(
            "base image '{name}': cannot read its configuration: {e}"
        ))
    })?;
    let mut history = base
        .get("history")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // One non-empty history entry per layer, as image tools check: a base
    // that lists fewer gets entries for its first layers.
    let listed = history
        .iter()
        .filter(|h| h.get("empty_layer").and_then(Value::as_bool) != Some(true))
        .count();
    if listed < layers.len() {
        let missing = (0..layers.len() - listed)
            .map(|_| json!({ "created": walt_store::rfc3339(created), "created_by": format!("layer of {name}") }));
        history.splice(0..0, missing);
    }
    let author = base
        .get("author")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(StageOut {
        layers,
        settings: Settings::from_runtime(parsed.config.as_ref()),
        base,
        author,
        history,
        created,
    })
}

/// `FROM x AS y` for the step line.
fn df_line(base: &str, name: Option<&str>, platform: Option<&str>) -> String {
    let base = match platform {
        Some(p) => format!("--platform={p} {base}"),
        None => base.to_string(),
    };
    match name {
        Some(n) => format!("FROM {base} AS {n}"),
        None => format!("FROM {base}"),
    }
}

fn at_line(file: &str, line: usize, e: ServiceError) -> ServiceError {
    match e {
        ServiceError::InvalidArgument(m) => {
            ServiceError::InvalidArgument(format!("{file}, line {line}: {m}"))
        }
        ServiceError::FailedPrecondition(m) => {
            ServiceError::FailedPrecondition(format!("{file}, line {line}: {m}"))
        }
        e => e,
    }
}

/// RUN's argv with its heredocs: `RUN <<EOF` alone runs the body as the
/// shell script; otherwise the bodies follow the command, for the shell
/// to read as here-documents.
fn with_heredocs(run: &RunStep) -> Vec<String> {
    let mut argv = run.argv.clone();
    if run.heredocs.is_empty() {
        return argv;
    }
    let Some(script) = argv.last_mut() else {
        return argv;
    };
    if let [h] = run.heredocs.as_slice() {
        let only = script
            .trim()
            .trim_start_matches("<<")
            .trim_start_matches('-')
            .trim_matches(|c| c == '"' || c == '\'');
        if only == h.name && h.fd.is_none() {
            *script = h.body.clone();
            return argv;
        }
    }
    let mut s = script.clone();
    for h in &run.heredocs {
        s.push('\n');
        s.push_str(&h.body);
        s.push_str(&h.name);
    }
    s.push('\n');
    *script = s;
    argv
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

fn url_file_name(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next()?;
    let after = path.split_once("://")?.1;
    let (_, p) = after.split_once('/')?;
    let name = p.rsplit('/').next()?;
    (!name.is_empty()).then(|| name.to_string())
}

fn dir_dest(dest: &str) -> String {
    if dest.ends_with('/') {
        dest.to_string()
    } else {
        format!("{dest}/")
    }
}

fn is_archive(root: &Path, s: &Source) -> Result<bool, ServiceError> {
    let f = std::fs::File::open(root.join(&s.rel)).map_err(io_err("reading an ADD source"))?;
    Ok(walt_build::copy::open_archive(f)
        .map_err(io_err("reading an ADD source"))?
        .is_some())
}

/// The two zero blocks that end a tar: an empty archive.
fn tar_end() -> Vec<u8> {
    vec![0u8; 1024]
}

/// Starts a sandbox job with this stdio. The command is dropped at once, so
/// the pipe ends given to it live only in the sandbox (a reader sees the
/// end of its output when the sandbox exits).
fn start_sandbox(
    spec: &Spec,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<tokio::process::Child, ServiceError> {
    let failed =
        |e: io::Error| ServiceError::Internal(format!("cannot start the build sandbox: {e}"));
    let mut cmd = walt_container::command(spec).map_err(failed)?;
    cmd.stdin(stdin).stdout(stdout).stderr(stderr);
    cmd.spawn().map_err(failed)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ServiceError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ServiceError::Internal(format!("cannot create a pipe: {e}")))
}

fn io_err(what: &'static str) -> impl Fn(io::Error) -> ServiceError {
    move |e| ServiceError::Internal(format!("{what}: {e}"))
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// The build context of `start`: held from an earlier build of the caller
/// (same digest), received from the client, or cloned from `start.url`.
async fn obtain_context(
    state: &Arc<State>,
    user: &str,
    start: &pb::BuildStart,
    input: &mut Streaming<pb::BuildRequest>,
    events: &Events<'_>,
) -> Result<Arc<Context>, ServiceError> {
    let url = start.url.trim();
    let digest =
        (url.is_empty() && !start.context_digest.is_empty()).then(|| start.context_digest.clone());
    if let Some(d) = &digest {
        let held = state.build_contexts.get(user, d);
        events
            .send(Event::Context(pb::ContextStatus {
                cached: held.is_some(),
            }))
            .await?;
        if let Some(c) = held {
            tracing::info!(user = %user, digest = %d, "build context reused");
            // Only `end` follows.
            match input.message().await {
                Ok(Some(pb::BuildRequest {
                    msg: Some(Msg::End(_)),
                })) => return Ok(c),
                _ => {
                    return Err(ServiceError::InvalidArgument(
                        "build interrupted by the client".into(),
                    ));
                }
            }
        }
    }
    let s = state.store.clone();
    let dir = Scratch(Some(
        blocking(move || Ok(s.session_dir("build-context")?)).await?,
    ));
    let context = dir.path().join("context");
    std::fs::create_dir(&context).map_err(io_err("creating the build context directory"))?;
    let (place, size) = if url.is_empty() {
        let size = receive_context(state, input, &context).await?;
        ("the directory given".to_string(), size)
    } else {
        // A --sub-dir that leaves the repository by its very text is
        // refused before anything is cloned (symlinks are checked after).
        let sub = start.sub_dir.trim_end_matches('/');
        if sub.starts_with('/') || sub.split('/').any(|c| c == "..") {
            let why = if sub.starts_with('/') {
                "it must be relative to the repository"
            } else {
                "it leaves the repository"
            };
            return Err(bad(ctx::ContextError::SubDirRefused {
                sub: walt_core::text::one_line(sub).into_owned(),
                why,
            }));
        }
        clone_context(events, url, &context).await?;
        let shown = ctx::redact_url(url);
        let sub = start.sub_dir.trim_end_matches('/');
        let place = if sub.is_empty() {
            format!("repository {shown}")
        } else {
            format!("sub-directory '{sub}' of repository {shown}")
        };
        (place, u64::MAX)
    };
    let sub = start.sub_dir.trim_end_matches('/').to_string();
    let (root, dockerfile) = blocking(move || {
        let sub = if sub.is_empty() { "." } else { sub.as_str() };
        let dir = ctx::open_sub_dir(&context, sub).map_err(bad)?;
        let df = ctx::read_dockerfile(dir.fd.as_fd(), &place).map_err(bad)?;
        ctx::trim_build_files(dir.fd.as_fd(), df.name).map_err(bad)?;
        Ok((dir.path, df))
    })
    .await?;
    let c = Arc::new(Context {
        user: user.to_string(),
        digest: digest.filter(|_| size <= CONTEXT_KEPT_MAX),
        _dir: dir,
        root,
        dockerfile,
        inputs: Default::default(),
    });
    Ok(c)
}

/// Receives the context tar from the client into `dir`.
async fn receive_context(
    state: &Arc<State>,
    input: &mut Streaming<pb::BuildRequest>,
    dir: &Path,
) -> Result<u64, ServiceError> {
    let limit = state.store.limits().layer_unpacked_size;
    let (tx, rx) = mpsc::channel::<io::Result<bytes::Bytes>>(16);
    let d = dir.to_path_buf();
    let extract = tokio::task::spawn_blocking(move || {
        let mut reader = walt_tar::Reader::new(io::BufReader::with_capacity(
            1 << 20,
            crate::clone::ChannelReader::new(rx),
        ));
        let opts = walt_tar::ExtractOptions {
            whiteouts: walt_tar::Whiteouts::Keep,
            owners: walt_tar::Owners::Ignore,
            devices: walt_tar::Devices::Refuse,
            xattrs: false,
            cp_top: None,
            limit: Some(limit),
            skip_unknown: false,
            area: "build context",
            replace_dirs: false,
        };
        let mut writer = walt_tar::PlainWriter;
        walt_tar::Extractor::new(Some(&d), opts, &mut writer).and_then(|x| x.extract(&mut reader))
    });
    let mut failure = None;
    loop {
        tokio::select! {
            m = input.message() => match m {
                Ok(Some(pb::BuildRequest { msg: Some(Msg::Context(b)) })) => {
                    if tx.send(Ok(bytes::Bytes::from(b))).await.is_err() {
                        // The extractor stopped: its error says why.
                        break;
                    }
                }
                Ok(Some(pb::BuildRequest { msg: Some(Msg::End(_)) })) => break,
                Ok(None) => {
                    failure = Some(ServiceError::InvalidArgument(
                        "build interrupted by the client while sending the context".into(),
                    ));
                    break;
                }
                Ok(Some(_)) => {
                    failure = Some(ServiceError::InvalidArgument("unexpected message in a build stream".into()));
                    break;
                }
                Err(s) => {
                    failure = Some(ServiceError::InvalidArgument(format!("build interrupted: {}", s.message())));
                    break;
                }
            },
            _ = state.shutdown.cancelled() => {
                failure = Some(ServiceError::ShuttingDown);
                break;
            }
        }
    }
    if failure.is_some() {
        let _ = tx
            .send(Err(io::Error::other("the context stream was interrupted")))
            .await;
    }
    drop(tx);
    let extracted = extract
        .await
        .map_err(|e| ServiceError::Internal(format!("context extraction failed: {e}")))?;
    if let Some(f) = failure {
        return Err(f);
    }
    extracted.map(|st| st.bytes).map_err(|e| match e {
        walt_tar::Error::Limit { .. } => ServiceError::Store(walt_store::StoreError::TooLarge {
            what: "the build context".into(),
            limit: walt_core::config::format_size(limit),
            key: "layer-unpacked-size",
        }),
        e => ServiceError::InvalidArgument(format!("bad build context: {e}")),
    })
}

/// `--from-url`: `git clone --depth 1` into `dir`, without `.git`.
async fn clone_context(events: &Events<'_>, url: &str, dir: &Path) -> Result<(), ServiceError> {
    let url = url.trim().to_string();
    events
        .say(format!("cloning {}", ctx::redact_url(&url)))
        .await?;
    // git wants to create the directory itself.
    let repo = dir.join("repo");
    let r = repo.clone();
    blocking(move || {
        ctx::git_clone(&url, &r, GIT_TIMEOUT)
            .map_err(|e| ServiceError::FailedPrecondition(e.to_string()))?;
        let git = r.join(".git");
        if git.exists() {
            walt_tar::remove_tree(&git)
                .map_err(|e| ServiceError::Internal(format!("removing .git: {e}")))?;
        }
        Ok(())
    })
    .await?;
    // The repository becomes the context directory.
    let tmp = dir.with_extension("old");
    std::fs::rename(dir, &tmp).map_err(io_err("moving the clone"))?;
    std::fs::rename(tmp.join("repo"), dir).map_err(io_err("moving the clone"))?;
    let _ = std::fs::remove_dir(&tmp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_file_names() {
        assert_eq!(
            url_file_name("https://h/a/b.tar.gz?x=1").as_deref(),
            Some("b.tar.gz")
        );
        assert_eq!(url_file_name("https://h/"), None);
        assert_eq!(url_file_name("https://h"), None);
    }

    fn run_with(script: &str, docs: &[(&str, &str)]) -> RunStep {
        RunStep {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            heredocs: docs
                .iter()
                .map(|(n, b)| walt_build::dockerfile::Heredoc {
                    name: n.to_string(),
                    fd: None,
                    body: b.to_string(),
                    expand: true,
                    strip_tabs: false,
                })
                .collect(),
            env: vec![],
            user: String::new(),
            workdir: "/".into(),
            network: None,
        }
    }

    #[test]
    fn heredoc_alone_is_the_script() {
        let r = run_with("<<EOF", &[("EOF", "echo a\necho b\n")]);
        assert_eq!(with_heredocs(&r)[2], "echo a\necho b\n");
    }

    #[test]
    fn heredoc_of_a_command_follows_it() {
        let r = run_with("cat <<EOF > /x", &[("EOF", "hello\n")]);
        assert_eq!(with_heredocs(&r)[2], "cat <<EOF > /x\nhello\nEOF\n");
    }
}
