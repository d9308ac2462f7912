//! Source ops, one backend per child: `docker-image://` and `oci-layout://`
//! ([`image`]), `local://`
//! ([`local`]), `git://` ([`git`]) and `http(s)://` ([`http`]).

mod cachemount;
mod git;
mod http;
pub(crate) mod image;
pub mod local;

use crate::error::{Error, Result};
use crate::{Event, Worker, pb};
use tokio::sync::mpsc;

use kiln_oci::cache_config::sources::{CACHE_SCHEME, MOUNT_EXPORT_SCHEME, MOUNT_IMPORT_SCHEME};

pub async fn run(
    w: &Worker,
    s: &pb::SourceOp,
    platform: Option<&pb::Platform>,
    req: &crate::RunRequest,
    events: &mpsc::Sender<Event>,
) -> Result<Option<String>> {
    let session_id = req.session_id.as_str();
    if let Some(r) = s.identifier.strip_prefix("docker-image://") {
        image::image(w, r, platform, session_id, events).await
    } else if let Some(r) = s.identifier.strip_prefix(kiln_session::ocilayout::SCHEME) {
        image::oci_layout(w, r, &s.attrs, platform, session_id, events).await
    } else if let Some(repo) = s.identifier.strip_prefix(CACHE_SCHEME) {
        image::cache_layers(w, repo, &s.attrs, session_id, events).await
    } else if let Some(id) = s.identifier.strip_prefix(MOUNT_EXPORT_SCHEME) {
        cachemount::export(w, id).await
    } else if let Some(id) = s.identifier.strip_prefix(MOUNT_IMPORT_SCHEME) {
        cachemount::import(w, id, &s.attrs, session_id, events).await
    } else if let Some(name) = s.identifier.strip_prefix("local://") {
        let src = local::LocalSource {
            name,
            attrs: &s.attrs,
            session_id,
            shared_key: &req.session_shared_key,
        };
        local::local(w, src, events).await.map(Some)
    } else if let Some(rest) = s.identifier.strip_prefix("git://") {
        git::git(w, rest, &s.attrs, session_id).await.map(Some)
    } else if s.identifier.starts_with("http://") || s.identifier.starts_with("https://") {
        http::http(w, &s.identifier, &s.attrs).await.map(Some)
    } else {
        Err(Error::UnsupportedSource {
            identifier: s.identifier.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::pb::{self, op::Op};
    use crate::testutil;
    use crate::{RunRequest, Worker};
    use std::collections::BTreeMap;
    use std::process::{Child, Command, Stdio};

    struct Server(Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port()
    }

    fn wait_port(port: u16) {
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed().as_secs() < 10,
                "server on {port} did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    async fn source(
        w: &Worker,
        identifier: &str,
        attrs: BTreeMap<String, String>,
    ) -> crate::Result<String> {
        let req = RunRequest {
            build_id: "b".into(),
            session_id: String::new(),
            session_shared_key: String::new(),
            name: "src".into(),
            op: pb::Op {
                op: Some(Op::Source(pb::SourceOp {
                    identifier: identifier.into(),
                    attrs,
                })),
                ..Default::default()
            },
            inputs: vec![],
            entitlements: vec![],
        };
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        Ok(w.run(req, tx).await?[0].clone().expect("output"))
    }

    fn git(dir: &std::path::Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .expect("git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[tokio::test]
    async fn git_source_clones_a_ref_or_commit_from_a_loopback_daemon() {
        let (tmp, w) = testutil::worker();
        let base = tmp.path().join("repos");
        let work = tmp.path().join("work");
        std::fs::create_dir_all(&work).expect("mkdir");
        git(&work, &["init", "-q", "-b", "main"]);
        std::fs::create_dir_all(work.join("sub")).expect("mkdir");
        std::fs::write(work.join("sub/a.txt"), "first").expect("w");
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", "one"]);
        let first = git(&work, &["rev-parse", "HEAD"]);
        std::fs::write(work.join("sub/a.txt"), "second").expect("w");
        git(&work, &["commit", "-q", "-am", "two"]);
        std::fs::create_dir_all(&base).expect("mkdir");
        git(
            tmp.path(),
            &[
                "clone",
                "-q",
                "--bare",
                work.to_str().expect("utf8"),
                base.join("repo.git").to_str().expect("utf8"),
            ],
        );
        let port = free_port();
        let _daemon = Server(
            Command::new("git")
                .args([
                    "daemon",
                    "--reuseaddr",
                    "--export-all",
                    "--listen=127.0.0.1",
                ])
                .arg(format!("--port={port}"))
                .arg(format!("--base-path={}", base.display()))
                .arg(&base)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("git daemon"),
        );
        wait_port(port);
        let url = format!("git://127.0.0.1:{port}/repo.git");
        let attrs = |extra: &[(&str, &str)]| {
            let mut m = BTreeMap::from([("git.fullurl".to_string(), url.clone())]);
            for (k, v) in extra {
                m.insert(k.to_string(), v.to_string());
            }
            m
        };
        let ident = format!("git://127.0.0.1:{port}/repo.git");
        let r = source(&w, &format!("{ident}#main"), attrs(&[]))
            .await
            .expect("clone main");
        let d = w.store().diff_dir(&r);
        assert_eq!(
            std::fs::read_to_string(d.join("sub/a.txt")).expect("a"),
            "second"
        );
        assert!(!d.join(".git").exists(), ".git dropped by default");

        let r = source(
            &w,
            &format!("{ident}#{first}:sub"),
            attrs(&[("git.keepgitdir", "true")]),
        )
        .await
        .expect("by commit");
        let d = w.store().diff_dir(&r);
        assert_eq!(
            std::fs::read_to_string(d.join("a.txt")).expect("subdir"),
            "first"
        );

        let r = source(
            &w,
            &format!("{ident}#main"),
            attrs(&[("git.keepgitdir", "true")]),
        )
        .await
        .expect("keep");
        assert!(w.store().diff_dir(&r).join(".git").is_dir());

        let err = source(
            &w,
            &format!("{ident}#main"),
            attrs(&[("git.checksum", &first[..12])]),
        )
        .await;
        assert!(
            err.expect_err("checksum of another commit")
                .to_string()
                .contains("expected checksum")
        );
        let ok = source(
            &w,
            &format!("{ident}#{first}"),
            attrs(&[("git.checksum", &first[..12])]),
        )
        .await;
        assert!(ok.is_ok(), "{ok:?}");

        // a ref that reads as an option runs nothing on the host
        let marker = tmp.path().join("ran-on-the-host");
        let evil = format!("--upload-pack=touch {}", marker.display());
        let err = source(&w, &format!("{ident}#{evil}"), attrs(&[])).await;
        assert!(err.is_err(), "{err:?}");
        assert!(!marker.exists(), "the ref ran a command");
    }

    #[tokio::test]
    async fn http_source_downloads_with_checksum_filename_and_perms() {
        let (tmp, w) = testutil::worker();
        let www = tmp.path().join("www");
        std::fs::create_dir_all(&www).expect("mkdir");
        std::fs::write(www.join("data.bin"), "payload").expect("w");
        let port = free_port();
        let _srv = Server(
            Command::new("python3")
                .args([
                    "-m",
                    "http.server",
                    "--bind",
                    "127.0.0.1",
                    &port.to_string(),
                ])
                .current_dir(&www)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("python3"),
        );
        wait_port(port);
        let url = format!("http://127.0.0.1:{port}/data.bin");
        let sum = kiln_digest::sha256(b"payload");
        let r = source(&w, &url, BTreeMap::new()).await.expect("download");
        let f = w.store().diff_dir(&r).join("data.bin");
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&f).expect("file");
        assert_eq!(
            (
                md.mode() & 0o777,
                std::fs::read_to_string(&f).expect("read")
            ),
            (0o600, "payload".to_string())
        );
        assert!(md.mtime() > 0, "Last-Modified kept");

        let attrs = BTreeMap::from([
            ("http.checksum".to_string(), sum.clone()),
            ("http.filename".to_string(), "renamed".to_string()),
            ("http.perm".to_string(), "755".to_string()),
            ("http.uid".to_string(), "1000".to_string()),
            ("http.gid".to_string(), "1001".to_string()),
        ]);
        let r = source(&w, &url, attrs).await.expect("download with attrs");
        let md = std::fs::metadata(w.store().diff_dir(&r).join("renamed")).expect("renamed");
        assert_eq!((md.mode() & 0o777, md.uid(), md.gid()), (0o755, 1000, 1001));

        let bad = BTreeMap::from([(
            "http.checksum".to_string(),
            format!("sha256:{}", "0".repeat(64)),
        )]);
        let err = source(&w, &url, bad).await.expect_err("checksum mismatch");
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        let escape = BTreeMap::from([("http.filename".to_string(), "../x".to_string())]);
        assert!(source(&w, &url, escape).await.is_err());
        let missing = source(
            &w,
            &format!("http://127.0.0.1:{port}/nope"),
            BTreeMap::new(),
        )
        .await;
        assert!(missing.is_err());
    }
}
