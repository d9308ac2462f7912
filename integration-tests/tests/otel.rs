//! Traces: kilnd's roles export OTLP to a receiver in this test, and a build
//! is one trace across all four services, under the client's span.

use kiln_integration_tests::{Backend, BuildContext, Daemon, Topology, bin_dir, dockerfile_args};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One span as received, with its resource's `service.name` and `kiln.role`.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    role: String,
    span: Span,
}

type Spans = Arc<Mutex<Vec<Got>>>;

fn value(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| value(&kv.value))
}

fn keep(spans: &Spans, req: ExportTraceServiceRequest) {
    let mut all = match spans.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    for rs in req.resource_spans {
        let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
        let service = attr(&attrs, "service.name").unwrap_or_default();
        let role = attr(&attrs, "kiln.role").unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                all.push(Got {
                    service: service.clone(),
                    role: role.clone(),
                    span,
                });
            }
        }
    }
}

struct Receiver(Spans);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP/gRPC receiver on loopback: its endpoint and what it received.
fn grpc_receiver(rt: &tokio::runtime::Runtime) -> (String, Spans) {
    let spans = Spans::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the receiver");
    let addr = listener.local_addr().expect("receiver address");
    let svc = TraceServiceServer::new(Receiver(spans.clone()));
    rt.spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (format!("http://{addr}"), spans)
}

/// An OTLP/HTTP receiver on loopback (`POST /v1/traces`, protobuf bodies,
/// HTTP/1.1): its base endpoint and what it received.
fn http_receiver(rt: &tokio::runtime::Runtime) -> (String, Spans) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let spans = Spans::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the receiver");
    let addr = listener.local_addr().expect("receiver address");
    let kept = spans.clone();
    rt.spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // one request: headers, then Content-Length bytes of body
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 8192];
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.trim()
                                .eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 8192];
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
                    let ok = head.starts_with("POST /v1/traces ")
                        && head.to_ascii_lowercase().contains("application/x-protobuf");
                    let status = match ExportTraceServiceRequest::decode(body.as_slice()) {
                        Ok(req) if ok => {
                            keep(&kept, req);
                            "200 OK"
                        }
                        _ => "400 Bad Request",
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
                    );
                    if conn.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), spans)
}

fn snapshot(spans: &Spans) -> Vec<Got> {
    match spans.lock() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

/// Waits until `done` holds for the spans received (export is batched).
fn wait_for(spans: &Spans, what: &str, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
    let start = Instant::now();
    loop {
        let got = snapshot(spans);
        if done(&got) {
            return got;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let seen: BTreeSet<String> = got
                .iter()
                .map(|g| format!("{}/{}: {}", g.service, g.role, g.span.name))
                .collect();
            panic!("no {what} within 60 s; received: {seen:#?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

const DOCKERFILE: &str = "FROM busybox\nRUN echo traced > /traced.txt\n";

fn context() -> BuildContext {
    // a line of its own, so the RUN step runs (not cached) in this test
    let c = BuildContext::new(&format!(
        "{DOCKERFILE}RUN echo {} > /nonce\n",
        uuid::Uuid::new_v4()
    ))
    .expect("context");
    c.file("a.txt", "a\n").expect("write");
    c
}

fn otel_env(endpoint: &str, protocol: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_string()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_string()),
        // export soon after the spans end
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_string()),
    ]
}

fn start(topology: Topology, env: &[(&'static str, String)]) -> Daemon {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Daemon::start_with_env(topology, &Backend::Runc, "", &env).expect("start kilnd")
}

/// `kiln build` of `ctx` with `TRACEPARENT` set.
fn build_traced(d: &Daemon, ctx: &BuildContext, traceparent: &str) {
    let mut args = vec!["--addr", d.addr.as_str(), "build", "--progress", "plain"];
    args.extend(dockerfile_args());
    // an export: the exporter reads the result from the worker
    args.extend(["--output", "type=tar,dest=out.tar"]);
    let out = Command::new(bin_dir().join("kiln"))
        .args(&args)
        .env("TRACEPARENT", traceparent)
        .current_dir(ctx.path())
        .output()
        .expect("run kiln");
    assert!(
        out.status.success(),
        "kiln build failed:\n{}\n--- daemon logs ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.logs()
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const ROLES: [&str; 4] = [
    "frontend-gateway",
    "solver-scheduler",
    "worker-executor",
    "registry-exporter",
];

#[test]
fn split_build_is_one_trace_under_the_clients_span() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (endpoint, spans) = grpc_receiver(&rt);
    let d = start(Topology::Split, &otel_env(&endpoint, "grpc"));
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let client_span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let ctx = context();
    build_traced(&d, &ctx, &format!("00-{trace_id}-{client_span}-01"));

    let in_trace = |g: &Got| hex(&g.span.trace_id) == trace_id;
    let got = wait_for(
        &spans,
        "spans of all four roles in the build's trace, each span's parent in it",
        |all| {
            let roles: BTreeSet<&str> = all
                .iter()
                .filter(|g| in_trace(g))
                .map(|g| g.role.as_str())
                .collect();
            // every span's parent arrived too (processes export on their own)
            let ids: BTreeSet<&[u8]> = all
                .iter()
                .filter(|g| in_trace(g))
                .map(|g| g.span.span_id.as_slice())
                .collect();
            let closed = all.iter().filter(|g| in_trace(g)).all(|g| {
                hex(&g.span.parent_span_id) == client_span
                    || ids.contains(g.span.parent_span_id.as_slice())
            });
            ROLES.iter().all(|r| roles.contains(r))
                && all
                    .iter()
                    .any(|g| in_trace(g) && g.span.name.contains("Control/Solve"))
                && all
                    .iter()
                    .any(|g| in_trace(g) && g.span.name.ends_with("Frontend/Solve"))
                && all
                    .iter()
                    .any(|g| in_trace(g) && g.span.name.ends_with("Exporter/Export"))
                && closed
        },
    );
    let trace: Vec<&Got> = got.iter().filter(|g| in_trace(g)).collect();
    for g in &trace {
        assert_eq!(g.service, "kilnd", "service.name of {:?}", g.span.name);
    }
    // the build's root span: Control.Solve, a child of the client's span
    let root = trace
        .iter()
        .find(|g| g.span.name.contains("moby.buildkit.v1.Control/Solve"))
        .expect("Control.Solve's span");
    assert_eq!(root.role, "solver-scheduler");
    assert_eq!(hex(&root.span.parent_span_id), client_span);
    // the frontend ran under the build's root (through the client's LLBBridge.Solve)
    let parent_of = |id: &[u8]| {
        trace
            .iter()
            .find(|g| g.span.span_id == id)
            .map(|g| g.span.parent_span_id.clone())
    };
    let frontend = trace
        .iter()
        .find(|g| g.role == "frontend-gateway" && g.span.name.ends_with("Frontend/Solve"))
        .expect("the frontend's span");
    let under = |g: &Got, top: &Got| {
        let mut at = g.span.parent_span_id.clone();
        while at != top.span.span_id {
            match parent_of(&at) {
                Some(p) => at = p,
                None => return false,
            }
        }
        true
    };
    assert!(
        under(frontend, root),
        "the frontend's span is not under the root"
    );
    // the export: under the root, and the worker's calls it made under it
    let export = trace
        .iter()
        .find(|g| g.role == "registry-exporter" && g.span.name.ends_with("Exporter/Export"))
        .expect("the exporter's span");
    assert!(
        under(export, root),
        "the export's span is not under the root"
    );
    assert!(
        trace
            .iter()
            .any(|g| g.role == "worker-executor" && under(g, export)),
        "no worker call under the export"
    );
    // one span per step: its vertex, whether it was cached, its worker
    let steps: Vec<&&Got> = trace
        .iter()
        .filter(|g| attr(&g.span.attributes, "kiln.vertex.digest").is_some())
        .collect();
    assert!(
        steps.iter().any(|g| {
            attr(&g.span.attributes, "kiln.vertex.name").is_some_and(|n| n.contains("traced"))
                && attr(&g.span.attributes, "kiln.cached").as_deref() == Some("false")
                && attr(&g.span.attributes, "kiln.worker").is_some_and(|w| !w.is_empty())
        }),
        "no span of the RUN step with kiln.cached=false and its worker: {steps:#?}"
    );
    // the worker ran the step in the trace, under a step span
    let step_ids: BTreeSet<Vec<u8>> = steps.iter().map(|g| g.span.span_id.clone()).collect();
    let runs: Vec<&&Got> = trace
        .iter()
        .filter(|g| g.role == "worker-executor" && g.span.name.ends_with("Worker/Run"))
        .collect();
    assert!(!runs.is_empty(), "no Worker.Run span in the trace");
    assert!(
        runs.iter()
            .any(|g| step_ids.contains(&g.span.parent_span_id)),
        "no Worker.Run span whose parent is a step: {runs:#?}"
    );

    // a second build of the same context: its steps are cached, and say so
    let trace2 = uuid::Uuid::new_v4().simple().to_string();
    build_traced(&d, &ctx, &format!("00-{trace2}-{client_span}-01"));
    wait_for(&spans, "a cached step span in the second trace", |all| {
        all.iter().any(|g| {
            hex(&g.span.trace_id) == trace2
                && attr(&g.span.attributes, "kiln.vertex.name")
                    .is_some_and(|n| n.contains("traced"))
                && attr(&g.span.attributes, "kiln.cached").as_deref() == Some("true")
        })
    });
}

#[test]
fn traces_export_over_http_protobuf() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (endpoint, spans) = http_receiver(&rt);
    let mut env = otel_env(&endpoint, "http/protobuf");
    env.push(("OTEL_SERVICE_NAME", "kilnd-http-test".to_string()));
    let d = start(Topology::AllInOne, &env);
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let ctx = context();
    build_traced(&d, &ctx, &format!("00-{trace_id}-00f067aa0ba902b7-01"));
    let got = wait_for(&spans, "the build's root span over HTTP", |all| {
        all.iter()
            .any(|g| hex(&g.span.trace_id) == trace_id && g.span.name.contains("Control/Solve"))
    });
    let root = got
        .iter()
        .find(|g| hex(&g.span.trace_id) == trace_id && g.span.name.contains("Control/Solve"))
        .expect("root span");
    assert_eq!(root.service, "kilnd-http-test");
    assert_eq!(root.role, "all-in-one");
    assert_eq!(hex(&root.span.parent_span_id), "00f067aa0ba902b7");
}

#[test]
fn nothing_is_exported_without_otel_settings() {
    // the variables unset (as kilnd inherits them here): a build works and
    // kilnd logs nothing about traces
    let d = Daemon::start(Topology::AllInOne).expect("start kilnd");
    let ctx = context();
    d.build(ctx.path(), &dockerfile_args()).expect("build");
    assert!(
        !d.logs().contains("traces"),
        "kilnd spoke of traces with no OTEL_* set:\n{}",
        d.logs()
    );
}
