//! The solver: the daemon's builds from Solve to export. It registers a
//! build, runs its frontend (here, or in the client through LLBBridge),
//! solves the results the frontend hands over ([`crate::solve`]) and runs
//! the build's exporters; it also serves the results and images frontends
//! ask for while they run. Disk use, prune and GC are in [`crate::gc`].

use crate::build::{Build, BuildRequest, FrontendResult, Returned, exporter_attrs};
use crate::cache::{CacheStore, MemoryStore, RedbStore, unix_nanos};
use crate::history::{HistoryRecord, steps_from_progress};
use crate::peer::{ExportJob, Exporter, Frontend, PlatformJob, Worker};
use crate::progress::{Progress, now};
use crate::session::SessionManager;
use crate::solve::{self, Cache};
use crate::{Config, Error};
use kiln_proto::moby::buildkit::v1::Vertex as ProgressVertex;
use kiln_proto::pb;
use kiln_proto::status::chain;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// The solver: builds, sessions, the result cache and the peers.
pub struct Solver<W, F, E> {
    pub config: Config,
    pub sessions: Arc<SessionManager>,
    pub(crate) builds: Mutex<HashMap<String, Arc<Build>>>,
    pub(crate) builds_changed: Notify,
    pub(crate) cache: Arc<Cache>,
    pub worker: Arc<W>,
    pub(crate) frontend: Arc<F>,
    pub(crate) exporter: Arc<E>,
    pub(crate) prune_lock: tokio::sync::Mutex<()>,
    pub(crate) gc_started: AtomicBool,
    pub(crate) gc_pending: AtomicBool,
}

const IMAGE_CONFIG_KEY: &str = "containerimage.config";
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
        mut req: BuildRequest,
    ) -> Result<BTreeMap<String, String>, Error> {
        self.start_gc();
        crate::remote::add_defaults(
            &mut req.cache_imports,
            &mut req.cache_exports,
            &self.config.cache_imports,
            &self.config.cache_exports,
        );
        let (build, returned) = self.register(&req)?;
        let mut end = BuildEnd {
            solver: self.clone(),
            build: build.clone(),
            status: "canceled",
        };
        let r = self.run_build(&build, &req, returned).await;
        end.status = match &r {
            Ok(_) => "succeeded",
            Err(Error::Cancelled) => "canceled",
            Err(_) => "failed",
        };
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
            error: r.as_ref().err().map(|e| chain(e)).unwrap_or_default(),
            exporter_response: r.as_ref().cloned().unwrap_or_default(),
            steps: steps_from_progress(&build.progress.vertices()),
            warnings: build.progress.warning_count(),
        };
        if let Err(e) = self.cache.with_store(move |s| s.put_history(&rec)).await {
            tracing::warn!(build = %build.id, error = %kiln_proto::status::Chain(&e), "build history not recorded");
        }
    }

    /// Finished builds, oldest first.
    pub async fn history(&self) -> Result<Vec<HistoryRecord>, Error> {
        self.cache.with_store(|s| s.list_history()).await
    }

    /// A running build as its history record will read, so far: its steps
    /// with their state now (`completed` 0 while it runs).
    pub fn running_record(&self, id: &str) -> Option<HistoryRecord> {
        let b = self.builds.lock().ok()?.get(id).cloned()?;
        if !b.active.load(Ordering::SeqCst) {
            return None;
        }
        let frontend = b.frontend_run.lock().map(|f| f.clone()).unwrap_or_default();
        Some(HistoryRecord {
            r#ref: b.id.clone(),
            frontend,
            created: b.started,
            steps: steps_from_progress(&b.progress.vertices()),
            ..Default::default()
        })
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

    async fn run_build(
        self: &Arc<Self>,
        build: &Arc<Build>,
        req: &BuildRequest,
        returned: Option<Returned>,
    ) -> Result<BTreeMap<String, String>, Error> {
        self.set_scope(build, req).await;
        let cache_exports = match crate::remote::export_specs(&req.cache_exports)
            .and_then(|s| crate::remote::check_imports(&req.cache_imports).map(|()| s))
        {
            Ok(s) => s,
            Err(e) => {
                // solves waiting for the imports go on (and end with the build)
                let _ = build.remote.set(None);
                return Err(e);
            }
        };
        if build.remote.get().is_none() {
            let imports = self.import_caches(build, req).await;
            let _ = build
                .remote
                .set(Some(Arc::new(crate::remote::Remote::new(imports))));
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
        let result = match returned {
            // the client runs the frontend and hands its result over through LLBBridge
            Some(rx) => rx.await.map_err(|_| Error::Cancelled)??,
            None => self.frontend_result(build, req).await?,
        };
        if req.frontend_attrs.contains_key(REQUEST_ID_ATTR) {
            // a subrequest (`--call targets`, `requestid=frontend.lint`) answers
            // with metadata: nothing is solved or exported
            return Ok(subrequest_response(&result.metadata));
        }
        // a single image push (and nothing else reading the result) may
        // push an imported result without loading it
        let defer = cache_exports.is_empty()
            && matches!(req.exporters.as_slice(), [e] if e.r#type == "image"
                && e.attrs.get("push").is_some_and(|v| v == "true" || v == "1"));
        let solved = self.solve_result(build, result, defer).await?;
        let mut response = BTreeMap::new();
        // one build time for every output, so a build gives one image digest
        let build_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for (i, exp) in req.exporters.iter().enumerate() {
            let attrs = exporter_attrs(&exp.attrs, &req.frontend_attrs, build_time);
            response.extend(self.export(build, req, &solved, i, attrs).await?);
        }
        for spec in &cache_exports {
            response.extend(self.export_cache(build, req, spec).await?);
        }
        Ok(response)
    }

    /// Seeds this worker's cache mounts from the layers an import carries
    /// (`mounts`: a JSON array of descriptors) when they are empty.
    async fn seed_cache_mounts(
        &self,
        build: &Arc<Build>,
        vdigest: &str,
        repo: &str,
        mounts: &[u8],
    ) -> Result<(), Error> {
        use crate::remote::plan;
        if mounts.is_empty() {
            return Ok(());
        }
        let layers: Vec<kiln_oci::Descriptor> = serde_json::from_slice(mounts)
            .map_err(|e| Error::CacheOption(format!("cache mounts of {repo}: {e}")))?;
        for l in layers {
            let Some(id) = l
                .annotations
                .as_ref()
                .and_then(|a| a.get(plan::MOUNT_ID_ANNOTATION))
                .cloned()
            else {
                continue;
            };
            let attrs = BTreeMap::from([
                (plan::MOUNT_REPOSITORY_ATTR.to_string(), repo.to_string()),
                (
                    plan::CACHE_LAYERS_ATTR.to_string(),
                    serde_json::to_string(&[&l]).unwrap_or_default(),
                ),
            ]);
            let op = plan::internal_op(format!("{}{id}", plan::MOUNT_IMPORT_SCHEME), attrs);
            self.run_internal(build, vdigest, op, &format!("cache mount {id}"))
                .await?;
            build
                .progress
                .log(vdigest, 1, format!("cache mount {id}\n").into_bytes());
        }
        Ok(())
    }

    /// Snapshots of the cache mounts the build's steps used, for an export
    /// with `cache-mounts=true` (`vdigest`: the export's progress vertex).
    async fn snapshot_cache_mounts(
        &self,
        build: &Arc<Build>,
        remote: &crate::remote::Remote,
        vdigest: &str,
    ) -> Result<Vec<kiln_proto::kiln::exporter::v1::CacheMountRef>, Error> {
        use crate::remote::plan;
        let ids: Vec<String> = remote
            .cache_mounts
            .lock()
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default();
        let mut out = Vec::new();
        for id in ids {
            let op = plan::internal_op(
                format!("{}{id}", plan::MOUNT_EXPORT_SCHEME),
                BTreeMap::new(),
            );
            let r = self
                .run_internal(build, vdigest, op, &format!("cache mount {id}"))
                .await?;
            build
                .progress
                .log(vdigest, 1, format!("cache mount {id}\n").into_bytes());
            out.push(kiln_proto::kiln::exporter::v1::CacheMountRef { id, r#ref: r });
        }
        Ok(out)
    }

    /// Runs an op only kiln makes (a cache mount's snapshot or seed) on the
    /// worker for `build`; its result ref.
    async fn run_internal(
        &self,
        build: &Arc<Build>,
        vdigest: &str,
        op_bytes: Vec<u8>,
        name: &str,
    ) -> Result<String, Error> {
        let op = crate::peer::RunOp {
            build_id: build.id.clone(),
            session_id: build.session_id.clone(),
            session_shared_key: build.shared_key(),
            digest: vdigest.to_string(),
            op_bytes,
            inputs: Vec::new(),
            name: name.to_string(),
            entitlements: Vec::new(),
        };
        let events = crate::step::run_events(build, vdigest);
        let out = self.worker.run(op, events).await?;
        Ok(out.refs.first().cloned().unwrap_or_default())
    }

    /// The build's `--import-cache` entries read (through the exporter); one
    /// that cannot be read is shown as failed and the build goes on without it.
    async fn import_caches(
        &self,
        build: &Arc<Build>,
        req: &BuildRequest,
    ) -> Vec<crate::remote::graph::Imported> {
        let reads = req
            .cache_imports
            .iter()
            .enumerate()
            .map(|(i, e)| async move {
                let what = e.attr("ref").or(e.attr("src")).unwrap_or_default();
                let mut pv = ProgressVertex {
                    digest: kiln_digest::sha256(
                        format!("{}\0import-cache\0{i}", build.id).as_bytes(),
                    ),
                    name: format!("importing cache manifest from {what}"),
                    started: Some(now()),
                    ..Default::default()
                };
                build.progress.vertex(pv.clone());
                let r = async {
                    let (config, repo, mounts) = self
                        .exporter
                        .resolve_cache(&e.r#type, &e.attrs, &req.session_id)
                        .await?;
                    let config = kiln_oci::cache_config::CacheConfig::parse(&config)
                        .map_err(|err| Error::CacheOption(format!("cache {what}: {err}")))?;
                    if crate::remote::bool_attr(e, "cache-mounts")? {
                        self.seed_cache_mounts(build, &pv.digest, &repo, &mounts)
                            .await?;
                    }
                    Ok::<_, Error>(crate::remote::graph::Imported::new(config, repo))
                }
                .await;
                pv.completed = Some(now());
                if let Err(err) = &r {
                    pv.error = chain(err);
                }
                build.progress.vertex(pv);
                r.ok()
            });
        futures::future::join_all(reads)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// One `--export-cache` entry, shown as a step of its own; with
    /// `ignore-error=true` a failure is a warning.
    async fn export_cache(
        &self,
        build: &Arc<Build>,
        req: &BuildRequest,
        spec: &crate::remote::ExportSpec,
    ) -> Result<BTreeMap<String, String>, Error> {
        let Some(Some(remote)) = build.remote.get() else {
            return Ok(BTreeMap::new());
        };
        let kind = match spec.entry.r#type.as_str() {
            "registry" => "cache/registry",
            "local" => "cache/local",
            // inline records travel with the image export
            _ => return Ok(BTreeMap::new()),
        };
        let vdigest = kiln_digest::sha256(
            format!(
                "{}\0export-cache\0{}",
                build.id,
                spec.entry.attr("ref").unwrap_or_default()
            )
            .as_bytes(),
        );
        let mut pv = ProgressVertex {
            digest: vdigest.clone(),
            name: match kind {
                "cache/local" => "exporting cache to client directory".to_string(),
                _ => format!("exporting cache to {}", spec.entry.r#type),
            },
            started: Some(now()),
            ..Default::default()
        };
        build.progress.vertex(pv.clone());
        let status = crate::step::status_lines(build, &vdigest);
        let r = async {
            let mut graph = remote.export_graph(spec.mode, true).await?;
            if spec.cache_mounts {
                graph.mounts = self.snapshot_cache_mounts(build, remote, &vdigest).await?;
            }
            let refs: Vec<String> = graph
                .nodes
                .iter()
                .map(|n| n.r#ref.clone())
                .chain(graph.mounts.iter().map(|m| m.r#ref.clone()))
                .filter(|r| !r.is_empty())
                .collect();
            let (worker, local) = self.worker.gather(&refs).await?;
            let moved: HashMap<String, String> = refs.into_iter().zip(local).collect();
            for r in graph
                .nodes
                .iter_mut()
                .map(|n| &mut n.r#ref)
                .chain(graph.mounts.iter_mut().map(|m| &mut m.r#ref))
            {
                if let Some(l) = moved.get(r.as_str()) {
                    r.clone_from(l);
                }
            }
            let job = ExportJob {
                build_id: build.id.clone(),
                session_id: req.session_id.clone(),
                worker,
                r#ref: String::new(),
                r#type: kind.to_string(),
                attrs: spec.entry.attrs.clone(),
                image_config: Vec::new(),
                index: 0,
                platforms: Vec::new(),
                cache: Some(graph),
                remote: None,
            };
            self.exporter.export(job, status).await
        }
        .await;
        pv.completed = Some(now());
        let out = match r {
            Ok(resp) => Ok(resp),
            Err(e) if spec.ignore_error => {
                build.progress.log(
                    &vdigest,
                    2,
                    format!("cache export failed (ignore-error=true): {}\n", chain(&e))
                        .into_bytes(),
                );
                Ok(BTreeMap::new())
            }
            Err(e) => {
                pv.error = chain(&e);
                Err(e)
            }
        };
        build.progress.vertex(pv);
        out
    }

    /// Records steps per project: the client's session key (its context
    /// dir), the target and the Dockerfile name.
    async fn set_scope(&self, build: &Build, req: &BuildRequest) {
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
        let attr = |k: &str| req.frontend_attrs.get(k).cloned().unwrap_or_default();
        build.set_scope(format!(
            "{shared_key}\0{}\0{}",
            attr("target"),
            attr("filename")
        ));
    }

    /// The frontend's result solved: its single ref, or every platform of a
    /// multi-platform result (together), with their image configs.
    async fn solve_result(
        &self,
        build: &Arc<Build>,
        result: FrontendResult,
        defer: bool,
    ) -> Result<Solved, Error> {
        let metadata = result.metadata;
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
        let id = result.r#ref.as_deref().unwrap_or_default();
        let (r#ref, imported) = match (platforms.is_empty(), defer) {
            (false, _) => (String::new(), None),
            (true, false) => (self.solve_ref(build, id).await?, None),
            (true, true) => match self.solve_ref_unloaded(build, id).await? {
                solve::SolvedTop::Ref(r) => (r, None),
                solve::SolvedTop::Imported { hit, load } => (String::new(), Some((hit, load))),
            },
        };
        let image_config = metadata
            .get(IMAGE_CONFIG_KEY)
            .cloned()
            .unwrap_or_else(|| default_image_config(&self.config));
        Ok(Solved {
            r#ref,
            imported,
            image_config,
            platforms,
        })
    }

    /// Runs exporter `index` of the build, shown as a step of its own.
    async fn export(
        &self,
        build: &Arc<Build>,
        req: &BuildRequest,
        solved: &Solved,
        index: usize,
        attrs: BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, Error> {
        let kind = req.exporters[index].r#type.clone();
        let name = match kind.as_str() {
            "image" => "exporting to image".to_string(),
            "oci" | "docker" => format!("exporting to {kind} image format"),
            "local" => "exporting to client directory".to_string(),
            "tar" => "exporting to client tarball".to_string(),
            other => return Err(Error::UnknownExporter(other.to_string())),
        };
        let vdigest = export_vertex_digest(&build.id, index);
        let mut pv = ProgressVertex {
            digest: vdigest.clone(),
            name,
            started: Some(now()),
            ..Default::default()
        };
        build.progress.vertex(pv.clone());
        let status = crate::step::status_lines(build, &vdigest);
        let r = async {
            // an imported result not loaded: an image push takes its layers
            // from the registry; anything else loads it
            let (top, remote) = match &solved.imported {
                Some((hit, _))
                    if kind == "image"
                        && !hit
                            .repository
                            .starts_with(crate::remote::plan::LOCAL_STORE_PREFIX) =>
                {
                    let layers = serde_json::to_vec(&hit.layers)
                        .map_err(|e| Error::CacheOption(format!("imported layers: {e}")))?;
                    let remote = kiln_proto::kiln::exporter::v1::RemoteLayers {
                        repository: hit.repository.clone(),
                        layers,
                    };
                    (String::new(), Some(remote))
                }
                Some((_, load)) => (load.clone().await.map_err(Error::from)?, None),
                None => (solved.r#ref.clone(), None),
            };
            // the exporter reads from one worker: the results are brought there
            let mut refs = vec![top];
            refs.extend(solved.platforms.iter().map(|p| p.r#ref.clone()));
            // an inline cache: the records go into the image's config
            let inline = matches!(kind.as_str(), "image" | "oci" | "docker")
                && solved.platforms.is_empty()
                && req.cache_exports.iter().any(|e| e.r#type == "inline");
            let mut cache = match (inline, build.remote.get()) {
                (true, Some(Some(r))) => {
                    Some(r.export_graph(crate::remote::Mode::Max, false).await?)
                }
                _ => None,
            };
            let nodes = cache.as_ref().map_or(0, |c| c.nodes.len());
            refs.extend(
                cache
                    .iter()
                    .flat_map(|c| c.nodes.iter().map(|n| n.r#ref.clone())),
            );
            let (worker, mut local) = self.worker.gather(&refs).await?;
            let node_refs = local.split_off(local.len() - nodes);
            if let Some(c) = cache.as_mut() {
                for (n, r) in c.nodes.iter_mut().zip(node_refs) {
                    n.r#ref = r;
                }
            }
            let mut platforms = solved.platforms.clone();
            for (p, r) in platforms.iter_mut().zip(local.drain(1..)) {
                p.r#ref = r;
            }
            let mut attrs = attrs;
            // an image's layers may be in an imported cache on its registry
            // (the solver's attr alone: a client's is dropped)
            attrs.remove(MOUNT_FROM_ATTR);
            if let Some(Some(r)) = build.remote.get() {
                let repos: Vec<&str> = r
                    .imports
                    .iter()
                    .map(|i| i.repo.as_str())
                    .filter(|repo| !repo.starts_with(crate::remote::plan::LOCAL_STORE_PREFIX))
                    .collect();
                if kind == "image" && !repos.is_empty() {
                    attrs.insert(MOUNT_FROM_ATTR.to_string(), repos.join(","));
                }
            }
            let job = ExportJob {
                build_id: build.id.clone(),
                session_id: req.session_id.clone(),
                worker,
                r#ref: local.pop().unwrap_or_default(),
                r#type: kind,
                attrs,
                image_config: solved.image_config.clone(),
                index: index as u32,
                platforms,
                cache,
                remote,
            };
            self.exporter.export(job, status).await
        }
        .await;
        pv.completed = Some(now());
        if let Err(e) = &r {
            pv.error = chain(e);
        }
        build.progress.vertex(pv);
        r
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

    /// Like [`Solver::solve_ref`], but a result found in an imported cache
    /// is returned unloaded (and not remembered as the ref's snapshot).
    async fn solve_ref_unloaded(
        &self,
        build: &Arc<Build>,
        id: &str,
    ) -> Result<solve::SolvedTop, Error> {
        if id.is_empty() {
            return Ok(solve::SolvedTop::Ref(String::new()));
        }
        let r = build.build_ref(id)?;
        if let Some(s) = r.snapshot.get() {
            return Ok(solve::SolvedTop::Ref(s.clone()));
        }
        let solved = solve::solve_unloaded(
            self.worker.clone(),
            self.cache.clone(),
            build.clone(),
            &r.def,
        )
        .await?;
        if let solve::SolvedTop::Ref(s) = &solved {
            let _ = r.snapshot.set(s.clone());
        }
        Ok(solved)
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
        let started = now();
        let digest = kiln_digest::sha256(format!("resolve:{}:{reference}", build.id).as_bytes());
        let res = self
            .exporter
            .resolve(reference, platform, &build.session_id)
            .await;
        metadata_vertex(build, digest, reference, started, res)
    }

    /// The config of the image `reference` (`NAME@sha256:…`) in the OCI
    /// layout `store` the build's client serves (`kiln build --oci-layout`,
    /// BuildKit's `ResolverTypeOCILayout`). Every blob is checked against
    /// its digest; a session other than the build's own is refused.
    pub async fn resolve_oci_layout(
        &self,
        build: &Build,
        reference: &str,
        platform: Option<pb::Platform>,
        session_id: &str,
        store: &str,
    ) -> Result<crate::peer::ResolvedImage, Error> {
        if !session_id.is_empty() && session_id != build.session_id {
            return Err(Error::ForeignSession {
                name: format!("{}{reference}", kiln_session::ocilayout::SCHEME),
                session: session_id.to_string(),
            });
        }
        let started = now();
        let res = self
            .read_oci_layout(build, reference, platform, store)
            .await;
        let digest =
            kiln_digest::sha256(format!("resolve-oci:{}:{store}:{reference}", build.id).as_bytes());
        metadata_vertex(build, digest, reference, started, res)
    }

    async fn read_oci_layout(
        &self,
        build: &Build,
        reference: &str,
        platform: Option<pb::Platform>,
        store: &str,
    ) -> Result<crate::peer::ResolvedImage, Error> {
        use kiln_session::ocilayout;
        let err = |source| Error::OciLayout {
            reference: format!("{}{reference}", ocilayout::SCHEME),
            source,
        };
        let digest = match reference.rsplit_once('@') {
            Some((_, d)) if ocilayout::is_digest(d) => d.to_string(),
            _ => {
                return Err(err(kiln_session::Error::Layout(format!(
                    "reference {reference:?} must have a digest"
                ))));
            }
        };
        if store.is_empty() {
            return Err(err(kiln_session::Error::Layout(
                "no store named".to_string(),
            )));
        }
        let session = self
            .sessions
            .get(&build.session_id, self.config.session_wait)
            .await
            .ok_or_else(|| Error::NoSession(build.session_id.clone()))?;
        let platform = match platform.filter(|p| !p.os.is_empty()) {
            Some(p) => kiln_oci::Platform::new(
                &p.os,
                &p.architecture,
                Some(p.variant.as_str()).filter(|v| !v.is_empty()),
            ),
            None => kiln_oci::Platform::host(),
        }
        .normalized();
        let store = ocilayout::store_id(store);
        let channel = session.channel.clone();
        let read = |d: String, limit: u64| {
            let (channel, store) = (channel.clone(), store.clone());
            async move { ocilayout::read_direct(channel, &store, &d, limit).await }
        };
        let resolved = ocilayout::resolve(read, &digest, &platform)
            .await
            .map_err(err)?;
        Ok(crate::peer::ResolvedImage {
            reference: reference.to_string(),
            digest: resolved.digest,
            config: resolved.config,
        })
    }

    /// The workers as `ListWorkers` lists them: a farm's members, or the one
    /// worker with the configured platforms.
    pub fn worker_infos(&self) -> Vec<crate::peer::WorkerInfo> {
        if let Some(members) = self.worker.workers() {
            return members;
        }
        vec![crate::peer::WorkerInfo {
            id: self.worker.address(),
            address: self.worker.address(),
            platforms: self
                .config
                .platforms
                .iter()
                .filter_map(|p| kiln_oci::Platform::parse(p).ok())
                .collect(),
            labels: [(WORKER_EXECUTOR_LABEL.to_string(), "oci".to_string())].into(),
            state: "ready".into(),
            ..Default::default()
        }]
    }

    /// The workers as a frontend image reads them (`BUILDKIT_WORKERS`: a JSON
    /// list of `{ID, Labels, Platforms}`).
    pub fn workers_json(&self) -> String {
        let workers: Vec<serde_json::Value> = self
            .worker_infos()
            .iter()
            .map(|w| {
                let platforms: Vec<serde_json::Value> = w
                    .platforms
                    .iter()
                    .map(|p| {
                        let mut v = serde_json::json!({"os": p.os, "architecture": p.architecture});
                        if let Some(variant) = &p.variant {
                            v["variant"] = variant.clone().into();
                        }
                        v
                    })
                    .collect();
                serde_json::json!({"ID": w.id, "Labels": w.labels, "Platforms": platforms})
            })
            .collect();
        serde_json::Value::from(workers).to_string()
    }

    pub fn frontend(&self) -> &F {
        &self.frontend
    }

    pub fn exporter(&self) -> &E {
        &self.exporter
    }
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

/// A build's result, solved, as its exporters take it.
struct Solved {
    /// the single result's ref (empty for scratch or a multi-platform result)
    r#ref: String,
    /// the single result when it is an imported one not loaded (`r#ref` is
    /// then empty): an image push mounts its layers instead
    imported: Option<(crate::remote::plan::Hit, crate::step::Lazy)>,
    /// the single result's image config
    image_config: Vec<u8>,
    /// a multi-platform result, in the frontend's order
    platforms: Vec<PlatformJob>,
}

/// Ends a build when its Solve finishes or is dropped: closes its progress
/// and forgets it a minute later (late Status subscribers still get the
/// whole history).
struct BuildEnd<W: Worker, F: Frontend, E: Exporter> {
    solver: Arc<Solver<W, F, E>>,
    build: Arc<Build>,
    /// how the build ended, for the metrics (a dropped Solve: canceled)
    status: &'static str,
}

impl<W: Worker, F: Frontend, E: Exporter> Drop for BuildEnd<W, F, E> {
    fn drop(&mut self) {
        self.build.active.store(false, Ordering::SeqCst);
        kiln_metrics::BUILDS.inc(&[self.status]);
        let secs = (unix_nanos() - self.build.started).max(0) as f64 / 1e9;
        kiln_metrics::BUILD_DURATION.observe(&[self.status], secs);
        self.build.progress.close();
        // imported results not loaded hold the build: let both go
        if let Some(Some(r)) = self.build.remote.get()
            && let Ok(mut l) = r.lazy.lock()
        {
            l.clear();
        }
        let containers = self.build.take_containers();
        if !containers.is_empty()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let worker = self.solver.worker.clone();
            rt.spawn(async move {
                for c in containers {
                    if let Err(e) = worker.release_container(&c.worker_id).await {
                        tracing::warn!(container = %c.worker_id, error = %kiln_proto::status::Chain(&e), "release container");
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

/// The exporter attr naming repositories an image's blobs may be mounted
/// from (the registry exporter's `kiln.mount-from`).
const MOUNT_FROM_ATTR: &str = "kiln.mount-from";

/// Progress id of the export step `index` of a build.
fn export_vertex_digest(build_id: &str, index: usize) -> String {
    kiln_digest::sha256(format!("export:{build_id}:{index}").as_bytes())
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

/// The frontend option naming a subrequest.
const REQUEST_ID_ATTR: &str = "requestid";

/// A subrequest's answer as the build's response: its result metadata
/// (`result.json`, `result.txt`, `result.statuscode`, `version`) and, as
/// BuildKit passes on from any result, the `frontend.*` keys.
fn subrequest_response(metadata: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
    metadata
        .iter()
        .filter(|(k, _)| k.starts_with("result.") || k.starts_with("frontend.") || *k == "version")
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
        .collect()
}

/// A resolve shown as a step of the build (`[internal] load metadata for REF`),
/// failed when it did; passes its result on.
fn metadata_vertex<T>(
    build: &Build,
    digest: String,
    reference: &str,
    started: prost_types::Timestamp,
    res: Result<T, Error>,
) -> Result<T, Error> {
    build.progress.vertex(ProgressVertex {
        digest,
        name: format!("[internal] load metadata for {reference}"),
        started: Some(started),
        completed: Some(now()),
        error: res.as_ref().err().map(|e| chain(e)).unwrap_or_default(),
        ..Default::default()
    });
    res
}
