//! Shell-word expansion as BuildKit's `frontend/dockerfile/shell` lexer does it:
//! `$v ${v} ${v:-w} ${v-w} ${v:+w} ${v+w} ${v:?w} ${v?w}`, the pattern forms
//! `${v#p} ${v##p} ${v%p} ${v%%p} ${v/p/r} ${v//p/r}` (`*` and `?` wildcards),
//! single and double quotes, and escapes with the Dockerfile's escape character.

use std::collections::BTreeMap;

use crate::Error;

/// Where variable values come from.
pub trait EnvLookup {
    fn lookup(&self, key: &str) -> Option<String>;
}

impl EnvLookup for BTreeMap<String, String> {
    fn lookup(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

impl EnvLookup for [(String, String)] {
    fn lookup(&self, key: &str) -> Option<String> {
        self.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
}

impl EnvLookup for Vec<(String, String)> {
    fn lookup(&self, key: &str) -> Option<String> {
        self.as_slice().lookup(key)
    }
}

/// The word lexer. `Lex::new(escape)` gives BuildKit's default behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lex {
    escape: char,
    raw_quotes: bool,
    skip_unset_env: bool,
    skip_quotes: bool,
}

impl Lex {
    pub fn new(escape: char) -> Self {
        Lex {
            escape,
            raw_quotes: false,
            skip_unset_env: false,
            skip_quotes: false,
        }
    }

    /// Keep quote characters in the output (used for progress names).
    pub fn raw_quotes(mut self, on: bool) -> Self {
        self.raw_quotes = on;
        self
    }

    /// Leave references to unset variables as written instead of expanding them to "".
    pub fn skip_unset_env(mut self, on: bool) -> Self {
        self.skip_unset_env = on;
        self
    }

    /// Treat quotes as ordinary characters (heredoc bodies).
    pub fn skip_quotes(mut self, on: bool) -> Self {
        self.skip_quotes = on;
        self
    }

    /// Expands one word: quotes removed, escapes applied, variables substituted.
    pub fn process_word(
        &self,
        word: &str,
        env: &(impl EnvLookup + ?Sized),
    ) -> Result<String, Error> {
        let mut w = Word::new(self, word, env);
        let (out, _) = w.process_until(None, false)?;
        Ok(out)
    }

    /// Expands and splits into words on unquoted whitespace (EXPOSE and friends).
    pub fn process_words(
        &self,
        word: &str,
        env: &(impl EnvLookup + ?Sized),
    ) -> Result<Vec<String>, Error> {
        let mut w = Word::new(self, word, env);
        let (_, words) = w.process_until(None, true)?;
        Ok(words)
    }
}

struct Word<'a, E: EnvLookup + ?Sized> {
    lex: &'a Lex,
    chars: Vec<char>,
    pos: usize,
    env: &'a E,
    original: &'a str,
    /// Keep escape characters in the output (the words of `#`, `%` and `/`).
    raw_escapes: bool,
}

/// Accumulates words for `process_words`.
#[derive(Default)]
struct Words {
    words: Vec<String>,
    cur: String,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, c: char) {
        if c.is_whitespace() && self.in_word {
            self.words.push(std::mem::take(&mut self.cur));
            self.in_word = false;
        } else if !c.is_whitespace() {
            self.cur.push(c);
            self.in_word = true;
        }
    }
    fn add_raw(&mut self, s: &str) {
        self.cur.push_str(s);
        self.in_word = true;
    }
    fn add_str(&mut self, s: &str) {
        for c in s.chars() {
            self.add_char(c);
        }
    }
    fn finish(mut self) -> Vec<String> {
        if self.in_word {
            self.words.push(self.cur);
        }
        self.words
    }
}

impl<'a, E: EnvLookup + ?Sized> Word<'a, E> {
    fn new(lex: &'a Lex, word: &'a str, env: &'a E) -> Self {
        Word {
            lex,
            chars: word.chars().collect(),
            pos: 0,
            env,
            original: word,
            raw_escapes: false,
        }
    }

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

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Expand {
            word: self.original.to_string(),
            reason: reason.into(),
        }
    }

    /// Processes until `stop` (consumed) or the end.
    fn process_until(
        &mut self,
        stop: Option<char>,
        split: bool,
    ) -> Result<(String, Vec<String>), Error> {
        let mut out = String::new();
        let mut words = Words::default();
        loop {
            let Some(c) = self.peek() else {
                if let Some(s) = stop {
                    return Err(self.err(format!(
                        "unexpected end of statement while looking for matching {s}"
                    )));
                }
                break;
            };
            if Some(c) == stop {
                self.next();
                break;
            }
            match c {
                '\'' | '"' if self.lex.skip_quotes => {
                    self.next();
                    out.push(c);
                    words.add_char(c);
                }
                '\'' => {
                    let s = self.single_quote()?;
                    out.push_str(&s);
                    words.add_raw(&s);
                }
                '"' => {
                    let s = self.double_quote()?;
                    out.push_str(&s);
                    words.add_raw(&s);
                }
                '$' => {
                    let s = self.dollar()?;
                    out.push_str(&s);
                    words.add_str(&s);
                }
                _ if c == self.lex.escape => {
                    self.next();
                    if self.raw_escapes {
                        out.push(c);
                        words.add_raw(&c.to_string());
                    }
                    match self.next() {
                        None => {}
                        Some(n) => {
                            out.push(n);
                            words.add_raw(&n.to_string());
                        }
                    }
                }
                _ => {
                    self.next();
                    out.push(c);
                    words.add_char(c);
                }
            }
        }
        Ok((out, if split { words.finish() } else { Vec::new() }))
    }

    fn single_quote(&mut self) -> Result<String, Error> {
        self.next();
        let mut s = String::new();
        if self.lex.raw_quotes {
            s.push('\'');
        }
        loop {
            match self.next() {
                None => {
                    return Err(self.err(
                        "unexpected end of statement while looking for matching single-quote",
                    ));
                }
                Some('\'') => break,
                Some(c) => s.push(c),
            }
        }
        if self.lex.raw_quotes {
            s.push('\'');
        }
        Ok(s)
    }

    fn double_quote(&mut self) -> Result<String, Error> {
        self.next();
        let mut s = String::new();
        if self.lex.raw_quotes {
            s.push('"');
        }
        loop {
            match self.peek() {
                None => {
                    return Err(self.err(
                        "unexpected end of statement while looking for matching double-quote",
                    ));
                }
                Some('"') => {
                    self.next();
                    break;
                }
                Some('$') => {
                    let v = self.dollar()?;
                    s.push_str(&v);
                }
                Some(c) if c == self.lex.escape => {
                    self.next();
                    if self.raw_escapes {
                        s.push(c);
                    }
                    match self.peek() {
                        None => {}
                        Some(n) if n == '"' || n == '$' || n == self.lex.escape => {
                            self.next();
                            s.push(n);
                        }
                        Some(_) => s.push(c),
                    }
                }
                Some(c) => {
                    self.next();
                    s.push(c);
                }
            }
        }
        if self.lex.raw_quotes {
            s.push('"');
        }
        Ok(s)
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if name.is_empty() && c.is_ascii_digit() {
                while let Some(d) = self.peek().filter(|d| d.is_ascii_digit()) {
                    self.next();
                    name.push(d);
                }
                return name;
            }
            if name.is_empty() && matches!(c, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.next();
                return c.to_string();
            }
            if !(c.is_alphanumeric() || c == '_') {
                break;
            }
            self.next();
            name.push(c);
        }
        name
    }

    fn dollar(&mut self) -> Result<String, Error> {
        self.next(); // '$'
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".to_string());
            }
            return Ok(match self.env.lookup(&name) {
                Some(v) => v,
                None if self.lex.skip_unset_env => format!("${name}"),
                None => String::new(),
            });
        }
        self.next(); // '{'
        match self.peek() {
            None => return Err(self.err("syntax error: missing '}'")),
            Some('{' | '}' | ':') => return Err(self.err("syntax error: bad substitution")),
            Some(_) => {}
        }
        let name = self.name();
        // BuildKit's scanner reads the end of input as U+FFFD in messages.
        let ch = self.next().unwrap_or('\u{fffd}');
        match ch {
            '}' => {
                let value = self.env.lookup(&name);
                Ok(match value {
                    Some(v) => v,
                    None if self.lex.skip_unset_env => format!("${{{name}}}"),
                    None => String::new(),
                })
            }
            ':' | '+' | '-' | '?' | '#' | '%' => {
                let null_is_unset = ch == ':';
                let (op, modifier) = if null_is_unset {
                    let m = self.next().unwrap_or('\u{fffd}');
                    (m, format!(":{m}"))
                } else {
                    (ch, ch.to_string())
                };
                let raw = matches!(op, '#' | '%');
                if null_is_unset && raw {
                    return Err(
                        self.err(format!("unsupported modifier ({modifier}) in substitution"))
                    );
                }
                let word = self.stop_on('}', raw, "syntax error: missing '}'")?;
                let value = self.env.lookup(&name);
                if value.is_none() && self.lex.skip_unset_env {
                    return Ok(format!("${{{name}{modifier}{word}}}"));
                }
                let set = value.is_some();
                let value = value.unwrap_or_default();
                let empty = null_is_unset && value.is_empty();
                let message = |default: &str| {
                    let m = if word.is_empty() { default } else { &word };
                    self.err(format!("{name}: {m}"))
                };
                match op {
                    '-' => Ok(if !set || empty { word.clone() } else { value }),
                    '+' => Ok(if !set || empty {
                        String::new()
                    } else {
                        word.clone()
                    }),
                    '?' if !set => Err(message("is not allowed to be unset")),
                    '?' if empty => Err(message("is not allowed to be empty")),
                    '?' => Ok(value),
                    '#' | '%' => {
                        let (greedy, pattern) = match word.strip_prefix(op) {
                            Some(rest) => (true, rest.to_string()),
                            None => (false, word),
                        };
                        if op == '%' {
                            let reversed = reverse_pattern(&pattern);
                            let value: String = value.chars().rev().collect();
                            let trimmed = self.trim_prefix(&reversed, &value, greedy)?;
                            Ok(trimmed.chars().rev().collect())
                        } else {
                            self.trim_prefix(&pattern, &value, greedy)
                        }
                    }
                    _ => {
                        Err(self.err(format!("unsupported modifier ({modifier}) in substitution")))
                    }
                }
            }
            '/' => {
                let all = self.peek() == Some('/');
                if all {
                    self.next();
                }
                let pattern = self.stop_on('/', true, "syntax error: missing '/' in ${}")?;
                let replacement = self.stop_on('}', true, "syntax error: missing '}'")?;
                let value = self.env.lookup(&name);
                if value.is_none() && self.lex.skip_unset_env {
                    return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
                }
                let value = value.unwrap_or_default();
                let re = self.pattern_regex(&pattern, &pattern, true, false)?;
                if all {
                    // Go's ReplaceAllString expands `$name` in the replacement, as
                    // `regex` does.
                    Ok(re.replace_all(&value, replacement.as_str()).into_owned())
                } else {
                    Ok(re
                        .replace(&value, regex::NoExpand(&replacement))
                        .into_owned())
                }
            }
            _ => Err(self.err(format!("unsupported modifier ({ch}) in substitution"))),
        }
    }

    /// The word of a `${...}` form up to `stop`, escapes kept when `raw`; at the
    /// end of the input, `at_end` is the error.
    fn stop_on(&mut self, stop: char, raw: bool, at_end: &str) -> Result<String, Error> {
        let saved = self.raw_escapes;
        self.raw_escapes = raw;
        let r = self.process_until(Some(stop), false);
        self.raw_escapes = saved;
        match r {
            Ok((word, _)) => Ok(word),
            Err(_) if self.peek().is_none() => Err(self.err(at_end)),
            Err(e) => Err(e),
        }
    }

    /// `value` without its shortest (longest when `greedy`) prefix matching `pattern`.
    fn trim_prefix(&self, pattern: &str, value: &str, greedy: bool) -> Result<String, Error> {
        let re = self.pattern_regex(pattern, pattern, greedy, true)?;
        Ok(match re.find(value) {
            Some(m) => value[m.end()..].to_string(),
            None => value.to_string(),
        })
    }

    /// A shell pattern (`*`, `?`, escapes; no bracket expressions) as a regex, as
    /// BuildKit's `convertShellPatternToRegex` makes it.
    fn pattern_regex(
        &self,
        pattern: &str,
        shown: &str,
        greedy: bool,
        anchored: bool,
    ) -> Result<regex::Regex, Error> {
        let invalid =
            |why: String| self.err(format!("invalid pattern ({shown}) in substitution: {why}"));
        let mut out = String::with_capacity(pattern.len() + 4);
        if anchored {
            out.push('^');
        }
        let star = if greedy { ".*" } else { ".*?" };
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' => out.push_str(star),
                '?' => out.push('.'),
                '\\' => {
                    if matches!(chars.peek(), Some('}' | '/')) {
                        continue;
                    }
                    match chars.next() {
                        Some(n @ ('*' | '?' | '\\')) => {
                            out.push('\\');
                            out.push(n);
                        }
                        Some(n) => return Err(invalid(format!("invalid escape '\\{n}'"))),
                        None => return Err(invalid("invalid escape '\\'".to_string())),
                    }
                }
                _ => out.push_str(&regex::escape(&c.to_string())),
            }
        }
        regex::Regex::new(&out).map_err(|e| invalid(e.to_string()))
    }
}

/// Reverses a pattern keeping each escape before the character it escapes
/// (`a\*c` becomes `c\*a`), so a suffix can be found as a prefix.
fn reverse_pattern(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = vec![' '; chars.len()];
    let last = chars.len().saturating_sub(1);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let at = last - i;
        if c == '\\' && i != last {
            out[at - 1] = c;
            out[at] = chars[i + 1];
            i += 2;
        } else {
            out[at] = c;
            i += 1;
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        [
            ("A", "a"),
            ("B", "b c"),
            ("EMPTY", ""),
            ("X_1", "x1"),
            ("DIR", "/srv"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn render(r: Result<String, Error>) -> String {
        match r {
            Ok(s) => s,
            Err(e) => format!("ERR {e}"),
        }
    }

    #[test]
    fn process_word_table() {
        let lex = Lex::new('\\');
        let cases: &[(&str, &str)] = &[
            ("plain", "plain"),
            ("", ""),
            ("$A", "a"),
            ("${A}", "a"),
            ("x$A", "xa"),
            ("$A$A", "aa"),
            ("${A}x", "ax"),
            ("$Ax", ""),
            ("$X_1", "x1"),
            ("$UNSET", ""),
            ("${UNSET}", ""),
            ("$", "$"),
            ("a$", "a$"),
            ("$/x", "$/x"),
            ("$1", ""),
            ("${A:-d}", "a"),
            ("${UNSET:-d}", "d"),
            ("${EMPTY:-d}", "d"),
            ("${A-d}", "a"),
            ("${UNSET-d}", "d"),
            ("${EMPTY-d}", ""),
            ("${A:+r}", "r"),
            ("${UNSET:+r}", ""),
            ("${EMPTY:+r}", ""),
            ("${A+r}", "r"),
            ("${EMPTY+r}", "r"),
            ("${UNSET+r}", ""),
            ("${UNSET:-$A}", "a"),
            ("${UNSET:-${DIR}/x}", "/srv/x"),
            ("${UNSET:-a b}", "a b"),
            ("${A:?msg}", "a"),
            (
                "${UNSET:?need it}",
                "ERR failed to process \"${UNSET:?need it}\": UNSET: need it",
            ),
            (
                "${UNSET?}",
                "ERR failed to process \"${UNSET?}\": UNSET: is not allowed to be unset",
            ),
            ("${EMPTY?x}", ""),
            (
                "${A",
                "ERR failed to process \"${A\": unsupported modifier (\u{fffd}) in substitution",
            ),
            (
                "${",
                "ERR failed to process \"${\": syntax error: missing '}'",
            ),
            (
                "${A:-x",
                "ERR failed to process \"${A:-x\": syntax error: missing '}'",
            ),
            (
                "${}",
                "ERR failed to process \"${}\": syntax error: bad substitution",
            ),
            (
                "${:-x}",
                "ERR failed to process \"${:-x}\": syntax error: bad substitution",
            ),
            (
                "${A:x}",
                "ERR failed to process \"${A:x}\": unsupported modifier (:x) in substitution",
            ),
            (
                "${A:#x}",
                "ERR failed to process \"${A:#x}\": unsupported modifier (:#) in substitution",
            ),
            (
                "${EMPTY:?}",
                "ERR failed to process \"${EMPTY:?}\": EMPTY: is not allowed to be empty",
            ),
            ("${A%x}", "a"),
            ("'$A'", "$A"),
            ("'a b'", "a b"),
            ("\"$A\"", "a"),
            ("\"$B\"", "b c"),
            ("\"a'b\"", "a'b"),
            ("'a\"b'", "a\"b"),
            ("\\$A", "$A"),
            ("\\\\", "\\"),
            ("a\\ b", "a b"),
            ("\"\\$A\"", "$A"),
            ("\"\\\"\"", "\""),
            ("\"\\n\"", "\\n"),
            (
                "\"a",
                "ERR failed to process \"\\\"a\": unexpected end of statement while looking for matching double-quote",
            ),
            (
                "'a",
                "ERR failed to process \"'a\": unexpected end of statement while looking for matching single-quote",
            ),
            ("trailing\\", "trailing"),
            ("${DIR}/'${A}'", "/srv/${A}"),
            ("\u{e9}$A\u{e9}", "\u{e9}"),
            ("\u{e9}${A}\u{e9}", "\u{e9}a\u{e9}"),
        ];
        let mut failures = Vec::new();
        for (word, want) in cases {
            let got = render(lex.process_word(word, &env()));
            if &got != want {
                failures.push(format!("word {word:?}: want {want:?} got {got:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn pattern_forms() {
        let lex = Lex::new('\\');
        let env: Vec<(String, String)> = [
            ("P", "/usr/local/lib/x.tar.gz"),
            ("S", "aabbaa"),
            ("STARS", "k**v*"),
            ("Q", "?x?y"),
            ("RE", "a.b(c)|d"),
            ("EMPTY", ""),
            ("N", "b"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let cases: &[(&str, &str)] = &[
            ("${P#*/}", "usr/local/lib/x.tar.gz"),
            ("${P##*/}", "x.tar.gz"),
            ("${P%.*}", "/usr/local/lib/x.tar"),
            ("${P%%.*}", "/usr/local/lib/x"),
            ("${P%/*}", "/usr/local/lib"),
            ("${P#/usr}", "/local/lib/x.tar.gz"),
            ("${P#nomatch}", "/usr/local/lib/x.tar.gz"),
            ("${S#a}", "abbaa"),
            ("${S##a*}", ""),
            ("${S#?}", "abbaa"),
            ("${S#$N}", "aabbaa"),
            ("${S#*$N}", "baa"),
            ("${S%}", "aabbaa"),
            ("${S#}", "aabbaa"),
            ("${STARS%%\\**}", "k"),
            ("${STARS#k\\*}", "*v*"),
            ("${Q#\\?}", "x?y"),
            ("${RE#a.b(c)}", "|d"),
            ("${RE%|d}", "a.b(c)"),
            ("${UNSET#x}", ""),
            ("${EMPTY%%*}", ""),
            ("${S/b/X}", "aaXbaa"),
            ("${S//b/X}", "aaXXaa"),
            (
                "${S//a}",
                "ERR failed to process \"${S//a}\": syntax error: missing '/' in ${}",
            ),
            ("${S/a*/-}", "-"),
            ("${S//?a/-}", "-b-a"),
            ("${P//\\//:}", ":usr:local:lib:x.tar.gz"),
            ("${P/\\/usr/\\/opt}", "\\/opt/local/lib/x.tar.gz"),
            ("${S/$EMPTY/>}", ">aabbaa"),
            ("${S///}", "aabbaa"),
            ("${UNSET/a/b}", ""),
            ("${S/b/$N$N}", "aabbbaa"),
            (
                "${S#\\x}",
                "ERR failed to process \"${S#\\\\x}\": invalid pattern (\\x) in substitution: invalid escape '\\x'",
            ),
            ("x${S%a}y", "xaabbay"),
        ];
        let mut failures = Vec::new();
        for (word, want) in cases {
            let got = render(lex.process_word(word, &env));
            if &got != want {
                failures.push(format!("word {word:?}: want {want:?} got {got:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        let raw = Lex::new('\\').skip_unset_env(true);
        assert_eq!(
            render(raw.process_word("${NOPE#a*} ${NOPE//x/y}", &env)),
            "${NOPE#a*} ${NOPE/x/y}"
        );
    }

    #[test]
    fn escape_backtick_and_modes() {
        let env = env();
        let tick = Lex::new('`');
        assert_eq!(render(tick.process_word("`$A", &env)), "$A");
        assert_eq!(render(tick.process_word("C:\\dir\\$A", &env)), "C:\\dir\\a");
        assert_eq!(render(tick.process_word("\"``\"", &env)), "`");
        let heredoc = Lex::new('\\').skip_quotes(true);
        assert_eq!(
            render(heredoc.process_word("echo \"$A\" '$A' \\$A", &env)),
            "echo \"a\" 'a' $A"
        );
        let raw = Lex::new('\\').raw_quotes(true).skip_unset_env(true);
        assert_eq!(
            render(raw.process_word("echo \"$A $NOPE\" '${B}' ${NOPE}", &env)),
            "echo \"a $NOPE\" '${B}' ${NOPE}"
        );
    }

    #[test]
    fn process_words_table() {
        let lex = Lex::new('\\');
        let cases: &[(&str, &[&str])] = &[
            ("a b", &["a", "b"]),
            ("  a   b  ", &["a", "b"]),
            ("$B", &["b", "c"]),
            ("\"$B\"", &["b c"]),
            ("'x y' z", &["x y", "z"]),
            ("a\\ b", &["a b"]),
            ("", &[]),
        ];
        for (word, want) in cases {
            let got = lex.process_words(word, &env()).expect("process_words");
            assert_eq!(
                got,
                want.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "word {word:?}"
            );
        }
    }
}
