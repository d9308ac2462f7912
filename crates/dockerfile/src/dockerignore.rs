//! `.dockerignore` files: reading them the way BuildKit's `dockerignore.ReadAll`
//! does, and matching paths the way its `patternmatcher` does (Go
//! `filepath.Match` per path component plus `**`, a pattern also matching
//! everything below what it matches, `!` re-includes, last match wins).
//!
//! The frontend sends the patterns to the client as `local.excludepatterns`;
//! the client's file sender applies them. The matcher here lets the frontend
//! tell a user that a COPY source they name is excluded.

use crate::clean_path;

/// Parses a `.dockerignore` into patterns: `#` comment lines and blank lines
/// dropped, whitespace trimmed, each pattern cleaned (`./a/../b` -> `b`) and
/// made relative (leading `/` removed), `!` kept in front.
pub fn parse_dockerignore(text: &str) -> Vec<String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let mut pattern = line.trim();
        if pattern.is_empty() {
            continue;
        }
        let invert = pattern.starts_with('!');
        if invert {
            pattern = pattern[1..].trim();
        }
        let mut cleaned = String::new();
        if !pattern.is_empty() {
            cleaned = clean_path(pattern);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
        }
        out.push(if invert {
            format!("!{cleaned}")
        } else {
            cleaned
        });
    }
    out
}

/// One pattern: its path components and whether it re-includes.
#[derive(Debug, Clone)]
struct Pattern {
    segments: Vec<String>,
    exclusion: bool,
}

/// Decides whether a context path is excluded by a list of patterns.
#[derive(Debug, Clone, Default)]
pub struct IgnoreMatcher {
    patterns: Vec<Pattern>,
}

impl IgnoreMatcher {
    /// Patterns as [`parse_dockerignore`] returns them.
    pub fn new(patterns: &[String]) -> Self {
        let patterns = patterns
            .iter()
            .filter_map(|p| {
                let (exclusion, body) = match p.strip_prefix('!') {
                    Some(rest) => (true, rest),
                    None => (false, p.as_str()),
                };
                let body = clean_path(body);
                let body = body.trim_start_matches('/');
                if body.is_empty() || body == "." {
                    return None;
                }
                Some(Pattern {
                    segments: body.split('/').map(str::to_string).collect(),
                    exclusion,
                })
            })
            .collect();
        IgnoreMatcher { patterns }
    }

    /// Whether there are no patterns.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `path` (relative or absolute, `/`-separated) is excluded: the
    /// last pattern matching it or one of its parents decides.
    pub fn excluded(&self, path: &str) -> bool {
        let path = clean_path(path);
        let segs: Vec<&str> = path
            .trim_start_matches('/')
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .collect();
        if segs.is_empty() {
            return false;
        }
        let mut out = false;
        for p in &self.patterns {
            let hit = (1..=segs.len()).any(|n| match_segments(&p.segments, &segs[..n]));
            if hit {
                out = !p.exclusion;
            }
        }
        out
    }

    /// Whether some `!` pattern could re-include a path below `dir`, so an
    /// excluded `dir` may still have content.
    pub fn may_reinclude_below(&self, dir: &str) -> bool {
        let dir = clean_path(dir);
        let segs: Vec<&str> = dir
            .trim_start_matches('/')
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .collect();
        self.patterns
            .iter()
            .filter(|p| p.exclusion)
            .any(|p| prefix_may_match(&p.segments, &segs))
    }
}

/// Whether some path starting with `segs` could match `pattern`. A table over
/// (pattern position, path position), so `**` runs cost no more than a
/// product of lengths.
fn prefix_may_match(pattern: &[String], segs: &[&str]) -> bool {
    let (np, ns) = (pattern.len(), segs.len());
    // may[i][j]: some path starting with segs[j..] could match pattern[i..]
    let mut may = vec![vec![false; ns + 1]; np + 1];
    for row in may.iter_mut() {
        row[ns] = true;
    }
    for i in (0..np).rev() {
        for j in (0..ns).rev() {
            may[i][j] = if pattern[i] == "**" {
                may[i + 1][j] || may[i][j + 1]
            } else {
                may[i + 1][j + 1] && match_component(&pattern[i], segs[j])
            };
        }
    }
    may[0][0]
}

/// Matches whole path components; a `**` component matches zero or more.
fn match_segments(pattern: &[String], segs: &[&str]) -> bool {
    let tokens: Vec<Token<&String>> = pattern
        .iter()
        .map(|p| {
            if p == "**" {
                Token::Star
            } else {
                Token::One(p)
            }
        })
        .collect();
    match_tokens(&tokens, segs, |p, s| match_component(p, s))
}

/// A pattern element: `*` (any run) or something matching exactly one item.
enum Token<T> {
    Star,
    One(T),
}

/// Wildcard matching with one backtrack point (the last star): when the
/// items after a star fail, the star takes one more item. Equivalent to
/// trying every split, in at most `tokens × items` steps instead of
/// exponentially many for patterns with many stars (`**********.md`).
fn match_tokens<T, I: Copy>(tokens: &[Token<T>], items: &[I], one: impl Fn(&T, I) -> bool) -> bool {
    let (mut t, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    loop {
        match tokens.get(t) {
            Some(Token::Star) => {
                star = Some((t, i));
                t += 1;
                continue;
            }
            Some(Token::One(p)) if i < items.len() && one(p, items[i]) => {
                t += 1;
                i += 1;
                continue;
            }
            None if i == items.len() => return true,
            _ => {}
        }
        match star {
            Some((st, si)) if si < items.len() => {
                star = Some((st, si + 1));
                t = st + 1;
                i = si + 1;
            }
            _ => return false,
        }
    }
}

/// One character of a component pattern.
enum CharMatch {
    Any,
    Lit(char),
    /// a class body (after `[`, through `]`)
    Class(Vec<char>),
    /// a malformed class: matches nothing
    Never,
}

/// Go `filepath.Match` for one component: `*`, `?`, `[...]` / `[^...]` with
/// ranges, `\` escapes. A malformed class never matches.
fn match_component(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let mut tokens = Vec::new();
    let mut k = 0;
    while k < p.len() {
        let c = p[k];
        k += 1;
        tokens.push(match c {
            '*' => Token::Star,
            '?' => Token::One(CharMatch::Any),
            '[' => match class_len(&p[k..]) {
                Some(used) => {
                    let body = p[k..k + used].to_vec();
                    k += used;
                    Token::One(CharMatch::Class(body))
                }
                None => {
                    // nothing after it can be reached
                    tokens.push(Token::One(CharMatch::Never));
                    break;
                }
            },
            '\\' if k < p.len() => {
                k += 1;
                Token::One(CharMatch::Lit(p[k - 1]))
            }
            c => Token::One(CharMatch::Lit(c)),
        });
    }
    match_tokens(&tokens, &n, |m, ch| match m {
        CharMatch::Any => true,
        CharMatch::Lit(c) => *c == ch,
        CharMatch::Class(body) => match_class(body, ch).is_some_and(|(ok, _)| ok),
        CharMatch::Never => false,
    })
}

/// The length of a class body (after `[`, through `]`), whatever it matches;
/// None when it is malformed.
fn class_len(p: &[char]) -> Option<usize> {
    // a class's extent does not depend on the character tested
    match_class(p, '\0').map(|(_, used)| used)
}

/// Matches `ch` against a class body (after `[`); returns (matched, chars
/// consumed including the closing `]`), None when the class is malformed.
fn match_class(p: &[char], ch: char) -> Option<(bool, usize)> {
    let mut i = 0;
    let negate = matches!(p.first(), Some('^') | Some('!'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let c = *p.get(i)?;
        if c == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        let lo = if c == '\\' {
            i += 1;
            *p.get(i)?
        } else {
            c
        };
        i += 1;
        let hi = if p.get(i) == Some(&'-') && p.get(i + 1).is_some_and(|c| *c != ']') {
            i += 1;
            let h = if p[i] == '\\' {
                i += 1;
                *p.get(i)?
            } else {
                p[i]
            };
            i += 1;
            h
        } else {
            lo
        };
        if lo <= ch && ch <= hi {
            matched = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_with_many_stars_match_without_backtracking_forever() {
        // each of these took exponential time (hours) with a recursive matcher
        let started = std::time::Instant::now();
        let stars = format!("{}.md", "*".repeat(40));
        assert!(m(&[&stars]).excluded("README.md"));
        assert!(!m(&[&stars]).excluded(&format!("{}x", "a".repeat(60))));
        let deep = format!("{}x", "**/".repeat(30));
        let path = format!("{}y", "a/".repeat(40));
        assert!(!m(&[&deep]).excluded(&path));
        assert!(m(&[&deep]).excluded(&format!("{}x", "a/".repeat(40))));
        let reinclude = format!("!{}x", "**/".repeat(30));
        assert!(m(&["a", &reinclude]).may_reinclude_below(&path));
        assert!(!m(&["a", "!b/c"]).may_reinclude_below("a"));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn component_matching_keeps_go_semantics() {
        for (pattern, name, want) in [
            ("*.md", "a.md", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("?x", "ax", true),
            ("?x", "x", false),
            ("[a-c]z", "bz", true),
            ("[^a-c]z", "bz", false),
            ("[!a-c]z", "dz", true),
            ("\\*", "*", true),
            ("\\*", "a", false),
            ("a\\", "a\\", true),
            ("*[", "a", false),
            ("[]]", "]", true),
            (
                "*a*a*a*a*a*a*a*a*a*a*a*a*b",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                false,
            ),
        ] {
            assert_eq!(match_component(pattern, name), want, "{pattern:?} {name:?}");
        }
    }

    #[test]
    fn reading_cleans_and_skips_comments() {
        let got = parse_dockerignore(
            "\u{feff}# comment\n\n  node_modules  \n/abs/path\n./rel/../x\n! keep.txt\n!/root.md\n*.log\n",
        );
        assert_eq!(
            got,
            [
                "node_modules",
                "abs/path",
                "x",
                "!keep.txt",
                "!root.md",
                "*.log"
            ]
        );
    }

    fn m(patterns: &[&str]) -> IgnoreMatcher {
        IgnoreMatcher::new(&patterns.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn data_driven_matches() {
        // (patterns, path, excluded)
        let cases: &[(&[&str], &str, bool)] = &[
            (&["a"], "a", true),
            (&["a"], "a/b/c", true),
            (&["a"], "b/a", false),
            (&["*.log"], "x.log", true),
            (&["*.log"], "d/x.log", false),
            (&["*/*.log"], "d/x.log", true),
            (&["**/*.log"], "x.log", true),
            (&["**/*.log"], "d/e/x.log", true),
            (&["d/**"], "d/e/f", true),
            (&["d/**/x"], "d/x", true),
            (&["d/**/x"], "d/a/b/x", true),
            (&["?.txt"], "a.txt", true),
            (&["?.txt"], "ab.txt", false),
            (&["[a-c].txt"], "b.txt", true),
            (&["[^a-c].txt"], "b.txt", false),
            (&["[^a-c].txt"], "z.txt", true),
            (&["\\*"], "*", true),
            (&["\\*"], "a", false),
            (&["*", "!keep"], "keep", false),
            (&["*", "!keep"], "other", true),
            (&["dir", "!dir/keep"], "dir/keep", false),
            (&["dir", "!dir/keep"], "dir/drop", true),
            (&["!x", "x"], "x", true),
            (&["a/b"], "a", false),
            (&["/lead"], "lead", true),
            (&["*"], "", false),
        ];
        for (patterns, path, want) in cases {
            assert_eq!(
                m(patterns).excluded(path),
                *want,
                "{patterns:?} on {path:?}"
            );
        }
    }

    #[test]
    fn reinclude_below_an_excluded_dir_is_detected() {
        let ign = m(&["dir", "!dir/keep"]);
        assert!(ign.excluded("dir"));
        assert!(ign.may_reinclude_below("dir"));
        assert!(!ign.may_reinclude_below("other"));
        assert!(m(&["**", "!**/*.go"]).may_reinclude_below("a/b"));
        assert!(!m(&["dir"]).may_reinclude_below("dir"));
    }
}
