//! `oci-layout://` named contexts against a real kilnd: `kiln build
//! --oci-layout NAME=DIR` serves an OCI layout (made by a kiln build's
//! `type=oci` output, unpacked) as a content store on its session, and a
//! Dockerfile's `FROM base` and `COPY --from=base` read the image from it
//! (`--opt context:base=oci-layout://NAME@sha256:…`, by tag, and buildx's
//! `--build-context base=oci-layout://DIR:TAG`), with the image's config
//! applied, with the frontend on the client's side or in the daemon; a
//! store the client does not serve, a digest it does not hold and a
//! reference without a digest fail with an error that says so; raw LLB
//! naming another client's session or store reads nothing of its layout.

use std::path::Path;
use std::process::Output;

use kiln_integration_tests::{BuildContext, Daemon, Topology, dockerfile_args, is_cached, run};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `kiln build ARGS` in `ctx` with the context and Dockerfile there.
fn build(d: &Daemon, ctx: &BuildContext, args: &[&str]) -> Output {
    let mut full = vec!["build", "--progress", "plain"];
    full.extend(dockerfile_args());
    full.extend_from_slice(args);
    d.kiln(ctx.path(), &full).expect("run kiln")
}

/// The image the layout's index.json names first.
fn layout_digest(layout: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json"))
            .expect("index json");
    index["manifests"][0]["digest"]
        .as_str()
        .expect("a digest")
        .to_string()
}

/// A base image with a file, an env var and a workdir, as an OCI layout
/// tagged `v1` in `dir`.
fn make_layout(d: &Daemon, dir: &Path) {
    let ctx = BuildContext::new(
        "FROM busybox\nCOPY hello.txt /hello.txt\nENV FROM_BASE=layout-env\nWORKDIR /work\n",
    )
    .expect("context");
    ctx.file("hello.txt", "hello from the layout\n")
        .expect("file");
    let tar = ctx.path().join("base.tar");
    let out = build(
        d,
        &ctx,
        &[
            "--output",
            &format!("type=oci,dest={},name=example.com/base:v1", tar.display()),
        ],
    );
    assert!(out.status.success(), "base: {}", text(&out.stderr));
    std::fs::create_dir_all(dir).expect("mkdir");
    run(std::process::Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(dir))
    .expect("untar");
}

const APP: &str = "FROM base\n\
RUN echo \"$FROM_BASE\" > /env.txt && pwd > /pwd.txt\n\
FROM scratch\n\
COPY --from=base /hello.txt /copied.txt\n\
COPY --from=0 /env.txt /pwd.txt /\n";

/// Builds APP with `args` into a fresh dir and checks what the layout's
/// image gave it; returns the build's progress.
fn check_app(d: &Daemon, args: &[&str], what: &str) -> String {
    let ctx = BuildContext::new(APP).expect("context");
    let out_dir = ctx.path().join("out");
    let dest = format!("type=local,dest={}", out_dir.display());
    let mut full = args.to_vec();
    full.extend(["--output", &dest]);
    let out = build(d, &ctx, &full);
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        text(&out.stderr),
        d.logs()
    );
    let read = |f: &str| std::fs::read_to_string(out_dir.join(f)).expect(f);
    assert_eq!(read("copied.txt"), "hello from the layout\n", "{what}");
    assert_eq!(read("env.txt"), "layout-env\n", "{what}: the config's Env");
    assert_eq!(
        read("pwd.txt"),
        "/work\n",
        "{what}: the config's WorkingDir"
    );
    text(&out.stderr)
}

fn named_contexts_read_the_clients_layout(topology: Topology) {
    let d = Daemon::start(topology).expect("daemon");
    let tmp = tempfile::tempdir().expect("tmp");
    let layout = tmp.path().join("layout");
    make_layout(&d, &layout);
    let digest = layout_digest(&layout);
    let store = format!("src={}", layout.display());

    let by_digest = format!("context:base=oci-layout://src@{digest}");
    let _ = check_app(
        &d,
        &["--oci-layout", &store, "--opt", &by_digest],
        "by digest",
    );
    let progress = check_app(
        &d,
        &[
            "--oci-layout",
            &store,
            "--opt",
            "context:base=oci-layout://src:v1",
        ],
        "by tag",
    );
    // the image is read from the client again, and what is built on it is
    // cached by its digest
    assert!(!is_cached(&progress, "OCI load from client"), "{progress}");
    assert!(is_cached(&progress, "RUN echo"), "{progress}");
    let _ = check_app(
        &d,
        &[
            "--daemon-frontend",
            "--oci-layout",
            &store,
            "--opt",
            &by_digest,
        ],
        "frontend in the daemon",
    );
    let buildx = format!("base=oci-layout://{}:v1", layout.display());
    let _ = check_app(&d, &["--build-context", &buildx], "--build-context");

    // a store the client does not serve
    let ctx = BuildContext::new(APP).expect("context");
    let nosuch = format!("context:base=oci-layout://nosuch@{digest}");
    let out = build(&d, &ctx, &["--oci-layout", &store, "--opt", &nosuch]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "unknown store built");
    assert!(err.contains("unknown store oci:nosuch"), "{err}");

    // a digest the layout does not hold
    let missing = format!("context:base=oci-layout://src@sha256:{}", "0".repeat(64));
    let out = build(&d, &ctx, &["--oci-layout", &store, "--opt", &missing]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "missing digest built");
    assert!(err.contains("not found"), "{err}");

    // no digest, and no store to look a tag up in
    let out = build(&d, &ctx, &["--opt", "context:base=oci-layout://nosuch:v1"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a reference without a digest built");
    assert!(err.contains("has no digest"), "{err}");

    // a digest that names a host file is no digest
    let out = build(
        &d,
        &ctx,
        &[
            "--oci-layout",
            &store,
            "--opt",
            "context:base=oci-layout://src@sha256:../../../etc/passwd",
        ],
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a path as digest built");
    assert!(
        err.contains("could not parse oci-layout reference"),
        "{err}"
    );
}

#[test]
fn oci_layout_named_contexts_all_in_one() {
    named_contexts_read_the_clients_layout(Topology::AllInOne);
}

#[test]
fn oci_layout_named_contexts_split_services() {
    named_contexts_read_the_clients_layout(Topology::Split);
}

/// Raw LLB whose `oci-layout://` source names another client's session (or
/// a store its own client does not serve) reads nothing of that client's
/// layout.
#[tokio::test(flavor = "multi_thread")]
async fn llb_naming_another_clients_layout_reads_nothing_of_it() {
    use kiln_proto::pb;
    use kiln_session::attachable::{self, Attachables};
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let victim = tempfile::tempdir().expect("tmp");
    let layout = victim.path().join("layout");
    make_layout(&d, &layout);
    let digest = layout_digest(&layout);
    let mut att = Attachables::default();
    att.content
        .stores
        .insert("oci:victim".into(), layout.clone());
    let victim_session = uuid::Uuid::new_v4().simple().to_string();
    let channel = kiln_session::dial::connect(&d.addr).await.expect("connect");
    let _held = attachable::attach(channel, &victim_session, "victim", "", att)
        .await
        .expect("session");
    let attempt = |session: Option<String>| {
        let mut attrs =
            std::collections::BTreeMap::from([("oci.store".to_string(), "victim".to_string())]);
        if let Some(s) = session {
            attrs.insert("oci.session".to_string(), s);
        }
        let mut b = kiln_llb::DefinitionBuilder::new();
        let src = b.add(
            pb::Op {
                op: Some(pb::op::Op::Source(pb::SourceOp {
                    identifier: format!("oci-layout://docker.io/library/x@{digest}"),
                    attrs,
                })),
                platform: Some(pb::Platform {
                    os: "linux".into(),
                    architecture: "amd64".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            pb::OpMetadata::default(),
        );
        let def = b.finish(Some(src));
        let out = tempfile::tempdir().expect("tmp");
        let (addr, dest) = (d.addr.clone(), out.path().join("stolen"));
        let result = std::thread::spawn(move || {
            use prost::Message;
            kiln_integration_tests::kiln_build_llb_to(&addr, def.encode_to_vec(), &dest)
        })
        .join()
        .expect("join");
        let stolen = out.path().join("stolen/hello.txt").exists();
        (result, stolen)
    };
    let (result, stolen) = attempt(Some(victim_session.clone()));
    let err = text(&result.stderr);
    assert!(!result.status.success(), "{err}");
    assert!(err.contains("not this build's"), "{err}");
    assert!(!stolen, "another client's layout was read");
    let (result, stolen) = attempt(None);
    let err = text(&result.stderr);
    assert!(!result.status.success(), "{err}");
    assert!(err.contains("unknown store oci:victim"), "{err}");
    assert!(!stolen, "another client's layout was read");
}
