//! `ADD <git URL>`: which sources are git repositories and the git source op
//! for one (identifier, attrs and caps as BuildKit's `llb.Git` writes them).
//!
//! A source is a git repository when it is
//! - `git://…` or `ssh://…` (any path), or `http(s)://…` whose path ends in
//!   `.git` (the query and `#fragment` not counted);
//! - scp-style `user@host:path` (ssh, as `git@github.com:org/repo.git`).
//!
//! `./x`, `../x`, `github.com/…` (indistinguishable from a local path) and any
//! other scheme are not. The fragment is `#ref[:subdir]`; BuildKit's query form
//! (`?ref=`, `tag=`, `branch=`, `subdir=`, `checksum=`/`commit=`, `keep-git-dir=`)
//! says the same and more, and is not part of the fetched URL.

use std::collections::BTreeMap;

use kiln_llb::pb;

use super::ops::source_op;

/// A git source named in an ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GitRef {
    /// The URL to fetch, without its fragment (`git.fullurl`).
    pub remote: String,
    /// `host[:port]/path`, the identifier's body (the same for https and ssh).
    pub host_path: String,
    /// Branch, tag or commit; empty for the remote's HEAD.
    pub git_ref: String,
    pub subdir: String,
    /// Fetched over ssh (needs the client's agent: `git.mountsshsock`).
    pub ssh: bool,
    /// `?checksum=` / `?commit=`
    pub checksum: Option<String>,
    /// `?keep-git-dir[=BOOL]`
    pub keep_git_dir: Option<bool>,
    /// Why the URL's query is invalid (the ADD fails with it).
    pub invalid: Option<String>,
}

/// `%XX` and `+` decoded (Go's `url.QueryUnescape`, lenient).
fn query_unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A query's boolean (`keep-git-dir` alone is true), Go's `strconv.ParseBool`.
fn query_bool(key: &str, v: Option<&str>) -> Result<bool, String> {
    match v {
        None => Ok(true),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(v) => Err(format!("invalid {key} value: {v:?}")),
    }
}

impl GitRef {
    /// Applies BuildKit's query options (`dfgitutil.GitRef.loadQuery`).
    fn load_query(&mut self, query: &str) -> Result<(), String> {
        let mut seen: Vec<(String, Option<String>)> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (query_unescape(k), query_unescape(v));
            if seen.iter().any(|(s, _)| *s == k) {
                return Err(format!("query {k:?} has multiple values"));
            }
            let v = match v.is_empty() {
                false => Some(v),
                true if matches!(
                    k.as_str(),
                    "submodules" | "keep-git-dir" | "fetch-by-commit"
                ) =>
                {
                    None
                }
                true => return Err(format!("query {k:?} has no value")),
            };
            seen.push((k, v));
        }
        let (mut tag, mut branch) = (String::new(), String::new());
        for (k, v) in &seen {
            let val = v.clone().unwrap_or_default();
            match k.as_str() {
                "ref" => {
                    if !self.git_ref.is_empty() && self.git_ref != val {
                        return Err(format!("ref conflicts: {:?} vs {val:?}", self.git_ref));
                    }
                    self.git_ref = val;
                }
                "tag" => tag = val,
                "branch" => branch = val,
                "subdir" => {
                    if !self.subdir.is_empty() && self.subdir != val {
                        return Err(format!("subdir conflicts: {:?} vs {val:?}", self.subdir));
                    }
                    self.subdir = val;
                }
                "checksum" | "commit" => self.checksum = Some(val),
                "keep-git-dir" => self.keep_git_dir = Some(query_bool(k, v.as_deref())?),
                "submodules" | "fetch-by-commit" => {
                    query_bool(k, v.as_deref())?;
                }
                "mtime" if val == "checkout" || val == "commit" => {}
                "mtime" => {
                    return Err(format!(
                        "invalid mtime value: {val:?} (must be \"checkout\" or \"commit\")"
                    ));
                }
                _ => return Err(format!("unexpected query {k:?}")),
            }
        }
        for (name, prefix, conflicts) in [(tag, "refs/tags/", false), (branch, "refs/heads/", true)]
        {
            if name.is_empty() {
                continue;
            }
            if conflicts && seen.iter().any(|(k, _)| k == "tag") {
                return Err("branch conflicts with tag".to_string());
            }
            let full = match name.starts_with(prefix) {
                true => name,
                false => format!("{prefix}{name}"),
            };
            if !self.git_ref.is_empty() && self.git_ref != full {
                return Err(format!("ref conflicts: {:?} vs {full:?}", self.git_ref));
            }
            self.git_ref = full;
        }
        Ok(())
    }
}

/// `user@host:path` with no scheme (git's scp-like syntax).
fn scp_style(s: &str) -> Option<(&str, &str, &str)> {
    let (user, rest) = s.split_once('@')?;
    let (host, path) = rest.split_once(':')?;
    let user_ok = !user.is_empty()
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    (user_ok && host_ok).then_some((user, host, path))
}

/// `/a/./b/../c` → `/a/c` (Go's `path.Join("/", p)`).
fn clean_abs(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    format!("/{}", parts.join("/"))
}

impl GitRef {
    /// The git repository `src` names, or None when it is a local path or an
    /// ordinary URL.
    pub(crate) fn parse(src: &str) -> Option<GitRef> {
        if src.starts_with("./") || src.starts_with("../") || src.starts_with("github.com/") {
            return None;
        }
        let (without_fragment, fragment) = src.split_once('#').unwrap_or((src, ""));
        let (without_fragment, query) = without_fragment
            .split_once('?')
            .unwrap_or((without_fragment, ""));
        let (git_ref, subdir) = fragment.split_once(':').unwrap_or((fragment, ""));
        let (host_path, ssh) = if let Some((scheme, rest)) = without_fragment.split_once("://") {
            let valid_scheme = !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(&b));
            if !valid_scheme {
                return None;
            }
            let scheme = scheme.to_ascii_lowercase();
            let (authority, path) = match rest.find(['/', '?']) {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, ""),
            };
            let path = path.split('?').next().unwrap_or_default();
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            match scheme.as_str() {
                "http" | "https" if !path.ends_with(".git") => return None,
                "http" | "https" | "git" | "ssh" => {}
                _ => return None,
            }
            if host.is_empty() {
                return None;
            }
            (format!("{host}{}", clean_abs(path)), scheme == "ssh")
        } else {
            let (_, host, path) = scp_style(without_fragment)?;
            (format!("{host}{}", clean_abs(path)), true)
        };
        let mut git = GitRef {
            remote: without_fragment.to_string(),
            host_path,
            git_ref: git_ref.to_string(),
            subdir: subdir.to_string(),
            ssh,
            checksum: None,
            keep_git_dir: None,
            invalid: None,
        };
        if let Err(e) = git.load_query(query) {
            git.invalid = Some(e);
        }
        Some(git)
    }

    /// `git://host/path#ref[:subdir]`.
    pub(crate) fn identifier(&self) -> String {
        let mut id = format!("git://{}", self.host_path);
        let mut fragment = self.git_ref.clone();
        if !self.subdir.is_empty() {
            fragment.push(':');
            fragment.push_str(&self.subdir);
        }
        if !fragment.is_empty() {
            id.push('#');
            id.push_str(&fragment);
        }
        id
    }

    /// The source op and its caps for `ADD [--keep-git-dir] [--checksum=<commit>]`
    /// (the flags and the URL's query must agree); why not when they do not or the
    /// query is invalid.
    pub(crate) fn source_op(
        &self,
        keep_git_dir: bool,
        checksum: Option<&str>,
    ) -> Result<(pb::Op, Vec<&'static str>), String> {
        if let Some(e) = &self.invalid {
            return Err(e.clone());
        }
        if keep_git_dir && self.keep_git_dir == Some(false) {
            return Err("inconsistent keep-git-dir configuration".to_string());
        }
        let keep_git_dir = self.keep_git_dir.unwrap_or(keep_git_dir);
        let checksum = checksum.filter(|s| !s.is_empty());
        if let (Some(flag), Some(query)) = (checksum, &self.checksum)
            && flag != query
        {
            return Err(format!("checksum mismatch {flag:?} != {query:?}"));
        }
        let checksum = self.checksum.as_deref().or(checksum);
        let mut attrs = BTreeMap::new();
        let mut caps = vec!["source.git", "source.git.fullurl"];
        attrs.insert("git.fullurl".to_string(), self.remote.clone());
        attrs.insert(
            "git.authheadersecret".to_string(),
            "GIT_AUTH_HEADER".to_string(),
        );
        attrs.insert(
            "git.authtokensecret".to_string(),
            "GIT_AUTH_TOKEN".to_string(),
        );
        if keep_git_dir {
            attrs.insert("git.keepgitdir".to_string(), "true".to_string());
            caps.push("source.git.keepgitdir");
        }
        if let Some(sum) = checksum.filter(|s| !s.is_empty()) {
            attrs.insert("git.checksum".to_string(), sum.to_string());
            caps.push("source.git.checksum");
        }
        if self.ssh {
            attrs.insert("git.mountsshsock".to_string(), "default".to_string());
            caps.push("source.git.mountsshsock");
        }
        caps.sort_unstable();
        let op = source_op(self.identifier(), attrs);
        Ok((op, caps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_sources_are_git_and_their_identifiers() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            (
                "https://github.com/moby/buildkit.git#v0.32.2:frontend/dockerfile",
                Some((
                    "git://github.com/moby/buildkit.git#v0.32.2:frontend/dockerfile",
                    "https://github.com/moby/buildkit.git",
                )),
            ),
            (
                "git@github.com:moby/buildkit.git#refs/tags/v0.32.2",
                Some((
                    "git://github.com/moby/buildkit.git#refs/tags/v0.32.2",
                    "git@github.com:moby/buildkit.git",
                )),
            ),
            (
                "git://127.0.0.1:9418/repo.git#main",
                Some((
                    "git://127.0.0.1:9418/repo.git#main",
                    "git://127.0.0.1:9418/repo.git",
                )),
            ),
            (
                "ssh://git@host/org/repo",
                Some(("git://host/org/repo", "ssh://git@host/org/repo")),
            ),
            (
                "http://h/a/../r.git#:sub",
                Some(("git://h/r.git#:sub", "http://h/a/../r.git")),
            ),
            ("https://example.com/file.tar.gz", None),
            ("https://example.com/repo.git/file", None),
            ("https://example.com/x?y=.git", None),
            ("github.com/moby/buildkit", None),
            ("./repo.git", None),
            ("ftp://h/r.git", None),
            ("file.txt", None),
            ("dir/a:b", None),
            ("user@host", None),
        ];
        for (src, want) in cases {
            let got = GitRef::parse(src).map(|g| (g.identifier(), g.remote.clone()));
            let want = want.map(|(i, r)| (i.to_string(), r.to_string()));
            assert_eq!(got, want, "{src}");
        }
    }

    #[test]
    fn source_op_attrs_and_caps() {
        let g = GitRef::parse("git@github.com:moby/buildkit.git#main").expect("git");
        let (op, caps) = g.source_op(true, Some("991535e")).expect("op");
        let Some(pb::op::Op::Source(s)) = op.op else {
            panic!("not a source op")
        };
        assert_eq!(s.attrs["git.keepgitdir"], "true");
        assert_eq!(s.attrs["git.checksum"], "991535e");
        assert_eq!(s.attrs["git.mountsshsock"], "default");
        assert_eq!(s.attrs["git.authtokensecret"], "GIT_AUTH_TOKEN");
        assert!(caps.contains(&"source.git.checksum"));
        let g = GitRef::parse("https://h/r.git").expect("git");
        let (op, caps) = g.source_op(false, None).expect("op");
        let Some(pb::op::Op::Source(s)) = op.op else {
            panic!("not a source op")
        };
        assert_eq!(
            s.attrs.keys().collect::<Vec<_>>(),
            ["git.authheadersecret", "git.authtokensecret", "git.fullurl"]
        );
        assert_eq!(caps, ["source.git", "source.git.fullurl"]);
    }

    #[test]
    fn query_form() {
        let g = GitRef::parse("http://h/r.git?ref=v1&subdir=sub%2Fdir").expect("git");
        assert_eq!(g.identifier(), "git://h/r.git#v1:sub/dir");
        assert_eq!(g.remote, "http://h/r.git");
        let g = GitRef::parse("git@h:r.git?tag=v1&keep-git-dir&checksum=abc").expect("git");
        assert_eq!(g.identifier(), "git://h/r.git#refs/tags/v1");
        assert_eq!(g.remote, "git@h:r.git");
        let (op, _) = g.source_op(false, None).expect("op");
        let Some(pb::op::Op::Source(s)) = op.op else {
            panic!("not a source op")
        };
        assert_eq!(s.attrs["git.keepgitdir"], "true");
        assert_eq!(s.attrs["git.checksum"], "abc");
        assert_eq!(
            g.source_op(false, Some("abd")).err().as_deref(),
            Some("checksum mismatch \"abd\" != \"abc\"")
        );
        let g = GitRef::parse("https://h/r.git?branch=main").expect("git");
        assert_eq!(g.git_ref, "refs/heads/main");
        for (src, err) in [
            (
                "https://h/r.git?branch=main&tag=v1",
                "branch conflicts with tag",
            ),
            ("https://h/r.git?ref=a#b", "ref conflicts: \"b\" vs \"a\""),
            ("https://h/r.git?foo=1", "unexpected query \"foo\""),
            ("https://h/r.git?ref=", "query \"ref\" has no value"),
            (
                "https://h/r.git?ref=a&ref=b",
                "query \"ref\" has multiple values",
            ),
            (
                "https://h/r.git?keep-git-dir=maybe",
                "invalid keep-git-dir value: \"maybe\"",
            ),
        ] {
            let g = GitRef::parse(src).expect("git");
            assert_eq!(
                g.source_op(false, None).err().as_deref(),
                Some(err),
                "{src}"
            );
        }
        let g = GitRef::parse("https://h/r.git?keep-git-dir=false").expect("git");
        assert_eq!(
            g.source_op(true, None).err().as_deref(),
            Some("inconsistent keep-git-dir configuration")
        );
    }
}
