//! Multi-platform builds end to end: `--opt platform=linux/amd64,linux/arm64` solves the
//! Dockerfile once per platform and the exporters write an image index (pushed, and as an
//! OCI tarball), a manifest list with docker media types, and one directory per platform
//! for local and tar outputs. Checked with skopeo and umoci; a later `FROM` of the pushed
//! index picks the requested platform.

use anyhow::{Context, Result, bail};
use kiln_integration_tests::{
    BuildContext, Daemon, Topology, dockerfile_args, registry, run, tar_names,
};
use std::path::Path;
use std::process::Command;

/// Runs only build-platform steps, so no foreign-architecture RUN is needed.
const DOCKERFILE: &str = "FROM --platform=$BUILDPLATFORM busybox AS b\n\
ARG TARGETPLATFORM\n\
ARG TARGETARCH\n\
ARG BUILDPLATFORM\n\
RUN echo \"$TARGETPLATFORM $TARGETARCH built on $BUILDPLATFORM\" > /p\n\
FROM scratch\n\
COPY --from=b /p /p\n";

const PLATFORMS: &str = "platform=linux/amd64,linux/arm64";

fn build(d: &Daemon, ctx: &Path, extra: &[&str]) -> Result<()> {
    let mut args: Vec<&str> = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    args.extend(["--opt", PLATFORMS]);
    args.extend(extra);
    let out = d.kiln(ctx, &args)?;
    if !out.status.success() {
        bail!(
            "kiln build failed: {}\n--- kilnd ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.logs()
        );
    }
    Ok(())
}

fn host_arch() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "amd64"
    }
}

fn skopeo_raw(target: &str) -> Result<serde_json::Value> {
    let out = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(target))?;
    Ok(serde_json::from_str(&out)?)
}

/// The `/p` of the image for `arch` in `target`, copied out with skopeo.
fn p_of(target: &str, arch: &str, dir: &Path) -> Result<String> {
    let dest = dir.join(format!("copy-{arch}"));
    run(Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", "--override-arch", arch])
        .arg(target)
        .arg(format!("oci:{}:x", dest.display())))?;
    let bundle = dir.join(format!("bundle-{arch}"));
    run(Command::new("umoci")
        .args(["raw", "unpack", "--rootless", "--image"])
        .arg(format!("{}:x", dest.display()))
        .arg(&bundle))?;
    std::fs::read_to_string(bundle.join("p")).with_context(|| format!("/p of {arch}"))
}

fn check_index(index: &serde_json::Value, media_type: &str) -> Result<()> {
    assert_eq!(index["mediaType"], media_type, "{index}");
    let archs: Vec<&str> = index["manifests"]
        .as_array()
        .context("manifests")?
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(archs, vec!["amd64", "arm64"], "{index}");
    for m in index["manifests"].as_array().context("manifests")? {
        assert_eq!(m["platform"]["os"], "linux");
    }
    Ok(())
}

#[test]
fn multi_platform_index_pushed_and_as_oci_tarball() -> Result<()> {
    let d = Daemon::start(Topology::AllInOne)?;
    let ctx = BuildContext::new(DOCKERFILE)?;
    let dir = ctx.path();
    let host = format!("linux/{}", host_arch());
    let reg = registry();
    let name = format!("{reg}/kiln/multi:v1");

    build(
        &d,
        dir,
        &[
            "--output",
            &format!("type=image,name={name},push=true"),
            "--output",
            "type=oci,dest=multi.tar",
            "--metadata-file",
            "meta.json",
        ],
    )?;
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("meta.json"))?)?;

    // pushed: an OCI index with one manifest per platform
    let target = format!("docker://{name}");
    let index = skopeo_raw(&target)?;
    check_index(&index, "application/vnd.oci.image.index.v1+json")?;
    for arch in ["amd64", "arm64"] {
        let p = p_of(&target, arch, dir)?;
        assert_eq!(
            p.trim(),
            format!("linux/{arch} {arch} built on {host}"),
            "TARGETPLATFORM per platform, BUILDPLATFORM the host"
        );
    }
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(&target))?;
    let raw_path = dir.join("index.raw");
    std::fs::write(&raw_path, raw.as_bytes())?;
    let sum = run(Command::new("sha256sum").arg(&raw_path))?;
    let index_digest = format!("sha256:{}", sum.split_whitespace().next().unwrap_or(""));
    assert_eq!(meta["containerimage.digest"], index_digest.as_str());

    // the OCI tarball: index.json -> the same index
    let tar = dir.join("multi.tar");
    let index = skopeo_raw(&format!("oci-archive:{}", tar.display()))?;
    check_index(&index, "application/vnd.oci.image.index.v1+json")?;
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout)?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&layout))?;
    let arm = p_of(&format!("oci:{}", layout.display()), "arm64", dir)?;
    assert!(arm.starts_with("linux/arm64 arm64"), "{arm}");

    // a FROM of the pushed index picks the requested platform (not the host's)
    let ctx3 = BuildContext::new(&format!("FROM --platform=linux/arm64 {name}\n"))?;
    let out3 = ctx3.path().join("out");
    let dest3 = format!("type=local,dest={}", out3.display());
    let mut args3: Vec<&str> = vec!["build", "--progress", "plain"];
    args3.extend(dockerfile_args());
    args3.extend(["--output", &dest3]);
    let o = d.kiln(ctx3.path(), &args3)?;
    if !o.status.success() {
        bail!(
            "FROM the index failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let p = std::fs::read_to_string(out3.join("p"))?;
    assert!(p.starts_with("linux/arm64 arm64"), "{p}");
    Ok(())
}

#[test]
fn multi_platform_manifest_list_local_and_tar_outputs() -> Result<()> {
    let d = Daemon::start(Topology::AllInOne)?;
    let ctx = BuildContext::new(DOCKERFILE)?;
    let dir = ctx.path();
    let reg = registry();
    let name = format!("{reg}/kiln/multi-docker:v1");
    build(
        &d,
        dir,
        &[
            "--output",
            &format!("type=image,name={name},push=true,oci-mediatypes=false"),
            "--output",
            "type=local,dest=out",
            "--output",
            "type=tar,dest=fs.tar",
        ],
    )?;
    let index = skopeo_raw(&format!("docker://{name}"))?;
    check_index(
        &index,
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )?;
    for arch in ["amd64", "arm64"] {
        let p = std::fs::read_to_string(dir.join(format!("out/linux_{arch}/p")))?;
        assert!(p.starts_with(&format!("linux/{arch} {arch}")), "{p}");
    }
    let names = tar_names(&dir.join("fs.tar"))?;
    assert!(names.contains(&"linux_amd64/p".to_string()), "{names:?}");
    assert!(names.contains(&"linux_arm64/p".to_string()), "{names:?}");

    // the docker tarball cannot hold a manifest list
    let mut args: Vec<&str> = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    args.extend(["--opt", PLATFORMS, "--output", "type=docker,dest=d.tar"]);
    let out = d.kiln(dir, &args)?;
    assert!(
        !out.status.success(),
        "docker tarball of two platforms refused"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("multi-platform"), "{err}");
    Ok(())
}
