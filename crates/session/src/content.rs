//! Local build caches (`--export-cache type=local,dest=DIR`,
//! `--import-cache type=local,src=DIR`): the client serves containerd's
//! content API on its session for each such directory, chosen by the
//! `buildkit-attachable-store-id: local:DIR` header, and the daemon writes and
//! reads blobs through it ([`crate::SessionClient::content`]), as BuildKit's
//! clients and daemon do. Blobs live in `DIR/blobs/sha256/<hex>`; the client
//! tags the cache manifest in `DIR/index.json` after the build.

use crate::Error;
use kiln_proto::containerd::services::content::v1::{
    self as cpb, WriteAction, content_server::Content,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// The header naming the store a content call is for.
pub const STORE_ID: &str = "buildkit-attachable-store-id";
/// A local store's id: this prefix and its directory.
pub const LOCAL_PREFIX: &str = "local:";

/// Chunks of a read.
const READ_CHUNK: usize = 1 << 20;

/// The path of blob `digest` in `dir` (`None`: not a sha256 digest).
pub fn blob_path(dir: &Path, digest: &str) -> Option<PathBuf> {
    let hex = kiln_digest::hex_part(digest)?;
    Some(dir.join("blobs/sha256").join(hex))
}

/// The content stores a client serves, by id (`local:DIR`).
#[derive(Debug, Clone, Default)]
pub struct LocalStores {
    pub stores: BTreeMap<String, PathBuf>,
}

impl LocalStores {
    fn choose<T>(&self, req: &Request<T>) -> Result<&Path, Status> {
        let id = req
            .metadata()
            .get(STORE_ID)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!("request lacks metadata {STORE_ID:?}"))
            })?;
        self.stores
            .get(id)
            .map(PathBuf::as_path)
            .ok_or_else(|| Status::not_found(format!("unknown store {id}")))
    }
}

fn blob(dir: &Path, digest: &str) -> Result<PathBuf, Status> {
    blob_path(dir, digest)
        .ok_or_else(|| Status::invalid_argument(format!("invalid digest {digest:?}")))
}

fn io_status(what: &str, e: std::io::Error) -> Status {
    match e.kind() {
        std::io::ErrorKind::NotFound => Status::not_found(format!("{what}: not found")),
        _ => Status::internal(format!("{what}: {e}")),
    }
}

fn now() -> prost_types::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A write in progress: the temp file and what has gone into it.
struct Ingest {
    dir: PathBuf,
    tmp: PathBuf,
    file: tokio::fs::File,
    hasher: kiln_digest::Hasher,
    offset: i64,
    total: i64,
    expected: String,
}

impl Ingest {
    async fn start(dir: &Path, total: i64, expected: String) -> Result<Ingest, Status> {
        let ingest = dir.join("ingest");
        tokio::fs::create_dir_all(&ingest)
            .await
            .map_err(|e| io_status("create ingest dir", e))?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = ingest.join(format!("kiln-{}-{n}", std::process::id()));
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| io_status("create ingest file", e))?;
        Ok(Ingest {
            dir: dir.to_path_buf(),
            tmp,
            file,
            hasher: kiln_digest::Hasher::new(),
            offset: 0,
            total,
            expected,
        })
    }

    async fn write(&mut self, offset: i64, data: &[u8]) -> Result<(), Status> {
        if offset != self.offset {
            return Err(Status::invalid_argument(format!(
                "write at offset {offset}, expected {}",
                self.offset
            )));
        }
        self.file
            .write_all(data)
            .await
            .map_err(|e| io_status("write blob", e))?;
        self.hasher.update(data);
        self.offset += data.len() as i64;
        Ok(())
    }

    async fn commit(mut self, total: i64, expected: &str) -> Result<String, Status> {
        self.file
            .flush()
            .await
            .map_err(|e| io_status("write blob", e))?;
        let total = if total != 0 { total } else { self.total };
        if total != 0 && total != self.offset {
            return Err(Status::failed_precondition(format!(
                "unexpected commit size {}, expected {total}",
                self.offset
            )));
        }
        let digest = std::mem::replace(&mut self.hasher, kiln_digest::Hasher::new()).finish();
        let expected = if expected.is_empty() {
            &self.expected
        } else {
            expected
        };
        if !expected.is_empty() && *expected != digest {
            return Err(Status::failed_precondition(format!(
                "unexpected commit digest {digest}, expected {expected}"
            )));
        }
        let dest = blob(&self.dir, &digest)?;
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| io_status("create blob dir", e))?;
        }
        tokio::fs::rename(&self.tmp, &dest)
            .await
            .map_err(|e| io_status("commit blob", e))?;
        Ok(digest)
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        // an uncommitted write leaves nothing (a committed one was renamed away)
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn write_reply(
    action: WriteAction,
    offset: i64,
    total: i64,
    digest: String,
) -> cpb::WriteContentResponse {
    cpb::WriteContentResponse {
        action: action as i32,
        started_at: Some(now()),
        updated_at: Some(now()),
        offset,
        total,
        digest,
    }
}

/// One Write stream: STAT (opens the write, or AlreadyExists), WRITEs, COMMIT.
async fn serve_write(
    dir: PathBuf,
    mut rx: Streaming<cpb::WriteContentRequest>,
    tx: mpsc::Sender<Result<cpb::WriteContentResponse, Status>>,
) -> Result<(), Status> {
    let mut ingest: Option<Ingest> = None;
    while let Some(req) = rx.message().await? {
        let action = WriteAction::try_from(req.action).map_err(|_| {
            Status::invalid_argument(format!("unknown write action {}", req.action))
        })?;
        let reply = match action {
            WriteAction::Stat => {
                if ingest.is_none() {
                    if !req.expected.is_empty() {
                        let path = blob(&dir, &req.expected)?;
                        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
                            return Err(Status::already_exists(format!(
                                "content {} already exists",
                                req.expected
                            )));
                        }
                    }
                    ingest = Some(Ingest::start(&dir, req.total, req.expected.clone()).await?);
                }
                let w = ingest
                    .as_ref()
                    .ok_or_else(|| Status::internal("no write"))?;
                write_reply(WriteAction::Stat, w.offset, w.total, String::new())
            }
            WriteAction::Write => {
                let w = ingest
                    .as_mut()
                    .ok_or_else(|| Status::failed_precondition("write before stat"))?;
                w.write(req.offset, &req.data).await?;
                write_reply(WriteAction::Write, w.offset, w.total, String::new())
            }
            WriteAction::Commit => {
                let w = ingest
                    .take()
                    .ok_or_else(|| Status::failed_precondition("commit before stat"))?;
                if !req.data.is_empty() {
                    return Err(Status::invalid_argument("data in a commit"));
                }
                let offset = w.offset;
                let digest = w.commit(req.total, &req.expected).await?;
                write_reply(WriteAction::Commit, offset, offset, digest)
            }
        };
        if tx.send(Ok(reply)).await.is_err() {
            break;
        }
    }
    Ok(())
}

type BoxStream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl Content for LocalStores {
    async fn info(
        &self,
        req: Request<cpb::InfoRequest>,
    ) -> Result<Response<cpb::InfoResponse>, Status> {
        let dir = self.choose(&req)?;
        let digest = req.get_ref().digest.clone();
        let meta = tokio::fs::metadata(blob(dir, &digest)?)
            .await
            .map_err(|e| io_status(&format!("content {digest}"), e))?;
        Ok(Response::new(cpb::InfoResponse {
            info: Some(cpb::Info {
                digest,
                size: i64::try_from(meta.len()).unwrap_or(i64::MAX),
                created_at: Some(now()),
                updated_at: Some(now()),
                labels: BTreeMap::new(),
            }),
        }))
    }

    type ReadStream = BoxStream<cpb::ReadContentResponse>;

    async fn read(
        &self,
        req: Request<cpb::ReadContentRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let dir = self.choose(&req)?;
        let r = req.into_inner();
        let path = blob(dir, &r.digest)?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| io_status(&format!("content {}", r.digest), e))?;
        let start =
            u64::try_from(r.offset).map_err(|_| Status::invalid_argument("negative offset"))?;
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| io_status("seek", e))?;
        let mut left = if r.size > 0 { r.size as u64 } else { u64::MAX };
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut offset = r.offset;
            let mut buf = vec![0u8; READ_CHUNK];
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = match file.read(&mut buf[..want]).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(io_status("read blob", e))).await;
                        return;
                    }
                };
                let msg = cpb::ReadContentResponse {
                    offset,
                    data: buf[..n].to_vec(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                offset += n as i64;
                left -= n as u64;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type WriteStream = BoxStream<cpb::WriteContentResponse>;

    async fn write(
        &self,
        req: Request<Streaming<cpb::WriteContentRequest>>,
    ) -> Result<Response<Self::WriteStream>, Status> {
        let dir = self.choose(&req)?.to_path_buf();
        let rx = req.into_inner();
        let (tx, out) = mpsc::channel(4);
        tokio::spawn(async move {
            if let Err(s) = serve_write(dir, rx, tx.clone()).await {
                let _ = tx.send(Err(s)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn update(
        &self,
        _: Request<cpb::UpdateRequest>,
    ) -> Result<Response<cpb::UpdateResponse>, Status> {
        Err(Status::unimplemented("update is not served"))
    }

    type ListStream = BoxStream<cpb::ListContentResponse>;

    async fn list(
        &self,
        _: Request<cpb::ListContentRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        Err(Status::unimplemented("list is not served"))
    }

    async fn delete(&self, _: Request<cpb::DeleteContentRequest>) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("delete is not served"))
    }

    async fn status(
        &self,
        _: Request<cpb::StatusRequest>,
    ) -> Result<Response<cpb::StatusResponse>, Status> {
        Err(Status::not_found("no write in progress by that ref"))
    }

    async fn list_statuses(
        &self,
        _: Request<cpb::ListStatusesRequest>,
    ) -> Result<Response<cpb::ListStatusesResponse>, Status> {
        Ok(Response::new(cpb::ListStatusesResponse::default()))
    }

    async fn abort(&self, _: Request<cpb::AbortRequest>) -> Result<Response<()>, Status> {
        Ok(Response::new(()))
    }
}

/// `DIR/index.json` with `desc` tagged `tag` (an entry with that tag replaced)
/// and `DIR/oci-layout`, as a client does after a local cache export.
pub fn tag_in_index(dir: &Path, desc: &serde_json::Value, tag: &str) -> Result<(), Error> {
    let io = |what: &'static str| Error::io(what, dir.display().to_string());
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(io("write oci-layout"))?;
    let path = dir.join("index.json");
    let mut index: serde_json::Value = match std::fs::read(&path) {
        Ok(b) if !b.is_empty() => serde_json::from_slice(&b)
            .map_err(|e| Error::Protocol(format!("{}: {e}", path.display())))?,
        _ => serde_json::json!({}),
    };
    let obj = index
        .as_object_mut()
        .ok_or_else(|| Error::Protocol(format!("{}: not an object", path.display())))?;
    obj.entry("schemaVersion").or_insert(serde_json::json!(2));
    obj.entry("mediaType")
        .or_insert(serde_json::json!("application/vnd.oci.image.index.v1+json"));
    let mut manifests: Vec<serde_json::Value> = obj
        .get("manifests")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    manifests.retain(|m| {
        m["annotations"]["org.opencontainers.image.ref.name"].as_str() != Some(tag)
            || m["annotations"].get("io.containerd.image.name").is_some()
    });
    let mut entry = desc.clone();
    entry["annotations"]["org.opencontainers.image.ref.name"] = serde_json::json!(tag);
    manifests.push(entry);
    obj.insert("manifests".into(), serde_json::Value::Array(manifests));
    let bytes = serde_json::to_vec(&index).map_err(|e| Error::Protocol(e.to_string()))?;
    std::fs::write(&path, bytes).map_err(io("write index.json"))
}

/// The digest tagged `tag` in `DIR/index.json` (`None`: no such tag, or no index).
pub fn tagged(dir: &Path, tag: &str) -> Option<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).ok()?).ok()?;
    let manifests = index["manifests"].as_array()?;
    let by = |key: &str| {
        manifests
            .iter()
            .find(|m| m["annotations"][key].as_str() == Some(tag))
            .and_then(|m| m["digest"].as_str())
            .map(str::to_string)
    };
    by("io.containerd.image.name").or_else(|| by("org.opencontainers.image.ref.name"))
}

/// A shared handle for the session server.
pub fn server(stores: LocalStores) -> cpb::content_server::ContentServer<LocalStores> {
    cpb::content_server::ContentServer::from_arc(Arc::new(stores))
        .max_decoding_message_size(64 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpb::content_client::ContentClient;
    use tonic::transport::Channel;

    async fn serve(dir: &Path) -> ContentClient<Channel> {
        let mut stores = LocalStores::default();
        stores.stores.insert(
            format!("{LOCAL_PREFIX}{}", dir.display()),
            dir.to_path_buf(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server(stores))
                .serve_with_incoming(incoming),
        );
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        ContentClient::new(channel)
    }

    fn with_store<T>(dir: &Path, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let id = format!("{LOCAL_PREFIX}{}", dir.display());
        r.metadata_mut()
            .insert(STORE_ID, id.parse().expect("header"));
        r
    }

    fn req(
        action: WriteAction,
        offset: i64,
        data: &[u8],
        expected: &str,
        total: i64,
    ) -> cpb::WriteContentRequest {
        cpb::WriteContentRequest {
            action: action as i32,
            r#ref: "r1".into(),
            total,
            expected: expected.into(),
            offset,
            data: data.to_vec(),
            labels: BTreeMap::new(),
        }
    }

    async fn write(
        client: &mut ContentClient<Channel>,
        dir: &Path,
        msgs: Vec<cpb::WriteContentRequest>,
    ) -> Result<Vec<cpb::WriteContentResponse>, Status> {
        let mut out = client
            .write(with_store(dir, futures::stream::iter(msgs)))
            .await?
            .into_inner();
        let mut got = Vec::new();
        while let Some(m) = out.message().await? {
            got.push(m);
        }
        Ok(got)
    }

    #[tokio::test]
    async fn blobs_are_written_committed_by_digest_and_read_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut c = serve(dir.path()).await;
        let data = b"cache layer bytes";
        let digest = kiln_digest::sha256(data);
        let n = data.len() as i64;
        let replies = write(
            &mut c,
            dir.path(),
            vec![
                req(WriteAction::Stat, 0, b"", &digest, n),
                req(WriteAction::Write, 0, &data[..5], "", 0),
                req(WriteAction::Write, 5, &data[5..], "", 0),
                req(WriteAction::Commit, n, b"", &digest, n),
            ],
        )
        .await
        .expect("write");
        assert_eq!(replies.len(), 4, "every message is answered");
        assert_eq!(replies[2].offset, n);
        assert_eq!(replies[3].digest, digest);
        let path = blob_path(dir.path(), &digest).expect("path");
        assert_eq!(std::fs::read(&path).expect("blob"), data);
        let info = c
            .info(with_store(
                dir.path(),
                cpb::InfoRequest {
                    digest: digest.clone(),
                },
            ))
            .await
            .expect("info")
            .into_inner();
        assert_eq!(info.info.expect("info").size, n);
        let mut read = c
            .read(with_store(
                dir.path(),
                cpb::ReadContentRequest {
                    digest: digest.clone(),
                    offset: 6,
                    size: 0,
                },
            ))
            .await
            .expect("read")
            .into_inner();
        let mut got = Vec::new();
        while let Some(m) = read.message().await.expect("chunk") {
            got.extend(m.data);
        }
        assert_eq!(got, &data[6..]);
        // written again: the store says it has it, before any byte moves
        let again = write(
            &mut c,
            dir.path(),
            vec![req(WriteAction::Stat, 0, b"", &digest, n)],
        )
        .await;
        assert_eq!(
            again.expect_err("exists").code(),
            tonic::Code::AlreadyExists
        );
    }

    #[tokio::test]
    async fn bad_writes_and_names_leave_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut c = serve(dir.path()).await;
        let data = b"other bytes";
        let wrong = kiln_digest::sha256(b"not these");
        let n = data.len() as i64;
        let err = write(
            &mut c,
            dir.path(),
            vec![
                req(WriteAction::Stat, 0, b"", &wrong, n),
                req(WriteAction::Write, 0, data, "", 0),
                req(WriteAction::Commit, n, b"", &wrong, n),
            ],
        )
        .await
        .expect_err("digest mismatch");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        let err = write(
            &mut c,
            dir.path(),
            vec![
                req(WriteAction::Stat, 0, b"", "", 0),
                req(WriteAction::Write, 3, data, "", 0),
            ],
        )
        .await
        .expect_err("a gap");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let left: Vec<_> = walk(dir.path());
        assert!(
            left.is_empty(),
            "nothing committed or left in ingest: {left:?}"
        );
        // digests name files: only real ones
        let err = c
            .info(with_store(
                dir.path(),
                cpb::InfoRequest {
                    digest: "sha256:../../etc/passwd".into(),
                },
            ))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        // a store the client does not serve
        let err = c
            .info(with_store(
                Path::new("/etc"),
                cpb::InfoRequest { digest: wrong },
            ))
            .await
            .expect_err("unknown store");
        assert_eq!(err.code(), tonic::Code::NotFound);
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn a_tag_in_index_json_is_replaced_and_found() {
        let dir = tempfile::tempdir().expect("tmp");
        let d1 = serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": kiln_digest::sha256(b"1"), "size": 1});
        let d2 = serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": kiln_digest::sha256(b"2"), "size": 1});
        tag_in_index(dir.path(), &d1, "latest").expect("tag");
        tag_in_index(dir.path(), &d1, "v1").expect("tag");
        tag_in_index(dir.path(), &d2, "latest").expect("retag");
        assert_eq!(
            tagged(dir.path(), "latest"),
            d2["digest"].as_str().map(str::to_string)
        );
        assert_eq!(
            tagged(dir.path(), "v1"),
            d1["digest"].as_str().map(str::to_string)
        );
        assert_eq!(tagged(dir.path(), "v2"), None);
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).expect("index"))
                .expect("json");
        assert_eq!(index["manifests"].as_array().map(Vec::len), Some(2));
        assert!(dir.path().join("oci-layout").exists());
    }
}
