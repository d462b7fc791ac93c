//! `Images.CopyIn` / `Images.CopyOut`: tar streams between the client and a
//! sandbox chrooted in the image (so every path and link the image holds
//! resolves inside it).

use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use walt_container::Job;
use walt_proto::v1::{self as pb, copy_in_request::Msg};

use crate::State;
use crate::error::ServiceError;
use crate::localpipe::{self, End, Peer};
use crate::session::Session;

pub type CopyOutStream = Pin<Box<dyn Stream<Item = Result<pb::CopyOutChunk, Status>> + Send>>;

const CHUNK: usize = 256 * 1024;

/// Bytes of archive received between two checks of the free space.
const SPACE_CHECK_EVERY: u64 = 16 << 20;

/// Whether the store's filesystem still has its reserve free.
async fn check_space(store: &Arc<walt_store::Store>) -> Result<(), ServiceError> {
    let s = store.clone();
    crate::images::blocking(move || Ok(s.check_space(0)?)).await
}

/// The sandbox's one-line reason for failing (its stderr).
pub(crate) async fn reason(
    stderr: Option<impl AsyncRead + Unpin>,
    status: std::process::ExitStatus,
) -> String {
    let mut text = String::new();
    if let Some(mut e) = stderr {
        let _ = e.read_to_string(&mut text).await;
    }
    let line = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or_default()
        .to_string();
    if line.is_empty() {
        format!("the copy process failed ({status})")
    } else {
        line
    }
}

/// Starts the copy process; its stderr is always piped (its reason for
/// failing).
fn spawn(
    session: &Session,
    job: Job,
    stdin: Stdio,
    stdout: Stdio,
) -> Result<tokio::process::Child, ServiceError> {
    let mut cmd = walt_container::command(&session.spec(job))
        .map_err(|e| ServiceError::Internal(format!("cannot start the copy process: {e}")))?;
    cmd.stdin(stdin).stdout(stdout).stderr(Stdio::piped());
    // The command (and a client FIFO given as stdin or stdout) is dropped
    // on return: the sandbox then holds the only copy of that end.
    cmd.spawn()
        .map_err(|e| ServiceError::Internal(format!("cannot start the copy process: {e}")))
}

/// While a sandbox writes a client's archive that does not pass through
/// the server (a local FIFO): the free space is checked, and the store's
/// writeback started, from the filesystem's usage.
struct DiskWatch {
    store: Arc<walt_store::Store>,
    dir: std::path::PathBuf,
    used: u64,
    flush: walt_store::EarlyFlush,
}

impl DiskWatch {
    /// How often the filesystem is looked at.
    const EVERY: std::time::Duration = std::time::Duration::from_millis(50);

    fn new(store: Arc<walt_store::Store>, dir: std::path::PathBuf) -> Self {
        let used = Self::used(&dir);
        let flush = walt_store::EarlyFlush::start(&dir);
        DiskWatch {
            store,
            dir,
            used,
            flush,
        }
    }

    fn used(dir: &std::path::Path) -> u64 {
        nix::sys::statvfs::statvfs(dir)
            .map(|v| (v.blocks() - v.blocks_free()) * v.fragment_size())
            .unwrap_or(0)
    }

    fn check(&mut self) -> Result<(), ServiceError> {
        self.store.check_space(0)?;
        let used = Self::used(&self.dir);
        self.flush.wrote(used.saturating_sub(self.used));
        self.used = used;
        Ok(())
    }
}

pub async fn copy_in(
    state: Arc<State>,
    user: String,
    peer: Peer,
    mut input: Streaming<pb::CopyInRequest>,
) -> Result<pb::CopyInReply, ServiceError> {
    let start = match input.message().await {
        Ok(Some(pb::CopyInRequest {
            msg: Some(Msg::Start(s)),
        })) => s,
        Ok(_) => {
            return Err(ServiceError::InvalidArgument(
                "a copy into an image must start with the image and destination".into(),
            ));
        }
        Err(s) => return Err(ServiceError::InvalidArgument(s.message().to_string())),
    };
    let session = Session::open(&state, &user, &start.image, "walt image cp", true).await?;
    crate::editable::check_modifying(&session, &user, start.confirmed).await?;
    let short = session.short();
    // The archive's size is not known beforehand: the reserve must be free
    // now, and stays so while it comes (checked every 16 MiB); it is
    // bounded as a layer.
    let store = state.store.clone();
    let limit = store.limits().layer_unpacked_size;
    check_space(&store).await?;
    let job = Job::TarIn {
        dest: start.dest.clone(),
        limit: Some(limit),
    };
    let outcome = if start.local_pipe.is_empty() {
        relay_in(&state, &session, job, &mut input).await?
    } else {
        let fifo = localpipe::open(&start.local_pipe, End::Read, peer).map_err(|e| {
            tracing::debug!(image = %session.rec.name, "copy in: the client's pipe is refused: {e}");
            ServiceError::LocalPipe(e)
        })?;
        tracing::debug!(image = %session.rec.name, "copy in through the client's pipe");
        let child = spawn(&session, job, fifo.into(), Stdio::null())?;
        wait_local_in(&state, &session, child, &mut input).await
    };
    let (mut child, stderr) = match outcome {
        Ok(c) => c,
        Err((e, mut child)) => {
            crate::session::stop_sandbox(&mut child).await;
            tracing::info!(image = %session.rec.name, "copy into the image abandoned: {e}");
            return Err(e);
        }
    };
    let status = child
        .wait()
        .await
        .map_err(|e| ServiceError::Internal(format!("copy process lost: {e}")))?;
    if !status.success() {
        let why = reason(stderr, status).await;
        return Err(ServiceError::InvalidArgument(format!(
            "cannot copy into image '{short}': {why}"
        )));
    }
    // The last check of the reserve: the copy was watched only every
    // 16 MiB (stream) or 50 ms (FIFO), and a fast filesystem fills in less.
    check_space(&state.store).await?;
    if !session.changed(false).await? {
        return Ok(pb::CopyInReply {
            name: short.clone(),
            message: String::new(),
        });
    }
    let name = session.rec.name.clone();
    session
        .save(name.clone(), true, format!("walt image cp {}", start.dest))
        .await?;
    let st = state.clone();
    let notice =
        crate::images::blocking(move || crate::nodes::service::in_use_notice(&st, &name)).await?;
    if notice.is_some() {
        state.nodes.changed();
    }
    Ok(pb::CopyInReply {
        name: short.clone(),
        message: notice.unwrap_or_default(),
    })
}

/// A copy process and its stderr, or why the copy is abandoned (and the
/// process to stop).
type Outcome = Result<(Child, Option<ChildStderr>), (ServiceError, Child)>;

/// The archive comes in the stream: relayed into the sandbox's stdin.
async fn relay_in(
    state: &Arc<State>,
    session: &Session,
    job: Job,
    input: &mut Streaming<pb::CopyInRequest>,
) -> Result<Outcome, ServiceError> {
    let store = state.store.clone();
    let limit = store.limits().layer_unpacked_size;
    let short = session.short();
    let (mut received, mut since_check) = (0u64, 0u64);
    let mut child = spawn(session, job, Stdio::piped(), Stdio::null())?;
    let mut stdin = child.stdin.take();
    if let Some(w) = &stdin {
        // 1 MiB in the pipe instead of 64 KiB: a chunk of the stream goes
        // in at once, without waiting for the sandbox four times.
        let _ = nix::fcntl::fcntl(w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    }
    let stderr = child.stderr.take();
    // The sandbox's mount is volatile (flushing through it does nothing):
    // the writeback of the store's filesystem is started from here, so that
    // the save's flush, while it hashes the layer, has only the tail left.
    let mut flush = walt_store::EarlyFlush::start(&session.upper());
    let mut failure = None;
    loop {
        tokio::select! {
            m = input.message() => match m {
                Ok(Some(pb::CopyInRequest { msg: Some(Msg::Tar(b)) })) => {
                    received += b.len() as u64;
                    since_check += b.len() as u64;
                    if received > limit {
                        failure = Some(ServiceError::Store(walt_store::StoreError::TooLarge {
                            what: format!("cannot copy into image '{short}': the archive"),
                            limit: walt_core::config::format_size(limit),
                            key: "layer-unpacked-size",
                        }));
                        break;
                    }
                    if since_check >= SPACE_CHECK_EVERY {
                        since_check = 0;
                        if let Err(e) = check_space(&store).await {
                            failure = Some(e);
                            break;
                        }
                    }
                    if let Some(w) = stdin.as_mut()
                        && w.write_all(&b).await.is_err()
                    {
                        // The sandbox stopped reading: its stderr says why.
                        stdin = None;
                        break;
                    }
                    flush.wrote(b.len() as u64);
                }
                Ok(Some(pb::CopyInRequest { msg: Some(Msg::End(_)) })) => break,
                Ok(None) => {
                    // The client stopped without saying the archive was
                    // complete (its side failed): save nothing.
                    failure = Some(ServiceError::InvalidArgument("copy interrupted by the client".into()));
                    break;
                }
                Ok(Some(_)) => {
                    failure = Some(ServiceError::InvalidArgument("unexpected message in a copy stream".into()));
                    break;
                }
                Err(s) => {
                    failure = Some(ServiceError::InvalidArgument(format!("copy interrupted: {}", s.message())));
                    break;
                }
            },
            _ = state.shutdown.cancelled() => {
                failure = Some(ServiceError::ShuttingDown);
                break;
            }
        }
    }
    if let Some(mut w) = stdin {
        let _ = w.shutdown().await;
    }
    // Dropped, not waited for: a flush it runs goes on while the layer is
    // hashed.
    drop(flush);
    Ok(match failure {
        Some(e) => Err((e, child)),
        None => Ok((child, stderr)),
    })
}

/// The archive comes through the client's FIFO, straight into the
/// sandbox: waits for the sandbox's end and for the client's `end` (a
/// client that stopped without it failed on its side: nothing is saved).
async fn wait_local_in(
    state: &Arc<State>,
    session: &Session,
    mut child: Child,
    input: &mut Streaming<pb::CopyInRequest>,
) -> Outcome {
    let stderr = child.stderr.take();
    let mut watch = DiskWatch::new(state.store.clone(), session.upper());
    let mut tick = tokio::time::interval(DiskWatch::EVERY);
    let (mut ended, mut exited) = (false, false);
    let failure = loop {
        if ended && exited {
            break None;
        }
        tokio::select! {
            m = input.message(), if !ended => match m {
                Ok(Some(pb::CopyInRequest { msg: Some(Msg::End(_)) })) => ended = true,
                Ok(None) => break Some(ServiceError::InvalidArgument("copy interrupted by the client".into())),
                Ok(Some(_)) => break Some(ServiceError::InvalidArgument("unexpected message in a copy stream".into())),
                Err(s) => break Some(ServiceError::InvalidArgument(format!("copy interrupted: {}", s.message()))),
            },
            st = child.wait(), if !exited => match st {
                Ok(st) if st.success() => exited = true,
                // Its reason is read by the caller.
                Ok(_) => break None,
                Err(e) => break Some(ServiceError::Internal(format!("copy process lost: {e}"))),
            },
            _ = tick.tick() => if let Err(e) = watch.check() {
                break Some(e);
            },
            _ = state.shutdown.cancelled() => break Some(ServiceError::ShuttingDown),
        }
    };
    drop(watch);
    match failure {
        Some(e) => Err((e, child)),
        None => Ok((child, stderr)),
    }
}

pub async fn copy_out(
    state: Arc<State>,
    user: String,
    peer: Peer,
    req: pb::CopyOutRequest,
) -> Result<CopyOutStream, ServiceError> {
    let session = Session::open(&state, &user, &req.image, "walt image cp", false).await?;
    crate::editable::ensure_editable(&session.rec, &user)?;
    let short = session.short();
    let job = Job::TarOut { path: req.path };
    if !req.local_pipe.is_empty() {
        let fifo = localpipe::open(&req.local_pipe, End::Write, peer).map_err(|e| {
            tracing::debug!(image = %session.rec.name, "copy out: the client's pipe is refused: {e}");
            ServiceError::LocalPipe(e)
        })?;
        tracing::debug!(image = %session.rec.name, "copy out through the client's pipe");
        let mut child = spawn(&session, job, Stdio::null(), fifo.into())?;
        let stderr = child.stderr.take();
        let (tx, rx) = mpsc::channel(2);
        let _ = tx
            .send(Ok(pb::CopyOutChunk {
                tar: Default::default(),
                local: true,
            }))
            .await;
        tokio::spawn(async move {
            let _session = session;
            tokio::select! {
                _ = child.wait() => {}
                // The client is gone: so is its copy.
                () = tx.closed() => {
                    crate::session::stop_sandbox(&mut child).await;
                    return;
                }
                () = state.shutdown.cancelled() => {
                    crate::session::stop_sandbox(&mut child).await;
                    let _ = tx.send(Err(Status::from(ServiceError::ShuttingDown))).await;
                    return;
                }
            }
            out_result(child, stderr, &tx, &short).await;
        });
        return Ok(Box::pin(ReceiverStream::new(rx)));
    }
    let mut child = spawn(&session, job, Stdio::null(), Stdio::piped())?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| ServiceError::Internal("copy process without output".into()))?;
    let stderr = child.stderr.take();

    // A path that does not exist fails before any byte: a plain error.
    let mut first = vec![0u8; CHUNK];
    let n = read_full(&mut stdout, &mut first).await;
    if n == 0 {
        let status = child
            .wait()
            .await
            .map_err(|e| ServiceError::Internal(format!("copy process lost: {e}")))?;
        let why = reason(stderr, status).await;
        return Err(ServiceError::InvalidArgument(format!(
            "cannot copy from image '{short}': {why}"
        )));
    }
    first.truncate(n);
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let _session = session;
        let mut chunk = first;
        loop {
            if tx
                .send(Ok(pb::CopyOutChunk {
                    tar: chunk.into(),
                    local: false,
                }))
                .await
                .is_err()
            {
                crate::session::stop_sandbox(&mut child).await;
                return;
            }
            let mut buf = vec![0u8; CHUNK];
            let n = tokio::select! {
                n = read_full(&mut stdout, &mut buf) => n,
                _ = state.shutdown.cancelled() => {
                    crate::session::stop_sandbox(&mut child).await;
                    let _ = tx.send(Err(Status::from(ServiceError::ShuttingDown))).await;
                    return;
                }
            };
            if n == 0 {
                break;
            }
            buf.truncate(n);
            chunk = buf;
        }
        out_result(child, stderr, &tx, &short).await;
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// The end of a copy out of an image: the stream just ends when the copy
/// process succeeded, else it ends with the process's reason.
async fn out_result(
    mut child: Child,
    stderr: Option<ChildStderr>,
    tx: &mpsc::Sender<Result<pb::CopyOutChunk, Status>>,
    short: &str,
) {
    let error = match child.wait().await {
        Ok(st) if st.success() => return,
        Ok(st) => {
            let why = reason(stderr, st).await;
            Status::from(ServiceError::InvalidArgument(format!(
                "cannot copy from image '{short}': {why}"
            )))
        }
        Err(e) => Status::internal(format!("copy process lost: {e}")),
    };
    let _ = tx.send(Err(error)).await;
}

/// Fills `buf` as far as the stream allows; 0 at its end (or on error).
async fn read_full(r: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}
