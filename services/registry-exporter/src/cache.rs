//! Build caches in registries (`--import-cache`/`--export-cache
//! type=registry`), in BuildKit's format: a manifest whose config is a
//! cache config (`application/vnd.buildkit.cacheconfig.v0`) and whose layers
//! are the results' blobs, or an index listing the blobs and the config
//! last (BuildKit before v0.21 wrote that form), or an image whose config
//! carries the cache inline (`moby.buildkit.cache.v0`).
//!
//! Reading one gives the cache config with every layer described (media
//! type, diffID, size), which is all the solver needs to match steps and
//! have a worker pull a result.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use kiln_oci::cache_config::{
    CACHE_CONFIG_MEDIA_TYPE, CacheConfig, CacheInput, CacheLayer, CacheRecord, CacheResult,
    INLINE_CACHE_KEY, LayerAnnotations, MAX_CACHE_CONFIG, zero_time,
};
use kiln_oci::{Descriptor, Index, Manifest, media_types};
use kiln_registry::Reference;

use crate::{Error, Exporter};

pub use kiln_oci::cache_config::{
    CREATED_AT_ANNOTATION as CREATED_AT, MOUNT_ID_ANNOTATION as MOUNT_ID,
    UNCOMPRESSED_ANNOTATION as UNCOMPRESSED,
};

/// The cache-mount layers among a cache manifest's descriptors.
fn mounts_of(descs: &[Descriptor]) -> Vec<Descriptor> {
    descs
        .iter()
        .filter(|d| {
            d.annotations.as_ref().is_some_and(|a| {
                a.contains_key(MOUNT_ID)
                    && a.get(UNCOMPRESSED)
                        .is_some_and(|u| kiln_oci::digest::hex_part(u).is_some())
            })
        })
        .cloned()
        .collect()
}

/// One record of a build's cache, as the solver hands it over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheNode {
    pub digest: String,
    /// per input: (selector, index of the node it may come from)
    pub inputs: Vec<Vec<(String, usize)>>,
    /// the worker ref whose layer chain is the result (empty: none)
    pub reference: String,
    /// unix nanoseconds
    pub created: i64,
}

/// A cache read from a registry.
#[derive(Clone, Debug)]
pub struct ResolvedCache {
    /// every layer annotated
    pub config: CacheConfig,
    /// the repository its blobs are pulled from
    pub repository: String,
    /// the cache-mount layers it carries
    pub mounts: Vec<Descriptor>,
}

impl Exporter {
    /// The cache at `reference` (any of the three forms), with the client's
    /// `credentials` for its registry when given.
    pub async fn resolve_cache(
        &self,
        reference: &str,
        credentials: Option<(String, String)>,
    ) -> Result<ResolvedCache, Error> {
        let r = parse_ref(reference)?;
        let registry = self.registry_as(&r, credentials);
        let (config, mounts) = read_cache(&registry, &r).await?;
        let mut repo = r.clone();
        repo.tag = None;
        repo.digest = None;
        Ok(ResolvedCache {
            config,
            repository: repo.to_string(),
            mounts,
        })
    }
}

pub(crate) fn parse_ref(reference: &str) -> Result<Reference, Error> {
    Reference::parse(reference).map_err(|source| Error::ParseReference {
        reference: reference.to_string(),
        source: Box::new(source),
    })
}

fn cache_err(reference: &Reference, reason: impl Into<String>) -> Error {
    Error::Cache {
        reference: reference.to_string(),
        reason: reason.into(),
    }
}

/// Reads and checks the cache config at `r`, every layer annotated from the
/// descriptors that list it.
pub(crate) async fn read_cache(
    registry: &kiln_registry::Client,
    r: &Reference,
) -> Result<(CacheConfig, Vec<Descriptor>), Error> {
    let fetch = |e| Error::ResolveImage {
        reference: r.to_string(),
        source: Box::new(e),
    };
    let (media_type, bytes) = registry.fetch_manifest(r).await.map_err(fetch)?;
    let (config_desc, layers, inline_diff_ids) = if media_types::is_index(&media_type) {
        let index: Index = serde_json::from_slice(&bytes)
            .map_err(|e| cache_err(r, format!("manifest index: {e}")))?;
        match index
            .manifests
            .iter()
            .rposition(|d| d.media_type == CACHE_CONFIG_MEDIA_TYPE)
        {
            Some(i) => {
                let mut layers = index.manifests.clone();
                let config = layers.remove(i);
                (config, layers, None)
            }
            None => {
                // an image index: the inline cache of this host's image
                let platform = crate::host_platform();
                let resolved = registry.resolve(r, &platform).await.map_err(fetch)?;
                let diff_ids = inline_diff_ids(&resolved.config);
                let c = inline(r, &resolved.config, &resolved.manifest.layers, diff_ids)?;
                return Ok((c, Vec::new()));
            }
        }
    } else {
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| cache_err(r, format!("manifest: {e}")))?;
        if m.config.media_type == CACHE_CONFIG_MEDIA_TYPE {
            (m.config.clone(), m.layers, None)
        } else {
            let config = registry
                .fetch_small_blob(r, &m.config.digest, MAX_CACHE_CONFIG)
                .await
                .map_err(fetch)?;
            let diff_ids = inline_diff_ids(&config);
            (m.config, m.layers, Some((config, diff_ids)))
        }
    };
    if let Some((config, diff_ids)) = inline_diff_ids {
        return Ok((inline(r, &config, &layers, diff_ids)?, Vec::new()));
    }
    if config_desc.size > MAX_CACHE_CONFIG as u64 {
        return Err(cache_err(r, "cache config too large"));
    }
    let bytes = registry
        .fetch_small_blob(r, &config_desc.digest, MAX_CACHE_CONFIG)
        .await
        .map_err(fetch)?;
    let mut config = CacheConfig::parse(&bytes).map_err(|e| cache_err(r, e.to_string()))?;
    annotate(&mut config, &layers, &HashMap::new());
    Ok((config, mounts_of(&layers)))
}

/// The cache in the client's content store `store` (`local:DIR`) whose
/// manifest (or index) is `digest`: a manifest or an index naming a cache
/// config, read through the client's session.
pub async fn read_local_cache(
    client: &impl crate::ClientSink,
    store: &str,
    digest: &str,
) -> Result<(CacheConfig, Vec<Descriptor>), Error> {
    let err = |reason: String| Error::Cache {
        reference: format!("{store}@{digest}"),
        reason,
    };
    let bytes = client.content_read(store, digest, 8 << 20).await?;
    if kiln_oci::digest::sha256(&bytes) != digest {
        return Err(err("the manifest does not match its digest".into()));
    }
    #[derive(serde::Deserialize)]
    struct Peek {
        #[serde(default)]
        manifests: Option<Vec<Descriptor>>,
        #[serde(default)]
        config: Option<Descriptor>,
        #[serde(default)]
        layers: Vec<Descriptor>,
    }
    let peek: Peek = serde_json::from_slice(&bytes).map_err(|e| err(format!("manifest: {e}")))?;
    let (config_desc, layers) = match (peek.manifests, peek.config) {
        (Some(mut all), _) => {
            let i = all
                .iter()
                .rposition(|d| d.media_type == CACHE_CONFIG_MEDIA_TYPE)
                .ok_or_else(|| err("an index without a cache config".into()))?;
            let config = all.remove(i);
            (config, all)
        }
        (None, Some(c)) if c.media_type == CACHE_CONFIG_MEDIA_TYPE => (c, peek.layers),
        _ => return Err(err("not a cache manifest".into())),
    };
    let bytes = client
        .content_read(store, &config_desc.digest, MAX_CACHE_CONFIG as u64)
        .await?;
    if kiln_oci::digest::sha256(&bytes) != config_desc.digest {
        return Err(err("the cache config does not match its digest".into()));
    }
    let mut config = CacheConfig::parse(&bytes).map_err(|e| err(e.to_string()))?;
    annotate(&mut config, &layers, &HashMap::new());
    Ok((config, mounts_of(&layers)))
}

fn inline_diff_ids(config: &[u8]) -> Vec<String> {
    serde_json::from_slice::<kiln_oci::ImageConfig>(config)
        .map(|c| c.rootfs.diff_ids)
        .unwrap_or_default()
}

/// The inline cache of an image: its config's `moby.buildkit.cache.v0`
/// (base64 of the cache's records, whose result layers are positions in
/// the image's layers; a whole cache config is read too), the layers
/// described by the manifest and the config's diffIDs.
fn inline(
    r: &Reference,
    config: &[u8],
    layers: &[Descriptor],
    diff_ids: Vec<String>,
) -> Result<CacheConfig, Error> {
    let v: serde_json::Value =
        serde_json::from_slice(config).map_err(|e| cache_err(r, format!("image config: {e}")))?;
    let Some(encoded) = v.get(INLINE_CACHE_KEY).and_then(|x| x.as_str()) else {
        return Err(cache_err(
            r,
            "neither a cache manifest nor an image with an inline cache",
        ));
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| cache_err(r, format!("inline cache: {e}")))?;
    let mut cache = if bytes.first() == Some(&b'[') {
        let records: Vec<CacheRecord> = serde_json::from_slice(&bytes)
            .map_err(|e| cache_err(r, format!("inline cache: {e}")))?;
        CacheConfig {
            layers: layers
                .iter()
                .enumerate()
                .map(|(i, d)| CacheLayer {
                    blob: d.digest.clone(),
                    parent_index: i as i64 - 1,
                    annotations: None,
                })
                .collect(),
            records,
        }
    } else {
        serde_json::from_slice(&bytes).map_err(|e| cache_err(r, format!("inline cache: {e}")))?
    };
    cache.check().map_err(|e| cache_err(r, e.to_string()))?;
    let by_blob: HashMap<String, String> = layers
        .iter()
        .zip(diff_ids)
        .map(|(d, id)| (d.digest.clone(), id))
        .collect();
    annotate(&mut cache, layers, &by_blob);
    Ok(cache)
}

/// The inline cache of an image whose layers are `image` (bottom first):
/// the records of `nodes`, each result whose layer chain the image starts
/// with given as its top layer's position (base64 of the records' JSON,
/// as image configs carry it). `None` when no result is in the image.
pub(crate) async fn inline_records(
    nodes: &[CacheNode],
    image: &[String],
    worker: &impl crate::WorkerFs,
    options: &kiln_oci::LayerOptions,
) -> Result<Option<String>, Error> {
    let mut records = Vec::with_capacity(nodes.len());
    let mut any = false;
    for n in nodes {
        let mut results = Vec::new();
        if !n.reference.is_empty() {
            let chain: Vec<String> = worker
                .layers(&n.reference, options)
                .await?
                .into_iter()
                .map(|l| l.descriptor.digest)
                .filter(|d| !d.is_empty())
                .collect();
            if !chain.is_empty() && image.starts_with(&chain) {
                results.push(CacheResult {
                    layer_index: chain.len() as i64 - 1,
                    created_at: kiln_oci::rfc3339(n.created / 1_000_000_000),
                });
                any = true;
            }
        }
        records.push(CacheRecord {
            results,
            digest: n.digest.clone(),
            inputs: n
                .inputs
                .iter()
                .map(|links| {
                    links
                        .iter()
                        .map(|(selector, node)| CacheInput {
                            selector: selector.clone(),
                            link_index: *node as i64,
                        })
                        .collect()
                })
                .collect(),
            ..Default::default()
        });
    }
    if !any {
        return Ok(None);
    }
    let json = serde_json::to_vec(&records).map_err(|source| Error::EncodeJson {
        what: "inline cache",
        source,
    })?;
    Ok(Some(base64::engine::general_purpose::STANDARD.encode(json)))
}

/// Describes every layer of `config` listed in `descs` (diffIDs from their
/// annotations, else `diff_ids`); a layer nothing describes stays bare and
/// its results are not used.
fn annotate(config: &mut CacheConfig, descs: &[Descriptor], diff_ids: &HashMap<String, String>) {
    let by_blob: HashMap<&str, &Descriptor> =
        descs.iter().map(|d| (d.digest.as_str(), d)).collect();
    for l in &mut config.layers {
        let Some(d) = by_blob.get(l.blob.as_str()) else {
            continue;
        };
        let ann = d.annotations.as_ref();
        let diff_id = ann
            .and_then(|a| a.get(UNCOMPRESSED))
            .or_else(|| diff_ids.get(&l.blob))
            .cloned();
        let Some(diff_id) = diff_id.filter(|x| kiln_oci::digest::hex_part(x).is_some()) else {
            continue;
        };
        let media_type =
            match media_types::is_manifest(&d.media_type) || media_types::is_index(&d.media_type) {
                true => continue,
                false => d.media_type.clone(),
            };
        l.annotations = Some(LayerAnnotations {
            media_type,
            diff_id,
            size: i64::try_from(d.size).unwrap_or(i64::MAX),
            created_at: ann
                .and_then(|a| a.get(CREATED_AT))
                .cloned()
                .unwrap_or_else(zero_time),
        });
    }
}

/// A layer's descriptor in a cache manifest: its blob with diffID and
/// creation time.
pub(crate) fn layer_descriptor(
    media_type: &str,
    digest: &str,
    size: u64,
    diff_id: &str,
    created_at: &str,
) -> Descriptor {
    Descriptor {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size,
        annotations: Some(BTreeMap::from([
            (CREATED_AT.to_string(), created_at.to_string()),
            (UNCOMPRESSED.to_string(), diff_id.to_string()),
        ])),
        ..Default::default()
    }
}
