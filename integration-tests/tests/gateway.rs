//! Client-side frontends, as BuildKit's clients run them: `buildctl build` and
//! buildx send `Control.Solve` with no frontend and no definition, keep it open,
//! and drive the build through the daemon's LLBBridge on the same connection,
//! naming the build in `buildkit-controlapi-buildid` metadata; `Return` hands
//! the result over and the daemon exports it. These tests make exactly those
//! calls against a real kilnd.

use kiln_integration_tests::{
    BuildContext, Daemon, Topology, bin_dir, dockerfile_args, mounts_under,
};
use kiln_proto::moby::buildkit::v1::frontend::{
    self as fe, llb_bridge_client::LlbBridgeClient, result::Result as FeResult,
};
use kiln_proto::moby::buildkit::v1::{
    Exporter, ListWorkersRequest, SolveRequest, StatusRequest, StatusResponse,
    control_client::ControlClient,
};
use kiln_proto::pb;
use kiln_session::attachable::{self, Attachables, OutputTarget};
use kiln_session::dial::Channel;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BUILD_ID_KEY: &str = "buildkit-controlapi-buildid";

/// An LLB definition that makes `/dir/hello.txt` ("hello gateway") and
/// `/dir/notes.md` on scratch with one FileOp.
fn files_definition() -> pb::Definition {
    let action = |input: i64, output: i64, a: pb::file_action::Action| pb::FileAction {
        input,
        secondary_input: -1,
        output,
        action: Some(a),
    };
    let mkfile = |path: &str, data: &str| {
        pb::file_action::Action::Mkfile(pb::FileActionMkFile {
            path: path.into(),
            mode: 0o644,
            data: data.as_bytes().to_vec(),
            ..Default::default()
        })
    };
    let op = pb::Op {
        op: Some(pb::op::Op::File(pb::FileOp {
            actions: vec![
                action(
                    -1,
                    -1,
                    pb::file_action::Action::Mkdir(pb::FileActionMkDir {
                        path: "/dir".into(),
                        mode: 0o755,
                        make_parents: true,
                        ..Default::default()
                    }),
                ),
                action(0, -1, mkfile("/dir/hello.txt", "hello gateway")),
                action(1, 0, mkfile("/dir/notes.md", "notes")),
            ],
        })),
        platform: Some(pb::Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut b = kiln_llb::DefinitionBuilder::new();
    let out = b.add(op, pb::OpMetadata::default());
    b.finish(Some(out))
}

/// One build driven the way BuildKit's Go client drives it.
struct ClientBuild {
    channel: Channel,
    build_id: String,
    solve: tokio::task::JoinHandle<Result<BTreeMap<String, String>, tonic::Status>>,
    status: tokio::task::JoinHandle<Vec<StatusResponse>>,
    _session: attachable::SessionHandle,
}

impl ClientBuild {
    /// Attaches a session with `att`, lists workers and starts the build's
    /// `Control.Solve` with no frontend and no definition.
    async fn start(
        addr: &str,
        att: Attachables,
        exporters: Vec<Exporter>,
        inputs: BTreeMap<String, pb::Definition>,
    ) -> ClientBuild {
        let channel = kiln_session::dial::connect(addr).await.expect("connect");
        let session_id = uuid::Uuid::new_v4().simple().to_string();
        let build_id = uuid::Uuid::new_v4().simple().to_string();
        let session = attachable::attach(channel.clone(), &session_id, "test", "", att)
            .await
            .expect("session");
        let workers = ControlClient::new(channel.clone())
            .list_workers(ListWorkersRequest::default())
            .await
            .expect("list workers")
            .into_inner();
        assert!(!workers.record.is_empty(), "ListWorkers lists no worker");
        let req = SolveRequest {
            r#ref: build_id.clone(),
            session: session_id,
            exporters,
            frontend_inputs: inputs,
            ..Default::default()
        };
        let mut ctl = ControlClient::new(channel.clone());
        let solve = tokio::spawn(async move {
            ctl.solve(req)
                .await
                .map(|r| r.into_inner().exporter_response.into_iter().collect())
        });
        let mut st = ControlClient::new(channel.clone());
        let id = build_id.clone();
        let status = tokio::spawn(async move {
            let mut out = Vec::new();
            if let Ok(resp) = st.status(StatusRequest { r#ref: id }).await {
                let mut s = resp.into_inner();
                while let Ok(Some(m)) = s.message().await {
                    out.push(m);
                }
            }
            out
        });
        ClientBuild {
            channel,
            build_id,
            solve,
            status,
            _session: session,
        }
    }

    fn bridge(&self) -> LlbBridgeClient<Channel> {
        LlbBridgeClient::new(self.channel.clone())
    }

    fn req<T>(&self, m: T) -> tonic::Request<T> {
        with_build_id(m, &self.build_id)
    }
}

fn with_build_id<T>(m: T, id: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert(BUILD_ID_KEY, id.parse().expect("metadata value"));
    r
}

fn single_ref(r: Option<fe::Result>) -> fe::Ref {
    match r.and_then(|r| r.result) {
        Some(FeResult::Ref(r)) => r,
        other => panic!("expected one ref, got {other:?}"),
    }
}

fn has_cap(caps: &[kiln_proto::moby::buildkit::v1::apicaps::ApiCap], id: &str) -> bool {
    caps.iter().any(|c| c.id == id && c.enabled)
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_llbbridge_calls_read_a_solved_definition_and_return_it_for_export() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let out = tempfile::tempdir().expect("tempdir");
    let mut att = Attachables::default();
    att.outputs
        .insert(0, OutputTarget::Dir(out.path().to_path_buf()));
    let input = files_definition();
    let b = ClientBuild::start(
        &d.addr,
        att,
        vec![Exporter {
            r#type: "local".into(),
            attrs: Default::default(),
        }],
        [("named".to_string(), input.clone())].into(),
    )
    .await;
    let mut gw = b.bridge();

    // Ping: the client reads the capabilities before anything else
    let pong = gw
        .ping(b.req(fe::PingRequest {}))
        .await
        .expect("ping")
        .into_inner();
    for cap in [
        "return",
        "readdir",
        "statfile",
        "gateway.evaluate",
        "frontend.inputs",
    ] {
        assert!(
            has_cap(&pong.frontend_api_caps, cap),
            "Ping lacks {cap}: {pong:?}"
        );
    }
    assert!(has_cap(&pong.llb_caps, "file.base"), "{pong:?}");
    // what kiln cannot do is not announced
    assert!(!has_cap(&pong.frontend_api_caps, "source.metaresolver"));
    assert!(!pong.workers.is_empty());

    // Inputs: the definitions of Control.Solve's FrontendInputs
    let inputs = gw
        .inputs(b.req(fe::InputsRequest {}))
        .await
        .expect("inputs")
        .into_inner();
    let named = inputs.definitions.get("named").expect("the named input");
    assert_eq!((&named.def, &named.metadata), (&input.def, &input.metadata));

    // Solve a definition: a ref that stands for it
    let solved = gw
        .solve(b.req(fe::SolveRequest {
            definition: Some(input.clone()),
            allow_result_return: true,
            allow_result_array_ref: true,
            ..Default::default()
        }))
        .await
        .expect("solve")
        .into_inner();
    let r = single_ref(solved.result);
    assert!(!r.id.is_empty());
    let def = r.def.as_ref().expect("the ref carries its definition");
    assert_eq!((&def.def, &def.metadata), (&input.def, &input.metadata));
    // no location entry without locations: a Go client would decode it as nil
    assert!(
        def.source
            .iter()
            .flat_map(|s| s.locations.values())
            .all(|l| !l.locations.is_empty())
    );

    gw.evaluate(b.req(fe::EvaluateRequest {
        r#ref: r.id.clone(),
    }))
    .await
    .expect("evaluate");

    let names = |entries: &[kiln_proto::fsutil::types::Stat]| -> Vec<String> {
        entries.iter().map(|e| e.path.clone()).collect()
    };
    let dir = gw
        .read_dir(b.req(fe::ReadDirRequest {
            r#ref: r.id.clone(),
            dir_path: "/dir".into(),
            ..Default::default()
        }))
        .await
        .expect("read dir")
        .into_inner();
    assert_eq!(names(&dir.entries), ["hello.txt", "notes.md"]);
    let txt = gw
        .read_dir(b.req(fe::ReadDirRequest {
            r#ref: r.id.clone(),
            dir_path: "dir".into(),
            include_pattern: "*.txt".into(),
            ..Default::default()
        }))
        .await
        .expect("read dir with a pattern")
        .into_inner();
    assert_eq!(names(&txt.entries), ["hello.txt"]);

    let stat = |path: &str| {
        let mut gw = gw.clone();
        let req = b.req(fe::StatFileRequest {
            r#ref: r.id.clone(),
            path: path.into(),
            ..Default::default()
        });
        async move {
            gw.stat_file(req)
                .await
                .expect("stat")
                .into_inner()
                .stat
                .expect("stat answer")
        }
    };
    let st = stat("/dir/hello.txt").await;
    assert_eq!(st.size, 13);
    assert_eq!(st.mode & 0o777, 0o644);
    assert_eq!(st.mode >> 31, 0, "a regular file, in Go's FileMode bits");
    let dst = stat("/dir").await;
    assert_eq!(dst.mode >> 31, 1, "a directory has Go's ModeDir bit");

    let part = gw
        .read_file(b.req(fe::ReadFileRequest {
            r#ref: r.id.clone(),
            file_path: "/dir/hello.txt".into(),
            range: Some(fe::FileRange {
                offset: 6,
                length: 7,
            }),
            ..Default::default()
        }))
        .await
        .expect("read file range")
        .into_inner();
    assert_eq!(part.data, b"gateway");
    // a path cannot leave the result's root
    let escape = gw
        .read_file(b.req(fe::ReadFileRequest {
            r#ref: r.id.clone(),
            file_path: "../../../../etc/hostname".into(),
            ..Default::default()
        }))
        .await;
    assert!(escape.is_err(), "read outside the result: {escape:?}");

    gw.warn(b.req(fe::WarnRequest {
        level: 1,
        short: b"a warning from the frontend".to_vec(),
        ..Default::default()
    }))
    .await
    .expect("warn");

    gw.r#return(b.req(fe::ReturnRequest {
        result: Some(fe::Result {
            result: Some(FeResult::Ref(r.clone())),
            metadata: Default::default(),
        }),
        error: None,
    }))
    .await
    .expect("return");
    b.solve
        .await
        .expect("solve task")
        .expect("the build's Solve succeeds once the result is returned");
    assert_eq!(
        std::fs::read_to_string(out.path().join("dir/hello.txt")).expect("exported file"),
        "hello gateway"
    );
    let progress = b.status.await.expect("status task");
    assert!(
        progress
            .iter()
            .flat_map(|s| &s.warnings)
            .any(|w| w.short == b"a warning from the frontend"),
        "the warning reaches the client's progress"
    );

    // the build is over: its id no longer opens LLBBridge
    let late = gw
        .ping(with_build_id(fe::PingRequest {}, &b.build_id))
        .await;
    assert_eq!(
        late.expect_err("ping after return").code(),
        tonic::Code::FailedPrecondition
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dockerfile_frontend_through_llbbridge_and_its_errors_fail_the_build() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let ctx = BuildContext::new("FROM busybox\nRUN echo from-run > /made\n").expect("context");
    let out = tempfile::tempdir().expect("tempdir");
    let mut att = Attachables::default();
    att.dirs.insert("context".into(), ctx.path().to_path_buf());
    att.dirs
        .insert("dockerfile".into(), ctx.path().to_path_buf());
    att.outputs
        .insert(0, OutputTarget::Dir(out.path().to_path_buf()));
    let b = ClientBuild::start(
        &d.addr,
        att,
        vec![Exporter {
            r#type: "local".into(),
            attrs: Default::default(),
        }],
        BTreeMap::new(),
    )
    .await;
    let mut gw = b.bridge();
    gw.ping(b.req(fe::PingRequest {})).await.expect("ping");
    // a subrequest kiln's frontend does not answer is refused, not built
    let sub = gw
        .solve(b.req(fe::SolveRequest {
            frontend: "dockerfile.v0".into(),
            frontend_opt: [("requestid".to_string(), "frontend.convertllb".to_string())].into(),
            allow_result_return: true,
            ..Default::default()
        }))
        .await
        .expect_err("a subrequest");
    assert!(
        sub.message()
            .contains("unsupported request frontend.convertllb"),
        "{sub:?}"
    );
    let solved = gw
        .solve(b.req(fe::SolveRequest {
            frontend: "dockerfile.v0".into(),
            allow_result_return: true,
            allow_result_array_ref: true,
            ..Default::default()
        }))
        .await
        .expect("dockerfile frontend")
        .into_inner();
    let res = solved.result.expect("result");
    assert!(
        res.metadata.contains_key("containerimage.config"),
        "the image config comes with the result: {:?}",
        res.metadata.keys().collect::<Vec<_>>()
    );
    let r = single_ref(Some(res.clone()));
    let made = gw
        .read_file(b.req(fe::ReadFileRequest {
            r#ref: r.id.clone(),
            file_path: "/made".into(),
            ..Default::default()
        }))
        .await
        .expect("read the RUN's output")
        .into_inner();
    assert_eq!(made.data, b"from-run\n");
    gw.r#return(b.req(fe::ReturnRequest {
        result: Some(res),
        error: None,
    }))
    .await
    .expect("return");
    b.solve.await.expect("task").expect("build");
    assert_eq!(
        std::fs::read_to_string(out.path().join("made")).expect("exported"),
        "from-run\n"
    );

    // a frontend error: the client returns it and the build's Solve fails with it
    let bad = BuildContext::new("FROM busybox\nFROBNICATE now\n").expect("context");
    let mut att = Attachables::default();
    att.dirs.insert("context".into(), bad.path().to_path_buf());
    att.dirs
        .insert("dockerfile".into(), bad.path().to_path_buf());
    let b = ClientBuild::start(&d.addr, att, vec![], BTreeMap::new()).await;
    let mut gw = b.bridge();
    let err = gw
        .solve(b.req(fe::SolveRequest {
            frontend: "dockerfile.v0".into(),
            allow_result_return: true,
            ..Default::default()
        }))
        .await
        .expect_err("unknown instruction");
    assert!(
        err.message().contains("FROBNICATE") || err.message().contains("unknown instruction"),
        "{err:?}"
    );
    gw.r#return(b.req(fe::ReturnRequest {
        result: None,
        error: Some(kiln_proto::google::rpc::Status {
            code: err.code() as i32,
            message: err.message().to_string(),
            details: vec![],
        }),
    }))
    .await
    .expect("return the error");
    let failed = b.solve.await.expect("task").expect_err("the build fails");
    assert_eq!(failed.message(), err.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn llbbridge_on_the_client_listener_only_serves_builds_waiting_for_their_client() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let ch = kiln_session::dial::connect(&d.addr).await.expect("connect");
    let mut gw = LlbBridgeClient::new(ch);
    // no build id at all
    let none = gw.ping(fe::PingRequest {}).await.expect_err("no build id");
    assert_eq!(none.code(), tonic::Code::InvalidArgument, "{none:?}");
    // a build id nobody started
    let t = Instant::now();
    let unknown = gw
        .solve(with_build_id(
            fe::SolveRequest {
                definition: Some(files_definition()),
                ..Default::default()
            },
            "no-such-build",
        ))
        .await
        .expect_err("unknown build");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn raw_llb_on_stdin_builds_like_buildctl() {
    use prost::Message;
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let dir = tempfile::tempdir().expect("tempdir");
    let def = files_definition().encode_to_vec();
    let out = kiln_integration_tests::kiln_build_llb(
        &d.addr,
        dir.path(),
        def,
        &["--output", "type=local,dest=out"],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.logs()
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out/dir/notes.md")).expect("exported"),
        "notes"
    );
    // an output index from the client never sizes anything: a clear error, and
    // the daemon goes on
    let mut huge = files_definition();
    {
        use prost::Message;
        let mut op = pb::Op::decode(huge.def[0].as_slice()).expect("op");
        if let Some(pb::op::Op::File(f)) = &mut op.op {
            f.actions[2].output = 1 << 40;
        }
        huge.def[0] = op.encode_to_vec();
        // the terminal op names the changed op by its new digest
        let dgst = kiln_llb::digest(&huge.def[0]);
        let mut terminal = pb::Op::decode(huge.def[1].as_slice()).expect("terminal");
        terminal.inputs[0].digest = dgst.clone();
        huge.def[1] = terminal.encode_to_vec();
        huge.metadata.clear();
        huge.source = None;
    }
    let mut child = Command::new(bin_dir().join("kiln"))
        .args(["--addr", &d.addr, "build", "--progress", "plain"])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&huge.encode_to_vec()).expect("write");
    }
    let out = child.wait_with_output().expect("kiln");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("output index 1099511627776"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alive = d.kiln(dir.path(), &["debug", "workers"]).expect("kiln");
    assert!(alive.status.success(), "kilnd went down:\n{}", d.logs());

    // not a definition: a clear error, nothing built
    let mut child = Command::new(bin_dir().join("kiln"))
        .args(["--addr", &d.addr, "build"])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"FROM busybox\n").expect("write");
    }
    let out = child.wait_with_output().expect("kiln");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("LLB definition"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether a build step with `marker` in its command line is running.
fn step_running(marker: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| {
                    let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                    args.len() >= 2 && args[0].ends_with(b"sleep") && args[1] == marker.as_bytes()
                })
                .unwrap_or(false)
        })
}

#[test]
fn a_client_that_goes_away_mid_build_leaves_nothing_running_and_prune_empties_the_cache() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let marker = "37.25";
    let ctx = BuildContext::new(&format!(
        "FROM busybox\nRUN echo one > /one\nRUN echo started && sleep {marker}\n"
    ))
    .expect("context");
    let mut args = vec!["--addr", d.addr.as_str(), "build", "--progress", "plain"];
    args.extend(dockerfile_args());
    args.extend(["--output", "type=local,dest=out"]);
    let mut child = Command::new(bin_dir().join("kiln"))
        .args(&args)
        .current_dir(ctx.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kiln");
    let t = Instant::now();
    while !step_running(marker) && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(step_running(marker), "the step never started\n{}", d.logs());
    child.kill().expect("kill the client");
    let _ = child.wait();
    let t = Instant::now();
    while step_running(marker) && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !step_running(marker),
        "the cancelled build's step still runs\n{}",
        d.logs()
    );
    // no build is left running, so prune takes everything
    let du_items = || -> Vec<String> {
        let du = d.kiln(ctx.path(), &["du"]).expect("du");
        String::from_utf8_lossy(&du.stdout)
            .lines()
            .filter(|l| {
                !(l.starts_with("ID")
                    || l.starts_with("Reclaimable:")
                    || l.starts_with("Total:")
                    || l.trim().is_empty())
            })
            .map(str::to_string)
            .collect()
    };
    assert!(
        !du_items().is_empty(),
        "the cancelled build cached its first steps"
    );
    let out = d.kiln(ctx.path(), &["prune", "--all"]).expect("prune");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = du_items();
    assert!(
        left.is_empty(),
        "prune --all left cache behind after a cancelled build: {left:?}"
    );
}

#[test]
fn the_daemon_side_frontend_path_still_builds_for_older_clients() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let ctx = BuildContext::new("FROM busybox\nRUN echo direct > /how\n").expect("context");
    let mut args = vec!["--daemon-frontend"];
    args.extend(dockerfile_args());
    args.extend(["--output", "type=local,dest=out"]);
    d.build(ctx.path(), &args).expect("build");
    assert_eq!(
        std::fs::read_to_string(ctx.path().join("out/how")).expect("exported"),
        "direct\n"
    );
}

fn image_definition(reference: &str) -> pb::Definition {
    kiln_llb::source_definition(&format!("docker-image://{reference}"), BTreeMap::new())
}

/// Runs `sh -c script` as process `pid` in container `c1` through
/// ExecProcess: (stdout, stderr, exit code, the order of the messages).
async fn run_process(
    b: &ClientBuild,
    pid: &str,
    script: &str,
    stdin: Option<&[u8]>,
    tty: bool,
    resize: Option<(u32, u32)>,
) -> (String, String, Option<u32>, Vec<&'static str>) {
    use fe::exec_message::Input as Msg;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let send = |m: Msg| fe::ExecMessage {
        process_id: pid.into(),
        input: Some(m),
    };
    let fds = if stdin.is_some() {
        vec![0, 1, 2]
    } else {
        vec![1, 2]
    };
    tx.send(send(Msg::Init(fe::InitMessage {
        container_id: "c1".into(),
        meta: Some(pb::Meta {
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/bin:/usr/bin".into()],
            ..Default::default()
        }),
        fds,
        tty,
        ..Default::default()
    })))
    .await
    .expect("init");
    if let Some((rows, cols)) = resize {
        tx.send(send(Msg::Resize(fe::ResizeMessage { rows, cols })))
            .await
            .expect("resize");
    }
    if let Some(data) = stdin {
        for (data, eof) in [(data.to_vec(), false), (vec![], true)] {
            tx.send(send(Msg::File(fe::FdMessage { fd: 0, eof, data })))
                .await
                .expect("stdin");
        }
    }
    let mut stream = b
        .bridge()
        .exec_process(b.req(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .expect("exec process")
        .into_inner();
    let (mut stdout, mut stderr, mut order) = (Vec::new(), Vec::new(), Vec::new());
    let mut exit = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(m) = tokio::time::timeout_at(deadline.into(), stream.message())
        .await
        .expect("the process reports in time")
        .expect("exec stream")
    {
        assert_eq!(m.process_id, pid);
        match m.input.expect("message") {
            Msg::Started(_) => order.push("started"),
            Msg::File(f) if f.eof => order.push(if f.fd == 1 { "eof1" } else { "eof2" }),
            Msg::File(f) if f.fd == 1 => stdout.extend(f.data),
            Msg::File(f) => stderr.extend(f.data),
            Msg::Exit(x) => {
                order.push("exit");
                exit = Some(x.code);
                // BuildKit's clients read the error of any exit but 0
                assert_eq!(
                    x.error.map(|e| e.message),
                    (x.code != 0).then(|| format!("exit code: {}", x.code))
                );
            }
            Msg::Done(_) => {
                order.push("done");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(tx);
    (
        String::from_utf8_lossy(&stdout).to_string(),
        String::from_utf8_lossy(&stderr).to_string(),
        exit,
        order,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frontend_runs_processes_in_containers_over_its_results() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let b = ClientBuild::start(&d.addr, Attachables::default(), vec![], BTreeMap::new()).await;
    let mut gw = b.bridge();
    let pong = gw
        .ping(b.req(fe::PingRequest {}))
        .await
        .expect("ping")
        .into_inner();
    assert!(has_cap(&pong.frontend_api_caps, "gateway.exec"));
    let solve = |def: pb::Definition| fe::SolveRequest {
        definition: Some(def),
        allow_result_return: true,
        ..Default::default()
    };
    let root = single_ref(
        gw.solve(b.req(solve(image_definition("docker.io/library/busybox:latest"))))
            .await
            .expect("busybox")
            .into_inner()
            .result,
    );
    let files = single_ref(
        gw.solve(b.req(solve(files_definition())))
            .await
            .expect("files")
            .into_inner()
            .result,
    );
    gw.new_container(b.req(fe::NewContainerRequest {
        container_id: "c1".into(),
        mounts: vec![
            pb::Mount {
                dest: "/".into(),
                result_id: root.id.clone(),
                ..Default::default()
            },
            pb::Mount {
                dest: "/data".into(),
                result_id: files.id.clone(),
                readonly: true,
                ..Default::default()
            },
        ],
        network: pb::NetMode::None as i32,
        ..Default::default()
    }))
    .await
    .expect("new container");

    let (stdout, stderr, exit, order) = run_process(
        &b,
        "p1",
        "cat /data/dir/hello.txt; read x; echo \" got $x\"; echo oops >&2; touch /data/no 2>/dev/null || echo read-only; echo kept > /tmp/made; exit 3",
        Some(b"typed\n"),
        false,
        None,
    )
    .await;
    assert_eq!(stdout, "hello gateway got typed\nread-only\n");
    assert_eq!(stderr, "oops\n");
    assert_eq!(exit, Some(3));
    assert_eq!(order.first(), Some(&"started"));
    assert_eq!(&order[order.len() - 2..], ["exit", "done"]);

    // a second process in the same container sees what the first wrote
    let (stdout, _, exit, _) = run_process(&b, "p2", "cat /tmp/made", None, false, None).await;
    assert_eq!((stdout.as_str(), exit), ("kept\n", Some(0)));
    // with Tty the process has a terminal, and its stderr comes on the same stream
    let (stdout, stderr, exit, _) =
        run_process(&b, "p3", "tty; echo on-err >&2", None, true, None).await;
    assert!(
        stdout.starts_with("/dev/pts/"),
        "{stdout:?} {stderr:?} {exit:?}"
    );
    assert!(stdout.contains("on-err"), "{stdout:?}");
    assert_eq!((stderr.as_str(), exit), ("", Some(0)));
    // Resize sets the terminal's size
    let (stdout, _, exit, _) =
        run_process(&b, "p4", "sleep 1; stty size", None, true, Some((33, 101))).await;
    assert_eq!((stdout.trim(), exit), ("33 101", Some(0)));
    // and so do the container filesystem calls (mount 0 is the root, 1 /data)
    let made = gw
        .read_file_container(b.req(fe::ReadFileRequest {
            r#ref: "c1".into(),
            file_path: "/tmp/made".into(),
            mount_index: 0,
            ..Default::default()
        }))
        .await
        .expect("read file in container")
        .into_inner();
    assert_eq!(made.data, b"kept\n");
    let listed = gw
        .read_dir_container(b.req(fe::ReadDirRequest {
            r#ref: "c1".into(),
            dir_path: "/dir".into(),
            mount_index: 1,
            ..Default::default()
        }))
        .await
        .expect("read dir in container")
        .into_inner();
    let names: Vec<&str> = listed.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(names, ["hello.txt", "notes.md"]);
    let st = gw
        .stat_file_container(b.req(fe::StatFileRequest {
            r#ref: "c1".into(),
            path: "/tmp/made".into(),
            mount_index: 0,
        }))
        .await
        .expect("stat in container")
        .into_inner()
        .stat
        .expect("stat");
    assert_eq!(st.size, 5);

    gw.release_container(b.req(fe::ReleaseContainerRequest {
        container_id: "c1".into(),
    }))
    .await
    .expect("release");
    let again = gw
        .release_container(b.req(fe::ReleaseContainerRequest {
            container_id: "c1".into(),
        }))
        .await
        .expect_err("released twice");
    assert_eq!(again.code(), tonic::Code::NotFound);

    // a container left to the build is released when the build ends
    gw.new_container(b.req(fe::NewContainerRequest {
        container_id: "c2".into(),
        mounts: vec![pb::Mount {
            dest: "/".into(),
            result_id: root.id.clone(),
            ..Default::default()
        }],
        ..Default::default()
    }))
    .await
    .expect("second container");
    assert!(!mounts_under(d.dir.path()).is_empty());
    b.solve.abort();
    drop(b);
    let t = Instant::now();
    while !mounts_under(d.dir.path()).is_empty() && t.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(mounts_under(d.dir.path()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn solve_cache_options_export_a_cache_and_attestations_are_warned_about() {
    // CacheOptions as buildctl sends them: an entry per export, attrs as given
    use kiln_proto::moby::buildkit::v1::{CacheOptions, CacheOptionsEntry};
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let channel = kiln_session::dial::connect(&d.addr).await.expect("connect");
    let id = uuid::Uuid::new_v4().simple().to_string();
    let reg = kiln_integration_tests::registry();
    let mut ctl = ControlClient::new(channel.clone());
    let req = SolveRequest {
        r#ref: id.clone(),
        definition: Some(files_definition()),
        frontend_attrs: [("attest:provenance".to_string(), "mode=min".to_string())].into(),
        cache: Some(CacheOptions {
            exports: vec![CacheOptionsEntry {
                r#type: "registry".into(),
                attrs: [
                    ("ref".to_string(), format!("{reg}/kiln-it/solve-cache:{id}")),
                    ("mode".to_string(), "max".to_string()),
                ]
                .into(),
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let solve = tokio::spawn(async move { ctl.solve(req).await });
    let mut st = ControlClient::new(channel)
        .status(StatusRequest { r#ref: id.clone() })
        .await
        .expect("status")
        .into_inner();
    let mut warnings = Vec::new();
    let mut vertices = Vec::new();
    while let Ok(Some(m)) = st.message().await {
        warnings.extend(
            m.warnings
                .iter()
                .map(|w| String::from_utf8_lossy(&w.short).to_string()),
        );
        vertices.extend(m.vertexes.iter().map(|v| v.name.clone()));
    }
    let resp = solve
        .await
        .expect("task")
        .expect("the build succeeds")
        .into_inner();
    assert!(
        vertices.iter().any(|v| v == "exporting cache to registry"),
        "{vertices:?}"
    );
    let desc: serde_json::Value =
        serde_json::from_str(&resp.exporter_response["cache.manifest"]).expect("cache.manifest");
    assert_eq!(
        desc["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert!(
        warnings.iter().any(|w| w.contains("attest:provenance")),
        "{warnings:?}"
    );
}
