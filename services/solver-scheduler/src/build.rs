//! Builds: one Solve request from a client, from frontend to export.

use crate::cache::{CacheStore, MemoryStore, RedbStore, unix_nanos};
use crate::history::{HistoryRecord, steps_from_progress};
use crate::peer::{ExportJob, Exporter, Frontend, PlatformJob, Worker};
use crate::progress::{Progress, now};
use crate::session::SessionManager;
use crate::solve::{self, Cache};
use crate::usage::{PruneOptions, Target, UsageItem};
use crate::{Config, Error};
use kiln_proto::moby::buildkit::v1::Vertex as ProgressVertex;
use kiln_proto::pb;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// One exporter of a build request.
#[derive(Debug, Clone, Default)]
pub struct ExporterSpec {
    pub r#type: String,
    pub attrs: BTreeMap<String, String>,
}

/// A client's Solve, in domain terms.
#[derive(Debug, Clone, Default)]
pub struct BuildRequest {
    pub id: String,
    pub session_id: String,
    pub definition: Option<pb::Definition>,
    pub frontend: String,
    pub frontend_attrs: BTreeMap<String, String>,
    pub exporters: Vec<ExporterSpec>,
    /// entitlements the client asked for (network.host, security.insecure)
    pub entitlements: Vec<String>,
    /// definitions the client hands its frontend (LLBBridge `Inputs`)
    pub frontend_inputs: BTreeMap<String, pb::Definition>,
    /// remote cache the client asked for (`--export-cache`/`--import-cache`), as
    /// `export type=registry`; kiln does not do it yet and says so
    pub cache: Vec<String>,
    /// who asked for the build (the client certificate's identity on a TLS
    /// listener, empty otherwise): only they may drive its client-side frontend
    pub owner: String,
}

impl BuildRequest {
    /// The client runs the frontend itself (buildctl, buildx): no frontend and
    /// no definition, the result comes through LLBBridge `Return`.
    pub fn client_frontend(&self) -> bool {
        self.frontend.is_empty() && self.definition.is_none()
    }
}

/// What a frontend hands over for export: result refs (ids in the build's
/// [`Build::solve_ref`] table) and metadata (image configs, `refs.platforms`).
#[derive(Debug, Clone, Default)]
pub struct FrontendResult {
    /// the single result (empty id: scratch)
    pub r#ref: Option<String>,
    /// a multi-platform result: platform id -> ref id
    pub refs: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, Vec<u8>>,
}

/// A result handed to a frontend, solved when something needs its snapshot
/// (a read, an `Evaluate`, the export), once.
struct BuildRef {
    def: pb::Definition,
    snapshot: tokio::sync::OnceCell<String>,
}

/// A container a frontend made (LLBBridge `NewContainer`): its mounts,
/// prepared on the worker, in which `ExecProcess` runs processes.
#[derive(Debug, Clone, Default)]
pub struct Container {
    /// the worker's id for it
    pub worker_id: String,
    pub extra_hosts: Vec<pb::HostIp>,
    pub hostname: String,
}

/// Where a client-side frontend's result (LLBBridge `Return`) arrives.
type Returned = tokio::sync::oneshot::Receiver<Result<FrontendResult, Error>>;

/// The client side of a build whose frontend runs in the client.
struct ClientFrontend {
    /// takes the result of LLBBridge `Return` (once)
    result: Mutex<Option<tokio::sync::oneshot::Sender<Result<FrontendResult, Error>>>>,
}

/// A build in flight.
pub struct Build {
    pub id: String,
    pub session_id: String,
    pub no_cache: bool,
    pub entitlements: Vec<String>,
    pub progress: Progress,
    /// unix nanoseconds
    pub started: i64,
    /// false once the build has ended
    pub active: AtomicBool,
    /// results handed to the frontend, by id
    refs: Mutex<HashMap<String, Arc<BuildRef>>>,
    /// set when the client runs the frontend (see [`BuildRequest::client_frontend`])
    client_frontend: Option<ClientFrontend>,
    /// definitions for the frontend (LLBBridge `Inputs`)
    pub frontend_inputs: BTreeMap<String, pb::Definition>,
    /// containers the frontend made, by id
    containers: Mutex<HashMap<String, Container>>,
    /// the first frontend run for the build (its history names it)
    frontend_run: Mutex<String>,
    /// see [`BuildRequest::owner`]
    pub owner: String,
    /// the client asked for cache-miss explanations (`explain-cache` attr)
    pub explain: bool,
    /// names of the build's build args
    pub build_args: std::collections::BTreeSet<String>,
    /// the project this build belongs to, for step identities across builds
    scope: Mutex<String>,
    /// the client session's shared key (its context dir)
    shared_key: Mutex<String>,
    /// The layer options of the build's image export, when it has one: the
    /// layers of the result's chain are computed as its steps finish.
    pub eager_layers: Option<String>,
}

/// A build's frontend attrs as its history keeps them: build args are left out (they
/// often carry tokens, and history outlives the build and is listed to every client).
fn history_attrs(attrs: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    attrs
        .iter()
        .filter(|(k, _)| !k.starts_with("build-arg:"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Frontend attr asking for cache-miss explanations.
pub const EXPLAIN_CACHE_ATTR: &str = "explain-cache";

impl Build {
    /// A build of `req`, starting now.
    pub fn new(req: &BuildRequest, no_cache: bool) -> Build {
        Self::with_client_frontend(req, no_cache).0
    }

    /// A build of `req`, and when its frontend runs in the client, where the
    /// result of LLBBridge `Return` arrives.
    fn with_client_frontend(
        req: &BuildRequest,
        no_cache: bool,
    ) -> (
        Build,
        Option<tokio::sync::oneshot::Receiver<Result<FrontendResult, Error>>>,
    ) {
        let (client_frontend, rx) = if req.client_frontend() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (
                Some(ClientFrontend {
                    result: Mutex::new(Some(tx)),
                }),
                Some(rx),
            )
        } else {
            (None, None)
        };
        let b = Build {
            id: req.id.clone(),
            session_id: req.session_id.clone(),
            no_cache,
            entitlements: req.entitlements.clone(),
            progress: Progress::default(),
            started: unix_nanos(),
            active: AtomicBool::new(true),
            refs: Mutex::new(HashMap::new()),
            client_frontend,
            frontend_inputs: req.frontend_inputs.clone(),
            containers: Mutex::new(HashMap::new()),
            frontend_run: Mutex::new(String::new()),
            owner: req.owner.clone(),
            explain: req
                .frontend_attrs
                .get(EXPLAIN_CACHE_ATTR)
                .is_some_and(|v| v != "false" && v != "0"),
            build_args: req
                .frontend_attrs
                .keys()
                .filter_map(|k| k.strip_prefix("build-arg:"))
                .map(str::to_string)
                .collect(),
            scope: Mutex::new(String::new()),
            shared_key: Mutex::new(String::new()),
            eager_layers: req
                .exporters
                .iter()
                .find(|e| matches!(e.r#type.as_str(), "image" | "oci" | "docker"))
                .and_then(|e| {
                    let attrs = exporter_attrs(&e.attrs, &req.frontend_attrs, 0);
                    kiln_oci::LayerOptions::from_export_attrs(&attrs).ok()
                })
                .map(|o| o.spec()),
        };
        (b, rx)
    }

    /// The project identity steps of this build are recorded under.
    pub fn scope(&self) -> String {
        self.scope.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn set_scope(&self, scope: String) {
        if let Ok(mut s) = self.scope.lock() {
            *s = scope;
        }
    }

    /// The client session's shared key, once the build has looked it up.
    pub fn shared_key(&self) -> String {
        self.shared_key
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Keeps `def` as a result of this build, solved when first needed.
    /// Returns its id (empty for an empty definition: scratch).
    pub fn add_ref(&self, def: pb::Definition) -> String {
        if def.def.is_empty() {
            return String::new();
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        if let Ok(mut m) = self.refs.lock() {
            m.insert(
                id.clone(),
                Arc::new(BuildRef {
                    def,
                    snapshot: tokio::sync::OnceCell::new(),
                }),
            );
        }
        id
    }

    fn build_ref(&self, id: &str) -> Result<Arc<BuildRef>, Error> {
        self.refs
            .lock()
            .ok()
            .and_then(|m| m.get(id).cloned())
            .ok_or_else(|| Error::UnknownRef(id.to_string()))
    }

    /// The definition a result id stands for.
    pub fn ref_definition(&self, id: &str) -> Result<pb::Definition, Error> {
        if id.is_empty() {
            return Ok(pb::Definition::default());
        }
        Ok(self.build_ref(id)?.def.clone())
    }

    /// Keeps a container the frontend made; its id must be new.
    pub fn add_container(&self, id: &str, c: Container) -> Result<(), Error> {
        let mut m = self
            .containers
            .lock()
            .map_err(|_| Error::Container(id.to_string(), "containers lock poisoned".into()))?;
        if m.len() >= MAX_CONTAINERS {
            return Err(Error::Container(
                id.to_string(),
                format!("a build holds at most {MAX_CONTAINERS} containers"),
            ));
        }
        if m.contains_key(id) {
            return Err(Error::Container(id.to_string(), "already exists".into()));
        }
        m.insert(id.to_string(), c);
        Ok(())
    }

    pub fn container(&self, id: &str) -> Result<Container, Error> {
        self.containers
            .lock()
            .ok()
            .and_then(|m| m.get(id).cloned())
            .ok_or_else(|| Error::Container(id.to_string(), "not created, or released".into()))
    }

    pub fn release_container(&self, id: &str) -> Result<(), Error> {
        self.containers
            .lock()
            .ok()
            .and_then(|mut m| m.remove(id))
            .map(|_| ())
            .ok_or_else(|| Error::Container(id.to_string(), "not created, or released".into()))
    }

    /// Every container the build still holds (released when it ends).
    fn take_containers(&self) -> Vec<Container> {
        self.containers
            .lock()
            .map(|mut m| m.drain().map(|(_, c)| c).collect())
            .unwrap_or_default()
    }

    /// Whether the client runs this build's frontend and has not returned yet.
    pub fn awaits_client_frontend(&self) -> bool {
        self.active.load(Ordering::SeqCst)
            && self
                .client_frontend
                .as_ref()
                .is_some_and(|c| c.result.lock().is_ok_and(|r| r.is_some()))
    }

    /// Hands the client-side frontend's result (or error) to the build.
    pub fn finish_client_frontend(&self, r: Result<FrontendResult, Error>) -> Result<(), Error> {
        let tx = self
            .client_frontend
            .as_ref()
            .and_then(|c| c.result.lock().ok().and_then(|mut t| t.take()))
            .ok_or_else(|| Error::NotForwarded(self.id.clone()))?;
        // a build that already ended drops the receiver; nothing is waiting
        let _ = tx.send(r);
        Ok(())
    }
}

/// The solver: builds, sessions, the result cache and the peers.
pub struct Solver<W, F, E> {
    pub config: Config,
    pub sessions: Arc<SessionManager>,
    builds: Mutex<HashMap<String, Arc<Build>>>,
    builds_changed: Notify,
    cache: Arc<Cache>,
    pub worker: Arc<W>,
    frontend: Arc<F>,
    exporter: Arc<E>,
    prune_lock: tokio::sync::Mutex<()>,
    gc_started: AtomicBool,
    gc_pending: AtomicBool,
}

const IMAGE_CONFIG_KEY: &str = "containerimage.config";
/// Containers one build's frontend may hold at once.
const MAX_CONTAINERS: usize = 64;
/// The worker label naming its executor, as BuildKit's workers carry it.
pub const WORKER_EXECUTOR_LABEL: &str = "org.mobyproject.buildkit.worker.executor";

impl<W: Worker, F: Frontend, E: Exporter> Solver<W, F, E> {
    /// A solver whose result cache lives in `config.cache_db` (in memory
    /// when unset).
    pub fn new(config: Config, worker: W, frontend: F, exporter: E) -> Result<Self, Error> {
        let store: Arc<dyn CacheStore> = match &config.cache_db {
            Some(path) => Arc::new(RedbStore::open(path)?),
            None => Arc::new(MemoryStore::default()),
        };
        Ok(Self::with_store(config, store, worker, frontend, exporter))
    }

    /// A solver over a given cache store.
    pub fn with_store(
        config: Config,
        store: Arc<dyn CacheStore>,
        worker: W,
        frontend: F,
        exporter: E,
    ) -> Self {
        let parallelism = config.max_parallelism;
        Solver {
            config,
            sessions: Arc::new(SessionManager::default()),
            builds: Mutex::new(HashMap::new()),
            builds_changed: Notify::new(),
            cache: Arc::new(Cache::new(store).with_parallelism(parallelism)),
            worker: Arc::new(worker),
            frontend: Arc::new(frontend),
            exporter: Arc::new(exporter),
            prune_lock: tokio::sync::Mutex::new(()),
            gc_started: AtomicBool::new(false),
            gc_pending: AtomicBool::new(false),
        }
    }

    fn register(&self, req: &BuildRequest) -> Result<(Arc<Build>, Option<Returned>), Error> {
        let no_cache = req.frontend_attrs.contains_key("no-cache");
        let (mut b, rx) = Build::with_client_frontend(req, no_cache);
        // a build's logs past its memory budget go beside the cache database
        let spill = self.config.cache_db.as_deref().and_then(|p| p.parent());
        b.progress = Progress::spilling_to(spill.map(|p| p.to_path_buf()));
        let b = Arc::new(b);
        if let Ok(mut m) = self.builds.lock() {
            // a build id is the client's; another client cannot take over a running build
            if m.get(&req.id)
                .is_some_and(|o| o.active.load(Ordering::SeqCst))
            {
                return Err(Error::DuplicateBuild(req.id.clone()));
            }
            m.insert(req.id.clone(), b.clone());
        }
        self.builds_changed.notify_waiters();
        Ok((b, rx))
    }

    /// The build with `id`, waiting a little for a Solve that is about to
    /// register it (clients call Status and Solve concurrently).
    pub async fn build(&self, id: &str, wait: Duration) -> Result<Arc<Build>, Error> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.builds_changed.notified();
            if let Some(b) = self.builds.lock().ok().and_then(|m| m.get(id).cloned()) {
                return Ok(b);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::UnknownBuild(id.to_string()));
            }
        }
    }

    /// Runs a whole build: frontend, solve, exporters. Dropping the future
    /// cancels the build: its vertices stop unless another build shares them.
    pub async fn solve(
        self: &Arc<Self>,
        req: BuildRequest,
    ) -> Result<BTreeMap<String, String>, Error> {
        self.start_gc();
        let (build, returned) = self.register(&req)?;
        let _end = BuildEnd {
            solver: self.clone(),
            build: build.clone(),
        };
        let r = self.run_build(&build, &req, returned).await;
        self.record_history(&build, &req, &r).await;
        r
    }

    async fn record_history(
        &self,
        build: &Build,
        req: &BuildRequest,
        r: &Result<BTreeMap<String, String>, Error>,
    ) {
        let rec = HistoryRecord {
            r#ref: build.id.clone(),
            // a client-side frontend's build names the frontend it ran through LLBBridge
            frontend: if req.frontend.is_empty() {
                build
                    .frontend_run
                    .lock()
                    .map(|f| f.clone())
                    .unwrap_or_default()
            } else {
                req.frontend.clone()
            },
            frontend_attrs: history_attrs(&req.frontend_attrs),
            created: build.started,
            completed: unix_nanos(),
            error: r.as_ref().err().map(|e| e.to_string()).unwrap_or_default(),
            exporter_response: r.as_ref().cloned().unwrap_or_default(),
            steps: steps_from_progress(&build.progress.vertices()),
        };
        if let Err(e) = self.cache.with_store(move |s| s.put_history(&rec)).await {
            tracing::warn!(build = %build.id, error = %e, "build history not recorded");
        }
    }

    /// Finished builds, oldest first.
    pub async fn history(&self) -> Result<Vec<HistoryRecord>, Error> {
        self.cache.with_store(|s| s.list_history()).await
    }

    /// Builds running now: (ref, started unix ns).
    pub fn active_builds(&self) -> Vec<(String, i64)> {
        self.builds
            .lock()
            .map(|m| {
                m.values()
                    .filter(|b| b.active.load(Ordering::SeqCst))
                    .map(|b| (b.id.clone(), b.started))
                    .collect()
            })
            .unwrap_or_default()
    }

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
    fn gc_soon(self: &Arc<Self>) {
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
                Err(e) => tracing::warn!(error = %e, "gc"),
            }
        });
    }

    /// Starts the periodic GC (once; nothing without policies).
    fn start_gc(self: &Arc<Self>) {
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
    /// remaining item reaches and the selected cache mounts. It measures
    /// again and goes on while something was removed: removing a record
    /// frees the records under it, removable in the next round (and under a
    /// size limit, the store may still be over it). Returns the removed
    /// items. Prunes run one at a time.
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
        // shared snapshots stay exactly as long as a kept item reaches them
        let keep: Vec<String> = items
            .iter()
            .filter(|i| !gone_ids.contains(i.id.as_str()))
            .filter(|i| !i.shared || matches!(i.target, Target::Record(_)))
            .flat_map(|i| i.refs.iter().cloned())
            .collect();
        self.worker.prune(&keep, in_use_from).await?;
        Ok(gone)
    }

    async fn run_build(
        self: &Arc<Self>,
        build: &Arc<Build>,
        req: &BuildRequest,
        returned: Option<Returned>,
    ) -> Result<BTreeMap<String, String>, Error> {
        // steps are recorded per project: the client's session key (its
        // context dir), the target and the Dockerfile name
        let shared_key = if req.session_id.is_empty() {
            String::new()
        } else {
            self.sessions
                .get(&req.session_id, Duration::from_secs(1))
                .await
                .map(|s| s.shared_key)
                .unwrap_or_default()
        };
        if let Ok(mut k) = build.shared_key.lock() {
            k.clone_from(&shared_key);
        }
        for c in &req.cache {
            build.progress.warn(&format!(
                "kiln does not import or export build cache yet: {c} is ignored"
            ));
        }
        for k in req
            .frontend_attrs
            .keys()
            .filter(|k| k.starts_with("attest:"))
        {
            build.progress.warn(&format!(
                "kiln does not make attestations yet: {k} is ignored"
            ));
        }
        let attr = |k: &str| req.frontend_attrs.get(k).cloned().unwrap_or_default();
        build.set_scope(format!(
            "{shared_key}\0{}\0{}",
            attr("target"),
            attr("filename")
        ));
        let result = match returned {
            // the client runs the frontend and hands its result over through LLBBridge
            Some(rx) => rx.await.map_err(|_| Error::Cancelled)??,
            None => self.frontend_result(build, req).await?,
        };
        let metadata = result.metadata;
        // a multi-platform result: every platform solved (together), exported as one
        let ordered = platform_order(&metadata, result.refs);
        let solved =
            futures::future::try_join_all(ordered.iter().map(|(_, id)| self.solve_ref(build, id)))
                .await?;
        let platforms: Vec<PlatformJob> = ordered
            .into_iter()
            .zip(solved)
            .map(|((id, _), r)| PlatformJob {
                image_config: metadata
                    .get(&format!("{IMAGE_CONFIG_KEY}/{id}"))
                    .cloned()
                    .unwrap_or_default(),
                id,
                r#ref: r,
            })
            .collect();
        let result = if platforms.is_empty() {
            self.solve_ref(build, result.r#ref.as_deref().unwrap_or_default())
                .await?
        } else {
            String::new()
        };
        let image_config = metadata
            .get(IMAGE_CONFIG_KEY)
            .cloned()
            .unwrap_or_else(|| default_image_config(&self.config));
        let mut response = BTreeMap::new();
        // one build time for every output, so a build gives one image digest
        let build_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for (i, exp) in req.exporters.iter().enumerate() {
            let name = match exp.r#type.as_str() {
                "image" => "exporting to image".to_string(),
                "oci" | "docker" => format!("exporting to {} image format", exp.r#type),
                "local" => "exporting to client directory".to_string(),
                "tar" => "exporting to client tarball".to_string(),
                other => return Err(Error::UnknownExporter(other.to_string())),
            };
            let vdigest = export_vertex_digest(&build.id, i);
            let mut pv = ProgressVertex {
                digest: vdigest.clone(),
                name,
                started: Some(now()),
                ..Default::default()
            };
            build.progress.vertex(pv.clone());
            let pb = build.clone();
            let vd = vdigest.clone();
            let status: Arc<dyn Fn(String) + Send + Sync> =
                Arc::new(move |s: String| pb.progress.log(&vd, 1, format!("{s}\n").into_bytes()));
            let r = self
                .exporter
                .export(
                    ExportJob {
                        build_id: build.id.clone(),
                        session_id: req.session_id.clone(),
                        worker: self.worker.address(),
                        r#ref: result.clone(),
                        r#type: exp.r#type.clone(),
                        attrs: exporter_attrs(&exp.attrs, &req.frontend_attrs, build_time),
                        image_config: image_config.clone(),
                        index: i as u32,
                        platforms: platforms.clone(),
                    },
                    status,
                )
                .await;
            pv.completed = Some(now());
            match r {
                Ok(resp) => {
                    build.progress.vertex(pv);
                    response.extend(resp);
                }
                Err(e) => {
                    pv.error = e.to_string();
                    build.progress.vertex(pv);
                    return Err(e);
                }
            }
        }
        Ok(response)
    }

    /// The result of a build's frontend run here: the definition of the
    /// request itself, or what the named frontend made of it.
    async fn frontend_result(
        self: &Arc<Self>,
        build: &Arc<Build>,
        req: &BuildRequest,
    ) -> Result<FrontendResult, Error> {
        if req.frontend.is_empty() {
            let def = req.definition.clone().unwrap_or_default();
            return Ok(FrontendResult {
                r#ref: Some(build.add_ref(def)),
                ..Default::default()
            });
        }
        self.run_frontend(
            build,
            &req.frontend,
            &req.frontend_attrs,
            req.frontend_inputs.clone(),
        )
        .await
    }

    /// Runs `frontend` with `attrs` (and `inputs`, for frontend images) for a
    /// build; its definitions become results of the build (solved when needed).
    pub async fn run_frontend(
        self: &Arc<Self>,
        build: &Arc<Build>,
        frontend: &str,
        attrs: &BTreeMap<String, String>,
        inputs: BTreeMap<String, pb::Definition>,
    ) -> Result<FrontendResult, Error> {
        if let Ok(mut f) = build.frontend_run.lock()
            && f.is_empty()
        {
            f.push_str(frontend);
        }
        if frontend == crate::frontend_image::GATEWAY_FRONTEND {
            return crate::frontend_image::solve(self, build, attrs, inputs).await;
        }
        let out = self
            .frontend
            .solve(&build.id, frontend, attrs, &build.session_id)
            .await?;
        let refs: BTreeMap<String, String> = out
            .refs
            .into_iter()
            .map(|(platform, def)| (platform, build.add_ref(def)))
            .collect();
        Ok(FrontendResult {
            r#ref: refs.is_empty().then(|| build.add_ref(out.definition)),
            refs,
            metadata: out.metadata,
        })
    }

    /// The snapshot of a result of the build (solving it the first time);
    /// empty for scratch.
    pub async fn solve_ref(&self, build: &Arc<Build>, id: &str) -> Result<String, Error> {
        if id.is_empty() {
            return Ok(String::new());
        }
        let r = build.build_ref(id)?;
        r.snapshot
            .get_or_try_init(|| self.solve_definition(build, &r.def))
            .await
            .cloned()
    }

    /// Solves a definition within a build.
    pub async fn solve_definition(
        &self,
        build: &Arc<Build>,
        def: &pb::Definition,
    ) -> Result<String, Error> {
        solve::solve(self.worker.clone(), self.cache.clone(), build.clone(), def).await
    }

    /// Resolves an image reference to its digest and config for a build, shown
    /// as a step of the build.
    pub async fn resolve_image(
        &self,
        build: &Build,
        reference: &str,
        platform: Option<pb::Platform>,
    ) -> Result<crate::peer::ResolvedImage, Error> {
        use sha2::{Digest, Sha256};
        let started = now();
        let digest = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("resolve:{}:{reference}", build.id)))
        );
        let res = self
            .exporter
            .resolve(reference, platform, &build.session_id)
            .await;
        build.progress.vertex(ProgressVertex {
            digest,
            name: format!("[internal] load metadata for {reference}"),
            started: Some(started),
            completed: Some(now()),
            error: res
                .as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
            ..Default::default()
        });
        res
    }

    /// The platforms the workers run.
    pub fn worker_platforms(&self) -> Vec<pb::Platform> {
        self.config
            .platforms
            .iter()
            .map(|p| {
                let mut it = p.split('/');
                pb::Platform {
                    os: it.next().unwrap_or_default().to_string(),
                    architecture: it.next().unwrap_or_default().to_string(),
                    variant: it.next().unwrap_or_default().to_string(),
                    ..Default::default()
                }
            })
            .collect()
    }

    /// The workers as a frontend image reads them (`BUILDKIT_WORKERS`: a JSON
    /// list of `{ID, Labels, Platforms}`).
    pub fn workers_json(&self) -> String {
        let platforms: Vec<serde_json::Value> = self
            .worker_platforms()
            .iter()
            .map(|p| {
                let mut v = serde_json::json!({"os": p.os, "architecture": p.architecture});
                if !p.variant.is_empty() {
                    v["variant"] = p.variant.clone().into();
                }
                v
            })
            .collect();
        serde_json::json!([{
            "ID": self.worker.address(),
            "Labels": {WORKER_EXECUTOR_LABEL: "oci"},
            "Platforms": platforms,
        }])
        .to_string()
    }

    pub fn frontend(&self) -> &F {
        &self.frontend
    }

    pub fn exporter(&self) -> &E {
        &self.exporter
    }
}

/// Ends a build when its Solve finishes or is dropped: closes its progress
/// and forgets it a minute later (late Status subscribers still get the
/// whole history).
struct BuildEnd<W: Worker, F: Frontend, E: Exporter> {
    solver: Arc<Solver<W, F, E>>,
    build: Arc<Build>,
}

impl<W: Worker, F: Frontend, E: Exporter> Drop for BuildEnd<W, F, E> {
    fn drop(&mut self) {
        self.build.active.store(false, Ordering::SeqCst);
        self.build.progress.close();
        let containers = self.build.take_containers();
        if !containers.is_empty()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let worker = self.solver.worker.clone();
            rt.spawn(async move {
                for c in containers {
                    if let Err(e) = worker.release_container(&c.worker_id).await {
                        tracing::warn!(container = %c.worker_id, error = %e, "release container");
                    }
                }
            });
        }
        self.solver.gc_soon();
        let solver = self.solver.clone();
        let id = self.build.id.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                if let Ok(mut m) = solver.builds.lock() {
                    m.remove(&id);
                }
            });
        }
    }
}

/// Progress id of the export step `index` of a build.
fn export_vertex_digest(build_id: &str, index: usize) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("export:{build_id}:{index}").as_bytes());
    format!(
        "sha256:{}",
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// The results of a multi-platform result in the order of the frontend's
/// `refs.platforms` list (`{"platforms":[{"id":..}]}`), then any it did not list.
fn platform_order(
    metadata: &BTreeMap<String, Vec<u8>>,
    mut refs: BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let listed: Vec<String> = metadata
        .get("refs.platforms")
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        .and_then(|v| {
            v.get("platforms")?.as_array().map(|a| {
                a.iter()
                    .filter_map(|p| p.get("id")?.as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for id in listed {
        if let Some(r) = refs.remove(&id) {
            out.push((id, r));
        }
    }
    out.extend(refs);
    out
}

fn default_image_config(config: &Config) -> Vec<u8> {
    let platform = config.platforms.first().cloned().unwrap_or_default();
    let mut parts = platform.split('/');
    let os = parts.next().unwrap_or("linux");
    let arch = parts.next().unwrap_or("amd64");
    serde_json::json!({
        "architecture": arch,
        "os": os,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
    })
    .to_string()
    .into_bytes()
}

/// An exporter's attrs plus what the build's frontend attrs imply for it:
/// `build-arg:SOURCE_DATE_EPOCH` becomes `source-date-epoch`, as in BuildKit.
/// Exporter attr carrying the build's time (unix seconds) for image configs
/// without SOURCE_DATE_EPOCH.
pub const BUILD_TIME_ATTR: &str = "kiln.build-time";

fn exporter_attrs(
    attrs: &BTreeMap<String, String>,
    frontend_attrs: &BTreeMap<String, String>,
    build_time: u64,
) -> BTreeMap<String, String> {
    let mut out = attrs.clone();
    out.insert(BUILD_TIME_ATTR.to_string(), build_time.to_string());
    if let Some(epoch) = frontend_attrs
        .get("build-arg:SOURCE_DATE_EPOCH")
        .filter(|v| !v.is_empty())
    {
        out.entry("source-date-epoch".to_string())
            .or_insert_with(|| epoch.clone());
    }
    out
}

#[cfg(test)]
mod exporter_attr_tests {
    use super::*;

    #[test]
    fn source_date_epoch_build_arg_reaches_the_exporter() {
        let fe: BTreeMap<String, String> =
            [("build-arg:SOURCE_DATE_EPOCH".to_string(), "42".to_string())].into();
        let out = exporter_attrs(&BTreeMap::new(), &fe, 1);
        assert_eq!(out.get("source-date-epoch").map(String::as_str), Some("42"));
        // an explicit exporter attr wins
        let own: BTreeMap<String, String> =
            [("source-date-epoch".to_string(), "7".to_string())].into();
        assert_eq!(
            exporter_attrs(&own, &fe, 1)
                .get("source-date-epoch")
                .map(String::as_str),
            Some("7")
        );
    }
}
