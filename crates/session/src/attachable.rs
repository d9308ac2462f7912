//! What a client exposes on its session: its local dirs (FileSync), a place
//! for exports (FileSend), build secrets (Secrets) and a health check. Used by
//! `kiln build`.

use crate::filesync::{self, Filter, PacketConn};
use crate::{Error, headers, hijack, raw::RawCodec};
use bytes::Bytes;
use futures::StreamExt;
use kiln_proto::fsutil::types::Packet;
use kiln_proto::health::{HealthCheckRequest, HealthCheckResponse, health_server};
use kiln_proto::moby::buildkit::secrets::v1::{
    GetSecretRequest, GetSecretResponse, secrets_server,
};
use kiln_proto::moby::buildkit::v1::{BytesMessage as ControlBytes, control_client::ControlClient};
use kiln_proto::moby::filesync::v1::{BytesMessage, file_sync_server};
use kiln_proto::moby::sshforward::v1 as sshpb;
use prost::Message;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{Body, BoxFuture, StdError, http};
use tonic::{Request, Response, Status, Streaming};

/// Where the output of one exporter goes on the client.
#[derive(Debug, Clone)]
pub enum OutputTarget {
    /// `local`: a directory, filled with the fsutil protocol.
    Dir(PathBuf),
    /// `tar`, `oci`, `docker`: a file (`-` = standard output).
    File(PathBuf),
}

/// Where the value of a build secret comes from on the client.
#[derive(Debug, Clone)]
pub enum SecretSource {
    /// `src=PATH`: the file's contents, read when the build asks.
    File(PathBuf),
    /// `env=VAR`: an environment variable of the client.
    Env(String),
}

impl SecretSource {
    /// Reads the secret now; `None` when the file or variable does not exist.
    pub fn read(&self) -> Result<Option<Vec<u8>>, Error> {
        match self {
            SecretSource::File(p) => match std::fs::read(p) {
                Ok(d) => Ok(Some(d)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::Io {
                    op: "read secret",
                    path: p.clone(),
                    source: e,
                }),
            },
            SecretSource::Env(v) => Ok(std::env::var_os(v).map(|v| {
                use std::os::unix::ffi::OsStringExt;
                v.into_vec()
            })),
        }
    }
}

/// The client's side of a session.
#[derive(Debug, Clone, Default)]
pub struct Attachables {
    /// local dirs by name ("context", "dockerfile")
    pub dirs: BTreeMap<String, PathBuf>,
    /// export targets by exporter index
    pub outputs: BTreeMap<u32, OutputTarget>,
    /// build secrets by id (`--secret id=ID,src=PATH|env=VAR`)
    pub secrets: BTreeMap<String, SecretSource>,
    /// SSH agent sockets by id (`--ssh default=$SSH_AUTH_SOCK`)
    pub ssh: BTreeMap<String, PathBuf>,
    /// local build-cache directories (`--export-cache`/`--import-cache type=local`)
    pub content: crate::content::LocalStores,
}

fn md_values(req_md: &tonic::metadata::MetadataMap, key: &str) -> Vec<String> {
    req_md
        .get_all(key)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split('\n').map(str::to_string).collect::<Vec<_>>())
        .filter(|v| !v.is_empty())
        .collect()
}

/// The paths `paths` (relative to `root`) stand for once their symlinks are
/// followed, as fsutil's `FollowLinks`: every symlink met on the way, in the
/// path or its parents, and the path through its target (a target leaving
/// `root` is read from `root`'s top). Links are read literally: a wildcard
/// in a path is not expanded here.
fn follow_links(root: &std::path::Path, paths: &[String]) -> Vec<String> {
    let mut resolved = std::collections::BTreeSet::new();
    for p in paths {
        follow_one(root, p, &mut resolved, 0);
    }
    resolved.into_iter().collect()
}

/// `p` cleaned to components below the root (`..` stops at the root).
fn clean_components(p: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c.to_string()),
        }
    }
    out
}

fn follow_one(
    root: &std::path::Path,
    p: &str,
    resolved: &mut std::collections::BTreeSet<String>,
    depth: usize,
) {
    let parts = clean_components(p);
    if depth > 64 || parts.is_empty() {
        return;
    }
    for i in 0..parts.len() {
        let current = parts[..=i].join("/");
        let rest = parts[i + 1..].join("/");
        let link = std::fs::symlink_metadata(root.join(&current))
            .ok()
            .filter(|m| m.file_type().is_symlink())
            .and_then(|_| std::fs::read_link(root.join(&current)).ok());
        if (rest.is_empty() || link.is_some()) && resolved.contains(&current) {
            return;
        }
        if let Some(target) = link {
            resolved.insert(current);
            let target = target.to_string_lossy().into_owned();
            let base = if target.starts_with('/') {
                target
            } else {
                format!("{}/{target}", parts[..i].join("/"))
            };
            follow_one(root, &format!("{base}/{rest}"), resolved, depth + 1);
            return;
        }
        if rest.is_empty() {
            resolved.insert(current);
        }
    }
}

struct ServerConn<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    rx: Streaming<Packet>,
}

impl PacketConn for ServerConn<Packet> {
    async fn send(&mut self, p: Packet) -> Result<(), Error> {
        self.tx
            .send(Ok(p))
            .await
            .map_err(|_| Error::Protocol("peer went away".into()))
    }
    async fn recv(&mut self) -> Result<Option<Packet>, Error> {
        self.rx.message().await.map_err(|status| Error::Call {
            method: "FileSync/DiffCopy".into(),
            source: Box::new(status.into()),
        })
    }
}

#[derive(Clone)]
struct FileSync {
    dirs: Arc<BTreeMap<String, PathBuf>>,
}

#[tonic::async_trait]
impl file_sync_server::FileSync for FileSync {
    type DiffCopyStream = ReceiverStream<Result<Packet, Status>>;
    type TarStreamStream = ReceiverStream<Result<Packet, Status>>;

    async fn diff_copy(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<Self::DiffCopyStream>, Status> {
        let md = request.metadata();
        let name = md_values(md, headers::DIR_NAME)
            .into_iter()
            .next()
            .unwrap_or_default();
        let dir = self.dirs.get(&name).cloned().ok_or_else(|| {
            Status::not_found(format!("no local directory named {name:?} in this session"))
        })?;
        let mut include = md_values(md, headers::INCLUDE_PATTERNS);
        // a followed path also sends what its symlinks point at (fsutil's
        // FollowLinks); with no include patterns everything is sent anyway
        if !include.is_empty() {
            include.extend(follow_links(&dir, &md_values(md, headers::FOLLOW_PATHS)));
        }
        let filter = Filter::new(&include, &md_values(md, headers::EXCLUDE_PATTERNS))
            .map_err(Status::from)?;
        let (tx, rx) = mpsc::channel(64);
        let mut conn = ServerConn {
            tx: tx.clone(),
            rx: request.into_inner(),
        };
        tokio::spawn(async move {
            if let Err(e) = filesync::send(&mut conn, &dir, &filter).await {
                let _ = tx
                    .send(Ok(Packet {
                        r#type: kiln_proto::fsutil::types::packet::PacketType::PacketErr as i32,
                        data: e.to_string().into_bytes(),
                        ..Default::default()
                    }))
                    .await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn tar_stream(
        &self,
        _request: Request<Streaming<Packet>>,
    ) -> Result<Response<Self::TarStreamStream>, Status> {
        Err(Status::unimplemented(
            "tar stream transfers are not supported; use DiffCopy",
        ))
    }
}

struct Secrets {
    secrets: Arc<BTreeMap<String, SecretSource>>,
}

#[tonic::async_trait]
impl secrets_server::Secrets for Secrets {
    async fn get_secret(
        &self,
        request: Request<GetSecretRequest>,
    ) -> Result<Response<GetSecretResponse>, Status> {
        let id = request.into_inner().id;
        let not_found = || Status::not_found(format!("secret {id} not found"));
        let src = self.secrets.get(&id).ok_or_else(not_found)?;
        let data = src.read().map_err(Status::from)?.ok_or_else(not_found)?;
        Ok(Response::new(GetSecretResponse { data }))
    }
}

struct Ssh {
    agents: Arc<BTreeMap<String, PathBuf>>,
}

impl Ssh {
    fn agent(&self, id: &str) -> Result<PathBuf, Status> {
        let id = if id.is_empty() { "default" } else { id };
        self.agents
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no ssh agent {id} in this session")))
    }
}

#[tonic::async_trait]
impl sshpb::ssh_server::Ssh for Ssh {
    async fn check_agent(
        &self,
        request: Request<sshpb::CheckAgentRequest>,
    ) -> Result<Response<sshpb::CheckAgentResponse>, Status> {
        let path = self.agent(&request.into_inner().id)?;
        tokio::net::UnixStream::connect(&path)
            .await
            .map_err(|e| Status::unavailable(format!("ssh agent {}: {e}", path.display())))?;
        Ok(Response::new(sshpb::CheckAgentResponse {}))
    }

    type ForwardAgentStream = ReceiverStream<Result<sshpb::BytesMessage, Status>>;

    async fn forward_agent(
        &self,
        request: Request<Streaming<sshpb::BytesMessage>>,
    ) -> Result<Response<Self::ForwardAgentStream>, Status> {
        let id = md_values(request.metadata(), headers::SSH_ID)
            .into_iter()
            .next()
            .unwrap_or_default();
        let path = self.agent(&id)?;
        let conn = tokio::net::UnixStream::connect(&path)
            .await
            .map_err(|e| Status::unavailable(format!("ssh agent {}: {e}", path.display())))?;
        let (mut rd, mut wr) = conn.into_split();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if wr.write_all(&m.data).await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        });
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx
                            .send(Ok(sshpb::BytesMessage {
                                data: buf[..n].to_vec(),
                            }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Health;

#[tonic::async_trait]
impl health_server::Health for Health {
    async fn check(
        &self,
        _r: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        Ok(Response::new(HealthCheckResponse { status: 1 }))
    }
}

/// FileSend carries fsutil packets for directory exports and
/// `BytesMessage`s for file exports under one method, so it is served with
/// the raw codec.
#[derive(Clone)]
struct FileSend {
    outputs: Arc<BTreeMap<u32, OutputTarget>>,
}

impl tonic::server::NamedService for FileSend {
    const NAME: &'static str = "moby.filesync.v1.FileSend";
}

struct RawConn {
    tx: mpsc::Sender<Result<Bytes, Status>>,
    rx: Streaming<Bytes>,
}

impl PacketConn for RawConn {
    async fn send(&mut self, p: Packet) -> Result<(), Error> {
        self.tx
            .send(Ok(Bytes::from(p.encode_to_vec())))
            .await
            .map_err(|_| Error::Protocol("peer went away".into()))
    }
    async fn recv(&mut self) -> Result<Option<Packet>, Error> {
        match self.rx.message().await {
            Ok(Some(b)) => Packet::decode(b).map(Some).map_err(|source| Error::Decode {
                what: "file transfer packet".into(),
                source,
            }),
            Ok(None) => Ok(None),
            Err(status) => Err(Error::Call {
                method: "FileSend/DiffCopy".into(),
                source: Box::new(status.into()),
            }),
        }
    }
}

async fn receive_output(target: OutputTarget, mut conn: RawConn) -> Result<(), Error> {
    match target {
        OutputTarget::Dir(dir) => {
            filesync::receive(&mut conn, &dir).await?;
        }
        OutputTarget::File(path) => {
            let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if path.as_os_str() == "-"
            {
                Box::new(tokio::io::stdout())
            } else {
                let tmp = path.with_extension("kiln-partial");
                Box::new(
                    tokio::fs::File::create(&tmp)
                        .await
                        .map_err(Error::io("create", &tmp))?,
                )
            };
            while let Some(b) = conn.rx.message().await.map_err(|status| Error::Call {
                method: "FileSend/DiffCopy".into(),
                source: Box::new(status.into()),
            })? {
                let m = BytesMessage::decode(b).map_err(|source| Error::Decode {
                    what: "exported file data".into(),
                    source,
                })?;
                out.write_all(&m.data)
                    .await
                    .map_err(Error::io("write", &path))?;
            }
            out.flush().await.map_err(Error::io("write", &path))?;
            drop(out);
            if path.as_os_str() != "-" {
                let tmp = path.with_extension("kiln-partial");
                tokio::fs::rename(&tmp, &path)
                    .await
                    .map_err(Error::io("rename", &path))?;
            }
        }
    }
    Ok(())
}

impl tonic::server::StreamingService<Bytes> for FileSend {
    type Response = Bytes;
    type ResponseStream = ReceiverStream<Result<Bytes, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let outputs = self.outputs.clone();
        Box::pin(async move {
            let id: u32 = md_values(request.metadata(), headers::EXPORTER_ID)
                .first()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let target = outputs
                .get(&id)
                .cloned()
                .ok_or_else(|| Status::not_found(format!("no export target for exporter {id}")))?;
            let (tx, rx) = mpsc::channel(64);
            let conn = RawConn {
                tx: tx.clone(),
                rx: request.into_inner(),
            };
            tokio::spawn(async move {
                if let Err(e) = receive_output(target, conn).await {
                    tracing::error!("receiving export: {e}");
                    let _ = tx.send(Err(Status::from(e))).await;
                }
            });
            // Answer (send headers) with the first message back, or when the transfer
            // ends, as BuildKit's clients do: a daemon must not wait for the headers
            // before it sends.
            let mut rx: mpsc::Receiver<Result<Bytes, Status>> = rx;
            let first = rx.recv().await;
            let (fwd_tx, fwd_rx) = mpsc::channel(64);
            if let Some(first) = first {
                let _ = fwd_tx.send(first).await;
                tokio::spawn(async move {
                    while let Some(m) = rx.recv().await {
                        if fwd_tx.send(m).await.is_err() {
                            return;
                        }
                    }
                });
            }
            Ok(Response::new(ReceiverStream::new(fwd_rx)))
        })
    }
}

impl<B> tower::Service<http::Request<B>> for FileSend
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let svc = self.clone();
        Box::pin(async move {
            if req.uri().path() != crate::methods::FILESEND_DIFFCOPY {
                return Ok(Status::unimplemented("unknown method").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(grpc.streaming(svc, req).await)
        })
    }
}

/// A running session; dropping it ends the session.
pub struct SessionHandle {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens `Control.Session` on `control` and serves `att` on it.
pub async fn attach(
    control: crate::dial::Channel,
    session_id: &str,
    name: &str,
    shared_key: &str,
    att: Attachables,
) -> Result<SessionHandle, Error> {
    let (out_tx, out_rx) = mpsc::channel::<Bytes>(64);
    let outbound = ReceiverStream::new(out_rx).map(|data| ControlBytes {
        data: data.to_vec(),
    });
    let mut req = Request::new(outbound);
    let md = req.metadata_mut();
    let put = |md: &mut tonic::metadata::MetadataMap, k: &'static str, v: &str| {
        if let Ok(v) = v.parse() {
            md.append(k, v);
        }
    };
    put(md, headers::SESSION_UUID, session_id);
    put(md, headers::SESSION_NAME, name);
    put(md, headers::SESSION_SHAREDKEY, shared_key);
    for m in [
        crate::methods::FILESYNC_DIFFCOPY,
        crate::methods::FILESEND_DIFFCOPY,
        crate::methods::HEALTH_CHECK,
        crate::methods::SECRETS_GETSECRET,
        crate::methods::SSH_CHECKAGENT,
        crate::methods::SSH_FORWARDAGENT,
        crate::methods::AUTH_CREDENTIALS,
    ]
    .into_iter()
    .chain(
        (!att.content.stores.is_empty())
            .then_some(crate::methods::CONTENT)
            .into_iter()
            .flatten()
            .copied(),
    ) {
        put(md, headers::SESSION_METHOD, m);
    }
    let resp = ControlClient::new(control)
        .session(req)
        .await
        .map_err(|status| Error::Call {
            method: "Control/Session".into(),
            source: Box::new(status.into()),
        })?;
    let incoming = resp.into_inner().map(|r| r.map(|m| Bytes::from(m.data)));
    let conn = hijack::join(incoming, out_tx);
    let router = tonic::transport::Server::builder()
        .add_service(file_sync_server::FileSyncServer::new(FileSync {
            dirs: Arc::new(att.dirs),
        }))
        .add_service(FileSend {
            outputs: Arc::new(att.outputs),
        })
        .add_service(secrets_server::SecretsServer::new(Secrets {
            secrets: Arc::new(att.secrets),
        }))
        .add_service(sshpb::ssh_server::SshServer::new(Ssh {
            agents: Arc::new(att.ssh),
        }))
        .add_service(
            kiln_proto::moby::filesync::v1::auth_server::AuthServer::new(crate::auth::Auth),
        )
        .add_service(health_server::HealthServer::new(Health))
        .add_service(crate::content::server(att.content));
    let incoming = futures::stream::once(async move { Ok::<_, std::io::Error>(conn) })
        .chain(futures::stream::pending());
    let task = tokio::spawn(async move {
        if let Err(e) = router.serve_with_incoming(incoming).await {
            tracing::debug!("session server ended: {e}");
        }
    });
    Ok(SessionHandle { task })
}

#[cfg(test)]
mod tests {
    use super::follow_links;

    #[test]
    fn followed_paths_bring_their_symlink_targets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("real/sub")).expect("mkdir");
        std::fs::write(root.join("Dockerfile.web"), "FROM scratch\n").expect("write");
        std::fs::write(root.join("real/sub/f"), "x").expect("write");
        let link = |target: &str, name: &str| {
            std::os::unix::fs::symlink(target, root.join(name)).expect("symlink")
        };
        link("Dockerfile.web", "Dockerfile");
        link("real", "dir");
        link("../../../real/sub", "up");
        link("loop", "loop");
        let paths = |ps: &[&str]| {
            let ps: Vec<String> = ps.iter().map(|p| p.to_string()).collect();
            follow_links(root, &ps)
        };
        assert_eq!(
            paths(&["Dockerfile", "Dockerfile.dockerignore"]),
            ["Dockerfile", "Dockerfile.dockerignore", "Dockerfile.web"]
        );
        assert_eq!(paths(&["dir/sub/f"]), ["dir", "real/sub/f"]);
        assert_eq!(paths(&["/up/f"]), ["real/sub/f", "up"]);
        assert_eq!(paths(&["loop"]), ["loop"]);
        assert_eq!(paths(&["plain/file"]), ["plain/file"]);
    }
}
