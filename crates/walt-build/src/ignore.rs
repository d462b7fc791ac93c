//! `.dockerignore` patterns, read and matched as Docker does
//! (moby/patternmatcher and buildkit's dockerignore reader).
//!
//! - one pattern a line; a line whose first character is `#` is a comment;
//!   blank lines are skipped; leading and trailing whitespace is trimmed;
//! - `!` makes the pattern an exception (what it matches is sent again);
//!   the last pattern that matches a path decides;
//! - patterns are cleaned as Go's `filepath.Clean` (`./a` is `a`, `a/../b`
//!   is `b`) and a leading `/` is dropped: they are relative to the context;
//! - `*` is any sequence of non-`/` characters, `?` one non-`/` character,
//!   `[...]` a class (`[^...]` negated, ranges `a-z`), `\` escapes the next
//!   character, `**` any number of directories (`**/a`, `a/**`, `a/**/b`);
//! - a pattern also matches every path below what it matches: `tmp`
//!   excludes `tmp/x/y`;
//! - Dockerfile and `.dockerignore` are sent whatever the patterns say
//!   ([`Matcher::keep`]).

use thiserror::Error;

/// The longest `.dockerignore` read, and the most patterns kept: a bound,
/// not something a real context reaches.
pub const MAX_IGNORE_SIZE: usize = 1 << 20;
pub const MAX_PATTERNS: usize = 10_000;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IgnoreError {
    #[error(".dockerignore line {line}: illegal exclusion pattern: \"!\"")]
    EmptyException { line: usize },
    #[error(".dockerignore line {line}: syntax error in pattern {pattern:?}: {why}")]
    Syntax {
        line: usize,
        pattern: String,
        why: &'static str,
    },
    #[error(".dockerignore is too large (more than {limit} bytes or {patterns} patterns)", limit = MAX_IGNORE_SIZE, patterns = MAX_PATTERNS)]
    TooLarge,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(u8),
    /// `*`: any run of non-`/` bytes.
    Star,
    /// `?`: one non-`/` byte.
    Quest,
    /// `[...]`: one non-`/` byte in (or, negated, not in) the ranges.
    Class {
        neg: bool,
        ranges: Vec<(u8, u8)>,
    },
    /// `**` followed by more: zero or more whole directories (`(.*/)?`).
    DStar,
    /// `**` at the end: anything (`.*`).
    DStarEnd,
}

/// One compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// The cleaned text (without `!`).
    text: String,
    exception: bool,
    toks: Vec<Tok>,
}

impl Pattern {
    /// Compiles one pattern line as the reader leaves it (trimmed, `!`
    /// and cleaning handled by [`Pattern::parse`]).
    fn compile(text: &str, exception: bool, line: usize) -> Result<Pattern, IgnoreError> {
        let b = text.as_bytes();
        let mut toks = Vec::with_capacity(b.len());
        let mut i = 0;
        let syntax = |why| IgnoreError::Syntax {
            line,
            pattern: text.to_string(),
            why,
        };
        while i < b.len() {
            let c = b[i];
            i += 1;
            match c {
                b'*' if b.get(i) == Some(&b'*') => {
                    i += 1;
                    if b.get(i) == Some(&b'/') {
                        i += 1;
                    }
                    toks.push(if i == b.len() {
                        Tok::DStarEnd
                    } else {
                        Tok::DStar
                    });
                }
                b'*' => toks.push(Tok::Star),
                b'?' => toks.push(Tok::Quest),
                b'\\' => match b.get(i) {
                    Some(&n) => {
                        toks.push(Tok::Lit(n));
                        i += 1;
                    }
                    None => return Err(syntax("trailing backslash")),
                },
                b'[' => {
                    let mut neg = false;
                    if b.get(i) == Some(&b'^') {
                        neg = true;
                        i += 1;
                    }
                    let mut ranges = Vec::new();
                    let mut closed = false;
                    let mut first = true;
                    while i < b.len() {
                        let mut lo = b[i];
                        i += 1;
                        if lo == b']' && !first {
                            closed = true;
                            break;
                        }
                        first = false;
                        if lo == b'\\' {
                            lo = *b.get(i).ok_or_else(|| syntax("unterminated class"))?;
                            i += 1;
                        }
                        let mut hi = lo;
                        if b.get(i) == Some(&b'-') && b.get(i + 1).is_some_and(|&n| n != b']') {
                            hi = b[i + 1];
                            i += 2;
                            if hi == b'\\' {
                                hi = *b.get(i).ok_or_else(|| syntax("unterminated class"))?;
                                i += 1;
                            }
                            if hi < lo {
                                return Err(syntax("invalid class range"));
                            }
                        }
                        ranges.push((lo, hi));
                    }
                    if !closed {
                        return Err(syntax("unterminated class"));
                    }
                    toks.push(Tok::Class { neg, ranges });
                }
                c => toks.push(Tok::Lit(c)),
            }
        }
        Ok(Pattern {
            text: text.to_string(),
            exception,
            toks,
        })
    }

    /// A pattern as written on a `.dockerignore` line (`!` included);
    /// None for comments and blank lines.
    pub fn parse(line_text: &str, line: usize) -> Result<Option<Pattern>, IgnoreError> {
        if line_text.starts_with('#') {
            return Ok(None);
        }
        let mut p = line_text.trim();
        if p.is_empty() {
            return Ok(None);
        }
        let exception = p.starts_with('!');
        if exception {
            p = p[1..].trim();
            if p.is_empty() {
                return Err(IgnoreError::EmptyException { line });
            }
        }
        let mut cleaned = clean(p);
        if cleaned.len() > 1 && cleaned.starts_with('/') {
            cleaned.remove(0);
        }
        Pattern::compile(&cleaned, exception, line).map(Some)
    }

    /// A Go `filepath.Match` pattern for one path component, as COPY and
    /// ADD sources use them (`**` is the same as `*` there).
    pub fn component(text: &str) -> Result<Pattern, IgnoreError> {
        let mut p = Pattern::compile(text, false, 0)?;
        for t in &mut p.toks {
            if matches!(t, Tok::DStar | Tok::DStarEnd) {
                *t = Tok::Star;
            }
        }
        Ok(p)
    }

    /// Whether `text` holds a wildcard (`*`, `?`, `[`) or an escape.
    pub fn has_meta(text: &str) -> bool {
        text.contains(['*', '?', '[', '\\'])
    }

    pub fn is_exception(&self) -> bool {
        self.exception
    }

    /// The cleaned pattern, without `!`.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether the pattern matches `path` itself (slash-separated,
    /// relative, no `.` or `..`).
    pub fn matches(&self, path: &[u8]) -> bool {
        let mut seen = vec![false; (self.toks.len() + 1) * (path.len() + 1)];
        self.m(0, 0, path, &mut seen)
    }

    /// Whether the pattern matches `path` or one of its parents.
    pub fn matches_or_parent(&self, path: &[u8]) -> bool {
        if self.matches(path) {
            return true;
        }
        path.iter()
            .enumerate()
            .filter(|&(_, &c)| c == b'/')
            .any(|(i, _)| self.matches(&path[..i]))
    }

    /// Matches tokens from `ti` against `path` from `pi`; `seen` memoises
    /// failed states.
    fn m(&self, ti: usize, pi: usize, path: &[u8], seen: &mut [bool]) -> bool {
        let idx = ti * (path.len() + 1) + pi;
        if seen[idx] {
            return false;
        }
        let r = self.m_inner(ti, pi, path, seen);
        if !r {
            seen[idx] = true;
        }
        r
    }

    fn m_inner(&self, ti: usize, pi: usize, path: &[u8], seen: &mut [bool]) -> bool {
        let Some(t) = self.toks.get(ti) else {
            return pi == path.len();
        };
        match t {
            Tok::DStarEnd => true,
            Tok::DStar => {
                if self.m(ti + 1, pi, path, seen) {
                    return true;
                }
                (pi..path.len())
                    .filter(|&j| path[j] == b'/')
                    .any(|j| self.m(ti + 1, j + 1, path, seen))
            }
            Tok::Star => {
                let mut j = pi;
                loop {
                    if self.m(ti + 1, j, path, seen) {
                        return true;
                    }
                    if j == path.len() || path[j] == b'/' {
                        return false;
                    }
                    j += 1;
                }
            }
            Tok::Quest => pi < path.len() && path[pi] != b'/' && self.m(ti + 1, pi + 1, path, seen),
            Tok::Class { neg, ranges } => {
                pi < path.len()
                    && path[pi] != b'/'
                    && ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&path[pi])) != *neg
                    && self.m(ti + 1, pi + 1, path, seen)
            }
            Tok::Lit(c) => pi < path.len() && path[pi] == *c && self.m(ti + 1, pi + 1, path, seen),
        }
    }
}

/// Go's `filepath.Clean` on a slash-separated path.
pub fn clean(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            c => parts.push(c),
        }
    }
    let body = parts.join("/");
    match (rooted, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".to_string(),
        (false, false) => body,
    }
}

/// The patterns of a `.dockerignore`, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    patterns: Vec<Pattern>,
    has_exceptions: bool,
}

impl Matcher {
    /// Parses the text of a `.dockerignore` (a UTF-8 BOM is skipped).
    pub fn parse(text: &str) -> Result<Matcher, IgnoreError> {
        if text.len() > MAX_IGNORE_SIZE {
            return Err(IgnoreError::TooLarge);
        }
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut m = Matcher::default();
        for (n, l) in text.lines().enumerate() {
            if let Some(p) = Pattern::parse(l, n + 1)? {
                if m.patterns.len() == MAX_PATTERNS {
                    return Err(IgnoreError::TooLarge);
                }
                m.push(p);
            }
        }
        Ok(m)
    }

    fn push(&mut self, p: Pattern) {
        self.has_exceptions |= p.exception;
        self.patterns.push(p);
    }

    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Makes sure `path` (e.g. `Dockerfile`, `.dockerignore`) is sent
    /// whatever the patterns say, as the docker CLI does.
    pub fn keep(&mut self, path: &str) {
        let p = clean(path);
        if self.excludes(p.as_bytes()) {
            let mut pat = Pattern::compile("", true, 0).expect("empty pattern");
            pat.text = p.clone();
            pat.toks = p.bytes().map(Tok::Lit).collect();
            self.push(pat);
        }
    }

    /// Whether `path` (relative, slash-separated, cleaned) is left out of
    /// the context: the last pattern matching it or one of its parents
    /// decides.
    pub fn excludes(&self, path: &[u8]) -> bool {
        let mut out = false;
        for p in &self.patterns {
            if p.exception == out && p.matches_or_parent(path) {
                out = !p.exception;
            }
        }
        out
    }

    /// For an excluded directory: whether the walk must go in because an
    /// exception may bring back something below it. As docker (the CLI's
    /// archive walker and buildkit's fsutil): only when an exception's text
    /// starts with the directory's path (`!docs/keep` for `docs`); an
    /// exception such as `!**/*.rs` does not reach into an excluded
    /// directory.
    pub fn walk_excluded_dir(&self, dir: &[u8]) -> bool {
        self.has_exceptions
            && self.patterns.iter().any(|p| {
                let t = p.text.as_bytes();
                p.exception && t.len() > dir.len() && t.starts_with(dir) && t[dir.len()] == b'/'
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(text: &str) -> Matcher {
        Matcher::parse(text).unwrap()
    }

    #[test]
    fn clean_as_go() {
        for (i, o) in [
            ("a", "a"),
            ("./a", "a"),
            ("a/../b", "b"),
            ("/a", "/a"),
            ("a//b/", "a/b"),
            ("..", ".."),
            ("../a", "../a"),
            ("/../a", "/a"),
            ("a/..", "."),
            ("", "."),
            ("a/b/../../..", ".."),
        ] {
            assert_eq!(clean(i), o, "{i}");
        }
    }

    #[test]
    fn reader() {
        let x = m("# comment\n\n  foo  \n !bar\n/abs\n./dot/x\na/../b\n #notcomment\n");
        let t: Vec<(bool, &str)> = x
            .patterns()
            .iter()
            .map(|p| (p.is_exception(), p.text()))
            .collect();
        assert_eq!(
            t,
            [
                (false, "foo"),
                (true, "bar"),
                (false, "abs"),
                (false, "dot/x"),
                (false, "b"),
                (false, "#notcomment"),
            ]
        );
        assert_eq!(
            Matcher::parse("a\n!\n"),
            Err(IgnoreError::EmptyException { line: 2 })
        );
        assert!(matches!(
            Matcher::parse("[abc\n"),
            Err(IgnoreError::Syntax { line: 1, .. })
        ));
        assert!(m("\u{feff}x\n").excludes(b"x"));
        assert!(m("x\r\n").excludes(b"x"));
    }

    /// Pattern, path, whether the pattern matches the path itself.
    #[test]
    fn single_patterns() {
        let table: &[(&str, &str, bool)] = &[
            ("*", "a", true),
            ("*", "a/b", false),
            ("*/temp*", "somedir/temporary.txt", true),
            ("*/temp*", "somedir/subdir/temporary.txt", false),
            ("*/*/temp*", "somedir/subdir/temporary.txt", true),
            ("temp?", "temp1", true),
            ("temp?", "temp", false),
            ("temp?", "temp12", false),
            ("temp?", "tem/p", false),
            ("**/*.go", "a.go", true),
            ("**/*.go", "x/y/z/a.go", true),
            ("**/*.go", "x/y/z/a.gox", false),
            ("**", "anything/at/all", true),
            ("a/**", "a/b/c", true),
            ("a/**", "b/c", false),
            ("a/**/b", "a/b", true),
            ("a/**/b", "a/x/y/b", true),
            ("a/**/b", "a/xb", false),
            ("**/x", "x", true),
            ("**/x", "d/x", true),
            ("[a-c]x", "bx", true),
            ("[a-c]x", "dx", false),
            ("[^a-c]x", "dx", true),
            ("[^a-c]x", "ax", false),
            ("[^a]x", "/x", false),
            ("[]]", "]", true),
            ("[a\\-]", "-", true),
            ("\\*", "*", true),
            ("\\*", "a", false),
            ("a*b", "axxb", true),
            ("a*b", "ax/xb", false),
            ("*.md", "README.md", true),
            ("*.md", "docs/README.md", false),
            ("foo", "foo", true),
            ("foo", "foobar", false),
            (".git", ".git", true),
        ];
        for (pat, path, want) in table {
            let p = Pattern::parse(pat, 1).unwrap().unwrap();
            assert_eq!(p.matches(path.as_bytes()), *want, "{pat} vs {path}");
        }
    }

    /// The examples of Docker's documentation ("Build context",
    /// .dockerignore files), plus the rules on exceptions.
    #[test]
    fn docker_documented_examples() {
        let x = m("# comment\n*/temp*\n*/*/temp*\ntemp?\n");
        assert!(x.excludes(b"somedir/temporary.txt"));
        assert!(x.excludes(b"somedir/temp"));
        assert!(x.excludes(b"somedir/subdir/temporary.txt"));
        assert!(x.excludes(b"tempa"));
        assert!(x.excludes(b"tempb"));
        assert!(!x.excludes(b"temporary.txt"));
        assert!(!x.excludes(b"a/b/c/temp.txt"));

        let x = m("*.md\n!README.md\n");
        assert!(x.excludes(b"CHANGES.md"));
        assert!(!x.excludes(b"README.md"));
        assert!(!x.excludes(b"main.go"));

        // The last matching line wins.
        let x = m("*.md\n!README*.md\nREADME-secret.md\n");
        assert!(x.excludes(b"CHANGES.md"));
        assert!(!x.excludes(b"README.md"));
        assert!(!x.excludes(b"README-public.md"));
        assert!(x.excludes(b"README-secret.md"));
        let x = m("*.md\nREADME-secret.md\n!README*.md\n");
        assert!(!x.excludes(b"README-secret.md"));

        // A directory excludes its content (parent matching).
        let x = m("node_modules\n/build/\n");
        assert!(x.excludes(b"node_modules"));
        assert!(x.excludes(b"node_modules/a/b.js"));
        assert!(x.excludes(b"build/out/x.o"));
        assert!(!x.excludes(b"src/node_modules_x"));
        assert!(!x.excludes(b"src/node_modules/x"));

        // `**`: any number of directories.
        let x = m("**/*.go\n");
        assert!(x.excludes(b"main.go"));
        assert!(x.excludes(b"cmd/x/main.go"));
        assert!(!x.excludes(b"cmd/x/main.c"));

        // Exclude everything but some.
        let x = m("*\n!src\n!Dockerfile\n");
        assert!(x.excludes(b"secret"));
        assert!(!x.excludes(b"src"));
        assert!(!x.excludes(b"src/a/b.c"));
        assert!(!x.excludes(b"Dockerfile"));
    }

    #[test]
    fn excluded_dirs_with_exceptions_are_walked() {
        let x = m("docs\n!docs/keep.md\nlogs\n");
        assert!(x.excludes(b"docs"));
        assert!(x.walk_excluded_dir(b"docs"));
        assert!(x.excludes(b"docs/other.md"));
        assert!(!x.excludes(b"docs/keep.md"));
        assert!(!x.walk_excluded_dir(b"logs"));
        // Docker only walks into an excluded directory for an exception
        // written below it: `!**/*.rs` does not bring back `a/b/c.rs`.
        let x = m("*\n!**/*.rs\n");
        assert!(!x.walk_excluded_dir(b"a"));
        assert!(!x.excludes(b"c.rs"));
        let x = m("a\n!b/x\n");
        assert!(!x.walk_excluded_dir(b"a"));
        let x = m("a\n!a/**/*.go\n");
        assert!(x.walk_excluded_dir(b"a"));
        assert!(!x.walk_excluded_dir(b"a/b"));
        let x = m("a\n!ab/x\n");
        assert!(!x.walk_excluded_dir(b"a"));
    }

    #[test]
    fn kept_files() {
        let mut x = m("*\n");
        x.keep("Dockerfile");
        x.keep(".dockerignore");
        assert!(!x.excludes(b"Dockerfile"));
        assert!(!x.excludes(b".dockerignore"));
        assert!(x.excludes(b"other"));
        let mut x = m("x\n");
        x.keep("Dockerfile");
        assert_eq!(x.patterns().len(), 1);
    }

    #[test]
    fn long_paths_are_quick() {
        // Memoisation: this would take exponential time without it.
        let p = Pattern::parse("**/a*a*a*a*a*a*a*a*b", 1).unwrap().unwrap();
        let path = [b"a".repeat(30), b"/".to_vec(), b"a".repeat(3000)].concat();
        assert!(!p.matches(&path));
    }
}
