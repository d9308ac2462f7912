//! RUN -> ExecOp (root mount on the stage state, env/cwd/user from the stage).

use std::collections::{BTreeMap, BTreeSet};

use kiln_dockerfile::{Command, CommandLine, Lex, Run, parse_mount};
use kiln_llb::pb;

use super::copy::CopySource;
use super::mount::{self, ExecMounts};

use super::image::{run_command_string, with_shell};
use super::ops::{Ops, metadata};
use super::stage::StageState;
use super::{Error, line_of};

/// First line of a heredoc body, with `...` when there are more (summarizeHeredoc).
fn summarize_heredoc(doc: &str) -> String {
    let doc = doc.trim();
    let mut lines = doc.lines();
    let first = lines.next().unwrap_or_default().to_string();
    if lines.next().is_some() {
        format!("{first}...")
    } else {
        first
    }
}

/// Whether `cmd` is exactly one heredoc marker (`<<EOF`, `<<-"EOF"`).
fn is_single_heredoc(cmd: &str) -> bool {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    words.len() == 1 && words[0].starts_with("<<")
}

pub(crate) fn uppercase_cmd(s: &str) -> String {
    match s.split_once(' ') {
        Some((first, rest)) => format!("{} {rest}", first.to_ascii_uppercase()),
        None => s.to_ascii_uppercase(),
    }
}

/// BuildKit's predefined proxy ARGs: given as build args (any case), they
/// reach RUN through `Meta.proxy_env` without an ARG and stay out of the
/// image config, history and cache key.
pub(crate) fn proxy_env(build_args: &BTreeMap<String, String>) -> Option<pb::ProxyEnv> {
    let mut pe = pb::ProxyEnv::default();
    let mut any = false;
    for (k, v) in build_args {
        let slot = match k.to_ascii_lowercase().as_str() {
            "http_proxy" => &mut pe.http_proxy,
            "https_proxy" => &mut pe.https_proxy,
            "ftp_proxy" => &mut pe.ftp_proxy,
            "no_proxy" => &mut pe.no_proxy,
            "all_proxy" => &mut pe.all_proxy,
            _ => continue,
        };
        *slot = v.clone();
        any = true;
    }
    any.then_some(pe)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn dispatch(
    ops: &mut Ops,
    lex: &Lex,
    st: &mut StageState,
    run: &Run,
    sources: &[CopySource],
    ctx_paths: &mut BTreeSet<String>,
    proxy_env: Option<pb::ProxyEnv>,
    cmd: &Command,
) -> Result<(), Error> {
    let line = line_of(cmd);
    let lines = (cmd.location.start_line, cmd.location.end_line);
    let mut specs = Vec::new();
    for raw in &run.mounts {
        let expanded = lex
            .process_word(raw, &st.env)
            .map_err(|e| Error::Expand { line, source: e })?;
        specs.push(
            parse_mount(&expanded).map_err(|reason| Error::InvalidInstruction {
                line,
                instruction: "RUN".to_string(),
                reason,
            })?,
        );
    }
    if !run.devices.is_empty() {
        return Err(Error::Unsupported {
            line,
            feature: "RUN --device".to_string(),
        });
    }
    let network = match run.network.as_deref() {
        None | Some("default") => pb::NetMode::Unset,
        Some("none") => pb::NetMode::None,
        Some("host") => pb::NetMode::Host,
        Some(other) => {
            return Err(Error::InvalidInstruction {
                line,
                instruction: "RUN".to_string(),
                reason: format!("unsupported network mode {other:?}"),
            });
        }
    };
    let security = match run.security.as_deref() {
        None | Some("sandbox") => pb::SecurityMode::Sandbox,
        Some("insecure") => pb::SecurityMode::Insecure,
        Some(other) => {
            return Err(Error::InvalidInstruction {
                line,
                instruction: "RUN".to_string(),
                reason: format!("unsupported security mode {other:?}"),
            });
        }
    };

    let mut customname = cmd.original.clone();
    let mut mounts = ExecMounts::default();
    mounts.ordinary.push((
        pb::Mount {
            dest: "/".to_string(),
            output: 0,
            ..Default::default()
        },
        st.state,
    ));
    let args: Vec<String> = match (&run.cmd, run.heredocs.first()) {
        (CommandLine::Shell(s), Some(first)) if is_single_heredoc(s) => {
            customname.push_str(&format!(" ({})", summarize_heredoc(&first.data)));
            let data = first.content();
            if data.starts_with("#!") {
                // A script with a shebang: mount it and run it.
                let file = ops.push(
                    pb::Op {
                        constraints: Some(pb::WorkerConstraints::default()),
                        op: Some(pb::op::Op::File(pb::FileOp {
                            actions: vec![pb::FileAction {
                                input: -1,
                                secondary_input: -1,
                                output: 0,
                                action: Some(pb::file_action::Action::Mkfile(
                                    pb::FileActionMkFile {
                                        path: format!("/{}", first.name),
                                        mode: 0o755,
                                        data: data.into_bytes(),
                                        owner: None,
                                        timestamp: -1,
                                    },
                                )),
                            }],
                        })),
                        ..Default::default()
                    },
                    Vec::new(),
                    metadata(
                        &[("llb.customname", "[internal] preparing inline document")],
                        &["file.base"],
                    ),
                    Some((cmd.location.start_line, cmd.location.end_line)),
                );
                mounts.ordinary.push((
                    pb::Mount {
                        selector: "/".to_string(),
                        dest: "/dev/pipes/".to_string(),
                        output: -1,
                        readonly: true,
                        ..Default::default()
                    },
                    Some(file),
                ));
                with_shell(st, &[format!("/dev/pipes/{}", first.name)])
            } else {
                with_shell(st, &[data])
            }
        }
        (CommandLine::Shell(s), Some(_)) => {
            let mut full = s.clone();
            for h in &run.heredocs {
                full.push('\n');
                full.push_str(&h.data);
                full.push_str(&h.name);
            }
            with_shell(st, &[full])
        }
        (CommandLine::Shell(s), None) => with_shell(st, std::slice::from_ref(s)),
        (CommandLine::Exec(v), _) => v.clone(),
    };

    let name_lex = lex.raw_quotes(true).skip_unset_env(true);
    let expanded = name_lex
        .process_word(&customname, &st.env)
        .unwrap_or(customname);
    let progress = st.progress_name(&uppercase_cmd(&expanded));

    mount::add(ops, st, &specs, sources, ctx_paths, lines, &mut mounts);
    let mut env = st.env.clone();
    for (k, v) in &mounts.env {
        // an SSH_AUTH_SOCK the Dockerfile sets itself wins
        if !env.iter().any(|(key, _)| key == k) {
            env.push((k.clone(), v.clone()));
        }
    }
    let secret_env = std::mem::take(&mut mounts.secret_env);
    let mount_caps = std::mem::take(&mut mounts.caps);
    let (inputs, mounts) = mount::layout(mounts);
    let op = pb::Op {
        platform: Some(st.pb_platform()),
        constraints: Some(pb::WorkerConstraints::default()),
        op: Some(pb::op::Op::Exec(pb::ExecOp {
            meta: Some(pb::Meta {
                args: args.clone(),
                env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                cwd: st.cwd.clone(),
                user: st.user.clone(),
                remove_mount_stubs_recursive: true,
                proxy_env,
                ..Default::default()
            }),
            mounts,
            network: network as i32,
            security: security as i32,
            secretenv: secret_env,
            ..Default::default()
        })),
        ..Default::default()
    };
    let mut caps = vec![
        "exec.meta.base",
        "exec.meta.setsdefaultpath",
        "exec.mount.bind",
    ];
    if network != pb::NetMode::Unset {
        caps.push("exec.meta.network");
    }
    if security != pb::SecurityMode::Sandbox {
        caps.push("exec.meta.security");
    }
    caps.extend(mount_caps);
    let md = metadata(
        &[
            ("com.docker.dockerfile.v1.command", cmd.original.as_str()),
            ("llb.customname", progress.as_str()),
        ],
        &caps,
    );
    let id = ops.push(op, inputs, md, Some(lines));
    st.state = Some(id);
    let history = format!("RUN {}", run_command_string(st, &args));
    st.commit(history, true);
    Ok(())
}
