//! Questions on the terminal: registry credentials, with a hidden password.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, bail};

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

/// Turns terminal echo off until dropped.
struct NoEcho {
    saved: Option<libc::termios>,
}

impl NoEcho {
    fn new() -> Self {
        let fd = libc::STDIN_FILENO;
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer to a termios we own.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return Self { saved: None };
        }
        let saved = t;
        t.c_lflag &= !libc::ECHO;
        t.c_lflag |= libc::ECHONL;
        // SAFETY: as above; restores happen in Drop.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
        Self { saved: Some(saved) }
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        if let Some(t) = self.saved {
            // SAFETY: restoring the attributes read in `new`.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
        }
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
    let password = {
        let _no_echo = NoEcho::new();
        read_line().context("cannot read the password")?
    };
    Ok(RegistryCredentials { username, password })
}

/// Asks `question` on stderr and reads one line (without its newline).
pub fn ask_line(question: &str) -> anyhow::Result<String> {
    let mut err = std::io::stderr();
    write!(err, "{question}")?;
    err.flush()?;
    read_line()
}
