//! Source ops: `docker-image://` (pulled with kiln-registry, one snapshot per layer, cached
//! by chain id), `local://` (synced from the client session, copied into a snapshot),
//! `git://` (fetched with the `git` CLI) and `http(s)://` (one downloaded file).

use crate::error::{Error, Result};
use crate::snapshot::{self, Kind, LayerBlob};
use crate::{Event, Worker, fscopy, pb};
use futures::StreamExt;
use sha2::Digest;
use std::collections::BTreeMap;
use tokio::sync::mpsc;

pub async fn run(
    w: &Worker,
    s: &pb::SourceOp,
    platform: Option<&pb::Platform>,
    req: &crate::RunRequest,
    events: &mpsc::Sender<Event>,
) -> Result<Option<String>> {
    let session_id = req.session_id.as_str();
    if let Some(r) = s.identifier.strip_prefix("docker-image://") {
        image(w, r, platform, session_id, events).await
    } else if let Some(name) = s.identifier.strip_prefix("local://") {
        local(
            w,
            name,
            &s.attrs,
            session_id,
            &req.session_shared_key,
            events,
        )
        .await
        .map(Some)
    } else if let Some(rest) = s.identifier.strip_prefix("git://") {
        git(w, rest, &s.attrs).await.map(Some)
    } else if s.identifier.starts_with("http://") || s.identifier.starts_with("https://") {
        http(w, &s.identifier, &s.attrs).await.map(Some)
    } else {
        Err(Error::UnsupportedSource {
            identifier: s.identifier.clone(),
        })
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

fn oci_platform(p: Option<&pb::Platform>) -> kiln_oci::Platform {
    match p.filter(|p| !p.os.is_empty() && !p.architecture.is_empty()) {
        Some(p) => kiln_oci::Platform::new(
            &p.os,
            &p.architecture,
            Some(p.variant.as_str()).filter(|v| !v.is_empty()),
        ),
        None => kiln_oci::Platform::new("linux", "amd64", None),
    }
}

fn diff_ids(config: &[u8]) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(config).ok()?;
    v.get("rootfs")?
        .get("diff_ids")?
        .as_array()?
        .iter()
        .map(|d| d.as_str().map(str::to_string))
        .collect()
}

/// Pulls and unpacks an image; returns the top layer's snapshot (`None` for no layers).
pub async fn image(
    w: &Worker,
    r: &str,
    platform: Option<&pb::Platform>,
    session_id: &str,
    events: &mpsc::Sender<Event>,
) -> Result<Option<String>> {
    let reg = |source| Error::Registry {
        reference: r.to_string(),
        source,
    };
    let reference = kiln_registry::Reference::parse(r).map_err(reg)?;
    let plat = oci_platform(platform);
    // concurrent pulls of one image wait for the first (its layers are then found)
    let _pull = w
        .pull_lock(format!("image {r} {plat:?}"))
        .lock_owned()
        .await;
    // a private registry: the client's credentials, asked through its session
    let registry =
        match kiln_session::credentials_via(&w.config().broker, session_id, &reference.registry)
            .await
        {
            Some(c) => {
                let host = reference.registry.clone();
                w.registry
                    .clone()
                    .with_credentials(std::sync::Arc::new(move |h: &str| {
                        (h == host).then(|| c.clone())
                    }))
            }
            None => w.registry.clone(),
        };
    let resolved = registry.resolve(&reference, &plat).await.map_err(reg)?;
    let ids = diff_ids(&resolved.config).ok_or_else(|| Error::Image {
        reference: r.to_string(),
        reason: "config has no rootfs.diff_ids".into(),
    })?;
    // an image's diff_ids name paths of the layer index: only real digests
    if let Some(bad) = ids.iter().find(|d| kiln_oci::digest::hex_part(d).is_none()) {
        return Err(Error::Image {
            reference: r.to_string(),
            reason: format!("rootfs.diff_ids holds {bad:?}, which is not a sha256 digest"),
        });
    }
    let layers = resolved.manifest.layers.clone();
    if ids.len() != layers.len() {
        return Err(Error::Image {
            reference: r.to_string(),
            reason: format!("{} layers but {} diff_ids", layers.len(), ids.len()),
        });
    }
    let store = w.store().clone();
    // chain ids and cache index paths, bottom layer first
    let mut chain: Vec<(kiln_oci::Descriptor, String, std::path::PathBuf)> = Vec::new();
    let mut chain_id: Option<String> = None;
    for (desc, diff_id) in layers.into_iter().zip(ids) {
        let cid = match &chain_id {
            None => diff_id.clone(),
            Some(c) => format!("sha256:{}", sha256_hex(format!("{c} {diff_id}").as_bytes())),
        };
        chain_id = Some(cid.clone());
        let index = w
            .config()
            .root
            .join("image-layers")
            .join(cid.trim_start_matches("sha256:"));
        chain.push((desc, diff_id, index));
    }
    // missing blobs download up to PULL_CONCURRENCY at a time, ahead of the unpacking,
    // which goes in order as each arrives
    let mut fetches = Vec::new();
    for (desc, _, index) in &chain {
        let blob = w.blob_path(&desc.digest)?;
        let needed = !blob.exists() && !index.exists();
        let (registry, reference, desc) = (registry.clone(), reference.clone(), desc.clone());
        let events = events.clone();
        let lock = w.pull_lock(format!("blob {}", desc.digest));
        fetches.push(async move {
            if needed {
                // another image's pull may be fetching the same blob
                let _blob = lock.lock_owned().await;
                if !blob.exists() {
                    fetch_layer(&registry, &reference, &desc, &blob, &events).await?;
                }
            }
            Ok::<_, Error>(blob)
        });
    }
    let mut fetched = futures::stream::iter(fetches).buffered(PULL_CONCURRENCY);
    let mut parent: Option<String> = None;
    for (desc, diff_id, index) in chain {
        let blob = match fetched.next().await {
            Some(b) => b?,
            None => w.blob_path(&desc.digest)?,
        };
        // one unpack of a layer chain at a time, whichever image it came with
        let _layer = w
            .pull_lock(format!("layer {}", index.display()))
            .lock_owned()
            .await;
        if let Ok(id) = std::fs::read_to_string(&index)
            && store.meta(id.trim()).is_ok_and(|m| m.parent == parent)
        {
            parent = Some(id.trim().to_string());
            continue;
        }
        if !blob.exists() {
            let _blob = w
                .pull_lock(format!("blob {}", desc.digest))
                .lock_owned()
                .await;
            if !blob.exists() {
                fetch_layer(&registry, &reference, &desc, &blob, events).await?;
            }
        }
        let store = store.clone();
        let p = parent.clone();
        let reference_name = r.to_string();
        let id = tokio::task::spawn_blocking(move || -> Result<String> {
            let st = store.prepare(p.as_deref())?;
            let m = store.mount_rw(&st)?;
            let layer = |source| Error::Layer {
                digest: desc.digest.clone(),
                source,
            };
            let f = std::fs::File::open(&blob).map_err(Error::io("open", &blob))?;
            let reader = kiln_oci::layer::decompress(f).map_err(layer)?;
            // the layer's content is hashed as it is applied and must be what the
            // config claims, or another image's layer could be passed off under its
            // diff_id (and found by every later pull of that image through `index`)
            let mut hashed = kiln_oci::digest::DigestReader::new(reader);
            kiln_oci::layer::apply(&mut hashed, m.path()).map_err(layer)?;
            let (content, _) = hashed
                .finish()
                .map_err(|source| layer(kiln_oci::Error::ReadLayer { source }))?;
            if content != diff_id {
                return Err(Error::Image {
                    reference: reference_name.clone(),
                    reason: format!(
                        "layer {} holds content {content}, but the config's rootfs.diff_ids names {diff_id}",
                        desc.digest
                    ),
                });
            }
            m.unmount()?;
            store.commit(
                st,
                Kind::Image,
                Some(LayerBlob {
                    descriptor: desc,
                    diff_id,
                }),
            )
        })
        .await??;
        snapshot::write_atomic(&index, id.as_bytes())?;
        parent = Some(id);
    }
    Ok(parent)
}

/// Image layers downloaded at once by one pull.
const PULL_CONCURRENCY: usize = 3;

/// Downloads one layer blob to `blob` (through a temp file), with progress events.
async fn fetch_layer(
    registry: &kiln_registry::Client,
    reference: &kiln_registry::Reference,
    desc: &kiln_oci::Descriptor,
    blob: &std::path::Path,
    events: &mpsc::Sender<Event>,
) -> Result<()> {
    let total = desc.size as i64;
    let _ = events
        .send(Event::Progress {
            id: desc.digest.clone(),
            current: 0,
            total,
            completed: false,
        })
        .await;
    let tmp = blob.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
    if let Err(source) = registry.fetch_blob(reference, desc, &tmp).await {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Registry {
            reference: reference.to_string(),
            source,
        });
    }
    std::fs::rename(&tmp, blob).map_err(Error::io("rename", blob))?;
    let _ = events
        .send(Event::Progress {
            id: desc.digest.clone(),
            current: total,
            total,
            completed: true,
        })
        .await;
    Ok(())
}

fn json_list(attrs: &BTreeMap<String, String>, key: &str) -> Result<Vec<String>> {
    match attrs.get(key).filter(|v| !v.is_empty()) {
        None => Ok(Vec::new()),
        Some(v) => {
            serde_json::from_str(v).map_err(|e| Error::InvalidOp(format!("attr {key}: {e}")))
        }
    }
}

/// Syncs the client's local dir `name` into a persistent dir, which then becomes a snapshot
/// (see [`relink_synced_dir`]); reports the bytes that went over as `transferring NAME:`.
pub async fn local(
    w: &Worker,
    name: &str,
    attrs: &BTreeMap<String, String>,
    session_id: &str,
    shared_key: &str,
    events: &mpsc::Sender<Event>,
) -> Result<String> {
    let session = attrs
        .get("local.session")
        .filter(|s| !s.is_empty())
        .map(String::as_str)
        .unwrap_or(session_id);
    if session.is_empty() {
        return Err(Error::InvalidOp(format!(
            "local source {name:?} without a session"
        )));
    }
    let hint = attrs
        .get("local.sharedkeyhint")
        .map(String::as_str)
        .unwrap_or(name);
    let dir = w
        .config()
        .root
        .join("local")
        // one persistent copy per client dir (the session's shared key):
        // two projects never sync over each other's files
        .join(sha256_hex(
            format!("{name}\0{hint}\0{shared_key}").as_bytes(),
        ));
    WANTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(dir.clone());
    let guard = w.local_lock(&dir).lock_owned().await;
    {
        let mut wanted = WANTED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = wanted.iter().position(|d| *d == dir) {
            wanted.swap_remove(i);
        }
    }
    // a killed daemon may have left the synced dir half re-linked: start it
    // again from the last snapshot (or, failing that, sync everything)
    let store = w.store().clone();
    let (d, st) = (dir.clone(), store.clone());
    tokio::task::spawn_blocking(move || restore_synced_dir(&st, &d)).await??;
    let opts = kiln_session::SyncOptions {
        include_patterns: json_list(attrs, "local.includepattern")?,
        exclude_patterns: json_list(attrs, "local.excludepatterns")?,
        follow_paths: json_list(attrs, "local.followpaths")?,
    };
    let sess = |source| Error::Session {
        name: name.to_string(),
        source,
    };
    // the digest table of the last sync is out of the registry while the
    // directory changes; it goes back only once the new tree is hashed
    let known = crate::contenthash::take_dir_sums(&dir);
    let started = std::time::Instant::now();
    let channel = kiln_session::dial::connect(&w.config().broker)
        .await
        .map_err(sess)?;
    let received = kiln_session::SessionClient::new(channel, session.to_string())
        .sync_dir(name, &dir, &opts)
        .await
        .map_err(sess)?;
    let synced = started.elapsed();
    let _ = events
        .send(Event::Progress {
            id: format!("transferring {name}:"),
            current: received.bytes as i64,
            total: 0,
            completed: true,
        })
        .await;
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        use crate::contenthash;
        // the receiver wrote nothing that a digest covers: the tree is the
        // one hashed after the last sync (only the receiver writes it)
        let (key, hashed, sums) = match known.tree_digest() {
            Some(d) if !received.changed => (d.to_string(), Default::default(), known),
            _ => {
                let (key, hashed, sums) = contenthash::tree_cached(&dir, &known)?;
                (key, hashed, std::sync::Arc::new(sums))
            }
        };
        let after_hash = started.elapsed();
        // an unchanged context reuses the snapshot of the last sync
        let last = dir.with_extension("last");
        let reused = std::fs::read_to_string(&last)
            .ok()
            .and_then(|s| {
                s.split_once('\n')
                    .map(|(k, id)| (k.to_string(), id.trim().to_string()))
            })
            .filter(|(k, _)| *k == key)
            .map(|(_, id)| id)
            .filter(|id| {
                store
                    .meta(id)
                    .is_ok_and(|m| m.content_key.as_deref() == Some(key.as_str()))
            });
        let (id, how) = match reused {
            Some(id) => (id, "reused"),
            None => {
                // The synced dir's files are only ever replaced (a new inode
                // renamed over the path), never rewritten, so the snapshot
                // and the synced dir can share them. The synced dir itself
                // becomes the snapshot's content (a rename), and a linked
                // copy of it is made again for the next sync off this
                // build's path (see `relink_synced_dir`).
                let mut st = store.prepare(None)?;
                let moved = std::fs::rename(&dir, st.diff()).is_ok();
                if !moved {
                    // another filesystem: link (or copy) the files over
                    fscopy::link_tree(&dir, &st.diff())
                        .map_err(Error::io("snapshot local dir", &dir))?;
                }
                st.content_key = Some(key.clone());
                let id = store.commit(st, Kind::Local, None)?;
                let tmp = last.with_extension("last.tmp");
                std::fs::write(&tmp, format!("{key}\n{id}\n"))
                    .map_err(Error::io("write", &tmp))?;
                std::fs::rename(&tmp, &last).map_err(Error::io("rename", &last))?;
                if moved {
                    let from = std::fs::canonicalize(store.diff_dir(&id))
                        .map_err(Error::io("resolve", store.diff_dir(&id)))?;
                    relink_synced_dir(from, dir.clone(), guard);
                    (id, "new, moved in")
                } else {
                    (id, "new, hard-linked")
                }
            }
        };
        contenthash::remember_snapshot(&id, sums.clone());
        contenthash::put_dir_sums(&dir, sums);
        tracing::debug!(
            target: "kiln_timing",
            "local source {name}: sync {} ms ({} entries, {} files / {} bytes received, {} removed, \
             changed {}), hash {} ms ({} files, {} read / {} bytes), snapshot {} ms ({})",
            synced.as_millis(),
            received.entries,
            received.transferred,
            received.bytes,
            received.removed,
            received.changed,
            (after_hash - synced).as_millis(),
            hashed.files,
            hashed.read,
            hashed.bytes_read,
            (started.elapsed() - after_hash).as_millis(),
            how,
        );
        Ok(id)
    })
    .await?
}

/// Where a synced dir is re-linked before it takes its place.
fn relinking(dir: &std::path::Path) -> std::path::PathBuf {
    dir.with_extension("relink")
}

/// Makes `dir` a hard-linked copy of `from`: built beside it, then renamed in, so a
/// killed daemon leaves either no `dir` or a whole one (and a half-made copy that
/// the next attempt removes).
fn link_in(from: &std::path::Path, dir: &std::path::Path) -> std::io::Result<()> {
    let tmp = relinking(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    let res = fscopy::link_tree(from, &tmp).and_then(|()| std::fs::rename(&tmp, dir));
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

/// Synced dirs a local source is waiting to lock.
static WANTED: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Makes `dir` again, after its content moved into a snapshot: a copy of the
/// snapshot's diff `from` with its files hard-linked (the same inodes, so the
/// per-file digests of the last sync still hold for it). Runs on a thread of
/// its own at the lowest CPU priority, holding the dir's lock (`guard`), once
/// the worker is quiet (the build that made the snapshot has usually ended),
/// or at once when a sync of the same dir waits for it.
fn relink_synced_dir(
    from: std::path::PathBuf,
    dir: std::path::PathBuf,
    guard: tokio::sync::OwnedMutexGuard<()>,
) {
    let spawned = std::thread::Builder::new()
        .name("local-relink".into())
        .spawn(move || {
            #[allow(unsafe_code)]
            // SAFETY: setpriority on this thread (who 0 = the calling thread's id).
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, 19);
            }
            super::wait_quiet(
                std::time::Duration::from_millis(100),
                std::time::Duration::from_secs(10),
                || {
                    WANTED
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(&dir)
                },
            );
            let started = std::time::Instant::now();
            match link_in(&from, &dir) {
                Ok(()) => tracing::debug!(
                    target: "kiln_timing",
                    "synced dir {} re-linked in {} ms",
                    dir.display(),
                    started.elapsed().as_millis()
                ),
                Err(e) => {
                    // the next sync starts from an empty dir: slower, not wrong
                    tracing::warn!(dir = %dir.display(), error = %e, "re-link synced dir");
                }
            }
            drop(guard);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "start the synced dir re-link thread");
    }
}

/// Before a sync: when `dir` is missing (its re-link was cut short by a
/// killed daemon), makes it again from the snapshot named in its `.last`
/// record, so the sync stays incremental; otherwise an empty dir.
fn restore_synced_dir(store: &snapshot::Store, dir: &std::path::Path) -> Result<()> {
    let tmp = relinking(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(Error::io("remove", &tmp))?;
    }
    if dir.exists() {
        return Ok(());
    }
    let last = std::fs::read_to_string(dir.with_extension("last")).unwrap_or_default();
    let from = last
        .lines()
        .nth(1)
        .filter(|id| store.meta(id).is_ok_and(|m| m.kind == Kind::Local))
        .and_then(|id| std::fs::canonicalize(store.diff_dir(id)).ok());
    if let Some(from) = from
        && link_in(&from, dir).is_ok()
    {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(Error::io("create", dir))
}

/// Runs `git ARGS` in `dir` with no user or system config and no prompts.
fn git_cmd(dir: &std::path::Path, home: &std::path::Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", home)
        .env("GIT_PROTOCOL_FROM_USER", "0")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::Git {
            remote: String::new(),
            reason: format!("run git: {e}"),
        })?;
    if !out.status.success() {
        return Err(Error::Git {
            remote: String::new(),
            reason: format!(
                "git {}: {}",
                args.first().copied().unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn is_commit_sha(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Clones `rest` (`host/path.git#ref:subdir`; `git.fullurl` gives the URL with its
/// scheme) at one ref or commit into a snapshot.
pub async fn git(w: &Worker, rest: &str, attrs: &BTreeMap<String, String>) -> Result<String> {
    let (remote_part, fragment) = rest.split_once('#').unwrap_or((rest, ""));
    let (git_ref, subdir) = fragment.split_once(':').unwrap_or((fragment, ""));
    let remote = attrs
        .get("git.fullurl")
        .filter(|u| !u.is_empty())
        .map(|u| u.split_once('#').map_or(u.as_str(), |(u, _)| u).to_string())
        .unwrap_or_else(|| format!("https://{remote_part}"));
    let keep_git_dir = attrs.get("git.keepgitdir").is_some_and(|v| v == "true");
    let checksum = attrs.get("git.checksum").cloned().unwrap_or_default();
    let (git_ref, subdir) = (git_ref.to_string(), subdir.to_string());
    let store = w.store().clone();
    let tmp_root = w.config().root.join("tmp");
    let err_remote = remote.clone();
    tokio::task::spawn_blocking(move || -> Result<String> {
        let with_remote = |e: Error| match e {
            Error::Git { reason, .. } => Error::Git {
                remote: err_remote.clone(),
                reason,
            },
            other => other,
        };
        let home = tempfile::Builder::new()
            .prefix("git-home-")
            .tempdir_in(&tmp_root)
            .map_err(Error::io("create", &tmp_root))?;
        let mut st = store.prepare(None)?;
        let work = home.path().join("checkout");
        std::fs::create_dir(&work).map_err(Error::io("create", &work))?;
        let g = |args: &[&str]| git_cmd(&work, home.path(), args).map_err(with_remote);
        // the ref and remote come from the build: never options to git (a ref like
        // `--upload-pack=CMD` would run CMD on the worker's host)
        if git_ref.starts_with('-') || remote.starts_with('-') {
            return Err(Error::Git {
                remote: err_remote.clone(),
                reason: format!("ref {git_ref:?} or remote starts with '-'"),
            });
        }
        g(&["init", "-q"])?;
        g(&["remote", "add", "--end-of-options", "origin", &remote])?;
        let want = if git_ref.is_empty() {
            "HEAD"
        } else {
            git_ref.as_str()
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
        if !checksum.is_empty() && !commit.starts_with(&checksum) {
            return Err(Error::Git {
                remote: err_remote.clone(),
                reason: format!("expected checksum {checksum} but got {commit}"),
            });
        }
        if is_commit_sha(want) && !commit.starts_with(want) {
            return Err(Error::Git {
                remote: err_remote.clone(),
                reason: format!("fetched {commit} instead of {want}"),
            });
        }
        if keep_git_dir {
            // a branch name for the checkout, as BuildKit leaves it
            if !git_ref.is_empty() && !is_commit_sha(&git_ref) {
                let _ = g(&[
                    "checkout",
                    "-q",
                    "-B",
                    git_ref.trim_start_matches("refs/heads/"),
                ]);
            }
        } else {
            let dot_git = work.join(".git");
            std::fs::remove_dir_all(&dot_git).map_err(Error::io("remove", &dot_git))?;
        }
        let src = if subdir.is_empty() {
            work.clone()
        } else {
            let p = crate::rootpath::resolve(&work, &subdir, true)
                .map_err(Error::io("resolve", &subdir))?;
            if !p.is_dir() {
                return Err(Error::Git {
                    remote: err_remote.clone(),
                    reason: format!("subdir {subdir} not found"),
                });
            }
            p
        };
        fscopy::copy_entry(&src, &st.diff(), &fscopy::CopyOpts::default())
            .map_err(Error::io("copy checkout", &src))?;
        st.content_key = Some(format!("git:{commit}:{keep_git_dir}:{subdir}"));
        store.commit(st, Kind::Built, None)
    })
    .await?
}

/// Downloads one file into a snapshot: `http.filename` (default: the last path
/// segment), `http.perm` (octal, default 0600), `http.uid`/`http.gid`, verified
/// against `http.checksum` (sha256:...) when given.
pub async fn http(w: &Worker, url: &str, attrs: &BTreeMap<String, String>) -> Result<String> {
    let herr = |reason: String| Error::Http {
        url: url.to_string(),
        reason,
    };
    let filename = attrs
        .get("http.filename")
        .filter(|f| !f.is_empty())
        .cloned()
        .unwrap_or_else(|| {
            let path = url.split(['?', '#']).next().unwrap_or(url);
            let rest = path.split_once("://").map_or(path, |(_, r)| r);
            match rest.split_once('/') {
                Some((_, p)) => p
                    .trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .filter(|b| !b.is_empty())
                    .unwrap_or("index")
                    .to_string(),
                None => "index".to_string(),
            }
        });
    if filename.contains('/') || filename == ".." || filename == "." {
        return Err(herr(format!("invalid filename {filename:?}")));
    }
    let parse_num = |k: &str, radix: u32| -> Result<Option<u32>> {
        attrs
            .get(k)
            .filter(|v| !v.is_empty())
            .map(|v| u32::from_str_radix(v, radix).map_err(|_| herr(format!("invalid {k} {v:?}"))))
            .transpose()
    };
    let perm = parse_num("http.perm", 8)?.unwrap_or(0o600);
    let uid = parse_num("http.uid", 10)?.unwrap_or(0);
    let gid = parse_num("http.gid", 10)?.unwrap_or(0);
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| herr(e.to_string()))?;
    let mut resp = client
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| herr(e.to_string()))?;
    let mtime = resp
        .headers()
        .get(reqwest::header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(httpdate_to_unix);
    let mut st = w.store().prepare(None)?;
    let path = st.diff().join(&filename);
    let mut hasher = sha2::Sha256::new();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).map_err(Error::io("create", &path))?;
        while let Some(chunk) = resp.chunk().await.map_err(|e| herr(e.to_string()))? {
            hasher.update(&chunk);
            f.write_all(&chunk).map_err(Error::io("write", &path))?;
        }
    }
    let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
    if let Some(want) = attrs.get("http.checksum").filter(|c| !c.is_empty())
        && *want != digest
    {
        return Err(herr(format!("digest mismatch {digest}: expected {want}")));
    }
    let times = match mtime {
        Some(t) => fscopy::timespec(t * 1_000_000_000),
        None => fscopy::timespec(0),
    };
    fscopy::set_meta(&path, (uid, gid), Some(perm), times).map_err(Error::io("chmod", &path))?;
    st.content_key = Some(format!("http:{digest}:{filename}:{perm:o}:{uid}:{gid}"));
    let store = w.store().clone();
    tokio::task::spawn_blocking(move || store.commit(st, Kind::Built, None)).await?
}

/// Parses an RFC 7231 date ("Sun, 06 Nov 1994 08:49:37 GMT") to unix seconds.
fn httpdate_to_unix(s: &str) -> Option<i64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, mon, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == mon)? as i64
        + 1;
    let (d, y): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let t: Vec<i64> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [h, mi, se] = t.as_slice() else {
        return None;
    };
    // days from civil (Howard Hinnant)
    let (y2, m2) = if month <= 2 {
        (y - 1, month + 9)
    } else {
        (y, month - 3)
    };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + mi * 60 + se)
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
        let sum = {
            use sha2::Digest;
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(b"payload")))
        };
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
