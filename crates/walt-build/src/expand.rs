//! Docker's variable expansion ("Environment replacement" of the Dockerfile
//! reference), as buildkit's shell lexer does it.
//!
//! A word is read once: quotes are removed (`'…'` literal, `"…"` with `$`
//! expansion and the escapes `\"`, `\$`, `\\`), the escape character (`\`, or
//! the one of the `# escape=` directive) takes the next character literally,
//! and `$NAME`, `${NAME}`, `${NAME:-w}`, `${NAME-w}`, `${NAME:+w}`,
//! `${NAME+w}`, `${NAME:?w}`, `${NAME?w}` are replaced, as well as buildkit's
//! patterns `${NAME#p}`, `${NAME##p}`, `${NAME%p}`, `${NAME%%p}`,
//! `${NAME/p/r}`, `${NAME//p/r}` (`*`, `?`; not in the classic builder). No
//! word splitting, no globbing, no command substitution. An unset variable
//! expands to nothing.
//!
//! Which instructions expand: ADD COPY ENV EXPOSE FROM LABEL STOPSIGNAL USER
//! VOLUME WORKDIR, and ARG defaults and ONBUILD triggers when they run; never
//! RUN, CMD, ENTRYPOINT, SHELL, HEALTHCHECK (the shell does it at run time).

/// Bound on the length of an expanded word (a hostile `ENV` chain doubling a
/// variable at each line would otherwise grow without limit).
pub const MAX_EXPANDED_LEN: usize = 1 << 20;

/// Longest value a `${V#p}` or `${V%p}` works on (linear in value × pattern).
pub const MAX_PATTERN_VALUE: usize = 4096;
/// Longest value a `${V/p/r}` works on (quadratic).
pub const MAX_REPLACE_VALUE: usize = 1024;
/// Longest pattern of a substitution.
pub const MAX_PATTERN: usize = 128;

/// Why a word could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("missing '}}' in '{0}'")]
    MissingBrace(String),
    #[error("unterminated quote in '{0}'")]
    UnterminatedQuote(String),
    #[error("bad substitution in '{0}'")]
    BadSubstitution(String),
    #[error("unsupported modifier '{modifier}' in substitution '{word}'")]
    UnsupportedModifier { modifier: char, word: String },
    #[error("{name}: {message}")]
    Required { name: String, message: String },
    #[error("expanded value of '{0}' is too long (over 1 MiB)")]
    TooLong(String),
    #[error("invalid pattern in '{word}': {reason}")]
    BadPattern { word: String, reason: String },
    #[error("value of '{0}' is too long for a pattern substitution")]
    PatternValueTooLong(String),
}

/// Where variables are looked up: `None` is unset (different from empty).
pub trait Lookup {
    fn get(&self, name: &str) -> Option<&str>;
}

impl Lookup for std::collections::BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<&str> {
        std::collections::BTreeMap::get(self, name).map(String::as_str)
    }
}

impl Lookup for [(String, String)] {
    fn get(&self, name: &str) -> Option<&str> {
        // Last definition wins.
        self.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Expands one word with `escape` as the escape character.
pub fn expand(word: &str, escape: char, vars: &dyn Lookup) -> Result<String, ExpandError> {
    let chars: Vec<char> = word.chars().collect();
    let mut lx = Lexer {
        chars: &chars,
        pos: 0,
        escape,
        vars,
        word,
    };
    let out = lx.until(None)?;
    Ok(out)
}

struct Lexer<'a> {
    chars: &'a [char],
    pos: usize,
    escape: char,
    vars: &'a dyn Lookup,
    word: &'a str,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn push(&self, out: &mut String, s: &str) -> Result<(), ExpandError> {
        if out.len() + s.len() > MAX_EXPANDED_LEN {
            return Err(ExpandError::TooLong(self.word.to_string()));
        }
        out.push_str(s);
        Ok(())
    }

    /// Reads until `stop` (consumed) or the end of the word.
    fn until(&mut self, stop: Option<char>) -> Result<String, ExpandError> {
        self.until_raw(stop, false)
    }

    /// As [`Self::until`]; `raw` keeps escape characters (patterns).
    fn until_raw(&mut self, stop: Option<char>, raw: bool) -> Result<String, ExpandError> {
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                if stop.is_some() {
                    return Err(ExpandError::MissingBrace(self.word.to_string()));
                }
                return Ok(out);
            };
            if Some(c) == stop {
                self.pos += 1;
                return Ok(out);
            }
            match c {
                '\'' => {
                    self.pos += 1;
                    let s = self.single_quoted()?;
                    self.push(&mut out, &s)?;
                }
                '"' => {
                    self.pos += 1;
                    let s = self.double_quoted()?;
                    self.push(&mut out, &s)?;
                }
                '$' => {
                    self.pos += 1;
                    let s = self.dollar()?;
                    self.push(&mut out, &s)?;
                }
                c if c == self.escape => {
                    self.pos += 1;
                    if raw {
                        out.push(c);
                    }
                    // A trailing escape is dropped.
                    if let Some(n) = self.next() {
                        let mut b = [0u8; 4];
                        self.push(&mut out, n.encode_utf8(&mut b))?;
                    }
                }
                c => {
                    self.pos += 1;
                    let mut b = [0u8; 4];
                    self.push(&mut out, c.encode_utf8(&mut b))?;
                }
            }
        }
    }

    fn single_quoted(&mut self) -> Result<String, ExpandError> {
        let mut out = String::new();
        loop {
            match self.next() {
                None => return Err(ExpandError::UnterminatedQuote(self.word.to_string())),
                Some('\'') => return Ok(out),
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quoted(&mut self) -> Result<String, ExpandError> {
        let mut out = String::new();
        loop {
            match self.next() {
                None => return Err(ExpandError::UnterminatedQuote(self.word.to_string())),
                Some('"') => return Ok(out),
                Some('$') => {
                    let s = self.dollar()?;
                    self.push(&mut out, &s)?;
                }
                Some(c) if c == self.escape => match self.peek() {
                    None => {}
                    Some(n) if n == '"' || n == '$' || n == self.escape => {
                        self.pos += 1;
                        out.push(n);
                    }
                    Some(_) => out.push(c),
                },
                Some(c) => out.push(c),
            }
        }
    }

    /// A name: letters, digits and `_`; a leading digit run or one special
    /// parameter character stands alone (as in the shell).
    fn name(&mut self) -> String {
        let mut name = String::new();
        if let Some(c) = self.peek() {
            if c.is_ascii_digit() {
                while let Some(d) = self.peek().filter(char::is_ascii_digit) {
                    name.push(d);
                    self.pos += 1;
                }
                return name;
            }
            if "@*#?-$!0".contains(c) {
                self.pos += 1;
                name.push(c);
                return name;
            }
        }
        while let Some(c) = self.peek() {
            if c.is_alphanumeric() || c == '_' {
                name.push(c);
                self.pos += 1;
            } else {
                break;
            }
        }
        name
    }

    fn dollar(&mut self) -> Result<String, ExpandError> {
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".to_string());
            }
            return Ok(self.vars.get(&name).unwrap_or("").to_string());
        }
        self.pos += 1;
        let name = self.name();
        if name.is_empty() {
            return Err(ExpandError::BadSubstitution(self.word.to_string()));
        }
        let value = self.vars.get(&name).map(str::to_string);
        match self.next() {
            None => Err(ExpandError::MissingBrace(self.word.to_string())),
            Some('}') => Ok(value.unwrap_or_default()),
            Some(':') => {
                let m = self
                    .next()
                    .ok_or_else(|| ExpandError::MissingBrace(self.word.to_string()))?;
                if !matches!(m, '-' | '+' | '?' | '#' | '%') {
                    return Err(ExpandError::UnsupportedModifier {
                        modifier: m,
                        word: self.word.to_string(),
                    });
                }
                let w = self.until_raw(Some('}'), matches!(m, '#' | '%'))?;
                let set = value.as_deref().is_some_and(|v| !v.is_empty());
                self.apply(m, &name, value, set, w)
            }
            Some(m @ ('-' | '+' | '?' | '#' | '%')) => {
                let w = self.until_raw(Some('}'), matches!(m, '#' | '%'))?;
                let set = value.is_some();
                self.apply(m, &name, value, set, w)
            }
            Some('/') => {
                let all = self.peek() == Some('/');
                if all {
                    self.pos += 1;
                }
                let pat = self.until_raw(Some('/'), true)?;
                let rep = self.until_raw(Some('}'), true)?;
                let value = value.unwrap_or_default();
                let pat = Pattern::parse(&pat).map_err(|e| self.bad_pattern(e))?;
                self.check_pattern_len(&name, &value, MAX_REPLACE_VALUE)?;
                Ok(pat.replace(&value, &rep, all))
            }
            Some(m) => Err(ExpandError::UnsupportedModifier {
                modifier: m,
                word: self.word.to_string(),
            }),
        }
    }

    fn bad_pattern(&self, reason: String) -> ExpandError {
        ExpandError::BadPattern {
            word: self.word.to_string(),
            reason,
        }
    }

    fn check_pattern_len(&self, name: &str, value: &str, max: usize) -> Result<(), ExpandError> {
        if value.chars().count() > max {
            return Err(ExpandError::PatternValueTooLong(name.to_string()));
        }
        Ok(())
    }

    fn apply(
        &self,
        m: char,
        name: &str,
        value: Option<String>,
        set: bool,
        word: String,
    ) -> Result<String, ExpandError> {
        if matches!(m, '#' | '%') {
            let value = value.unwrap_or_default();
            let (greedy, w) = match word.strip_prefix(m) {
                Some(w) => (true, w),
                None => (false, word.as_str()),
            };
            let pat = Pattern::parse(w).map_err(|e| self.bad_pattern(e))?;
            self.check_pattern_len(name, &value, MAX_PATTERN_VALUE)?;
            return Ok(if m == '#' {
                pat.trim_prefix(&value, greedy)
            } else {
                pat.trim_suffix(&value, greedy)
            });
        }
        Ok(match m {
            '-' if set => value.unwrap_or_default(),
            '-' => word,
            '+' if set => word,
            '+' => String::new(),
            _ if set => value.unwrap_or_default(),
            _ => {
                return Err(ExpandError::Required {
                    name: name.to_string(),
                    message: if !word.is_empty() {
                        word
                    } else if value.is_some() {
                        "is not allowed to be empty".to_string()
                    } else {
                        "is not allowed to be unset".to_string()
                    },
                });
            }
        })
    }
}

/// A shell pattern of `${V#p}` & co: `*`, `?`, `\*`, `\?`, `\\`, no brackets
/// (as buildkit).
#[derive(Debug, Clone)]
struct Pattern(Vec<Tok>);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tok {
    Star,
    Any,
    Lit(char),
}

impl Pattern {
    fn parse(p: &str) -> Result<Self, String> {
        if p.chars().count() > MAX_PATTERN {
            return Err(format!("longer than {MAX_PATTERN} characters"));
        }
        let mut out = Vec::new();
        let mut it = p.chars().peekable();
        while let Some(c) = it.next() {
            match c {
                '*' => out.push(Tok::Star),
                '?' => out.push(Tok::Any),
                '\\' => match it.peek() {
                    // `\}` and `\/` escape the ${} syntax, not the pattern.
                    Some('}' | '/') => {}
                    Some(&n @ ('*' | '?' | '\\')) => {
                        it.next();
                        out.push(Tok::Lit(n));
                    }
                    Some(&n) => return Err(format!("invalid escape '\\{n}'")),
                    None => return Err("invalid escape at the end".into()),
                },
                c => out.push(Tok::Lit(c)),
            }
        }
        Ok(Pattern(out))
    }

    /// For each `i` in `0..=s.len()`, whether the pattern matches `s[..i]`
    /// (an NFA over the pattern positions: O(len * pattern)). Stops early
    /// when no position is alive.
    fn match_ends(p: &[Tok], s: &[char]) -> Vec<bool> {
        let m = p.len();
        let close = |set: &mut Vec<bool>| {
            // A star may match nothing.
            for i in 0..m {
                if set[i] && p[i] == Tok::Star {
                    set[i + 1] = true;
                }
            }
        };
        let mut out = vec![false; s.len() + 1];
        let mut cur = vec![false; m + 1];
        cur[0] = true;
        close(&mut cur);
        out[0] = cur[m];
        for (i, ch) in s.iter().enumerate() {
            let mut next = vec![false; m + 1];
            for j in 0..m {
                if !cur[j] {
                    continue;
                }
                match p[j] {
                    Tok::Star => next[j] = true,
                    Tok::Any => next[j + 1] = true,
                    Tok::Lit(c) if c == *ch => next[j + 1] = true,
                    Tok::Lit(_) => {}
                }
            }
            close(&mut next);
            out[i + 1] = next[m];
            if !next.iter().any(|v| *v) {
                break;
            }
            cur = next;
        }
        out
    }

    fn trim_prefix(&self, v: &str, greedy: bool) -> String {
        let c: Vec<char> = v.chars().collect();
        let ends = Self::match_ends(&self.0, &c);
        let found = if greedy {
            ends.iter().rposition(|&e| e)
        } else {
            ends.iter().position(|&e| e)
        };
        match found {
            Some(end) => c[end..].iter().collect(),
            None => v.to_string(),
        }
    }

    fn trim_suffix(&self, v: &str, greedy: bool) -> String {
        let mut c: Vec<char> = v.chars().collect();
        c.reverse();
        let mut p = self.0.clone();
        p.reverse();
        let ends = Self::match_ends(&p, &c);
        let found = if greedy {
            ends.iter().rposition(|&e| e)
        } else {
            ends.iter().position(|&e| e)
        };
        match found {
            Some(len) => c[len..].iter().rev().collect(),
            None => v.to_string(),
        }
    }

    /// The longest match starting at `start`, if any: its end.
    fn match_at(&self, c: &[char], start: usize) -> Option<usize> {
        Self::match_ends(&self.0, &c[start..])
            .iter()
            .rposition(|&e| e)
            .map(|l| start + l)
    }

    fn replace(&self, v: &str, rep: &str, all: bool) -> String {
        let c: Vec<char> = v.chars().collect();
        let mut out = String::new();
        let mut i = 0;
        let mut replaced = false;
        let mut prev_end = None;
        while i <= c.len() {
            let m = if replaced && !all {
                None
            } else {
                // No empty match right after a match (as Go's regexp).
                self.match_at(&c, i)
                    .filter(|&end| !(end == i && prev_end == Some(i)))
            };
            if let Some(end) = m {
                prev_end = Some(end);
            }
            match m {
                Some(end) => {
                    out.push_str(rep);
                    replaced = true;
                    if end > i {
                        i = end;
                        continue;
                    }
                    if let Some(ch) = c.get(i) {
                        out.push(*ch);
                    }
                    i += 1;
                }
                None => {
                    if let Some(ch) = c.get(i) {
                        out.push(*ch);
                    }
                    i += 1;
                }
            }
        }
        out
    }
}

/// Removes quotes and escapes without expanding anything (the `$` stays).
pub fn unquote(word: &str, escape: char) -> Result<String, ExpandError> {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '\'' | '"' => {
                let q = c;
                loop {
                    let Some(&n) = chars.get(i) else {
                        return Err(ExpandError::UnterminatedQuote(word.to_string()));
                    };
                    i += 1;
                    if n == q {
                        break;
                    }
                    if q == '"'
                        && n == escape
                        && let Some(&e) = chars
                            .get(i)
                            .filter(|e| matches!(e, '"' | '$') || **e == escape)
                    {
                        out.push(e);
                        i += 1;
                        continue;
                    }
                    out.push(n);
                }
            }
            c if c == escape => {
                if let Some(&n) = chars.get(i) {
                    out.push(n);
                    i += 1;
                }
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn vars() -> BTreeMap<String, String> {
        [
            ("V", "val"),
            ("E", ""),
            ("S", "a b"),
            ("U_1", "u"),
            ("P", "/usr/local/bin/app.tar.gz"),
            ("W", "a*b*c"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn table() {
        let v = vars();
        let cases: &[(&str, &str)] = &[
            ("$V", "val"),
            ("${V}", "val"),
            ("x${V}y", "xvaly"),
            ("$Vx", ""),
            ("$V-x", "val-x"),
            ("$U_1/", "u/"),
            ("$NOPE", ""),
            ("${NOPE}", ""),
            ("${V:-d}", "val"),
            ("${E:-d}", "d"),
            ("${NOPE:-d}", "d"),
            ("${V-d}", "val"),
            ("${E-d}", ""),
            ("${NOPE-d}", "d"),
            ("${V:+alt}", "alt"),
            ("${E:+alt}", ""),
            ("${NOPE:+alt}", ""),
            ("${V+alt}", "alt"),
            ("${E+alt}", "alt"),
            ("${NOPE+alt}", ""),
            ("${NOPE:-$V}", "val"),
            ("${NOPE:-${E:-deep}}", "deep"),
            ("${NOPE:-'a}b'}", "a}b"),
            ("\\$V", "$V"),
            ("\\${V}", "${V}"),
            ("'$V'", "$V"),
            ("\"$V\"", "val"),
            ("\"\\$V\"", "$V"),
            ("\"a\\nb\"", "a\\nb"),
            ("\"a\\\\b\"", "a\\b"),
            ("a\\ b", "a b"),
            ("$", "$"),
            ("a$", "a$"),
            ("$/", "$/"),
            ("$S", "a b"),
            ("\"$S\"", "a b"),
            ("$1", ""),
            ("trailing\\", "trailing"),
            ("${V:?oops}", "val"),
            ("${P#*/}", "usr/local/bin/app.tar.gz"),
            ("${P##*/}", "app.tar.gz"),
            ("${P%.*}", "/usr/local/bin/app.tar"),
            ("${P%%.*}", "/usr/local/bin/app"),
            ("${P#nomatch}", "/usr/local/bin/app.tar.gz"),
            ("${P#/usr}", "/local/bin/app.tar.gz"),
            ("${P%?z}", "/usr/local/bin/app.tar."),
            ("${P/local/LOCAL}", "/usr/LOCAL/bin/app.tar.gz"),
            ("${P//\\//:}", ":usr:local:bin:app.tar.gz"),
            ("${P/\\//}", "usr/local/bin/app.tar.gz"),
            ("${P//a/}", "/usr/locl/bin/pp.tr.gz"),
            ("${P/*bin/X}", "X/app.tar.gz"),
            ("${W#*\\*}", "b*c"),
            ("${W##*\\*}", "c"),
            ("${W%\\**}", "a*b"),
            ("${NOPE#x}", ""),
            ("${NOPE/x/y}", ""),
            ("${V//*/X}", "X"),
            ("${V:#v}", "al"),
        ];
        for (word, want) in cases {
            assert_eq!(expand(word, '\\', &v).as_deref(), Ok(*want), "{word}");
        }
    }

    #[test]
    fn backtick_escape() {
        let v = vars();
        assert_eq!(expand("`$V", '`', &v).unwrap(), "$V");
        assert_eq!(expand("a\\b", '`', &v).unwrap(), "a\\b");
        assert_eq!(expand("\"`\"\"", '`', &v).unwrap(), "\"");
    }

    #[test]
    fn errors() {
        let v = vars();
        assert!(matches!(
            expand("${V", '\\', &v),
            Err(ExpandError::MissingBrace(_))
        ));
        assert!(matches!(
            expand("${V:-x", '\\', &v),
            Err(ExpandError::MissingBrace(_))
        ));
        assert!(matches!(
            expand("${}", '\\', &v),
            Err(ExpandError::BadSubstitution(_))
        ));
        assert!(matches!(
            expand("'abc", '\\', &v),
            Err(ExpandError::UnterminatedQuote(_))
        ));
        assert!(matches!(
            expand("\"abc", '\\', &v),
            Err(ExpandError::UnterminatedQuote(_))
        ));
        assert!(matches!(
            expand("${V:=x}", '\\', &v),
            Err(ExpandError::UnsupportedModifier { modifier: '=', .. })
        ));
        assert_eq!(
            expand("${NOPE:?must be set}", '\\', &v)
                .unwrap_err()
                .to_string(),
            "NOPE: must be set"
        );
        assert!(expand("${E?x}", '\\', &v).is_ok());
        assert_eq!(
            expand("${E:?}", '\\', &v).unwrap_err().to_string(),
            "E: is not allowed to be empty"
        );
        assert_eq!(
            expand("${NOPE?}", '\\', &v).unwrap_err().to_string(),
            "NOPE: is not allowed to be unset"
        );
        assert!(matches!(
            expand("${V#\\a}", '\\', &v),
            Err(ExpandError::BadPattern { .. })
        ));
        assert!(matches!(
            expand("${V/a}", '\\', &v),
            Err(ExpandError::MissingBrace(_))
        ));
        let mut big = BTreeMap::new();
        big.insert("B".to_string(), "x".repeat(MAX_PATTERN_VALUE + 1));
        assert!(matches!(
            expand("${B#x}", '\\', &big),
            Err(ExpandError::PatternValueTooLong(_))
        ));
        big.insert("R".to_string(), "x".repeat(MAX_REPLACE_VALUE + 1));
        assert!(matches!(
            expand("${R/x/y}", '\\', &big),
            Err(ExpandError::PatternValueTooLong(_))
        ));
        let long = format!("${{V#{}}}", "?".repeat(MAX_PATTERN + 1));
        assert!(matches!(
            expand(&long, '\\', &big),
            Err(ExpandError::BadPattern { .. })
        ));
        // The largest allowed cases stay fast (no backtracking blow-up).
        big.insert("L".to_string(), "a".repeat(MAX_PATTERN_VALUE));
        big.insert("M".to_string(), "a".repeat(MAX_REPLACE_VALUE));
        let star = "*a".repeat(MAX_PATTERN / 2 - 1) + "b";
        assert_eq!(
            expand(&format!("${{L#{star}}}"), '\\', &big).unwrap().len(),
            MAX_PATTERN_VALUE
        );
        assert_eq!(
            expand(&format!("${{M//{star}/x}}"), '\\', &big)
                .unwrap()
                .len(),
            MAX_REPLACE_VALUE
        );
        assert!(expand("${E:?x}", '\\', &v).is_err());
    }

    #[test]
    fn bounded() {
        let mut v = BTreeMap::new();
        v.insert("B".to_string(), "x".repeat(MAX_EXPANDED_LEN / 2 + 1));
        assert!(matches!(
            expand("$B$B", '\\', &v),
            Err(ExpandError::TooLong(_))
        ));
    }

    #[test]
    fn unquote_keeps_dollars() {
        assert_eq!(unquote("\"a b\" '$x' \\$y", '\\').unwrap(), "a b $x $y");
        assert!(unquote("'a", '\\').is_err());
    }
}
