//! Build-cache disk use as the solver sees it and acts on it: `du`
//! ([`Solver::usage`]: cache records, snapshots no record names, cache
//! mounts, the blob store), `prune` and the automatic GC the daemon's
//! policies ask for. The item model and the filter grammar are in
//! [`crate::usage`].

use crate::Error;
use crate::cache::unix_nanos;
use crate::peer::{Exporter, Frontend, Worker};
use crate::solver::Solver;
use crate::usage::{PruneOptions, Target, UsageItem};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl<W: Worker, F: Frontend, E: Exporter> Solver<W, F, E> {
    /// Unix nanoseconds before which no running build started (now when
    /// none runs): results older than this are not in use.
    fn oldest_active_build(&self) -> i64 {
        let now = unix_nanos();
        self.builds
            .lock()
            .map(|m| {
                m.values()
                    .filter(|b| b.active.load(Ordering::SeqCst))
                    .map(|b| b.started)
                    .min()
                    .unwrap_or(now)
                    .min(now)
            })
            .unwrap_or(0)
    }

    /// Imported results running builds loaded (in no record, but in use).
    fn loaded_imports(&self) -> Vec<String> {
        self.builds
            .lock()
            .map(|m| {
                m.values()
                    .filter(|b| b.active.load(Ordering::SeqCst))
                    .filter_map(|b| b.remote.get().cloned().flatten())
                    .flat_map(|r| r.loaded.lock().map(|l| l.clone()).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Everything the build cache holds on the worker, one item per cache
    /// record (sized by its output snapshots' own diffs), snapshot no record
    /// names (image layers under records, local-source copies, intermediate
    /// results), cache-mount instance, and the layer blobs, so the sizes add
    /// up to the worker's disk use. Most recently used first.
    pub async fn usage(&self) -> Result<Vec<UsageItem>, Error> {
        let in_use_from = self.in_use_from();
        let mut records = self.cache.with_store(|s| s.list()).await?;
        let usage = self.worker.usage(&[]).await?;
        let sizes: HashMap<&str, i64> = usage
            .snapshots
            .iter()
            .map(|s| (s.r#ref.as_str(), s.size))
            .collect();
        for r in &mut records {
            let size: i64 = r.refs.iter().filter_map(|x| sizes.get(x.as_str())).sum();
            if r.size != Some(size) {
                r.size = Some(size);
                let (id, store) = (r.id.clone(), self.cache.store().clone());
                let _ = tokio::task::spawn_blocking(move || store.set_size(&id, size)).await;
            }
        }
        let named: HashSet<&str> = records
            .iter()
            .flat_map(|r| r.refs.iter().map(String::as_str))
            .collect();
        let parents: HashMap<&str, &str> = usage
            .snapshots
            .iter()
            .map(|s| (s.r#ref.as_str(), s.parent.as_str()))
            .collect();
        // snapshots under a record's refs stay as long as the record does
        let mut reachable = HashSet::new();
        for r in &named {
            let mut next = parents.get(r).copied();
            while let Some(p) = next.filter(|p| !p.is_empty() && reachable.insert(p.to_string())) {
                next = parents.get(p).copied();
            }
        }
        // every snapshot beneath `refs`, not `refs` themselves
        let beneath = |refs: &[String]| -> Vec<String> {
            let mut seen: HashSet<&str> = refs.iter().map(String::as_str).collect();
            let mut out = Vec::new();
            for r in refs {
                let mut next = parents.get(r.as_str()).copied();
                while let Some(p) = next.filter(|p| !p.is_empty() && seen.insert(p)) {
                    out.push(p.to_string());
                    next = parents.get(p).copied();
                }
            }
            out
        };
        let mut items: Vec<UsageItem> = records
            .iter()
            .map(|r| UsageItem {
                id: r.id.trim_start_matches("sha256:").to_string(),
                record_type: "regular".into(),
                description: r.description.clone(),
                size: r.size.unwrap_or(0),
                created: r.created,
                last_used: r.last_used,
                usage_count: r.usage_count,
                in_use: r.last_used >= in_use_from,
                // under another record's result: it goes only after that one
                shared: !r.refs.is_empty()
                    && r.refs.iter().all(|x| x.is_empty() || reachable.contains(x)),
                mutable: false,
                parents: r
                    .refs
                    .iter()
                    .filter_map(|x| parents.get(x.as_str()))
                    .filter(|p| !p.is_empty())
                    .map(|p| p.to_string())
                    .collect(),
                refs: r.refs.iter().filter(|x| !x.is_empty()).cloned().collect(),
                ancestors: beneath(&r.refs),
                target: Target::Record(r.id.clone()),
            })
            .collect();
        for s in usage
            .snapshots
            .iter()
            .filter(|s| !named.contains(s.r#ref.as_str()))
        {
            let mount = s.kind == "cachemount";
            items.push(UsageItem {
                id: s.r#ref.clone(),
                record_type: match s.kind.as_str() {
                    "local" => "source.local",
                    "cachemount" => "exec.cachemount",
                    _ => "regular",
                }
                .into(),
                description: if mount {
                    format!("cached mount with id {:?}", s.description)
                } else {
                    format!("{} snapshot", s.kind)
                },
                size: s.size,
                created: s.created,
                last_used: s.created,
                usage_count: 0,
                in_use: !mount && s.created >= in_use_from,
                shared: reachable.contains(&s.r#ref),
                mutable: mount,
                parents: if s.parent.is_empty() {
                    vec![]
                } else {
                    vec![s.parent.clone()]
                },
                refs: vec![s.r#ref.clone()],
                ancestors: beneath(std::slice::from_ref(&s.r#ref)),
                target: if mount {
                    Target::CacheMount(s.r#ref.clone())
                } else {
                    Target::Snapshot(s.r#ref.clone())
                },
            });
        }
        items.sort_by_key(|r| std::cmp::Reverse(r.last_used));
        if usage.blobs_size > 0 {
            items.push(UsageItem {
                id: "content-store".into(),
                record_type: "regular".into(),
                description: "layer blobs".into(),
                size: usage.blobs_size,
                created: 0,
                last_used: 0,
                usage_count: 0,
                in_use: false,
                shared: true,
                mutable: false,
                parents: vec![],
                refs: vec![],
                ancestors: vec![],
                target: Target::None,
            });
        }
        Ok(items)
    }

    /// Applies the GC policies in order. Returns how many items went.
    pub async fn gc(&self) -> Result<usize, Error> {
        let mut removed = 0;
        for p in &self.config.gc {
            removed += self.prune(p).await?.len();
        }
        Ok(removed)
    }

    /// Runs [`Self::gc`] in the background unless a run is already pending.
    pub(crate) fn gc_soon(self: &Arc<Self>) {
        if self.config.gc.is_empty() || self.gc_pending.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.gc_pending.store(false, Ordering::SeqCst);
            return;
        };
        let s = self.clone();
        rt.spawn(async move {
            s.gc_pending.store(false, Ordering::SeqCst);
            match s.gc().await {
                Ok(n) if n > 0 => tracing::info!(items = n, "gc"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %kiln_proto::status::Chain(&e), "gc"),
            }
        });
    }

    /// Starts the periodic GC (once; nothing without policies).
    pub(crate) fn start_gc(self: &Arc<Self>) {
        if self.config.gc.is_empty() || self.gc_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(self);
        let every = self.config.gc_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(s) = weak.upgrade() else { return };
                s.gc_soon();
            }
        });
    }

    /// Unix nanoseconds from which results are in use: the start of the
    /// oldest running build (far future when none runs).
    fn in_use_from(&self) -> i64 {
        let active = self.builds.lock().ok().and_then(|m| {
            m.values()
                .filter(|b| b.active.load(Ordering::SeqCst))
                .map(|b| b.started)
                .min()
        });
        active.unwrap_or(i64::MAX)
    }

    /// Removes what `opts` selects (see [`crate::usage::select`]): cache
    /// records from the store, then on the worker every snapshot no
    /// remaining item reaches and the selected cache mounts. One selection
    /// takes a whole chain (a step's result with the results and layers
    /// beneath it that nothing kept holds). It measures again and goes on
    /// while something was removed (under a size limit the store may still
    /// be over it; `shared`/`private` filters see the new sharing). Returns
    /// the removed items. Prunes run one at a time.
    pub async fn prune(&self, opts: &PruneOptions) -> Result<Vec<UsageItem>, Error> {
        let _one = self.prune_lock.lock().await;
        let mut all = Vec::new();
        for _ in 0..16 {
            let gone = self.prune_once(opts).await?;
            let done = gone.is_empty();
            all.extend(gone);
            if done {
                break;
            }
        }
        tracing::info!(items = all.len(), "pruned");
        kiln_metrics::GC_RUNS.inc(&[]);
        kiln_metrics::GC_REMOVED.add(&[], all.len() as f64);
        Ok(all)
    }

    async fn prune_once(&self, opts: &PruneOptions) -> Result<Vec<UsageItem>, Error> {
        let in_use_from = self.oldest_active_build();
        let items = self.usage().await?;
        let gone = crate::usage::select(&items, opts, unix_nanos());
        if gone.is_empty() {
            return Ok(gone);
        }
        let gone_ids: HashSet<&str> = gone.iter().map(|i| i.id.as_str()).collect();
        for r in &gone {
            if let Target::Record(id) = &r.target {
                let id = id.clone();
                self.cache.with_store(move |s| s.remove(&id)).await?;
            }
        }
        // what was not selected stays, with everything beneath it
        let mut keep: Vec<String> = items
            .iter()
            .filter(|i| !gone_ids.contains(i.id.as_str()))
            .flat_map(|i| i.refs.iter().cloned())
            .collect();
        keep.extend(self.loaded_imports());
        self.worker.prune(&keep, in_use_from).await?;
        Ok(gone)
    }
}
