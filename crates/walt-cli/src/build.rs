//! `walt image build`: an image of the working set from a Dockerfile. The
//! client checks what it can alone (the options, the name, the context
//! directory and its Dockerfile), asks before replacing an image, streams
//! the context (`--from-dir`) and shows the steps as the server runs them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::anyhow;
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use walt_build::context::{ContextError, context_matcher, read_dockerfile, write_context};
use walt_build::ignore::Matcher;
use walt_core::ImageName;
use walt_core::text::{neutralize, one_line};
use walt_proto::v1::{self as pb, build_event::Event, build_request::Msg};

use super::shell::{self, ExitWith};
use super::{Client, status_error};
use crate::chunks::ChunkWriter;
use crate::config::Settings;
use crate::prompt;

/// Largest context message sent.
const CHUNK: usize = 1 << 20;
/// Context messages in flight between the tar writer and gRPC.
const IN_FLIGHT: usize = 4;

/// What the context writer says when the server no longer reads it.
const SERVER_STOPPED: &str = "the server stopped reading the build context";

/// `walt image build` as typed.
#[derive(Args, Debug, Clone)]
#[command(after_help = "\
Give exactly one of --from-dir and --from-url; the directory (or --sub-dir of the \
repository) must hold a Dockerfile or a Containerfile.

Output: the steps (STEP i/n: ...), the output of RUN and the server's messages go \
to stderr as they come; stdout gets the result line only (`Image <name> built ...`).

More: walt help show image-build")]
pub struct BuildArgs {
    /// A local directory holding a Dockerfile (or Containerfile): the
    /// build context, sent to the server (honouring .dockerignore).
    #[arg(long, value_name = "DIR")]
    pub from_dir: Option<PathBuf>,
    /// A git repository URL (cloned by the server) holding a Dockerfile.
    #[arg(long, value_name = "GIT_URL")]
    pub from_url: Option<String>,
    /// Sub-directory of the repository to build (with --from-url only).
    #[arg(long, value_name = "PATH")]
    pub sub_dir: Option<String>,
    /// A build argument for ARG: K=V, or K alone to take the value of K
    /// in this environment (repeatable).
    #[arg(long = "build-arg", value_name = "K=V")]
    pub build_args: Vec<String>,
    /// Run every step again, ignoring the layer cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Replace an image of the same name without asking.
    #[arg(long)]
    pub yes: bool,
    /// Name of the image to create: <name> or <name>:<tag>.
    pub image: String,
}

/// A mistake in the command line: one `error:` line, exit status 2 (as
/// clap's own usage errors).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// Where the context comes from.
#[derive(Debug)]
enum Source {
    Dir { path: PathBuf, ignore: Matcher },
    Url { url: String, sub_dir: String },
}

/// A build checked on this side, ready to be sent.
#[derive(Debug)]
pub struct Prepared {
    image: String,
    source: Source,
    build_args: BTreeMap<String, String>,
    no_cache: bool,
    yes: bool,
}

/// `--build-arg` values: `K=V`, or `K` taken from `env` (left out when
/// unset there, as docker does); the last of a key wins.
fn build_args(
    args: &[String],
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in args {
        let (k, v) = match a.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (a.as_str(), env(a)),
        };
        if k.is_empty() || k.chars().any(char::is_whitespace) {
            return Err(usage(format!(
                "invalid --build-arg '{}': expected K=V or K",
                one_line(a)
            )));
        }
        if let Some(v) = v {
            out.insert(k.to_string(), v);
        }
    }
    Ok(out)
}

/// The checks that need no server: options, name, context directory.
pub fn prepare(args: BuildArgs) -> anyhow::Result<Prepared> {
    let source = match (args.from_dir, args.from_url) {
        (None, None) => {
            return Err(usage(
                "walt image build needs one of --from-dir DIR and --from-url GIT_URL (see walt image build --help)",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(usage(
                "--from-dir and --from-url cannot be used together: give one of them",
            ));
        }
        (Some(_), None) if args.sub_dir.is_some() => {
            return Err(usage("--sub-dir is only supported with --from-url"));
        }
        (Some(dir), None) => {
            let ignore = check_dir(&dir)?;
            Source::Dir { path: dir, ignore }
        }
        // As typed: the server refuses one that leaves the repository.
        (None, Some(url)) => Source::Url {
            url,
            sub_dir: args.sub_dir.unwrap_or_default(),
        },
    };
    // The owner does not change the rules; the server checks again.
    ImageName::parse_user("", &args.image)?;
    let build_args = build_args(&args.build_args, |k| std::env::var(k).ok())?;
    Ok(Prepared {
        image: args.image.trim().to_string(),
        source,
        build_args,
        no_cache: args.no_cache,
        yes: args.yes,
    })
}

/// `dir` is a directory with a Dockerfile or Containerfile (read as the
/// server will: a symlink may only point inside) and a readable
/// `.dockerignore`, if any.
fn check_dir(dir: &Path) -> anyhow::Result<Matcher> {
    let shown = one_line(&dir.to_string_lossy()).into_owned();
    let fd = File::open(dir).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => anyhow!("directory '{shown}' not found"),
        _ => anyhow!("cannot open directory '{shown}': {e}"),
    })?;
    if !fd.metadata().is_ok_and(|m| m.is_dir()) {
        return Err(anyhow!("'{shown}' is not a directory"));
    }
    read_dockerfile(fd.as_fd(), &format!("directory '{shown}'"))?;
    Ok(context_matcher(dir)?)
}

/// Whether the caller already has an image of that name.
async fn exists(client: &mut Client, settings: &Settings, image: &str) -> anyhow::Result<bool> {
    let want = ImageName::parse_user(&settings.username, image)?;
    let reply = client
        .show(pb::ShowRequest {
            all: false,
            refresh: false,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(reply
        .images
        .iter()
        .any(|i| i.owner == want.owner && i.name == want.name && i.tag == want.tag))
}

/// WalT's confirmation: true to go on. Ctrl-C or the end of input abort.
async fn confirm() -> anyhow::Result<bool> {
    eprintln!("An image has the same name in your working set.");
    eprintln!("This operation would overwrite it.");
    loop {
        let Some(answer) = shell::ask("Are you sure? (y/n): ".to_string()).await? else {
            eprintln!("Aborted.");
            return Err(ExitWith(130).into());
        };
        match answer.trim().to_ascii_lowercase().as_str() {
            "y" | "yes" => return Ok(true),
            "n" | "no" => return Ok(false),
            _ => eprintln!("Invalid response."),
        }
    }
}

/// A `context` message.
fn context_msg(chunk: Vec<u8>) -> pb::BuildRequest {
    pb::BuildRequest {
        msg: Some(Msg::Context(chunk)),
    }
}

/// Streams the context directory then `end`, on a thread of its own. Its
/// result is sent on `done` before the request stream is closed, so that a
/// local failure is known by the time the server answers it.
fn spawn_context_writer(
    dir: PathBuf,
    ignore: Matcher,
    tx: mpsc::Sender<pb::BuildRequest>,
    done: std::sync::mpsc::SyncSender<Result<(), ContextError>>,
) {
    std::thread::spawn(move || {
        let mut w = ChunkWriter::new(tx, CHUNK, context_msg, SERVER_STOPPED);
        let result = (|| {
            let (w, stats) = write_context(&mut w, &dir, &ignore)?;
            w.flush().map_err(ContextError::Write)?;
            for (path, what) in &stats.skipped {
                eprintln!("warning: '{path}' in the build context skipped: {what}");
            }
            for path in &stats.changed {
                eprintln!("warning: '{path}' changed while it was sent");
            }
            w.tx.blocking_send(pb::BuildRequest {
                msg: Some(Msg::End(true)),
            })
            .map_err(|_| {
                ContextError::Write(io::Error::new(io::ErrorKind::BrokenPipe, SERVER_STOPPED))
            })
        })();
        let _ = done.send(result);
        drop(w);
    });
}

/// Shows the events as they come (on stderr); the result is returned.
struct Screen<W: Write> {
    out: W,
    /// The last output byte written ended a line (or nothing was written).
    at_line_start: bool,
}

impl<W: Write> Screen<W> {
    /// Ends a line of RUN output left open.
    fn end_line(&mut self) {
        if !self.at_line_start {
            let _ = self.out.write_all(b"\n");
            self.at_line_start = true;
        }
    }

    fn line(&mut self, text: &str) {
        self.end_line();
        let _ = writeln!(self.out, "{text}");
    }

    fn event(&mut self, ev: Event) -> Option<pb::BuildResult> {
        match ev {
            Event::Step(s) => {
                self.line(&format!(
                    "STEP {}/{}: {}",
                    s.index,
                    s.count,
                    one_line(&s.text)
                ));
                if s.cached {
                    self.line("--> Using cache");
                }
            }
            Event::Output(b) => {
                if let Some(&last) = b.last() {
                    let _ = self.out.write_all(&b);
                    let _ = self.out.flush();
                    self.at_line_start = last == b'\n';
                }
            }
            Event::Message(m) => self.line(&neutralize(&m)),
            Event::Result(r) => {
                self.end_line();
                return Some(r);
            }
            Event::Context(_) => {}
        }
        None
    }
}

fn result_line(r: &pb::BuildResult) -> String {
    let steps = format!(
        "{} step{}, {} from cache",
        r.steps,
        if r.steps == 1 { "" } else { "s" },
        r.cached
    );
    let name = one_line(&r.name);
    if r.replaced {
        format!("Image {name} built, replacing the previous one ({steps}).")
    } else {
        format!("Image {name} built ({steps}).")
    }
}

pub async fn build(client: &mut Client, settings: &Settings, p: Prepared) -> anyhow::Result<()> {
    let mut overwrite = p.yes;
    if !p.yes && exists(client, settings, &p.image).await? {
        if !prompt::interactive() {
            return Err(anyhow!(
                "image '{}' already exists in your working set (add --yes to overwrite it)",
                p.image
            ));
        }
        if !confirm().await? {
            eprintln!("Aborted.");
            return Err(ExitWith(1).into());
        }
        overwrite = true;
    }

    let (url, sub_dir) = match &p.source {
        Source::Url { url, sub_dir } => (url.clone(), sub_dir.clone()),
        Source::Dir { .. } => (String::new(), String::new()),
    };
    // The listing's digest: the server may still hold this context.
    let context_digest = match &p.source {
        Source::Dir { path, .. } => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || walt_build::context::context_digest(&path))
                .await??
        }
        Source::Url { .. } => String::new(),
    };
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    tx.send(pb::BuildRequest {
        msg: Some(Msg::Start(pb::BuildStart {
            name: p.image.clone(),
            url,
            sub_dir,
            build_args: p.build_args.into_iter().collect(),
            no_cache: p.no_cache,
            overwrite,
            context_digest,
        })),
    })
    .await
    .map_err(|_| anyhow!("cannot start the build"))?;
    let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<Result<(), ContextError>>(1);
    // The context goes once the server says it does not hold it. With a
    // URL, nothing follows the start: the request stream stays open until
    // the build ends.
    let (mut pending, _keep) = match p.source {
        Source::Dir { path, ignore } => (Some((path, ignore, tx, done_tx)), None),
        Source::Url { .. } => (None, Some(tx)),
    };
    // A local failure explains the server's "incomplete context"; a
    // writer stopped by the server does not.
    let failed = |s: tonic::Status| -> anyhow::Error {
        match done_rx.try_recv() {
            Ok(Err(e)) if !e.to_string().contains(SERVER_STOPPED) => e.into(),
            _ => status_error(s),
        }
    };
    // Ctrl-C: the stream is dropped on return, and the server stops the
    // build. (Caught rather than left to kill: a prompt may have installed
    // a handler already.)
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut display = Screen {
        out: io::stderr(),
        at_line_start: true,
    };
    let mut stream = tokio::select! {
        r = client.build(ReceiverStream::new(rx)) => r.map_err(&failed)?.into_inner(),
        _ = sigint.recv() => return interrupted(&mut display),
    };
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = sigint.recv() => return interrupted(&mut display),
        };
        match msg {
            Ok(Some(pb::BuildEvent {
                event: Some(Event::Context(c)),
            })) => {
                if let Some((path, ignore, tx, done_tx)) = pending.take() {
                    if c.cached {
                        let _ = done_tx.send(Ok(()));
                        let _ = tx
                            .send(pb::BuildRequest {
                                msg: Some(Msg::End(true)),
                            })
                            .await;
                    } else {
                        spawn_context_writer(path, ignore, tx, done_tx);
                    }
                }
            }
            Ok(Some(pb::BuildEvent { event: Some(ev) })) => {
                if let Some(r) = display.event(ev) {
                    println!("{}", result_line(&r));
                    return Ok(());
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(anyhow!("the server ended the build without a result")),
            Err(s) => {
                display.end_line();
                return Err(failed(s));
            }
        }
    }
}

fn interrupted(display: &mut Screen<io::Stderr>) -> anyhow::Result<()> {
    display.line("Build interrupted.");
    Err(ExitWith(130).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(from_dir: Option<&Path>, from_url: Option<&str>, sub_dir: Option<&str>) -> BuildArgs {
        BuildArgs {
            from_dir: from_dir.map(Path::to_path_buf),
            from_url: from_url.map(String::from),
            sub_dir: sub_dir.map(String::from),
            build_args: vec![],
            no_cache: false,
            yes: false,
            image: "img".into(),
        }
    }

    fn usage_message(r: anyhow::Result<Prepared>) -> String {
        let e = r.unwrap_err();
        e.downcast_ref::<UsageError>()
            .unwrap_or_else(|| panic!("not a usage error: {e:#}"))
            .0
            .clone()
    }

    #[test]
    fn sources() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        assert!(usage_message(prepare(args(None, None, None))).contains("--from-dir"));
        assert!(
            usage_message(prepare(args(Some(d.path()), Some("file:///r"), None)))
                .contains("together")
        );
        assert!(
            usage_message(prepare(args(Some(d.path()), None, Some("x")))).contains("--sub-dir")
        );
        let p = prepare(args(None, Some("file:///r"), Some("/a/b/"))).unwrap();
        assert!(
            matches!(p.source, Source::Url { ref sub_dir, .. } if sub_dir == "/a/b/"),
            "{p:?}"
        );
        assert!(matches!(
            prepare(args(Some(d.path()), None, None)).unwrap().source,
            Source::Dir { .. }
        ));
    }

    #[test]
    fn context_directory() {
        let d = tempfile::tempdir().unwrap();
        let e = prepare(args(Some(d.path()), None, None)).unwrap_err();
        assert!(
            format!("{e}").contains("no Dockerfile or Containerfile"),
            "{e}"
        );
        let e = prepare(args(Some(&d.path().join("missing")), None, None)).unwrap_err();
        assert!(format!("{e}").contains("not found"), "{e}");
        std::fs::write(d.path().join("f"), "").unwrap();
        let e = prepare(args(Some(&d.path().join("f")), None, None)).unwrap_err();
        assert!(format!("{e}").contains("not a directory"), "{e}");
        // A Containerfile is enough; a Dockerfile pointing outside is not.
        std::fs::write(d.path().join("Containerfile"), "FROM scratch\n").unwrap();
        prepare(args(Some(d.path()), None, None)).unwrap();
        let o = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", o.path().join("Dockerfile")).unwrap();
        let e = prepare(args(Some(o.path()), None, None)).unwrap_err();
        assert!(format!("{e}").contains("not a regular file"), "{e}");
    }

    #[test]
    fn names() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        for bad in ["Bad_Name", "default", "", "a/b"] {
            let mut a = args(Some(d.path()), None, None);
            a.image = bad.into();
            assert!(prepare(a).is_err(), "{bad} accepted");
        }
        let mut a = args(Some(d.path()), None, None);
        a.image = "img:v2".into();
        assert_eq!(prepare(a).unwrap().image, "img:v2");
    }

    #[test]
    fn build_arg_forms() {
        let env = |k: &str| (k == "FROM_ENV").then(|| "e".to_string());
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let got = build_args(&a(&["A=1", "B=", "FROM_ENV", "UNSET", "A=2", "C=x=y"]), env).unwrap();
        let want: BTreeMap<String, String> =
            [("A", "2"), ("B", ""), ("C", "x=y"), ("FROM_ENV", "e")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        assert_eq!(got, want);
        for bad in ["=v", "", "A B=1"] {
            assert!(build_args(&a(&[bad]), env).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn chunks_are_bounded() {
        let (tx, mut rx) = mpsc::channel(64);
        let mut w = ChunkWriter::new(tx, CHUNK, context_msg, SERVER_STOPPED);
        let data = vec![7u8; CHUNK * 2 + 5];
        w.write_all(&data[..3]).unwrap();
        w.write_all(&data[3..]).unwrap();
        w.flush().unwrap();
        drop(w);
        let mut sizes = vec![];
        while let Ok(m) = rx.try_recv() {
            match m.msg {
                Some(Msg::Context(c)) => sizes.push(c.len()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(sizes, [CHUNK, CHUNK, 5]);
    }

    #[test]
    fn events_on_screen() {
        let mut sc = Screen {
            out: Vec::new(),
            at_line_start: true,
        };
        let step = |index, text: &str, cached| {
            Event::Step(pb::BuildStep {
                index,
                count: 3,
                text: text.into(),
                cached,
            })
        };
        assert!(sc.event(step(1, "FROM busybox", true)).is_none());
        sc.event(Event::Output(b"line\npartial".to_vec()));
        sc.event(step(2, "RUN a\tb\x1b[2J", false));
        sc.event(Event::Output(b"done\n".to_vec()));
        sc.event(Event::Message("Base image\x07 fetched.".into()));
        sc.event(Event::Output(b"no end".to_vec()));
        let r = sc.event(Event::Result(pb::BuildResult::default()));
        assert!(r.is_some());
        let text = String::from_utf8(sc.out).unwrap();
        assert_eq!(
            text,
            "STEP 1/3: FROM busybox\n--> Using cache\nline\npartial\n\
             STEP 2/3: RUN a b\\x1b[2J\ndone\nBase image\\x07 fetched.\nno end\n"
        );
    }

    #[test]
    fn result_lines() {
        let mut r = pb::BuildResult {
            name: "img".into(),
            manifest_digest: String::new(),
            steps: 1,
            cached: 0,
            replaced: false,
        };
        assert_eq!(result_line(&r), "Image img built (1 step, 0 from cache).");
        r.steps = 5;
        r.cached = 2;
        r.replaced = true;
        assert_eq!(
            result_line(&r),
            "Image img built, replacing the previous one (5 steps, 2 from cache)."
        );
    }
}
