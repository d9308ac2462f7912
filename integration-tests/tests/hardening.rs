//! What a crafted input must not do to the host: images pushed to the test
//! registry by the test itself, built from with a real kilnd.

use kiln_integration_tests::{BuildContext, Daemon, Topology, dockerfile_args, registry};
use std::path::Path;
use std::process::Command;

/// Pushes a one-layer image whose config claims `diff_id` to the test registry
/// as `REGISTRY/NAME:1`; returns the reference.
fn push_image_claiming(diff_id: &str, name: &str) -> String {
    let dir = tempfile::tempdir().expect("tmp");
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
    kiln_integration_tests::push_oci_image(
        name,
        &[(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            std::fs::read(&layer).expect("layer"),
        )],
        &[diff_id.to_string()],
    )
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

/// busybox's first `rootfs.diff_ids` entry, as the test registry serves it.
fn busybox_diff_id() -> String {
    let out = Command::new("skopeo")
        .args(["inspect", "--config", "--tls-verify=false"])
        .arg(format!("docker://{}/library/busybox:latest", registry()))
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).expect("config json");
    config["rootfs"]["diff_ids"][0]
        .as_str()
        .expect("a diff_id")
        .to_string()
}

#[test]
fn an_image_claiming_another_images_layer_poisons_no_later_build() {
    let claimed = busybox_diff_id();
    let image = push_image_claiming(&claimed, "evil/diffid-claim");
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let mut args = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    // the attacker's build pulls first: its layer is not what it claims
    let evil = BuildContext::new(&format!("FROM {image}\nRUN cat /hello\n")).expect("context");
    let out = d.kiln(evil.path(), &args).expect("kiln");
    assert!(!out.status.success(), "{}", d.logs());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("rootfs.diff_ids names {claimed}")),
        "{err}"
    );
    // the next build from the real image gets the real image's files
    let victim = BuildContext::new(
        "FROM busybox\nRUN test ! -e /hello && test -x /bin/busybox && echo real-busybox\n",
    )
    .expect("context");
    let out = d.kiln(victim.path(), &args).expect("kiln");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.logs()
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("real-busybox"));
}

/// Runs `kiln build` with `def` on stdin (raw LLB, as `buildctl build` reads it).
fn build_raw_llb(d: &Daemon, def: &kiln_proto::pb::Definition) -> std::process::Output {
    use prost::Message;
    let dir = tempfile::tempdir().expect("tempdir");
    kiln_integration_tests::kiln_build_llb(&d.addr, dir.path(), def.encode_to_vec(), &[])
}

#[test]
fn a_100000_op_chain_is_walked_without_taking_kilnd_down() {
    use kiln_proto::pb;
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let mut b = kiln_llb::DefinitionBuilder::new();
    // the bottom of the chain names an image that does not exist, so the walk
    // goes through every op without running 100,000 steps
    let missing = format!("docker-image://{}/nothing/here:none", registry());
    let mut top = b.add(
        pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: missing,
                ..Default::default()
            })),
            ..Default::default()
        },
        pb::OpMetadata::default(),
    );
    for i in 0..100_000 {
        top = b.add(
            pb::Op {
                inputs: vec![top],
                op: Some(pb::op::Op::File(pb::FileOp {
                    actions: vec![pb::FileAction {
                        input: 0,
                        secondary_input: -1,
                        output: 0,
                        action: Some(pb::file_action::Action::Mkdir(pb::FileActionMkDir {
                            path: format!("/d{i}"),
                            mode: 0o755,
                            ..Default::default()
                        })),
                    }],
                })),
                ..Default::default()
            },
            pb::OpMetadata::default(),
        );
    }
    let def = b.finish(Some(top));
    assert_eq!(def.def.len(), 100_002);
    let out = build_raw_llb(&d, &def);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("nothing/here"), "{err}\n{}", d.logs());
    // kilnd is still up and builds
    let ctx = BuildContext::new("FROM busybox\nRUN echo still-serving\n").expect("context");
    let mut args = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    let ok = d.kiln(ctx.path(), &args).expect("kiln");
    assert!(
        ok.status.success(),
        "kilnd went down:\n{}\n{}",
        String::from_utf8_lossy(&ok.stderr),
        d.logs()
    );
}

#[test]
fn a_step_writing_1gib_without_a_newline_is_clipped_and_costs_no_memory() {
    let mut backends = vec![kiln_integration_tests::Backend::Runc];
    backends.extend(kiln_integration_tests::Backend::containerd());
    for backend in backends {
        let d = Daemon::start_on(Topology::AllInOne, &backend, "").expect("daemon");
        let ctx = BuildContext::new(
            "FROM busybox\nRUN head -c 1073741824 /dev/zero | tr '\\0' x && echo >&2 wrote\"\"-it\n",
        )
        .expect("context");
        let mut args = vec!["build", "--progress", "plain"];
        args.extend(dockerfile_args());
        let out = d.kiln(ctx.path(), &args).expect("kiln");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{backend:?}: {}", d.logs());
        assert!(
            err.contains("[output clipped, log limit 2MiB reached]"),
            "{backend:?}: no clip note"
        );
        // the step ran to its end; only its log was clipped
        assert!(!err.contains("wrote-it"), "{backend:?}: log past the clip");
        let peak = d.peak_rss_kib();
        assert!(
            peak > 0 && peak < 300 * 1024,
            "{backend:?}: kilnd peaked at {peak} KiB"
        );
        let ok = d.kiln(ctx.path(), &["debug", "workers"]).expect("kiln");
        assert!(ok.status.success(), "{backend:?}: {}", d.logs());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn llb_naming_another_clients_session_reads_nothing_of_it() {
    use kiln_proto::pb;
    use kiln_session::attachable::{self, Attachables};
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    // a client with a context attached, as during its own build
    let victim = tempfile::tempdir().expect("tmp");
    std::fs::write(victim.path().join("secret.txt"), "victim's").expect("write");
    let mut att = Attachables::default();
    att.dirs
        .insert("context".into(), victim.path().to_path_buf());
    let victim_session = uuid::Uuid::new_v4().simple().to_string();
    let channel = kiln_session::dial::connect(&d.addr).await.expect("connect");
    let _held = attachable::attach(channel, &victim_session, "victim", "", att)
        .await
        .expect("session");
    // another client's raw LLB names that session for its local source
    let mut b = kiln_llb::DefinitionBuilder::new();
    let src = b.add(
        pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: "local://context".into(),
                attrs: [("local.session".to_string(), victim_session.clone())].into(),
            })),
            ..Default::default()
        },
        pb::OpMetadata::default(),
    );
    let def = b.finish(Some(src));
    let out = tempfile::tempdir().expect("tmp");
    let (addr, dest) = (d.addr.clone(), out.path().join("stolen"));
    let result = tokio::task::spawn_blocking(move || {
        use prost::Message;
        kiln_integration_tests::kiln_build_llb_to(&addr, def.encode_to_vec(), &dest)
    })
    .await
    .expect("join");
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "{err}");
    assert!(err.contains("not this build's"), "{err}");
    assert!(
        !out.path().join("stolen/secret.txt").exists(),
        "another client's context was read"
    );
}

/// Whether any file under `dir` holds `needle`.
fn any_file_holds(dir: &Path, needle: &[u8]) -> Option<std::path::PathBuf> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file()
                && let Ok(bytes) = std::fs::read(e.path())
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                return Some(e.path());
            }
        }
    }
    None
}

#[test]
fn build_args_are_not_kept_in_history() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
    // (an ARG the Dockerfile declares is in its RUNs' environment, and so in their
    // definitions, as with any builder; this one is passed but not declared)
    let ctx = BuildContext::new("FROM busybox\nRUN echo built\n").expect("ctx");
    let arg = format!("NPM_TOKEN={token}");
    let mut args = vec!["build", "--progress", "plain", "--build-arg", &arg];
    args.extend(dockerfile_args());
    let out = d.kiln(ctx.path(), &args).expect("kiln");
    assert!(out.status.success(), "{}", d.logs());
    let hist = d.kiln(ctx.path(), &["debug", "histories"]).expect("kiln");
    assert!(String::from_utf8_lossy(&hist.stdout).contains("Completed"));
    // nothing kilnd keeps (history, cache, logs) holds the value
    assert_eq!(any_file_holds(d.dir.path(), token.as_bytes()), None);
}

#[test]
fn a_steps_rootfs_keeps_set_id_files_working() {
    // kiln's own views of snapshots are nosuid,nodev; a step's rootfs is not, or
    // set-id programs of the image (su, ping, sudo) would stop working in RUN
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let ctx = BuildContext::new(
        "FROM busybox\nRUN awk '$5 == \"/\" {print \"root-opts=\" $6}' /proc/self/mountinfo && awk '$5 == \"/\"' /proc/self/mountinfo | grep -v nosuid\n",
    )
    .expect("context");
    let mut args = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    let out = d.kiln(ctx.path(), &args).expect("kiln");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("root-opts="));
}

#[test]
fn an_etc_passwd_that_is_a_device_node_is_not_read_forever() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    // /dev/zero as /etc/passwd: reading it for USER's name would never end
    let ctx = BuildContext::new(
        "FROM busybox\nRUN rm /etc/passwd && mknod /etc/passwd c 1 5\nUSER someone\nRUN id\n",
    )
    .expect("context");
    let mut args = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    let started = std::time::Instant::now();
    let out = d.kiln(ctx.path(), &args).expect("kiln");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("someone"), "{err}");
    let ok = d.kiln(ctx.path(), &["debug", "workers"]).expect("kiln");
    assert!(ok.status.success(), "{}", d.logs());
}
