//! Drives an interactive program in a detached tmux session (its own tmux
//! server socket, killed on drop).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util::wait_for;

pub struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts `shell_cmd` (run by `sh -c`) in a 200x50 pane.
    pub fn start(shell_cmd: &str) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let socket = format!(
            "walt-e2e-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let t = Self { socket };
        t.tmux(&[
            "new-session",
            "-d",
            "-s",
            "main",
            "-x",
            "200",
            "-y",
            "50",
            shell_cmd,
        ])?;
        Ok(t)
    }

    fn tmux(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .context("cannot run tmux")?;
        if !out.status.success() {
            bail!(
                "tmux {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sends tmux key names (`Enter`, `Down`, `BSpace`, `Escape`...).
    pub fn keys(&self, keys: &[&str]) -> Result<()> {
        let mut a = vec!["send-keys", "-t", "main"];
        a.extend_from_slice(keys);
        self.tmux(&a)?;
        std::thread::sleep(Duration::from_millis(150));
        Ok(())
    }

    /// Resizes the terminal (the program gets SIGWINCH).
    pub fn resize(&self, cols: u16, rows: u16) -> Result<()> {
        self.tmux(&[
            "resize-window",
            "-t",
            "main",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
        ])?;
        std::thread::sleep(Duration::from_millis(150));
        Ok(())
    }

    /// Types `text` literally.
    pub fn text(&self, text: &str) -> Result<()> {
        self.tmux(&["send-keys", "-t", "main", "-l", text])?;
        std::thread::sleep(Duration::from_millis(150));
        Ok(())
    }

    /// Presses BSpace `n` times (erases what a prompt holds).
    pub fn erase(&self, n: usize) -> Result<()> {
        let n = n.to_string();
        self.tmux(&["send-keys", "-t", "main", "-N", &n, "BSpace"])?;
        std::thread::sleep(Duration::from_millis(150));
        Ok(())
    }

    /// Types `text` literally, then presses Enter.
    pub fn enter(&self, text: &str) -> Result<()> {
        if !text.is_empty() {
            self.text(text)?;
        }
        self.keys(&["Enter"])
    }

    /// Waits until the screen holds no line satisfying `f` any more.
    pub fn wait_no_line(&self, what: &str, f: impl Fn(&str) -> bool) -> Result<()> {
        wait_for(what, Duration::from_secs(20), || {
            (!self.screen().lines().any(|l| f(l.trim_end()))).then_some(())
        })
        .with_context(|| format!("screen:\n{}", self.screen()))
    }

    /// The visible screen and the scrollback.
    pub fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "main", "-S", "-200"])
            .unwrap_or_default()
    }

    /// Waits until a screen line satisfies `f`.
    pub fn wait_line(&self, what: &str, f: impl Fn(&str) -> bool) -> Result<()> {
        wait_for(what, Duration::from_secs(20), || {
            self.screen().lines().any(|l| f(l.trim_end())).then_some(())
        })
        .with_context(|| format!("screen:\n{}", self.screen()))
    }

    /// Waits for an active inquire prompt (`? MESSAGE...`).
    pub fn wait_prompt(&self, message: &str) -> Result<()> {
        let p = format!("? {message}");
        self.wait_line(&format!("prompt `{message}`"), |l| l.starts_with(&p))
    }

    /// In an inquire select list, moves down to `item` and presses Enter.
    pub fn select(&self, item: &str) -> Result<()> {
        let want = format!("> {item}");
        for _ in 0..20 {
            if self.screen().lines().any(|l| l.trim_end() == want) {
                return self.keys(&["Enter"]);
            }
            self.keys(&["Down"])?;
        }
        bail!("no item `{item}` in the list:\n{}", self.screen())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}
