//! Keeps the kernel's cgroup-migration path warm while exec steps start.
//!
//! Every container runc starts is put into new cgroups by writing its pid to a
//! `cgroup.procs` file. That write takes one global per-CPU rwsem for writing, and when no
//! writer has taken it within the last RCU grace period the kernel first waits for a
//! whole grace period (3–15 ms on an idle 2-CPU VM: a third of a `RUN true` step). A
//! writer that comes while an earlier one's grace period is still fresh goes straight
//! through.
//!
//! So while any exec step is being prepared or run, one thread rewrites kilnd's own pid
//! into the `cgroup.procs` of the cgroup kilnd is already in, every few milliseconds: a
//! move to where the process already is, which changes nothing but keeps that path
//! fresh for runc (and containerd's shim). When no step is running the thread sleeps. On
//! a cgroup mount with `favordynmods` the kernel is always on the fast path and the writes
//! are merely cheap. If kilnd cannot write its cgroup (a read-only cgroupfs) nothing is
//! done; `KILN_CGROUP_WARM=0` in kilnd's environment turns it off.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// How often the warm write is repeated while steps run: well inside one grace period.
const PERIOD: Duration = Duration::from_millis(4);

/// The `cgroup.procs` of the cgroup the process described by `proc_cgroup`
/// (`/proc/self/cgroup`) is in, on the mounts in `mountinfo` (`/proc/self/mountinfo`).
/// Candidates in order of preference: the v1 `pids` hierarchy, other v1 hierarchies with
/// controllers, the v2 hierarchy. Any of them will do: the lock is shared by all.
pub fn procs_candidates(proc_cgroup: &str, mountinfo: &str) -> Vec<PathBuf> {
    struct Mount<'a> {
        root: &'a str,
        point: &'a str,
        v2: bool,
        opts: Vec<&'a str>,
    }
    let mounts: Vec<Mount> = mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            let fstype = *post.first()?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            Some(Mount {
                root: pre.get(3)?,
                point: pre.get(4)?,
                v2: fstype == "cgroup2",
                opts: post
                    .get(2)
                    .map(|o| o.split(',').collect())
                    .unwrap_or_default(),
            })
        })
        .collect();
    let mut found: Vec<(u8, PathBuf)> = Vec::new();
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let v2 = controllers.is_empty();
        let wanted: Vec<&str> = controllers.split(',').filter(|c| !c.is_empty()).collect();
        if !v2 && wanted.iter().any(|c| c.starts_with("name=")) {
            continue; // a named hierarchy without controllers (systemd's): leave it alone
        }
        let Some(m) = mounts
            .iter()
            .find(|m| m.v2 == v2 && wanted.iter().all(|c| m.opts.contains(c)))
        else {
            continue;
        };
        // the path is relative to the cgroup namespace root, the mount shows `root` of it
        let rel = if m.root == "/" {
            path
        } else if let Some(rest) = path.strip_prefix(m.root) {
            if !rest.is_empty() && !rest.starts_with('/') {
                continue;
            }
            rest
        } else {
            continue;
        };
        let rank = if wanted.contains(&"pids") {
            0
        } else if v2 {
            2
        } else {
            1
        };
        let file = Path::new(m.point)
            .join(rel.trim_start_matches('/'))
            .join("cgroup.procs");
        found.push((rank, file));
    }
    found.sort_by_key(|(rank, _)| *rank);
    found.into_iter().map(|(_, p)| p).collect()
}

struct Inner {
    procs: PathBuf,
    /// Steps being prepared or run.
    active: Mutex<usize>,
    wake: Condvar,
    writes: AtomicU64,
}

impl Inner {
    fn write(&self) -> std::io::Result<()> {
        std::fs::write(&self.procs, std::process::id().to_string())?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn run(&self) {
        loop {
            {
                let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
                while *active == 0 {
                    active = self.wake.wait(active).unwrap_or_else(|e| e.into_inner());
                }
            }
            if let Err(e) = self.write() {
                tracing::debug!(procs = %self.procs.display(), error = %kiln_proto::status::Chain(&e), "cgroup warm write failed");
            }
            std::thread::sleep(PERIOD);
        }
    }
}

/// The warm-writer thread; see the module docs.
#[derive(Clone)]
pub struct Warmer {
    inner: Arc<Inner>,
}

/// Keeps the warm writes going until dropped.
pub struct Hold {
    inner: Option<Arc<Inner>>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            let mut active = inner.active.lock().unwrap_or_else(|e| e.into_inner());
            *active = active.saturating_sub(1);
        }
    }
}

impl Warmer {
    /// Finds a cgroup of this process it may write to (one write to check) and starts the
    /// thread; `None` when there is none.
    pub fn start() -> Option<Warmer> {
        let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let inner = procs_candidates(&cg, &mi).into_iter().find_map(|procs| {
            let inner = Inner {
                procs,
                active: Mutex::new(0),
                wake: Condvar::new(),
                writes: AtomicU64::new(0),
            };
            inner.write().ok().map(|_| Arc::new(inner))
        })?;
        let thread = inner.clone();
        std::thread::Builder::new()
            .name("cgroup-warm".into())
            .spawn(move || thread.run())
            .ok()?;
        tracing::debug!(procs = %inner.procs.display(), "cgroup warm writes on");
        Some(Warmer { inner })
    }

    /// Warm writes go on (every few ms) until every returned `Hold` is dropped.
    pub fn hold(&self) -> Hold {
        let mut active = self.inner.active.lock().unwrap_or_else(|e| e.into_inner());
        *active += 1;
        self.inner.wake.notify_one();
        Hold {
            inner: Some(self.inner.clone()),
        }
    }

    /// How many warm writes have been made.
    pub fn writes(&self) -> u64 {
        self.inner.writes.load(Ordering::Relaxed)
    }

    /// The `cgroup.procs` file written.
    pub fn procs(&self) -> &Path {
        &self.inner.procs
    }
}

/// The process-wide warmer (the kernel lock it keeps warm is global), started on first
/// use; none when the environment sets `KILN_CGROUP_WARM=0`.
pub fn global() -> Option<&'static Warmer> {
    static W: OnceLock<Option<Warmer>> = OnceLock::new();
    W.get_or_init(|| {
        if std::env::var("KILN_CGROUP_WARM").is_ok_and(|v| v == "0") {
            return None;
        }
        Warmer::start()
    })
    .as_ref()
}

/// A hold on the process-wide warmer; does nothing when there is none.
pub fn hold() -> Hold {
    match global() {
        Some(w) => w.hold(),
        None => Hold { inner: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_CGROUP: &str = "9:name=systemd:/\n8:pids:/kiln.slice\n4:memory:/process_api/3bdc\n3:cpuset:/\n1:cpu,cpuacct:/x\n0::/\n";
    const V1_MOUNTS: &str = "\
22 1 0:20 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
31 22 0:26 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
32 22 0:27 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
33 22 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 22 0:29 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 22 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
41 22 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn v1_prefers_pids_then_other_controllers_then_v2_and_skips_named_hierarchies() {
        let c = procs_candidates(V1_CGROUP, V1_MOUNTS);
        let c: Vec<String> = c.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(c[0], "/sys/fs/cgroup/pids/kiln.slice/cgroup.procs");
        assert!(c.contains(&"/sys/fs/cgroup/memory/process_api/3bdc/cgroup.procs".to_string()));
        assert!(c.contains(&"/sys/fs/cgroup/cpu,cpuacct/x/cgroup.procs".to_string()));
        assert_eq!(
            c.last().map(String::as_str),
            Some("/sys/fs/cgroup/unified/cgroup.procs")
        );
        assert!(!c.iter().any(|p| p.contains("systemd")), "{c:?}");
    }

    #[test]
    fn v2_uses_the_unified_path_and_a_namespaced_mount_root() {
        let mounts = "30 22 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let c = procs_candidates("0::/system.slice/kilnd.service\n", mounts);
        assert_eq!(
            c,
            vec![PathBuf::from(
                "/sys/fs/cgroup/system.slice/kilnd.service/cgroup.procs"
            )]
        );
        // a mount of a sub-tree: the path must be under its root, and is made relative
        let mounts = "30 22 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let c = procs_candidates("0::/kubepods/pod1/kilnd\n", mounts);
        assert_eq!(c, vec![PathBuf::from("/sys/fs/cgroup/kilnd/cgroup.procs")]);
        assert!(procs_candidates("0::/elsewhere\n", mounts).is_empty());
        assert!(procs_candidates("0::/kubepods/pod10\n", mounts).is_empty());
    }

    #[test]
    fn no_cgroup_mount_means_no_candidates() {
        assert!(procs_candidates(V1_CGROUP, "1 0 8:1 / / rw - ext4 /dev/vda rw\n").is_empty());
    }

    /// On this host (root): the writes run only while held, and leave the process in the
    /// cgroup it was in.
    #[test]
    fn writes_run_while_held_and_leave_the_process_where_it_was() {
        let Some(w) = global() else {
            eprintln!("skipped: no writable cgroup for this process");
            return;
        };
        let before = std::fs::read_to_string("/proc/self/cgroup").expect("cgroup");
        let n0 = w.writes();
        {
            let _h = hold();
            std::thread::sleep(Duration::from_millis(100));
        }
        let n1 = w.writes();
        assert!(n1 >= n0 + 5, "only {} writes in 100 ms", n1 - n0);
        std::thread::sleep(Duration::from_millis(50));
        let n2 = w.writes();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(w.writes(), n2, "writes went on with nothing held");
        assert_eq!(
            std::fs::read_to_string("/proc/self/cgroup").expect("cgroup"),
            before
        );
        let listed = std::fs::read_to_string(w.procs()).expect("procs");
        assert!(
            listed.lines().any(|l| l == std::process::id().to_string()),
            "{} does not list this process",
            w.procs().display()
        );
    }
}
