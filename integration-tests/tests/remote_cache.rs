//! Build cache through a registry (`--export-cache`/`--import-cache
//! type=registry`): a daemon whose state was wiped rebuilds from it without
//! running a step and makes the same image; `mode=min` keeps only the
//! result, `mode=max` every step's; the cache is BuildKit's format; writers
//! of one ref keep each other's records.

use kiln_integration_tests::{BuildContext, Restartable as Kilnd, is_cached, registry};
use std::collections::BTreeMap;

const DOCKERFILE: &str = "FROM busybox AS base
RUN echo one > /one && echo ran-one-$((40+2))
FROM base AS mid
RUN echo mid > /mid && echo ran-mid-$((40+2))
FROM busybox
COPY --from=mid /mid /mid
COPY hello.txt /hello.txt
RUN cat /mid /hello.txt > /all && echo ran-all-$((40+2))
";

const STEPS: [&str; 5] = [
    "RUN echo one",
    "RUN echo mid",
    "COPY --from=mid",
    "COPY hello.txt",
    "RUN cat /mid",
];

/// A tag no earlier run used (the registry may outlive a test run).
fn fresh(name: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{name}-{}-{t}", std::process::id())
}

/// Stops the daemon, removes its whole state and starts a new one.
fn wipe(d: &mut Kilnd) {
    d.stop(true);
    kiln_integration_tests::unmount_under(d.dir.path());
    std::fs::remove_dir_all(d.root()).expect("remove kilnd root");
    d.spawn();
}

fn context(hello: &str) -> BuildContext {
    let c = BuildContext::new(DOCKERFILE).expect("ctx");
    c.file("hello.txt", hello).expect("write");
    c
}

/// `kiln build` of `c` with `extra`, its image pushed as `image`; returns
/// the progress and the image digest.
fn build(d: &Kilnd, c: &BuildContext, image: &str, extra: &[&str]) -> (String, String) {
    let meta = c.path().join("meta.json");
    let out = format!("type=image,name={image},push=true");
    let mut args = vec![
        "--build-arg",
        "SOURCE_DATE_EPOCH=1700000000",
        "--output",
        &out,
        "--metadata-file",
        meta.to_str().expect("path"),
    ];
    args.extend_from_slice(extra);
    let progress = d.build(c.path(), &args);
    let m: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&meta).expect("metadata")).expect("json");
    let digest = m["containerimage.digest"]
        .as_str()
        .expect("digest")
        .to_string();
    (progress, digest)
}

fn get(url: &str, accept: &str) -> Vec<u8> {
    let out = std::process::Command::new("curl")
        .args(["-fsS", "-H", &format!("Accept: {accept}"), url])
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The cache config at `reference` (`repo:tag` on the test registry).
fn cache_config(repo_tag: &str) -> serde_json::Value {
    let (repo, tag) = repo_tag.rsplit_once(':').expect("tag");
    let reg = registry();
    let m: serde_json::Value = serde_json::from_slice(&get(
        &format!("http://{reg}/v2/{repo}/manifests/{tag}"),
        "application/vnd.oci.image.manifest.v1+json",
    ))
    .expect("manifest");
    assert_eq!(
        m["config"]["mediaType"], "application/vnd.buildkit.cacheconfig.v0",
        "{m}"
    );
    let config = m["config"]["digest"].as_str().expect("config digest");
    // every layer the config names is in the manifest, with its diffID
    let c: serde_json::Value = serde_json::from_slice(&get(
        &format!("http://{reg}/v2/{repo}/blobs/{config}"),
        "*/*",
    ))
    .expect("config");
    let listed: Vec<&str> = m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            assert!(
                l["annotations"]["containerd.io/uncompressed"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("sha256:")),
                "{l}"
            );
            l["digest"].as_str().expect("digest")
        })
        .collect();
    for l in c["layers"].as_array().expect("config layers") {
        assert!(listed.contains(&l["blob"].as_str().expect("blob")), "{l}");
    }
    c
}

fn results(config: &serde_json::Value) -> usize {
    config["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r.get("layers").is_some())
        .count()
}

#[test]
fn a_wiped_daemon_rebuilds_from_a_registry_cache_without_running_a_step() {
    let mut d = Kilnd::start();
    let reg = registry();
    let c = context("hello\n");
    let tag = fresh("max");
    let cache = format!("{reg}/kiln-it/remote-cache:{tag}");
    let export = format!("type=registry,ref={cache},mode=max");
    let (first, digest) = build(
        &d,
        &c,
        &format!("{reg}/kiln-it/remote-app:a"),
        &["--export-cache", &export],
    );
    assert!(first.contains("ran-all-42"), "{first}");
    assert!(first.contains("exporting cache to registry"), "{first}");
    let config = cache_config(&format!("kiln-it/remote-cache:{tag}"));
    assert!(
        results(&config) >= 5,
        "max keeps every step's result: {config}"
    );

    wipe(&mut d);
    let import = format!("type=registry,ref={cache}");
    let (second, digest2) = build(
        &d,
        &c,
        &format!("{reg}/kiln-it/remote-app:b"),
        &["--import-cache", &import],
    );
    for s in STEPS {
        assert!(
            is_cached(&second, s),
            "{s} CACHED from the registry:\n{second}"
        );
    }
    for r in ["ran-one-42", "ran-mid-42", "ran-all-42"] {
        assert!(!second.contains(r), "no step ran:\n{second}");
    }
    assert_eq!(digest, digest2, "the same image");
    assert!(
        !second.contains("imported cache not loaded"),
        "every import loaded:\n{second}"
    );
    // a fully cached build pushed to the cache's registry moves no layer: none
    // is pulled (not even the base image), each is mounted from the cache,
    // only the config is uploaded
    wipe(&mut d);
    let fresh_repo = format!("{reg}/kiln-it/remote-mounted-{}:v", fresh("repo"));
    let (mounted, digest3) = build(&d, &c, &fresh_repo, &["--import-cache", &import]);
    assert_eq!(digest, digest3);
    assert!(
        mounted.contains("1 blobs uploaded, 0 already present, 4 mounted"),
        "layers mounted from the cache:\n{mounted}"
    );
    assert!(
        !mounted.contains("fetching layer") && !mounted.contains("MB / "),
        "no layer pulled:\n{mounted}"
    );

    // a change in the last stage: with max the other stages stay cached
    wipe(&mut d);
    let changed = context("changed\n");
    let (third, _) = build(
        &d,
        &changed,
        &format!("{reg}/kiln-it/remote-app:c"),
        &["--import-cache", &import],
    );
    for s in ["RUN echo one", "RUN echo mid", "COPY --from=mid"] {
        assert!(is_cached(&third, s), "{s} CACHED:\n{third}");
    }
    assert!(third.contains("ran-all-42"), "{third}");
    assert!(!third.contains("ran-mid-42"), "{third}");
}

#[test]
fn mode_min_keeps_only_the_result_and_writers_merge() {
    let mut d = Kilnd::start();
    let reg = registry();
    let c = context("hello\n");
    let tag = fresh("min");
    let cache = format!("{reg}/kiln-it/remote-cache:{tag}");
    let export = format!("type=registry,ref={cache}");
    let (_, digest) = build(
        &d,
        &c,
        &format!("{reg}/kiln-it/remote-min:a"),
        &["--export-cache", &export],
    );
    let config = cache_config(&format!("kiln-it/remote-cache:{tag}"));
    assert_eq!(results(&config), 1, "min: the result only: {config}");

    // unchanged: every step matches its key, the result is pulled
    wipe(&mut d);
    let import = format!("type=registry,ref={cache}");
    let (same, digest2) = build(
        &d,
        &c,
        &format!("{reg}/kiln-it/remote-min:b"),
        &["--import-cache", &import],
    );
    for s in STEPS {
        assert!(is_cached(&same, s), "{s} CACHED:\n{same}");
    }
    for r in ["ran-one-42", "ran-mid-42", "ran-all-42"] {
        assert!(!same.contains(r), "no step ran:\n{same}");
    }
    assert_eq!(digest, digest2);

    // changed: the intermediate stages have no result to load, so they run
    wipe(&mut d);
    let changed = context("changed\n");
    let both = format!("type=registry,ref={cache}");
    let (run, _) = build(
        &d,
        &changed,
        &format!("{reg}/kiln-it/remote-min:c"),
        &["--import-cache", &import, "--export-cache", &both],
    );
    assert!(run.contains("ran-mid-42"), "{run}");
    // the second writer's records join the first's: both results are there
    let merged = cache_config(&format!("kiln-it/remote-cache:{tag}"));
    assert_eq!(results(&merged), 2, "both writers' results: {merged}");
    wipe(&mut d);
    let (again, _) = build(
        &d,
        &c,
        &format!("{reg}/kiln-it/remote-min:d"),
        &["--import-cache", &import],
    );
    assert!(
        is_cached(&again, "RUN cat /mid"),
        "the first writer's result is kept:\n{again}"
    );
}

#[test]
fn a_bad_cache_ref_is_a_failed_import_not_a_failed_build() {
    let d = Kilnd::start();
    let reg = registry();
    let c = context("hello\n");
    let import = format!("type=registry,ref={reg}/kiln-it/no-such-cache:x");
    let (progress, _) = build(
        &d,
        &c,
        &format!("{reg}/kiln-it/remote-none:a"),
        &["--import-cache", &import],
    );
    assert!(
        progress.contains("importing cache manifest from"),
        "{progress}"
    );
    assert!(progress.contains("ran-all-42"), "{progress}");
    // a cache that cannot be written fails the build, unless ignore-error=true
    let unwritable = "type=registry,ref=127.0.0.1:1/kiln-it/nowhere:x";
    let out = d
        .kiln(
            c.path(),
            &[
                "build",
                "--progress",
                "plain",
                ".",
                "--export-cache",
                unwritable,
            ],
        )
        .output()
        .expect("kiln");
    assert!(
        !out.status.success(),
        "an export that fails fails the build"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exporting cache to registry"), "{err}");
    let ignored = format!("{unwritable},ignore-error=true");
    let progress = d.build(c.path(), &["--export-cache", &ignored]);
    assert!(
        progress.contains("cache export failed (ignore-error=true)"),
        "{progress}"
    );
    // options kiln does not know are refused, naming them
    for (flag, bad, says) in [
        ("--export-cache", "type=gha", "unknown cache exporter"),
        (
            "--export-cache",
            format!("type=registry,ref={reg}/x:y,mode=most").as_str(),
            "mode=\"most\"",
        ),
        ("--import-cache", "type=registry", "requires ref"),
    ] {
        let out = d
            .kiln(c.path(), &["build", "--progress", "plain", ".", flag, bad])
            .output()
            .expect("kiln");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{flag} {bad}: {err}"
        );
    }
}

#[test]
fn a_cache_in_index_form_is_read_as_its_manifest_form_is() {
    let mut d = Kilnd::start();
    let reg = registry();
    let c = context("hello\n");
    let tag = fresh("index");
    let cache = format!("{reg}/kiln-it/remote-cache:{tag}");
    let export =
        format!("type=registry,ref={cache},mode=max,image-manifest=false,compression=zstd");
    build(
        &d,
        &c,
        &format!("{reg}/kiln-it/remote-index:a"),
        &["--export-cache", &export],
    );
    let out = std::process::Command::new("curl")
        .args([
            "-fsS",
            "-H",
            "Accept: application/vnd.oci.image.index.v1+json",
            &format!("http://{reg}/v2/kiln-it/remote-cache/manifests/{tag}"),
        ])
        .output()
        .expect("curl");
    let index: serde_json::Value = serde_json::from_slice(&out.stdout).expect("index");
    let manifests = index["manifests"].as_array().expect("manifests");
    assert_eq!(
        manifests.last().map(|m| m["mediaType"].clone()),
        Some(serde_json::json!("application/vnd.buildkit.cacheconfig.v0")),
        "the config last: {index}"
    );
    // the layers the build made are zstd (busybox's own stays as pulled)
    assert!(
        manifests[1..manifests.len() - 1]
            .iter()
            .all(|m| m["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"),
        "{index}"
    );
    wipe(&mut d);
    let import = format!("type=registry,ref={cache}");
    let (progress, _) = build(
        &d,
        &c,
        &format!("{reg}/kiln-it/remote-index:b"),
        &["--import-cache", &import],
    );
    for s in STEPS {
        assert!(is_cached(&progress, s), "{s} CACHED:\n{progress}");
    }
}

/// `docker ARGS` with BuildKit (Docker's own client, which builds with the
/// engine's embedded BuildKit when DOCKER_BUILDKIT=1); stderr on failure.
fn docker_buildkit(dir: &std::path::Path, args: &[&str]) -> String {
    let docker = if std::path::Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    };
    let out = std::process::Command::new(docker)
        .args(args)
        .current_dir(dir)
        .env("DOCKER_BUILDKIT", "1")
        .output()
        .expect("docker");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "docker {}:\n{text}", args.join(" "));
    text
}

/// A Dockerfile whose steps no build on the engine ran before (`token`),
/// whose keys BuildKit of any version computes alike: copies between stages
/// of one image.
fn interop_dockerfile(token: &str) -> BuildContext {
    let reg = registry();
    BuildContext::new(&format!(
        "FROM {reg}/library/busybox:latest AS src\nFROM {reg}/library/busybox:latest\nCOPY --from=src /bin/busybox /copied-{token}\nCOPY --from=src /etc/passwd /etc/passwd-{token}\n"
    ))
    .expect("ctx")
}

/// The engine's BuildKit builds `c` (tagged `tag`) with `--cache-from
/// cache`: both copies CACHED.
fn engine_builds_from_cache(c: &BuildContext, cache: &str, tag: &str) {
    let built = docker_buildkit(
        c.path(),
        &[
            "build",
            "--progress",
            "plain",
            "--cache-from",
            cache,
            "-t",
            tag,
            ".",
        ],
    );
    for step in [
        "COPY --from=src /bin/busybox",
        "COPY --from=src /etc/passwd",
    ] {
        assert!(
            is_cached(&built, step),
            "{step} CACHED in the engine's BuildKit:\n{built}"
        );
    }
}

#[test]
fn caches_cross_between_kiln_and_the_docker_engines_buildkit() {
    if !kiln_integration_tests::container_farm::docker_available() {
        return;
    }
    let reg = registry();
    let d = Kilnd::start();

    // kiln writes an inline cache; the engine's BuildKit builds from it
    let token = fresh("k2d");
    let c = interop_dockerfile(&token);
    let image = format!("{reg}/kiln-it/inline-from-kiln:{token}");
    let out = format!("type=image,name={image},push=true");
    d.build(
        c.path(),
        &["--export-cache", "type=inline", "--output", &out],
    );
    let local_tag = format!("kiln-it-k2d:{token}");
    engine_builds_from_cache(&c, &image, &local_tag);

    // kiln writes a registry cache in the index form BuildKit before v0.21 reads
    let token = fresh("k2d-index");
    let c = interop_dockerfile(&token);
    let cache = format!("{reg}/kiln-it/index-cache-from-kiln:{token}");
    let export =
        format!("type=registry,ref={cache},mode=max,image-manifest=false,oci-mediatypes=false");
    d.build(c.path(), &["--export-cache", &export]);
    let index_tag = format!("kiln-it-k2d-index:{token}");
    engine_builds_from_cache(&c, &cache, &index_tag);

    // the engine's BuildKit writes one (BUILDKIT_INLINE_CACHE=1); kiln builds from it
    let token = fresh("d2k");
    let c = interop_dockerfile(&token);
    let image = format!("{reg}/kiln-it/inline-from-docker:{token}");
    docker_buildkit(
        c.path(),
        &[
            "build",
            "--progress",
            "plain",
            "--build-arg",
            "BUILDKIT_INLINE_CACHE=1",
            "-t",
            &image,
            ".",
        ],
    );
    docker_buildkit(c.path(), &["push", &image]);
    let import = format!("type=registry,ref={image}");
    let progress = d.build(c.path(), &["--import-cache", &import]);
    for step in [
        "COPY --from=src /bin/busybox",
        "COPY --from=src /etc/passwd",
    ] {
        assert!(
            is_cached(&progress, step),
            "{step} CACHED in kiln:\n{progress}"
        );
    }
    let _ = std::process::Command::new("docker")
        .args(["rmi", "-f", &local_tag, &index_tag, &image])
        .output();
}

#[test]
fn kilnd_toml_names_caches_every_build_exports_and_imports() {
    let mut d = Kilnd::start();
    let reg = registry();
    let tag = fresh("daemon");
    let cache = format!("{reg}/kiln-it/remote-cache:{tag}");
    d.stop(true);
    let config = d.dir.path().join("kilnd.toml");
    let mut toml = std::fs::read_to_string(&config).expect("kilnd.toml");
    toml.push_str(&format!(
        "[[remote-cache.import]]\ntype = \"registry\"\nref = \"{cache}\"\n\n[[remote-cache.export]]\ntype = \"registry\"\nref = \"{cache}\"\nmode = \"max\"\n"
    ));
    std::fs::write(&config, toml).expect("write kilnd.toml");
    d.spawn();
    // no cache flag: the daemon's export writes it (its import finds nothing yet, and says so)
    let c = context("hello\n");
    let (first, digest) = build(&d, &c, &format!("{reg}/kiln-it/remote-daemon:a"), &[]);
    assert!(first.contains("exporting cache to registry"), "{first}");
    assert!(results(&cache_config(&format!("kiln-it/remote-cache:{tag}"))) >= 5);
    // a new daemon with the same kilnd.toml builds from it
    wipe(&mut d);
    let (second, digest2) = build(&d, &c, &format!("{reg}/kiln-it/remote-daemon:b"), &[]);
    for s in STEPS {
        assert!(
            is_cached(&second, s),
            "{s} CACHED from the daemon's cache:\n{second}"
        );
    }
    assert_eq!(digest, digest2);
}

#[test]
fn an_imported_result_is_not_admitted_into_the_daemons_own_cache() {
    // a shared daemon: one client's import must not decide what another's
    // build gets for the same step
    let mut d = Kilnd::start();
    let reg = registry();
    let tag = fresh("isolated");
    let cache = format!("{reg}/kiln-it/remote-cache:{tag}");
    let c = BuildContext::new(
        "FROM busybox\nRUN head -c 16 /dev/urandom | od -x > /rand && echo ran-rand-$((40+2))\n",
    )
    .expect("ctx");
    let out = tempfile::tempdir().expect("tmp");
    let dest = |n: &str| format!("type=local,dest={}", out.path().join(n).display());
    let export = format!("type=registry,ref={cache},mode=max");
    d.build(
        c.path(),
        &["--export-cache", &export, "--output", &dest("exported")],
    );
    let exported = std::fs::read(out.path().join("exported/rand")).expect("rand");
    wipe(&mut d);
    let import = format!("type=registry,ref={cache}");
    let imported = d.build(
        c.path(),
        &["--import-cache", &import, "--output", &dest("imported")],
    );
    assert!(is_cached(&imported, "RUN head -c 16"), "{imported}");
    assert_eq!(
        std::fs::read(out.path().join("imported/rand")).expect("rand"),
        exported,
        "the imported result"
    );
    // the next build without the import runs the step itself
    let own = d.build(c.path(), &["--output", &dest("own")]);
    assert!(own.contains("ran-rand-42"), "the step ran:\n{own}");
    assert_ne!(
        std::fs::read(out.path().join("own/rand")).expect("rand"),
        exported
    );
}

#[test]
fn a_local_cache_directory_round_trips_through_the_client_session() {
    let mut d = Kilnd::start();
    let reg = registry();
    let c = context("hello\n");
    let dir = tempfile::tempdir().expect("tmp");
    let cache = dir.path().join("cache");
    let export = format!("type=local,dest={},mode=max", cache.display());
    let (_, digest) = build(
        &d,
        &c,
        &format!("{reg}/kiln-it/remote-local:a"),
        &["--export-cache", &export],
    );
    // an OCI layout: the cache manifest tagged `latest` in index.json, its blobs beside it
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("index.json")).expect("index.json"))
            .expect("json");
    let m = &index["manifests"][0];
    assert_eq!(
        m["annotations"]["org.opencontainers.image.ref.name"],
        "latest"
    );
    let hex = m["digest"]
        .as_str()
        .expect("digest")
        .trim_start_matches("sha256:")
        .to_string();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(cache.join("blobs/sha256").join(&hex)).expect("manifest blob"),
    )
    .expect("manifest");
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.buildkit.cacheconfig.v0"
    );
    for l in manifest["layers"].as_array().expect("layers") {
        let h = l["digest"]
            .as_str()
            .expect("digest")
            .trim_start_matches("sha256:");
        assert!(
            cache.join("blobs/sha256").join(h).exists(),
            "layer {h} written"
        );
    }

    wipe(&mut d);
    let import = format!("type=local,src={}", cache.display());
    let (second, digest2) = build(
        &d,
        &c,
        &format!("{reg}/kiln-it/remote-local:b"),
        &["--import-cache", &import],
    );
    for s in STEPS {
        assert!(
            is_cached(&second, s),
            "{s} CACHED from the directory:\n{second}"
        );
    }
    for r in ["ran-one-42", "ran-mid-42", "ran-all-42"] {
        assert!(!second.contains(r), "no step ran:\n{second}");
    }
    assert_eq!(digest, digest2, "the same image");
}

#[test]
fn a_farm_builds_from_a_cache_another_farm_wrote() {
    use kiln_integration_tests::farm::{Farm, ProcessFarm, finished};
    let reg = registry();
    let tag = fresh("farm");
    let cache = format!("{reg}/kiln-it/remote-cache:{tag}");
    let mut df = String::new();
    for i in 0..3 {
        df.push_str(&format!(
            "FROM busybox AS s{i}\nRUN echo stage{i} > /out{i} && echo ran-stage-$((40+{i}))\n"
        ));
    }
    df.push_str("FROM busybox\n");
    for i in 0..3 {
        df.push_str(&format!("COPY --from=s{i} /out{i} /out/\n"));
    }
    let ctx = BuildContext::new(&df).expect("ctx");
    let workers: [&[&str]; 2] = [
        &["--oci-worker-labels", "zone=a"],
        &["--oci-worker-labels", "zone=b"],
    ];
    let export = format!("type=registry,ref={cache},mode=max");
    {
        let farm = ProcessFarm::start(&workers, "").expect("farm");
        let b = farm
            .spawn_build(ctx.path(), &["--export-cache", &export])
            .expect("build");
        let progress = finished(b, &farm).expect("first farm builds");
        assert!(progress.contains("ran-stage-41"), "{progress}");
    }
    // a new farm, nothing cached on any worker: every step comes from the cache
    let farm = ProcessFarm::start(&workers, "").expect("farm");
    let import = format!("type=registry,ref={cache}");
    let b = farm
        .spawn_build(
            ctx.path(),
            &["--import-cache", &import, "--output", "type=local,dest=out"],
        )
        .expect("build");
    let progress = finished(b, &farm).expect("second farm builds");
    for i in 0..3 {
        assert!(
            !progress.contains(&format!("ran-stage-{}", 40 + i)),
            "{progress}"
        );
        assert!(
            is_cached(&progress, &format!("COPY --from=s{i}")),
            "{progress}"
        );
        let got = std::fs::read_to_string(ctx.path().join(format!("out/out/out{i}"))).expect("out");
        assert_eq!(got, format!("stage{i}\n"));
    }
}

#[test]
fn cache_mounts_travel_with_a_cache_when_asked() {
    let mut d = Kilnd::start();
    let reg = registry();
    let tag = fresh("mounts");
    let cache = format!("{reg}/kiln-it/remote-cache:{tag}");
    let id = format!("kiln-it-{tag}");
    let c = BuildContext::new(&format!(
        "FROM busybox\nARG RUNID\nRUN --mount=type=cache,id={id},target=/c sh -c 'echo \"run $RUNID\" >> /c/log; cp /c/log /log'\n"
    ))
    .expect("ctx");
    let out = tempfile::tempdir().expect("tmp");
    let run = |d: &Kilnd, n: u32, extra: &[&str]| -> String {
        let dest = format!(
            "type=local,dest={}",
            out.path().join(n.to_string()).display()
        );
        let arg = format!("RUNID={n}");
        let mut args = vec!["--build-arg", &arg, "--output", &dest];
        args.extend_from_slice(extra);
        d.build(c.path(), &args);
        std::fs::read_to_string(out.path().join(n.to_string()).join("log")).expect("log")
    };
    let export = format!("type=registry,ref={cache},mode=max,cache-mounts=true");
    assert_eq!(run(&d, 1, &["--export-cache", &export]), "run 1\n");
    // a new daemon seeds its (empty) cache mount from the cache
    wipe(&mut d);
    let import = format!("type=registry,ref={cache},cache-mounts=true");
    assert_eq!(run(&d, 2, &["--import-cache", &import]), "run 1\nrun 2\n");
    // it is opt-in: without the attribute the mount starts empty
    wipe(&mut d);
    let plain = format!("type=registry,ref={cache}");
    assert_eq!(run(&d, 3, &["--import-cache", &plain]), "run 3\n");
    // and a mount that holds files already is left as it is
    let again = run(&d, 4, &["--import-cache", &import]);
    assert_eq!(again, "run 3\nrun 4\n");
}

#[test]
fn an_inline_cache_rebuilds_the_image_on_a_wiped_daemon() {
    let mut d = Kilnd::start();
    let reg = registry();
    let c = context("hello\n");
    let image = format!("{reg}/kiln-it/remote-inline:{}", fresh("inline"));
    let (first, digest) = build(&d, &c, &image, &["--export-cache", "type=inline"]);
    assert!(first.contains("ran-all-42"), "{first}");
    wipe(&mut d);
    let import = format!("type=registry,ref={image}");
    let again = format!("{reg}/kiln-it/remote-inline-again:{}", fresh("inline"));
    let (second, digest2) = build(&d, &c, &again, &["--import-cache", &import]);
    for s in STEPS {
        assert!(
            is_cached(&second, s),
            "{s} CACHED from the image's inline cache:\n{second}"
        );
    }
    for r in ["ran-one-42", "ran-mid-42", "ran-all-42"] {
        assert!(!second.contains(r), "no step ran:\n{second}");
    }
    // the same layers (the first image's config also carries the cache)
    let layers = |name: &str, digest: &str| {
        let path = name.split_once('/').map(|(_, p)| p).unwrap_or(name);
        let repo = path.rsplit_once(':').map(|(r, _)| r).unwrap_or(path);
        let m: serde_json::Value = serde_json::from_slice(&get(
            &format!("http://{reg}/v2/{repo}/manifests/{digest}"),
            "application/vnd.oci.image.manifest.v1+json",
        ))
        .expect("manifest");
        m["layers"].clone()
    };
    assert_eq!(layers(&image, &digest), layers(&again, &digest2));
}
