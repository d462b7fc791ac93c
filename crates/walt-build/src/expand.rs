//! Docker's variable expansion ("Environment replacement" of the Dockerfile
//! reference), as buildkit's shell lexer does it.
//!
//! A word is read once: quotes are removed (`'…'` literal, `"…"` with `$`
//! expansion and the escapes `\"`, `\$`, `\\`), the escape character (`\`, or
//! the one of the `# escape=` directive) takes the next character literally,
//! and `$NAME`, `${NAME}`, `${NAME:-w}`, `${NAME-w}`, `${NAME:+w}`,
//! `${NAME+w}`, `${NAME:?w}`, `${NAME?w}` are replaced. No word splitting, no
//! globbing, no command substitution. An unset variable expands to nothing.
//!
//! Which instructions expand: ADD COPY ENV EXPOSE FROM LABEL STOPSIGNAL USER
//! VOLUME WORKDIR, and ARG defaults and ONBUILD triggers when they run; never
//! RUN, CMD, ENTRYPOINT, SHELL, HEALTHCHECK (the shell does it at run time).

/// Bound on the length of an expanded word (a hostile `ENV` chain doubling a
/// variable at each line would otherwise grow without limit).
pub const MAX_EXPANDED_LEN: usize = 1 << 20;

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
                if !matches!(m, '-' | '+' | '?') {
                    return Err(ExpandError::UnsupportedModifier {
                        modifier: m,
                        word: self.word.to_string(),
                    });
                }
                let w = self.until(Some('}'))?;
                let set = value.as_deref().is_some_and(|v| !v.is_empty());
                self.apply(m, &name, value, set, w)
            }
            Some(m @ ('-' | '+' | '?')) => {
                let w = self.until(Some('}'))?;
                let set = value.is_some();
                self.apply(m, &name, value, set, w)
            }
            Some(m) => Err(ExpandError::UnsupportedModifier {
                modifier: m,
                word: self.word.to_string(),
            }),
        }
    }

    fn apply(
        &self,
        m: char,
        name: &str,
        value: Option<String>,
        set: bool,
        word: String,
    ) -> Result<String, ExpandError> {
        Ok(match m {
            '-' if set => value.unwrap_or_default(),
            '-' => word,
            '+' if set => word,
            '+' => String::new(),
            _ if set => value.unwrap_or_default(),
            _ => {
                return Err(ExpandError::Required {
                    name: name.to_string(),
                    message: if word.is_empty() {
                        "is not allowed to be unset".to_string()
                    } else {
                        word
                    },
                });
            }
        })
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
        [("V", "val"), ("E", ""), ("S", "a b"), ("U_1", "u")]
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
