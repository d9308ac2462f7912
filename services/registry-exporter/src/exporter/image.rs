//! The `image` exporter: the assembled image (or multi-platform index) named in the
//! exporter response and, with `push=true`, pushed to every name, with the client's
//! registry credentials from its session.

use std::collections::BTreeMap;

use kiln_oci::bool_attr;
use kiln_registry::Reference;
use tokio::sync::mpsc;

use super::{Assembled, Job};
use crate::assemble::AssembledImage;
use crate::{ClientSink, Error, WorkerFs};

/// How long a push waits for the client session to answer a credentials request.
const CREDENTIALS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub(super) async fn export<W: WorkerFs, C: ClientSink>(
    job: &Job<'_, W, C>,
) -> Result<BTreeMap<String, String>, Error> {
    let push = bool_attr(&job.req.attrs, "push", false);
    // a push copies each layer from the worker as it uploads the ones before (push_blobs)
    let assembled = job.assemble().await?;
    let mut response = assembled.response();
    let names = job.names();
    let by_digest = bool_attr(&job.req.attrs, "push-by-digest", false);
    if !names.is_empty() {
        let shown: Vec<String> = if by_digest {
            names
                .iter()
                .map(|n| digest_name(n, assembled.digest()))
                .collect()
        } else {
            names.clone()
        };
        response.insert("image.name".into(), shown.join(","));
    }
    if push {
        let insecure = bool_attr(&job.req.attrs, "registry.insecure", false);
        let registry = push_client(job, &names, insecure).await?;
        let dest = Dest {
            names: &names,
            mount_from: mount_sources(&job.req.attrs),
            by_digest,
            remote: job
                .req
                .remote
                .as_ref()
                .and_then(|rl| kiln_registry::Reference::parse(&rl.repository).ok()),
        };
        let pushed = self::push(&registry, job.worker, &dest, &assembled, job.progress).await?;
        let _ = job.progress.try_send(format!(
            "pushed {} names: {} blobs uploaded, {} already present, {} mounted",
            names.len(),
            pushed.uploaded,
            pushed.existed,
            pushed.mounted
        ));
    }
    Ok(response)
}

impl Assembled {
    /// The digest of the top manifest (the image's or the index's).
    fn digest(&self) -> &str {
        match self {
            Assembled::Image(i) => &i.manifest_desc.digest,
            Assembled::Index(i) => &i.desc.digest,
        }
    }
}

/// The registry client for a push to `names`: with the client's session credentials for
/// each registry host and, with `insecure`, TLS verification off for those hosts.
pub(super) async fn push_client<W: WorkerFs, C: ClientSink>(
    job: &Job<'_, W, C>,
    names: &[String],
    insecure: bool,
) -> Result<kiln_registry::Client, Error> {
    let mut hosts: Vec<String> = Vec::new();
    for n in names {
        let r = Reference::parse(n).map_err(|source| Error::ParseReference {
            reference: n.clone(),
            source: Box::new(source),
        })?;
        if !hosts.contains(&r.registry) {
            hosts.push(r.registry);
        }
    }
    let mut creds = BTreeMap::new();
    let mut registry = job.exporter.registry().clone();
    for host in &hosts {
        let asked = tokio::time::timeout(CREDENTIALS_TIMEOUT, job.client.credentials(host)).await;
        match asked {
            Ok(Some(c)) => {
                creds.insert(host.clone(), c);
            }
            Ok(None) => {}
            Err(_) => tracing::warn!(host, "session did not answer the credentials request"),
        }
        if insecure {
            registry = registry.with_insecure_host(host);
        }
    }
    if !creds.is_empty() {
        let creds = std::sync::Arc::new(creds);
        registry =
            registry.with_credentials(std::sync::Arc::new(move |h: &str| creds.get(h).cloned()));
    }
    Ok(registry)
}

/// `name` without its tag, pinned to `digest` (`push-by-digest`).
fn digest_name(name: &str, digest: &str) -> String {
    match kiln_registry::Reference::parse(name) {
        Ok(mut r) => {
            r.tag = None;
            r.digest = Some(digest.to_string());
            r.to_string()
        }
        Err(_) => format!("{name}@{digest}"),
    }
}

/// Blob counts of a push.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pushed {
    pub uploaded: usize,
    pub existed: usize,
    pub mounted: usize,
}

/// Blobs pushed at once.
const PUSH_CONCURRENCY: usize = 4;

/// The exporter attr naming repositories (comma-separated) that may hold the
/// image's layers already: the build's imported caches, mounted from when
/// they are on the push's registry.
pub const MOUNT_FROM_ATTR: &str = "kiln.mount-from";

/// Where a push goes.
struct Dest<'a> {
    names: &'a [String],
    /// repositories blobs may be mounted from (besides names pushed before)
    mount_from: Vec<kiln_registry::Reference>,
    /// only by digest (`push-by-digest`)
    by_digest: bool,
    /// where the layers of an imported result are (none on this machine)
    remote: Option<kiln_registry::Reference>,
}

fn mount_sources(attrs: &BTreeMap<String, String>) -> Vec<kiln_registry::Reference> {
    attrs
        .get(MOUNT_FROM_ATTR)
        .map(|v| {
            v.split(',')
                .filter_map(|r| kiln_registry::Reference::parse(r.trim()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Push to every name: blobs (HEAD first, then a mount from a repository pushed before on
/// the same registry or from an imported cache there, then an upload; up to `PUSH_CONCURRENCY` at once), an index's
/// per-platform manifests by digest, then the top manifest under the tag, or only by digest
/// with `by_digest`.
async fn push(
    registry: &kiln_registry::Client,
    worker: &impl WorkerFs,
    dest: &Dest<'_>,
    what: &Assembled,
    progress: &mpsc::Sender<String>,
) -> Result<Pushed, Error> {
    match what {
        Assembled::Image(image) => {
            let top = (image.manifest_desc.media_type.as_str(), &image.manifest);
            let images = std::slice::from_ref(image.as_ref());
            push_to_names(registry, worker, dest, images, false, top, progress).await
        }
        Assembled::Index(index) => {
            let top = (index.desc.media_type.as_str(), &index.index);
            push_to_names(registry, worker, dest, &index.images, true, top, progress).await
        }
    }
}

/// Push `images` to every name, then the `top` manifest (media type, bytes) under the tag,
/// or only by digest with `by_digest`. With `children`, each image's own manifest is pushed
/// by digest first (the images of an index).
async fn push_to_names(
    registry: &kiln_registry::Client,
    worker: &impl WorkerFs,
    dest: &Dest<'_>,
    images: &[AssembledImage],
    children: bool,
    (top_type, top): (&str, &Vec<u8>),
    progress: &mpsc::Sender<String>,
) -> Result<Pushed, Error> {
    let (names, by_digest) = (dest.names, dest.by_digest);
    let push_manifest = |r: kiln_registry::Reference, media_type: String, bytes: Vec<u8>| {
        let registry = registry.clone();
        async move {
            registry
                .push_manifest(&r, &media_type, bytes)
                .await
                .map_err(|source| Error::PushManifest {
                    reference: r.to_string(),
                    source: Box::new(source),
                })
        }
    };
    // names pushed before come last, so they are tried first
    let mut done: Vec<kiln_registry::Reference> = dest.mount_from.clone();
    let mut counts = Pushed::default();
    for name in names {
        let mut r =
            kiln_registry::Reference::parse(name).map_err(|source| Error::ParseReference {
                reference: name.to_string(),
                source: Box::new(source),
            })?;
        if by_digest {
            r.tag = None;
        }
        r.digest = None;
        let _ = progress.try_send(format!("pushing {r}"));
        let from = done
            .iter()
            .rev()
            .find(|d| d.registry == r.registry && d.repository != r.repository)
            .cloned();
        let mut pinned = r.clone();
        pinned.tag = None;
        for image in images {
            let remote = dest.remote.as_ref();
            push_blobs(
                registry,
                worker,
                &r,
                image,
                from.as_ref(),
                remote,
                &mut counts,
            )
            .await?;
            if children {
                let media_type = image.manifest_desc.media_type.clone();
                push_manifest(pinned.clone(), media_type, image.manifest.clone()).await?;
            }
        }
        push_manifest(r.clone(), top_type.to_string(), top.clone()).await?;
        done.push(r);
    }
    Ok(counts)
}

/// Push an image's layers and config to `r` (HEAD, mount from `from`, upload; up to
/// `PUSH_CONCURRENCY` at once), counting what happened. Layers not yet copied from the
/// worker are copied one after the other, in order, while the ones before upload.
async fn push_blobs(
    registry: &kiln_registry::Client,
    worker: &impl WorkerFs,
    r: &kiln_registry::Reference,
    image: &AssembledImage,
    from: Option<&kiln_registry::Reference>,
    remote: Option<&kiln_registry::Reference>,
    counts: &mut Pushed,
) -> Result<(), Error> {
    use futures::stream::{self, StreamExt as _, TryStreamExt as _};
    use kiln_registry::PushOutcome;
    // the layers to copy from the worker first: each job waits for its copy
    let mut copies: Vec<(kiln_oci::Descriptor, Vec<tokio::sync::oneshot::Sender<()>>)> = Vec::new();
    let mut ready: std::collections::HashMap<String, Vec<_>> = Default::default();
    for desc in &image.layers {
        if remote.is_some() || image.blob_path(&desc.digest).exists() {
            continue;
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        ready.entry(desc.digest.clone()).or_default().push(rx);
        match copies.iter_mut().find(|(d, _)| d.digest == desc.digest) {
            Some((_, txs)) => txs.push(tx),
            None => copies.push((desc.clone(), vec![tx])),
        }
    }
    let dir = image.blob_dir.clone();
    let copy_all = async move {
        for (desc, txs) in copies {
            crate::assemble::fetch_layer(worker, &desc, &dir).await?;
            for tx in txs {
                let _ = tx.send(());
            }
        }
        Ok::<(), Error>(())
    };
    // owned futures: the export task must stay Send for any lifetime
    let jobs: Vec<_> = image
        .layers
        .iter()
        .chain(std::iter::once(&image.config_desc))
        .map(|desc| {
            let (registry, r, from) = (registry.clone(), r.clone(), from.cloned());
            let remote = remote.cloned();
            let (desc, path) = (desc.clone(), image.blob_path(&desc.digest));
            let copied = ready.get_mut(&desc.digest).and_then(Vec::pop);
            async move {
                if let Some(copied) = copied {
                    // the copy failed when its sender is gone: copy_all returns why
                    copied.await.map_err(|_| Error::Io {
                        op: "copy layer from the worker",
                        path: path.clone(),
                        source: std::io::Error::other("the copy stopped"),
                    })?;
                }
                let err = |source| Error::PushBlob {
                    reference: r.to_string(),
                    digest: desc.digest.clone(),
                    source: Box::new(source),
                };
                if let Some(remote) = remote.as_ref().filter(|_| !path.exists()) {
                    // a layer of an imported result, still in its registry:
                    // there already, mounted from there, or copied through here
                    if registry.blob_exists(&r, &desc.digest).await.map_err(err)? {
                        return Ok(PushOutcome::Exists);
                    }
                    if registry
                        .mount_blob(&r, &desc.digest, remote)
                        .await
                        .map_err(err)?
                    {
                        return Ok(PushOutcome::Mounted);
                    }
                    registry
                        .fetch_blob(remote, &desc, &path)
                        .await
                        .map_err(err)?;
                }
                registry
                    .push_blob_from(&r, &desc, &path, from.as_ref())
                    .await
                    .map_err(err)
            }
        })
        .collect();
    let uploads = stream::iter(jobs)
        .buffer_unordered(PUSH_CONCURRENCY)
        .try_collect::<Vec<PushOutcome>>();
    let ((), outcomes) = futures::future::try_join(copy_all, uploads).await?;
    for o in outcomes {
        match o {
            PushOutcome::Exists => counts.existed += 1,
            PushOutcome::Mounted => counts.mounted += 1,
            PushOutcome::Uploaded | PushOutcome::UploadedChunked => counts.uploaded += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_by_digest_names_drop_the_tag() {
        assert_eq!(
            digest_name("127.0.0.1:5000/a/b:v1", "sha256:abc"),
            "127.0.0.1:5000/a/b@sha256:abc"
        );
    }
}
