//! A minimal frontend image entrypoint written for the tests, to show that
//! frontends are pluggable: it reads `commands.json` (`{"base": IMAGE, "run":
//! [CMD, ...]}`) from the `dockerfile` local dir, turns it into LLB (the base
//! image, then one `sh -c CMD` step per command) and returns it. It speaks
//! LLBBridge on its stdio, as any gateway.v0 frontend does.

use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_proto::moby::buildkit::v1::frontend::{
    self as fe, llb_bridge_client::LlbBridgeClient, result::Result as FeResult,
};
use kiln_proto::pb;
use std::collections::BTreeMap;

fn definition(ops: Vec<pb::Op>) -> pb::Definition {
    let mut b = kiln_llb::DefinitionBuilder::new();
    let mut last = None;
    for mut op in ops {
        if let Some(prev) = last.take() {
            op.inputs = vec![prev];
        }
        last = Some(b.add(op, pb::OpMetadata::default()));
    }
    b.finish(last)
}

fn source(identifier: String, attrs: BTreeMap<String, String>) -> pb::Op {
    pb::Op {
        op: Some(pb::op::Op::Source(pb::SourceOp { identifier, attrs })),
        ..Default::default()
    }
}

/// `sh -c CMD` on the previous op (its root input is set by [`definition`]).
fn run_step(cmd: &str) -> pb::Op {
    let meta = pb::Meta {
        args: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        cwd: "/".into(),
        ..Default::default()
    };
    pb::Op {
        platform: Some(pb::Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        }),
        ..kiln_llb::exec_op(pb::Input::default(), meta)
    }
}

/// Builds the commands; `Ok((result, linger))`, `linger` when commands.json asks
/// the frontend to stay running after it returned (to test that it is stopped).
async fn build(
    c: &mut LlbBridgeClient<kiln_session::dial::Channel>,
    session: &str,
) -> Result<(fe::Result, bool), String> {
    let local = source(
        "local://dockerfile".into(),
        [
            ("local.session".to_string(), session.to_string()),
            (
                "local.includepattern".to_string(),
                "[\"commands.json\"]".to_string(),
            ),
        ]
        .into(),
    );
    let solved = c
        .solve(fe::SolveRequest {
            definition: Some(definition(vec![local])),
            allow_result_return: true,
            evaluate: true,
            ..Default::default()
        })
        .await
        .map_err(|s| format!("load commands.json: {}", s.message()))?
        .into_inner();
    let Some(FeResult::Ref(r)) = solved.result.and_then(|r| r.result) else {
        return Err("load commands.json: no result".into());
    };
    let data = c
        .read_file(fe::ReadFileRequest {
            r#ref: r.id,
            file_path: "commands.json".into(),
            ..Default::default()
        })
        .await
        .map_err(|s| format!("read commands.json: {}", s.message()))?
        .into_inner()
        .data;
    let spec: serde_json::Value =
        serde_json::from_slice(&data).map_err(|e| format!("commands.json: {e}"))?;
    let base = spec["base"].as_str().unwrap_or("busybox");
    let resolved = c
        .resolve_image_config(fe::ResolveImageConfigRequest {
            r#ref: format!("docker.io/library/{base}:latest"),
            ..Default::default()
        })
        .await
        .map_err(|s| format!("resolve {base}: {}", s.message()))?
        .into_inner();
    let mut ops = vec![source(
        format!("docker-image://{}@{}", resolved.r#ref, resolved.digest),
        BTreeMap::new(),
    )];
    for cmd in spec["run"].as_array().into_iter().flatten() {
        ops.push(run_step(cmd.as_str().unwrap_or("false")));
    }
    let solved = c
        .solve(fe::SolveRequest {
            definition: Some(definition(ops)),
            allow_result_return: true,
            ..Default::default()
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let mut result = solved.result.ok_or("solve: no result")?;
    result
        .metadata
        .insert("containerimage.config".into(), resolved.config);
    Ok((result, spec["linger"].as_bool().unwrap_or(false)))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let session = std::env::var("BUILDKIT_SESSION_ID").unwrap_or_default();
    let mut c = LlbBridgeClient::new(kiln_session::dial::stdio());
    let mut linger = false;
    let ret = match build(&mut c, &session).await {
        Ok((result, l)) => {
            linger = l;
            fe::ReturnRequest {
                result: Some(result),
                error: None,
            }
        }
        Err(message) => fe::ReturnRequest {
            result: None,
            error: Some(RpcStatus {
                code: tonic::Code::InvalidArgument as i32,
                message: format!("json frontend: {message}"),
                details: vec![],
            }),
        },
    };
    if let Err(e) = c.r#return(ret).await {
        eprintln!("json frontend: return: {}", e.message());
        std::process::exit(1);
    }
    if linger {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
    // the runtime would wait for the thread blocked reading stdin
    std::process::exit(0);
}
