//! The cache exporters: `cache/registry` (`--export-cache type=registry,ref=R`)
//! and `cache/local` (`type=local,dest=DIR`, written into the client's
//! directory through its session's content store). Both write the build's
//! cache records and their results' layers as a manifest whose config is the
//! cache config, or with `image-manifest=false` as an index listing the layers
//! and the config; a registry ref's records are merged with what it already
//! holds (so several writers of one ref keep each other's records). Only blobs
//! the target lacks are read from the worker and written.

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

/// Where a cache is written.
enum Target<'a, C> {
    Registry {
        registry: kiln_registry::Client,
        r: kiln_registry::Reference,
    },
    /// the client's content store `local:DIR`
    Local { client: &'a C, store: String },
}

impl<C: ClientSink> Target<'_, C> {
    fn name(&self) -> String {
        match self {
            Target::Registry { r, .. } => r.to_string(),
            Target::Local { store, .. } => store.clone(),
        }
    }

    fn write_err(&self, digest: &str, source: Box<dyn std::error::Error + Send + Sync>) -> Error {
        Error::CacheWrite {
            target: self.name(),
            digest: digest.to_string(),
            source,
        }
    }

    async fn has(&self, digest: &str) -> Result<bool, Error> {
        match self {
            Target::Registry { registry, r } => registry
                .blob_exists(r, digest)
                .await
                .map_err(|e| self.write_err(digest, Box::new(e))),
            Target::Local { client, store } => {
                Ok(client.content_size(store, digest).await?.is_some())
            }
        }
    }

    /// Writes blob `desc` from the file `path`.
    async fn put(&self, desc: &Descriptor, path: &std::path::Path) -> Result<(), Error> {
        match self {
            Target::Registry { registry, r } => registry
                .push_blob(r, desc, path)
                .await
                .map(|_| ())
                .map_err(|e| self.write_err(&desc.digest, Box::new(e))),
            Target::Local { client, store } => {
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(|source| Error::Io {
                        op: "open blob",
                        path: path.to_path_buf(),
                        source,
                    })?;
                client
                    .content_write(store, &desc.digest, desc.size, Box::new(file))
                    .await
                    .map(|_| ())
            }
        }
    }

    /// Writes the top manifest.
    async fn put_manifest(
        &self,
        media_type: &str,
        bytes: Vec<u8>,
        tmp: &std::path::Path,
    ) -> Result<(), Error> {
        match self {
            Target::Registry { registry, r } => registry
                .push_manifest(r, media_type, bytes)
                .await
                .map(|_| ())
                .map_err(|source| Error::PushManifest {
                    reference: r.to_string(),
                    source: Box::new(source),
                }),
            Target::Local { .. } => {
                let desc = Descriptor {
                    media_type: media_type.to_string(),
                    digest: kiln_oci::digest::sha256(&bytes),
                    size: bytes.len() as u64,
                    ..Default::default()
                };
                self.put_bytes(&desc, &bytes, &tmp.join("cache-manifest"))
                    .await
            }
        }
    }

    /// Writes blob `desc` (`bytes`) through the file `path`.
    async fn put_bytes(
        &self,
        desc: &Descriptor,
        bytes: &[u8],
        path: &std::path::Path,
    ) -> Result<(), Error> {
        tokio::fs::write(path, bytes)
            .await
            .map_err(|source| Error::Io {
                op: "write cache blob",
                path: path.to_path_buf(),
                source,
            })?;
        self.put(desc, path).await
    }

    /// Copies layer `d` from the worker (through `tmp`) unless the target has
    /// it, saying `what` first; whether it was written.
    async fn copy_from_worker<W: WorkerFs>(
        &self,
        worker: &W,
        d: &Descriptor,
        tmp: &std::path::Path,
        say: impl Fn(),
    ) -> Result<bool, Error> {
        if self.has(&d.digest).await? {
            return Ok(false);
        }
        say();
        assemble::fetch_layer(worker, d, tmp).await?;
        let path = tmp.join(d.digest.trim_start_matches("sha256:"));
        self.put(d, &path).await?;
        let _ = tokio::fs::remove_file(&path).await;
        Ok(true)
    }
}

pub(super) async fn export<W: WorkerFs, C: ClientSink>(
    job: &Job<'_, W, C>,
) -> Result<BTreeMap<String, String>, Error> {
    let attrs = &job.req.attrs;
    let required = |key: &str| {
        attrs
            .get(key)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| Error::InvalidAttr {
                key: key.into(),
                value: String::new(),
            })
    };
    let target = if job.req.kind == "cache/local" {
        let dest = required("dest")?;
        Target::Local {
            client: job.client,
            store: format!("{}{dest}", kiln_session::content::LOCAL_PREFIX),
        }
    } else {
        let reference = required("ref")?;
        let insecure = bool_attr(attrs, "registry.insecure", false);
        Target::Registry {
            registry: push_client(job, std::slice::from_ref(reference), insecure).await?,
            r: parse_ref(reference)?,
        }
    };
    let reference = target.name();
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
    let existing = match &target {
        Target::Registry { registry, r } => read_cache(registry, r).await.map(|(c, _)| c),
        Target::Local { .. } => Err(Error::Cache {
            reference: reference.clone(),
            reason: "a client directory is written whole".into(),
        }),
    };
    match existing {
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
    // each blob once: one blob may sit in several chains (on other parents),
    // and two copies of it at once would share (and remove) one temp file
    let mut seen = std::collections::HashSet::new();
    let ours_blobs: Vec<Descriptor> = ours
        .layers
        .iter()
        .filter(|l| seen.insert(l.blob.as_str()))
        .filter_map(|l| blobs.get(&l.blob).cloned())
        .collect();
    let total = ours_blobs.len();
    let target = &target;
    let uploads: Vec<_> = ours_blobs
        .iter()
        .map(|d| async move {
            let say = || {
                let _ = job.progress.try_send(format!("writing layer {}", d.digest));
            };
            target.copy_from_worker(job.worker, d, job.tmp, say).await
        })
        .collect();
    let outcomes: Vec<bool> = stream::iter(uploads)
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let uploaded = outcomes.iter().filter(|x| **x).count();

    // cache mounts (`cache-mounts=true`): a layer each, named by its id, which
    // the cache config does not name (BuildKit passes such layers over)
    let mut mount_layers = Vec::new();
    for (id, r) in &job.req.cache_mounts {
        let chain = job.worker.layers(r, options).await?;
        let Some(l) = chain
            .into_iter()
            .rev()
            .find(|l| !l.descriptor.digest.is_empty())
        else {
            continue; // an empty cache mount
        };
        let created = kiln_oci::rfc3339(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        );
        let mut d = layer_descriptor(
            &media.layer(&l.descriptor.media_type),
            &l.descriptor.digest,
            l.descriptor.size,
            &l.diff_id,
            &created,
        );
        if let Some(a) = d.annotations.as_mut() {
            a.insert(crate::cache::MOUNT_ID.to_string(), id.clone());
        }
        let announce = || say(format!("writing cache mount {id} {}", d.digest));
        target
            .copy_from_worker(job.worker, &d, job.tmp, announce)
            .await?;
        mount_layers.push(d);
    }

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
    target
        .put_bytes(&config_desc, &config_bytes, &job.tmp.join("cache-config"))
        .await?;
    let mut layers: Vec<Descriptor> = config
        .layers
        .iter()
        .filter_map(|l| blobs.get(&l.blob).cloned())
        .collect();
    layers.dedup_by(|a, b| a.digest == b.digest);
    layers.extend(mount_layers);
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
    let manifest_desc = Descriptor {
        media_type: media_type.to_string(),
        digest: kiln_oci::digest::sha256(&manifest),
        size: manifest.len() as u64,
        ..Default::default()
    };
    let digest = manifest_desc.digest.clone();
    say(format!("writing cache manifest {digest}"));
    target.put_manifest(media_type, manifest, job.tmp).await?;
    say(format!(
        "cache exported to {reference}: {} records, {} layers ({uploaded} of {total} uploaded)",
        config.records.len(),
        config.layers.len()
    ));
    // the client tags it in a local directory's index.json
    let desc = serde_json::to_string(&manifest_desc).map_err(|source| Error::EncodeJson {
        what: "cache manifest descriptor",
        source,
    })?;
    Ok(BTreeMap::from([("cache.manifest".to_string(), desc)]))
}
