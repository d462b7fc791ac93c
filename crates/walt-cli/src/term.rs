//! The terminal on stdin, shared by `walt image shell` and `walt node console`.

use nix::sys::termios::{self, SetArg, Termios};

/// Puts the terminal on stdin in raw mode until dropped.
pub(crate) struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub(crate) fn enter() -> Option<Self> {
        let saved = termios::tcgetattr(std::io::stdin()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &raw);
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}
