//! Converter tests: BuildKit's own output for the Dockerfile fixtures in
//! `testdata/llb/dockerfile/*` (in the repo) is the expectation, plus targeted cases.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_llb::{Graph, pb};
use serde_json::Value;

use super::*;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/llb")
}

fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).expect("fixture json")
}

/// The canned resolver BuildKit's fixtures were produced with.
struct FakeResolver {
    calls: Mutex<Vec<String>>,
}

impl FakeResolver {
    fn new() -> Self {
        FakeResolver {
            calls: Mutex::new(Vec::new()),
        }
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("calls lock").clone()
    }
}

impl ImageResolver for FakeResolver {
    fn resolve(
        &self,
        reference: &str,
        _platform: &kiln_oci::Platform,
    ) -> impl Future<Output = Result<ResolvedImage, ResolveError>> + Send {
        self.calls
            .lock()
            .expect("calls lock")
            .push(reference.to_string());
        let dir = fixtures_dir().join("image-configs");
        let table = read_json(&dir.join("resolver.json"));
        let found = table
            .as_array()
            .expect("resolver.json array")
            .iter()
            .find(|e| e["ref"] == reference)
            .map(|e| {
                let config = std::fs::read(dir.join(e["config_file"].as_str().expect("file")))
                    .expect("config file");
                ResolvedImage {
                    canonical_ref: reference.to_string(),
                    digest: e["manifest_digest"].as_str().expect("digest").to_string(),
                    config: serde_json::from_slice(&config).expect("image config"),
                }
            });
        let reference = reference.to_string();
        async move { found.ok_or_else(|| format!("{reference}: not found").into()) }
    }
}

fn amd64() -> kiln_oci::Platform {
    kiln_oci::Platform::new("linux", "amd64", None)
}

fn options() -> ConvertOptions {
    ConvertOptions {
        platform: amd64(),
        filename: "Dockerfile".to_string(),
        ..Default::default()
    }
}

async fn run(df: &str, opts: &ConvertOptions) -> Result<(Converted, Graph), Error> {
    let converted = convert(df.as_bytes(), opts, &FakeResolver::new()).await?;
    let graph = kiln_llb::load(&converted.definition).expect("definition loads");
    Ok((converted, graph))
}

async fn ok(df: &str) -> (Converted, Graph) {
    match run(df, &options()).await {
        Ok(r) => r,
        Err(e) => panic!("convert failed: {e}"),
    }
}

fn exec_metas(g: &Graph) -> Vec<pb::Meta> {
    g.vertices
        .iter()
        .filter_map(|v| match &v.op.op {
            Some(pb::op::Op::Exec(e)) => e.meta.clone(),
            _ => None,
        })
        .collect()
}

fn file_actions(g: &Graph) -> Vec<pb::FileAction> {
    g.vertices
        .iter()
        .filter_map(|v| match &v.op.op {
            Some(pb::op::Op::File(f)) => Some(f.actions.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn copies(g: &Graph) -> Vec<pb::FileActionCopy> {
    file_actions(g)
        .into_iter()
        .filter_map(|a| match a.action {
            Some(pb::file_action::Action::Copy(c)) => Some(c),
            _ => None,
        })
        .collect()
}

fn sources(g: &Graph) -> Vec<String> {
    g.vertices
        .iter()
        .filter_map(|v| match &v.op.op {
            Some(pb::op::Op::Source(s)) => Some(s.identifier.clone()),
            _ => None,
        })
        .collect()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

const BUSYBOX: &str = "docker-image://docker.io/library/busybox:latest@sha256:53ac7b30790c6a5d02bdec3263363b09b0a3ed2102917dbc2f97a1b2e98143e9";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

/// Drops the attrs that differ only because the fixtures had no session.
fn normalize_local(op: &mut pb::Op) {
    if let Some(pb::op::Op::Source(s)) = &mut op.op {
        s.attrs.remove("local.unique");
        s.attrs.remove("local.session");
    }
}

/// Converts a fixture Dockerfile and compares every op (decoded, inputs mapped
/// through already-matched digests), each op's description, and the image
/// config (config section and history) with BuildKit's output.
async fn check_fixture(name: &str) {
    let dir = fixtures_dir().join("dockerfile").join(name);
    let dockerfile = std::fs::read(dir.join("Dockerfile")).expect("Dockerfile");
    let ops_json = read_json(&dir.join("ops.json"));
    let metadata = read_json(&dir.join("metadata.json"));
    let convert_json = read_json(&dir.join("convert.json"));

    let mut opts = options();
    if let Some(p) = convert_json["target_platform"]
        .as_str()
        .filter(|p| !p.starts_with("implicit"))
    {
        opts.platform = kiln_oci::Platform::parse(p).expect("fixture platform");
    }
    if let Some(t) = convert_json["target"].as_str() {
        opts.target = Some(t.to_string());
    }
    if let Some(args) = convert_json["build_args"].as_object() {
        for (k, v) in args {
            opts.build_args
                .insert(k.clone(), v.as_str().expect("build arg").to_string());
        }
    }
    let converted = convert(&dockerfile, &opts, &FakeResolver::new())
        .await
        .unwrap_or_else(|e| panic!("{name}: convert: {e}"));
    let ours = kiln_llb::load(&converted.definition).expect("our definition loads");

    let fixture_ops: Vec<Vec<u8>> = ops_json["ops"]
        .as_array()
        .expect("ops")
        .iter()
        .map(|o| hex_decode(o["hex"].as_str().expect("hex")))
        .collect();
    let theirs = kiln_llb::load(&pb::Definition {
        def: fixture_ops,
        ..Default::default()
    })
    .expect("fixture definition loads");

    assert_eq!(
        ours.vertices.len(),
        theirs.vertices.len(),
        "{name}: op count; ours: {:#?}",
        ours.vertices.iter().map(|v| &v.op).collect::<Vec<_>>()
    );
    let mut map: std::collections::BTreeMap<String, String> = Default::default();
    let mut exact = true;
    for (o, t) in ours.vertices.iter().zip(&theirs.vertices) {
        let mut want = t.op.clone();
        for input in &mut want.inputs {
            if let Some(d) = map.get(&input.digest) {
                input.digest = d.clone();
            }
        }
        let mut got = o.op.clone();
        normalize_local(&mut want);
        normalize_local(&mut got);
        assert_eq!(got, want, "{name}: op {} differs", t.digest);
        exact &= o.digest == t.digest;
        let want_desc = &metadata[&t.digest]["description"];
        let got_desc = serde_json::to_value(&o.metadata.description).expect("json");
        let want_desc = if want_desc.is_null() {
            serde_json::json!({})
        } else {
            want_desc.clone()
        };
        assert_eq!(got_desc, want_desc, "{name}: description of {}", t.digest);
        map.insert(t.digest.clone(), o.digest.clone());
    }
    let has_context = sources(&theirs).iter().any(|s| s.starts_with("local://"));
    if !has_context {
        assert!(
            exact,
            "{name}: every op should be byte-identical to BuildKit's"
        );
        assert_eq!(
            ours.result.as_ref().map(|r| r.digest.clone()),
            Some(
                ops_json["result"]["digest"]
                    .as_str()
                    .expect("result")
                    .to_string()
            ),
            "{name}: result digest"
        );
    }

    let want_image = &convert_json["result_image"];
    let got_image = serde_json::to_value(&converted.image_config).expect("image json");
    assert_eq!(
        got_image["config"], want_image["config"],
        "{name}: image config"
    );
    assert_eq!(
        got_image["history"], want_image["history"],
        "{name}: history"
    );
    assert_eq!(got_image["architecture"], want_image["architecture"]);
    assert_eq!(got_image["os"], want_image["os"]);
    assert_eq!(got_image["rootfs"]["type"], "layers");
}

#[tokio::test]
async fn fixture_busybox_run_cmd() {
    check_fixture("df-busybox-run-cmd").await;
}

#[tokio::test]
async fn fixture_scratch_entrypoint() {
    check_fixture("df-scratch-entrypoint").await;
}

#[tokio::test]
async fn fixture_target_stage() {
    check_fixture("df-target-stage").await;
}

#[tokio::test]
async fn fixture_workdir_user() {
    check_fixture("df-workdir-user").await;
}

#[tokio::test]
async fn fixture_multistage_copy_from() {
    check_fixture("df-multistage-copy-from").await;
}

#[tokio::test]
async fn fixture_arg_env_expansion() {
    check_fixture("df-arg-env-expansion").await;
}

#[tokio::test]
async fn fixture_copy_chown_chmod() {
    check_fixture("df-copy-chown-chmod").await;
}

#[tokio::test]
async fn fixture_heredoc() {
    check_fixture("df-heredoc").await;
}

#[tokio::test]
async fn fixture_run_network_security() {
    check_fixture("df-run-network-security").await;
}

#[tokio::test]
async fn fixture_run_mount_cache_tmpfs() {
    check_fixture("df-run-mount-cache-tmpfs").await;
}

#[tokio::test]
async fn fixture_run_mount_secret_ssh() {
    check_fixture("df-run-mount-secret-ssh").await;
}

#[tokio::test]
async fn fixture_run_mount_bind_from() {
    check_fixture("df-run-mount-bind-from").await;
}

#[tokio::test]
async fn fixture_platform_args() {
    check_fixture("df-platform-args").await;
}

#[tokio::test]
async fn fixture_onbuild_stage() {
    check_fixture("df-onbuild-stage").await;
}

#[tokio::test]
async fn fixture_onbuild_image() {
    check_fixture("df-onbuild-image").await;
}

#[tokio::test]
async fn fixture_copy_link() {
    check_fixture("df-copy-link").await;
}

#[tokio::test]
async fn fixture_copy_exclude_parents() {
    check_fixture("df-copy-exclude-parents").await;
}

#[tokio::test]
async fn fixture_add_local_and_remote() {
    check_fixture("df-add-local-and-remote").await;
}

#[tokio::test]
async fn busybox_run_shell_exec_and_cmd() {
    let (c, g) = ok("FROM busybox\nRUN echo hi\nRUN [\"ls\", \"-l\"]\nSHELL [\"/bin/ash\", \"-eo\"]\nRUN echo two\nCMD echo bye\n").await;
    assert_eq!(sources(&g), vec![BUSYBOX.to_string()]);
    let metas = exec_metas(&g);
    let args: Vec<Vec<String>> = metas.iter().map(|m| m.args.clone()).collect();
    assert_eq!(
        args,
        vec![
            strs(&["/bin/sh", "-c", "echo hi"]),
            strs(&["ls", "-l"]),
            strs(&["/bin/ash", "-eo", "echo two"]),
        ]
    );
    for m in &metas {
        assert_eq!(m.env, vec![PATH_ENV.to_string()]);
        assert_eq!(m.cwd, "/");
        assert_eq!(m.user, "");
        assert!(m.remove_mount_stubs_recursive);
    }
    let exec = g
        .vertices
        .iter()
        .find_map(|v| match &v.op.op {
            Some(pb::op::Op::Exec(e)) => Some((v, e.clone())),
            _ => None,
        })
        .expect("an exec");
    assert_eq!(
        exec.1.mounts,
        vec![pb::Mount {
            input: 0,
            dest: "/".into(),
            output: 0,
            ..Default::default()
        }]
    );
    assert_eq!(
        exec.0.op.platform.as_ref().map(|p| p.architecture.as_str()),
        Some("amd64")
    );
    assert_eq!(
        exec.0
            .metadata
            .description
            .get("llb.customname")
            .map(String::as_str),
        Some("[2/4] RUN echo hi")
    );
    assert_eq!(
        c.image_config.config.cmd,
        Some(strs(&["/bin/ash", "-eo", "echo bye"]))
    );
    assert_eq!(
        c.image_config.config.shell,
        Some(strs(&["/bin/ash", "-eo"]))
    );
    let created: Vec<String> = c
        .image_config
        .history
        .iter()
        .filter_map(|h| h.created_by.clone())
        .collect();
    assert_eq!(created[1], "RUN /bin/sh -c echo hi # buildkit");
    assert_eq!(created[2], "RUN ls -l # buildkit");
    assert_eq!(created[4], "RUN /bin/ash -eo echo two # buildkit");
    assert_eq!(created[5], r#"CMD ["/bin/ash" "-eo" "echo bye"]"#);
    assert!(c.image_config.rootfs.diff_ids.is_empty());
}

#[tokio::test]
async fn a_copy_between_stages_of_one_image_reads_one_input() {
    // both stages are the same vertex: BuildKit's LLB names it once
    let df = "FROM busybox AS src\nFROM busybox\nCOPY --from=src /bin/busybox /copied\n";
    let (_, g) = ok(df).await;
    let copy = g
        .vertices
        .iter()
        .find(|v| matches!(v.op.op, Some(pb::op::Op::File(_))))
        .expect("the COPY");
    assert_eq!(copy.op.inputs.len(), 1, "{:?}", copy.op.inputs);
    let actions = file_actions(&g);
    assert_eq!((actions[0].input, actions[0].secondary_input), (0, 0));
}

#[tokio::test]
async fn multistage_copy_from_name_and_index() {
    let df = "FROM busybox AS one\nRUN echo 1 > /one\n\nFROM scratch AS two\nCOPY --from=one /one /a\nCOPY --from=0 /one /b/\nFROM two\nCOPY --from=1 /a /c\n";
    let (c, g) = ok(df).await;
    let cs = copies(&g);
    assert_eq!(
        cs.iter()
            .map(|c| (c.src.as_str(), c.dest.as_str()))
            .collect::<Vec<_>>(),
        vec![("/one", "/a"), ("/one", "/b/"), ("/a", "/c")]
    );
    let actions = file_actions(&g);
    // First copy lands on scratch (input -1) reading the RUN result (input 0).
    assert_eq!((actions[0].input, actions[0].secondary_input), (-1, 0));
    assert_eq!((actions[1].input, actions[1].secondary_input), (0, 1));
    for c in &cs {
        assert!(c.follow_symlink && c.dir_copy_contents && c.create_dest_path);
        assert!(c.allow_wildcard && c.allow_empty_wildcard);
        assert_eq!((c.mode, c.timestamp), (-1, -1));
    }
    assert!(c.image_config.history.iter().all(|h| h.created_by.as_deref() != Some("busybox-static 1:1.35.0-4+deb12u1+b1 rootfs")));
    assert_eq!(c.image_config.config.working_dir, "/");
}

#[tokio::test]
async fn target_picks_stage_and_skips_unused_images() {
    let df = "FROM debian:bookworm AS unused\nRUN false\nFROM busybox AS wanted\nRUN echo ok\nFROM wanted\nRUN echo last\n";
    let resolver = FakeResolver::new();
    let mut opts = options();
    opts.target = Some("WANTED".to_string());
    let c = convert(df.as_bytes(), &opts, &resolver)
        .await
        .expect("convert");
    let g = kiln_llb::load(&c.definition).expect("load");
    assert_eq!(
        resolver.calls(),
        vec!["docker.io/library/busybox:latest".to_string()]
    );
    let args: Vec<Vec<String>> = exec_metas(&g).into_iter().map(|m| m.args).collect();
    assert_eq!(args, vec![strs(&["/bin/sh", "-c", "echo ok"])]);

    // Default target: the last stage, built on `wanted`.
    let (_, g) = ok(df).await;
    let args: Vec<Vec<String>> = exec_metas(&g).into_iter().map(|m| m.args).collect();
    assert_eq!(
        args,
        vec![
            strs(&["/bin/sh", "-c", "echo ok"]),
            strs(&["/bin/sh", "-c", "echo last"])
        ]
    );
    let names: Vec<String> = g
        .vertices
        .iter()
        .filter_map(|v| v.metadata.description.get("llb.customname").cloned())
        .collect();
    assert_eq!(
        names,
        vec![
            format!(
                "[wanted 1/2] FROM {}",
                BUSYBOX.trim_start_matches("docker-image://")
            ),
            "[wanted 2/2] RUN echo ok".to_string(),
            "[stage-2 1/1] RUN echo last".to_string(),
        ]
    );
}

#[tokio::test]
async fn workdir_user_env_arg() {
    let df = "FROM busybox\nARG NAME=world\nARG OVERRIDE=default\nENV GREETING=\"hello $NAME\" \\\n    HOME=/home/app\nWORKDIR $HOME\nWORKDIR sub\nUSER app:staff\nWORKDIR /data\nRUN echo $GREETING\n";
    let mut opts = options();
    opts.build_args.insert("OVERRIDE".into(), "given".into());
    opts.build_args.insert("UNDECLARED".into(), "x".into());
    let (c, g) = run(df, &opts).await.expect("convert");
    let metas = exec_metas(&g);
    assert_eq!(metas.len(), 1);
    let m = &metas[0];
    assert_eq!(m.args, strs(&["/bin/sh", "-c", "echo $GREETING"]));
    assert_eq!(
        m.env,
        strs(&[
            PATH_ENV,
            "NAME=world",
            "OVERRIDE=given",
            "GREETING=hello world",
            "HOME=/home/app"
        ])
    );
    assert_eq!(m.cwd, "/data");
    assert_eq!(m.user, "app:staff");
    let mkdirs: Vec<pb::FileActionMkDir> = file_actions(&g)
        .into_iter()
        .filter_map(|a| match a.action {
            Some(pb::file_action::Action::Mkdir(m)) => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(
        mkdirs.iter().map(|m| m.path.as_str()).collect::<Vec<_>>(),
        vec!["/home/app", "/home/app/sub", "/data"]
    );
    assert!(
        mkdirs
            .iter()
            .all(|m| m.make_parents && m.mode == 0o755 && m.timestamp == -1)
    );
    assert_eq!(mkdirs[0].owner, None);
    let named = |n: &str| pb::UserOpt {
        user: Some(pb::user_opt::User::ByName(pb::NamedUserOpt {
            name: n.into(),
            input: 0,
        })),
    };
    assert_eq!(
        mkdirs[2].owner,
        Some(pb::ChownOpt {
            user: Some(named("app")),
            group: Some(named("staff")),
        })
    );
    let cfg = &c.image_config.config;
    assert_eq!(
        cfg.env,
        strs(&[PATH_ENV, "GREETING=hello world", "HOME=/home/app"])
    );
    assert_eq!(cfg.working_dir, "/data");
    assert_eq!(cfg.user, "app:staff");
    let history: Vec<String> = c
        .image_config
        .history
        .iter()
        .filter_map(|h| h.created_by.clone())
        .collect();
    assert!(history.contains(&"ARG OVERRIDE=given".to_string()));
    assert!(history.contains(
        &"RUN |2 NAME=world OVERRIDE=given /bin/sh -c echo $GREETING # buildkit".to_string()
    ));
}

#[tokio::test]
async fn global_args_in_from() {
    let df = "ARG IMG=debian\nARG TAG\nFROM ${IMG}:${TAG:-bookworm}\nARG TAG\nRUN true\n";
    let (_, g) = ok(df).await;
    assert!(sources(&g)[0].starts_with("docker-image://docker.io/library/debian:bookworm@sha256:"));
    let mut opts = options();
    opts.build_args.insert("IMG".into(), "busybox".into());
    opts.build_args.insert("TAG".into(), "latest".into());
    let (_, g) = run(df, &opts).await.expect("convert");
    assert_eq!(sources(&g), vec![BUSYBOX.to_string()]);
    // A stage ARG without default takes the build arg.
    assert!(exec_metas(&g)[0].env.contains(&"TAG=latest".to_string()));
}

#[tokio::test]
async fn scratch_copy_entrypoint() {
    let mut opts = options();
    opts.session_id = "sess-1".to_string();
    let df = "FROM scratch\nWORKDIR /app\nCOPY --chmod=0755 bin/ ./\nCOPY --chown=1:2 a b ./sub/\nENTRYPOINT /app/run\n";
    let (c, g) = run(df, &opts).await.expect("convert");
    let local = g
        .vertices
        .iter()
        .find_map(|v| match &v.op.op {
            Some(pb::op::Op::Source(s)) => Some(s.clone()),
            _ => None,
        })
        .expect("local source");
    assert_eq!(local.identifier, "local://context");
    let attrs: Vec<(String, String)> = local.attrs.into_iter().collect();
    assert_eq!(
        attrs,
        vec![
            (
                "local.followpaths".to_string(),
                r#"["a","b","bin"]"#.to_string()
            ),
            ("local.session".to_string(), "sess-1".to_string()),
            ("local.sharedkeyhint".to_string(), "context".to_string()),
        ]
    );
    let actions = file_actions(&g);
    // mkdir on scratch, then copies; the two-source COPY chains its actions.
    assert_eq!(actions.len(), 4);
    let copy_actions: Vec<(i64, i64, i64)> = actions[1..]
        .iter()
        .map(|a| (a.input, a.secondary_input, a.output))
        .collect();
    assert_eq!(copy_actions, vec![(0, 1, 0), (0, 1, -1), (2, 1, 0)]);
    let cs = copies(&g);
    assert_eq!(cs[0].src, "/bin");
    assert_eq!(cs[0].dest, "/app/");
    assert_eq!(cs[0].mode, 0o755);
    assert_eq!(cs[1].dest, "/app/sub/");
    assert_eq!(
        cs[1].owner,
        Some(pb::ChownOpt {
            user: Some(pb::UserOpt {
                user: Some(pb::user_opt::User::ById(1))
            }),
            group: Some(pb::UserOpt {
                user: Some(pb::user_opt::User::ById(2))
            }),
        })
    );
    let cfg = &c.image_config.config;
    assert_eq!(cfg.entrypoint, Some(strs(&["/bin/sh", "-c", "/app/run"])));
    assert_eq!(cfg.cmd, None);
    assert_eq!(cfg.env, vec![PATH_ENV.to_string()]);
    assert_eq!(cfg.working_dir, "/app");
}

#[tokio::test]
async fn entrypoint_resets_inherited_cmd() {
    let (c, _) = ok("FROM busybox\nENTRYPOINT [\"/bin/echo\"]\n").await;
    assert_eq!(c.image_config.config.cmd, None);
    let (c, _) = ok("FROM busybox\nCMD [\"x\"]\nENTRYPOINT [\"/bin/echo\"]\n").await;
    assert_eq!(c.image_config.config.cmd, Some(strs(&["x"])));
    let (c, _) = ok("FROM busybox\n").await;
    assert_eq!(c.image_config.config.cmd, Some(strs(&["sh"])));
}

#[tokio::test]
async fn metadata_instructions() {
    let df = "FROM busybox\nLABEL a=1 \"b c\"=\"d e\"\nEXPOSE 80 53/udp\nVOLUME /data\nSTOPSIGNAL SIGINT\nMAINTAINER me\nHEALTHCHECK --interval=30s CMD true\nONBUILD RUN echo child\n";
    let (c, g) = ok(df).await;
    assert_eq!(
        g.vertices.len(),
        1,
        "metadata-only instructions emit no ops"
    );
    let cfg = &c.image_config.config;
    let labels = cfg.labels.clone().expect("labels");
    assert_eq!(labels.get("b c").map(String::as_str), Some("d e"));
    let ports: Vec<String> = cfg
        .exposed_ports
        .clone()
        .expect("ports")
        .into_keys()
        .collect();
    assert_eq!(ports, strs(&["53/udp", "80/tcp"]));
    assert!(
        cfg.volumes
            .as_ref()
            .is_some_and(|v| v.contains_key("/data"))
    );
    assert_eq!(cfg.stop_signal.as_deref(), Some("SIGINT"));
    assert_eq!(c.image_config.author.as_deref(), Some("me"));
    assert_eq!(
        cfg.healthcheck,
        Some(serde_json::json!({"Test": ["CMD-SHELL", "true"], "Interval": 30_000_000_000i64}))
    );
    assert_eq!(cfg.on_build, Some(strs(&["RUN echo child"])));
    assert_eq!(
        c.image_config.history[6].created_by.as_deref(),
        Some(r#"HEALTHCHECK &{["CMD-SHELL" "true"] "30s" "0s" "0s" "0s" '\x00'}"#)
    );
    let empties: Vec<Option<bool>> = c.image_config.history[1..]
        .iter()
        .map(|h| h.empty_layer)
        .collect();
    assert!(empties.iter().all(|e| *e == Some(true)));
    assert_eq!(
        c.image_config.history[2].created_by.as_deref(),
        Some("EXPOSE [53/udp 80/tcp]")
    );
}

/// The error's whole chain, as the gRPC edge sends it.
async fn err(df: &str) -> String {
    match run(df, &options()).await {
        Ok(_) => panic!("expected an error for {df:?}"),
        Err(e) => kiln_proto::status::chain(&e),
    }
}

#[tokio::test]
async fn errors_name_the_line() {
    let cases: &[(&str, &str)] = &[
        (
            "FROM busybox\nRUN true\nFROBNICATE x\n",
            "Dockerfile:3: unknown instruction: FROBNICATE",
        ),
        (
            "FROM busybox\n\nCOPY --from=nope /a /b\n",
            "Dockerfile:3: failed to resolve source metadata for docker.io/library/nope:latest: docker.io/library/nope:latest: not found",
        ),
        (
            "FROM busybox\nCOPY --from=3 /a /b\n",
            "Dockerfile:2: invalid stage index 3",
        ),
        (
            "FROM busybox AS a\nCOPY --from=b /x /y\nFROM busybox AS b\nFROM a\n",
            "Dockerfile:2: cannot copy from stage \"b\", it needs to be defined before current stage \"a\"",
        ),
        (
            "FROM nosuchimage\n",
            "Dockerfile:1: failed to resolve source metadata for docker.io/library/nosuchimage:latest: docker.io/library/nosuchimage:latest: not found",
        ),
        (
            "FROM busybox\nRUN echo ${X:?must be set}\nENV Y=${X:?unset}\n",
            "Dockerfile:3: failed to process \"${X:?unset}\": X: unset",
        ),
        (
            "FROM busybox\nEXPOSE 80/foo\n",
            "Dockerfile:2: EXPOSE: invalid port: \"80/foo\": invalid proto: foo",
        ),
        (
            "FROM busybox\nSTOPSIGNAL SIGNOPE\n",
            "Dockerfile:2: STOPSIGNAL: invalid signal: SIGNOPE",
        ),
        (
            "FROM busybox\nCOPY --chmod=abc a b\n",
            "Dockerfile:2: COPY: invalid chmod parameter: 'abc'. it should be octal string and between 0 and 07777",
        ),
        (
            "FROM busybox\nRUN --network=bogus true\n",
            "Dockerfile:2: RUN: unsupported network mode \"bogus\"",
        ),
        (
            "FROM busybox\nRUN --mount=type=cache true\n",
            "Dockerfile:2: RUN: mount target is required",
        ),
        (
            "FROM $NOPE\n",
            "Dockerfile:1: base name ($NOPE) should not be blank",
        ),
        (
            "FROM --platform=nosuchos busybox\n",
            "Dockerfile:1: failed to parse platform nosuchos: \"nosuchos\": unknown operating system or architecture",
        ),
        (
            "FROM busybox\nHEALTHCHECK --interval=5 CMD true\n",
            "Dockerfile:2: HEALTHCHECK --interval: missing unit in duration \"5\" (use ns, us, ms, s, m or h)",
        ),
        (
            "FROM busybox\nHEALTHCHECK --timeout=10us CMD true\n",
            "Dockerfile:2: HEALTHCHECK: Interval \"timeout\" cannot be less than 1ms",
        ),
        (
            "FROM busybox\nRUN --mount=type=tmpfs,target=/t,size=lots true\n",
            "Dockerfile:2: RUN: invalid value for size: lots",
        ),
        (
            "FROM Busybox\n",
            "Dockerfile:1: failed to parse stage name \"Busybox\": invalid reference format: repository name must be lowercase",
        ),
        (
            "RUN true\n",
            "Dockerfile:1: no build stage in current context: RUN before FROM",
        ),
        ("", "the Dockerfile cannot be empty"),
        ("# nothing\n", "file with no instructions"),
    ];
    for (df, want) in cases {
        let got = err(df).await;
        assert_eq!(&got, want, "dockerfile {df:?}");
    }
    let mut opts = options();
    opts.target = Some("missing".into());
    let e = run("FROM busybox AS a\n", &opts).await.expect_err("error");
    assert_eq!(e.to_string(), "target stage \"missing\" could not be found");
    assert_eq!(e.line(), None);
    let e = run("FROM busybox\n\nBAD x\n", &options())
        .await
        .expect_err("error");
    assert_eq!(e.line(), Some(3));
}

#[tokio::test]
async fn scratch_target_gives_empty_definition() {
    let (c, g) = ok("FROM scratch\nENV A=b\n").await;
    assert!(c.definition.def.is_empty());
    assert!(g.result.is_none());
    assert_eq!(
        c.image_config.config.env,
        strs(&[
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "A=b"
        ])
    );
}

#[tokio::test]
async fn source_locations_point_at_dockerfile_lines() {
    let (c, g) = ok("FROM busybox\n\nRUN a \\\n  b\n").await;
    let source = c.definition.source.clone().expect("source");
    assert_eq!(source.infos[0].filename, "Dockerfile");
    assert_eq!(source.infos[0].language, "Dockerfile");
    let exec = g
        .vertices
        .iter()
        .find(|v| matches!(v.op.op, Some(pb::op::Op::Exec(_))))
        .expect("exec");
    let ranges = &source.locations[&exec.digest].locations[0].ranges[0];
    assert_eq!(ranges.start.as_ref().map(|p| p.line), Some(3));
    assert_eq!(ranges.end.as_ref().map(|p| p.line), Some(4));
}

/// Converting mangled Dockerfiles returns errors, never panics.
#[tokio::test]
async fn mangled_dockerfiles_never_panic() {
    let dir = fixtures_dir().join("dockerfile");
    let mut samples = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("fixture dir") {
        let path = entry.expect("entry").path().join("Dockerfile");
        samples.push(std::fs::read_to_string(path).expect("Dockerfile"));
    }
    samples.sort();
    let resolver = FakeResolver::new();
    let mut seed: u64 = 42;
    for sample in &samples {
        let chars: Vec<char> = sample.chars().collect();
        for _ in 0..40 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut mangled = chars.clone();
            let at = (seed >> 33) as usize % mangled.len().max(1);
            match seed % 4 {
                0 => {
                    mangled.truncate(at);
                }
                1 => {
                    if at < mangled.len() {
                        mangled.remove(at);
                    }
                }
                2 => mangled.insert(
                    at.min(mangled.len()),
                    ['$', '{', '"', '\\', '\n', '-'][(seed >> 40) as usize % 6],
                ),
                _ => {
                    let tail: Vec<char> = mangled.split_off(at.min(mangled.len()));
                    mangled.extend(tail.iter().rev());
                }
            }
            let text: String = mangled.into_iter().collect();
            let _ = convert(text.as_bytes(), &options(), &resolver).await;
        }
    }
}

#[tokio::test]
async fn named_local_context_replaces_from_and_copy_from() {
    let mut opts = options();
    opts.session_id = "sess".to_string();
    opts.named_contexts =
        BTreeMap::from([("src".to_string(), NamedContext::Local("srcdir".to_string()))]);
    let (_, g) = run(
        "FROM busybox\nCOPY --from=src /a.txt /a.txt\nFROM src AS second\nCOPY --from=0 /a.txt /b.txt\n",
        &opts,
    )
    .await
    .expect("converts");
    let srcs = sources(&g);
    assert_eq!(
        srcs.iter().filter(|s| *s == "local://srcdir").count(),
        1,
        "one shared source for both uses: {srcs:?}"
    );
    assert!(!srcs.iter().any(|s| s == "local://context"), "{srcs:?}");
}

#[tokio::test]
async fn named_image_context_replaces_the_base_image() {
    let mut opts = options();
    opts.named_contexts = BTreeMap::from([(
        "alpine".to_string(),
        NamedContext::Image("busybox:latest".to_string()),
    )]);
    let resolver = FakeResolver::new();
    convert(b"FROM alpine\nRUN true\n", &opts, &resolver)
        .await
        .expect("converts");
    assert_eq!(resolver.calls(), ["docker.io/library/busybox:latest"]);
}

/// Answers OCI layout lookups with busybox's config, recording each.
struct LayoutResolver {
    calls: Mutex<Vec<(String, String)>>,
}

impl ImageResolver for LayoutResolver {
    fn resolve(
        &self,
        reference: &str,
        _platform: &kiln_oci::Platform,
    ) -> impl Future<Output = Result<ResolvedImage, ResolveError>> + Send {
        let reference = reference.to_string();
        async move { Err(format!("{reference}: not a layout").into()) }
    }

    fn resolve_oci_layout(
        &self,
        reference: &str,
        _platform: &kiln_oci::Platform,
        store: &str,
    ) -> impl Future<Output = Result<ResolvedImage, ResolveError>> + Send {
        self.calls
            .lock()
            .expect("calls lock")
            .push((reference.to_string(), store.to_string()));
        let config = serde_json::json!({"architecture": "amd64", "os": "linux",
            "config": {"Env": ["FROM_LAYOUT=1"], "WorkingDir": "/w"},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", "b".repeat(64))]}});
        let resolved = ResolvedImage {
            canonical_ref: reference.to_string(),
            digest: reference
                .rsplit_once('@')
                .map(|(_, d)| d.to_string())
                .unwrap_or_default(),
            config: serde_json::from_value(config).expect("config"),
        };
        async move { Ok(resolved) }
    }
}

#[tokio::test]
async fn oci_layout_context_is_an_oci_layout_source_with_the_image_config() {
    let digest = format!("sha256:{}", "a".repeat(64));
    let mut opts = options();
    opts.session_id = "sess".to_string();
    opts.named_contexts = BTreeMap::from([(
        "base".to_string(),
        NamedContext::parse(&format!("oci-layout://src:v1@{digest}")).expect("parses"),
    )]);
    let resolver = LayoutResolver {
        calls: Mutex::new(Vec::new()),
    };
    let conv = convert(
        b"FROM base\nRUN true\nFROM scratch\nCOPY --from=base /a /a\nCOPY --from=0 /b /b\n",
        &opts,
        &resolver,
    )
    .await
    .expect("converts");
    let g = kiln_llb::load(&conv.definition).expect("loads");
    let reference = format!("docker.io/library/base@{digest}");
    assert_eq!(
        resolver.calls.lock().expect("calls").clone(),
        [(reference.clone(), "src".to_string())],
        "resolved once for FROM and COPY --from"
    );
    let layouts: Vec<&pb::SourceOp> = g
        .vertices
        .iter()
        .filter_map(|v| match &v.op.op {
            Some(pb::op::Op::Source(s)) if s.identifier.starts_with("oci-layout://") => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(layouts.len(), 1, "one source for both uses");
    assert_eq!(layouts[0].identifier, format!("oci-layout://{reference}"));
    assert_eq!(
        layouts[0].attrs,
        BTreeMap::from([
            ("oci.session".to_string(), "sess".to_string()),
            ("oci.store".to_string(), "src".to_string()),
        ])
    );
    let meta = &exec_metas(&g)[0];
    assert!(
        meta.env.iter().any(|e| e == "FROM_LAYOUT=1"),
        "{:?}",
        meta.env
    );
    assert_eq!(meta.cwd, "/w");
}

#[test]
fn oci_layout_contexts_need_a_digest_and_a_store_name() {
    let digest = format!("sha256:{}", "a".repeat(64));
    assert_eq!(
        NamedContext::parse(&format!("oci-layout://src@{digest}")),
        Ok(NamedContext::OciLayout {
            store: "src".to_string(),
            digest: digest.clone()
        })
    );
    assert!(matches!(
        NamedContext::parse("oci-layout://src:v1"),
        Err(NamedContextError::OciLayoutNoDigest { .. })
    ));
    for bad in [
        "oci-layout://src@sha256:../../etc/passwd".to_string(),
        format!("oci-layout://../src@{digest}"),
        format!("oci-layout://@{digest}"),
    ] {
        assert!(
            matches!(
                NamedContext::parse(&bad),
                Err(NamedContextError::InvalidOciLayout { .. })
            ),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn source_date_epoch_sets_created_times() {
    let mut opts = options();
    opts.build_args = BTreeMap::from([("SOURCE_DATE_EPOCH".to_string(), "1700000000".to_string())]);
    let (conv, _) = run("FROM busybox\nENV A=1\nRUN true\n", &opts)
        .await
        .expect("converts");
    let img = conv.image_config;
    assert_eq!(img.created.as_deref(), Some("2023-11-14T22:13:20Z"));
    assert!(!img.history.is_empty());
    for h in &img.history {
        let c = h.created.as_deref().expect("history created");
        assert!(c <= "2023-11-14T22:13:20Z", "{c}");
    }
    assert_eq!(
        img.history.last().and_then(|h| h.created.as_deref()),
        Some("2023-11-14T22:13:20Z")
    );

    opts.build_args
        .insert("SOURCE_DATE_EPOCH".to_string(), "soon".to_string());
    assert!(matches!(
        run("FROM busybox\n", &opts).await,
        Err(Error::InvalidSourceDateEpoch { .. })
    ));
}

#[test]
fn rfc3339_of_epochs() {
    assert_eq!(super::rfc3339_utc(0), "1970-01-01T00:00:00Z");
    assert_eq!(super::rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(super::rfc3339_utc(1_700_000_000), "2023-11-14T22:13:20Z");
}

#[tokio::test]
async fn proxy_build_args_become_proxy_env_not_env() {
    let mut opts = options();
    opts.build_args = BTreeMap::from([
        ("HTTP_PROXY".to_string(), "http://p:3128".to_string()),
        ("no_proxy".to_string(), "localhost".to_string()),
    ]);
    let (conv, g) = run("FROM busybox\nRUN true\n", &opts)
        .await
        .expect("converts");
    let meta = &exec_metas(&g)[0];
    let pe = meta.proxy_env.as_ref().expect("proxy env");
    assert_eq!(pe.http_proxy, "http://p:3128");
    assert_eq!(pe.no_proxy, "localhost");
    assert!(
        !meta
            .env
            .iter()
            .any(|e| e.contains("PROXY") || e.contains("proxy"))
    );
    assert!(
        !conv
            .image_config
            .config
            .env
            .iter()
            .any(|e| e.to_ascii_lowercase().contains("proxy"))
    );

    let (_, g) = run("FROM busybox\nRUN true\n", &options())
        .await
        .expect("converts");
    assert!(exec_metas(&g)[0].proxy_env.is_none());
}

#[tokio::test]
async fn add_git_becomes_a_git_source_copied_from_its_root() {
    let (_, g) = ok(
        "FROM busybox\nADD --keep-git-dir=true --checksum=abc123 https://example.com/r.git#v1:sub /src\n",
    )
    .await;
    let git: Vec<pb::SourceOp> = g
        .vertices
        .iter()
        .filter_map(|v| match &v.op.op {
            Some(pb::op::Op::Source(s)) if s.identifier.starts_with("git://") => Some(s.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(git.len(), 1, "{:?}", sources(&g));
    assert_eq!(git[0].identifier, "git://example.com/r.git#v1:sub");
    assert_eq!(git[0].attrs["git.fullurl"], "https://example.com/r.git");
    assert_eq!(git[0].attrs["git.keepgitdir"], "true");
    assert_eq!(git[0].attrs["git.checksum"], "abc123");
    let c = &copies(&g)[0];
    assert_eq!((c.src.as_str(), c.dest.as_str()), ("/", "/src"));
    assert!(c.create_dest_path && !c.dir_copy_contents);

    let err = run(
        "FROM busybox\nCOPY https://example.com/r.git /src\n",
        &options(),
    )
    .await
    .expect_err("COPY of a git ref");
    assert!(err.to_string().contains("git ref for COPY"), "{err}");
}

#[tokio::test]
async fn stage_cycles_are_errors() {
    let err = run("FROM busybox AS a\nCOPY --from=a /x /y\n", &options())
        .await
        .expect_err("self reference");
    assert!(
        matches!(err, Error::CircularStage { ref stage, .. } if stage == "a"),
        "{err}"
    );
    let err = run(
        "FROM busybox AS a\nCOPY --from=b /x /x\nFROM busybox AS b\nCOPY --from=a /y /y\n",
        &options(),
    )
    .await
    .expect_err("two-stage cycle");
    assert!(matches!(err, Error::CircularStage { .. }), "{err}");
}

#[tokio::test]
async fn syntax_directive_other_than_dockerfile_is_refused() {
    ok("# syntax=docker/dockerfile:1.7-labs\nFROM busybox\n").await;
    let err = run("# syntax=example.com/fe:1\nFROM busybox\n", &options())
        .await
        .expect_err("external frontend");
    assert_eq!(err.line(), Some(1));
    assert!(err.to_string().contains("example.com/fe:1"), "{err}");
}

#[tokio::test]
async fn ssh_auth_sock_is_the_first_ssh_mount_unless_set() {
    let (_, g) =
        ok("FROM busybox\nRUN --mount=type=ssh,target=/a.sock --mount=type=ssh,id=b true\n").await;
    assert!(
        exec_metas(&g)[0]
            .env
            .contains(&"SSH_AUTH_SOCK=/a.sock".to_string())
    );
    let (_, g) = ok("FROM busybox\nENV SSH_AUTH_SOCK=/mine\nRUN --mount=type=ssh true\n").await;
    let env = &exec_metas(&g)[0].env;
    assert!(env.contains(&"SSH_AUTH_SOCK=/mine".to_string()), "{env:?}");
    assert_eq!(
        env.iter()
            .filter(|e| e.starts_with("SSH_AUTH_SOCK="))
            .count(),
        1
    );
}

#[test]
fn a_frontend_image_is_found_in_a_dockerfile_kiln_cannot_parse() {
    let none = std::collections::BTreeMap::new();
    let df = b"# syntax=registry.example/fe:1 --flag\nFROM busybox\nRUN <<EOF\nnever ends\n";
    let img = super::frontend_image(df, &none).expect("the image it names");
    assert_eq!(img.reference, "registry.example/fe:1");
    assert_eq!(img.cmdline, "registry.example/fe:1 --flag");
    assert_eq!(
        img.origin,
        "Dockerfile:1: # syntax=registry.example/fe:1 --flag"
    );
    let arg = std::collections::BTreeMap::from([(
        "BUILDKIT_SYNTAX".to_string(),
        "registry.example/other:2".to_string(),
    )]);
    let img = super::frontend_image(df, &arg).expect("the build arg wins");
    assert_eq!(
        img.origin,
        "build-arg BUILDKIT_SYNTAX=registry.example/other:2"
    );
    // the Dockerfile frontend is built in
    assert!(super::frontend_image(b"# syntax=docker/dockerfile:1.7\nFROM x\n", &none).is_none());
    assert!(super::frontend_image(b"FROM x\n", &none).is_none());
}

#[tokio::test]
async fn label_options_are_set_on_the_image_over_the_dockerfiles() {
    let mut opts = options();
    opts.labels = BTreeMap::from([
        ("a".to_string(), "from-opt".to_string()),
        ("org.example".to_string(), "yes".to_string()),
    ]);
    let (c, _) = run("FROM busybox\nLABEL a=1 b=2\n", &opts)
        .await
        .expect("convert");
    let labels = c.image_config.config.labels.expect("labels");
    assert_eq!(labels.get("a").map(String::as_str), Some("from-opt"));
    assert_eq!(labels.get("b").map(String::as_str), Some("2"));
    assert_eq!(labels.get("org.example").map(String::as_str), Some("yes"));
}

/// Many stages on one base ask the resolver once per distinct image (and
/// platform), not once per stage; each stage still gets its base.
#[tokio::test]
async fn each_distinct_base_image_is_resolved_once() {
    let mut df = String::new();
    for i in 0..6 {
        df.push_str(&format!("FROM busybox AS s{i}\nRUN echo {i} > /o\n"));
    }
    df.push_str("FROM debian:bookworm AS d\nRUN true\nFROM busybox\n");
    for i in 0..6 {
        df.push_str(&format!("COPY --from=s{i} /o /o{i}\n"));
    }
    df.push_str("COPY --from=d /etc/hostname /h\n");
    let resolver = FakeResolver::new();
    let c = convert(df.as_bytes(), &options(), &resolver)
        .await
        .expect("convert");
    let mut calls = resolver.calls();
    calls.sort();
    assert_eq!(
        calls,
        [
            "docker.io/library/busybox:latest",
            "docker.io/library/debian:bookworm"
        ]
    );
    let g = kiln_llb::load(&c.definition).expect("load");
    assert_eq!(exec_metas(&g).len(), 7, "every stage's RUN is there");
}

/// Resolves every image to a one-layer `linux/arm64` image.
struct Arm64Resolver;

impl ImageResolver for Arm64Resolver {
    fn resolve(
        &self,
        reference: &str,
        _platform: &kiln_oci::Platform,
    ) -> impl Future<Output = Result<ResolvedImage, ResolveError>> + Send {
        let config = serde_json::json!({"architecture": "arm64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", "c".repeat(64))]}});
        let resolved = serde_json::from_value(config).map(|config| ResolvedImage {
            canonical_ref: reference.to_string(),
            digest: format!("sha256:{}", "d".repeat(64)),
            config,
        });
        async move { resolved.map_err(|e| e.to_string().into()) }
    }
}

#[tokio::test]
async fn a_base_image_of_another_platform_is_a_build_check() {
    let conv = convert(
        b"FROM busybox AS a\nRUN true\nFROM --platform=linux/arm64 busybox AS b\nCOPY --from=a / /\nCOPY --from=alpine / /\n",
        &options(),
        &Arm64Resolver,
    )
    .await
    .expect("converts");
    let found: Vec<String> = conv.warnings.iter().map(|w| w.short()).collect();
    assert_eq!(
        found,
        [
            "InvalidBaseImagePlatform: Base image busybox was pulled with platform \"linux/arm64\", expected \"linux/amd64\" for current build (line 1)"
        ],
        "the FROM of an arm64 image in an amd64 stage only"
    );
}

#[tokio::test]
async fn sandbox_hostname_and_cache_namespace() {
    let df =
        "FROM busybox\nRUN --mount=type=cache,target=/c/ --mount=type=cache,id=x,target=/d true\n";
    let cache_ids = |g: &Graph| -> Vec<String> {
        g.vertices
            .iter()
            .filter_map(|v| match &v.op.op {
                Some(pb::op::Op::Exec(e)) => Some(e.mounts.clone()),
                _ => None,
            })
            .flatten()
            .filter_map(|m| m.cache_opt.map(|c| c.id))
            .collect()
    };
    let (_, g) = ok(df).await;
    assert_eq!(exec_metas(&g)[0].hostname, "", "the worker's default");
    // BuildKit's NAMESPACE + "/" + id, the id defaulting to the cleaned target
    assert_eq!(cache_ids(&g), ["//c", "/x"]);

    let mut opts = options();
    opts.hostname = "box".to_string();
    opts.cache_namespace = "team".to_string();
    let (_, g) = run(df, &opts).await.expect("converts");
    assert_eq!(exec_metas(&g)[0].hostname, "box");
    assert_eq!(cache_ids(&g), ["team//c", "team/x"]);
}
