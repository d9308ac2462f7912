//! Frontend images (`gateway.v0`): a frontend shipped as an image runs on a
//! worker with LLBBridge on its stdio. kiln's own Dockerfile frontend packaged
//! as an image (`kiln-frontend`) and a minimal test frontend that turns a JSON
//! list of commands into LLB, each built into an image by kiln and pushed to
//! the test registry.

use kiln_integration_tests::{BuildContext, Daemon, Topology};

/// The context and Dockerfile dirs, with `--frontend` given apart.
const LOCALS: [&str; 4] = ["--local", "context=.", "--local", "dockerfile=."];

/// Builds in `ctx` to `out/` with `extra` args (dockerfile.v0 unless they name
/// a frontend).
fn build_out(d: &Daemon, ctx: &BuildContext, extra: &[&str]) -> std::process::Output {
    let mut args: Vec<&str> = extra.to_vec();
    if !args.contains(&"--frontend") {
        args.extend(["--frontend", "dockerfile.v0"]);
    }
    args.extend(LOCALS);
    args.extend(["--output", "type=local,dest=out"]);
    d.build(ctx.path(), &args).expect("build")
}

#[test]
fn a_test_frontend_image_turns_json_commands_into_a_build() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let image = d
        .frontend_image("kiln-test-json-frontend", "json-frontend")
        .expect("frontend image");
    let ctx = BuildContext::new("").expect("context");
    ctx.file(
        "commands.json",
        r#"{"base": "busybox", "run": ["echo one > /one", "cat /one /one > /two"]}"#,
    )
    .expect("commands");
    let source = format!("source={image}");
    let out = build_out(&d, &ctx, &["--frontend", "gateway.v0", "--opt", &source]);
    assert_eq!(
        std::fs::read_to_string(ctx.path().join("out/two")).expect("out/two"),
        "one\none\n"
    );
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains(&format!("[internal] frontend {image}")),
        "{progress}"
    );

    // a frontend that stays after returning its result is stopped, and the build ends
    ctx.file(
        "commands.json",
        r#"{"base": "busybox", "run": ["echo late > /late"], "linger": true}"#,
    )
    .expect("commands");
    let t = std::time::Instant::now();
    build_out(&d, &ctx, &["--frontend", "gateway.v0", "--opt", &source]);
    assert!(t.elapsed() < std::time::Duration::from_secs(60));
    assert_eq!(
        std::fs::read_to_string(ctx.path().join("out/late")).expect("out/late"),
        "late\n"
    );

    // a failing request: the frontend's own error reaches the client
    ctx.file("commands.json", "not json").expect("commands");
    let mut args = vec!["build", "--frontend", "gateway.v0", "--opt", &source];
    args.extend(LOCALS);
    let out = d.kiln(ctx.path(), &args).expect("kiln");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("json frontend: commands.json"), "{err}");

    // no source: a clear error
    let out = d
        .kiln(ctx.path(), &["build", "--frontend", "gateway.v0"])
        .expect("kiln");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("gateway.v0 needs --opt source=IMAGE"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kilns_dockerfile_frontend_as_an_image_builds_by_gateway_and_by_syntax() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let image = d
        .frontend_image("kiln-frontend", "dockerfile-frontend")
        .expect("frontend image");
    let df = "FROM busybox AS base\nARG WHO=nobody\nRUN echo hello $WHO > /greeting\nFROM scratch\nCOPY --from=base /greeting /\n";
    let ctx = BuildContext::new(df).expect("context");
    let source = format!("source={image}");
    build_out(
        &d,
        &ctx,
        &[
            "--frontend",
            "gateway.v0",
            "--opt",
            &source,
            "--opt",
            "build-arg:WHO=gateway",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(ctx.path().join("out/greeting")).expect("out"),
        "hello gateway\n"
    );

    // `# syntax=IMAGE`: the built-in frontend hands the Dockerfile to that image
    let ctx = BuildContext::new(&format!("# syntax={image}\n{df}")).expect("context");
    let out = build_out(&d, &ctx, &["--opt", "build-arg:WHO=syntax"]);
    assert_eq!(
        std::fs::read_to_string(ctx.path().join("out/greeting")).expect("out"),
        "hello syntax\n"
    );
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains(&format!("[internal] frontend {image}")),
        "the image ran: {progress}"
    );
    // and the image's errors name the Dockerfile line
    let bad = BuildContext::new(&format!("# syntax={image}\nFROM busybox\nNOPE x\n")).expect("ctx");
    let mut args = vec!["build", "--frontend", "dockerfile.v0"];
    args.extend(LOCALS);
    let out = d.kiln(bad.path(), &args).expect("kiln");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Dockerfile:3"), "{err}");
}

#[test]
fn frontend_images_run_on_a_containerd_worker_too() {
    let Some(backend) = kiln_integration_tests::Backend::containerd() else {
        return;
    };
    let d = Daemon::start_on(Topology::AllInOne, &backend, "").expect("daemon");
    let image = d
        .frontend_image("kiln-test-json-frontend", "json-frontend")
        .expect("frontend image");
    let ctx = BuildContext::new("").expect("context");
    ctx.file(
        "commands.json",
        r#"{"base": "busybox", "run": ["echo on-containerd > /where"]}"#,
    )
    .expect("commands");
    let source = format!("source={image}");
    build_out(&d, &ctx, &["--frontend", "gateway.v0", "--opt", &source]);
    assert_eq!(
        std::fs::read_to_string(ctx.path().join("out/where")).expect("out/where"),
        "on-containerd\n"
    );
}
