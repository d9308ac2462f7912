//! The OCI distribution HTTP client: resolve, pull and push with mirrors, bearer tokens and
//! basic auth, retries on 5xx/429.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kiln_oci::{Descriptor, Index, Manifest, Platform, media_types};
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use tokio::io::AsyncWriteExt;

use crate::reference::{DOCKER_HUB, DOCKER_HUB_API_HOST};
use crate::{Error, Reference, RegistryConfig};

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json";
const MAX_MANIFEST: usize = 8 << 20;
const MAX_CONFIG: usize = 32 << 20;
/// A token endpoint's answer is a small JSON object.
const MAX_TOKEN_BODY: usize = 1 << 20;
/// Of an error response, only this much is read (its start says what went wrong).
const MAX_ERROR_BODY: usize = 4 << 10;
/// A request whose response sends nothing for this long fails (and is retried).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const TRIES: u32 = 4;
/// Downloads of one blob from one endpoint when its body breaks off.
const BODY_TRIES: u32 = 2;
/// The longest `Retry-After` (seconds) honoured before trying again.
const MAX_RETRY_AFTER: u64 = 10;
/// Blobs larger than this are uploaded in PATCH chunks of this size.
const CHUNK_SIZE: u64 = 64 << 20;

/// Username/password lookup for a registry host ("docker.io", "127.0.0.1:5000").
pub type Credentials = Arc<dyn Fn(&str) -> Option<(String, String)> + Send + Sync>;

/// A resolved image: the platform manifest and its raw config JSON.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The reference, pinned to `manifest_digest`.
    pub reference: Reference,
    /// Digest of what the reference names: the index of a multi-platform
    /// image (the digest BuildKit's frontends pin a `FROM` to), else the
    /// manifest.
    pub digest: String,
    /// Digest of the platform-specific manifest.
    pub manifest_digest: String,
    pub manifest: Manifest,
    /// Media type and raw bytes of the manifest as served.
    pub manifest_media_type: String,
    pub manifest_bytes: Vec<u8>,
    /// Raw config JSON bytes.
    pub config: Vec<u8>,
}

/// Where requests for a registry go: mirrors first (pulls only), then the registry.
#[derive(Clone, Debug)]
struct Endpoint {
    /// "http://127.0.0.1:5000"
    base: String,
    /// The host key for config, tokens and credentials.
    host: String,
    insecure: bool,
}

/// What a blob push did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// HEAD found the blob in the repository: nothing sent.
    Exists,
    /// Mounted from another repository of the same registry: nothing sent.
    Mounted,
    /// Uploaded in one PUT.
    Uploaded,
    /// Uploaded in PATCH chunks and a closing PUT.
    UploadedChunked,
}

/// OCI distribution client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    http_insecure: reqwest::Client,
    /// Clients trusting the CA certificates configured for a host.
    per_host: Arc<HashMap<String, reqwest::Client>>,
    config: RegistryConfig,
    tokens: Arc<Mutex<HashMap<(String, String), String>>>,
    credentials: Option<Credentials>,
    uploads: Arc<AtomicU64>,
    /// Blobs larger than this go up in PATCH chunks of this size.
    chunk_size: u64,
    /// What a tag's manifest (or index) resolved to for a platform, by its digest.
    resolved: Arc<Mutex<HashMap<ResolvedKey, Resolved>>>,
}

/// A resolution by content: (registry, repository, digest of what the reference names,
/// platform). The platform's manifest and its config are fixed by that digest, so a
/// later resolve of the same tag that gets the same digest from the registry needs no
/// more requests. The repository is in the key: the first request of every resolve,
/// made with the caller's credentials, is what shows the caller may read it.
type ResolvedKey = (String, String, String, String);

/// Resolutions remembered; past it they start over.
const RESOLVED_MAX: usize = 1024;

enum Auth {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

impl Client {
    pub fn new(config: RegistryConfig) -> Result<Self, Error> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(30))
                // a registry that stops sending fails the request instead of holding it
                .read_timeout(READ_TIMEOUT)
                .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        };
        let http = builder()
            .build()
            .map_err(|source| Error::BuildClient { source })?;
        let http_insecure = builder()
            .danger_accept_invalid_certs(true)
            .build()
            .map_err(|source| Error::BuildClient { source })?;
        let mut per_host = HashMap::new();
        for (host, hc) in &config.hosts {
            if hc.ca.is_empty() {
                continue;
            }
            let mut certs = Vec::new();
            for path in &hc.ca {
                let pem = std::fs::read(path).map_err(|source| Error::ReadCa {
                    host: host.clone(),
                    path: path.clone(),
                    source,
                })?;
                let found = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
                    Error::ParseCa {
                        host: host.clone(),
                        path: path.clone(),
                        source,
                    }
                })?;
                certs.extend(found);
            }
            let client = builder()
                .tls_certs_merge(certs)
                .build()
                .map_err(|source| Error::BuildClient { source })?;
            per_host.insert(host.clone(), client);
        }
        Ok(Client {
            http,
            http_insecure,
            per_host: Arc::new(per_host),
            config,
            tokens: Arc::default(),
            credentials: None,
            uploads: Arc::default(),
            chunk_size: CHUNK_SIZE,
            resolved: Arc::default(),
        })
    }

    /// A client for which `host` is insecure (TLS certificates not verified), as BuildKit's
    /// `registry.insecure=true` push option.
    pub fn with_insecure_host(&self, host: &str) -> Self {
        let mut c = self.clone();
        c.config.hosts.entry(host.to_string()).or_default().insecure = true;
        c
    }

    /// A client uploading blobs larger than `bytes` in PATCH chunks of `bytes` (default
    /// 64 MiB; each chunk is streamed from the file, never held in memory).
    pub fn with_chunk_size(mut self, bytes: u64) -> Self {
        self.chunk_size = bytes.max(1);
        self
    }

    /// Blobs this client (and its clones) sent to registries (PUT or PATCH uploads,
    /// not HEAD hits or mounts).
    pub fn uploads(&self) -> u64 {
        self.uploads.load(Ordering::Relaxed)
    }

    fn http_for(&self, ep: &Endpoint) -> &reqwest::Client {
        if ep.insecure {
            &self.http_insecure
        } else {
            self.per_host.get(&ep.host).unwrap_or(&self.http)
        }
    }

    /// Use `creds` for basic auth and for token requests.
    /// Tokens are not shared with the client this one was made from.
    pub fn with_credentials(mut self, creds: Credentials) -> Self {
        self.credentials = Some(creds);
        self.tokens = Arc::default();
        self
    }

    fn endpoint(&self, host: &str) -> Endpoint {
        let (scheme_given, bare) = match host.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest.trim_end_matches('/')),
            None => (None, host),
        };
        let api_host = if bare == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            bare
        };
        let scheme = scheme_given.unwrap_or(if self.config.is_http(bare) {
            "http"
        } else {
            "https"
        });
        Endpoint {
            base: format!("{scheme}://{api_host}"),
            host: bare.to_string(),
            insecure: self.config.host(bare).map(|h| h.insecure).unwrap_or(false),
        }
    }

    /// Mirrors of `r.registry` then the registry itself.
    fn pull_endpoints(&self, r: &Reference) -> Vec<Endpoint> {
        let mut eps: Vec<Endpoint> = self
            .config
            .host(&r.registry)
            .map(|h| h.mirrors.iter().map(|m| self.endpoint(m)).collect())
            .unwrap_or_default();
        eps.push(self.endpoint(&r.registry));
        eps
    }

    /// `f` at each endpoint `r` is pulled from (mirrors first) until one
    /// answers; else the last error.
    async fn on_pull_endpoints<T, F: Future<Output = Result<T, Error>>>(
        &self,
        r: &Reference,
        f: impl Fn(Endpoint) -> F,
    ) -> Result<T, Error> {
        let mut last = None;
        for ep in self.pull_endpoints(r) {
            let base = ep.base.clone();
            match f(ep).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tracing::debug!(endpoint = %base, reference = %r, error = %e, "pull endpoint failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Url { url: r.to_string() }))
    }

    /// tag or digest -> (index ->) platform manifest -> config. Tries mirrors first.
    pub async fn resolve(&self, r: &Reference, platform: &Platform) -> Result<Resolved, Error> {
        self.on_pull_endpoints(
            r,
            |ep| async move { self.resolve_at(&ep, r, platform).await },
        )
        .await
    }

    async fn resolve_at(
        &self,
        ep: &Endpoint,
        r: &Reference,
        platform: &Platform,
    ) -> Result<Resolved, Error> {
        let (mut media_type, mut bytes) = self.get_manifest(ep, r, r.object()).await?;
        let mut digest = kiln_oci::digest::sha256(&bytes);
        if let Some(want) = &r.digest
            && *want != digest
        {
            return Err(Error::DigestMismatch {
                what: "manifest",
                reference: r.to_string(),
                expected: want.clone(),
                actual: digest,
            });
        }
        let top = digest.clone();
        let key: ResolvedKey = (
            r.registry.clone(),
            r.repository.clone(),
            top.clone(),
            platform.to_string(),
        );
        let known = self
            .resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        if let Some(known) = known {
            return Ok(Resolved {
                reference: r.with_digest(&known.manifest_digest),
                ..known
            });
        }
        if media_types::is_index(&media_type) {
            let index: Index =
                serde_json::from_slice(&bytes).map_err(|source| Error::DecodeManifest {
                    reference: r.to_string(),
                    source,
                })?;
            let chosen = index
                .manifests
                .iter()
                .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
                .ok_or_else(|| Error::NoMatchingPlatform {
                    reference: r.to_string(),
                    platform: platform.to_string(),
                })?;
            let (mt, b) = self.get_manifest(ep, r, &chosen.digest).await?;
            let got = kiln_oci::digest::sha256(&b);
            if got != chosen.digest {
                return Err(Error::DigestMismatch {
                    what: "manifest",
                    reference: r.to_string(),
                    expected: chosen.digest.clone(),
                    actual: got,
                });
            }
            media_type = mt;
            bytes = b;
            digest = got;
        }
        if !media_types::is_manifest(&media_type) {
            return Err(Error::UnsupportedMediaType {
                reference: r.to_string(),
                media_type,
            });
        }
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| Error::DecodeManifest {
                reference: r.to_string(),
                source,
            })?;
        let config = self
            .get_small_blob(ep, r, &manifest.config.digest, MAX_CONFIG)
            .await?;
        let resolved = Resolved {
            reference: r.with_digest(&digest),
            digest: top,
            manifest_digest: digest,
            manifest,
            manifest_media_type: media_type,
            manifest_bytes: bytes,
            config,
        };
        let mut known = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() >= RESOLVED_MAX {
            known.clear();
        }
        known.insert(key, resolved.clone());
        Ok(resolved)
    }

    /// The manifest (or index) `r` names, as (media type, bytes), checked
    /// against its digest when `r` pins one. Tries mirrors first.
    pub async fn fetch_manifest(&self, r: &Reference) -> Result<(String, Vec<u8>), Error> {
        let (mt, bytes) = self
            .on_pull_endpoints(r, |ep| async move {
                self.get_manifest(&ep, r, r.object()).await
            })
            .await?;
        let got = kiln_oci::digest::sha256(&bytes);
        if let Some(want) = r.digest.as_ref().filter(|w| **w != got) {
            return Err(Error::DigestMismatch {
                what: "manifest",
                reference: r.to_string(),
                expected: want.clone(),
                actual: got,
            });
        }
        Ok((mt, bytes))
    }

    /// A small blob of `r`'s repository (a config), read whole up to
    /// `limit` bytes and verified. Tries mirrors first.
    pub async fn fetch_small_blob(
        &self,
        r: &Reference,
        digest: &str,
        limit: usize,
    ) -> Result<Vec<u8>, Error> {
        self.on_pull_endpoints(r, |ep| async move {
            self.get_small_blob(&ep, r, digest, limit).await
        })
        .await
    }

    /// GET a manifest; returns (media type, bytes). The media type comes from the body's
    /// `mediaType` or else the Content-Type header.
    async fn get_manifest(
        &self,
        ep: &Endpoint,
        r: &Reference,
        object: &str,
    ) -> Result<(String, Vec<u8>), Error> {
        let url = format!("{}/v2/{}/manifests/{}", ep.base, r.repository, object);
        let scope = pull_scope(r);
        let resp = self
            .send(ep, &scope, Method::GET, &url, &|rb| {
                rb.header(ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        let resp = expect_status(resp, "GET", &url, &[StatusCode::OK]).await?;
        let header_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string())
            .unwrap_or_default();
        let bytes = read_limited(resp, &url, MAX_MANIFEST).await?;
        #[derive(serde::Deserialize)]
        struct Peek {
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let peek: Peek =
            serde_json::from_slice(&bytes).map_err(|source| Error::DecodeManifest {
                reference: r.to_string(),
                source,
            })?;
        let media_type = match peek.media_type {
            Some(mt) if !mt.is_empty() => mt,
            _ if media_types::is_index(&header_type) || media_types::is_manifest(&header_type) => {
                header_type
            }
            _ if peek.manifests.is_some() => media_types::OCI_INDEX.to_string(),
            _ => media_types::OCI_MANIFEST.to_string(),
        };
        Ok((media_type, bytes))
    }

    async fn get_small_blob(
        &self,
        ep: &Endpoint,
        r: &Reference,
        digest: &str,
        limit: usize,
    ) -> Result<Vec<u8>, Error> {
        let url = format!("{}/v2/{}/blobs/{}", ep.base, r.repository, digest);
        let resp = self
            .send(ep, &pull_scope(r), Method::GET, &url, &|rb| rb)
            .await?;
        let resp = expect_status(resp, "GET", &url, &[StatusCode::OK]).await?;
        let bytes = read_limited(resp, &url, limit).await?;
        let got = kiln_oci::digest::sha256(&bytes);
        if got != digest {
            return Err(Error::DigestMismatch {
                what: "blob",
                reference: r.to_string(),
                expected: digest.to_string(),
                actual: got,
            });
        }
        Ok(bytes)
    }

    /// Download a blob to `dest` (streamed through `dest.tmp`, renamed on success), verifying
    /// digest and size. Tries mirrors first.
    pub async fn fetch_blob(
        &self,
        r: &Reference,
        desc: &Descriptor,
        dest: &Path,
    ) -> Result<(), Error> {
        let mut last = None;
        for ep in self.pull_endpoints(r) {
            for attempt in 1..=BODY_TRIES {
                match self.fetch_blob_at(&ep, r, desc, dest).await {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        tracing::debug!(endpoint = %ep.base, digest = %desc.digest, error = %e, "blob fetch failed");
                        // a body cut off mid-way is fetched again; anything else moves on
                        let again = matches!(e, Error::Request { .. }) && attempt < BODY_TRIES;
                        last = Some(e);
                        if !again {
                            break;
                        }
                        backoff(attempt).await;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Url { url: r.to_string() }))
    }

    async fn fetch_blob_at(
        &self,
        ep: &Endpoint,
        r: &Reference,
        desc: &Descriptor,
        dest: &Path,
    ) -> Result<(), Error> {
        let url = format!("{}/v2/{}/blobs/{}", ep.base, r.repository, desc.digest);
        let resp = self
            .send(ep, &pull_scope(r), Method::GET, &url, &|rb| rb)
            .await?;
        let resp = expect_status(resp, "GET", &url, &[StatusCode::OK]).await?;
        let tmp = tmp_path(dest);
        let werr = |source| Error::WriteBlob {
            path: tmp.clone(),
            source,
        };
        let mut file = tokio::fs::File::create(&tmp).await.map_err(werr)?;
        let mut hasher = kiln_oci::digest::Hasher::new();
        let mut size: u64 = 0;
        let mut stream = resp.bytes_stream();
        let result: Result<(), Error> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|source| Error::Request {
                    method: "GET".into(),
                    url: url.clone(),
                    source,
                })?;
                size += chunk.len() as u64;
                kiln_metrics::PULLED_BYTES.add(&[], chunk.len() as f64);
                if size > desc.size {
                    break;
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(werr)?;
            }
            file.flush().await.map_err(werr)?;
            file.sync_all().await.map_err(werr)?;
            Ok(())
        }
        .await;
        drop(file);
        let actual_digest = hasher.finish();
        let check = result.and_then(|()| {
            if size != desc.size || actual_digest != desc.digest {
                Err(Error::BlobMismatch {
                    digest: desc.digest.clone(),
                    expected_size: desc.size,
                    actual_size: size,
                    actual_digest,
                })
            } else {
                Ok(())
            }
        });
        if let Err(e) = check {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|source| Error::WriteBlob {
                path: dest.to_path_buf(),
                source,
            })
    }

    /// HEAD the blob on the registry itself (not mirrors).
    pub async fn blob_exists(&self, r: &Reference, digest: &str) -> Result<bool, Error> {
        self.blob_exists_scoped(r, digest, &pull_scope(r)).await
    }

    async fn blob_exists_scoped(
        &self,
        r: &Reference,
        digest: &str,
        scope: &str,
    ) -> Result<bool, Error> {
        let ep = self.endpoint(&r.registry);
        let url = format!("{}/v2/{}/blobs/{}", ep.base, r.repository, digest);
        let resp = self.send(&ep, scope, Method::HEAD, &url, &|rb| rb).await?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => expect_status(resp, "HEAD", &url, &[]).await.map(|_| false),
        }
    }

    /// Mounts blob `digest` into `r` from `from` (another repository of the
    /// same registry): true when the registry did; false when it could not
    /// (the blob is not there, or the registry does not mount).
    pub async fn mount_blob(
        &self,
        r: &Reference,
        digest: &str,
        from: &Reference,
    ) -> Result<bool, Error> {
        if from.registry != r.registry || from.repository == r.repository {
            return Ok(false);
        }
        let scope = format!("{} repository:{}:pull", push_scope(r), from.repository);
        let ep = self.endpoint(&r.registry);
        let url = format!(
            "{}/v2/{}/blobs/uploads/?mount={digest}&from={}",
            ep.base, r.repository, from.repository
        );
        let resp = self
            .send(&ep, &scope, Method::POST, &url, &|rb| {
                rb.header(CONTENT_LENGTH, 0)
            })
            .await?;
        let resp = expect_status(
            resp,
            "POST",
            &url,
            &[StatusCode::ACCEPTED, StatusCode::CREATED],
        )
        .await?;
        if resp.status() == StatusCode::CREATED {
            return Ok(true);
        }
        // an upload was started instead: cancel it (best effort)
        if let Ok(location) = self.location(&resp, &url, r, digest) {
            let _ = self
                .send(&ep, &scope, Method::DELETE, &location, &|rb| rb)
                .await;
        }
        Ok(false)
    }

    /// Upload a blob from the file `src` unless the repository already has it (HEAD).
    pub async fn push_blob(
        &self,
        r: &Reference,
        desc: &Descriptor,
        src: &Path,
    ) -> Result<PushOutcome, Error> {
        self.push_blob_from(r, desc, src, None).await
    }

    /// Push a blob: skipped when HEAD finds it; mounted from `mount_from` (another repository
    /// of the same registry that has it) when the registry allows; else uploaded in one PUT,
    /// or in PATCH chunks for large blobs. The file is streamed, never read whole.
    pub async fn push_blob_from(
        &self,
        r: &Reference,
        desc: &Descriptor,
        src: &Path,
        mount_from: Option<&Reference>,
    ) -> Result<PushOutcome, Error> {
        let scope = match mount_from {
            Some(from) if from.registry == r.registry && from.repository != r.repository => {
                format!("{} repository:{}:pull", push_scope(r), from.repository)
            }
            _ => push_scope(r),
        };
        if self.blob_exists_scoped(r, &desc.digest, &scope).await? {
            return Ok(PushOutcome::Exists);
        }
        let ep = self.endpoint(&r.registry);
        let mut start = format!("{}/v2/{}/blobs/uploads/", ep.base, r.repository);
        if let Some(from) = mount_from
            && from.registry == r.registry
            && from.repository != r.repository
        {
            start.push_str(&format!("?mount={}&from={}", desc.digest, from.repository));
        }
        let resp = self
            .send(&ep, &scope, Method::POST, &start, &|rb| {
                rb.header(CONTENT_LENGTH, 0)
            })
            .await?;
        let resp = expect_status(
            resp,
            "POST",
            &start,
            &[StatusCode::ACCEPTED, StatusCode::CREATED],
        )
        .await?;
        if resp.status() == StatusCode::CREATED {
            return Ok(PushOutcome::Mounted);
        }
        let mut location = self.location(&resp, &start, r, &desc.digest)?;
        let src_path: PathBuf = src.to_path_buf();
        let size = desc.size;
        self.uploads.fetch_add(1, Ordering::Relaxed);
        kiln_metrics::PUSHED_BYTES.add(&[], size as f64);
        if size > self.chunk_size {
            let mut offset = 0u64;
            while offset < size {
                let len = self.chunk_size.min(size - offset);
                // each attempt streams the range from the file again: no chunk in memory
                let body = RangeBody::open(&src_path, offset, len)?;
                let range = format!("{}-{}", offset, offset + len - 1);
                let url = location.clone();
                let resp = self
                    .send(&ep, &scope, Method::PATCH, &url, &|rb| {
                        body.attach(rb).header("Content-Range", range.as_str())
                    })
                    .await?;
                let resp = expect_status(resp, "PATCH", &url, &[StatusCode::ACCEPTED]).await?;
                location = self.location(&resp, &url, r, &desc.digest)?;
                offset += len;
            }
            let put = with_digest(&location, &desc.digest)?;
            let resp = self
                .send(&ep, &scope, Method::PUT, &put, &|rb| {
                    rb.header(CONTENT_LENGTH, 0)
                })
                .await?;
            expect_status(
                resp,
                "PUT",
                &put,
                &[StatusCode::CREATED, StatusCode::NO_CONTENT],
            )
            .await?;
            return Ok(PushOutcome::UploadedChunked);
        }
        let put = with_digest(&location, &desc.digest)?;
        // The body is re-opened per attempt so retries stream the file again.
        let body = RangeBody::open(&src_path, 0, size)?;
        let resp = self
            .send(&ep, &scope, Method::PUT, &put, &|rb| body.attach(rb))
            .await?;
        expect_status(
            resp,
            "PUT",
            &put,
            &[StatusCode::CREATED, StatusCode::NO_CONTENT],
        )
        .await?;
        Ok(PushOutcome::Uploaded)
    }

    /// The absolute upload URL from a response's Location header.
    fn location(
        &self,
        resp: &Response,
        request_url: &str,
        r: &Reference,
        digest: &str,
    ) -> Result<String, Error> {
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::UploadLocation {
                reference: r.to_string(),
                digest: digest.to_string(),
            })?;
        let base = Url::parse(request_url).map_err(|_| Error::Url {
            url: request_url.to_string(),
        })?;
        Ok(base
            .join(location)
            .map_err(|_| Error::Url {
                url: location.to_string(),
            })?
            .to_string())
    }

    /// PUT a manifest under the reference's tag (or digest). Returns the manifest digest.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> Result<String, Error> {
        let digest = kiln_oci::digest::sha256(&bytes);
        let ep = self.endpoint(&r.registry);
        let object = r.tag.as_deref().unwrap_or(&digest);
        let url = format!("{}/v2/{}/manifests/{}", ep.base, r.repository, object);
        let body = bytes::Bytes::from(bytes);
        let resp = self
            .send(&ep, &push_scope(r), Method::PUT, &url, &|rb| {
                rb.header(CONTENT_TYPE, media_type).body(body.clone())
            })
            .await?;
        expect_status(
            resp,
            "PUT",
            &url,
            &[StatusCode::CREATED, StatusCode::OK, StatusCode::ACCEPTED],
        )
        .await?;
        Ok(digest)
    }

    /// Send with auth and retries: 5xx/429/connection errors are retried (3 tries, backoff);
    /// a 401 runs the bearer-token or basic-auth flow once.
    async fn send(
        &self,
        ep: &Endpoint,
        scope: &str,
        method: Method,
        url: &str,
        build: &(dyn Fn(RequestBuilder) -> RequestBuilder + Sync),
    ) -> Result<Response, Error> {
        let http = self.http_for(ep);
        let key = (ep.host.clone(), scope.to_string());
        // credentials and tokens go only to the registry itself, never to an upload
        // location (or any URL) a registry names on another host
        let own = same_origin(url, &ep.base);
        let mut authed_once = !own;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut rb = build(http.request(method.clone(), url));
            let cached = own
                .then(|| self.tokens.lock().ok().and_then(|t| t.get(&key).cloned()))
                .flatten();
            if let Some(auth) = cached {
                rb = rb.header(AUTHORIZATION, auth);
            }
            let result = rb.send().await;
            let resp = match result {
                Ok(resp) => resp,
                Err(source) => {
                    if attempt < TRIES && (source.is_connect() || source.is_timeout()) {
                        backoff(attempt).await;
                        continue;
                    }
                    return Err(Error::Request {
                        method: method.to_string(),
                        url: url.to_string(),
                        source,
                    });
                }
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !authed_once {
                authed_once = true;
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge);
                let header = match challenge {
                    Some(Auth::Bearer {
                        realm,
                        service,
                        scope: challenge_scope,
                    }) => Some(
                        self.fetch_token(
                            ep,
                            &realm,
                            service.as_deref(),
                            challenge_scope.as_deref().unwrap_or(scope),
                        )
                        .await?,
                    ),
                    Some(Auth::Basic) => self.basic_header(&ep.host),
                    None => None,
                };
                match header {
                    Some(h) => {
                        if let Ok(mut t) = self.tokens.lock() {
                            t.insert(key.clone(), h);
                        }
                        attempt -= 1;
                        continue;
                    }
                    None => return Ok(resp),
                }
            }
            if (status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS)
                && attempt < TRIES
            {
                // a registry's Retry-After (seconds, capped) wins over our own backoff
                let after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                match after {
                    Some(secs) => {
                        tokio::time::sleep(Duration::from_secs(secs.min(MAX_RETRY_AFTER))).await
                    }
                    None => backoff(attempt).await,
                }
                continue;
            }
            return Ok(resp);
        }
    }

    fn basic_header(&self, host: &str) -> Option<String> {
        use base64::Engine as _;
        let (user, pass) = self.credentials.as_ref()?(host)?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        Some(format!("Basic {encoded}"))
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, Error> {
        let http = self.http_for(ep);
        let mut url = Url::parse(realm).map_err(|_| Error::Url {
            url: realm.to_string(),
        })?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scope.split(' ').filter(|s| !s.is_empty()) {
                q.append_pair("scope", s);
            }
        }
        let mut rb = http.get(url);
        if let Some(h) = self.basic_header(&ep.host) {
            rb = rb.header(AUTHORIZATION, h);
        }
        let terr = |source| Error::Token {
            realm: realm.to_string(),
            source,
        };
        let resp = rb
            .send()
            .await
            .map_err(terr)?
            .error_for_status()
            .map_err(terr)?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let bytes = read_limited(resp, realm, MAX_TOKEN_BODY).await?;
        let body: TokenResponse =
            serde_json::from_slice(&bytes).map_err(|source| Error::DecodeToken {
                realm: realm.to_string(),
                source,
            })?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::TokenMissing {
                realm: realm.to_string(),
            })?;
        Ok(format!("Bearer {token}"))
    }
}

/// Whether `url` is on the scheme, host and port of `base`.
fn same_origin(url: &str, base: &str) -> bool {
    match (Url::parse(url), Url::parse(base)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

fn with_digest(location: &str, digest: &str) -> Result<String, Error> {
    let mut url = Url::parse(location).map_err(|_| Error::Url {
        url: location.to_string(),
    })?;
    url.query_pairs_mut().append_pair("digest", digest);
    Ok(url.to_string())
}

/// The blob file at `path`, positioned at `offset`.
fn open_range(path: &Path, offset: u64) -> Result<std::fs::File, Error> {
    use std::io::Seek;
    let rerr = |source| Error::ReadBlob {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(rerr)?;
    f.seek(std::io::SeekFrom::Start(offset)).map_err(rerr)?;
    Ok(f)
}

/// `len` bytes of a blob file from `offset`, as an upload body: opened once up front (a file
/// that cannot be read fails before any request) and again for each retry.
struct RangeBody {
    path: PathBuf,
    offset: u64,
    len: u64,
    first: Mutex<Option<std::fs::File>>,
}

impl RangeBody {
    fn open(path: &Path, offset: u64, len: u64) -> Result<Self, Error> {
        let first = open_range(path, offset)?;
        Ok(RangeBody {
            path: path.to_path_buf(),
            offset,
            len,
            first: Mutex::new(Some(first)),
        })
    }

    /// `rb` with this range as its octet-stream body (no body when the file cannot be
    /// opened again: the registry then rejects the short upload).
    fn attach(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let f = self
            .first
            .lock()
            .ok()
            .and_then(|mut g| g.take())
            .or_else(|| open_range(&self.path, self.offset).ok());
        let rb = rb
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, self.len);
        match f {
            Some(f) => rb.body(file_body(f, self.len)),
            None => rb,
        }
    }
}

/// A request body streaming `len` bytes of `f` from its position, 1 MiB at a time.
fn file_body(f: std::fs::File, len: u64) -> reqwest::Body {
    use tokio::io::AsyncReadExt;
    let r = tokio::fs::File::from_std(f).take(len);
    reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(r, 1 << 20))
}

fn pull_scope(r: &Reference) -> String {
    format!("repository:{}:pull", r.repository)
}

fn push_scope(r: &Reference) -> String {
    format!("repository:{}:pull,push", r.repository)
}

fn tmp_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

async fn backoff(attempt: u32) {
    tokio::time::sleep(Duration::from_millis(
        200 * 2u64.pow(attempt.saturating_sub(1)),
    ))
    .await;
}

async fn expect_status(
    resp: Response,
    method: &str,
    url: &str,
    ok: &[StatusCode],
) -> Result<Response, Error> {
    let status = resp.status();
    if ok.contains(&status) {
        return Ok(resp);
    }
    // the start of the body is enough to say what went wrong; the rest is never read
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while body.len() < MAX_ERROR_BODY {
        match stream.next().await {
            Some(Ok(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(MAX_ERROR_BODY);
    Err(Error::Status {
        method: method.to_string(),
        url: url.to_string(),
        status: status.as_u16(),
        body: String::from_utf8_lossy(&body).chars().take(512).collect(),
    })
}

async fn read_limited(resp: Response, url: &str, limit: usize) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| Error::Request {
            method: "GET".into(),
            url: url.to_string(),
            source,
        })?;
        if out.len() + chunk.len() > limit {
            return Err(Error::TooLarge {
                url: url.to_string(),
                limit,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Parse `Bearer realm="..",service="..",scope=".."` or `Basic realm=".."`.
fn parse_challenge(header: &str) -> Option<Auth> {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    let mut params: HashMap<String, String> = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next().is_none() {
            break;
        }
        let value: String = if chars.peek() == Some(&'"') {
            chars.next();
            let mut v = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => break,
                    c => v.push(c),
                }
            }
            v
        } else {
            std::iter::from_fn(|| chars.next_if(|c| *c != ','))
                .collect::<String>()
                .trim()
                .to_string()
        };
        params.insert(key.trim().to_ascii_lowercase(), value);
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(Auth::Bearer {
            realm: params.remove("realm")?,
            service: params.remove("service"),
            scope: params.remove("scope"),
        })
    } else if scheme.eq_ignore_ascii_case("basic") {
        Some(Auth::Basic)
    } else {
        None
    }
}

/// What [`parse_challenge`] makes of a `WWW-Authenticate` value, for the fuzz
/// targets (`fuzz/`): `Bearer realm=… service=… scope=…`, `Basic`, or `None`.
#[doc(hidden)]
pub fn describe_challenge(header: &str) -> Option<String> {
    parse_challenge(header).map(|a| match a {
        Auth::Bearer {
            realm,
            service,
            scope,
        } => format!("Bearer realm={realm:?} service={service:?} scope={scope:?}"),
        Auth::Basic => "Basic".to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge() {
        let h = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#;
        match parse_challenge(h) {
            Some(Auth::Bearer {
                realm,
                service,
                scope,
            }) => {
                assert_eq!(realm, "https://auth.docker.io/token");
                assert_eq!(service.as_deref(), Some("registry.docker.io"));
                assert_eq!(scope.as_deref(), Some("repository:library/busybox:pull"));
            }
            _ => panic!("not bearer"),
        }
        assert!(matches!(
            parse_challenge(r#"Basic realm="r""#),
            Some(Auth::Basic)
        ));
        assert!(parse_challenge("Negotiate").is_none());
    }

    #[test]
    fn endpoints_prefer_mirrors_and_http_for_loopback() {
        let cfg: RegistryConfig = toml::from_str(
            r#"
            ["docker.io"]
            mirrors = ["127.0.0.1:5000", "https://mirror.example"]
            ["reg.local:80"]
            http = true
            "#,
        )
        .expect("toml");
        let c = Client::new(cfg).expect("client");
        let r = Reference::parse("busybox").expect("ref");
        let bases: Vec<String> = c.pull_endpoints(&r).into_iter().map(|e| e.base).collect();
        assert_eq!(
            bases,
            [
                "http://127.0.0.1:5000",
                "https://mirror.example",
                "https://registry-1.docker.io"
            ]
        );
        assert_eq!(c.endpoint("reg.local:80").base, "http://reg.local:80");
        assert_eq!(c.endpoint("localhost:5000").base, "http://localhost:5000");
        assert_eq!(c.endpoint("ghcr.io").base, "https://ghcr.io");
    }
}
