//! Text that comes from outside (registry error bodies, labels, names and
//! descriptions in search results, sandbox stderr) made safe to print on a
//! terminal, and server paths kept out of messages to users.
//!
//! [`neutralize`] replaces every character a terminal would act on instead of
//! showing (C0 controls except `\n` and `\t`, DEL, C1 controls, which cover
//! ESC and CSI sequences, and the bidirectional overrides and isolates) by a
//! visible escape: `\x1b`, `\x7f`, `\u{9b}`, `\u{202e}`. What follows an ESC
//! stays as plain text (`\x1b[31m` shows as those characters), harmless once
//! the ESC itself is gone.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::Path;

/// True for a character that must not reach a terminal as it is.
pub fn is_unsafe(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{8}' | '\u{b}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every unsafe character (see [`is_unsafe`]) replaced by its
/// visible escape. Borrows when there is nothing to replace.
pub fn neutralize(text: &str) -> Cow<'_, str> {
    let Some(first) = text.find(is_unsafe) else {
        return Cow::Borrowed(text);
    };
    let mut out = String::with_capacity(text.len() + 8);
    out.push_str(&text[..first]);
    for c in text[first..].chars() {
        push_visible(&mut out, c);
    }
    Cow::Owned(out)
}

/// [`neutralize`] that also turns line breaks and tabs into spaces: one line.
pub fn one_line(text: &str) -> Cow<'_, str> {
    let Some(first) = text.find(|c| is_unsafe(c) || c == '\n' || c == '\t') else {
        return Cow::Borrowed(text);
    };
    let mut out = String::with_capacity(text.len() + 8);
    out.push_str(&text[..first]);
    for c in text[first..].chars() {
        match c {
            '\n' | '\t' => out.push(' '),
            c => push_visible(&mut out, c),
        }
    }
    Cow::Owned(out)
}

fn push_visible(out: &mut String, c: char) {
    if !is_unsafe(c) {
        out.push(c);
    } else if (c as u32) < 0x80 {
        let _ = write!(out, "\\x{:02x}", c as u32);
    } else {
        let _ = write!(out, "\\u{{{:x}}}", c as u32);
    }
}

/// What replaces a server path in a message to a user.
pub const HIDDEN_PATH: &str = "<server path>";

/// `text` with every path under `root` (the path itself, or `root/...` up to
/// the next blank, quote, comma or `": "`) replaced by [`HIDDEN_PATH`]; quotes
/// around such a path go with it. Borrows when `root` does not occur.
pub fn hide_paths<'a>(text: &'a str, root: &Path) -> Cow<'a, str> {
    let Some(root) = root.to_str() else {
        return Cow::Borrowed(text);
    };
    let root = root.trim_end_matches('/');
    if root.is_empty() || !text.contains(root) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(root) {
        let after = &rest[at + root.len()..];
        // `root` must end there or continue as a path (`/var/lib/walt2` is not under `/var/lib/walt`).
        if !(after.is_empty() || after.starts_with('/') || ends_path(after)) {
            out.push_str(&rest[..at + root.len()]);
            rest = after;
            continue;
        }
        let len = after
            .char_indices()
            .find(|&(i, _)| ends_path(&after[i..]))
            .map_or(after.len(), |(i, _)| i);
        let mut head = &rest[..at];
        let mut tail = &after[len..];
        for q in ['\'', '"'] {
            if head.ends_with(q) && tail.starts_with(q) {
                head = &head[..head.len() - 1];
                tail = &tail[1..];
            }
        }
        out.push_str(head);
        out.push_str(HIDDEN_PATH);
        rest = tail;
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// True when a path in a message stops at the start of `s`.
fn ends_path(s: &str) -> bool {
    s.starts_with(|c: char| c.is_whitespace() || matches!(c, '\'' | '"' | ',' | ')' | ']'))
        || s.starts_with(": ")
        || s == ":"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_text_is_borrowed() {
        for s in [
            "",
            "plain text",
            "caf\u{e9} \u{65e5}\u{672c}",
            "tab\tand\nline",
        ] {
            assert!(matches!(neutralize(s), Cow::Borrowed(_)), "{s:?}");
        }
        assert!(matches!(one_line("one line"), Cow::Borrowed(_)));
    }

    #[test]
    fn controls_become_visible() {
        assert_eq!(
            neutralize("a\u{1b}[31mred\u{1b}[0m\r\u{7}"),
            "a\\x1b[31mred\\x1b[0m\\x0d\\x07"
        );
        assert_eq!(neutralize("x\u{7f}\u{9b}2J"), "x\\x7f\\u{9b}2J");
        assert_eq!(
            neutralize("evil\u{202e}txt.exe \u{2066}x\u{2069}"),
            "evil\\u{202e}txt.exe \\u{2066}x\\u{2069}"
        );
        assert_eq!(neutralize("keep\tthe\nlines"), "keep\tthe\nlines");
        assert_eq!(one_line("a\nb\tc\u{0}"), "a b c\\x00");
        // Neighbours of the ranges stay.
        assert_eq!(
            neutralize("\u{a0}\u{2029}\u{202f}\u{2065}\u{206a}"),
            "\u{a0}\u{2029}\u{202f}\u{2065}\u{206a}"
        );
    }

    #[test]
    fn server_paths_are_hidden() {
        let root = Path::new("/var/lib/walt");
        assert_eq!(
            hide_paths(
                "opening blob sha256:ab at '/var/lib/walt/blobs/sha256/ab': Permission denied",
                root
            ),
            "opening blob sha256:ab at <server path>: Permission denied"
        );
        assert_eq!(
            hide_paths(
                "listing /var/lib/walt/layers/x: gone, and /var/lib/walt/tmp/s-1 too",
                root
            ),
            "listing <server path>: gone, and <server path> too"
        );
        assert_eq!(
            hide_paths("in /var/lib/walt", Path::new("/var/lib/walt/")),
            "in <server path>"
        );
        assert_eq!(
            hide_paths("\"/var/lib/walt/x\" and \"/var/lib/walt/a b\"", root),
            "<server path> and \"<server path> b\""
        );
        // Another directory that merely starts the same way stays.
        assert_eq!(hide_paths("/var/lib/walt2/x", root), "/var/lib/walt2/x");
        assert!(matches!(hide_paths("nothing here", root), Cow::Borrowed(_)));
    }
}
