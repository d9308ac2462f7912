//! `--debugaddr` (`[debug] address`, buildkitd.toml's `[grpc] debugAddress`):
//! what the people who run kiln look at, on a plain-TCP listener apart from
//! the build API.
//!
//! - `/metrics`: Prometheus text (`kiln_metrics`), with the gauges of state
//!   read just before: workers, sessions, running builds, cache size;
//! - `/healthz` (ready: 503 once kilnd drains) and `/livez` (alive);
//! - `grpc.health.v1.Health/Check` on the same port (h2c), as Kubernetes'
//!   `grpc:` probes ask it: service `""` or `readiness` is NOT_SERVING once
//!   kilnd drains, `liveness` SERVING while the process answers;
//! - on a solver-scheduler, the farm dashboard (`dashboard.rs`): `/` and
//!   `/build/REF`, and their JSON under `/api/`.

use crate::dashboard;
use crate::serve::{Shutdown, Solver};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kiln_proto::health::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus, health_server,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the debug listener reads.
pub struct Debug {
    /// the role kilnd runs (`all-in-one` without `--role`)
    pub role: &'static str,
    /// the solver, on a daemon that runs one (the dashboard's data)
    pub solver: Option<Arc<Solver>>,
    /// set once kilnd is told to stop: it drains, and is no longer ready
    pub stopping: Shutdown,
    /// (when, cache bytes, records) of the last cache measurement
    cache: Mutex<Option<(Instant, f64, f64)>>,
}

/// How long a cache-size measurement stands (it walks the cache).
const CACHE_MEASURE_EVERY: Duration = Duration::from_secs(15);

impl Debug {
    pub fn new(role: &'static str, solver: Option<Arc<Solver>>, stopping: Shutdown) -> Arc<Debug> {
        Arc::new(Debug {
            role,
            solver,
            stopping,
            cache: Mutex::new(None),
        })
    }

    fn ready(&self) -> bool {
        !*self.stopping.0.borrow()
    }

    /// Sets the gauges that describe state owned elsewhere.
    async fn refresh_gauges(&self) {
        let Some(s) = &self.solver else {
            return;
        };
        let workers = s.worker_infos();
        kiln_metrics::WORKER_RUNNING.replace(
            workers
                .iter()
                .map(|w| (vec![w.id.as_str()], f64::from(w.running))),
        );
        kiln_metrics::WORKER_CAPACITY.replace(
            workers
                .iter()
                .map(|w| (vec![w.id.as_str()], f64::from(w.capacity))),
        );
        kiln_metrics::WORKER_FREE_DISK.replace(
            workers
                .iter()
                .filter(|w| w.free_disk > 0)
                .map(|w| (vec![w.id.as_str()], w.free_disk as f64)),
        );
        let mut states: std::collections::BTreeMap<&str, f64> = std::collections::BTreeMap::new();
        for w in &workers {
            *states.entry(w.state.as_str()).or_default() += 1.0;
        }
        kiln_metrics::WORKERS.replace(states.into_iter().map(|(k, v)| (vec![k], v)));
        kiln_metrics::SESSIONS.set(&[], s.sessions.len() as f64);
        kiln_metrics::BUILDS_RUNNING.set(&[], s.active_builds().len() as f64);
        let fresh = self
            .cache
            .lock()
            .ok()
            .and_then(|c| *c)
            .filter(|(at, _, _)| at.elapsed() < CACHE_MEASURE_EVERY);
        let (bytes, records) = match fresh {
            Some((_, b, r)) => (b, r),
            None => {
                let Ok(Ok(items)) = tokio::time::timeout(Duration::from_secs(5), s.usage()).await
                else {
                    return;
                };
                let bytes: i64 = items.iter().map(|i| i.size.max(0)).sum();
                let records = items
                    .iter()
                    .filter(|i| matches!(i.target, solver_scheduler::usage::Target::Record(_)))
                    .count();
                let m = (bytes as f64, records as f64);
                if let Ok(mut c) = self.cache.lock() {
                    *c = Some((Instant::now(), m.0, m.1));
                }
                m
            }
        };
        kiln_metrics::CACHE_SIZE.set(&[], bytes);
        kiln_metrics::CACHE_RECORDS.set(&[], records);
    }
}

/// Serves the debug listener on `addr` (`host:port` or `tcp://host:port`)
/// until the process ends: probes must keep answering while kilnd drains.
pub async fn listen(addr: &str, debug: Arc<Debug>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context;
    let hostport = addr.strip_prefix("tcp://").unwrap_or(addr).to_string();
    let listener = tokio::net::TcpListener::bind(&hostport)
        .await
        .with_context(|| format!("debug address: listen on {hostport}"))?;
    let local = listener.local_addr().ok();
    tracing::info!(
        "debug address {} (metrics, health, dashboard)",
        local.map(|a| a.to_string()).unwrap_or(hostport)
    );
    let http = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/", get(dashboard_page))
        .route("/build/{id}", get(build_page))
        .route("/api/farm", get(farm_json))
        .route("/api/builds/{id}", get(build_json))
        .with_state(debug.clone());
    let mut routes = tonic::service::Routes::from(http);
    routes = routes.add_service(health_server::HealthServer::new(Health(debug)));
    let server = tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(routes);
    Ok(tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(e) = server.serve_with_incoming(incoming).await {
            tracing::warn!(error = %e, "debug listener");
        }
    }))
}

async fn metrics(State(d): State<Arc<Debug>>) -> Response {
    d.refresh_gauges().await;
    (
        [(header::CONTENT_TYPE, kiln_metrics::CONTENT_TYPE)],
        kiln_metrics::render(),
    )
        .into_response()
}

async fn healthz(State(d): State<Arc<Debug>>) -> Response {
    if d.ready() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    }
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

fn json(v: serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

async fn dashboard_page(State(d): State<Arc<Debug>>) -> Response {
    match &d.solver {
        Some(s) => html(
            StatusCode::OK,
            dashboard::farm_page(&dashboard::farm(d.role, s).await),
        ),
        None => html(StatusCode::OK, dashboard::role_page(d.role)),
    }
}

async fn build_page(State(d): State<Arc<Debug>>, Path(id): Path<String>) -> Response {
    let Some(s) = &d.solver else {
        return html(StatusCode::NOT_FOUND, dashboard::role_page(d.role));
    };
    match dashboard::build(s, &id).await {
        Some(b) => {
            let workers = s.worker_infos();
            let lone = match workers.as_slice() {
                [w] => Some(w.id.as_str()),
                _ => None,
            };
            html(StatusCode::OK, dashboard::build_page(&b, lone))
        }
        None => html(StatusCode::NOT_FOUND, dashboard::not_found(&id)),
    }
}

async fn farm_json(State(d): State<Arc<Debug>>) -> Response {
    match &d.solver {
        Some(s) => json(dashboard::farm(d.role, s).await.to_json()),
        None => json(serde_json::json!({ "role": d.role })),
    }
}

async fn build_json(State(d): State<Arc<Debug>>, Path(id): Path<String>) -> Response {
    let found = match &d.solver {
        Some(s) => dashboard::build(s, &id).await,
        None => None,
    };
    match found {
        Some(b) => json(b.to_json()),
        None => (StatusCode::NOT_FOUND, "no such build\n").into_response(),
    }
}

/// gRPC health as probes ask it.
struct Health(Arc<Debug>);

#[tonic::async_trait]
impl health_server::Health for Health {
    async fn check(
        &self,
        req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let status = match req.into_inner().service.as_str() {
            "liveness" => ServingStatus::Serving,
            "" | "readiness" if self.0.ready() => ServingStatus::Serving,
            "" | "readiness" => ServingStatus::NotServing,
            other => {
                return Err(tonic::Status::not_found(format!(
                    "unknown service {other:?}"
                )));
            }
        };
        Ok(tonic::Response::new(HealthCheckResponse {
            status: status as i32,
        }))
    }
}
