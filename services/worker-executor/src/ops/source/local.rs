//! `local://` sources: the client's directory, synced through its session into a
//! persistent dir per client dir, which then becomes a snapshot (see
//! [`relink_synced_dir`]); an unchanged context reuses the snapshot of the last sync.

use crate::contenthash::{self, FileSums, HashStats};
use crate::error::{Error, Result};
use crate::snapshot::{self, Kind};
use crate::{Event, Worker, fscopy};
use kiln_session::filesync::ReceiveStats;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The persistent synced dirs of one worker: one lock per dir, and the dirs
/// a sync is waiting to lock (whose re-link then goes at once).
#[derive(Debug, Default)]
pub struct SyncedDirs {
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    wanted: Arc<Mutex<Vec<PathBuf>>>,
}

impl SyncedDirs {
    /// Locks `dir`, marked as wanted while waiting.
    async fn lock(&self, dir: &Path) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(dir.to_path_buf()).or_default().clone()
        };
        lock_list(&self.wanted).push(dir.to_path_buf());
        let guard = lock.lock_owned().await;
        let mut wanted = lock_list(&self.wanted);
        if let Some(i) = wanted.iter().position(|d| d == dir) {
            wanted.swap_remove(i);
        }
        guard
    }
}

fn lock_list(l: &Mutex<Vec<PathBuf>>) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

fn json_list(attrs: &BTreeMap<String, String>, key: &str) -> Result<Vec<String>> {
    match attrs.get(key).filter(|v| !v.is_empty()) {
        None => Ok(Vec::new()),
        Some(v) => serde_json::from_str(v).map_err(|source| Error::SourceAttr {
            key: key.to_string(),
            source,
        }),
    }
}

/// What a local source op asks for.
pub(super) struct LocalSource<'a> {
    pub name: &'a str,
    pub attrs: &'a BTreeMap<String, String>,
    /// the build's session, used unless `local.session` names another
    pub session_id: &'a str,
    /// the session's shared key (its context dir)
    pub shared_key: &'a str,
}

/// Syncs the client's local dir into its persistent dir, which then becomes a snapshot;
/// reports the bytes that went over as `transferring NAME:`.
pub(super) async fn local(
    w: &Worker,
    src: LocalSource<'_>,
    events: &mpsc::Sender<Event>,
) -> Result<String> {
    let name = src.name;
    let session = src
        .attrs
        .get("local.session")
        .filter(|s| !s.is_empty())
        .map(String::as_str)
        .unwrap_or(src.session_id);
    if session.is_empty() {
        return Err(Error::NoSession {
            name: name.to_string(),
        });
    }
    let hint = src
        .attrs
        .get("local.sharedkeyhint")
        .map(String::as_str)
        .unwrap_or(name);
    // one persistent copy per client dir (the session's shared key):
    // two projects never sync over each other's files
    let dir = w.config().root.join("local").join(kiln_digest::sha256_hex(
        format!("{name}\0{hint}\0{}", src.shared_key).as_bytes(),
    ));
    let guard = w.synced_dirs.lock(&dir).await;
    // a killed daemon may have left the synced dir half re-linked: start it
    // again from the last snapshot (or, failing that, sync everything)
    let store = w.store().clone();
    let (d, st) = (dir.clone(), store.clone());
    tokio::task::spawn_blocking(move || restore_synced_dir(&st, &d)).await??;
    let opts = kiln_session::SyncOptions {
        include_patterns: json_list(src.attrs, "local.includepattern")?,
        exclude_patterns: json_list(src.attrs, "local.excludepatterns")?,
        follow_paths: json_list(src.attrs, "local.followpaths")?,
    };
    // the digest table of the last sync is out of the registry while the
    // directory changes; it goes back only once the new tree is hashed
    let known = w.sums.take_dir(&dir);
    let started = Instant::now();
    let received = sync(w, session, name, &dir, &opts).await?;
    let _ = events
        .send(Event::Progress {
            id: format!("transferring {name}:"),
            current: received.bytes as i64,
            total: 0,
            completed: true,
        })
        .await;
    let synced = Synced {
        name: name.to_string(),
        dir,
        received,
        known,
        started,
        sync_time: started.elapsed(),
        guard,
        wanted: w.synced_dirs.wanted.clone(),
        sums: w.sums.clone(),
        activity: w.activity.clone(),
    };
    tokio::task::spawn_blocking(move || synced.snapshot(&store)).await?
}

/// Syncs the session's dir `name` into `dir`.
async fn sync(
    w: &Worker,
    session: &str,
    name: &str,
    dir: &Path,
    opts: &kiln_session::SyncOptions,
) -> Result<ReceiveStats> {
    let sess = |source| Error::Session {
        name: name.to_string(),
        source,
    };
    let channel = kiln_session::dial::connect(&w.config().broker)
        .await
        .map_err(sess)?;
    kiln_session::SessionClient::new(channel, session.to_string())
        .sync_dir(name, dir, opts)
        .await
        .map_err(sess)
}

/// A synced dir, about to become a snapshot.
struct Synced {
    name: String,
    dir: PathBuf,
    received: ReceiveStats,
    /// the digest table of the last sync
    known: Arc<FileSums>,
    started: Instant,
    sync_time: Duration,
    /// the dir's lock, held until it is whole again
    guard: tokio::sync::OwnedMutexGuard<()>,
    wanted: Arc<Mutex<Vec<PathBuf>>>,
    sums: Arc<contenthash::SumTables>,
    activity: crate::ops::Activity,
}

impl Synced {
    /// Makes the snapshot of the synced dir (or finds the last one, unchanged).
    fn snapshot(self, store: &snapshot::Store) -> Result<String> {
        // the receiver wrote nothing that a digest covers: the tree is the
        // one hashed after the last sync (only the receiver writes it)
        let (key, hashed, sums) = match self.known.tree_digest() {
            Some(d) if !self.received.changed => {
                (d.to_string(), HashStats::default(), self.known.clone())
            }
            _ => {
                let (key, hashed, sums) = contenthash::tree_cached(&self.dir, &self.known)?;
                (key, hashed, Arc::new(sums))
            }
        };
        let after_hash = self.started.elapsed();
        let last = self.dir.with_extension("last");
        let (id, how) = match last_snapshot(store, &last, &key) {
            Some(id) => (id, "reused"),
            None => match self.commit(store, &key, &last)? {
                (id, Some(moved_from)) => {
                    relink_synced_dir(
                        moved_from,
                        self.dir.clone(),
                        self.guard,
                        self.wanted,
                        self.activity,
                    );
                    (id, "new, moved in")
                }
                (id, None) => (id, "new, hard-linked"),
            },
        };
        self.sums.remember_snapshot(&id, sums.clone());
        self.sums.put_dir(&self.dir, sums);
        let r = &self.received;
        tracing::debug!(
            target: "kiln_timing",
            "local source {}: sync {} ms ({} entries, {} files / {} bytes received, {} removed, \
             changed {}), hash {} ms ({} files, {} read / {} bytes), snapshot {} ms ({})",
            self.name,
            self.sync_time.as_millis(),
            r.entries,
            r.transferred,
            r.bytes,
            r.removed,
            r.changed,
            (after_hash - self.sync_time).as_millis(),
            hashed.files,
            hashed.read,
            hashed.bytes_read,
            (self.started.elapsed() - after_hash).as_millis(),
            how,
        );
        Ok(id)
    }

    /// A new snapshot of the synced dir with content key `key`, recorded in `last`;
    /// with the snapshot's diff dir when the synced dir was moved there.
    ///
    /// The synced dir's files are only ever replaced (a new inode renamed over the
    /// path), never rewritten, so the snapshot and the synced dir can share them.
    /// The synced dir itself becomes the snapshot's content (a rename), and a linked
    /// copy of it is made again for the next sync off this build's path (see
    /// [`relink_synced_dir`]).
    fn commit(
        &self,
        store: &snapshot::Store,
        key: &str,
        last: &Path,
    ) -> Result<(String, Option<PathBuf>)> {
        let dir = &self.dir;
        let mut st = store.prepare(None)?;
        let moved = std::fs::rename(dir, st.diff()).is_ok();
        if !moved {
            // another filesystem: link (or copy) the files over
            fscopy::link_tree(dir, &st.diff()).map_err(Error::io("snapshot local dir", dir))?;
        }
        st.content_key = Some(key.to_string());
        let id = store.commit(st, Kind::Local, None)?;
        let tmp = last.with_extension("last.tmp");
        std::fs::write(&tmp, format!("{key}\n{id}\n")).map_err(Error::io("write", &tmp))?;
        std::fs::rename(&tmp, last).map_err(Error::io("rename", last))?;
        if !moved {
            return Ok((id, None));
        }
        let diff = store.diff_dir(&id);
        let from = std::fs::canonicalize(&diff).map_err(Error::io("resolve", &diff))?;
        Ok((id, Some(from)))
    }
}

/// The snapshot the `last` record names, when it was made from a tree with digest `key`.
fn last_snapshot(store: &snapshot::Store, last: &Path, key: &str) -> Option<String> {
    let record = std::fs::read_to_string(last).ok()?;
    let (k, id) = record.split_once('\n')?;
    let id = id.trim();
    (k == key
        && store
            .meta(id)
            .is_ok_and(|m| m.content_key.as_deref() == Some(key)))
    .then(|| id.to_string())
}

/// Where a synced dir is re-linked before it takes its place.
fn relinking(dir: &Path) -> PathBuf {
    dir.with_extension("relink")
}

/// Makes `dir` a hard-linked copy of `from`: built beside it, then renamed in, so a
/// killed daemon leaves either no `dir` or a whole one (and a half-made copy that
/// the next attempt removes).
fn link_in(from: &Path, dir: &Path) -> std::io::Result<()> {
    let tmp = relinking(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    let res = fscopy::link_tree(from, &tmp).and_then(|()| std::fs::rename(&tmp, dir));
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

/// Makes `dir` again, after its content moved into a snapshot: a copy of the
/// snapshot's diff `from` with its files hard-linked (the same inodes, so the
/// per-file digests of the last sync still hold for it). Runs on a thread of
/// its own at the lowest CPU priority, holding the dir's lock (`guard`), once
/// the worker is quiet (the build that made the snapshot has usually ended),
/// or at once when a sync of the same dir waits for it (`wanted`).
///
/// The thread is not joined by anyone: it holds the dir's lock, so the next
/// sync of the dir waits for it, and a daemon killed meanwhile leaves a
/// half-made copy that [`restore_synced_dir`] clears.
fn relink_synced_dir(
    from: PathBuf,
    dir: PathBuf,
    guard: tokio::sync::OwnedMutexGuard<()>,
    wanted: Arc<Mutex<Vec<PathBuf>>>,
    activity: crate::ops::Activity,
) {
    let spawned = std::thread::Builder::new()
        .name("local-relink".into())
        .spawn(move || {
            lowest_priority();
            activity.wait_quiet(Duration::from_millis(100), Duration::from_secs(10), || {
                lock_list(&wanted).contains(&dir)
            });
            let started = Instant::now();
            match link_in(&from, &dir) {
                Ok(()) => tracing::debug!(
                    target: "kiln_timing",
                    "synced dir {} re-linked in {} ms",
                    dir.display(),
                    started.elapsed().as_millis()
                ),
                Err(e) => {
                    // the next sync starts from an empty dir: slower, not wrong
                    tracing::warn!(dir = %dir.display(), error = %kiln_proto::status::Chain(&e), "re-link synced dir");
                }
            }
            drop(guard);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %kiln_proto::status::Chain(&e), "start the synced dir re-link thread");
    }
}

/// Lowers the calling thread's CPU priority to the lowest (nice 19).
fn lowest_priority() {
    #[allow(
        unsafe_code,
        reason = "setpriority(2) has no wrapper in nix; a plain call with integer arguments"
    )]
    // SAFETY: setpriority takes no pointers; who 0 = the calling thread's id, so only
    // this thread's priority changes. A failure leaves the priority as it was.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

/// Before a sync: when `dir` is missing (its re-link was cut short by a
/// killed daemon), makes it again from the snapshot named in its `.last`
/// record, so the sync stays incremental; otherwise an empty dir.
fn restore_synced_dir(store: &snapshot::Store, dir: &Path) -> Result<()> {
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
