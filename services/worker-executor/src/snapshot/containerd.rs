//! Snapshots kept in containerd's snapshotter (`[worker.containerd]`).
//!
//! Every kiln snapshot is also a containerd snapshot with the same parent chain: a
//! staging snapshot is the active snapshot `kiln-staging/<worker id>/<uuid>`, committed
//! as `kiln/<uuid>`. Both carry the `kiln.worker` label (so a restarted worker finds what
//! it left) and `containerd.io/gc.root` (so containerd's garbage collector leaves them
//! alone: kiln's prune decides when they go). kiln reads and writes the snapshot dirs
//! itself: a staging snapshot's diff and work dirs are the `upperdir`/`workdir` of the
//! overlay mount containerd returns for it (for a snapshot without parent, the source of
//! the bind mount and its sibling `work`).
//!
//! The [`super::Store`] is synchronous and used from blocking threads, so the gRPC calls
//! run on one dedicated thread that owns a current-thread tokio runtime and the channel;
//! a call sends that thread a job and waits for its reply. Jobs run concurrently there.

use crate::containerd::{ContainerdConfig, WORKER_LABEL, req};
use crate::error::{Error, Result};
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, snapshots_client::SnapshotsClient,
};
use containerd_client::tonic::transport::Channel;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

/// Name prefix of committed kiln snapshots.
pub const COMMITTED_PREFIX: &str = "kiln/";
/// Key prefix of staging (active) kiln snapshots; the worker id follows.
pub const STAGING_PREFIX: &str = "kiln-staging/";
/// How long one call may take (a Remove deletes the snapshot's files before answering).
const CALL_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

type Job =
    Box<dyn FnOnce(SnapshotsClient<Channel>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A connection to containerd's Snapshots service for one worker.
pub struct Snapshots {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    snapshotter: String,
    namespace: String,
    worker: String,
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots")
            .field("snapshotter", &self.snapshotter)
            .field("namespace", &self.namespace)
            .field("worker", &self.worker)
            .finish()
    }
}

/// The writable dirs of a staging snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpperDirs {
    pub diff: PathBuf,
    pub work: PathBuf,
}

/// What the overlay of an active snapshot writes to, from the mounts containerd returned.
pub fn upper_dirs(key: &str, mounts: &[containerd_client::types::Mount]) -> Result<UpperDirs> {
    let bad = |reason: String| Error::ContainerdSnapshot {
        key: key.to_string(),
        reason,
    };
    match mounts {
        [m] if m.r#type == "overlay" => {
            let opt = |name: &str| {
                m.options
                    .iter()
                    .find_map(|o| o.strip_prefix(name))
                    .map(PathBuf::from)
            };
            match (opt("upperdir="), opt("workdir=")) {
                (Some(diff), Some(work)) => Ok(UpperDirs { diff, work }),
                _ => Err(bad(format!(
                    "overlay mount without upperdir and workdir: {:?}",
                    m.options
                ))),
            }
        }
        [m] if m.r#type == "bind" => {
            let diff = PathBuf::from(&m.source);
            let work = diff
                .parent()
                .map(|p| p.join("work"))
                .ok_or_else(|| bad(format!("bind mount of {:?}", m.source)))?;
            Ok(UpperDirs { diff, work })
        }
        other => Err(bad(format!(
            "unsupported mounts {:?} (kiln needs an overlay snapshotter)",
            other.iter().map(|m| m.r#type.as_str()).collect::<Vec<_>>()
        ))),
    }
}

impl Snapshots {
    /// Connects to containerd for the worker `worker_id`, first removing the containers
    /// an earlier run of this worker left (they may still be writing into its staging
    /// snapshots).
    pub fn connect(config: &ContainerdConfig, worker_id: &str) -> Result<Snapshots> {
        let (jobs, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
        let address = config.address.clone();
        let (ns, worker) = (config.namespace.clone(), worker_id.to_string());
        let thread_err = Error::io("start the containerd snapshot thread", address.clone());
        std::thread::Builder::new()
            .name("containerd-snapshots".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(Error::io("start runtime", &address)(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let connected =
                        tokio::time::timeout(CONNECT_TIMEOUT, containerd_client::connect(&address))
                            .await;
                    let ch = match connected {
                        Ok(Ok(ch)) => ch,
                        Ok(Err(source)) => {
                            let _ =
                                ready_tx.send(Err(Error::ContainerdConnect { address, source }));
                            return;
                        }
                        Err(_) => {
                            let _ = ready_tx.send(Err(Error::ContainerdSnapshot {
                                key: String::new(),
                                reason: format!("connect to {}: timed out", address.display()),
                            }));
                            return;
                        }
                    };
                    crate::containerd::reap(&ch, &ns, &worker).await;
                    let _ = ready_tx.send(Ok(()));
                    let client = SnapshotsClient::new(ch);
                    while let Some(job) = rx.recv().await {
                        tokio::spawn(job(client.clone()));
                    }
                });
            })
            .map_err(thread_err)?;
        ready_rx.recv().map_err(|_| Error::ContainerdSnapshot {
            key: String::new(),
            reason: "the containerd snapshot thread ended".into(),
        })??;
        Ok(Snapshots {
            jobs,
            snapshotter: config.snapshotter.clone(),
            namespace: config.namespace.clone(),
            worker: worker_id.to_string(),
        })
    }

    /// containerd's name of the committed snapshot `id`.
    pub fn name(id: &str) -> String {
        format!("{COMMITTED_PREFIX}{id}")
    }

    /// containerd's key of the staging snapshot `id`.
    pub fn staging_key(&self, id: &str) -> String {
        format!("{STAGING_PREFIX}{}/{id}", self.worker)
    }

    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    fn labels(&self) -> HashMap<String, String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        [
            (WORKER_LABEL.to_string(), self.worker.clone()),
            ("containerd.io/gc.root".to_string(), kiln_oci::rfc3339(now)),
        ]
        .into()
    }

    /// Runs `f` on the containerd thread and waits for its answer.
    fn call<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(SnapshotsClient<Channel>) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, tonic::Status>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::new(move |client| {
            Box::pin(async move {
                let r = match tokio::time::timeout(CALL_TIMEOUT, f(client)).await {
                    Ok(r) => r,
                    Err(_) => Err(tonic::Status::deadline_exceeded(
                        "no answer from containerd",
                    )),
                };
                let _ = tx.send(r);
            })
        });
        let gone = || Error::Containerd {
            op,
            id: key.to_string(),
            source: tonic::Status::unavailable("the containerd snapshot thread ended"),
        };
        self.jobs.send(job).map_err(|_| gone())?;
        rx.recv()
            .map_err(|_| gone())?
            .map_err(|source| Error::Containerd {
                op,
                id: key.to_string(),
                source,
            })
    }

    /// Prepares the active snapshot `key` over the committed `parent` (a containerd name);
    /// returns the dirs an overlay writes to.
    pub fn prepare(&self, key: &str, parent: Option<&str>) -> Result<UpperDirs> {
        let r = PrepareSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
            parent: parent.unwrap_or_default().to_string(),
            labels: self.labels(),
        };
        let ns = self.namespace.clone();
        let mounts = self.call("prepare snapshot", key, move |mut c| async move {
            c.prepare(req(&ns, r)).await.map(|r| r.into_inner().mounts)
        })?;
        upper_dirs(key, &mounts)
    }

    /// Commits the active snapshot `key` as `name`.
    pub fn commit(&self, name: &str, key: &str) -> Result<()> {
        let r = CommitSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            name: name.to_string(),
            key: key.to_string(),
            labels: self.labels(),
        };
        let ns = self.namespace.clone();
        self.call("commit snapshot", key, move |mut c| async move {
            c.commit(req(&ns, r)).await.map(|_| ())
        })
    }

    /// Removes snapshot `key` (active or committed); one that is already gone is fine.
    /// containerd refuses (`FailedPrecondition`) while the snapshot has children.
    pub fn remove(&self, key: &str) -> Result<()> {
        let r = RemoveSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        };
        let ns = self.namespace.clone();
        self.call("remove snapshot", key, move |mut c| async move {
            match c.remove(req(&ns, r)).await {
                Ok(_) => Ok(()),
                Err(e) if e.code() == tonic::Code::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    /// Every snapshot labelled with this worker.
    pub fn list(&self) -> Result<Vec<Info>> {
        let r = ListSnapshotsRequest {
            snapshotter: self.snapshotter.clone(),
            filters: vec![format!("labels.\"{WORKER_LABEL}\"=={}", self.worker)],
        };
        let ns = self.namespace.clone();
        self.call("list snapshots", &self.worker, move |mut c| async move {
            let mut stream = c.list(req(&ns, r)).await?.into_inner();
            let mut out = Vec::new();
            while let Some(batch) = stream.message().await? {
                out.extend(batch.info);
            }
            Ok(out)
        })
    }

    /// Removes what an earlier run of this worker left in containerd: every staging
    /// snapshot, and every committed one whose kiln id `known` does not hold (a crash
    /// between containerd's commit and kiln's, or a snapshot kiln dropped). Children go
    /// before their parents. Returns the ids of the committed kiln snapshots containerd
    /// holds and `known` names.
    pub fn reconcile(&self, known: &dyn Fn(&str) -> bool) -> Result<Vec<String>> {
        let listed = self.list()?;
        let parents: HashMap<String, String> = listed
            .iter()
            .filter(|i| !i.parent.is_empty())
            .map(|i| (i.name.clone(), i.parent.clone()))
            .collect();
        let parent_of = |n: &str| parents.get(n).map(String::as_str);
        let mut held = Vec::new();
        let mut gone: Vec<(usize, String)> = Vec::new();
        for i in &listed {
            match i.name.strip_prefix(COMMITTED_PREFIX) {
                Some(id) if i.kind == Kind::Committed as i32 && known(id) => {
                    held.push(id.to_string())
                }
                _ => gone.push((
                    super::chain_depth(&i.name, parent_of, parents.len()),
                    i.name.clone(),
                )),
            }
        }
        gone.sort_by_key(|g| std::cmp::Reverse(g.0));
        for (_, name) in &gone {
            tracing::info!(
                name = name.as_str(),
                "removing a containerd snapshot an earlier run left behind"
            );
            if let Err(e) = self.remove(name) {
                tracing::warn!(name = name.as_str(), error = %kiln_proto::status::Chain(&e), "remove leftover containerd snapshot");
            }
        }
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_client::types::Mount;

    fn mount(t: &str, source: &str, options: &[&str]) -> Mount {
        Mount {
            r#type: t.into(),
            source: source.into(),
            options: options.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        }
    }

    /// The containerd at `KILN_TEST_CONTAINERD` with a fresh namespace; `None` (skip) only
    /// when run by hand without `KILN_TEST_REGISTRY` either.
    fn config() -> Option<ContainerdConfig> {
        let address = match std::env::var("KILN_TEST_CONTAINERD") {
            Ok(a) if !a.is_empty() => a,
            _ if std::env::var_os("KILN_TEST_REGISTRY").is_some() => {
                panic!("KILN_TEST_CONTAINERD is not set (scripts/test.sh starts containerd)")
            }
            _ => return None,
        };
        let mut c = ContainerdConfig::new(address);
        c.namespace = format!("kiln-unit-{}", uuid::Uuid::new_v4().simple());
        Some(c)
    }

    fn store(root: &std::path::Path, c: &ContainerdConfig, worker: &str) -> crate::snapshot::Store {
        let ctr = Snapshots::connect(c, worker).expect("connect");
        crate::snapshot::Store::open_with(root, Some(ctr)).expect("open")
    }

    /// Waits for containerd's garbage collector to delete a removed snapshot's dir.
    fn gone_soon(dir: &std::path::Path) {
        let start = std::time::Instant::now();
        while dir.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{} still there",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// (name, parent, kind) of every snapshot of `worker`, sorted.
    fn listed(s: &crate::snapshot::Store) -> Vec<(String, String, i32)> {
        let mut v: Vec<_> = s
            .containerd()
            .expect("containerd backend")
            .list()
            .expect("list")
            .into_iter()
            .map(|i| (i.name, i.parent, i.kind))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn snapshots_live_in_containerd_with_kilns_parent_chain() {
        use crate::snapshot::Kind as SnapKind;
        let Some(c) = config() else { return };
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = store(tmp.path(), &c, "w1");
        let s1 = s.prepare(None).expect("prepare");
        assert!(
            s1.diff().ends_with("fs") && s1.work().ends_with("work") && s1.work().is_dir(),
            "containerd's dirs: {:?} {:?}",
            s1.diff(),
            s1.work()
        );
        std::fs::write(s1.diff().join("a"), "1").expect("write");
        std::fs::write(s1.diff().join("b"), "1").expect("write");
        let id1 = s.commit(s1, SnapKind::Built, None).expect("commit");
        let m1 = s.meta(&id1).expect("meta");
        let dir1 = m1.containerd.as_ref().expect("containerd ref").dir.clone();
        assert_eq!(s.diff_dir(&id1), dir1, "diff links to containerd's dir");
        assert_eq!(std::fs::read_to_string(dir1.join("a")).expect("a"), "1");

        let s2 = s.prepare(Some(&id1)).expect("prepare");
        let m = s.mount_rw_for_step(&s2).expect("mount");
        std::fs::write(m.path().join("a"), "2").expect("write");
        std::fs::remove_file(m.path().join("b")).expect("rm");
        m.unmount().expect("unmount");
        let key2 = format!("{STAGING_PREFIX}w1/");
        assert!(
            listed(&s).iter().any(|(n, p, k)| n.starts_with(&key2)
                && *p == Snapshots::name(&id1)
                && *k == Kind::Active as i32),
            "{:?}",
            listed(&s)
        );
        let id2 = s.commit(s2, SnapKind::Built, None).expect("commit");
        let mut want = vec![
            (Snapshots::name(&id1), String::new(), Kind::Committed as i32),
            (
                Snapshots::name(&id2),
                Snapshots::name(&id1),
                Kind::Committed as i32,
            ),
        ];
        want.sort();
        assert_eq!(listed(&s), want);
        let ro = s.mount_ro(Some(&id2)).expect("mount ro");
        assert_eq!(
            std::fs::read_to_string(ro.path().join("a")).expect("a"),
            "2"
        );
        assert!(!ro.path().join("b").exists(), "whiteout");
        ro.unmount().expect("unmount");
        assert_eq!(s.chain(Some(&id2)).expect("chain").len(), 2);

        // a parent with a child stays; children first, then both go from containerd
        assert!(!s.remove(&id1).expect("remove parent"), "has a child");
        assert!(s.meta(&id1).is_ok() && dir1.exists());
        assert!(s.remove(&id2).expect("remove child"));
        assert!(s.remove(&id1).expect("remove parent"));
        assert!(listed(&s).is_empty(), "{:?}", listed(&s));
        gone_soon(&dir1);
        assert!(matches!(s.meta(&id1), Err(Error::SnapshotNotFound { .. })));
    }

    #[test]
    fn a_dropped_staging_snapshot_leaves_containerd() {
        let Some(c) = config() else { return };
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = store(tmp.path(), &c, "w2");
        let st = s.prepare(None).expect("prepare");
        let diff = st.diff();
        std::fs::write(diff.join("f"), "x").expect("write");
        assert_eq!(listed(&s).len(), 1);
        drop(st);
        assert!(listed(&s).is_empty(), "{:?}", listed(&s));
        gone_soon(&diff);
    }

    #[test]
    fn opening_removes_what_a_killed_worker_left_in_containerd() {
        use crate::snapshot::Kind as SnapKind;
        let Some(c) = config() else { return };
        let tmp = tempfile::tempdir().expect("tempdir");
        // a snapshot made on the runc backend: containerd does not hold it
        let native = {
            let s = crate::snapshot::Store::open(tmp.path()).expect("open");
            let st = s.prepare(None).expect("prepare");
            s.commit(st, SnapKind::Built, None).expect("commit")
        };
        let s = store(tmp.path(), &c, "w3");
        assert!(s.meta(&native).is_err(), "dropped: containerd lacks it");
        let kept = {
            let st = s.prepare(None).expect("prepare");
            s.commit(st, SnapKind::Built, None).expect("commit")
        };
        // a staging snapshot of the killed worker, and a commit kiln never recorded
        std::mem::forget(s.prepare(Some(&kept)).expect("prepare"));
        let ctr = s.containerd().expect("backend");
        let orphan = ctr.staging_key("orphan");
        ctr.prepare(&orphan, Some(&Snapshots::name(&kept)))
            .expect("prepare");
        ctr.commit(&Snapshots::name("unrecorded"), &orphan)
            .expect("commit");
        assert_eq!(listed(&s).len(), 3);
        // another worker's snapshots in the namespace are not this worker's business
        let other = store(&tmp.path().join("other"), &c, "w3-other");
        let st = other.prepare(None).expect("prepare");
        drop(s);
        let s = store(tmp.path(), &c, "w3");
        assert_eq!(
            listed(&s),
            vec![(
                Snapshots::name(&kept),
                String::new(),
                Kind::Committed as i32
            )]
        );
        assert!(s.meta(&kept).is_ok());
        assert_eq!(listed(&other).len(), 1, "the other worker's staging stays");
        drop(st);
        assert!(s.remove(&kept).expect("remove"));
    }

    #[test]
    fn upper_dirs_come_from_the_overlay_options_or_the_bind_source() {
        let o = mount(
            "overlay",
            "overlay",
            &[
                "index=off",
                "workdir=/s/2/work",
                "upperdir=/s/2/fs",
                "lowerdir=/s/1/fs",
            ],
        );
        assert_eq!(
            upper_dirs("k", &[o]).expect("overlay"),
            UpperDirs {
                diff: "/s/2/fs".into(),
                work: "/s/2/work".into()
            }
        );
        let b = mount("bind", "/s/1/fs", &["rw", "rbind"]);
        assert_eq!(
            upper_dirs("k", &[b]).expect("bind"),
            UpperDirs {
                diff: "/s/1/fs".into(),
                work: "/s/1/work".into()
            }
        );
        let ro = mount("overlay", "overlay", &["lowerdir=/a:/b"]);
        assert!(upper_dirs("k", &[ro]).is_err());
        assert!(upper_dirs("k", &[]).is_err());
    }
}
