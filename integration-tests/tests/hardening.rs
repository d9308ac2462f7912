//! What a crafted input must not do to the host: images pushed to the test
//! registry by the test itself, built from with a real kilnd.

use kiln_integration_tests::{BuildContext, Daemon, Topology, dockerfile_args, registry};
use std::path::Path;
use std::process::Command;

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string()
}

/// Writes `data` as a blob of the OCI layout at `dir`; returns (digest, size).
fn blob(dir: &Path, data: &[u8]) -> (String, usize) {
    let tmp = dir.join("blob.tmp");
    std::fs::write(&tmp, data).expect("write blob");
    let hex = sha256_of(&tmp);
    std::fs::rename(&tmp, dir.join("blobs/sha256").join(&hex)).expect("place blob");
    (format!("sha256:{hex}"), data.len())
}

/// Pushes a one-layer image whose config claims `diff_id` to the test registry
/// as `REGISTRY/NAME:1`; returns the reference.
fn push_image_claiming(diff_id: &str, name: &str) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let layout = dir.path().join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("mkdir");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("layout");
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).expect("mkdir");
    std::fs::write(files.join("hello"), "hi\n").expect("write");
    let layer = dir.path().join("layer.tar.gz");
    let st = Command::new("tar")
        .args(["-czf"])
        .arg(&layer)
        .arg("-C")
        .arg(&files)
        .arg("hello")
        .status()
        .expect("tar");
    assert!(st.success());
    let (layer_digest, layer_size) = blob(&layout, &std::fs::read(&layer).expect("layer"));
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let (config_digest, config_size) = blob(&layout, config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = blob(&layout, manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest_size,
                       "annotations": {"org.opencontainers.image.ref.name": "1"}}],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).expect("index");
    let reference = format!("{}/{name}:1", registry());
    let out = Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:1", layout.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "push the crafted image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    reference
}

#[test]
fn an_image_whose_diff_ids_are_paths_writes_nothing_outside_the_root() {
    let escape = tempfile::tempdir().expect("tmp");
    let target = escape.path().join("written-by-an-image");
    let evil = format!("sha256:../../../../../../../..{}", target.display());
    let image = push_image_claiming(&evil, "evil/diffid-path");
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let ctx = BuildContext::new(&format!("FROM {image}\nRUN cat /hello\n")).expect("context");
    let mut args = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    let out = d.kiln(ctx.path(), &args).expect("kiln");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a sha256 digest"), "{err}");
    assert!(
        !target.exists(),
        "the image wrote {} on the host",
        target.display()
    );
    // kilnd goes on serving
    let ok = d.kiln(ctx.path(), &["debug", "workers"]).expect("kiln");
    assert!(ok.status.success(), "{}", d.logs());
}
