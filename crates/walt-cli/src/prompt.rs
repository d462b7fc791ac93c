//! Questions on the terminal: registry credentials, with a hidden password.

use std::io::{BufRead, IsTerminal, Read, Write};

use anyhow::{Context, anyhow, bail};
use nix::sys::signal::{self, Signal};
use nix::sys::termios::{self, LocalFlags, SetArg, SpecialCharacterIndices as Cc, Termios};

use crate::config::RegistryCredentials;

/// True when the user can be asked something.
pub fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

fn read_line() -> anyhow::Result<String> {
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line)? == 0 {
        bail!("no answer given (end of input)");
    }
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// The terminal on stdin without echo and in non-canonical mode, its special keys
/// (Ctrl-C...) read as bytes, until dropped: the previous settings are restored before
/// any signal those keys stand for is sent, so that Ctrl-C never leaves echo off.
struct HiddenInput {
    saved: Termios,
    hidden: Termios,
}

impl HiddenInput {
    /// None when stdin is not a terminal.
    fn new() -> Option<Self> {
        let saved = termios::tcgetattr(std::io::stdin()).ok()?;
        let mut hidden = saved.clone();
        hidden
            .local_flags
            .remove(LocalFlags::ECHO | LocalFlags::ICANON | LocalFlags::ISIG | LocalFlags::IEXTEN);
        hidden.control_chars[Cc::VMIN as usize] = 1;
        hidden.control_chars[Cc::VTIME as usize] = 0;
        let h = Self { saved, hidden };
        h.set(&h.hidden).ok()?;
        Some(h)
    }

    fn set(&self, t: &Termios) -> nix::Result<()> {
        termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, t)
    }

    /// The key bound to `c` in the user's settings, unless disabled.
    fn key(&self, c: Cc) -> Option<u8> {
        let k = self.saved.control_chars[c as usize];
        (k != libc::_POSIX_VDISABLE).then_some(k)
    }

    /// What the terminal does for Ctrl-C, Ctrl-\ and Ctrl-Z, with its settings restored
    /// first: `sig` to the foreground process group (this one). If this process survives
    /// it (ignored, or stopped then continued), input is hidden again.
    fn signal(&self, sig: Signal) {
        let _ = self.set(&self.saved);
        let _ = signal::killpg(nix::unistd::getpgrp(), sig);
        if sig != Signal::SIGTSTP {
            // Delivered to this very thread before raise returns: when the signal kills,
            // the terminal cannot be hidden again below.
            let _ = signal::raise(sig);
        }
        let _ = self.set(&self.hidden);
    }

    /// Reads a line with the terminal's own editing keys (erase, kill, word erase); the
    /// end of the line is echoed, nothing else.
    fn read_line(&self) -> anyhow::Result<String> {
        let mut line: Vec<u8> = Vec::new();
        let mut stdin = std::io::stdin().lock();
        let is = |b: u8, c: Cc| self.key(c) == Some(b);
        loop {
            let mut b = [0u8; 1];
            match stdin.read(&mut b) {
                Ok(0) if line.is_empty() => bail!("no answer given (end of input)"),
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            let b = b[0];
            if b == b'\n' || b == b'\r' {
                let _ = std::io::stderr().write_all(b"\n");
                break;
            } else if is(b, Cc::VINTR) {
                self.signal(Signal::SIGINT);
            } else if is(b, Cc::VQUIT) {
                self.signal(Signal::SIGQUIT);
            } else if is(b, Cc::VSUSP) {
                self.signal(Signal::SIGTSTP);
            } else if is(b, Cc::VEOF) {
                if line.is_empty() {
                    bail!("no answer given (end of input)");
                }
            } else if is(b, Cc::VERASE) || b == 0x08 || b == 0x7f {
                // One character, not one byte.
                while let Some(c) = line.pop() {
                    if c & 0xc0 != 0x80 {
                        break;
                    }
                }
            } else if is(b, Cc::VKILL) {
                line.clear();
            } else if is(b, Cc::VWERASE) {
                while line.last().is_some_and(u8::is_ascii_whitespace) {
                    line.pop();
                }
                while line.last().is_some_and(|c| !c.is_ascii_whitespace()) {
                    line.pop();
                }
            } else {
                line.push(b);
            }
        }
        String::from_utf8(line).map_err(|_| anyhow!("stream did not contain valid UTF-8"))
    }
}

impl Drop for HiddenInput {
    fn drop(&mut self) {
        let _ = self.set(&self.saved);
    }
}

/// Asks for a username and a password (not echoed) for registry `label`.
pub fn ask_credentials(label: &str) -> anyhow::Result<RegistryCredentials> {
    let mut err = std::io::stderr();
    let username = loop {
        write!(err, "Username for registry '{label}': ")?;
        err.flush()?;
        let u = read_line()?.trim().to_string();
        if !u.is_empty() {
            break u;
        }
    };
    write!(err, "Password for {username} on '{label}' (not shown): ")?;
    err.flush()?;
    let password = match HiddenInput::new() {
        Some(hidden) => hidden.read_line(),
        None => read_line(),
    }
    .context("cannot read the password")?;
    Ok(RegistryCredentials { username, password })
}

/// Asks `question` on stderr and reads one line (without its newline).
pub fn ask_line(question: &str) -> anyhow::Result<String> {
    let mut err = std::io::stderr();
    write!(err, "{question}")?;
    err.flush()?;
    read_line()
}
