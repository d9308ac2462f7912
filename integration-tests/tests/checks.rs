//! Build checks and frontend subrequests against a real kilnd: the Dockerfile
//! lint rules show as warnings in the build's progress (on the step that
//! loaded the Dockerfile, with BuildKit's level, detail, URL and source
//! lines), `kiln build` lists them at the end, `# check=error=true` fails the
//! build, and `requestid` subrequests (`kiln build --call`, or a raw
//! `Control.Solve` as `buildctl --opt requestid=frontend.lint` sends it)
//! answer with BuildKit's result metadata instead of building.

use std::process::Output;

use kiln_integration_tests::{BuildContext, Daemon, Topology, dockerfile_args};
use kiln_proto::moby::buildkit::v1::{
    BuildHistoryRequest, SolveRequest, control_client::ControlClient,
};
use kiln_session::attachable::{self, Attachables};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `kiln build ARGS` in `ctx` with the context and Dockerfile there.
fn build(d: &Daemon, ctx: &BuildContext, args: &[&str]) -> Output {
    let mut full = vec!["build"];
    full.extend(dockerfile_args());
    full.extend_from_slice(args);
    d.kiln(ctx.path(), &full).expect("run kiln")
}

/// Standard base64 decoded (how rawjson and Go's JSON carry bytes).
fn b64(s: &str) -> Vec<u8> {
    const T: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.chars().filter(|c| *c != '=') {
        let Some(v) = T.find(c) else { continue };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// A build check's warning reaches the client as BuildKit sends it (rawjson
/// shows the VertexWarning), and the plain output counts and lists them.
#[test]
fn build_checks_warn_on_the_dockerfile_step_and_kiln_lists_them() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let ctx = BuildContext::new("FROM busybox as base\nCMD echo hi\n").expect("context");
    let out = build(&d, &ctx, &["--progress", "rawjson"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let msgs: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let load = msgs
        .iter()
        .flat_map(|m| m["vertexes"].as_array().cloned().unwrap_or_default())
        .find(|v| v["name"] == "[internal] load build definition from Dockerfile")
        .expect("the Dockerfile's step");
    let warnings: Vec<serde_json::Value> = msgs
        .iter()
        .flat_map(|m| m["warnings"].as_array().cloned().unwrap_or_default())
        .collect();
    let shorts: Vec<String> = warnings
        .iter()
        .map(|w| text(&b64(w["short"].as_str().unwrap_or_default())))
        .collect();
    assert_eq!(
        shorts,
        [
            "FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)",
            "JSONArgsRecommended: JSON arguments recommended for CMD to prevent unintended behavior related to OS signals (line 2)",
        ]
    );
    let w = &warnings[0];
    assert_eq!(w["vertex"], load["digest"], "{w}");
    assert_eq!(w["level"], 1);
    assert_eq!(
        w["url"],
        "https://docs.docker.com/go/dockerfile/rule/from-as-casing/"
    );
    assert_eq!(
        text(&b64(w["detail"][0].as_str().unwrap_or_default())),
        "The 'as' keyword should match the case of the 'from' keyword"
    );
    assert_eq!(w["sourceInfo"]["filename"], "Dockerfile");
    assert_eq!(w["sourceInfo"]["language"], "Dockerfile");
    assert_eq!(w["range"][0]["start"]["line"], 1);

    let out = build(&d, &ctx, &["--progress", "plain"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            "\n 2 warnings found:\n - FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)\n - JSONArgsRecommended:"
        ),
        "{stderr}"
    );

    // the build history counts them (BuildKit's numWarnings)
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let counts: Vec<i32> = rt.block_on(async {
        let channel = kiln_session::dial::connect(&d.addr).await.expect("connect");
        let mut events = ControlClient::new(channel)
            .listen_build_history(BuildHistoryRequest {
                early_exit: true,
                ..Default::default()
            })
            .await
            .expect("history")
            .into_inner();
        let mut out = Vec::new();
        while let Ok(Some(ev)) = events.message().await {
            out.extend(ev.record.map(|r| r.num_warnings));
        }
        out
    });
    assert_eq!(counts, [2, 2], "both builds warned twice");
}

/// `# check=error=true` fails a build any check fires on, with BuildKit's
/// message; `skip=` silences rules; `BUILDKIT_DOCKERFILE_CHECK` replaces the
/// directive.
#[test]
fn check_directive_and_build_arg() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let ctx =
        BuildContext::new("# check=error=true\nFROM busybox as base\nRUN true\n").expect("context");
    let out = build(&d, &ctx, &["--progress", "plain"]);
    assert!(!out.status.success(), "a check fired with error=true");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("lint violation found for rules: FromAsCasing"),
        "{stderr}"
    );
    // --check reports the warnings, then fails as the build would
    let out = build(&d, &ctx, &["--check"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).starts_with("Check complete, 1 warning has been found!\n"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("lint violation found for rules: FromAsCasing"),
        "{}",
        text(&out.stderr)
    );
    // the build arg's config wins over the directive: no error, no rule skipped
    let out = build(
        &d,
        &ctx,
        &[
            "--progress",
            "plain",
            "--opt",
            "build-arg:BUILDKIT_DOCKERFILE_CHECK=skip=StageNameCasing",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(" 1 warning found:\n - FromAsCasing:"));

    let skipped = BuildContext::new(
        "# check=skip=FromAsCasing,JSONArgsRecommended;error=true\nFROM busybox as base\nCMD echo hi\n",
    )
    .expect("context");
    let out = build(&d, &skipped, &["--progress", "plain"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );

    // a COPY of a file .dockerignore leaves out warns (and then fails: the
    // file is not in the context)
    let ignored = BuildContext::new("FROM busybox\nCOPY notes.txt /\n").expect("context");
    ignored
        .file(".dockerignore", "*.txt\n")
        .expect("dockerignore");
    ignored.file("notes.txt", "hidden").expect("file");
    let out = build(&d, &ignored, &["--progress", "plain"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(
            " - CopyIgnoredFile: Attempting to Copy file \"notes.txt\" that is excluded by .dockerignore (line 2)"
        ),
        "{}",
        text(&out.stderr)
    );

    // UndefinedVar: the base image's env (PATH) and declared ARGs count as defined
    let vars = BuildContext::new(
        "FROM busybox\nARG VERSION=1\nARG DECLARED\nENV A=$DECLARED B=$PATH\nWORKDIR /app/$VERSON\n",
    )
    .expect("context");
    let out = build(&d, &vars, &["--progress", "plain"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(
            "\n 1 warning found:\n - UndefinedVar: Usage of undefined variable '$VERSON' (did you mean $VERSION?) (line 5)\n"
        ),
        "{}",
        text(&out.stderr)
    );

    let bad = BuildContext::new("# check=skipp=all\nFROM busybox\n").expect("context");
    let out = build(&d, &bad, &["--progress", "plain"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("failed to parse check options: invalid check option \"skipp\""),
        "{}",
        text(&out.stderr)
    );
}

/// `kiln build --call targets|check|outline|subrequests.describe` and `--check`
/// print what buildx prints and exit with the check's status.
#[test]
fn call_prints_targets_checks_and_subrequests() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let ctx = BuildContext::new("FROM busybox AS build\nRUN true\n\nFROM busybox as final\n")
        .expect("context");

    let out = build(&d, &ctx, &["--call", "targets"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "TARGET          DESCRIPTION\nbuild           \nfinal (default) \n"
    );

    let out = build(&d, &ctx, &["--check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "Check complete, 1 warning has been found!\n\n\
         WARNING: FromAsCasing - https://docs.docker.com/go/dockerfile/rule/from-as-casing/\n\
         'as' and 'FROM' keywords' casing do not match\n\
         Dockerfile:4\n--------------------\n   2 |     RUN true\n   3 |     \n   4 | >>> FROM busybox as final\n   5 |     \n--------------------\n"
    );
    let out = build(&d, &ctx, &["--call", "check,format=json"]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["warnings"][0]["ruleName"], "FromAsCasing");
    assert_eq!(
        json["warnings"][0]["location"]["ranges"][0]["start"]["line"],
        4
    );

    let clean = BuildContext::new("FROM busybox\nRUN true\n").expect("context");
    let out = build(&d, &clean, &["--call", "check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Check complete, no warnings found.\n");

    let out = build(&d, &clean, &["--call", "subrequests.describe"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("NAME                 VERSION DESCRIPTION\noutline "),
        "{}",
        text(&out.stdout)
    );

    let outlined = BuildContext::new(
        "ARG BASE=busybox\nFROM ${BASE} AS base\nARG GREETING=hi\nRUN --mount=type=secret,id=tok true\nFROM busybox AS unused\nARG NOPE\n",
    )
    .expect("context");
    let out = build(
        &d,
        &outlined,
        &["--call", "outline", "--opt", "target=base"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "TARGET: base\n\n\
         BUILD ARG   VALUE     DESCRIPTION\n\
         BASE        busybox   \n\
         GREETING    hi        \n\n\
         SECRET   REQUIRED\n\
         tok      \n\n"
    );

    let out = build(&d, &clean, &["--call", "convertllb"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("unsupported request frontend.convertllb"),
        "{}",
        text(&out.stderr)
    );
}

/// `--call targets` and `--call outline` describe stages and build args with
/// the comment lines right above their FROM or ARG that start with the name.
#[test]
fn call_targets_and_outline_show_descriptions_from_comments() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let ctx = BuildContext::new(
        "# syntax=docker/dockerfile:1\n# BASE the image to start from\nARG BASE=busybox\n\n# base sets things up\n# base (only the first such line counts)\nFROM ${BASE} AS base\nRUN true\n# test not this one: an empty comment starts over\n#\nFROM base AS test\n# release is what ships\n\nFROM base AS release\n# WHO who to greet\nARG WHO=world\nRUN echo $WHO\n",
    )
    .expect("context");
    let out = build(&d, &ctx, &["--call", "targets"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "TARGET            DESCRIPTION\nbase              sets things up\ntest              \nrelease (default) is what ships\n"
    );
    let out = build(&d, &ctx, &["--call", "outline"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "TARGET:      release\nDESCRIPTION: is what ships\n\n\
         BUILD ARG   VALUE     DESCRIPTION\n\
         BASE        busybox   the image to start from\n\
         WHO         world     who to greet\n\n"
    );
    let out = build(&d, &ctx, &["--call", "targets,format=json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["targets"][0]["description"], "sets things up");
    assert_eq!(json["targets"][1].get("description"), None);
}

/// A raw `Control.Solve` naming the frontend with `requestid=frontend.lint`
/// (buildctl's `--opt requestid=frontend.lint`): the response carries
/// BuildKit's subrequest metadata keys.
#[tokio::test(flavor = "multi_thread")]
async fn control_solve_with_requestid_answers_with_result_metadata() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let ctx = BuildContext::new("FROM busybox AS Base\nMAINTAINER me\n").expect("context");
    let channel = kiln_session::dial::connect(&d.addr).await.expect("connect");
    let session_id = uuid::Uuid::new_v4().simple().to_string();
    let mut att = Attachables::default();
    att.dirs.insert("context".into(), ctx.path().to_path_buf());
    att.dirs
        .insert("dockerfile".into(), ctx.path().to_path_buf());
    let _session = attachable::attach(channel.clone(), &session_id, "test", "", att)
        .await
        .expect("session");
    let solve = |request: &str| SolveRequest {
        r#ref: uuid::Uuid::new_v4().simple().to_string(),
        session: session_id.clone(),
        frontend: "dockerfile.v0".into(),
        frontend_attrs: [("requestid".to_string(), request.to_string())].into(),
        ..Default::default()
    };
    let resp = ControlClient::new(channel.clone())
        .solve(solve("frontend.lint"))
        .await
        .expect("lint subrequest")
        .into_inner()
        .exporter_response;
    assert_eq!(resp.get("result.statuscode").map(String::as_str), Some("1"));
    assert_eq!(resp.get("version").map(String::as_str), Some("1.0.0"));
    let json: serde_json::Value =
        serde_json::from_str(resp.get("result.json").map_or("", String::as_str))
            .expect("result.json");
    let rules: Vec<&str> = json["warnings"]
        .as_array()
        .map(|w| w.iter().filter_map(|w| w["ruleName"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(rules, ["StageNameCasing", "MaintainerDeprecated"]);
    assert_eq!(
        json["warnings"][1]["detail"],
        "Maintainer instruction is deprecated in favor of using label"
    );
    assert_eq!(
        text(&b64(json["sources"][0]["data"]
            .as_str()
            .unwrap_or_default())),
        "FROM busybox AS Base\nMAINTAINER me\n"
    );
    assert!(
        resp.get("result.txt")
            .is_some_and(|t| t.contains("WARNING: StageNameCasing - https://docs.docker.com/go/dockerfile/rule/stage-name-casing/")),
        "{resp:?}"
    );

    let resp = ControlClient::new(channel.clone())
        .solve(solve("frontend.targets"))
        .await
        .expect("targets subrequest")
        .into_inner()
        .exporter_response;
    let json: serde_json::Value =
        serde_json::from_str(resp.get("result.json").map_or("", String::as_str))
            .expect("result.json");
    assert_eq!(json["targets"][0]["name"], "base");
    assert_eq!(json["targets"][0]["default"], true);
}

/// `InvalidBaseImagePlatform`: a stage built for linux/amd64 on an image the
/// registry has for linux/arm64 only warns, naming the image as written and
/// both platforms, as BuildKit's does; the build goes on.
#[test]
fn a_base_image_of_another_platform_warns() {
    let d = Daemon::start(Topology::AllInOne).expect("daemon");
    let reg = kiln_integration_tests::registry();
    let name = format!("{reg}/kiln-it/arm64-only:{}", std::process::id());
    let base = BuildContext::new("FROM scratch\nCOPY Dockerfile /df\n").expect("context");
    let out_arg = format!("type=image,name={name},push=true");
    let out = build(
        &d,
        &base,
        &["--opt", "platform=linux/arm64", "--output", &out_arg],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let ctx = BuildContext::new(&format!("FROM {name}\nENV foo=bar\n")).expect("context");
    let out = build(
        &d,
        &ctx,
        &["--progress", "plain", "--opt", "platform=linux/amd64"],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let want = format!(
        "InvalidBaseImagePlatform: Base image {name} was pulled with platform \"linux/arm64\", expected \"linux/amd64\" for current build (line 1)"
    );
    assert!(stderr.contains(&want), "{stderr}");

    // the same image asked for its own platform does not warn
    let out = build(
        &d,
        &ctx,
        &["--progress", "plain", "--opt", "platform=linux/arm64"],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("InvalidBaseImagePlatform"), "{stderr}");
}
