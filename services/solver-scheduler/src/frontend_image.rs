//! Frontend images (`gateway.v0`): a frontend shipped as a container image.
//! The image is pulled and its entrypoint run on a worker as an interactive
//! process, without network, with BuildKit's environment contract
//! (`BUILDKIT_FRONTEND_OPT_<n>=key=value`, `BUILDKIT_SESSION_ID`,
//! `BUILDKIT_WORKERS`, `BUILDKIT_EXPORTEDPRODUCT`); its stdin and stdout carry
//! an HTTP/2 connection on which the solver serves LLBBridge for the build. The
//! frontend hands its result over with `Return` and exits.

use crate::build::{Build, FrontendResult};
use crate::peer::{ExecEvent, ExecInput, ExecSpec, Exporter, Frontend, Worker};
use crate::solver::Solver;
use crate::{Error, progress};
use bytes::Bytes;
use kiln_proto::moby::buildkit::v1 as ctl;
use kiln_proto::pb;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The frontend that runs frontend images.
pub const GATEWAY_FRONTEND: &str = "gateway.v0";
/// Frontend option naming the image.
const SOURCE_OPT: &str = "source";
/// Image label listing the frontend capabilities it has (comma-separated).
const CAPS_LABEL: &str = "moby.buildkit.frontend.caps";
/// Frontend option listing the capabilities a request needs of the frontend.
const CAPS_OPT: &str = "frontend.caps";
const INPUTS_CAP: &str = "moby.buildkit.frontend.inputs";
/// How long a frontend may run on after returning its result.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The parts of an image config a frontend image runs by.
#[derive(Debug, Default, serde::Deserialize)]
struct ImageConfig {
    #[serde(default)]
    config: RunConfig,
}

#[derive(Debug, Default, serde::Deserialize)]
struct RunConfig {
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
}

fn image_error(image: &str, message: impl Into<String>) -> Error {
    Error::FrontendImage {
        image: image.to_string(),
        message: message.into(),
    }
}

/// Runs the frontend image `attrs["source"]` for a build and returns what it
/// returned.
pub async fn solve<W: Worker, F: Frontend, E: Exporter>(
    solver: &Arc<Solver<W, F, E>>,
    build: &Arc<Build>,
    attrs: &BTreeMap<String, String>,
    inputs: BTreeMap<String, pb::Definition>,
) -> Result<FrontendResult, Error> {
    let source = attrs
        .get(SOURCE_OPT)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| image_error("", "gateway.v0 needs --opt source=IMAGE"))?;
    let resolved = solver.resolve_image(build, source, None).await?;
    let config: ImageConfig = serde_json::from_slice(&resolved.config)
        .map_err(|e| image_error(source, format!("image config: {e}")))?;
    let run = config.config;
    check_caps(source, &run, attrs, !inputs.is_empty())?;
    // the image's filesystem, pinned to the digest just resolved
    let pinned = match resolved.reference.split_once('@') {
        Some(_) => resolved.reference.clone(),
        None if !resolved.digest.is_empty() => {
            format!("{}@{}", resolved.reference, resolved.digest)
        }
        None => resolved.reference.clone(),
    };
    let rootfs = solver
        .solve_ref(
            build,
            &build.add_ref(kiln_llb::source_definition(
                &format!("docker-image://{pinned}"),
                BTreeMap::new(),
            )),
        )
        .await?;
    let mut env = run.env.unwrap_or_default();
    for (i, (k, v)) in attrs.iter().enumerate() {
        env.push(format!("BUILDKIT_FRONTEND_OPT_{i}={k}={v}"));
    }
    env.push(format!("BUILDKIT_SESSION_ID={}", build.session_id));
    env.push(format!("BUILDKIT_WORKERS={}", solver.workers_json()));
    env.push("BUILDKIT_EXPORTEDPRODUCT=kiln".to_string());
    let op = pb::ExecOp {
        meta: Some(pb::Meta {
            args: run
                .entrypoint
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| vec!["/run".to_string()]),
            env,
            cwd: run
                .working_dir
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "/".to_string()),
            remove_mount_stubs_recursive: true,
            ..Default::default()
        }),
        mounts: vec![pb::Mount {
            input: 0,
            dest: "/".into(),
            output: -1,
            ..Default::default()
        }],
        // a frontend reaches the world only through LLBBridge
        network: pb::NetMode::None as i32,
        ..Default::default()
    };
    let spec = ExecSpec {
        op,
        inputs: vec![rootfs],
        session_id: build.session_id.clone(),
        entitlements: Vec::new(),
        stdin: true,
        container: None,
        tty: false,
    };
    run_frontend_process(solver, build, source, spec, inputs).await
}

/// A frontend's needs (`frontend.caps`, inputs) must be among the capabilities
/// its image declares.
fn check_caps(
    image: &str,
    run: &RunConfig,
    attrs: &BTreeMap<String, String>,
    with_inputs: bool,
) -> Result<(), Error> {
    let has: Vec<&str> = run
        .labels
        .as_ref()
        .and_then(|l| l.get(CAPS_LABEL))
        .map(|c| c.split(',').map(str::trim).collect())
        .unwrap_or_default();
    let mut needs: Vec<&str> = attrs
        .get(CAPS_OPT)
        .map(|c| {
            c.split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if with_inputs {
        needs.push(INPUTS_CAP);
    }
    match needs.iter().find(|n| !has.contains(n)) {
        Some(missing) => Err(image_error(
            image,
            format!("the frontend does not support {missing} (its {CAPS_LABEL} label)"),
        )),
        None => Ok(()),
    }
}

/// Runs the frontend's process with LLBBridge served on its stdio, its stderr
/// shown as the log of a step, and returns what it returned.
async fn run_frontend_process<W: Worker, F: Frontend, E: Exporter>(
    solver: &Arc<Solver<W, F, E>>,
    build: &Arc<Build>,
    image: &str,
    spec: ExecSpec,
    inputs: BTreeMap<String, pb::Definition>,
) -> Result<FrontendResult, Error> {
    let vertex = format!(
        "sha256:{}",
        kiln_llb::digest(format!("frontend:{}:{image}", build.id).as_bytes())
            .trim_start_matches("sha256:")
    );
    let mut pv = ctl::Vertex {
        digest: vertex.clone(),
        name: format!("[internal] frontend {image}"),
        started: Some(progress::now()),
        ..Default::default()
    };
    build.progress.vertex(pv.clone());

    let (in_tx, in_rx) = mpsc::channel::<ExecInput>(16);
    let (ev_tx, mut ev_rx) = mpsc::channel::<ExecEvent>(64);
    // the process's stdout is the connection's incoming bytes; what the server
    // writes goes to its stdin
    let (stdout_tx, stdout_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let (to_stdin_tx, mut to_stdin_rx) = mpsc::channel::<Bytes>(64);
    let conn = kiln_session::hijack::join(
        tokio_stream::wrappers::ReceiverStream::new(stdout_rx),
        to_stdin_tx,
    );
    let feed = tokio::spawn(async move {
        while let Some(b) = to_stdin_rx.recv().await {
            if in_tx.send(ExecInput::Stdin(b)).await.is_err() {
                return;
            }
        }
        let _ = in_tx.send(ExecInput::Eof).await;
    });
    let logs = build.clone();
    let log_vertex = vertex.clone();
    let route = tokio::spawn(async move {
        while let Some(ev) = ev_rx.recv().await {
            match ev {
                ExecEvent::Output { fd: 1, data } => {
                    let _ = stdout_tx.send(Ok(data)).await;
                }
                ExecEvent::Output { data, .. } => {
                    logs.progress.log(&log_vertex, 2, data.to_vec());
                }
                ExecEvent::Started => {}
            }
        }
    });
    let call = crate::grpc::server::FrontendCall::new(build.clone(), inputs);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = crate::grpc::server::serve_frontend_bridge(
        solver.clone(),
        call.clone(),
        conn,
        async move {
            let _ = done_rx.await;
        },
    );
    let worker = solver.worker.clone();
    let waiter = call.clone();
    let run = async move {
        let exec = worker.exec(spec, in_rx, ev_tx);
        // a frontend that has returned gets a moment to exit, then is killed
        let lingering = async {
            waiter.returned.notified().await;
            tokio::time::sleep(EXIT_GRACE).await;
        };
        let code = tokio::select! {
            code = exec => code,
            () = lingering => Err(image_error(
                image,
                format!("still running {} s after returning its result: killed", EXIT_GRACE.as_secs()),
            )),
        };
        tracing::debug!(?code, "frontend image process ended");
        let _ = done_tx.send(());
        code
    };
    let (code, served) = tokio::join!(run, serve);
    tracing::debug!(?served, "frontend image bridge closed");
    feed.abort();
    let _ = route.await;
    let returned = call.take_result();
    let result = match (code, returned) {
        // what it returned counts, whatever its exit
        (_, Some(r)) => r,
        (Err(e), None) => Err(e),
        (Ok(code), None) => Err(image_error(
            image,
            match served {
                Err(e) => format!("exited with code {code} without returning a result ({e})"),
                Ok(()) => format!("exited with code {code} without returning a result"),
            },
        )),
    };
    pv.completed = Some(progress::now());
    if let Err(e) = &result {
        pv.error = kiln_proto::status::chain(e);
    }
    build.progress.vertex(pv);
    result
}
