//! `walt node console <name>`: the serial console of a virtual node, as
//! WalT's: `<ctrl-a> d` quits, `<ctrl-a> a` (or `<ctrl-a> <ctrl-a>`)
//! sends `<ctrl-a>`, other `<ctrl-a> <key>` are ignored. On a terminal,
//! stdin is in raw mode meanwhile; without one, the end of stdin quits too.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::anyhow;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use walt_proto::v1 as pb;

use crate::image::status_error;
use crate::node::Client;
use crate::term::RawMode;

const CTRL_A: u8 = 0x01;

/// The escape handling: what to send for `input`, and whether the user
/// asked to quit. `esc` carries a pending `<ctrl-a>` across reads.
fn filter_keys(input: &[u8], esc: &mut bool) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(input.len());
    for &b in input {
        if *esc {
            *esc = false;
            match b {
                b'd' => return (out, true),
                b'a' | CTRL_A => out.push(CTRL_A),
                _ => {}
            }
        } else if b == CTRL_A {
            *esc = true;
        } else {
            out.push(b);
        }
    }
    (out, false)
}

/// Drops the terminal resets a node prints (`ESC c`, `ESC [2J`), as WalT does.
fn filter_output(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(b"\x1bc") {
            i += 2;
        } else if data[i..].starts_with(b"\x1b[2J") {
            i += 4;
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

/// Reads stdin until `<ctrl-a> d`, its end, or `stop`.
fn pump_stdin(tx: mpsc::Sender<pb::ConsoleInput>, stop: Arc<AtomicBool>) {
    let stdin = std::io::stdin();
    let mut buf = [0u8; 1024];
    let mut esc = false;
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
        let n = match stdin.lock().read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let (data, done) = filter_keys(&buf[..n], &mut esc);
        if !data.is_empty()
            && tx
                .blocking_send(pb::ConsoleInput {
                    node: String::new(),
                    data,
                })
                .is_err()
        {
            break;
        }
        if done {
            break;
        }
    }
}

pub async fn console(client: &mut Client, name: &str) -> anyhow::Result<()> {
    let tty = std::io::stdin().is_terminal();
    let (tx, rx) = mpsc::channel::<pb::ConsoleInput>(64);
    tx.send(pb::ConsoleInput {
        node: name.to_string(),
        data: Vec::new(),
    })
    .await
    .map_err(|_| anyhow!("cannot start the console"))?;
    let mut outputs = client
        .console(ReceiverStream::new(rx))
        .await
        .map_err(status_error)?
        .into_inner();
    if tty {
        eprintln!(
            "Connected to the console of {name}. Use <ctrl-a> d to quit (<ctrl-a> a sends <ctrl-a>)."
        );
    }
    let raw = if tty { RawMode::enter() } else { None };
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let pump = {
        let (tx, stop) = (tx, stop.clone());
        std::thread::spawn(move || {
            pump_stdin(tx, stop);
            let _ = done_tx.send(());
        })
    };
    let mut stdout = std::io::stdout();
    let res = loop {
        tokio::select! {
            m = outputs.message() => match m {
                Ok(Some(o)) => {
                    let _ = stdout.write_all(&filter_output(&o.data));
                    let _ = stdout.flush();
                }
                Ok(None) => break Err(anyhow!("the console of {name} was closed by the server (node stopped or removed)")),
                Err(s) => break Err(status_error(s)),
            },
            _ = &mut done_rx => break Ok(()),
        }
    };
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || pump.join()).await;
    drop(raw);
    if res.is_ok() && tty {
        eprintln!("\nDisconnected from the console of {name}.");
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_escapes_as_walt() {
        let mut esc = false;
        assert_eq!(filter_keys(b"ls\r", &mut esc), (b"ls\r".to_vec(), false));
        assert_eq!(
            filter_keys(b"x\x01ay", &mut esc),
            (b"x\x01y".to_vec(), false)
        );
        assert_eq!(filter_keys(b"\x01\x01", &mut esc), (vec![CTRL_A], false));
        assert_eq!(filter_keys(b"\x01zq", &mut esc), (b"q".to_vec(), false));
        // Split across reads.
        assert_eq!(filter_keys(b"a\x01", &mut esc), (b"a".to_vec(), false));
        assert!(esc);
        assert_eq!(filter_keys(b"dmore", &mut esc), (vec![], true));
        assert_eq!(
            filter_output(b"\x1bcA\x1b[2JB\x1b[0m"),
            b"AB\x1b[0m".to_vec()
        );
    }
}
