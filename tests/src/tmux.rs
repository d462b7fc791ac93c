//! Drives an interactive program in a detached tmux session (its own tmux
//! server socket, killed on drop). No fixed sleeps: a helper that must know
//! its input was taken waits for the screen to show it, and fails after a
//! timeout with the screen in its message.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util::wait_for;

/// How long a helper waits for the screen to show what it expects.
const TIMEOUT: Duration = Duration::from_secs(20);

pub struct Tmux {
    socket: String,
}

impl Tmux {
    /// The exit status the command in the terminal wrote to `exit` (the
    /// `; echo $? > exit` of its command line), waited for up to `timeout`;
    /// panics with the screen when it does not come.
    pub fn exit_status(&self, exit: &std::path::Path, timeout: Duration) -> i32 {
        wait_for("the command to finish", timeout, || {
            std::fs::read_to_string(exit)
                .ok()
                .filter(|s| !s.trim().is_empty())
        })
        .unwrap_or_else(|e| panic!("{e}\nscreen:\n{}", self.screen()));
        std::fs::read_to_string(exit)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

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

    /// Sends tmux key names (`Enter`, `Down`, `BSpace`, `Escape`, `C-c`...) and
    /// returns: the caller waits for what they should bring on the screen
    /// (`wait_line`, `wait_prompt`, `select`...).
    pub fn keys(&self, keys: &[&str]) -> Result<()> {
        let mut a = vec!["send-keys", "-t", "main"];
        a.extend_from_slice(keys);
        self.tmux(&a)?;
        Ok(())
    }

    /// Resizes the terminal (the program gets SIGWINCH) and waits until the
    /// pane has the new size.
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
        let want = format!("{cols}x{rows}");
        wait_for(&format!("the pane to be {want}"), TIMEOUT, || {
            let size = self
                .tmux(&[
                    "display-message",
                    "-p",
                    "-t",
                    "main",
                    "#{pane_width}x#{pane_height}",
                ])
                .ok()?;
            (size.trim() == want).then_some(())
        })
    }

    /// Types `text` literally and waits until it shows just before the cursor
    /// (echoed by the program or the terminal). For input that is not echoed,
    /// see `secret`.
    pub fn text(&self, text: &str) -> Result<()> {
        let before = self.before_cursor().unwrap_or_default();
        self.tmux(&["send-keys", "-t", "main", "-l", text])?;
        self.wait_screen(&format!("`{text}` typed at the cursor"), |_| {
            let now = self.before_cursor().ok()?;
            (now.ends_with(text) && now != before).then_some(())
        })
    }

    /// Types `text` literally at a prompt that does not echo it (a password):
    /// nothing shows, so nothing is waited for.
    pub fn secret(&self, text: &str) -> Result<()> {
        self.tmux(&["send-keys", "-t", "main", "-l", text])?;
        Ok(())
    }

    /// Presses BSpace `n` times (erases what a prompt holds) and waits until
    /// the cursor has moved back `n` columns.
    pub fn erase(&self, n: usize) -> Result<()> {
        let (x, y) = self.cursor()?;
        if x < n {
            bail!(
                "cannot erase {n} characters: the cursor is at column {x}\nscreen:\n{}",
                self.screen()
            );
        }
        self.tmux(&["send-keys", "-t", "main", "-N", &n.to_string(), "BSpace"])?;
        self.wait_screen(&format!("{n} characters erased"), |_| {
            (self.cursor().ok()? == (x - n, y)).then_some(())
        })
    }

    /// Types `text` (waiting for it to show, see `text`), then presses Enter.
    pub fn enter(&self, text: &str) -> Result<()> {
        if !text.is_empty() {
            self.text(text)?;
        }
        self.keys(&["Enter"])
    }

    /// The visible screen and the scrollback.
    pub fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "main", "-S", "-200"])
            .unwrap_or_default()
    }

    /// Everything the pane printed since it started (for counting lines).
    fn history(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "main", "-S", "-"])
            .unwrap_or_default()
    }

    /// Column and row of the cursor in the visible pane.
    fn cursor(&self) -> Result<(usize, usize)> {
        let out = self.tmux(&[
            "display-message",
            "-p",
            "-t",
            "main",
            "#{cursor_x} #{cursor_y}",
        ])?;
        let mut it = out.split_whitespace().map(str::parse::<usize>);
        match (it.next(), it.next()) {
            (Some(Ok(x)), Some(Ok(y))) => Ok((x, y)),
            _ => bail!("tmux gave no cursor position: {out:?}"),
        }
    }

    /// What the cursor's line holds to the left of the cursor.
    fn before_cursor(&self) -> Result<String> {
        let (x, y) = self.cursor()?;
        let y = y.to_string();
        let line = self.tmux(&["capture-pane", "-p", "-N", "-t", "main", "-S", &y, "-E", &y])?;
        Ok(line.trim_end_matches('\n').chars().take(x).collect())
    }

    /// Polls the screen until `f` gives `Some`; after the timeout, fails with
    /// the screen in the message.
    fn wait_screen<T>(&self, what: &str, mut f: impl FnMut(&str) -> Option<T>) -> Result<T> {
        wait_for(what, TIMEOUT, || f(&self.screen()))
            .with_context(|| format!("screen:\n{}", self.screen()))
    }

    /// Waits until the screen holds no line satisfying `f` any more.
    pub fn wait_no_line(&self, what: &str, f: impl Fn(&str) -> bool) -> Result<()> {
        self.wait_screen(what, |s| {
            (!s.lines().any(|l| f(l.trim_end()))).then_some(())
        })
    }

    /// Waits until a screen line satisfies `f`.
    pub fn wait_line(&self, what: &str, f: impl Fn(&str) -> bool) -> Result<()> {
        self.wait_screen(what, |s| s.lines().any(|l| f(l.trim_end())).then_some(()))
    }

    /// Waits for an active inquire prompt (`? MESSAGE...`).
    pub fn wait_prompt(&self, message: &str) -> Result<()> {
        let p = format!("? {message}");
        self.wait_line(&format!("prompt `{message}`"), |l| l.starts_with(&p))
    }

    /// In the active inquire select list, moves down to `item` (waiting for the
    /// highlight to move at each step), presses Enter and waits until the
    /// prompt shows `item` as its answer.
    pub fn select(&self, item: &str) -> Result<()> {
        let (prompt, mut highlighted) =
            self.wait_screen(&format!("a select list with `{item}`"), |s| {
                let list = SelectList::parse(s)?;
                list.items
                    .iter()
                    .any(|i| i == item)
                    .then_some((list.prompt, list.highlighted))
            })?;
        for _ in 0..50 {
            if highlighted.as_deref() == Some(item) {
                let answered = format!("> {prompt} {item}");
                let count = |s: &str| s.lines().filter(|l| l.trim_end() == answered).count();
                let before = count(&self.history());
                self.keys(&["Enter"])?;
                return wait_for(&format!("`{answered}`"), TIMEOUT, || {
                    (count(&self.history()) > before).then_some(())
                })
                .with_context(|| format!("screen:\n{}", self.screen()));
            }
            let was = highlighted.clone();
            self.keys(&["Down"])?;
            highlighted =
                self.wait_screen(&format!("the highlight to move from {was:?}"), |s| {
                    let list = SelectList::parse(s)?;
                    (list.prompt == prompt && list.highlighted != was).then_some(list.highlighted)
                })?;
        }
        bail!("`{item}` never highlighted in the list:\n{}", self.screen())
    }
}

/// The active inquire select list: the last `? PROMPT` line and the items
/// under it (`> ` marks the highlighted one, two spaces the others).
struct SelectList {
    prompt: String,
    items: Vec<String>,
    highlighted: Option<String>,
}

impl SelectList {
    fn parse(screen: &str) -> Option<Self> {
        let lines: Vec<&str> = screen.lines().map(str::trim_end).collect();
        let start = lines.iter().rposition(|l| l.starts_with("? "))?;
        let mut list = SelectList {
            prompt: lines[start][2..].to_string(),
            items: Vec::new(),
            highlighted: None,
        };
        for l in &lines[start + 1..] {
            if let Some(i) = l.strip_prefix("> ") {
                list.highlighted = Some(i.to_string());
                list.items.push(i.to_string());
            } else if let Some(i) = l.strip_prefix("  ") {
                list.items.push(i.to_string());
            } else {
                break;
            }
        }
        (!list.items.is_empty()).then_some(list)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}
