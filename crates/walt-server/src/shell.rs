//! `Images.Shell`: an interactive shell in a sandbox on an image, relayed
//! between the sandbox's PTY and a bidirectional gRPC stream, then the save
//! dialogue.

use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use walt_container::Job;
use walt_core::ImageName;
use walt_proto::v1::{self as pb, shell_input::Input, shell_output::Output};

use crate::State;
use crate::error::ServiceError;
use crate::images::blocking;
use crate::session::Session;

pub type ShellStream = Pin<Box<dyn Stream<Item = Result<pb::ShellOutput, Status>> + Send>>;

type Tx = mpsc::Sender<Result<pb::ShellOutput, Status>>;

/// Keystroke messages queued for a shell that does not read them (each at
/// most one gRPC message).
const KEYS_IN_FLIGHT: usize = 16;

fn out(o: Output) -> Result<pb::ShellOutput, Status> {
    Ok(pb::ShellOutput { output: Some(o) })
}

/// Reads the `start` message, opens the image and starts the shell; the
/// relay and the save dialogue then run in a task feeding the returned stream.
pub async fn start(
    state: Arc<State>,
    user: String,
    mut input: Streaming<pb::ShellInput>,
) -> Result<ShellStream, ServiceError> {
    let start = match input.message().await {
        Ok(Some(pb::ShellInput {
            input: Some(Input::Start(s)),
        })) => s,
        Ok(_) => {
            return Err(ServiceError::InvalidArgument(
                "a shell request must start with the image to open".into(),
            ));
        }
        Err(s) => return Err(ServiceError::InvalidArgument(s.message().to_string())),
    };
    let started = std::time::Instant::now();
    let slot = state
        .locks
        .open_shell(&user, state.config().limits.shells_per_user)?;
    let session = Session::open(&state, &user, &start.image, "a shell", true).await?;
    crate::editable::ensure_editable(&session.rec, &user)?;
    session.check_runnable()?;
    let size = start.size.unwrap_or_default();
    let (rows, cols) = (
        u16::try_from(size.rows)
            .ok()
            .filter(|&r| r > 0)
            .unwrap_or(24),
        u16::try_from(size.cols)
            .ok()
            .filter(|&c| c > 0)
            .unwrap_or(80),
    );
    let term = if start.term.is_empty() || start.term.len() > 64 {
        "xterm".to_string()
    } else {
        start.term
    };
    let shell = walt_container::spawn_shell(&session.spec(Job::Shell { term }), rows, cols)
        .await
        .map_err(|e| {
            ServiceError::FailedPrecondition(format!(
                "image '{}': cannot start a shell: {e}",
                session.short()
            ))
        })?;
    tracing::info!(
        image = %session.rec.name,
        user = %user,
        elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
        "shell started"
    );
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let image = session.rec.name.clone();
        if let Err(e) = run(state, user, session, shell, input, tx.clone()).await {
            tracing::warn!(image = %image, error = %e, "shell session failed");
            let _ = tx.send(Err(Status::from(e))).await;
        }
        // The session (and with it the image lock and the gc guard) is
        // dropped by now: the shell no longer counts.
        drop(slot);
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// The PTY master, non-blocking, driven by the runtime.
struct Pty(AsyncFd<OwnedFd>);

impl Pty {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
        fcntl_setfl(&fd, fcntl_getfl(&fd)? | OFlags::NONBLOCK)?;
        // SAFETY: an OwnedFd stays open, and keeps its descriptor, for as
        // long as the AsyncFd that owns it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self(fd))
    }

    /// Ok(0) once every slave end is closed (the kernel says EIO then).
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| Ok(rustix::io::read(fd, &mut *buf)?)) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| Ok(rustix::io::write(fd, data)?)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    fn resize(&self, size: &pb::WindowSize) {
        let ws = rustix::termios::Winsize {
            ws_row: u16::try_from(size.rows).unwrap_or(u16::MAX),
            ws_col: u16::try_from(size.cols).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        if ws.ws_row == 0 || ws.ws_col == 0 {
            return;
        }
        // The kernel sends SIGWINCH to the terminal's foreground process group.
        let _ = rustix::termios::tcsetwinsize(self.0.get_ref(), ws);
    }
}

/// `10m`, `90s`, `1500ms`: a duration as the configuration writes it.
fn humantime(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

async fn run(
    state: Arc<State>,
    user: String,
    session: Session,
    shell: walt_container::Shell,
    mut input: Streaming<pb::ShellInput>,
    tx: Tx,
) -> Result<(), ServiceError> {
    let walt_container::Shell { mut child, master } = shell;
    let pty =
        Arc::new(Pty::new(master).map_err(|e| {
            ServiceError::Internal(format!("cannot use the shell's terminal: {e}"))
        })?);

    // Keystrokes go through their own task: a shell that does not read its
    // input must not stop its output from flowing. The queue is bounded:
    // when it is full, the client's stream is not read until the shell
    // takes some (HTTP/2 flow control then holds the client back), while
    // output, exit, disconnect and shutdown are still watched.
    let (keys_tx, mut keys_rx) = mpsc::channel::<Vec<u8>>(KEYS_IN_FLIGHT);
    let writer = {
        let pty = pty.clone();
        tokio::spawn(async move {
            while let Some(k) = keys_rx.recv().await {
                if pty.write_all(&k).await.is_err() {
                    break;
                }
            }
        })
    };

    let mut buf = vec![0u8; 64 * 1024];
    let mut status = None;
    let mut pty_open = true;
    let mut input_open = true;
    let mut drain_deadline = None;
    // Keystrokes received while the queue was full.
    let mut pending: Option<Vec<u8>> = None;
    let outcome: Result<i32, &'static str> = loop {
        if let Some(st) = status
            && !pty_open
        {
            break Ok(st);
        }
        tokio::select! {
            r = pty.read(&mut buf), if pty_open => match r {
                Ok(0) | Err(_) => pty_open = false,
                Ok(n) => {
                    if tx.send(out(Output::Stdout(buf[..n].to_vec()))).await.is_err() {
                        break Err("the client went away");
                    }
                }
            },
            permit = keys_tx.reserve(), if pending.is_some() => {
                if let (Ok(permit), Some(k)) = (permit, pending.take()) {
                    permit.send(k);
                }
            },
            _ = tx.closed(), if pending.is_some() => break Err("the client went away"),
            m = input.message(), if input_open && pending.is_none() => match m {
                Ok(Some(pb::ShellInput { input: Some(Input::Stdin(b)) })) => {
                    if let Err(mpsc::error::TrySendError::Full(b)) = keys_tx.try_send(b) {
                        pending = Some(b);
                    }
                }
                Ok(Some(pb::ShellInput { input: Some(Input::Resize(ws)) })) => pty.resize(&ws),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    input_open = false;
                    if status.is_none() {
                        break Err("the client went away");
                    }
                }
            },
            st = child.wait(), if status.is_none() => {
                status = Some(st.map(exit_code).unwrap_or(1));
                // What the shell wrote last is still in the terminal.
                drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(2));
            },
            _ = tokio::time::sleep_until(drain_deadline.unwrap_or_else(tokio::time::Instant::now)), if drain_deadline.is_some() => {
                pty_open = false;
            },
            _ = state.shutdown.cancelled() => break Err("the server is shutting down"),
        }
    };
    writer.abort();
    let status = match outcome {
        Ok(s) => s,
        Err(why) => {
            crate::session::stop_sandbox(&mut child).await;
            tracing::info!(image = %session.rec.name, "shell ended: {why}; changes discarded");
            if why.contains("shutting down") {
                return Err(ServiceError::ShuttingDown);
            }
            return Ok(());
        }
    };
    drop(pty);

    let changed = session.changed(true).await?;
    let short = session.short();
    tracing::info!(image = %session.rec.name, status, changed, "shell exited");
    if tx
        .send(out(Output::Exited(pb::ShellExited {
            status,
            changed,
            image: short.clone(),
        })))
        .await
        .is_err()
        || !changed
    {
        return Ok(());
    }
    save_dialogue(&state, &user, &session, input, &tx).await
}

/// Answers the client's `save` messages until the image is saved or the
/// changes are discarded (a `discard`, or the client going away).
async fn save_dialogue(
    state: &Arc<State>,
    user: &str,
    session: &Session,
    mut input: Streaming<pb::ShellInput>,
    tx: &Tx,
) -> Result<(), ServiceError> {
    let timeout = state.config().limits.save_prompt_timeout;
    loop {
        // Each question gets the whole timeout.
        let deadline = tokio::time::sleep(timeout);
        let save = tokio::select! {
            m = input.message() => match m {
                Ok(Some(pb::ShellInput { input: Some(Input::Save(s)) })) => s,
                Ok(Some(pb::ShellInput { input: Some(Input::Discard(_)) })) | Ok(None) | Err(_) => {
                    tracing::info!(image = %session.rec.name, "shell changes discarded");
                    return Ok(());
                }
                Ok(Some(_)) => continue,
            },
            _ = state.shutdown.cancelled() => return Err(ServiceError::ShuttingDown),
            _ = deadline => {
                tracing::info!(image = %session.rec.name, ?timeout,
                    "save prompt not answered in time: shell changes discarded");
                return Err(ServiceError::FailedPrecondition(format!(
                    "image '{}': the save prompt was not answered within {} \
                     (limits.save-prompt-timeout in the server configuration): changes discarded",
                    session.short(),
                    humantime(timeout)
                )));
            }
        };
        let answer = save.name.trim();
        let target = if answer.is_empty() {
            session.rec.name.clone()
        } else {
            match ImageName::parse_user(user, answer) {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.send(out(Output::InvalidName(e.to_string()))).await;
                    continue;
                }
            }
        };
        // Another name is locked while this session writes it.
        let _target_lock = if target == session.rec.name {
            None
        } else {
            match state
                .locks
                .acquire(&target, format!("a shell of {user} saving into it"))
            {
                Ok(g) => Some(g),
                Err(e) => {
                    let _ = tx.send(out(Output::InvalidName(e.to_string()))).await;
                    continue;
                }
            }
        };
        let (st, t) = (state.clone(), target.clone());
        let (exists, in_use) = blocking(move || {
            let exists = st.store.get_image(&t)?.is_some();
            let in_use = match exists {
                true => crate::nodes::service::in_use_notice(&st, &t)?,
                false => None,
            };
            Ok((exists, in_use))
        })
        .await?;
        if exists && !save.overwrite {
            let _ = tx.send(out(Output::ConfirmOverwrite(target.short()))).await;
            continue;
        }
        if let Some(notice) = &in_use {
            let _ = tx.send(out(Output::Notice(notice.clone()))).await;
        }
        session
            .save(target.clone(), exists, "walt image shell".to_string())
            .await?;
        if in_use.is_some() {
            state.nodes.changed();
        }
        let message = if exists {
            format!("Image {} updated.", target.short())
        } else {
            format!("New image {} saved.", target.short())
        };
        let _ = tx
            .send(out(Output::Saved(pb::ShellSaved {
                name: target.short(),
                replaced: exists,
                message,
            })))
            .await;
        return Ok(());
    }
}
