//! `git://` sources: one ref or commit fetched with the `git` CLI (no user or system
//! config, no prompts) and copied into a snapshot.
//!
//! Transports are git's own: `git://`, smart and dumb HTTP(S) and ssh. As BuildKit
//! does, the fetch is shallow first and drops `--depth` when the server cannot do
//! shallow fetches (a dumb HTTP server); a commit the server will not serve by id is
//! found by fetching every branch and tag. An HTTP(S) remote is fetched with an
//! `Authorization` header from the client's secrets when it has one (the
//! `git.authheadersecret`/`git.authtokensecret` names, first with `.HOST` appended,
//! then bare; a token is sent as basic `x-access-token:TOKEN`). With
//! `git.mountsshsock` ssh reaches the client's forwarded agent through the session,
//! and `git.knownsshhosts` are the only host keys ssh accepts (without them it
//! accepts any, as BuildKit's does).

use crate::error::{Error, Result};
use crate::snapshot::Kind;
use crate::{Worker, fscopy};
use base64::Engine;
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
    /// secret names holding a whole `Authorization` header value / a token
    auth_header_secret: String,
    auth_token_secret: String,
    /// the client's ssh agent ssh uses (`git.mountsshsock`), empty for none
    ssh_sock_id: String,
    /// known_hosts lines (`git.knownsshhosts`)
    known_hosts: String,
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
        let attr = |k: &str| attrs.get(k).cloned().unwrap_or_default();
        GitSource {
            remote,
            git_ref: git_ref.to_string(),
            subdir: subdir.to_string(),
            keep_git_dir: attrs.get("git.keepgitdir").is_some_and(|v| v == "true"),
            checksum: attr("git.checksum"),
            auth_header_secret: attr("git.authheadersecret"),
            auth_token_secret: attr("git.authtokensecret"),
            ssh_sock_id: attr("git.mountsshsock"),
            known_hosts: attr("git.knownsshhosts"),
        }
    }

    fn error(&self, reason: String) -> Error {
        Error::Git {
            remote: redact(&self.remote),
            reason,
        }
    }

    /// The secrets that may hold this remote's `Authorization` header, in the order
    /// BuildKit asks for them: (name, is a token).
    fn auth_secret_names(&self) -> Vec<(String, bool)> {
        let Some(host) = http_host(&self.remote) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for suffix in [format!(".{host}"), String::new()] {
            if !self.auth_header_secret.is_empty() {
                out.push((format!("{}{suffix}", self.auth_header_secret), false));
            }
            if !self.auth_token_secret.is_empty() {
                out.push((format!("{}{suffix}", self.auth_token_secret), true));
            }
        }
        out
    }

    /// The URL prefix an auth header is sent to: the remote itself (any github.com
    /// remote for a github.com one, as BuildKit does).
    fn token_scope(&self) -> &str {
        ["https://github.com/", "https://www.github.com/"]
            .into_iter()
            .find(|p| self.remote.starts_with(p))
            .unwrap_or(&self.remote)
    }
}

/// Whether git may fetch `remote`: `http(s)://`, `git://`, `ssh://` or scp-style
/// `user@host:path` (BuildKit's transports); never `file://` or a path on the
/// worker's host.
fn supported_transport(remote: &str) -> bool {
    if let Some((scheme, _)) = remote.split_once("://")
        && !scheme.is_empty()
        && scheme.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return matches!(
            scheme.to_ascii_lowercase().as_str(),
            "http" | "https" | "git" | "ssh"
        );
    }
    let Some((user, rest)) = remote.split_once('@') else {
        return false;
    };
    let Some((host, _)) = rest.split_once(':') else {
        return false;
    };
    !user.is_empty()
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The `host[:port]` of an `http(s)://` URL (Go's `url.URL.Host`).
fn http_host(remote: &str) -> Option<&str> {
    let rest = remote
        .strip_prefix("https://")
        .or_else(|| remote.strip_prefix("http://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    (!host.is_empty()).then_some(host)
}

/// `scheme://user:password@host/…` → `scheme://xxxxx@host/…`: no credentials in errors.
fn redact(remote: &str) -> String {
    let Some((scheme, rest)) = remote.split_once("://") else {
        return remote.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((user, host)) if user.contains(':') => {
            format!("{scheme}://xxxxx@{host}{}", &rest[end..])
        }
        _ => remote.to_string(),
    }
}

/// What git runs with besides the checkout: auth header, agent socket, known hosts.
#[derive(Default)]
struct Access {
    /// `Authorization: …` value for the remote
    auth_header: Option<String>,
    /// `SSH_AUTH_SOCK`
    ssh_sock: Option<PathBuf>,
    /// a known_hosts file
    known_hosts: Option<PathBuf>,
}

/// A scratch checkout with its own empty `HOME`.
struct Checkout<'a> {
    src: &'a GitSource,
    access: &'a Access,
    home: &'a Path,
    work: PathBuf,
}

/// `'…'` for a shell (`GIT_SSH_COMMAND` is run by one).
fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

impl Checkout<'_> {
    /// Runs `git ARGS` in the checkout.
    fn git(&self, args: &[&str]) -> Result<String> {
        let mut cmd = std::process::Command::new("git");
        // submodules and alternates never read the worker's own files
        cmd.args(["-c", "protocol.file.allow=user"])
            .args(args)
            .current_dir(&self.work)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("HOME", self.home)
            .env("GIT_PROTOCOL_FROM_USER", "0")
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::null());
        // ssh: no config, none of the worker's own keys or known hosts
        let mut ssh = String::from("ssh -F /dev/null -o BatchMode=yes -o IdentityFile=none");
        match &self.access.known_hosts {
            Some(f) => ssh.push_str(&format!(
                " -o StrictHostKeyChecking=yes -o UserKnownHostsFile={}",
                shell_quote(f)
            )),
            None => ssh.push_str(" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"),
        }
        cmd.env("GIT_SSH_COMMAND", ssh);
        match &self.access.ssh_sock {
            Some(sock) => cmd.env("SSH_AUTH_SOCK", sock),
            None => cmd.env_remove("SSH_AUTH_SOCK"),
        };
        // the header as config from the environment: not on a command line others can read
        match &self.access.auth_header {
            Some(h) => cmd
                .env("GIT_CONFIG_COUNT", "1")
                .env(
                    "GIT_CONFIG_KEY_0",
                    format!("http.{}.extraheader", self.src.token_scope()),
                )
                .env("GIT_CONFIG_VALUE_0", format!("Authorization: {h}")),
            None => cmd.env_remove("GIT_CONFIG_COUNT"),
        };
        let out = cmd.output().map_err(|source| Error::GitRun {
            remote: redact(&self.src.remote),
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
        let one = [
            "fetch",
            "-q",
            "--no-tags",
            "--end-of-options",
            "origin",
            want,
        ];
        let mut fetched = g(&[&["fetch", "--depth", "1"], &one[1..]].concat());
        // a server that cannot do shallow fetches (dumb HTTP): the same without --depth
        if let Err(Error::Git { reason, .. }) = &fetched
            && (reason.contains("shallow") || reason.contains("--depth"))
        {
            fetched = g(&one);
        }
        match fetched {
            Ok(_) => {
                g(&["checkout", "-q", "FETCH_HEAD"])?;
            }
            Err(e) if !is_commit_sha(want) => return Err(e),
            Err(_) => {
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
            }
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
        // the kept remote names no credentials
        let _ = self.git(&["remote", "set-url", "origin", &redact(&src.remote)]);
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

/// The remote's `Authorization` header value from the client's secrets, if any.
async fn auth_header(
    src: &GitSource,
    client: Option<&kiln_session::SessionClient>,
) -> Result<Option<String>> {
    let Some(client) = client else {
        return Ok(None);
    };
    for (name, token) in src.auth_secret_names() {
        let value = client
            .get_secret(&name)
            .await
            .map_err(|source| Error::SecretSession {
                id: name.clone(),
                source,
            })?;
        let Some(value) = value else { continue };
        let value = String::from_utf8_lossy(&value).trim().to_string();
        return Ok(Some(match token {
            true => format!(
                "basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{value}"))
            ),
            false => value,
        }));
    }
    Ok(None)
}

/// A socket in `dir` whose connections go to the client's ssh agent `id`; the accept
/// loop stops when the returned handle drops.
async fn agent_socket(
    src: &GitSource,
    client: Option<&kiln_session::SessionClient>,
    dir: &Path,
) -> Result<(PathBuf, AbortOnDrop)> {
    let id = src.ssh_sock_id.clone();
    let present = crate::ops::exec::agent_present(client, &id).await?;
    let Some(client) = client.filter(|_| present).cloned() else {
        return Err(src.error(format!(
            "no SSH key {id:?} forwarded from the client (kiln build --ssh {id})"
        )));
    };
    let path = dir.join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&path).map_err(Error::io("listen", &path))?;
    let task = crate::ops::exec::serve_agent(listener, client, id);
    Ok((path, AbortOnDrop(task.abort_handle())))
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Clones `rest` (`host/path.git#ref:subdir`; `git.fullurl` gives the URL with its
/// scheme) at one ref or commit into a snapshot; secrets and the ssh agent come
/// from the client of `session_id`.
pub(super) async fn git(
    w: &Worker,
    rest: &str,
    attrs: &BTreeMap<String, String>,
    session_id: &str,
) -> Result<String> {
    let src = GitSource::parse(rest, attrs);
    // the ref and remote come from the build: never options to git (a ref like
    // `--upload-pack=CMD` would run CMD on the worker's host)
    if src.git_ref.starts_with('-') || src.remote.starts_with('-') {
        return Err(src.error(format!("ref {:?} or remote starts with '-'", src.git_ref)));
    }
    if !supported_transport(&src.remote) {
        return Err(src.error(
            "not a git transport kiln fetches from (http, https, git, ssh or user@host:path)"
                .to_string(),
        ));
    }
    let store = w.store().clone();
    let tmp_root = w.config().root.join("tmp");
    let home = tempfile::Builder::new()
        .prefix("git-home-")
        .tempdir_in(&tmp_root)
        .map_err(Error::io("create", &tmp_root))?;
    let needs_session = !src.ssh_sock_id.is_empty() || !src.auth_secret_names().is_empty();
    let client = match needs_session && !session_id.is_empty() {
        true => Some(
            kiln_session::dial::connect(&w.config().broker)
                .await
                .map(|ch| kiln_session::SessionClient::new(ch, session_id.to_string()))
                .map_err(|source| Error::SecretSession {
                    id: "*".into(),
                    source,
                })?,
        ),
        false => None,
    };
    let mut access = Access {
        auth_header: auth_header(&src, client.as_ref()).await?,
        ..Access::default()
    };
    let mut _agent = None;
    if !src.ssh_sock_id.is_empty() {
        let (sock, task) = agent_socket(&src, client.as_ref(), home.path()).await?;
        access.ssh_sock = Some(sock);
        _agent = Some(task);
    }
    if !src.known_hosts.is_empty() {
        let f = home.path().join("known_hosts");
        std::fs::write(&f, format!("{}\n", src.known_hosts.trim_end()))
            .map_err(Error::io("write", &f))?;
        access.known_hosts = Some(f);
    }
    tokio::task::spawn_blocking(move || -> Result<String> {
        let mut st = store.prepare(None)?;
        let checkout = Checkout {
            src: &src,
            access: &access,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_secret_names_per_host_then_bare() {
        let attrs = BTreeMap::from([
            (
                "git.fullurl".to_string(),
                "https://u:p@example.com:8443/r.git".to_string(),
            ),
            (
                "git.authheadersecret".to_string(),
                "GIT_AUTH_HEADER".to_string(),
            ),
            (
                "git.authtokensecret".to_string(),
                "GIT_AUTH_TOKEN".to_string(),
            ),
        ]);
        let src = GitSource::parse("example.com:8443/r.git", &attrs);
        assert_eq!(
            src.auth_secret_names(),
            [
                ("GIT_AUTH_HEADER.example.com:8443".to_string(), false),
                ("GIT_AUTH_TOKEN.example.com:8443".to_string(), true),
                ("GIT_AUTH_HEADER".to_string(), false),
                ("GIT_AUTH_TOKEN".to_string(), true),
            ]
        );
        assert_eq!(redact(&src.remote), "https://xxxxx@example.com:8443/r.git");
        let ssh = GitSource::parse(
            "h/r.git",
            &BTreeMap::from([("git.fullurl".to_string(), "git@h:r.git".to_string())]),
        );
        assert!(ssh.auth_secret_names().is_empty());
        assert_eq!(redact("git@h:r.git"), "git@h:r.git");
        assert_eq!(redact("ssh://git@h/r.git"), "ssh://git@h/r.git");
        for ok in [
            "https://h/r.git",
            "HTTP://h/r.git",
            "git://h/r",
            "ssh://git@h:2222/r.git",
            "git@github.com:org/r.git",
        ] {
            assert!(supported_transport(ok), "{ok}");
        }
        for bad in [
            "file:///srv/r.git",
            "/srv/r.git",
            "../r.git",
            "ext::sh -c touch% /tmp/x",
            "h:r.git",
            "fd::3",
        ] {
            assert!(!supported_transport(bad), "{bad}");
        }
    }
}
