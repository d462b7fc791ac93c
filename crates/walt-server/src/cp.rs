//! `Images.CopyIn` / `Images.CopyOut`: tar streams between the client and a
//! sandbox chrooted in the image (so every path and link the image holds
//! resolves inside it).

use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use walt_container::Job;
use walt_proto::v1::{self as pb, copy_in_request::Msg};

use crate::State;
use crate::error::ServiceError;
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

fn spawn(session: &Session, job: Job) -> Result<tokio::process::Child, ServiceError> {
    let mut cmd = walt_container::command(&session.spec(job))
        .map_err(|e| ServiceError::Internal(format!("cannot start the copy process: {e}")))?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn()
        .map_err(|e| ServiceError::Internal(format!("cannot start the copy process: {e}")))
}

pub async fn copy_in(
    state: Arc<State>,
    user: String,
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
    let (mut received, mut since_check) = (0u64, 0u64);
    let mut child = spawn(
        &session,
        Job::TarIn {
            dest: start.dest.clone(),
            limit: Some(limit),
        },
    )?;
    let mut stdin = child.stdin.take();
    if let Some(w) = &stdin {
        // 1 MiB in the pipe instead of 64 KiB: a chunk of the stream goes
        // in at once, without waiting for the sandbox four times.
        let _ = nix::fcntl::fcntl(w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    }
    let stderr = child.stderr.take();
    drop(child.stdout.take());
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
    if let Some(e) = failure {
        crate::session::stop_sandbox(&mut child).await;
        tracing::info!(image = %session.rec.name, "copy into the image abandoned: {e}");
        return Err(e);
    }
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

pub async fn copy_out(
    state: Arc<State>,
    user: String,
    req: pb::CopyOutRequest,
) -> Result<CopyOutStream, ServiceError> {
    let session = Session::open(&state, &user, &req.image, "walt image cp", false).await?;
    crate::editable::ensure_editable(&session.rec, &user)?;
    let short = session.short();
    let mut child = spawn(&session, Job::TarOut { path: req.path })?;
    drop(child.stdin.take());
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
                .send(Ok(pb::CopyOutChunk { tar: chunk.into() }))
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
        match child.wait().await {
            Ok(st) if st.success() => {}
            Ok(st) => {
                let why = reason(stderr, st).await;
                let _ = tx
                    .send(Err(Status::from(ServiceError::InvalidArgument(format!(
                        "cannot copy from image '{short}': {why}"
                    )))))
                    .await;
            }
            Err(e) => {
                let _ = tx
                    .send(Err(Status::internal(format!("copy process lost: {e}"))))
                    .await;
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
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
