//! Reaching a client session from any kiln service, through the solver's
//! `SessionBroker`.

use crate::dial::Channel;
use crate::filesync::{self, Filter, PacketConn, ReceiveStats};
use crate::{Error, headers, methods};
use kiln_proto::fsutil::types::Packet;
use kiln_proto::kiln::session::v1::{ForwardFrame, session_broker_client::SessionBrokerClient};
use kiln_proto::moby::filesync::v1::BytesMessage;
use prost::Message;
use std::collections::BTreeMap;
use std::path::Path;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Options of a FileSync transfer.
#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    pub include_patterns: Vec<String>,
    pub exclude_patterns: Vec<String>,
    pub follow_paths: Vec<String>,
}

/// How the client answered a unary call through the session.
enum Reply {
    Message(Vec<u8>),
    /// The call ended without a reply.
    None,
    /// The client does not have what was asked for (or does not serve the method).
    Absent,
}

/// A handle on one client session.
#[derive(Clone, Debug)]
pub struct SessionClient {
    broker: Channel,
    session_id: String,
}

/// One forwarded call: frames out, frames in.
struct Forwarded {
    method: &'static str,
    tx: Option<mpsc::Sender<ForwardFrame>>,
    rx: tonic::Streaming<ForwardFrame>,
}

impl Forwarded {
    async fn send_bytes(&mut self, message: Vec<u8>) -> Result<(), Error> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| Error::Protocol("send after close".into()))?;
        tx.send(ForwardFrame {
            message,
            has_message: true,
            ..Default::default()
        })
        .await
        .map_err(|_| Error::Protocol(format!("{}: session call closed", self.method)))
    }
    async fn recv_bytes(&mut self) -> Result<Option<Vec<u8>>, Error> {
        loop {
            match self.rx.message().await {
                Ok(Some(f)) if f.has_message => return Ok(Some(f.message)),
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(None),
                Err(status) => {
                    return Err(Error::Call {
                        method: self.method.into(),
                        source: Box::new(status.into()),
                    });
                }
            }
        }
    }
}

impl PacketConn for Forwarded {
    async fn send(&mut self, p: Packet) -> Result<(), Error> {
        self.send_bytes(p.encode_to_vec()).await
    }
    async fn recv(&mut self) -> Result<Option<Packet>, Error> {
        match self.recv_bytes().await? {
            None => Ok(None),
            Some(b) => Packet::decode(b.as_slice())
                .map(Some)
                .map_err(|source| Error::Decode {
                    what: "session packet".into(),
                    source,
                }),
        }
    }
}

/// How long a service waits for a client to answer a credentials request.
const CREDENTIALS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The client's registry credentials for `host`, asked through the broker at
/// `broker`; `None` when there is no session, no entry or no answer in time.
pub async fn credentials_via(
    broker: &str,
    session_id: &str,
    host: &str,
) -> Option<(String, String)> {
    if session_id.is_empty() || broker.is_empty() {
        return None;
    }
    let channel = crate::dial::connect(broker).await.ok()?;
    let client = SessionClient::new(channel, session_id.to_string());
    match tokio::time::timeout(CREDENTIALS_TIMEOUT, client.credentials(host)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(host, "asking the client for registry credentials: {e}");
            None
        }
        Err(_) => {
            tracing::warn!(
                host,
                "the client did not answer a registry credentials request"
            );
            None
        }
    }
}

impl SessionClient {
    pub fn new(broker: Channel, session_id: String) -> Self {
        SessionClient { broker, session_id }
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    async fn open(
        &self,
        method: &'static str,
        metadata: BTreeMap<String, String>,
    ) -> Result<Forwarded, Error> {
        self.open_with(method, metadata, None).await
    }

    /// Opens a forwarded call whose first frame already carries `first`. A unary
    /// method answers (and so sends headers) only once its request stream has
    /// ended, so for those the sending side is closed right away.
    async fn open_with(
        &self,
        method: &'static str,
        metadata: BTreeMap<String, String>,
        first: Option<Vec<u8>>,
    ) -> Result<Forwarded, Error> {
        let unary = first.is_some();
        let (tx, rx) = mpsc::channel(32);
        tx.send(ForwardFrame {
            session_id: self.session_id.clone(),
            method: method.to_string(),
            metadata,
            has_message: first.is_some(),
            message: first.unwrap_or_default(),
        })
        .await
        .map_err(|_| Error::Protocol("forward channel closed".into()))?;
        // drop (not just leave unmoved) the sender, so the request stream ends now
        let tx = if unary {
            drop(tx);
            None
        } else {
            Some(tx)
        };
        let resp = SessionBrokerClient::new(self.broker.clone())
            .max_decoding_message_size(64 << 20)
            .forward(ReceiverStream::new(rx))
            .await
            .map_err(|status| Error::Call {
                method: method.into(),
                source: Box::new(status.into()),
            })?;
        Ok(Forwarded {
            method,
            tx,
            rx: resp.into_inner(),
        })
    }

    /// FileSync.DiffCopy: make `dest` mirror the client's local dir `name`.
    pub async fn sync_dir(
        &self,
        name: &str,
        dest: &Path,
        opts: &SyncOptions,
    ) -> Result<ReceiveStats, Error> {
        let mut md = BTreeMap::new();
        md.insert(headers::DIR_NAME.to_string(), name.to_string());
        // several values of one key travel newline-separated
        if !opts.include_patterns.is_empty() {
            md.insert(
                headers::INCLUDE_PATTERNS.into(),
                opts.include_patterns.join("\n"),
            );
        }
        if !opts.exclude_patterns.is_empty() {
            md.insert(
                headers::EXCLUDE_PATTERNS.into(),
                opts.exclude_patterns.join("\n"),
            );
        }
        if !opts.follow_paths.is_empty() {
            md.insert(headers::FOLLOW_PATHS.into(), opts.follow_paths.join("\n"));
        }
        let mut conn = self.open(methods::FILESYNC_DIFFCOPY, md).await?;
        let stats = filesync::receive(&mut conn, dest).await?;
        conn.tx = None;
        Ok(stats)
    }

    /// A unary call through the session: `req`, then the client's one reply. A call that
    /// fails with a code in `absent` means the client does not have what was asked for.
    async fn unary(
        &self,
        method: &'static str,
        req: &impl Message,
        absent: &[tonic::Code],
    ) -> Result<Reply, Error> {
        self.unary_with(method, BTreeMap::new(), req, absent).await
    }

    async fn unary_with(
        &self,
        method: &'static str,
        metadata: BTreeMap<String, String>,
        req: &impl Message,
        absent: &[tonic::Code],
    ) -> Result<Reply, Error> {
        let is_absent =
            |e: &Error| matches!(e, Error::Call { source, .. } if absent.contains(&source.code));
        let mut conn = match self
            .open_with(method, metadata, Some(req.encode_to_vec()))
            .await
        {
            Ok(c) => c,
            Err(e) if is_absent(&e) => return Ok(Reply::Absent),
            Err(e) => return Err(e),
        };
        conn.tx = None;
        match conn.recv_bytes().await {
            Ok(Some(b)) => Ok(Reply::Message(b)),
            Ok(None) => Ok(Reply::None),
            Err(e) if is_absent(&e) => Ok(Reply::Absent),
            Err(e) => Err(e),
        }
    }

    /// Secrets.GetSecret: the value of the client's secret `id`; `None` when the
    /// client does not have it.
    pub async fn get_secret(&self, id: &str) -> Result<Option<Vec<u8>>, Error> {
        use kiln_proto::moby::buildkit::secrets::v1::{GetSecretRequest, GetSecretResponse};
        let req = GetSecretRequest {
            id: id.to_string(),
            annotations: BTreeMap::new(),
        };
        let reply = self
            .unary(methods::SECRETS_GETSECRET, &req, &[tonic::Code::NotFound])
            .await?;
        let first = match reply {
            Reply::Message(b) => b,
            Reply::None => return Err(Error::Protocol(format!("secret {id}: no response"))),
            Reply::Absent => return Ok(None),
        };
        let resp = GetSecretResponse::decode(first.as_slice()).map_err(|source| Error::Decode {
            what: format!("secret {id}"),
            source,
        })?;
        Ok(Some(resp.data))
    }

    /// Auth.Credentials: the client's (username, secret) for a registry host; `None` when
    /// it has none or does not serve Auth.
    pub async fn credentials(&self, host: &str) -> Result<Option<(String, String)>, Error> {
        use kiln_proto::moby::filesync::v1::{CredentialsRequest, CredentialsResponse};
        let req = CredentialsRequest {
            host: host.to_string(),
        };
        let absent = [tonic::Code::NotFound, tonic::Code::Unimplemented];
        let Reply::Message(first) = self.unary(methods::AUTH_CREDENTIALS, &req, &absent).await?
        else {
            return Ok(None);
        };
        let resp =
            CredentialsResponse::decode(first.as_slice()).map_err(|source| Error::Decode {
                what: format!("credentials for {host}"),
                source,
            })?;
        if resp.username.is_empty() && resp.secret.is_empty() {
            return Ok(None);
        }
        Ok(Some((resp.username, resp.secret)))
    }

    /// SSH.CheckAgent: whether the client has ssh agent `id`.
    pub async fn check_ssh_agent(&self, id: &str) -> Result<bool, Error> {
        use kiln_proto::moby::sshforward::v1::CheckAgentRequest;
        let req = CheckAgentRequest { id: id.to_string() };
        match self
            .unary(methods::SSH_CHECKAGENT, &req, &[tonic::Code::NotFound])
            .await?
        {
            Reply::Message(_) => Ok(true),
            Reply::None => Err(Error::Protocol(format!("ssh agent {id}: no response"))),
            Reply::Absent => Ok(false),
        }
    }

    /// SSH.ForwardAgent: pipes one connection to the client's ssh agent `id` until
    /// either side closes.
    pub async fn forward_ssh_agent(
        &self,
        id: &str,
        conn: tokio::net::UnixStream,
    ) -> Result<(), Error> {
        use kiln_proto::moby::sshforward::v1::BytesMessage as SshBytes;
        use tokio::io::AsyncWriteExt;
        let mut md = BTreeMap::new();
        md.insert(headers::SSH_ID.to_string(), id.to_string());
        let mut fwd = self.open(methods::SSH_FORWARDAGENT, md).await?;
        let tx = fwd
            .tx
            .take()
            .ok_or_else(|| Error::Protocol("ssh forward closed".into()))?;
        let (mut rd, mut wr) = conn.into_split();
        let up = tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let frame = kiln_proto::kiln::session::v1::ForwardFrame {
                            message: SshBytes {
                                data: buf[..n].to_vec(),
                            }
                            .encode_to_vec(),
                            has_message: true,
                            ..Default::default()
                        };
                        if tx.send(frame).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        while let Some(b) = fwd.recv_bytes().await? {
            let m = SshBytes::decode(b.as_slice()).map_err(|source| Error::Decode {
                what: "ssh forward".into(),
                source,
            })?;
            if wr.write_all(&m.data).await.is_err() {
                break;
            }
        }
        up.abort();
        Ok(())
    }

    fn store_md(store: &str) -> BTreeMap<String, String> {
        let mut md = BTreeMap::new();
        md.insert(crate::content::STORE_ID.to_string(), store.to_string());
        md
    }

    /// Content.Info in the client's content store `store`: the blob's size;
    /// `None` when the store does not have it.
    pub async fn content_size(&self, store: &str, digest: &str) -> Result<Option<u64>, Error> {
        use kiln_proto::containerd::services::content::v1::{InfoRequest, InfoResponse};
        let req = InfoRequest {
            digest: digest.to_string(),
        };
        let absent = [tonic::Code::NotFound];
        let reply = self
            .unary_with(methods::CONTENT_INFO, Self::store_md(store), &req, &absent)
            .await?;
        let Reply::Message(b) = reply else {
            return Ok(None);
        };
        let resp = InfoResponse::decode(b.as_slice()).map_err(|source| Error::Decode {
            what: format!("content info {digest}"),
            source,
        })?;
        Ok(resp.info.and_then(|i| u64::try_from(i.size).ok()))
    }

    /// Content.Read of a whole blob from the client's store `store`, each
    /// chunk handed to `sink` in order; at most `limit` bytes.
    pub async fn content_read(
        &self,
        store: &str,
        digest: &str,
        limit: u64,
        mut sink: impl FnMut(&[u8]) -> Result<(), Error> + Send,
    ) -> Result<u64, Error> {
        use kiln_proto::containerd::services::content::v1::{
            ReadContentRequest, ReadContentResponse,
        };
        let req = ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        };
        let mut conn = self
            .open_with(
                methods::CONTENT_READ,
                Self::store_md(store),
                Some(req.encode_to_vec()),
            )
            .await?;
        conn.tx = None;
        let mut read = 0u64;
        while let Some(b) = conn.recv_bytes().await? {
            let m = ReadContentResponse::decode(b.as_slice()).map_err(|source| Error::Decode {
                what: format!("content {digest}"),
                source,
            })?;
            if u64::try_from(m.offset).ok() != Some(read) {
                return Err(Error::Protocol(format!(
                    "content {digest}: chunk at offset {}, expected {read}",
                    m.offset
                )));
            }
            read += m.data.len() as u64;
            if read > limit {
                return Err(Error::Protocol(format!(
                    "content {digest}: more than the {limit} bytes expected"
                )));
            }
            sink(&m.data)?;
        }
        Ok(read)
    }

    /// Content.Write of a blob into the client's store `store` from `r`
    /// (`size` bytes, digest `digest`): false when the store already has it.
    pub async fn content_write(
        &self,
        store: &str,
        digest: &str,
        size: u64,
        mut r: impl AsyncRead + Unpin + Send,
    ) -> Result<bool, Error> {
        use kiln_proto::containerd::services::content::v1::{
            WriteAction, WriteContentRequest, WriteContentResponse,
        };
        let total = i64::try_from(size).unwrap_or(i64::MAX);
        let stat = WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: digest.to_string(),
            total,
            expected: digest.to_string(),
            ..Default::default()
        };
        let mut conn = self
            .open(methods::CONTENT_WRITE, Self::store_md(store))
            .await?;
        let exists = |e: &Error| matches!(e, Error::Call { source, .. } if source.code == tonic::Code::AlreadyExists);
        let ask = async |conn: &mut Forwarded, req: WriteContentRequest| {
            conn.send_bytes(req.encode_to_vec()).await?;
            let b = conn
                .recv_bytes()
                .await?
                .ok_or_else(|| Error::Protocol(format!("content write {digest}: no answer")))?;
            WriteContentResponse::decode(b.as_slice()).map_err(|source| Error::Decode {
                what: format!("content write {digest}"),
                source,
            })
        };
        match ask(&mut conn, stat).await {
            Ok(_) => {}
            Err(e) if exists(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0i64;
        loop {
            let n = r
                .read(&mut buf)
                .await
                .map_err(Error::io("read", format!("blob {digest}")))?;
            if n == 0 {
                break;
            }
            let resp = ask(
                &mut conn,
                WriteContentRequest {
                    action: WriteAction::Write as i32,
                    offset,
                    data: buf[..n].to_vec(),
                    ..Default::default()
                },
            )
            .await?;
            offset += n as i64;
            if resp.offset != offset {
                return Err(Error::Protocol(format!(
                    "content write {digest}: store at offset {}, sent {offset}",
                    resp.offset
                )));
            }
        }
        let resp = ask(
            &mut conn,
            WriteContentRequest {
                action: WriteAction::Commit as i32,
                total,
                offset,
                expected: digest.to_string(),
                ..Default::default()
            },
        )
        .await?;
        if resp.digest != digest {
            return Err(Error::Protocol(format!(
                "content write {digest}: the store committed {}",
                resp.digest
            )));
        }
        conn.tx = None;
        Ok(true)
    }

    fn exporter_md(exporter_id: u32) -> BTreeMap<String, String> {
        let mut md = BTreeMap::new();
        md.insert(headers::EXPORTER_ID.to_string(), exporter_id.to_string());
        md
    }

    /// FileSend.DiffCopy with fsutil packets (the `local` exporter).
    pub async fn send_dir(&self, exporter_id: u32, src: &Path) -> Result<(), Error> {
        let mut conn = self
            .open(methods::FILESEND_DIFFCOPY, Self::exporter_md(exporter_id))
            .await?;
        filesync::send(&mut conn, src, &Filter::default()).await?;
        conn.tx = None;
        while conn.recv_bytes().await?.is_some() {}
        Ok(())
    }

    /// FileSend.DiffCopy with raw `BytesMessage` chunks (tarball exporters).
    pub async fn send_file(
        &self,
        exporter_id: u32,
        mut r: impl AsyncRead + Unpin + Send + 'static,
    ) -> Result<(), Error> {
        let mut conn = self
            .open(methods::FILESEND_DIFFCOPY, Self::exporter_md(exporter_id))
            .await?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r
                .read(&mut buf)
                .await
                .map_err(Error::io("read", "export stream"))?;
            if n == 0 {
                break;
            }
            conn.send_bytes(
                BytesMessage {
                    data: buf[..n].to_vec(),
                }
                .encode_to_vec(),
            )
            .await?;
        }
        conn.tx = None;
        while conn.recv_bytes().await?.is_some() {}
        Ok(())
    }
}
