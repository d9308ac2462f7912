//! Image export and push end to end: a real all-in-one kilnd and Debian's docker-registry
//! with TLS from a self-signed CA, zstd layers read by skopeo, reproducible digests and
//! push-by-digest.

use anyhow::{Context, Result, bail};
use kiln_integration_tests::{
    BuildContext, bin_dir, dockerfile_args, oci_image, run, spawn_kilnd, tar_entry,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// A docker-registry with its own config, data and access log.
struct Registry {
    addr: String,
    _dir: tempfile::TempDir,
    child: Child,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Registry {
    /// `extra` is YAML appended under `http:` (indented) and at top level via `top`.
    fn start(http_extra: &str, top: &str) -> Result<Registry> {
        let dir = tempfile::Builder::new().prefix("kiln-reg-").tempdir()?;
        let addr = format!("127.0.0.1:{}", free_port());
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n{http_extra}{top}",
                dir.path().join("data").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start docker-registry")?;
        let start = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!(
                    "registry did not start: {}",
                    std::fs::read_to_string(dir.path().join("registry.log"))?
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Registry {
            addr,
            _dir: dir,
            child,
        })
    }
}

/// An all-in-one kilnd with a given kilnd.toml, and a `kiln` runner with its own HOME.
struct Kilnd {
    dir: tempfile::TempDir,
    addr: String,
    child: Child,
}

impl Drop for Kilnd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
                self.dir.path().display()
            ))
            .status();
    }
}

impl Kilnd {
    fn start(toml: &str) -> Result<Kilnd> {
        let dir = tempfile::Builder::new().prefix("kiln-exp-").tempdir()?;
        let config = dir.path().join("kilnd.toml");
        std::fs::write(&config, toml)?;
        let sock = dir.path().join("kilnd.sock");
        let log = dir.path().join("kilnd.log");
        let child = spawn_kilnd(&config, &dir.path().join("root"), &sock, &log)?;
        Ok(Kilnd {
            addr: format!("unix://{}", sock.display()),
            dir,
            child,
        })
    }

    /// `kiln build` of the context with `output`, HOME set to `home`.
    fn build(&self, ctx: &Path, output: &str, home: &Path) -> Result<Output> {
        let mut args = vec!["--addr", &self.addr, "build", "--progress", "plain"];
        args.extend(dockerfile_args());
        args.extend(["--output", output, "--metadata-file", "meta.json"]);
        let out = Command::new(bin_dir().join("kiln"))
            .args(&args)
            .current_dir(ctx)
            .env("HOME", home)
            .output()?;
        Ok(out)
    }

    fn build_ok(&self, ctx: &Path, output: &str, home: &Path) -> Result<serde_json::Value> {
        let out = self.build(ctx, output, home)?;
        if !out.status.success() {
            bail!(
                "kiln build failed: {}\n--- kilnd ---\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.dir.path().join("kilnd.log")).unwrap_or_default()
            );
        }
        Ok(serde_json::from_slice(&std::fs::read(
            ctx.join("meta.json"),
        )?)?)
    }
}

fn context() -> BuildContext {
    let c = BuildContext::new("FROM scratch\nCOPY hello.txt /etc/hello.txt\nCOPY data/ /data/\n")
        .expect("context");
    c.file("hello.txt", "hello from kiln\n").expect("write");
    c.file("data/a.txt", &"some text to compress\n".repeat(200))
        .expect("write");
    c
}

fn skopeo_inspect(target: &str, extra: &[&str]) -> Result<serde_json::Value> {
    let out = run(Command::new("skopeo")
        .arg("inspect")
        .args(extra)
        .arg(target))?;
    Ok(serde_json::from_str(&out)?)
}

fn make_certs(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let ca_key = dir.join("ca.key");
    let ca = dir.join("ca.pem");
    let key = dir.join("srv.key");
    let csr = dir.join("srv.csr");
    let cert = dir.join("srv.pem");
    let ext = dir.join("ext.cnf");
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n")?;
    let p = |s: &Path| s.display().to_string();
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=kiln test CA",
        ])
        .args(["-keyout", &p(&ca_key), "-out", &p(&ca)]))?;
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-keyout", &p(&key), "-out", &p(&csr)]))?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .args([
            "-in",
            &p(&csr),
            "-CA",
            &p(&ca),
            "-CAkey",
            &p(&ca_key),
            "-out",
            &p(&cert),
            "-extfile",
            &p(&ext),
        ]))?;
    Ok((ca, cert, key))
}

#[test]
fn push_to_tls_registry_with_ca_from_kilnd_toml() -> Result<()> {
    let certs = tempfile::tempdir()?;
    let (ca, cert, key) = make_certs(certs.path())?;
    let reg = Registry::start(
        &format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        ),
        "",
    )?;
    let ctx = context();
    let home = tempfile::tempdir()?;
    let name = format!("{}/kiln/tls:v1", reg.addr);

    // without the CA the certificate is not trusted; registry.insecure=true skips verification
    let plain = Kilnd::start("")?;
    let out = plain.build(
        ctx.path(),
        &format!("type=image,name={name},push=true"),
        home.path(),
    )?;
    assert!(
        !out.status.success(),
        "push to an untrusted TLS registry succeeded"
    );
    plain.build_ok(
        ctx.path(),
        &format!("type=image,name={name},push=true,registry.insecure=true"),
        home.path(),
    )?;

    let d = Kilnd::start(&format!(
        "[registry.\"{}\"]\nca = [\"{}\"]\n",
        reg.addr,
        ca.display()
    ))?;
    let meta = d.build_ok(
        ctx.path(),
        &format!("type=image,name={name},push=true"),
        home.path(),
    )?;
    let v = skopeo_inspect(
        &format!("docker://{name}"),
        &["--cert-dir", &certs.path().display().to_string()],
    )
    .or_else(|_| skopeo_inspect(&format!("docker://{name}"), &["--tls-verify=false"]))?;
    assert_eq!(v["Digest"], meta["containerimage.digest"]);
    Ok(())
}

#[test]
fn zstd_layers_are_read_by_skopeo() -> Result<()> {
    let reg = Registry::start("", "")?;
    let d = Kilnd::start("")?;
    let ctx = context();
    let home = tempfile::tempdir()?;
    let name = format!("{}/kiln/zstd:v1", reg.addr);
    let meta = d.build_ok(
        ctx.path(),
        &format!("type=image,name={name},push=true,compression=zstd,compression-level=9"),
        home.path(),
    )?;
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{name}")))?;
    let manifest: serde_json::Value = serde_json::from_str(&raw)?;
    let layers = manifest["layers"].as_array().context("layers")?;
    assert!(!layers.is_empty());
    for l in layers {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
    }
    let out_dir = tempfile::tempdir()?;
    let oci = out_dir.path().join("oci");
    run(Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{name}"))
        .arg(format!("oci:{}:v1", oci.display())))?;
    let v = skopeo_inspect(&format!("oci:{}:v1", oci.display()), &[])?;
    assert_eq!(v["Digest"], meta["containerimage.digest"]);
    // the zstd blob decompresses to a tar holding the copied file
    let blob = oci
        .join("blobs/sha256")
        .join(&layers[0]["digest"].as_str().context("digest")?[7..]);
    let tar = run(Command::new("sh")
        .arg("-c")
        .arg(format!("zstd -dc {} | tar -tf -", blob.display())))?;
    assert!(tar.contains("etc/hello.txt"), "{tar}");
    Ok(())
}

#[test]
fn two_clean_builds_give_the_same_digest_with_source_date_epoch() -> Result<()> {
    let ctx = context();
    let home = tempfile::tempdir()?;
    let output = "type=oci,dest=out.tar,source-date-epoch=1700000000,rewrite-timestamp=true";
    let a = Kilnd::start("")?.build_ok(ctx.path(), output, home.path())?;
    let b = Kilnd::start("")?.build_ok(ctx.path(), output, home.path())?;
    assert_eq!(a["containerimage.digest"], b["containerimage.digest"]);
    let v = skopeo_inspect(
        &format!("oci-archive:{}", ctx.path().join("out.tar").display()),
        &[],
    )?;
    assert_eq!(v["Created"], "2023-11-14T22:13:20Z");
    Ok(())
}

#[test]
fn push_by_digest_creates_no_tag() -> Result<()> {
    let reg = Registry::start("", "")?;
    let d = Kilnd::start("")?;
    let ctx = context();
    let home = tempfile::tempdir()?;
    let meta = d.build_ok(
        ctx.path(),
        &format!(
            "type=image,name={}/kiln/bydigest:v1,push=true,push-by-digest=true",
            reg.addr
        ),
        home.path(),
    )?;
    let digest = meta["containerimage.digest"].as_str().context("digest")?;
    assert_eq!(
        meta["image.name"],
        format!("{}/kiln/bydigest@{digest}", reg.addr)
    );
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}/kiln/bydigest@{digest}", reg.addr)))?;
    let m: serde_json::Value = serde_json::from_str(&raw)?;
    assert_eq!(m["schemaVersion"], 2);
    let tags = run(Command::new("curl")
        .arg("-s")
        .arg(format!("http://{}/v2/kiln/bydigest/tags/list", reg.addr)))?;
    assert!(!tags.contains("v1"), "{tags}");
    Ok(())
}

#[test]
fn push_with_basic_auth_uses_the_clients_docker_config() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let htpasswd = dir.path().join("htpasswd");
    let entry = run(Command::new("htpasswd").args(["-Bbn", "kiln", "s3cret"]))?;
    std::fs::write(&htpasswd, entry)?;
    let reg = Registry::start(
        "",
        &format!(
            "auth:\n  htpasswd:\n    realm: kiln\n    path: {}\n",
            htpasswd.display()
        ),
    )?;
    let d = Kilnd::start(&format!("[registry.\"{}\"]\nhttp = true\n", reg.addr))?;
    let ctx = context();
    let name = format!("{}/auth/img:1", reg.addr);
    let output = format!("type=image,name={name},push=true");

    // no credentials on the client: the registry refuses the push
    let nobody = tempfile::tempdir()?;
    let out = d.build(ctx.path(), &output, nobody.path())?;
    assert!(!out.status.success(), "push without credentials must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("401") || err.to_lowercase().contains("unauthorized"),
        "{err}"
    );

    // credentials in ~/.docker/config.json of the client: the push works, and
    // the daemon never saw them in its config
    let home = tempfile::tempdir()?;
    std::fs::create_dir_all(home.path().join(".docker"))?;
    let auth = run(Command::new("sh")
        .arg("-c")
        .arg("printf kiln:s3cret | base64"))?;
    std::fs::write(
        home.path().join(".docker/config.json"),
        format!(
            "{{\"auths\":{{\"{}\":{{\"auth\":\"{}\"}}}}}}",
            reg.addr,
            auth.trim()
        ),
    )?;
    let meta = d.build_ok(ctx.path(), &output, home.path())?;
    let digest = meta["containerimage.digest"]
        .as_str()
        .context("digest")?
        .to_string();
    let v = skopeo_inspect(
        &format!("docker://{name}"),
        &["--tls-verify=false", "--creds", "kiln:s3cret"],
    )?;
    assert_eq!(v["Digest"], digest);

    // pulling it back (FROM the private image) also takes the client's credentials:
    // the frontend's resolve and the worker's pull both ask the session
    let pull = BuildContext::new(&format!("FROM {name}\n")).expect("context");
    let out = d.build(pull.path(), "type=local,dest=rootfs", nobody.path())?;
    assert!(!out.status.success(), "pull without credentials must fail");
    d.build_ok(pull.path(), "type=local,dest=rootfs", home.path())?;
    assert_eq!(
        std::fs::read_to_string(pull.path().join("rootfs/etc/hello.txt"))?,
        "hello from kiln\n"
    );
    Ok(())
}

#[test]
fn a_rebuild_that_changes_nothing_uploads_no_layer() -> Result<()> {
    let reg = Registry::start("", "")?;
    let d = Kilnd::start(&format!("[registry.\"{}\"]\nhttp = true\n", reg.addr))?;
    let ctx = context();
    let name = format!("{}/noop/img:1", reg.addr);
    let output = format!("type=image,name={name},push=true");
    let home = tempfile::tempdir()?;
    d.build_ok(ctx.path(), &output, home.path())?;
    let log_path = reg._dir.path().join("registry.log");
    // the access log shows the digest URL-encoded (sha256%3A...): match its hex part
    let uploads = |log: &str, digest: &str| {
        let hex = digest.trim_start_matches("sha256:");
        log.lines()
            .filter(|l| l.contains("method=PUT") && l.contains("blobs/uploads") && l.contains(hex))
            .count()
    };
    let first_log = std::fs::read_to_string(&log_path)?;
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{name}")))?;
    let manifest: serde_json::Value = serde_json::from_str(&raw)?;
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .filter_map(|l| l["digest"].as_str().map(str::to_string))
        .collect();
    assert!(!layers.is_empty());
    for l in &layers {
        assert_eq!(
            uploads(&first_log, l),
            1,
            "the first push uploads layer {l} once"
        );
    }

    d.build_ok(ctx.path(), &output, home.path())?;
    let second_log = std::fs::read_to_string(&log_path)?;
    let new_part = &second_log[first_log.len()..];
    for l in &layers {
        assert_eq!(
            uploads(new_part, l),
            0,
            "layer {l} was uploaded again:\n{new_part}"
        );
    }
    Ok(())
}

/// An uncompressed export streams each built layer from its snapshot (nothing
/// is stored for it): the tarball's layer is a plain tar whose digest is right
/// and which holds the files, the second export the same bytes.
#[test]
fn uncompressed_export_streams_built_layers_with_the_right_digest() -> Result<()> {
    let d = Kilnd::start(&kiln_integration_tests::registry_mirror_toml())?;
    let ctx = BuildContext::new(
        "FROM busybox\nRUN mkdir /d && echo streamed > /d/f && head -c 300000 /dev/zero > /d/z\n",
    )?;
    let home = tempfile::tempdir()?;
    let mut layers = Vec::new();
    for dest in ["a.tar", "b.tar"] {
        d.build_ok(
            ctx.path(),
            &format!("type=oci,dest={dest},compression=uncompressed"),
            home.path(),
        )?;
        let tar = ctx.path().join(dest);
        let img = oci_image(&tar)?;
        let top = img.manifest["layers"]
            .as_array()
            .and_then(|l| l.last())
            .context("a layer")?
            .clone();
        assert_eq!(
            top["mediaType"], "application/vnd.oci.image.layer.v1.tar",
            "{top}"
        );
        let digest = top["digest"].as_str().context("digest")?.to_string();
        let blob = tar_entry(&tar, &format!("blobs/sha256/{}", &digest[7..]))?;
        assert_eq!(
            kiln_digest::sha256(&blob),
            digest,
            "the streamed layer's bytes are its digest"
        );
        assert_eq!(top["size"].as_u64(), Some(blob.len() as u64));
        let mut a = tar::Archive::new(&blob[..]);
        let names: Vec<String> = a
            .entries()?
            .flatten()
            .filter_map(|e| e.path().ok().map(|p| p.display().to_string()))
            .collect();
        assert!(
            names.iter().any(|n| n.trim_end_matches('/') == "d/f"),
            "{names:?}"
        );
        let diff_ids = img.config["rootfs"]["diff_ids"]
            .as_array()
            .context("diff_ids")?;
        assert_eq!(
            diff_ids.last().and_then(|v| v.as_str()),
            Some(digest.as_str())
        );
        layers.push(digest);
    }
    assert_eq!(layers[0], layers[1]);
    Ok(())
}

/// Random data makes stored deflate blocks inside the parallel gzip stream: Go's gzip
/// reader (umoci) and GNU gzip must read them back byte for byte.
#[test]
fn gzip_layer_with_stored_random_blocks_unpacks_with_umoci() -> Result<()> {
    use std::io::Read;
    let d = Kilnd::start("")?;
    let ctx = BuildContext::new("FROM scratch\nCOPY random.bin text.txt /\n")?;
    let mut random = vec![0u8; 3 << 20];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    std::fs::write(ctx.path().join("random.bin"), &random)?;
    ctx.file(
        "text.txt",
        &"line of very compressible text\n".repeat(60_000),
    )?;
    let home = tempfile::tempdir()?;
    let meta = d.build_ok(
        ctx.path(),
        "type=oci,dest=img.tar,compression=gzip,force-compression=true",
        home.path(),
    )?;
    let tar = ctx.path().join("img.tar");
    let layout = ctx.path().join("layout");
    std::fs::create_dir_all(&layout)?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&layout))?;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    assert_eq!(
        index["manifests"][0]["digest"],
        meta["containerimage.digest"]
    );
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(
        layout
            .join("blobs/sha256")
            .join(&meta["containerimage.digest"].as_str().context("digest")?[7..]),
    )?)?;
    let layer = m["layers"][0]["digest"].as_str().context("layer")?;
    let blob = layout.join("blobs/sha256").join(&layer[7..]);
    let size = std::fs::metadata(&blob)?.len();
    assert!(
        size < (3 << 20) + (3 << 20) / 100,
        "random data stored, not expanded: {size}"
    );
    run(Command::new("gzip").arg("-t").arg(&blob))?;
    let bundle = ctx.path().join("bundle");
    run(Command::new("umoci")
        .args(["raw", "unpack", "--rootless", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .arg(&bundle))
    .or_else(|_| {
        // an index entry without a ref name: address the manifest by digest
        run(Command::new("skopeo")
            .arg("copy")
            .arg(format!("oci-archive:{}", tar.display()))
            .arg(format!("oci:{}:x", ctx.path().join("copy").display())))?;
        run(Command::new("umoci")
            .args(["raw", "unpack", "--rootless", "--image"])
            .arg(format!("{}:x", ctx.path().join("copy").display()))
            .arg(&bundle))
    })?;
    assert_eq!(std::fs::read(bundle.join("random.bin"))?, random);
    Ok(())
}

/// Several multi-MiB layers are streamed from the worker into the tarball one after the
/// other (all at once they would share one HTTP/2 window and stall).
#[test]
fn oci_tarball_of_several_large_layers_streams_them_all() -> Result<()> {
    let d = Kilnd::start(&format!(
        "[registry.\"docker.io\"]\nmirrors = [\"{0}\"]\n[registry.\"{0}\"]\nhttp = true\n",
        kiln_integration_tests::registry()
    ))?;
    let ctx = BuildContext::new(
        "FROM busybox\n\
         RUN head -c 6m /dev/urandom > /r1\n\
         RUN head -c 6m /dev/urandom > /r2\n\
         RUN head -c 6m /dev/urandom > /r3\n\
         RUN head -c 6m /dev/urandom > /r4\n",
    )?;
    let home = tempfile::tempdir()?;
    for kind in ["oci", "docker"] {
        let dest = format!("{kind}.tar");
        d.build_ok(
            ctx.path(),
            &format!("type={kind},dest={dest},name=kiln/layers:v1"),
            home.path(),
        )?;
        let v = skopeo_inspect(
            &format!("{kind}-archive:{}", ctx.path().join(&dest).display()),
            &[],
        )?;
        assert_eq!(v["Layers"].as_array().context("layers")?.len(), 5, "{v}");
    }
    Ok(())
}
