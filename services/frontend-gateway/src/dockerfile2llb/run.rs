//! RUN -> ExecOp (root mount on the stage state, env/cwd/user from the stage).

use std::collections::BTreeMap;

use kiln_dockerfile::{Command, CommandLine, Heredoc, Run, RunMount, parse_mount};
use kiln_llb::pb;

use super::copy::CopySource;
use super::dispatch::DispatchContext;
use super::image::{run_command_string, with_shell};
use super::mount::{ExecMounts, InputMount};
use super::ops::{Lines, Ops, inline_document, metadata};
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

/// Whether `cmd` is exactly one heredoc marker (`<<EOF`, `<<-"EOF"`, `3<<EOF`).
fn is_single_heredoc(cmd: &str) -> bool {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    words.len() == 1
        && words[0]
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .starts_with("<<")
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

/// `--network` and `--security` of a RUN.
struct Modes {
    network: pb::NetMode,
    security: pb::SecurityMode,
}

impl Modes {
    fn of(run: &Run, line: usize) -> Result<Modes, Error> {
        let invalid = |reason: String| Error::InvalidInstruction {
            line,
            instruction: "RUN".to_string(),
            reason,
        };
        let network = match run.network.as_deref() {
            None | Some("default") => pb::NetMode::Unset,
            Some("none") => pb::NetMode::None,
            Some("host") => pb::NetMode::Host,
            Some(other) => return Err(invalid(format!("unsupported network mode {other:?}"))),
        };
        let security = match run.security.as_deref() {
            None | Some("sandbox") => pb::SecurityMode::Sandbox,
            Some("insecure") => pb::SecurityMode::Insecure,
            Some(other) => return Err(invalid(format!("unsupported security mode {other:?}"))),
        };
        Ok(Modes { network, security })
    }

    /// The caps an exec with these modes needs beyond the base ones.
    fn caps(&self) -> impl Iterator<Item = &'static str> {
        let network = (self.network != pb::NetMode::Unset).then_some("exec.meta.network");
        let security = (self.security != pb::SecurityMode::Sandbox).then_some("exec.meta.security");
        network.into_iter().chain(security)
    }
}

/// The `--mount`s of a RUN, expanded and parsed.
fn mount_specs(
    cx: &DispatchContext,
    st: &StageState,
    run: &Run,
    line: usize,
) -> Result<Vec<RunMount>, Error> {
    let mut specs = Vec::new();
    for raw in &run.mounts {
        let expanded = cx
            .lex
            .process_word(raw, &st.env)
            .map_err(|source| Error::Expand { line, source })?;
        specs.push(parse_mount(&expanded).map_err(|source| Error::InvalidMount { line, source })?);
    }
    Ok(specs)
}

/// A heredoc script with a shebang: made as a file, mounted at `/dev/pipes/`.
fn heredoc_script(ops: &mut Ops, doc: &Heredoc, data: String, lines: Lines) -> InputMount {
    let file = inline_document(ops, format!("/{}", doc.name), 0o755, data, lines);
    InputMount {
        mount: pb::Mount {
            selector: "/".to_string(),
            dest: "/dev/pipes/".to_string(),
            output: -1,
            readonly: true,
            ..Default::default()
        },
        state: Some(file),
    }
}

/// The exec's args, and the progress name's text (the RUN line, with the
/// first line of a lone heredoc).
fn args(
    ops: &mut Ops,
    st: &StageState,
    cmd: &Command,
    run: &Run,
    mounts: &mut ExecMounts,
) -> (Vec<String>, String) {
    let mut customname = cmd.original.clone();
    let args = match (&run.cmd, run.heredocs.first()) {
        (CommandLine::Shell(s), Some(first)) if is_single_heredoc(s) => {
            customname.push_str(&format!(" ({})", summarize_heredoc(&first.data)));
            let data = first.content();
            if data.starts_with("#!") {
                // A script with a shebang: mount it and run it.
                let script = heredoc_script(ops, first, data, Lines::of(cmd));
                mounts.ordinary.push(script);
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
    (args, customname)
}

pub(crate) fn dispatch(
    cx: &mut DispatchContext,
    st: &mut StageState,
    cmd: &Command,
    run: &Run,
    sources: &[CopySource],
) -> Result<(), Error> {
    let line = line_of(cmd);
    let specs = mount_specs(cx, st, run, line)?;
    if !run.devices.is_empty() {
        return Err(Error::Unsupported {
            line,
            feature: "RUN --device".to_string(),
        });
    }
    let modes = Modes::of(run, line)?;
    let mut mounts = ExecMounts::default();
    mounts.ordinary.push(InputMount {
        mount: pb::Mount {
            dest: "/".to_string(),
            output: 0,
            ..Default::default()
        },
        state: st.state,
    });
    let (args, customname) = args(&mut cx.ops, st, cmd, run, &mut mounts);
    let name_lex = cx.lex.raw_quotes(true).skip_unset_env(true);
    let expanded = name_lex
        .process_word(&customname, &st.env)
        .unwrap_or(customname);
    let progress = st.progress_name(&uppercase_cmd(&expanded));
    mounts.add(cx, st, &specs, sources, Lines::of(cmd));
    let mut env = st.env.clone();
    for (k, v) in &mounts.env {
        // an SSH_AUTH_SOCK the Dockerfile sets itself wins
        if !env.iter().any(|(key, _)| key == k) {
            env.push((k.clone(), v.clone()));
        }
    }
    let meta = pb::Meta {
        args: args.clone(),
        env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        cwd: st.cwd.clone(),
        user: st.user.clone(),
        remove_mount_stubs_recursive: true,
        proxy_env: proxy_env(&cx.opts.build_args),
        hostname: cx.opts.hostname.clone(),
        ..Default::default()
    };
    let mut caps = vec![
        "exec.meta.base",
        "exec.meta.setsdefaultpath",
        "exec.mount.bind",
    ];
    caps.extend(modes.caps());
    caps.extend(std::mem::take(&mut mounts.caps));
    let secretenv = std::mem::take(&mut mounts.secret_env);
    let (inputs, mounts) = mounts.layout();
    let op = pb::Op {
        platform: Some(st.pb_platform()),
        constraints: Some(pb::WorkerConstraints::default()),
        op: Some(pb::op::Op::Exec(pb::ExecOp {
            meta: Some(meta),
            mounts,
            network: modes.network as i32,
            security: modes.security as i32,
            secretenv,
            ..Default::default()
        })),
        ..Default::default()
    };
    let md = metadata(
        &[
            ("com.docker.dockerfile.v1.command", cmd.original.as_str()),
            ("llb.customname", progress.as_str()),
        ],
        &caps,
    );
    st.state = Some(cx.ops.push(op, inputs, md, Some(Lines::of(cmd))));
    let history = format!("RUN {}", run_command_string(st, &args));
    st.commit(history, true);
    Ok(())
}
