//! OCI layouts a client serves as named contexts (`kiln build --oci-layout
//! NAME=DIR`, `--opt context:X=oci-layout://NAME@sha256:…`): the directory
//! is one of the client's content stores ([`crate::content`]), chosen by the
//! store id `oci:NAME`, as BuildKit's clients name it. The daemon reads the
//! image's index, manifest and config through it (the frontend's image
//! config, the worker's layers) and checks each against its digest.

use crate::Error;
use kiln_oci::{Descriptor, Index, Manifest, Platform};
use std::future::Future;

/// The prefix of an OCI layout's store id (`oci:NAME`).
pub const STORE_PREFIX: &str = "oci:";
/// Source attr: the session serving the layout (BuildKit's `oci.session`).
pub const ATTR_SESSION: &str = "oci.session";
/// Source attr: the layout's store name (BuildKit's `oci.store`).
pub const ATTR_STORE: &str = "oci.store";
/// Source attr: use at most this many of the image's layers (`oci.layerlimit`).
pub const ATTR_LAYER_LIMIT: &str = "oci.layerlimit";
/// The scheme of an OCI layout source op.
pub const SCHEME: &str = "oci-layout://";

/// The largest manifest, index or config read.
pub const MAX_DOCUMENT: u64 = 4 << 20;
/// Nested indexes followed at most.
const MAX_DEPTH: usize = 4;

/// Whether `d` is a digest kiln reads (`sha256:` and 64 hex digits).
pub fn is_digest(d: &str) -> bool {
    kiln_digest::hex_part(d).is_some()
}

/// The store id of the layout named `name`.
pub fn store_id(name: &str) -> String {
    format!("{STORE_PREFIX}{name}")
}

/// An image found in a layout.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The digest the reference named (an index or a manifest).
    pub digest: String,
    /// The platform's manifest.
    pub manifest_digest: String,
    pub manifest: Manifest,
    /// The config, as stored.
    pub config: Vec<u8>,
}

fn bad(msg: String) -> Error {
    Error::Layout(msg)
}

/// What a document is, by its content (BuildKit's detection: a manifest has
/// `config` and `layers`, an index `manifests`).
enum Document {
    Index(Index),
    Manifest(Box<Manifest>),
}

fn detect(digest: &str, bytes: &[u8]) -> Result<Document, Error> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| bad(format!("{digest} is not a JSON document: {e}")))?;
    let decode = |e: serde_json::Error| bad(format!("{digest}: {e}"));
    if v.get("manifests").is_some() {
        return serde_json::from_value(v)
            .map(Document::Index)
            .map_err(decode);
    }
    if v.get("config").is_some() && v.get("layers").is_some() {
        return serde_json::from_value(v)
            .map(|m| Document::Manifest(Box::new(m)))
            .map_err(decode);
    }
    Err(bad(format!("{digest} is neither an index nor a manifest")))
}

/// Reads blob `digest` (at most `limit` bytes) with `read` and checks it
/// against its digest.
async fn verified<F, Fut>(read: &F, digest: &str, limit: u64) -> Result<Vec<u8>, Error>
where
    F: Fn(String, u64) -> Fut,
    Fut: Future<Output = Result<Vec<u8>, Error>>,
{
    if kiln_digest::hex_part(digest).is_none() {
        return Err(bad(format!("{digest:?} is not a sha256 digest")));
    }
    let bytes = read(digest.to_string(), limit).await?;
    let got = kiln_digest::sha256(&bytes);
    if got != digest {
        return Err(bad(format!("blob {digest} holds {got}")));
    }
    Ok(bytes)
}

/// The image `digest` names in a layout, for `platform` when it is an index;
/// `read(digest, limit)` reads a blob of the layout's store whole.
pub async fn resolve<F, Fut>(read: F, digest: &str, platform: &Platform) -> Result<Resolved, Error>
where
    F: Fn(String, u64) -> Fut,
    Fut: Future<Output = Result<Vec<u8>, Error>>,
{
    let mut current = digest.to_string();
    for _ in 0..=MAX_DEPTH {
        let bytes = verified(&read, &current, MAX_DOCUMENT).await?;
        match detect(&current, &bytes)? {
            Document::Manifest(manifest) => {
                let config = verified(&read, &manifest.config.digest, MAX_DOCUMENT).await?;
                if config.len() as u64 != manifest.config.size {
                    return Err(bad(format!(
                        "config {} is {} bytes, the manifest says {}",
                        manifest.config.digest,
                        config.len(),
                        manifest.config.size
                    )));
                }
                return Ok(Resolved {
                    digest: digest.to_string(),
                    manifest_digest: current,
                    manifest: *manifest,
                    config,
                });
            }
            Document::Index(index) => current = choose(&index, platform, &current)?.digest.clone(),
        }
    }
    Err(bad(format!("{digest}: indexes nested too deep")))
}

/// The entry of `index` for `platform`: the first that matches it; an entry
/// without a platform only when it is the index's one entry.
fn choose<'a>(
    index: &'a Index,
    platform: &Platform,
    digest: &str,
) -> Result<&'a Descriptor, Error> {
    let images = || index.manifests.iter().filter(|d| !is_attestation(d));
    if let Some(d) = images().find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p))) {
        return Ok(d);
    }
    let mut all = images();
    match (all.next(), all.next()) {
        (Some(d), None) if d.platform.is_none() => Ok(d),
        _ => Err(bad(format!("{digest}: no image for platform {platform}"))),
    }
}

/// An attestation manifest in an index (BuildKit marks them so).
fn is_attestation(d: &Descriptor) -> bool {
    d.annotations
        .as_ref()
        .and_then(|a| a.get("vnd.docker.reference.type"))
        .is_some_and(|t| t == "attestation-manifest")
}

/// Reads blob `digest` of the client's store `store` whole (at most `limit`
/// bytes) through the session broker.
pub async fn read_via(
    client: &crate::SessionClient,
    store: &str,
    digest: &str,
    limit: u64,
) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    client
        .content_read(store, digest, limit, |b| {
            out.extend_from_slice(b);
            Ok(())
        })
        .await?;
    Ok(out)
}

/// Reads blob `digest` of the client's store `store` whole (at most `limit`
/// bytes) on the session's own connection (the solver, which holds it).
pub async fn read_direct(
    channel: tonic::transport::Channel,
    store: &str,
    digest: &str,
    limit: u64,
) -> Result<Vec<u8>, Error> {
    use futures::StreamExt;
    use kiln_proto::containerd::services::content::v1::{ReadContentRequest, ReadContentResponse};
    use prost::Message;
    let req = ReadContentRequest {
        digest: digest.to_string(),
        offset: 0,
        size: 0,
    };
    let md = [(crate::content::STORE_ID.to_string(), store.to_string())].into();
    let first = bytes::Bytes::from(req.encode_to_vec());
    let mut replies = crate::raw::call(
        channel,
        crate::methods::CONTENT_READ,
        &md,
        futures::stream::iter([first]),
    )
    .await?;
    let mut out = Vec::new();
    while let Some(b) = replies.next().await {
        let b = b.map_err(|status| Error::Call {
            method: crate::methods::CONTENT_READ.into(),
            source: Box::new(status.into()),
        })?;
        let m = ReadContentResponse::decode(b).map_err(|source| Error::Decode {
            what: format!("content {digest}"),
            source,
        })?;
        if u64::try_from(m.offset).ok() != Some(out.len() as u64) {
            return Err(bad(format!(
                "content {digest}: chunk at offset {}, expected {}",
                m.offset,
                out.len()
            )));
        }
        if (out.len() + m.data.len()) as u64 > limit {
            return Err(bad(format!(
                "content {digest}: more than the {limit} bytes expected"
            )));
        }
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

/// A reference as `oci-layout://` carries it: `NAME[:TAG][@DIGEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub name: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `NAME[:TAG][@sha256:HEX]`; `NAME` is a store name: lower-case
    /// letters, digits, `.`, `_`, `-`, and `/` between such parts.
    pub fn parse(s: &str) -> Result<Reference, Error> {
        let invalid = |why: &str| bad(format!("invalid oci-layout reference {s:?}: {why}"));
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                if kiln_digest::hex_part(d).is_none() {
                    return Err(invalid("the digest is not sha256:<64 hex digits>"));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (name, tag) = match rest.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (rest, None),
        };
        if name.is_empty() {
            return Err(invalid("no name"));
        }
        let name_ok = name.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
                })
        });
        if !name_ok {
            return Err(invalid(
                "the name must be lower-case letters, digits, '.', '_', '-' and '/'",
            ));
        }
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(invalid("bad tag"));
            }
        }
        Ok(Reference {
            name: name.to_string(),
            tag,
            digest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn json(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).expect("json")
    }

    struct Layout(BTreeMap<String, Vec<u8>>);

    impl Layout {
        fn put(&mut self, bytes: Vec<u8>) -> (String, u64) {
            let d = kiln_digest::sha256(&bytes);
            let n = bytes.len() as u64;
            self.0.insert(d.clone(), bytes);
            (d, n)
        }
        fn reader(&self) -> impl Fn(String, u64) -> std::future::Ready<Result<Vec<u8>, Error>> {
            let blobs = self.0.clone();
            move |d, _| {
                std::future::ready(
                    blobs
                        .get(&d)
                        .cloned()
                        .ok_or_else(|| bad(format!("{d} not found"))),
                )
            }
        }
    }

    fn run<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn an_index_resolves_to_the_platforms_manifest_and_its_config() {
        let mut l = Layout(BTreeMap::new());
        let (cfg, cfg_n) = l.put(json(serde_json::json!({"architecture": "arm64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})));
        let manifest = |cfg: &str, n: u64| {
            json(
                serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": n}, "layers": []}),
            )
        };
        let (arm, arm_n) = l.put(manifest(&cfg, cfg_n));
        let (cfg2, cfg2_n) = l.put(json(
            serde_json::json!({"architecture": "amd64", "os": "linux"}),
        ));
        let (amd, amd_n) = l.put(manifest(&cfg2, cfg2_n));
        let (idx, _) = l.put(json(serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm, "size": arm_n, "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd, "size": amd_n, "platform": {"os": "linux", "architecture": "amd64"}},
        ]})));
        let r = run(resolve(
            l.reader(),
            &idx,
            &Platform::new("linux", "amd64", None),
        ))
        .expect("amd64");
        assert_eq!(
            (r.digest.as_str(), r.manifest_digest.as_str()),
            (idx.as_str(), amd.as_str())
        );
        assert_eq!(kiln_digest::sha256(&r.config), cfg2);
        let r = run(resolve(
            l.reader(),
            &arm,
            &Platform::new("linux", "amd64", None),
        ))
        .expect("a manifest is taken as it is");
        assert_eq!(r.manifest_digest, arm);
        let err = run(resolve(
            l.reader(),
            &idx,
            &Platform::new("linux", "s390x", None),
        ))
        .expect_err("no s390x");
        assert!(err.to_string().contains("no image for platform"), "{err}");
    }

    #[test]
    fn content_that_is_not_its_digest_is_refused() {
        let mut l = Layout(BTreeMap::new());
        let (d, _) = l.put(b"{}".to_vec());
        let wrong = kiln_digest::sha256(b"other");
        l.0.insert(wrong.clone(), b"{}".to_vec());
        let err = run(resolve(l.reader(), &wrong, &Platform::host())).expect_err("mismatch");
        assert!(err.to_string().contains("holds"), "{err}");
        let err = run(resolve(l.reader(), &d, &Platform::host())).expect_err("not an image");
        assert!(err.to_string().contains("neither"), "{err}");
        let err = run(resolve(
            l.reader(),
            "sha256:../../etc/passwd",
            &Platform::host(),
        ))
        .expect_err("bad digest");
        assert!(err.to_string().contains("not a sha256 digest"), "{err}");
    }

    #[test]
    fn references_parse_as_name_tag_and_digest() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("base@{d}")).expect("digest");
        assert_eq!(
            (r.name.as_str(), r.tag, r.digest),
            ("base", None, Some(d.clone()))
        );
        let r = Reference::parse(&format!("base:v1@{d}")).expect("both");
        assert_eq!((r.name.as_str(), r.tag.as_deref()), ("base", Some("v1")));
        let r = Reference::parse("my/base:v1").expect("tag");
        assert_eq!(
            (r.name.as_str(), r.tag.as_deref(), r.digest),
            ("my/base", Some("v1"), None)
        );
        for bad in [
            "",
            "Base@x",
            "base@sha256:1234",
            "../x",
            "a//b",
            "base:../x",
            ":v1",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?}");
        }
    }
}
