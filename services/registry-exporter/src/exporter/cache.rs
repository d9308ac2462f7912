//! The `cache/registry` exporter (`--export-cache type=registry,ref=R`): the
//! build's cache records and their results' layers, merged with what the
//! ref already holds (so several writers of one ref keep each other's
//! records), pushed as a manifest whose config is the cache config, or with
//! `image-manifest=false` as an index listing the layers and the config.
//! Only blobs the registry lacks are read from the worker and uploaded.

use std::collections::BTreeMap;

use futures::stream::{self, StreamExt as _, TryStreamExt as _};
use kiln_oci::cache_config::{
    Builder, CACHE_CONFIG_MEDIA_TYPE, CacheInput, CacheResult, LayerAnnotations,
};
use kiln_oci::{Descriptor, Index, Manifest, bool_attr, media_types};

use super::Job;
use super::image::push_client;
use crate::assemble::{self, MediaTypes};
use crate::cache::{layer_descriptor, parse_ref, read_cache};
use crate::{ClientSink, Error, WorkerFs};

/// Blobs read and pushed at once.
const CONCURRENCY: usize = 4;

pub(super) async fn export<W: WorkerFs, C: ClientSink>(
    job: &Job<'_, W, C>,
) -> Result<BTreeMap<String, String>, Error> {
    let attrs = &job.req.attrs;
    let reference =
        attrs
            .get("ref")
            .filter(|r| !r.is_empty())
            .ok_or_else(|| Error::InvalidAttr {
                key: "ref".into(),
                value: String::new(),
            })?;
    let r = parse_ref(reference)?;
    let insecure = bool_attr(attrs, "registry.insecure", false);
    let registry = push_client(job, std::slice::from_ref(reference), insecure).await?;
    let options = assemble::layer_options(attrs)?;
    let media = assemble::media_types_of(attrs);
    let say = |s: String| {
        let _ = job.progress.try_send(s);
    };
    say("preparing build cache for export".into());

    // each result's layer chain, each layer once
    let mut b = Builder::default();
    let mut blobs: BTreeMap<String, Descriptor> = BTreeMap::new();
    let options = &options;
    let reads: Vec<_> = job
        .req
        .cache
        .iter()
        .map(|n| async move {
            if n.reference.is_empty() {
                return Ok(Vec::new());
            }
            job.worker.layers(&n.reference, options).await
        })
        .collect();
    let chains = stream::iter(reads)
        .buffered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    let mut records: Vec<usize> = Vec::with_capacity(job.req.cache.len());
    for (n, chain) in job.req.cache.iter().zip(chains) {
        let created = kiln_oci::rfc3339(n.created / 1_000_000_000);
        let mut top = -1;
        for l in chain.iter().filter(|l| !l.descriptor.digest.is_empty()) {
            let media_type = media.layer(&l.descriptor.media_type);
            let ann = LayerAnnotations {
                media_type: media_type.clone(),
                diff_id: l.diff_id.clone(),
                size: i64::try_from(l.descriptor.size).unwrap_or(i64::MAX),
                created_at: created.clone(),
            };
            top = b.layer(&l.descriptor.digest, top, Some(ann));
            blobs.entry(l.descriptor.digest.clone()).or_insert_with(|| {
                layer_descriptor(
                    &media_type,
                    &l.descriptor.digest,
                    l.descriptor.size,
                    &l.diff_id,
                    &created,
                )
            });
        }
        let inputs = n
            .inputs
            .iter()
            .map(|links| {
                links
                    .iter()
                    .filter_map(|(selector, node)| {
                        Some(CacheInput {
                            selector: selector.clone(),
                            link_index: *records.get(*node)? as i64,
                        })
                    })
                    .collect()
            })
            .collect();
        let results = if top >= 0 {
            vec![CacheResult {
                layer_index: top,
                created_at: created,
            }]
        } else {
            Vec::new()
        };
        records.push(b.record(&n.digest, inputs, results));
    }
    let ours = b.finish();

    // what the ref holds already stays (its blobs are there)
    let mut merged = Builder::default();
    match read_cache(&registry, &r).await {
        Ok(existing) => {
            say(format!(
                "merging with the {} records at {reference}",
                existing.records.len()
            ));
            for l in &existing.layers {
                if let Some(a) = &l.annotations
                    && !blobs.contains_key(&l.blob)
                {
                    let size = u64::try_from(a.size).unwrap_or(0);
                    let d =
                        layer_descriptor(&a.media_type, &l.blob, size, &a.diff_id, &a.created_at);
                    blobs.insert(l.blob.clone(), d);
                }
            }
            merged.merge(&existing);
        }
        Err(e) => {
            tracing::debug!(reference, error = %kiln_proto::status::Chain(&e), "no cache to merge with")
        }
    }
    merged.merge(&ours);
    let config = merged.finish();

    // upload the layers the registry lacks
    let ours_blobs: Vec<Descriptor> = ours
        .layers
        .iter()
        .filter_map(|l| blobs.get(&l.blob).cloned())
        .collect();
    let total = ours_blobs.len();
    let uploads: Vec<_> = ours_blobs
        .iter()
        .map(|d| {
            let (registry, r) = (registry.clone(), r.clone());
            async move {
                let push_err = |source| Error::PushBlob {
                    reference: r.to_string(),
                    digest: d.digest.clone(),
                    source: Box::new(source),
                };
                if registry
                    .blob_exists(&r, &d.digest)
                    .await
                    .map_err(push_err)?
                {
                    return Ok(false);
                }
                let _ = job.progress.try_send(format!("writing layer {}", d.digest));
                assemble::fetch_layer(job.worker, d, job.tmp).await?;
                let path = job.tmp.join(d.digest.trim_start_matches("sha256:"));
                registry.push_blob(&r, d, &path).await.map_err(push_err)?;
                let _ = tokio::fs::remove_file(&path).await;
                Ok::<bool, Error>(true)
            }
        })
        .collect();
    let outcomes: Vec<bool> = stream::iter(uploads)
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let uploaded = outcomes.iter().filter(|x| **x).count();

    // the config, then the manifest naming it
    let config_bytes = serde_json::to_vec(&config).map_err(|source| Error::EncodeJson {
        what: "cache config",
        source,
    })?;
    let config_desc = Descriptor {
        media_type: CACHE_CONFIG_MEDIA_TYPE.into(),
        digest: kiln_oci::digest::sha256(&config_bytes),
        size: config_bytes.len() as u64,
        ..Default::default()
    };
    say(format!("writing config {}", config_desc.digest));
    let config_path = job.tmp.join("cache-config");
    tokio::fs::write(&config_path, &config_bytes)
        .await
        .map_err(|source| Error::Io {
            op: "write cache config",
            path: config_path.clone(),
            source,
        })?;
    registry
        .push_blob(&r, &config_desc, &config_path)
        .await
        .map_err(|source| Error::PushBlob {
            reference: r.to_string(),
            digest: config_desc.digest.clone(),
            source: Box::new(source),
        })?;
    let mut layers: Vec<Descriptor> = config
        .layers
        .iter()
        .filter_map(|l| blobs.get(&l.blob).cloned())
        .collect();
    layers.dedup_by(|a, b| a.digest == b.digest);
    let (media_type, manifest) = if bool_attr(&job.req.attrs, "image-manifest", true) {
        let mt = match media {
            MediaTypes::Oci => media_types::OCI_MANIFEST,
            MediaTypes::Docker => media_types::DOCKER_MANIFEST,
        };
        let m = Manifest {
            schema_version: 2,
            media_type: Some(mt.into()),
            config: config_desc,
            layers,
            annotations: None,
        };
        (mt, serde_json::to_vec(&m))
    } else {
        let mt = match media {
            MediaTypes::Oci => media_types::OCI_INDEX,
            MediaTypes::Docker => media_types::DOCKER_MANIFEST_LIST,
        };
        layers.push(config_desc);
        let i = Index {
            schema_version: 2,
            media_type: Some(mt.into()),
            manifests: layers,
            annotations: None,
        };
        (mt, serde_json::to_vec(&i))
    };
    let manifest = manifest.map_err(|source| Error::EncodeJson {
        what: "cache manifest",
        source,
    })?;
    let digest = kiln_oci::digest::sha256(&manifest);
    say(format!("writing cache manifest {digest}"));
    registry
        .push_manifest(&r, media_type, manifest)
        .await
        .map_err(|source| Error::PushManifest {
            reference: r.to_string(),
            source: Box::new(source),
        })?;
    say(format!(
        "cache exported to {reference}: {} records, {} layers ({uploaded} of {total} uploaded)",
        config.records.len(),
        config.layers.len()
    ));
    Ok(BTreeMap::from([("cache.digest".to_string(), digest)]))
}
