//! `git://` sources: one ref or commit fetched with the `git` CLI (no user or system
//! config, no prompts) and copied into a snapshot.

use crate::error::{Error, Result};
use crate::snapshot::Kind;
use crate::{Worker, fscopy};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a git source op asks for.
struct GitSource {
    /// the URL fetched from
    remote: String,
    /// a branch, tag or commit; empty for the remote's HEAD
    git_ref: String,
    /// the directory of the checkout that becomes the snapshot; empty for all
    subdir: String,
    keep_git_dir: bool,
    /// a prefix the fetched commit must have
    checksum: String,
}

impl GitSource {
    /// `rest` is `host/path.git#ref:subdir`; `git.fullurl` gives the URL with its scheme.
    fn parse(rest: &str, attrs: &BTreeMap<String, String>) -> GitSource {
        let (remote_part, fragment) = rest.split_once('#').unwrap_or((rest, ""));
        let (git_ref, subdir) = fragment.split_once(':').unwrap_or((fragment, ""));
        let remote = attrs
            .get("git.fullurl")
            .filter(|u| !u.is_empty())
            .map(|u| u.split_once('#').map_or(u.as_str(), |(u, _)| u).to_string())
            .unwrap_or_else(|| format!("https://{remote_part}"));
        GitSource {
            remote,
            git_ref: git_ref.to_string(),
            subdir: subdir.to_string(),
            keep_git_dir: attrs.get("git.keepgitdir").is_some_and(|v| v == "true"),
            checksum: attrs.get("git.checksum").cloned().unwrap_or_default(),
        }
    }

    fn error(&self, reason: String) -> Error {
        Error::Git {
            remote: self.remote.clone(),
            reason,
        }
    }
}

/// A scratch checkout with its own empty `HOME`.
struct Checkout<'a> {
    src: &'a GitSource,
    home: &'a Path,
    work: PathBuf,
}

impl Checkout<'_> {
    /// Runs `git ARGS` in the checkout.
    fn git(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(&self.work)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", self.home)
            .env("GIT_PROTOCOL_FROM_USER", "0")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| Error::GitRun {
                remote: self.src.remote.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(self.src.error(format!(
                "git {}: {}",
                args.first().copied().unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Fetches the wanted ref or commit and checks it out; returns the commit.
    fn fetch(&self) -> Result<String> {
        let src = self.src;
        let g = |args: &[&str]| self.git(args);
        g(&["init", "-q"])?;
        g(&["remote", "add", "--end-of-options", "origin", &src.remote])?;
        let want = if src.git_ref.is_empty() {
            "HEAD"
        } else {
            src.git_ref.as_str()
        };
        let shallow = g(&[
            "fetch",
            "-q",
            "--depth",
            "1",
            "--no-tags",
            "--end-of-options",
            "origin",
            want,
        ]);
        if shallow.is_err() {
            if !is_commit_sha(want) {
                shallow?;
            }
            // servers that refuse a commit by id: fetch everything and pick it
            g(&[
                "fetch",
                "-q",
                "--tags",
                "--end-of-options",
                "origin",
                "+refs/heads/*:refs/remotes/origin/*",
            ])?;
            g(&["checkout", "-q", "--end-of-options", want])?;
        } else {
            g(&["checkout", "-q", "FETCH_HEAD"])?;
        }
        let commit = g(&["rev-parse", "HEAD"])?;
        if !src.checksum.is_empty() && !commit.starts_with(&src.checksum) {
            return Err(src.error(format!(
                "expected checksum {} but got {commit}",
                src.checksum
            )));
        }
        if is_commit_sha(want) && !commit.starts_with(want) {
            return Err(src.error(format!("fetched {commit} instead of {want}")));
        }
        Ok(commit)
    }

    /// Leaves the `.git` dir as BuildKit does (on a branch named for the ref) or drops it.
    fn finish_git_dir(&self) -> Result<()> {
        let src = self.src;
        if !src.keep_git_dir {
            let dot_git = self.work.join(".git");
            return std::fs::remove_dir_all(&dot_git).map_err(Error::io("remove", &dot_git));
        }
        if !src.git_ref.is_empty() && !is_commit_sha(&src.git_ref) {
            let branch = src.git_ref.trim_start_matches("refs/heads/");
            let _ = self.git(&["checkout", "-q", "-B", branch]);
        }
        Ok(())
    }

    /// The directory of the checkout the snapshot is made of.
    fn content(&self) -> Result<PathBuf> {
        let subdir = &self.src.subdir;
        if subdir.is_empty() {
            return Ok(self.work.clone());
        }
        let p = crate::rootpath::resolve(&self.work, subdir, true)
            .map_err(Error::io("resolve", subdir))?;
        if !p.is_dir() {
            return Err(self.src.error(format!("subdir {subdir} not found")));
        }
        Ok(p)
    }
}

fn is_commit_sha(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Clones `rest` (`host/path.git#ref:subdir`; `git.fullurl` gives the URL with its
/// scheme) at one ref or commit into a snapshot.
pub(super) async fn git(
    w: &Worker,
    rest: &str,
    attrs: &BTreeMap<String, String>,
) -> Result<String> {
    let src = GitSource::parse(rest, attrs);
    let store = w.store().clone();
    let tmp_root = w.config().root.join("tmp");
    tokio::task::spawn_blocking(move || -> Result<String> {
        // the ref and remote come from the build: never options to git (a ref like
        // `--upload-pack=CMD` would run CMD on the worker's host)
        if src.git_ref.starts_with('-') || src.remote.starts_with('-') {
            return Err(src.error(format!("ref {:?} or remote starts with '-'", src.git_ref)));
        }
        let home = tempfile::Builder::new()
            .prefix("git-home-")
            .tempdir_in(&tmp_root)
            .map_err(Error::io("create", &tmp_root))?;
        let mut st = store.prepare(None)?;
        let checkout = Checkout {
            src: &src,
            home: home.path(),
            work: home.path().join("checkout"),
        };
        std::fs::create_dir(&checkout.work).map_err(Error::io("create", &checkout.work))?;
        let commit = checkout.fetch()?;
        checkout.finish_git_dir()?;
        let content = checkout.content()?;
        fscopy::copy_entry(&content, &st.diff(), &fscopy::CopyOpts::default())
            .map_err(Error::io("copy checkout", &content))?;
        st.content_key = Some(format!("git:{commit}:{}:{}", src.keep_git_dir, src.subdir));
        store.commit(st, Kind::Built, None)
    })
    .await?
}
