//! Push/resolve/fetch against a real `docker-registry` (distribution) on loopback.

use std::path::Path;

use kiln_oci::{Descriptor, Index, Manifest, Platform, digest::sha256, media_types};
use kiln_registry::local_registry::LocalRegistry;
use kiln_registry::{Client, HostConfig, Reference, RegistryConfig};

struct Image {
    layer: Descriptor,
    layer_bytes: Vec<u8>,
    config: Vec<u8>,
    config_desc: Descriptor,
    manifest: Vec<u8>,
}

fn image(arch: &str, content: &[u8]) -> Image {
    let layer_bytes = content.to_vec();
    let layer = Descriptor {
        media_type: media_types::OCI_LAYER.into(),
        digest: sha256(&layer_bytes),
        size: layer_bytes.len() as u64,
        ..Default::default()
    };
    let config = format!(
        r#"{{"architecture":"{arch}","os":"linux","config":{{"Cmd":["sh"]}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        layer.digest
    )
    .into_bytes();
    let config_desc = Descriptor {
        media_type: media_types::OCI_CONFIG.into(),
        digest: sha256(&config),
        size: config.len() as u64,
        ..Default::default()
    };
    let manifest = serde_json::to_vec(&Manifest {
        schema_version: 2,
        media_type: Some(media_types::OCI_MANIFEST.into()),
        config: config_desc.clone(),
        layers: vec![layer.clone()],
        annotations: None,
    })
    .expect("manifest");
    Image {
        layer,
        layer_bytes,
        config,
        config_desc,
        manifest,
    }
}

async fn push(client: &Client, r: &Reference, img: &Image, dir: &Path) -> String {
    let layer_path = dir.join(img.layer.digest.replace(':', "-"));
    std::fs::write(&layer_path, &img.layer_bytes).expect("layer file");
    let config_path = dir.join(img.config_desc.digest.replace(':', "-"));
    std::fs::write(&config_path, &img.config).expect("config file");
    client
        .push_blob(r, &img.layer, &layer_path)
        .await
        .expect("push layer");
    client
        .push_blob(r, &img.config_desc, &config_path)
        .await
        .expect("push config");
    client
        .push_manifest(r, media_types::OCI_MANIFEST, img.manifest.clone())
        .await
        .expect("push manifest")
}

#[tokio::test]
async fn push_resolve_fetch_round_trip() {
    let Some(reg) = LocalRegistry::start().await else {
        return;
    };
    let work = tempfile::tempdir().expect("work");
    let client = Client::new(RegistryConfig::default()).expect("client");
    let r = Reference::parse(&format!("{}/kiln/test:v1", reg.addr)).expect("ref");
    let img = image("amd64", &b"layer bytes ".repeat(50_000));

    let digest = push(&client, &r, &img, work.path()).await;
    assert_eq!(digest, sha256(&img.manifest));
    assert!(
        client
            .blob_exists(&r, &img.layer.digest)
            .await
            .expect("head")
    );
    assert!(
        !client
            .blob_exists(&r, &sha256(b"nope"))
            .await
            .expect("head missing")
    );
    // pushing again skips existing blobs and succeeds
    push(&client, &r, &img, work.path()).await;

    let resolved = client
        .resolve(&r, &Platform::new("linux", "amd64", None))
        .await
        .expect("resolve");
    assert_eq!(resolved.manifest_digest, digest);
    assert_eq!(resolved.config, img.config);
    assert_eq!(resolved.manifest.layers, vec![img.layer.clone()]);
    assert_eq!(resolved.reference.digest.as_deref(), Some(digest.as_str()));

    // by digest too
    let pinned = Reference::parse(&format!("{}/kiln/test@{digest}", reg.addr)).expect("pinned");
    let again = client
        .resolve(&pinned, &Platform::new("linux", "amd64", None))
        .await
        .expect("by digest");
    assert_eq!(again.manifest_digest, digest);

    let dest = work.path().join("fetched");
    client
        .fetch_blob(&r, &img.layer, &dest)
        .await
        .expect("fetch");
    assert_eq!(std::fs::read(&dest).expect("read"), img.layer_bytes);

    // a wrong expected digest is refused and leaves no file
    let mut wrong = img.layer.clone();
    wrong.size += 1;
    let bad = work.path().join("bad");
    let err = client
        .fetch_blob(&r, &wrong, &bad)
        .await
        .expect_err("size mismatch");
    assert!(
        matches!(err, kiln_registry::Error::BlobMismatch { .. }),
        "{err}"
    );
    assert!(!bad.exists());
    assert!(!work.path().join("bad.tmp").exists());
}

#[tokio::test]
async fn index_is_resolved_to_the_platform_and_mirrors_are_tried_first() {
    let Some(reg) = LocalRegistry::start().await else {
        return;
    };
    let work = tempfile::tempdir().expect("work");
    let client = Client::new(RegistryConfig::default()).expect("client");
    let amd = image("amd64", b"amd64 layer");
    let arm = image("arm64", b"arm64 layer");
    let by_digest = |img: &Image| {
        Reference::parse(&format!(
            "{}/library/busybox@{}",
            reg.addr,
            sha256(&img.manifest)
        ))
        .expect("ref")
    };
    let amd_digest = push(&client, &by_digest(&amd), &amd, work.path()).await;
    let arm_digest = push(&client, &by_digest(&arm), &arm, work.path()).await;
    let entry = |digest: &str, img: &Image, arch: &str, variant: Option<&str>| Descriptor {
        media_type: media_types::OCI_MANIFEST.into(),
        digest: digest.to_string(),
        size: img.manifest.len() as u64,
        platform: Some(Platform::new("linux", arch, variant)),
        ..Default::default()
    };
    let index = serde_json::to_vec(&Index {
        schema_version: 2,
        media_type: Some(media_types::OCI_INDEX.into()),
        manifests: vec![
            entry(&amd_digest, &amd, "amd64", None),
            entry(&arm_digest, &arm, "arm64", Some("v8")),
        ],
        annotations: None,
    })
    .expect("index");
    let tagged = Reference::parse(&format!("{}/library/busybox:latest", reg.addr)).expect("ref");
    client
        .push_manifest(&tagged, media_types::OCI_INDEX, index)
        .await
        .expect("push index");

    let got = client
        .resolve(&tagged, &Platform::new("linux", "arm64", None))
        .await
        .expect("arm64");
    assert_eq!(got.manifest_digest, arm_digest);
    assert_eq!(got.config, arm.config);
    let err = client
        .resolve(&tagged, &Platform::new("linux", "s390x", None))
        .await
        .expect_err("no s390x");
    assert!(
        matches!(err, kiln_registry::Error::NoMatchingPlatform { .. }),
        "{err}"
    );

    // docker.io/library/busybox through a loopback mirror (docker.io itself is unreachable)
    let mut cfg = RegistryConfig::default();
    cfg.hosts.insert(
        "docker.io".into(),
        HostConfig {
            mirrors: vec![reg.addr.clone()],
            ..Default::default()
        },
    );
    let mirrored = Client::new(cfg).expect("client");
    let hub = Reference::parse("busybox").expect("busybox");
    let got = mirrored
        .resolve(&hub, &Platform::new("linux", "amd64", None))
        .await
        .expect("via mirror");
    assert_eq!(got.manifest_digest, amd_digest);
    assert_eq!(
        got.reference.to_string(),
        format!("docker.io/library/busybox:latest@{amd_digest}")
    );
    let dest = work.path().join("layer");
    mirrored
        .fetch_blob(&hub, &amd.layer, &dest)
        .await
        .expect("blob via mirror");
    assert_eq!(std::fs::read(&dest).expect("read"), b"amd64 layer");
}

#[tokio::test]
async fn large_blobs_go_up_in_streamed_chunks() {
    let Some(reg) = LocalRegistry::start().await else {
        return;
    };
    let work = tempfile::tempdir().expect("work");
    // 100 KiB chunks: a 250 KiB + 3 bytes layer takes three PATCHes
    let client = Client::new(RegistryConfig::default())
        .expect("client")
        .with_chunk_size(100 * 1024);
    let r = Reference::parse(&format!("{}/kiln/chunked:v1", reg.addr)).expect("ref");
    let content: Vec<u8> = (0..250 * 1024 + 3).map(|i| (i * 7 % 251) as u8).collect();
    let img = image("amd64", &content);
    let layer_path = work.path().join("layer");
    std::fs::write(&layer_path, &img.layer_bytes).expect("layer file");
    let outcome = client
        .push_blob(&r, &img.layer, &layer_path)
        .await
        .expect("push layer");
    assert_eq!(outcome, kiln_registry::PushOutcome::UploadedChunked);
    let dest = work.path().join("fetched");
    client
        .fetch_blob(&r, &img.layer, &dest)
        .await
        .expect("fetch");
    assert_eq!(std::fs::read(&dest).expect("read"), content);
    // a small blob is one PUT
    let small = work.path().join("config");
    std::fs::write(&small, &img.config).expect("config file");
    let outcome = client
        .push_blob(&r, &img.config_desc, &small)
        .await
        .expect("push config");
    assert_eq!(outcome, kiln_registry::PushOutcome::Uploaded);
}

/// A one-blob HTTP server that answers 503, then 429 (Retry-After: 0), then the blob;
/// returns its address and a counter of requests seen.
async fn flaky_server(blob: Vec<u8>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = vec![0u8; 8192];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let head = match n {
                0 => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n".to_string(),
                1 => "HTTP/1.1 429 Too Many Requests\r\nretry-after: 0\r\ncontent-length: 0\r\n"
                    .to_string(),
                _ => format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n",
                    blob.len()
                ),
            };
            let _ = sock
                .write_all(format!("{head}connection: close\r\n\r\n").as_bytes())
                .await;
            if n >= 2 {
                let _ = sock.write_all(&blob).await;
            }
            let _ = sock.shutdown().await;
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn pulls_retry_on_503_and_429() {
    let blob = b"a layer that arrives on the third try".to_vec();
    let (addr, seen) = flaky_server(blob.clone()).await;
    let client = Client::new(RegistryConfig::default()).expect("client");
    let r = Reference::parse(&format!("{addr}/kiln/flaky:v1")).expect("ref");
    let desc = Descriptor {
        media_type: media_types::OCI_LAYER.into(),
        digest: sha256(&blob),
        size: blob.len() as u64,
        ..Default::default()
    };
    let work = tempfile::tempdir().expect("work");
    let dest = work.path().join("blob");
    client
        .fetch_blob(&r, &desc, &dest)
        .await
        .expect("fetch after retries");
    assert_eq!(std::fs::read(&dest).expect("read"), blob);
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 3);
}
