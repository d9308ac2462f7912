//! Traces: kilnd's `tracing` spans become OpenTelemetry spans (through
//! tracing-opentelemetry), exported over OTLP when the standard variables or
//! kilnd.toml's `[otel]` ask for it:
//!
//! - `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
//!   (or `[otel] endpoint`) turn export on; so does `OTEL_TRACES_EXPORTER=otlp`.
//!   `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true` turn it off.
//! - `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` (or `[otel] protocol`): `grpc`
//!   (the default) or `http/protobuf`.
//! - `OTEL_SERVICE_NAME` (or `[otel] service-name`, default `kilnd`); every
//!   span's resource also says `kiln.role`. Headers, timeouts, batching and
//!   resource attributes follow their `OTEL_*` variables.
//!
//! With none of that set no span is made for kiln's own instrumentation
//! (their target, [`TARGET`], is off) and nothing is exported.
//!
//! One trace per build: every gRPC server kilnd runs makes a span per call
//! ([`GrpcTraceLayer`]) whose parent is the caller's W3C `traceparent`
//! header, and every call between kiln's services carries the current span's
//! context (`kiln_session::dial::set_request_hook`). So `Control.Solve`'s
//! span is the build's root (a child of the client's span when the client
//! sent one), and the steps, worker runs, frontend and exports under it.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use serde::Deserialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The target of the spans made for traces only (request and step spans):
/// never logged, and made only while traces are exported.
pub const TARGET: &str = "kiln_trace";

/// `[otel]` in kilnd.toml; the `OTEL_*` variables win over it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OtelConfig {
    /// the collector, e.g. `http://127.0.0.1:4317`
    pub endpoint: Option<String>,
    /// `grpc` or `http/protobuf`
    pub protocol: Option<String>,
    pub service_name: Option<String>,
}

/// Whether traces are exported (spans are made, contexts carried).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// The exporter to flush when kilnd ends.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans not sent yet and stops the exporter.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // the batch's last export runs on this runtime: wait for it off its threads
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            eprintln!("kilnd: flush traces: {e}");
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether the environment (or `[otel]`) asks for traces.
fn wanted(file: &OtelConfig) -> bool {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return false;
    }
    match env("OTEL_TRACES_EXPORTER") {
        Some(v) if v.split(',').any(|e| e.trim() == "none") => return false,
        Some(v) if v.split(',').any(|e| e.trim() == "otlp") => return true,
        _ => {}
    }
    env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || file.endpoint.is_some()
}

/// Sets up logging to stderr (filtered by `log`) and, when asked for,
/// trace export; `role` names the service(s) this process runs.
pub fn init(log: &str, file: &OtelConfig, role: &str) -> Telemetry {
    let fmt_filter = filter(log, "off");
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(fmt_filter);
    let (provider, problem) = if wanted(file) {
        match provider(file, role) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("kilnd"))
            // where a span was made and on which thread say little here
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_filter(filter(log, "info"))
    });
    tracing_subscriber::registry().with(fmt).with(otel).init();
    if let Some(e) = problem {
        tracing::warn!("traces are not exported: {e:#}");
    }
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        ENABLED.store(true, Ordering::Relaxed);
        kiln_session::dial::set_request_hook(inject);
    }
    Telemetry { provider }
}

/// `log` (`--log`), with [`TARGET`] at `level`.
fn filter(log: &str, level: &str) -> tracing_subscriber::EnvFilter {
    let f = tracing_subscriber::EnvFilter::try_new(log).unwrap_or_else(|_| "info".into());
    match format!("{TARGET}={level}").parse() {
        Ok(d) => f.add_directive(d),
        Err(_) => f,
    }
}

fn provider(file: &OtelConfig, role: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig as _;
    let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .or_else(|| file.protocol.clone())
        .unwrap_or_else(|| "grpc".into());
    // the variables name the endpoint when set (the exporter reads them)
    let endpoint = match (
        env("OTEL_EXPORTER_OTLP_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")),
        &file.endpoint,
    ) {
        (None, Some(e)) => Some(e.clone()),
        _ => None,
    };
    let rt = tokio::runtime::Handle::current();
    let builder = SdkTracerProvider::builder();
    let builder = match protocol.trim() {
        "grpc" => {
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(e) = endpoint {
                b = b.with_endpoint(e);
            }
            builder.with_batch_exporter(OnRuntime::new(b.build()?, rt))
        }
        "http/protobuf" => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
            if let Some(e) = endpoint {
                // as the variable: the base, to which the signal's path is added
                b = b.with_endpoint(format!("{}/v1/traces", e.trim_end_matches('/')));
            }
            builder.with_batch_exporter(OnRuntime::new(b.build()?, rt))
        }
        other => anyhow::bail!("OTLP protocol {other:?}: kilnd speaks grpc and http/protobuf"),
    };
    let mut resource = opentelemetry_sdk::Resource::builder()
        .with_attribute(opentelemetry::KeyValue::new("kiln.role", role.to_string()));
    if env("OTEL_SERVICE_NAME").is_none() {
        resource =
            resource.with_service_name(file.service_name.clone().unwrap_or_else(|| "kilnd".into()));
    }
    Ok(builder.with_resource(resource.build()).build())
}

/// An exporter whose exports run on kilnd's runtime: the SDK's batch
/// processor calls it from a thread of its own, and both the tonic channel
/// and the HTTP client need the runtime's reactor.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: Arc<E>,
    rt: tokio::runtime::Handle,
}

impl<E> OnRuntime<E> {
    fn new(inner: E, rt: tokio::runtime::Handle) -> Self {
        OnRuntime {
            inner: Arc::new(inner),
            rt,
        }
    }
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = self.inner.clone();
        match self
            .rt
            .spawn(async move { inner.export(batch).await })
            .await
        {
            Ok(r) => r,
            Err(e) => Err(OTelSdkError::InternalFailure(format!("export task: {e}"))),
        }
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        // called once, before the first export: nothing else holds the exporter yet
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Puts the current span's context on an outgoing request
/// (`traceparent`, `tracestate`).
fn inject(headers: &mut http::HeaderMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// The span of one incoming call, a child of the caller's context.
fn request_span<B>(req: &http::Request<B>) -> tracing::Span {
    let path = req.uri().path().trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        target: TARGET,
        "grpc",
        otel.name = %path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_message = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
    {
        use opentelemetry::trace::TraceContextExt as _;
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    span
}

/// A span per call on a tonic server, the caller's context its parent, open
/// until the response's last frame: `Server::builder().layer(GrpcTraceLayer)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTraceLayer;

impl<S> tower::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;

    fn layer(&self, inner: S) -> GrpcTrace<S> {
        GrpcTrace(inner)
    }
}

#[derive(Debug, Clone)]
pub struct GrpcTrace<S>(S);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for GrpcTrace<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Traced<R>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let span = if ENABLED.load(Ordering::Relaxed) {
            request_span(&req)
        } else {
            tracing::Span::none()
        };
        let fut = {
            let _entered = span.enter();
            self.0.call(req)
        };
        let held = span.clone();
        Box::pin(
            async move {
                let resp = fut.await?;
                // a trailers-only answer (most failures) has its status here
                record_status(&held, resp.headers());
                Ok(resp.map(|body| Traced { body, span: held }))
            }
            .instrument(span),
        )
    }
}

/// A call's gRPC status (from its headers or trailers) on its span.
fn record_status(span: &tracing::Span, headers: &http::HeaderMap) {
    let Some(code) = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    span.record("rpc.grpc.status_code", code);
    if code != 0 {
        span.record("otel.status_code", "ERROR");
        if let Some(m) = headers.get("grpc-message") {
            span.record(
                "otel.status_message",
                percent_decoded(m.as_bytes()).as_str(),
            );
        }
    }
}

/// `grpc-message` as sent: percent-encoded UTF-8.
fn percent_decoded(b: &[u8]) -> String {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response body holding its call's span open until it is dropped, and
/// putting the status its trailers carry on it.
pub struct Traced<B> {
    body: B,
    span: tracing::Span,
}

impl<B: http_body::Body + Unpin> http_body::Body for Traced<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &frame
            && let Some(trailers) = f.trailers_ref()
        {
            record_status(&self.span, trailers);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(
            percent_decoded(b"read%20a.txt:%20no%20such%20file%"),
            "read a.txt: no such file%"
        );
        assert_eq!(percent_decoded("caf%C3%A9".as_bytes()), "café");
    }

    #[test]
    fn context_goes_out_and_comes_back_in_headers() {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        };
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap_or(TraceId::INVALID),
            SpanId::from_hex("00f067aa0ba902b7").unwrap_or(SpanId::INVALID),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc);
        let mut headers = http::HeaderMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut headers));
        assert_eq!(
            headers.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        let back = TraceContextPropagator::new().extract(&HeaderExtractor(&headers));
        assert_eq!(
            back.span().span_context().span_id(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap_or(SpanId::INVALID)
        );
    }
}
