//! `kiln build` end to end: real kilnd, real runc, overlayfs and a real
//! registry, in both topologies.

use kiln_integration_tests::{
    BuildContext, Daemon, Topology, dockerfile_args, run, tar_entry, tar_names,
};
use std::process::Command;

fn read(path: impl AsRef<std::path::Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = dockerfile_args();
    v.extend_from_slice(extra);
    v
}

const MULTISTAGE: &str = r#"
FROM busybox AS builder
ARG MSG=default
RUN mkdir -p /build && echo "built $MSG" > /build/out.txt
RUN ["/bin/sh", "-c", "echo exec-form > /build/exec.txt"]

FROM busybox
WORKDIR /app
COPY src/ ./src/
COPY top.txt .
COPY --from=builder /build/out.txt /build/exec.txt /app/
RUN rm /bin/ls && cat /app/out.txt /app/top.txt > /app/joined.txt
CMD ["cat", "/app/joined.txt"]
"#;

fn multistage_context() -> BuildContext {
    let c = BuildContext::new(MULTISTAGE).expect("context");
    c.file("top.txt", "top\n").expect("write");
    c.file("src/a/b.txt", "nested\n").expect("write");
    c
}

fn check_multistage_rootfs(out: &std::path::Path) {
    let read =
        |p: &str| std::fs::read_to_string(out.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("app/out.txt"), "built from-arg\n");
    assert_eq!(read("app/exec.txt"), "exec-form\n");
    assert_eq!(read("app/src/a/b.txt"), "nested\n");
    assert_eq!(read("app/joined.txt"), "built from-arg\ntop\n");
    // base image content is there, deletions (whiteouts) are applied
    assert!(out.join("bin/busybox").exists());
    assert!(out.join("bin/sh").symlink_metadata().is_ok());
    assert!(
        out.join("bin/ls").symlink_metadata().is_err(),
        "rm /bin/ls must be applied"
    );
    // what the runtime injected does not leak
    assert!(
        !out.join("etc/hosts").exists(),
        "/etc/hosts stub leaked into the rootfs"
    );
    assert!(
        !out.join("etc/resolv.conf").exists(),
        "/etc/resolv.conf stub leaked into the rootfs"
    );
    // nothing from the other stage that was not copied
    assert!(!out.join("build").exists());
}

fn multistage_to_local(topology: Topology) {
    let d = Daemon::start(topology).expect("daemon");
    let c = multistage_context();
    d.build(
        c.path(),
        &args(&[
            "--opt",
            "build-arg:MSG=from-arg",
            "--output",
            "type=local,dest=out",
        ]),
    )
    .expect("build");
    check_multistage_rootfs(&c.path().join("out"));
}

#[test]
fn multistage_build_to_local_dir_all_in_one() {
    multistage_to_local(Topology::AllInOne);
}

#[test]
fn multistage_build_to_local_dir_split_services() {
    multistage_to_local(Topology::Split);
}

#[test]
fn tar_output_holds_the_same_rootfs() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c = multistage_context();
    d.build(
        c.path(),
        &args(&[
            "--opt",
            "build-arg:MSG=from-arg",
            "--output",
            "type=tar,dest=out.tar",
        ]),
    )
    .expect("build");
    let tar = c.path().join("out.tar");
    assert_eq!(
        tar_entry(&tar, "app/joined.txt").expect("entry"),
        b"built from-arg\ntop\n"
    );
    let names = tar_names(&tar).expect("names");
    assert!(names.iter().any(|n| n == "bin/busybox"));
    assert!(!names.iter().any(|n| n == "bin/ls"));
    assert!(!names.iter().any(|n| n == "etc/hosts"));
    assert!(!names.iter().any(|n| n.contains(".wh.")));
}

#[test]
fn oci_tarball_has_the_image_config_and_is_accepted_by_skopeo_and_umoci() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c = BuildContext::new(
        r#"
FROM busybox
ENV GREETING=hi PATH2=/x
RUN true
WORKDIR /srv/app
COPY hello.txt .
USER user
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["cat hello.txt"]
"#,
    )
    .expect("context");
    c.file("hello.txt", "hello\n").expect("write");
    d.build(
        c.path(),
        &args(&["--output", "type=oci,dest=img.tar,name=kiln.test/hello:1"]),
    )
    .expect("build");
    let tar = c.path().join("img.tar");

    let inspect = run(Command::new("skopeo")
        .arg("inspect")
        .arg("--config")
        .arg(format!("oci-archive:{}", tar.display())))
    .expect("skopeo inspect --config");
    let cfg: serde_json::Value = serde_json::from_str(&inspect).expect("config json");
    let conf = &cfg["config"];
    let env: Vec<String> = conf["Env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|v| v.as_str().unwrap_or("").to_string())
        .collect();
    assert!(env.contains(&"GREETING=hi".to_string()), "{env:?}");
    assert!(
        env.iter().any(|e| e.starts_with("PATH=")),
        "base image PATH kept: {env:?}"
    );
    assert_eq!(conf["WorkingDir"], "/srv/app");
    assert_eq!(conf["User"], "user");
    assert_eq!(conf["Entrypoint"], serde_json::json!(["/bin/sh", "-c"]));
    assert_eq!(conf["Cmd"], serde_json::json!(["cat hello.txt"]));
    assert_eq!(cfg["os"], "linux");
    assert!(
        cfg["created"].as_str().is_some_and(|c| c.starts_with("20")),
        "created is the build time: {cfg}"
    );
    let history = cfg["history"].as_array().expect("history");
    assert!(history.len() >= 5, "history per instruction: {history:?}");
    let non_empty = history.iter().filter(|h| h["empty_layer"] != true).count();
    let diff_ids = cfg["rootfs"]["diff_ids"]
        .as_array()
        .expect("diff_ids")
        .len();
    assert_eq!(
        non_empty, diff_ids,
        "history entries with layers match diff_ids"
    );

    // the manifest and layers are valid for skopeo
    run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}", tar.display())))
    .expect("skopeo inspect");
    // umoci unpacks it and the rootfs is right
    let layout = c.path().join("layout");
    std::fs::create_dir_all(&layout).expect("mkdir");
    run(Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&layout))
    .expect("untar");
    let bundle = c.path().join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:kiln.test/hello:1", layout.display()))
        .arg(&bundle))
    .or_else(|_| {
        run(Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:1", layout.display()))
            .arg(&bundle))
    })
    .expect("umoci unpack");
    assert_eq!(read(bundle.join("rootfs/srv/app/hello.txt")), "hello\n");
}

#[test]
fn target_option_builds_only_the_named_stage() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c = BuildContext::new(
        r#"
FROM busybox AS base
RUN echo base > /base.txt

FROM base AS test
RUN echo test > /test.txt

FROM busybox
RUN exit 1
"#,
    )
    .expect("context");
    d.build(
        c.path(),
        &args(&["--opt", "target=test", "--output", "type=local,dest=out"]),
    )
    .expect("build");
    assert_eq!(read(c.path().join("out/test.txt")), "test\n");
    assert_eq!(read(c.path().join("out/base.txt")), "base\n");
}

/// `kiln build --build-context` as buildx takes it: a directory is synced as
/// a named context, `docker-image://` replaces a stage.
#[test]
fn build_context_flag_names_a_dir_and_replaces_a_stage() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c = BuildContext::new(
        "FROM busybox AS base\nRUN echo stage > /marker\n\
         FROM base AS final\nCOPY --from=extra x.txt /x.txt\n\
         RUN if [ -e /marker ]; then echo stage; else echo image; fi > /which\n\
         FROM scratch\nCOPY --from=final /which /x.txt /\n",
    )
    .expect("context");
    c.file("elsewhere/x.txt", "x\n").expect("write");
    let extra = format!("extra={}", c.path().join("elsewhere").display());
    d.build(
        c.path(),
        &args(&[
            "--build-context",
            &extra,
            "--build-context",
            "base=docker-image://busybox:latest",
            "--output",
            "type=local,dest=out",
        ]),
    )
    .expect("build");
    assert_eq!(read(c.path().join("out/x.txt")), "x\n");
    assert_eq!(read(c.path().join("out/which")), "image\n");
}

#[test]
fn scratch_image_with_copied_files_only() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c = BuildContext::new("FROM scratch\nCOPY a.txt /a.txt\nCOPY dir /dir\n").expect("context");
    c.file("a.txt", "a\n").expect("write");
    c.file("dir/x/y.txt", "y\n").expect("write");
    d.build(c.path(), &args(&["--output", "type=local,dest=out"]))
        .expect("build");
    let out = c.path().join("out");
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, vec!["a.txt", "dir"]);
    assert_eq!(read(out.join("dir/x/y.txt")), "y\n");
}

#[test]
fn run_as_user_from_the_image_passwd() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c =
        BuildContext::new("FROM busybox\nUSER user\nRUN id -u > /tmp/uid && id -g > /tmp/gid\n")
            .expect("context");
    d.build(c.path(), &args(&["--output", "type=local,dest=out"]))
        .expect("build");
    assert_eq!(read(c.path().join("out/tmp/uid")), "1000\n");
    assert_eq!(read(c.path().join("out/tmp/gid")), "1000\n");
}

#[test]
fn failing_run_reports_exit_code_and_dockerfile_line() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c = BuildContext::new("FROM busybox\n\nRUN echo before\nRUN echo oops >&2; exit 7\n")
        .expect("context");
    let mut a = vec!["build", "--progress", "plain"];
    a.extend(dockerfile_args());
    let out = d.kiln(c.path(), &a).expect("kiln");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exit code: 7"), "{err}");
    assert!(err.contains("oops"), "the step's output is shown: {err}");
    assert!(
        err.contains("exit 7"),
        "the failing command is named: {err}"
    );
    assert!(
        err.contains("Dockerfile:4"),
        "the Dockerfile line is named: {err}"
    );
    assert!(
        err.contains(">>> RUN echo oops"),
        "the failing line is shown: {err}"
    );
}

#[test]
fn unknown_instruction_names_the_line() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c = BuildContext::new("FROM busybox\nRUN true\nFROBNICATE now\n").expect("context");
    let mut a = vec!["build", "--progress", "plain"];
    a.extend(dockerfile_args());
    let out = d.kiln(c.path(), &a).expect("kiln");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("frobnicate"), "{err}");
    assert!(err.contains(":3"), "line 3 is named: {err}");
}

#[test]
fn short_form_builds_the_directory_and_prints_plain_progress() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    // the command's output ("short-2-ran") differs from its text
    let c = BuildContext::new("FROM busybox\nRUN echo short-$((1+1))-ran\n").expect("context");
    let out = d.build(c.path(), &["."]).expect("build");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("short-2-ran"), "{err}");
    // the base layer's download shows as a byte-progress line of the FROM step
    assert!(
        err.lines().any(|l| l.starts_with('#')
            && l.contains("sha256:")
            && l.contains(" / ")
            && l.ends_with(" done")),
        "layer download progress: {err}"
    );
    assert!(err.contains("#1 "), "{err}");
    assert!(err.contains("DONE"), "{err}");
    // the second build reuses every step
    let out = d.build(c.path(), &["."]).expect("build");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CACHED"), "{err}");
    assert!(
        !err.contains("short-2-ran"),
        "cached step must not run again: {err}"
    );
}

#[test]
fn pushed_image_can_be_pulled_by_the_next_build() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let reg = kiln_integration_tests::registry();
    let name = format!("{reg}/kiln-it/pushed:{}", std::process::id());
    let c = BuildContext::new(
        "FROM busybox\nRUN echo layer-one > /one.txt\nCMD [\"cat\", \"/one.txt\"]\n",
    )
    .expect("context");
    let out_arg = format!("type=image,name={name},push=true");
    d.build(
        c.path(),
        &args(&["--output", &out_arg, "--metadata-file", "md.json"]),
    )
    .expect("build");
    let md: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.path().join("md.json")).expect("md"))
            .expect("json");
    let digest = md["containerimage.digest"]
        .as_str()
        .expect("digest")
        .to_string();
    assert!(digest.starts_with("sha256:"));
    let inspect = run(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{name}")))
    .expect("skopeo inspect");
    let v: serde_json::Value = serde_json::from_str(&inspect).expect("json");
    assert_eq!(v["Digest"], digest);

    let c2 =
        BuildContext::new(&format!("FROM {name}\nRUN cat /one.txt > /two.txt\n")).expect("context");
    d.build(c2.path(), &args(&["--output", "type=local,dest=out"]))
        .expect("build");
    assert_eq!(read(c2.path().join("out/two.txt")), "layer-one\n");
}

#[test]
fn unchanged_context_is_cached_and_a_changed_file_reruns_only_what_reads_it() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c = BuildContext::new(
        "FROM busybox\nRUN echo base-$((2+3)) > /base\nCOPY input.txt /input.txt\nRUN cat /input.txt > /copy-$((1+1)).txt\n",
    )
    .expect("context");
    c.file("input.txt", "v1\n").expect("write");
    // outputs go outside the context, which must stay the same between builds
    let outs = tempfile::tempdir().expect("tmp");
    let build = |dest: &str| {
        let o = format!("type=local,dest={}", outs.path().join(dest).display());
        let out = d.build(c.path(), &args(&["--output", &o])).expect("build");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let first = build("out1");
    assert!(
        !first.contains("CACHED"),
        "a fresh daemon has nothing cached: {first}"
    );
    // same content, new mtime: everything is reused
    c.file("input.txt", "v1\n").expect("write");
    let second = build("out2");
    assert_eq!(
        second.matches("CACHED").count(),
        4,
        "FROM, RUN, COPY, RUN all cached:\n{second}"
    );
    assert_eq!(read(outs.path().join("out2/copy-2.txt")), "v1\n");
    // a changed file re-runs the COPY and what follows, not the RUN before it
    c.file("input.txt", "v2\n").expect("write");
    let third = build("out3");
    assert_eq!(
        third.matches("CACHED").count(),
        2,
        "FROM and the first RUN cached:\n{third}"
    );
    assert_eq!(read(outs.path().join("out3/copy-2.txt")), "v2\n");
}

#[test]
fn docker_tarball_is_loadable_with_repo_tags_and_several_outputs_in_one_build() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c =
        BuildContext::new("FROM busybox\nRUN echo docker > /d.txt\nCMD [\"cat\", \"/d.txt\"]\n")
            .expect("context");
    d.build(
        c.path(),
        &args(&[
            "--output",
            "type=docker,dest=img.docker.tar,name=kiln.test/docker:1",
            "--output",
            "type=local,dest=rootfs",
        ]),
    )
    .expect("build");
    let tar = c.path().join("img.docker.tar");
    let manifest: serde_json::Value =
        serde_json::from_slice(&tar_entry(&tar, "manifest.json").expect("manifest.json"))
            .expect("json");
    let tags = manifest[0]["RepoTags"].as_array().expect("RepoTags");
    assert!(
        tags.iter().any(|t| t
            .as_str()
            .is_some_and(|t| t.ends_with("kiln.test/docker:1"))),
        "{tags:?}"
    );
    let cfg = run(Command::new("skopeo")
        .args(["inspect", "--config"])
        .arg(format!("docker-archive:{}", tar.display())))
    .expect("skopeo inspect docker-archive");
    let cfg: serde_json::Value = serde_json::from_str(&cfg).expect("json");
    assert_eq!(cfg["config"]["Cmd"], serde_json::json!(["cat", "/d.txt"]));
    assert_eq!(read(c.path().join("rootfs/d.txt")), "docker\n");
}

#[test]
fn an_unchanged_context_reuses_its_snapshot_instead_of_copying_it_again() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c = BuildContext::new("FROM busybox\nCOPY . /ctx\n").expect("context");
    c.file("a.txt", "a\n").expect("write");
    let local_snapshots = || {
        let dir = d.dir.path().join("root/all/worker/snapshots");
        std::fs::read_dir(&dir)
            .expect("snapshots dir")
            .filter(|e| {
                let meta = e.as_ref().expect("entry").path().join("meta.json");
                std::fs::read_to_string(meta).is_ok_and(|m| m.contains("\"local\""))
            })
            .count()
    };
    d.build(c.path(), &args(&[])).expect("build");
    let after_first = local_snapshots();
    d.build(c.path(), &args(&[])).expect("build");
    assert_eq!(
        local_snapshots(),
        after_first,
        "an unchanged context must not add snapshots"
    );
    c.file("a.txt", "changed\n").expect("write");
    d.build(c.path(), &args(&[])).expect("build");
    assert_eq!(
        local_snapshots(),
        after_first + 1,
        "a changed context is a new snapshot"
    );
}

#[test]
fn fifty_chained_runs_stack_fifty_layers() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let mut df = String::from("FROM busybox\n");
    for i in 0..50 {
        df.push_str(&format!("RUN echo step-{i} >> /log\n"));
    }
    let c = BuildContext::new(&df).expect("context");
    d.build(
        c.path(),
        &args(&[
            "--output",
            "type=local,dest=out",
            "--output",
            "type=oci,dest=img.tar",
        ]),
    )
    .expect("build");
    let log = read(c.path().join("out/log"));
    assert_eq!(log.lines().count(), 50);
    assert_eq!(log.lines().last(), Some("step-49"));
    // one layer per RUN on top of busybox's, each RUN in the history
    let img = kiln_integration_tests::oci_image(&c.path().join("img.tar")).expect("oci image");
    let base = 1;
    let layers = img.manifest["layers"].as_array().expect("layers").len();
    assert_eq!(layers, base + 50, "{}", img.manifest);
    let diff_ids = img.config["rootfs"]["diff_ids"]
        .as_array()
        .expect("diff_ids");
    assert_eq!(diff_ids.len(), layers);
    let runs = img.config["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter(|h| {
            h["created_by"]
                .as_str()
                .is_some_and(|c| c.contains("echo step-"))
        })
        .count();
    assert_eq!(runs, 50);
}

#[test]
fn rawjson_progress_is_one_status_message_per_line() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let c = BuildContext::new("FROM busybox\nRUN echo raw-$((3*3))\n").expect("context");
    let mut a = vec!["build", "--progress", "rawjson"];
    a.extend(dockerfile_args());
    let out = d.kiln(c.path(), &a).expect("kiln");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let names: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["vertexes"].as_array())
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        names.iter().any(|n| n.contains("RUN echo raw-")),
        "{names:?}"
    );
    // logs carry the step's output base64-encoded, as buildctl's rawjson does
    let logged = lines
        .iter()
        .filter_map(|l| l["logs"].as_array())
        .flatten()
        .any(|l| l["data"] == "cmF3LTkK");
    assert!(logged, "the RUN's output `raw-9` is in a log entry");
}

/// Two client dirs whose Dockerfiles have the same size and mtime: each build
/// gets its own files (the worker keeps one copy per client dir, so a
/// metadata-only comparison never mixes projects).
#[test]
fn two_projects_with_look_alike_files_each_build_their_own() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let one = BuildContext::new("FROM busybox\nRUN echo proj-one\n").expect("context");
    let two = BuildContext::new("FROM busybox\nRUN echo proj-two\n").expect("context");
    // same size, same mtime: only the content tells them apart
    let when = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    for c in [&one, &two] {
        std::fs::File::options()
            .write(true)
            .open(c.path().join("Dockerfile"))
            .and_then(|f| f.set_modified(when))
            .expect("set mtime");
    }
    for (c, want, other) in [
        (&one, "proj-one", "proj-two"),
        (&two, "proj-two", "proj-one"),
    ] {
        let out = d.build(c.path(), &["."]).expect("build");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("RUN echo {want}")), "{err}");
        assert!(
            !err.contains(other),
            "built the other project's Dockerfile: {err}"
        );
    }
}

#[test]
fn annotations_from_output_attrs_reach_the_pushed_manifest() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let reg = kiln_integration_tests::registry();
    let name = format!("{reg}/kiln-it/annotated:{}", std::process::id());
    let c = BuildContext::new("FROM busybox\nRUN echo a > /a\n").expect("context");
    let out_arg = format!(
        "type=image,name={name},push=true,annotation.org.opencontainers.image.title=kiln-app,annotation-manifest[linux/s390x].other=no"
    );
    d.build(
        c.path(),
        &args(&["--output", &out_arg, "--metadata-file", "md.json"]),
    )
    .expect("build");
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{name}")))
    .expect("skopeo inspect --raw");
    let m: serde_json::Value = serde_json::from_str(&raw).expect("manifest");
    assert_eq!(
        m["annotations"]["org.opencontainers.image.title"], "kiln-app",
        "{raw}"
    );
    assert!(
        m["annotations"].get("other").is_none(),
        "another platform's: {raw}"
    );
    let md: serde_json::Value =
        serde_json::from_str(&read(c.path().join("md.json"))).expect("json");
    let inspect = run(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{name}")))
    .expect("skopeo inspect");
    let v: serde_json::Value = serde_json::from_str(&inspect).expect("json");
    assert_eq!(
        v["Digest"], md["containerimage.digest"],
        "the digest covers the annotations"
    );
}

/// Extended attributes travel as BuildKit's do: the context sends them (fsutil's
/// Stat.xattrs), COPY keeps them (through a stage too), the layer carries them as PAX
/// records, and a local export writes them back. A file capability set with `setcap`
/// is one; it survives the chown a COPY makes.
#[test]
fn copy_keeps_extended_attributes_and_file_capabilities() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let ctx = BuildContext::new(
        "FROM busybox AS b\nCOPY --chown=1000:1000 tool /t\nFROM busybox\nCOPY tool /tool\nCOPY --from=b /t /t2\n",
    )
    .expect("ctx");
    ctx.file("tool", "#!/bin/sh\n").expect("tool");
    let tool = ctx.path().join("tool");
    xattr::set(&tool, "user.kiln.note", b"hello").expect("setxattr");
    let st = Command::new("setcap")
        .arg("cap_net_raw=ep")
        .arg(&tool)
        .status()
        .expect("setcap");
    assert!(st.success());
    let caps = xattr::get(&tool, "security.capability")
        .expect("getxattr")
        .expect("a capability");
    let out = tempfile::tempdir().expect("out");
    let tar = out.path().join("image.tar");
    let local = out.path().join("fs");
    let mut a = vec!["build", "--progress", "plain"];
    a.extend(dockerfile_args());
    let o1 = format!("type=local,dest={}", local.display());
    let o2 = format!("type=oci,dest={},compression=uncompressed", tar.display());
    a.extend(["--output", &o1, "--output", &o2]);
    let res = d.kiln(ctx.path(), &a).expect("kiln");
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for f in ["tool", "t2"] {
        let p = local.join(f);
        assert_eq!(
            xattr::get(&p, "user.kiln.note").expect("get").as_deref(),
            Some(&b"hello"[..]),
            "{f}"
        );
        assert_eq!(
            xattr::get(&p, "security.capability")
                .expect("get")
                .as_deref(),
            Some(caps.as_slice()),
            "{f}: the file capability"
        );
    }
    // in the image's layers, as PAX records
    let img = kiln_integration_tests::oci_image(&tar).expect("image");
    let layers: Vec<String> = img.manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter_map(|l| l["digest"].as_str().map(str::to_string))
        .collect();
    let dir = tempfile::tempdir().expect("tmp");
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(dir.path())
        .status()
        .expect("tar");
    assert!(st.success());
    let mut found = 0;
    for l in &layers[layers.len() - 2..] {
        let blob = dir
            .path()
            .join("blobs/sha256")
            .join(l.trim_start_matches("sha256:"));
        let mut ar = tar::Archive::new(std::fs::File::open(&blob).expect("blob"));
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            let name = e.path().expect("path").display().to_string();
            if name != "tool" && name != "t2" {
                continue;
            }
            let keys: Vec<String> = e
                .pax_extensions()
                .expect("pax")
                .map(|x| {
                    x.filter_map(|r| r.ok())
                        .filter_map(|r| r.key().ok().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            assert!(
                keys.contains(&"SCHILY.xattr.security.capability".to_string())
                    && keys.contains(&"SCHILY.xattr.user.kiln.note".to_string()),
                "{name}: {keys:?}"
            );
            found += 1;
        }
    }
    assert_eq!(found, 2, "tool and t2 in the last two layers");
}
