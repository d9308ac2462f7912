//! LLBBridge `ExecProcess`: processes in the containers a frontend made
//! (`NewContainer`), as `buildx build --invoke` and `buildx debug` run them.
//! One call carries any number of processes, told apart by `ProcessID`; each
//! runs on the worker (`Worker.Exec` in the worker's container, so processes
//! of one container see each other's writes), with stdin
//! from `File{fd: 0}` messages and its output sent back as `File{fd: 1|2}`,
//! then `File{EOF}` per output, `Exit{code}` and `Done`, in BuildKit's order.
//! With `Tty` the process gets a pseudo-terminal (stdout and stderr arrive as
//! one stream on fd 1) that `Resize` resizes.

use crate::Error;
use crate::build::Build;
use crate::peer::{ExecEvent, ExecInput, ExecSpec, Exporter, Frontend, Worker};
use crate::solver::Solver;
use kiln_proto::moby::buildkit::v1::frontend::{self as fe, exec_message::Input as Msg};
use kiln_proto::pb;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

/// Processes one ExecProcess call may run at once.
const MAX_PROCESSES: usize = 32;

type Out = mpsc::Sender<Result<fe::ExecMessage, Status>>;

fn msg(pid: &str, m: Msg) -> Result<fe::ExecMessage, Status> {
    Ok(fe::ExecMessage {
        process_id: pid.to_string(),
        input: Some(m),
    })
}

/// Serves one ExecProcess call until the client ends it; the processes it
/// started are killed when it ends.
pub async fn serve_processes<W: Worker, F: Frontend, E: Exporter>(
    solver: Arc<Solver<W, F, E>>,
    build: Arc<Build>,
    mut inbound: Streaming<fe::ExecMessage>,
    out: Out,
) {
    let mut stdins: HashMap<String, mpsc::Sender<ExecInput>> = HashMap::new();
    let mut running = tokio::task::JoinSet::new();
    while let Ok(Some(m)) = inbound.message().await {
        let pid = m.process_id;
        if pid.is_empty() {
            let _ = out
                .send(Err(Status::invalid_argument("ProcessID required")))
                .await;
            return;
        }
        let input = match m.input {
            Some(Msg::Init(init)) => {
                if stdins.contains_key(&pid) || stdins.len() >= MAX_PROCESSES {
                    let _ = out
                        .send(Err(Status::already_exists(format!(
                            "process {pid:?} already exists, or too many processes"
                        ))))
                        .await;
                    return;
                }
                let spec = match process_spec(&build, &init) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = out.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let (in_tx, in_rx) = mpsc::channel(16);
                stdins.insert(pid.clone(), in_tx);
                running.spawn(run_process(solver.clone(), pid, spec, in_rx, out.clone()));
                continue;
            }
            Some(Msg::File(f)) if f.fd == 0 => {
                if f.eof {
                    ExecInput::Eof
                } else {
                    ExecInput::Stdin(bytes::Bytes::from(f.data))
                }
            }
            Some(Msg::Signal(s)) => ExecInput::Signal(s.name),
            Some(Msg::Resize(r)) => ExecInput::Resize(r.rows, r.cols),
            _ => continue,
        };
        match stdins.get(&pid) {
            Some(tx) => {
                let _ = tx.send(input).await;
            }
            None => {
                let _ = out
                    .send(Err(Status::not_found(format!(
                        "IO for process {pid:?} not found"
                    ))))
                    .await;
                return;
            }
        }
    }
    // the client closed its side: let the processes finish
    stdins.clear();
    while running.join_next().await.is_some() {}
}

/// The worker's view of a process in a container.
fn process_spec(build: &Build, init: &fe::InitMessage) -> Result<ExecSpec, Error> {
    let c = build.container(&init.container_id)?;
    let mut meta = init.meta.clone().unwrap_or_default();
    if meta.hostname.is_empty() {
        meta.hostname = c.hostname.clone();
    }
    meta.extra_hosts.extend(c.extra_hosts.iter().cloned());
    Ok(ExecSpec {
        op: pb::ExecOp {
            meta: Some(meta),
            security: init.security,
            secretenv: init.secretenv.clone(),
            ..Default::default()
        },
        inputs: Vec::new(),
        session_id: build.session_id.clone(),
        entitlements: build.entitlements.clone(),
        stdin: init.fds.contains(&0),
        container: Some(c.worker_id),
        tty: init.tty,
    })
}

/// Runs one process and reports it: Started, its output, an EOF per output
/// stream, Exit and Done.
async fn run_process<W: Worker, F: Frontend, E: Exporter>(
    solver: Arc<Solver<W, F, E>>,
    pid: String,
    spec: ExecSpec,
    input: mpsc::Receiver<ExecInput>,
    out: Out,
) {
    let (ev_tx, mut ev_rx) = mpsc::channel(64);
    let events_out = out.clone();
    let events_pid = pid.clone();
    let forward = tokio::spawn(async move {
        while let Some(ev) = ev_rx.recv().await {
            let m = match ev {
                ExecEvent::Started => Msg::Started(fe::StartedMessage {}),
                ExecEvent::Output { fd, data } => Msg::File(fe::FdMessage {
                    fd,
                    eof: false,
                    data: data.to_vec(),
                }),
            };
            if events_out.send(msg(&events_pid, m)).await.is_err() {
                return;
            }
        }
    });
    let r = solver.worker.exec(spec, input, ev_tx).await;
    let _ = forward.await;
    let exit = match r {
        Ok(code) => {
            for fd in [1, 2] {
                let _ = out
                    .send(msg(
                        &pid,
                        Msg::File(fe::FdMessage {
                            fd,
                            eof: true,
                            data: vec![],
                        }),
                    ))
                    .await;
            }
            fe::ExitMessage {
                code: code as u32,
                // BuildKit's clients read the error of any exit but 0
                error: (code != 0).then(|| kiln_proto::google::rpc::Status {
                    code: tonic::Code::Unknown as i32,
                    message: format!("exit code: {code}"),
                    details: vec![],
                }),
            }
        }
        Err(e) => fe::ExitMessage {
            // BuildKit's code for a process that could not run
            code: 255,
            error: Some(kiln_proto::google::rpc::Status {
                code: tonic::Code::Unknown as i32,
                message: kiln_proto::status::chain(&e),
                details: vec![],
            }),
        },
    };
    let _ = out.send(msg(&pid, Msg::Exit(exit))).await;
    let _ = out.send(msg(&pid, Msg::Done(fe::DoneMessage {}))).await;
}
