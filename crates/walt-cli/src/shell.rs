//! `walt image shell <image>`: the terminal side of a shell in an image, then
//! the save dialogue.

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, bail};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use walt_proto::v1::{self as pb, shell_input::Input, shell_output::Output};

use super::{Client, status_error};
use crate::prompt;
use crate::term::RawMode;

/// The command's exit status, to be used without printing anything more.
#[derive(Debug)]
pub struct ExitWith(pub u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

fn window_size() -> Option<pb::WindowSize> {
    let out = std::io::stdout();
    let inp = std::io::stdin();
    let err = std::io::stderr();
    [out.as_fd(), inp.as_fd(), err.as_fd()]
        .into_iter()
        .find_map(|fd| match rustix::termios::tcgetwinsize(fd) {
            Ok(ws) if ws.ws_row > 0 => Some(pb::WindowSize {
                rows: u32::from(ws.ws_row),
                cols: u32::from(ws.ws_col),
            }),
            _ => None,
        })
}

fn input(i: Input) -> pb::ShellInput {
    pb::ShellInput { input: Some(i) }
}

/// Copies stdin to the shell until `stop` is set. Polls so that it can stop
/// without having consumed what the user types at the save prompt.
fn pump_stdin(tx: mpsc::Sender<pb::ShellInput>, stop: Arc<AtomicBool>, tty: bool) {
    let mut buf = [0u8; 8192];
    let stdin = std::io::stdin();
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        let r = match poll(&mut pfd, PollTimeout::from(50u8)) {
            Ok(r) => r,
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        };
        if r == 0 || stop.load(Ordering::Relaxed) {
            continue;
        }
        // Straight from the descriptor: std's buffered stdin could keep bytes that
        // belong to the save prompt.
        let n = match nix::unistd::read(&stdin, &mut buf) {
            Ok(n) => n,
            Err(Errno::EINTR | Errno::EAGAIN) => continue,
            Err(_) => return,
        };
        if n == 0 {
            // End of a piped input: the terminal's end-of-file character.
            if !tty {
                let _ = tx.blocking_send(input(Input::Stdin(vec![4])));
            }
            return;
        }
        if tx
            .blocking_send(input(Input::Stdin(buf[..n].to_vec())))
            .is_err()
        {
            return;
        }
    }
}

/// A line typed at the terminal, or None on Ctrl-C / end of input. Read on
/// a thread of its own so that Ctrl-C can abandon it.
pub(super) async fn ask(question: String) -> anyhow::Result<Option<String>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(prompt::ask_line(&question));
    });
    tokio::select! {
        r = rx => match r {
            Ok(Ok(line)) => Ok(Some(line)),
            Ok(Err(_)) | Err(_) => Ok(None),
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!();
            Ok(None)
        }
    }
}

pub async fn shell(client: &mut Client, image: &str) -> anyhow::Result<()> {
    let tty = std::io::stdin().is_terminal();
    let (tx, rx) = mpsc::channel::<pb::ShellInput>(64);
    tx.send(input(Input::Start(pb::ShellStart {
        image: image.to_string(),
        term: std::env::var("TERM").unwrap_or_default(),
        size: window_size(),
    })))
    .await
    .map_err(|_| anyhow!("cannot start the shell"))?;
    let mut outputs = client
        .shell(ReceiverStream::new(rx))
        .await
        .map_err(status_error)?
        .into_inner();

    let raw = if tty { RawMode::enter() } else { None };
    let stop = Arc::new(AtomicBool::new(false));
    let pump = {
        let (tx, stop) = (tx.clone(), stop.clone());
        std::thread::spawn(move || pump_stdin(tx, stop, tty))
    };
    let resizes = {
        let tx = tx.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut winch) = signal(SignalKind::window_change()) else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some(ws) = window_size()
                    && tx.send(input(Input::Resize(ws))).await.is_err()
                {
                    return;
                }
            }
        })
    };

    let mut stdout = std::io::stdout();
    let exited = loop {
        match outputs.message().await {
            Ok(Some(pb::ShellOutput { output: Some(o) })) => match o {
                Output::Stdout(b) => {
                    let _ = stdout.write_all(&b);
                    let _ = stdout.flush();
                }
                Output::Exited(e) => break Ok(e),
                Output::Notice(n) => eprint!("{n}\r\n"),
                _ => {}
            },
            Ok(Some(_)) => {}
            Ok(None) => break Err(anyhow!("the server ended the shell without an exit status")),
            Err(s) => break Err(status_error(s)),
        }
    };
    stop.store(true, Ordering::Relaxed);
    resizes.abort();
    let _ = tokio::task::spawn_blocking(move || pump.join()).await;
    drop(raw);
    let exited = exited?;
    let code = u8::try_from(exited.status).unwrap_or(1);
    let finish = || -> anyhow::Result<()> {
        if code == 0 {
            Ok(())
        } else {
            Err(ExitWith(code).into())
        }
    };
    if !exited.changed {
        eprintln!("No changes: nothing to save.");
        return finish();
    }
    if !prompt::interactive() {
        let _ = tx.send(input(Input::Discard(true))).await;
        bail!("no terminal to ask where to save the changes: they were discarded");
    }

    let current = exited.image;
    let mut name = String::new();
    let mut overwrite = false;
    let mut ask_name = true;
    loop {
        if ask_name {
            let Some(answer) =
                ask(format!("Name of the image to save (Enter: {current}): ")).await?
            else {
                let _ = tx.send(input(Input::Discard(true))).await;
                eprintln!("Changes discarded.");
                return Err(ExitWith(130).into());
            };
            name = answer.trim().to_string();
            overwrite = false;
        }
        if tx
            .send(input(Input::Save(pb::ShellSave {
                name: name.clone(),
                overwrite,
            })))
            .await
            .is_err()
        {
            // The server ended the dialogue (e.g. the prompt timed out):
            // its status says why.
            return Err(match outputs.message().await {
                Err(s) => status_error(s),
                _ => anyhow!("lost the connection to the walt server"),
            });
        }
        let reply = loop {
            match outputs.message().await {
                Ok(Some(pb::ShellOutput { output: Some(o) })) => match o {
                    Output::Notice(n) => eprintln!("{n}"),
                    Output::Stdout(_) | Output::Exited(_) => {}
                    other => break other,
                },
                Ok(Some(_)) => {}
                Ok(None) => bail!("the server ended the session before saving"),
                Err(s) => return Err(status_error(s)),
            }
        };
        match reply {
            Output::ConfirmOverwrite(existing) => {
                let q = format!("Image {existing} already exists. Overwrite it? (y/n): ");
                loop {
                    let Some(a) = ask(q.clone()).await? else {
                        let _ = tx.send(input(Input::Discard(true))).await;
                        eprintln!("Changes discarded.");
                        return Err(ExitWith(130).into());
                    };
                    match a.trim().to_ascii_lowercase().as_str() {
                        "y" | "yes" => {
                            overwrite = true;
                            ask_name = false;
                            break;
                        }
                        "n" | "no" => {
                            ask_name = true;
                            break;
                        }
                        _ => {}
                    }
                }
            }
            Output::InvalidName(why) => {
                eprintln!("{why}");
                ask_name = true;
            }
            Output::Saved(s) => {
                println!("{}", s.message);
                return finish();
            }
            _ => ask_name = true,
        }
    }
}
