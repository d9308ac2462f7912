//! `ADD <git URL>`: which sources are git repositories and the git source op
//! for one (identifier, attrs and caps as BuildKit's `llb.Git` writes them).
//!
//! A source is a git repository when it is
//! - `git://…` or `ssh://…` (any path), or `http(s)://…` whose path ends in
//!   `.git` (the query and `#fragment` not counted);
//! - scp-style `user@host:path` (ssh, as `git@github.com:org/repo.git`).
//!
//! `./x`, `../x`, `github.com/…` (indistinguishable from a local path) and any
//! other scheme are not. The fragment is `#ref[:subdir]`.

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
        Some(GitRef {
            remote: without_fragment.to_string(),
            host_path,
            git_ref: git_ref.to_string(),
            subdir: subdir.to_string(),
            ssh,
        })
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

    /// The source op and its caps for `ADD [--keep-git-dir] [--checksum=<commit>]`.
    pub(crate) fn source_op(
        &self,
        keep_git_dir: bool,
        checksum: Option<&str>,
    ) -> (pb::Op, Vec<&'static str>) {
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
        (op, caps)
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
        let (op, caps) = g.source_op(true, Some("991535e"));
        let Some(pb::op::Op::Source(s)) = op.op else {
            panic!("not a source op")
        };
        assert_eq!(s.attrs["git.keepgitdir"], "true");
        assert_eq!(s.attrs["git.checksum"], "991535e");
        assert_eq!(s.attrs["git.mountsshsock"], "default");
        assert_eq!(s.attrs["git.authtokensecret"], "GIT_AUTH_TOKEN");
        assert!(caps.contains(&"source.git.checksum"));
        let g = GitRef::parse("https://h/r.git").expect("git");
        let (op, caps) = g.source_op(false, None);
        let Some(pb::op::Op::Source(s)) = op.op else {
            panic!("not a source op")
        };
        assert_eq!(
            s.attrs.keys().collect::<Vec<_>>(),
            ["git.authheadersecret", "git.authtokensecret", "git.fullurl"]
        );
        assert_eq!(caps, ["source.git", "source.git.fullurl"]);
    }
}
