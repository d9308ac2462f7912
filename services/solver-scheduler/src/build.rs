//! A build: one Solve request from a client and the state it keeps while
//! it runs (the results and containers handed to its frontend, the
//! client-side frontend's pending result, its progress). The solver that
//! runs builds is in [`crate::solver`].

use crate::Error;
use crate::cache::unix_nanos;
use crate::progress::Progress;
use kiln_proto::pb;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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
    /// build caches to write (`--export-cache`) and read (`--import-cache`)
    pub cache_exports: Vec<crate::remote::CacheEntry>,
    pub cache_imports: Vec<crate::remote::CacheEntry>,
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
/// [`crate::solver::Solver::solve_ref`] table) and metadata (image configs, `refs.platforms`).
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
pub(crate) struct BuildRef {
    pub(crate) def: pb::Definition,
    pub(crate) snapshot: tokio::sync::OnceCell<String>,
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
pub(crate) type Returned = tokio::sync::oneshot::Receiver<Result<FrontendResult, Error>>;

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
    pub(crate) frontend_run: Mutex<String>,
    /// see [`BuildRequest::owner`]
    pub owner: String,
    /// the client asked for cache-miss explanations (`explain-cache` attr)
    pub explain: bool,
    /// names of the build's build args
    pub build_args: std::collections::BTreeSet<String>,
    /// the project this build belongs to, for step identities across builds
    scope: Mutex<String>,
    /// the client session's shared key (its context dir)
    pub(crate) shared_key: Mutex<String>,
    /// The layer options of the build's image export, when it has one: the
    /// layers of the result's chain are computed as its steps finish.
    pub eager_layers: Option<kiln_oci::LayerOptions>,
    /// the build's remote cache (`None`: it neither imports nor exports
    /// one), set before its steps start: solves wait for its imports
    pub remote: tokio::sync::SetOnce<Option<Arc<crate::remote::Remote>>>,
    /// the build's root span (`Control.Solve`'s) while that call runs,
    /// parent of the work the client's own LLBBridge calls start
    span: Mutex<Option<tracing::Span>>,
}

/// Frontend attr asking for cache-miss explanations.
pub const EXPLAIN_CACHE_ATTR: &str = "explain-cache";

impl Build {
    /// The build's root span ([`tracing::Span::none`] once its call ended).
    pub fn span(&self) -> tracing::Span {
        self.span
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .unwrap_or_else(tracing::Span::none)
    }

    /// Lets the root span end (the build is kept a while after its call).
    pub fn end_span(&self) {
        if let Ok(mut s) = self.span.lock() {
            s.take();
        }
    }

    /// A build of `req`, starting now.
    pub fn new(req: &BuildRequest, no_cache: bool) -> Build {
        Self::with_client_frontend(req, no_cache).0
    }

    /// A build of `req`, and when its frontend runs in the client, where the
    /// result of LLBBridge `Return` arrives.
    pub(crate) fn with_client_frontend(
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
            span: Mutex::new(Some(tracing::Span::current())),
            eager_layers: req
                .exporters
                .iter()
                .find(|e| matches!(e.r#type.as_str(), "image" | "oci" | "docker"))
                .and_then(|e| {
                    let attrs = exporter_attrs(&e.attrs, &req.frontend_attrs, 0);
                    kiln_oci::LayerOptions::from_export_attrs(&attrs).ok()
                }),
            remote: if req.cache_exports.is_empty() && req.cache_imports.is_empty() {
                tokio::sync::SetOnce::new_with(Some(None))
            } else {
                tokio::sync::SetOnce::new()
            },
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

    pub(crate) fn build_ref(&self, id: &str) -> Result<Arc<BuildRef>, Error> {
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
    pub(crate) fn take_containers(&self) -> Vec<Container> {
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

/// Containers one build's frontend may hold at once.
const MAX_CONTAINERS: usize = 64;

/// Exporter attr carrying the build's time (unix seconds) for image configs
/// without SOURCE_DATE_EPOCH.
pub const BUILD_TIME_ATTR: &str = "kiln.build-time";

/// An exporter's attrs plus what the build's frontend attrs imply for it:
/// `build-arg:SOURCE_DATE_EPOCH` becomes `source-date-epoch`, as in BuildKit.
pub(crate) fn exporter_attrs(
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
