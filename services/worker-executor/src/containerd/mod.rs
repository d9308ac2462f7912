//! The containerd executor: an exec step runs as a containerd task (container + task with
//! the `io.containerd.runc.v2` shim) instead of a direct `runc run`.
//!
//! The OCI runtime spec is the same one the runc executor writes (see [`crate::runc::spec`]);
//! its root is the overlay mount kiln prepared, so containerd is given no rootfs mounts.
//! stdout and stderr come back through two FIFOs created here and are streamed as
//! [`Event::Log`] lines, as with runc. Once the process has exited and its output is
//! drained the run returns and the task and container are deleted in the background; a
//! run that is abandoned (the future dropped on cancel) kills the task first.
//!
//! Every request carries the configured namespace in the `containerd-namespace` gRPC
//! metadata. Snapshots live in containerd's snapshotter too (see
//! [`crate::snapshot::containerd`]); the rootfs of a task is still the overlay kiln
//! mounts from the chain's snapshot dirs, so containers are created without a snapshot.

mod fifo;

use crate::Event;
use crate::error::{Error, Result};
use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteTaskRequest, KillRequest, ListContainersRequest, StartRequest, WaitRequest,
    containers_client::ContainersClient, tasks_client::TasksClient,
};
use containerd_client::tonic::transport::Channel;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// The runtime shim every task runs with.
pub const RUNTIME: &str = "io.containerd.runc.v2";
/// Type URL containerd registers for an OCI runtime spec carried as JSON in an `Any`.
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// `[worker.containerd]` of kilnd.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdConfig {
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// containerd namespace for kiln's containers (default "kiln").
    pub namespace: String,
    /// The snapshotter that holds the worker's snapshots (default "overlayfs"; kiln reads
    /// and writes the snapshot dirs itself, so it must be an overlay-style snapshotter
    /// whose mounts name an `upperdir`, or a bind mount for a snapshot without parent).
    pub snapshotter: String,
}

impl ContainerdConfig {
    /// A config for `address` with the default namespace and snapshotter.
    pub fn new(address: impl Into<PathBuf>) -> Self {
        ContainerdConfig {
            address: address.into(),
            namespace: "kiln".into(),
            snapshotter: "overlayfs".into(),
        }
    }
}

/// Label naming the worker that created a container or snapshot (its worker id).
pub(crate) const WORKER_LABEL: &str = "kiln.worker";

/// Runs exec steps as containerd tasks. Connects on first use, and then first removes
/// the containers an earlier run of this worker left behind.
#[derive(Debug)]
pub struct Containerd {
    config: ContainerdConfig,
    worker_id: String,
    channel: tokio::sync::OnceCell<Channel>,
}

fn cerr(op: &'static str, id: &str) -> impl FnOnce(tonic::Status) -> Error {
    let id = id.to_string();
    move |source| Error::Containerd { op, id, source }
}

/// Request with the namespace in its metadata.
pub(crate) fn req<T>(namespace: &str, t: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(t);
    if let Ok(v) = namespace.parse() {
        r.metadata_mut().insert("containerd-namespace", v);
    }
    r
}

impl Containerd {
    /// An executor for the worker `worker_id` (its containers carry that label).
    pub fn new(config: ContainerdConfig, worker_id: &str) -> Containerd {
        Containerd {
            config,
            worker_id: worker_id.to_string(),
            channel: tokio::sync::OnceCell::new(),
        }
    }

    pub fn config(&self) -> &ContainerdConfig {
        &self.config
    }

    async fn channel(&self) -> Result<Channel> {
        let address = self.config.address.clone();
        self.channel
            .get_or_try_init(|| async move {
                let ch = containerd_client::connect(&address)
                    .await
                    .map_err(|source| Error::ContainerdConnect { address, source })?;
                reap(&ch, &self.config.namespace, &self.worker_id).await;
                Ok(ch)
            })
            .await
            .cloned()
    }

    /// Runs `spec` as container `id`, streaming output as `Event::Log`; returns the exit
    /// code. `fifo_dir` (an existing private dir, e.g. the bundle) holds the stdio FIFOs.
    pub async fn run(
        &self,
        id: &str,
        spec: &oci_spec::runtime::Spec,
        fifo_dir: &Path,
        events: &mpsc::Sender<Event>,
    ) -> Result<i32> {
        let t0 = std::time::Instant::now();
        let ch = self.channel().await?;
        let ns = self.config.namespace.as_str();
        let spec_json = serde_json::to_vec(spec).map_err(|source| Error::SpecEncode { source })?;
        let (stdout, stderr) = (fifo_dir.join("stdout"), fifo_dir.join("stderr"));
        let out = fifo::Reader::spawn(&stdout, 1, events.clone())?;
        let err = fifo::Reader::spawn(&stderr, 2, events.clone())?;
        let mut guard = Cleanup {
            channel: ch.clone(),
            namespace: ns.to_string(),
            id: id.to_string(),
            container: false,
            task: false,
            exited: false,
            fifos: vec![stdout.clone(), stderr.clone()],
        };
        let mut containers = ContainersClient::new(ch.clone());
        let mut tasks = TasksClient::new(ch);
        let container = Container {
            id: id.to_string(),
            runtime: Some(Runtime {
                name: RUNTIME.into(),
                options: None,
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.into(),
                value: spec_json,
            }),
            snapshotter: self.config.snapshotter.clone(),
            labels: [(WORKER_LABEL.to_string(), self.worker_id.clone())].into(),
            ..Default::default()
        };
        containers
            .create(req(
                ns,
                CreateContainerRequest {
                    container: Some(container),
                },
            ))
            .await
            .map_err(cerr("create container", id))?;
        guard.container = true;
        let t_container = t0.elapsed();
        tasks
            .create(req(
                ns,
                CreateTaskRequest {
                    container_id: id.to_string(),
                    stdout: stdout.to_string_lossy().into_owned(),
                    stderr: stderr.to_string_lossy().into_owned(),
                    ..Default::default()
                },
            ))
            .await
            .map_err(cerr("create task", id))?;
        guard.task = true;
        let t_task = t0.elapsed();
        tasks
            .start(req(
                ns,
                StartRequest {
                    container_id: id.to_string(),
                    exec_id: String::new(),
                },
            ))
            .await
            .map_err(cerr("start task", id))?;
        let t_start = t0.elapsed();
        let status = tasks
            .wait(req(
                ns,
                WaitRequest {
                    container_id: id.to_string(),
                    exec_id: String::new(),
                },
            ))
            .await
            .map_err(cerr("wait task", id))?
            .into_inner()
            .exit_status;
        // the shim closes the FIFOs once it has copied everything the process wrote
        let t_wait = t0.elapsed();
        out.finish().await;
        err.finish().await;
        // the process is gone and its rootfs is kiln's own mount: the outputs can be
        // committed while the task and container are deleted in the background
        guard.exited = true;
        tracing::debug!(
            target: "kiln_timing",
            "containerd task {id}: container {} ms, task {} ms, start {} ms, exited {} ms, drained {} ms",
            t_container.as_millis(),
            t_task.as_millis(),
            t_start.as_millis(),
            t_wait.as_millis(),
            t0.elapsed().as_millis()
        );
        Ok(status as i32)
    }
}

/// Kills and deletes the containers labelled with `worker_id` in `ns` that an earlier
/// run left behind (a crashed or killed kilnd never ran their cleanup).
pub(crate) async fn reap(ch: &Channel, ns: &str, worker_id: &str) {
    let filter = format!("labels.\"{WORKER_LABEL}\"=={worker_id}");
    let listed = ContainersClient::new(ch.clone())
        .list(req(
            ns,
            ListContainersRequest {
                filters: vec![filter],
            },
        ))
        .await;
    let containers = match listed {
        Ok(r) => r.into_inner().containers,
        Err(e) => {
            tracing::warn!(error = %kiln_proto::status::Chain(&e), "list containerd containers");
            return;
        }
    };
    for c in containers {
        tracing::info!(
            id = c.id,
            "removing a containerd container left by an earlier run"
        );
        remove(ch.clone(), ns.to_string(), c.id, TaskState::Running, true).await;
    }
}

/// Deletes what a run created, in the background: after the process exited, or when the
/// run is abandoned or fails half way (then the task is killed first).
struct Cleanup {
    channel: Channel,
    namespace: String,
    id: String,
    container: bool,
    task: bool,
    /// The task's process has exited (no kill needed).
    exited: bool,
    fifos: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.exited {
            // a reader still blocked opening its FIFO (the shim never opened it) gets EOF
            for f in &self.fifos {
                fifo::unblock(f);
            }
        }
        if !self.container && !self.task {
            return;
        }
        let (ch, ns, id, container) = (
            self.channel.clone(),
            self.namespace.clone(),
            self.id.clone(),
            self.container,
        );
        let task = match (self.task, self.exited) {
            (false, _) => TaskState::None,
            (true, false) => TaskState::Running,
            (true, true) => TaskState::Exited,
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(id, "no runtime to clean up containerd task");
            return;
        };
        rt.spawn(remove(ch, ns, id, task, container));
    }
}

/// What is left of a container's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskState {
    None,
    Running,
    Exited,
}

/// Kills a running task, deletes the task and the container (when `container`).
async fn remove(ch: Channel, ns: String, id: String, task: TaskState, container: bool) {
    let mut tasks = TasksClient::new(ch.clone());
    if task == TaskState::Running {
        let killed = tasks
            .kill(req(
                &ns,
                KillRequest {
                    container_id: id.clone(),
                    exec_id: String::new(),
                    signal: libc::SIGKILL as u32,
                    all: true,
                },
            ))
            .await;
        if let Err(e) = killed {
            tracing::debug!(id, error = %kiln_proto::status::Chain(&e), "kill abandoned containerd task");
        }
        let wait = tasks.wait(req(
            &ns,
            WaitRequest {
                container_id: id.clone(),
                exec_id: String::new(),
            },
        ));
        let _ = tokio::time::timeout(Duration::from_secs(10), wait).await;
    }
    if task != TaskState::None
        && let Err(e) = tasks
            .delete(req(
                &ns,
                DeleteTaskRequest {
                    container_id: id.clone(),
                },
            ))
            .await
        && e.code() != tonic::Code::NotFound
    {
        tracing::warn!(id, error = %kiln_proto::status::Chain(&e), "delete containerd task");
    }
    if container
        && let Err(e) = ContainersClient::new(ch)
            .delete(req(&ns, DeleteContainerRequest { id: id.clone() }))
            .await
    {
        tracing::warn!(id, error = %kiln_proto::status::Chain(&e), "delete containerd container");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RunRequest, Worker, testutil};

    /// A worker on the containerd at `KILN_TEST_CONTAINERD`; `None` (skip) only when run
    /// by hand without `KILN_TEST_REGISTRY` either (under `make test` it must be there).
    fn worker() -> Option<(tempfile::TempDir, Worker, ContainerdConfig)> {
        let address = match std::env::var("KILN_TEST_CONTAINERD") {
            Ok(a) if !a.is_empty() => a,
            _ if std::env::var_os("KILN_TEST_REGISTRY").is_some() => {
                panic!("KILN_TEST_CONTAINERD is not set (scripts/test.sh starts containerd)")
            }
            _ => return None,
        };
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut cc = ContainerdConfig::new(address);
        cc.namespace = format!("kiln-unit-{}", uuid::Uuid::new_v4().simple());
        let mut cfg = crate::Config::new(tmp.path().join("root"));
        cfg.containerd = Some(cc.clone());
        let w = Worker::new(cfg).expect("worker");
        Some((tmp, w, cc))
    }

    fn exec(root: &str, script: &str) -> RunRequest {
        RunRequest {
            build_id: "b".into(),
            session_id: String::new(),
            session_shared_key: String::new(),
            name: "test".into(),
            op: crate::testutil::exec_op(script, "", Vec::new()),
            inputs: vec![Some(root.to_string())],
            entitlements: Vec::new(),
        }
    }

    async fn containers(cc: &ContainerdConfig) -> Vec<String> {
        let ch = containerd_client::connect(&cc.address)
            .await
            .expect("connect");
        ContainersClient::new(ch)
            .list(req(&cc.namespace, ListContainersRequest::default()))
            .await
            .expect("list")
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect()
    }

    #[tokio::test]
    async fn a_step_runs_as_a_task_with_its_output_and_exit_code() {
        let Some((_tmp, w, cc)) = worker() else {
            return;
        };
        let root = testutil::busybox(&w);
        let (tx, mut rx) = mpsc::channel(64);
        let outs = w
            .run(exec(&root, "echo out; echo err >&2; echo x > /f"), tx)
            .await
            .expect("run");
        let diff = w.store().diff_dir(outs[0].as_deref().expect("output"));
        assert_eq!(std::fs::read_to_string(diff.join("f")).expect("f"), "x\n");
        let mut logs = [String::new(), String::new()];
        while let Ok(Event::Log { stream, data }) = rx.try_recv() {
            logs[stream as usize - 1].push_str(&String::from_utf8_lossy(&data));
        }
        assert_eq!(logs[0], "out\n");
        assert_eq!(logs[1], "err\n");
        let (tx, _rx) = mpsc::channel(64);
        let err = w.run(exec(&root, "exit 7"), tx).await.expect_err("exit 7");
        assert!(err.to_string().ends_with("exit code: 7"), "{err}");
        let start = std::time::Instant::now();
        while !containers(&cc).await.is_empty() {
            assert!(start.elapsed() < Duration::from_secs(20), "containers left");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_cancelled_step_leaves_no_container() {
        let Some((_tmp, w, cc)) = worker() else {
            return;
        };
        let root = testutil::busybox(&w);
        let (tx, mut rx) = mpsc::channel(64);
        let mut run = Box::pin(w.run(exec(&root, "echo started; sleep 60"), tx));
        tokio::select! {
            r = &mut run => panic!("the step ended: {r:?}"),
            e = rx.recv() => assert!(matches!(e, Some(Event::Log { .. }))),
        }
        assert_eq!(containers(&cc).await.len(), 1, "running as a container");
        drop(run);
        let start = std::time::Instant::now();
        while !containers(&cc).await.is_empty() {
            assert!(start.elapsed() < Duration::from_secs(20), "container left");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
