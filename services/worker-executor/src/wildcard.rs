//! Wildcard paths (`COPY *.txt /d/`, `rm /tmp/*/cache`): the one expander, used
//! by the file op to pick what it copies or removes and by content hashing
//! ([`crate::contenthash`]) for a copy's cache key, so both see the same paths.
//!
//! BuildKit's rules (fsutil `copy.ResolveWildcards`, which `cache/contenthash`
//! follows): the pattern is cleaned and split at its first component holding a
//! wildcard; the part before is resolved in the root (following symlinks); the
//! matches are the entries below it whose path relative to it matches the rest,
//! component for component, with Go's `path.Match` (`*` and `?` never match
//! `/`, `[...]` with `^` for negation, `\` escapes). Only existing entries
//! match, so an entry the pattern does not name never changes the result; a
//! symlinked directory below the prefix is not descended into.

use crate::error::{Error, Result};
use std::path::Path;

/// Whether a path holds an unescaped `*`, `?` or `[`.
pub fn has_wildcards(p: &str) -> bool {
    let b = p.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'*' | b'?' | b'[' => return true,
            b'\\' => i += 1,
            _ => {}
        }
        i += 1;
    }
    false
}

/// The in-root absolute paths (`/a/b.txt`) that `pattern` matches under `root`,
/// sorted. A pattern without wildcards is its own (cleaned) match, whether or
/// not it exists.
pub fn expand(root: &Path, pattern: &str) -> Result<Vec<String>> {
    let comps = clean(pattern);
    let Some(split) = comps.iter().position(|c| has_wildcards(c)) else {
        return Ok(vec![join(&comps)]);
    };
    let bad = || Error::Pattern {
        pattern: pattern.to_string(),
    };
    // a syntax error counts whether or not anything is there to match
    for c in &comps[split..] {
        match_name(c, "").map_err(|BadPattern| bad())?;
    }
    let prefix = join(&comps[..split]);
    let dir =
        crate::rootpath::resolve(root, &prefix, true).map_err(Error::io("resolve", &prefix))?;
    let mut out = Vec::new();
    descend(&dir, &prefix, &comps[split..], &mut out).map_err(|BadPattern| bad())?;
    out.sort();
    Ok(out)
}

/// Adds the entries of `dir` (in-root path `at`) matching `comps` one level each.
fn descend(
    dir: &Path,
    at: &str,
    comps: &[&str],
    out: &mut Vec<String>,
) -> std::result::Result<(), BadPattern> {
    let Some((first, rest)) = comps.split_first() else {
        return Ok(());
    };
    // an unreadable or vanished directory has no matches (as its absence has none)
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !match_name(first, &name)? {
            continue;
        }
        let path = if at == "/" {
            format!("/{name}")
        } else {
            format!("{at}/{name}")
        };
        if rest.is_empty() {
            out.push(path);
        } else if e.file_type().is_ok_and(|t| t.is_dir()) {
            descend(&e.path(), &path, rest, out)?;
        }
    }
    Ok(())
}

/// The components of `p` made absolute and cleaned lexically (Go's `path.Clean`).
fn clean(p: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

fn join(comps: &[&str]) -> String {
    format!("/{}", comps.join("/"))
}

/// A malformed pattern (Go's `path.ErrBadPattern`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadPattern;

/// Go's `path.Match` of a whole name against a pattern.
pub fn match_name(pattern: &str, name: &str) -> std::result::Result<bool, BadPattern> {
    let (mut pattern, mut name) = (pattern, name);
    'chunks: while !pattern.is_empty() {
        let (star, chunk, rest) = scan_chunk(pattern);
        pattern = rest;
        if star && chunk.is_empty() {
            // a trailing * matches the rest of the name unless it has a /
            return Ok(!name.contains('/'));
        }
        // the chunk here; the last chunk must use up the name
        if let Some(t) = match_chunk(chunk, name)?
            && (t.is_empty() || !pattern.is_empty())
        {
            name = t;
            continue;
        }
        if star {
            // the chunk further on, the star taking what is skipped (never a /)
            for (i, c) in name.char_indices() {
                if c == '/' {
                    break;
                }
                if let Some(t) = match_chunk(chunk, &name[i + c.len_utf8()..])? {
                    if pattern.is_empty() && !t.is_empty() {
                        continue;
                    }
                    name = t;
                    continue 'chunks;
                }
            }
        }
        // no match; the rest of the pattern must still be well-formed
        while !pattern.is_empty() {
            let (_, chunk, rest) = scan_chunk(pattern);
            pattern = rest;
            match_chunk(chunk, "")?;
        }
        return Ok(false);
    }
    Ok(name.is_empty())
}

/// Splits off leading stars and the chunk up to the next star outside a class.
fn scan_chunk(pattern: &str) -> (bool, &str, &str) {
    let rest = pattern.trim_start_matches('*');
    let star = rest.len() != pattern.len();
    let b = rest.as_bytes();
    let (mut i, mut in_class) = (0, false);
    while i < b.len() {
        match b[i] {
            b'\\' if i + 1 < b.len() => i += 1,
            b'[' => in_class = true,
            b']' => in_class = false,
            b'*' if !in_class => break,
            _ => {}
        }
        i += 1;
    }
    (star, &rest[..i], &rest[i..])
}

/// Matches `chunk` (no stars) at the start of `s`: what is left of `s` when it does.
/// The whole chunk is checked for syntax even after a mismatch.
fn match_chunk<'a>(
    mut chunk: &str,
    mut s: &'a str,
) -> std::result::Result<Option<&'a str>, BadPattern> {
    let mut failed = false;
    while let Some(c) = chunk.chars().next() {
        if !failed && s.is_empty() {
            failed = true;
        }
        match c {
            '[' => {
                let r = if failed { None } else { take_char(&mut s) };
                chunk = &chunk[1..];
                let negated = chunk.starts_with('^');
                if negated {
                    chunk = &chunk[1..];
                }
                let (mut matched, mut ranges) = (false, 0);
                loop {
                    if chunk.starts_with(']') && ranges > 0 {
                        chunk = &chunk[1..];
                        break;
                    }
                    let (lo, rest) = class_char(chunk)?;
                    chunk = rest;
                    let mut hi = lo;
                    if let Some(rest) = chunk.strip_prefix('-') {
                        (hi, chunk) = class_char(rest)?;
                    }
                    if r.is_some_and(|r| lo <= r && r <= hi) {
                        matched = true;
                    }
                    ranges += 1;
                }
                if matched == negated {
                    failed = true;
                }
            }
            '?' => {
                if !failed && take_char(&mut s) == Some('/') {
                    failed = true;
                }
                chunk = &chunk[1..];
            }
            _ => {
                if c == '\\' {
                    chunk = &chunk[1..];
                }
                let Some(lit) = chunk.chars().next() else {
                    return Err(BadPattern);
                };
                if !failed && take_char(&mut s) != Some(lit) {
                    failed = true;
                }
                chunk = &chunk[lit.len_utf8()..];
            }
        }
    }
    Ok((!failed).then_some(s))
}

fn take_char(s: &mut &str) -> Option<char> {
    let c = s.chars().next()?;
    *s = &s[c.len_utf8()..];
    Some(c)
}

/// One (possibly escaped) character of a class, and what follows it (never empty).
fn class_char(chunk: &str) -> std::result::Result<(char, &str), BadPattern> {
    let chunk = match chunk.chars().next() {
        None | Some('-') | Some(']') => return Err(BadPattern),
        Some('\\') => &chunk[1..],
        Some(_) => chunk,
    };
    let c = chunk.chars().next().ok_or(BadPattern)?;
    let rest = &chunk[c.len_utf8()..];
    if rest.is_empty() {
        return Err(BadPattern);
    }
    Ok((c, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_as_go_path_match_does() {
        // cases from Go's path/match_test.go
        let cases: &[(&str, &str, Result<bool, BadPattern>)] = &[
            ("abc", "abc", Ok(true)),
            ("*", "abc", Ok(true)),
            ("*c", "abc", Ok(true)),
            ("a*", "a", Ok(true)),
            ("a*", "abc", Ok(true)),
            ("a*", "ab/c", Ok(false)),
            ("a*/b", "abc/b", Ok(true)),
            ("a*/b", "a/c/b", Ok(false)),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", Ok(true)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", Ok(false)),
            ("ab[c]", "abc", Ok(true)),
            ("ab[b-d]", "abc", Ok(true)),
            ("ab[e-g]", "abc", Ok(false)),
            ("ab[^c]", "abc", Ok(false)),
            ("ab[^b-d]", "abc", Ok(false)),
            ("ab[^e-g]", "abc", Ok(true)),
            ("a\\*b", "a*b", Ok(true)),
            ("a\\*b", "ab", Ok(false)),
            ("a?b", "a☺b", Ok(true)),
            ("a[^a]b", "a☺b", Ok(true)),
            ("a???b", "a☺b", Ok(false)),
            ("[a-ζ]*", "α", Ok(true)),
            ("*[a-ζ]", "A", Ok(false)),
            ("a?b", "a/b", Ok(false)),
            ("a*b", "a/b", Ok(false)),
            ("[\\]a]", "]", Ok(true)),
            ("[\\-]", "-", Ok(true)),
            ("[x\\-]", "z", Ok(false)),
            ("[\\-x]", "a", Ok(false)),
            ("[]a]", "]", Err(BadPattern)),
            ("[-]", "-", Err(BadPattern)),
            ("[x-]", "x", Err(BadPattern)),
            ("[a-b-c]", "a", Err(BadPattern)),
            ("[", "a", Err(BadPattern)),
            ("[^", "a", Err(BadPattern)),
            ("a[", "a", Err(BadPattern)),
            ("a[", "ab", Err(BadPattern)),
            ("a[", "x", Err(BadPattern)),
            ("a/b[", "x", Err(BadPattern)),
            ("*x", "xxx", Ok(true)),
            ("{a,b}", "a", Ok(false)),
            ("{a,b}", "{a,b}", Ok(true)),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(match_name(pattern, name), *want, "{pattern:?} {name:?}");
        }
    }

    #[test]
    fn only_existing_entries_named_by_the_pattern_match() {
        let root = tempfile::tempdir().expect("tmp");
        let touch = |p: &str| {
            let p = root.path().join(p);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, "").expect("write");
        };
        touch("a.txt");
        touch("b.txt");
        touch("c.md");
        touch("sub1/x.txt");
        touch("sub2/y.txt");
        std::os::unix::fs::symlink("sub1", root.path().join("sublink")).expect("symlink");
        let ex = |p: &str| expand(root.path(), p).expect("expand");
        assert_eq!(ex("*.txt"), ["/a.txt", "/b.txt"]);
        assert_eq!(ex("/./sub1/../*.txt"), ["/a.txt", "/b.txt"]);
        assert_eq!(
            ex("sub*/x.txt"),
            ["/sub1/x.txt"],
            "a dir without x.txt is no match"
        );
        assert_eq!(ex("sub*"), ["/sub1", "/sub2", "/sublink"]);
        assert_eq!(
            ex("/sublink/*"),
            ["/sublink/x.txt"],
            "the prefix follows links"
        );
        assert_eq!(ex("*.nothing"), Vec::<String>::new());
        assert_eq!(ex("/missing/*"), Vec::<String>::new());
        assert_eq!(ex("/sub1/x.txt"), ["/sub1/x.txt"]);
        assert_eq!(ex("nope"), ["/nope"], "no wildcard: the path itself");
        assert!(expand(root.path(), "a[").is_err());
        // an unrelated directory changes nothing
        let before = (ex("*.txt"), ex("sub*/x.txt"));
        std::fs::create_dir(root.path().join("unrelated")).expect("mkdir");
        std::fs::create_dir(root.path().join("sub3")).expect("mkdir");
        assert_eq!((ex("*.txt"), ex("sub*/x.txt")), before);
    }
}
