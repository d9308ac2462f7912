//! COPY / ADD (local sources) -> one FileOp with a chain of copy actions, and
//! WORKDIR -> a mkdir FileOp.

use std::collections::BTreeSet;

use kiln_dockerfile::{Command, Copy, Lex};
use kiln_llb::pb;

use super::git::GitRef;
use super::ops::{OpId, Ops, metadata};
use super::run::uppercase_cmd;
use super::stage::{StageState, chown_opt, clean_path, dest_path, normalize_workdir};
use super::{Error, line_of};

/// Where COPY reads from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CopySource {
    /// The build context.
    Context,
    /// Another stage's (or image's) state; None is scratch.
    State(Option<OpId>),
}

/// `--chmod`: octal gives a mode, a symbolic spec (`u=rwx,go=rx`) a mode string.
fn parse_chmod(spec: &str) -> Option<(i32, String)> {
    if spec.chars().all(|c| c.is_ascii_digit()) {
        return match u32::from_str_radix(spec, 8) {
            Ok(m) if m <= 0o7777 => i32::try_from(m).ok().map(|m| (m, String::new())),
            _ => None,
        };
    }
    let valid = spec.split(',').all(|clause| {
        let who_end = clause
            .find(|c: char| !"ugoa".contains(c))
            .unwrap_or(clause.len());
        let rest = &clause[who_end..];
        let mut chars = rest.chars();
        matches!(chars.next(), Some('+' | '-' | '=')) && chars.all(|c| "rwxXstugo+-=".contains(c))
    });
    valid.then(|| (0, spec.to_string()))
}

fn is_http(src: &str) -> bool {
    (src.starts_with("http://") || src.starts_with("https://")) && !is_git(src)
}

fn is_git(src: &str) -> bool {
    GitRef::parse(src).is_some()
}

/// The file name an HTTP source is saved as (BuildKit: base of the URL path).
fn http_filename(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest.find('/').map_or("", |p| &rest[p..]);
    let path = path.split(['?', '#']).next().unwrap_or_default();
    match path.trim_end_matches('/').rsplit('/').next() {
        Some(base) if !base.is_empty() && base != "." => base.to_string(),
        _ => "__unnamed__".to_string(),
    }
}

fn has_wildcard(path: &str) -> bool {
    path.contains(['*', '?', '['])
}

fn file_op(actions: Vec<pb::FileAction>) -> pb::Op {
    pb::Op {
        constraints: Some(pb::WorkerConstraints::default()),
        op: Some(pb::op::Op::File(pb::FileOp { actions })),
        ..Default::default()
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn dispatch(
    ops: &mut Ops,
    lex: &Lex,
    st: &mut StageState,
    copy: &Copy,
    is_add: bool,
    source: CopySource,
    ctx_paths: &mut BTreeSet<String>,
    ignore: &kiln_dockerfile::IgnoreMatcher,
    cmd: &Command,
) -> Result<(), Error> {
    let line = line_of(cmd);
    let lines = (cmd.location.start_line, cmd.location.end_line);
    let kw = if is_add { "ADD" } else { "COPY" };
    let invalid = |reason: String| Error::InvalidInstruction {
        line,
        instruction: kw.to_string(),
        reason,
    };
    if !is_add && copy.sources.iter().any(|s| is_git(s)) {
        return Err(invalid("source can't be a git ref for COPY".to_string()));
    }
    if !is_add && copy.sources.iter().any(|s| is_http(s)) {
        return Err(invalid("source can't be a URL for COPY".to_string()));
    }
    if copy.checksum.is_some() {
        if copy.sources.len() != 1 {
            return Err(invalid(
                "checksum can't be specified for multiple sources".to_string(),
            ));
        }
        if !is_http(&copy.sources[0]) && !is_git(&copy.sources[0]) {
            return Err(invalid(
                "checksum can't be specified for non-HTTP(S) or git sources".to_string(),
            ));
        }
    }
    let (mode, mode_str) = match &copy.chmod {
        Some(spec) => parse_chmod(spec).ok_or_else(|| {
            invalid(format!(
                "invalid chmod parameter: '{spec}'. it should be octal string and between 0 and 07777"
            ))
        })?,
        None => (-1, String::new()),
    };
    if matches!(source, CopySource::Context) && !ignore.is_empty() {
        // A source the .dockerignore removes from the context can only fail;
        // say why now instead of a bare "not found" from the worker.
        for src in copy.sources.iter().filter(|s| !is_http(s) && !is_git(s)) {
            let path = clean_path(src);
            if !has_wildcard(&path) && ignore.excluded(&path) && !ignore.may_reinclude_below(&path)
            {
                return Err(invalid(format!(
                    "failed to compute cache key: {path:?}: not found: the path is excluded by .dockerignore"
                )));
            }
        }
    }
    let dest = dest_path(&st.cwd, &copy.dest);
    let link = copy.link && copy.chmod.is_none();

    let name_text = lex
        .process_word(&cmd.original, &st.env)
        .unwrap_or_else(|_| cmd.original.clone());
    let name = uppercase_cmd(&name_text);
    let progress = st.progress_name(&name);

    // Inputs: the destination state first (scratch for --link), then each distinct source.
    let mut inputs: Vec<OpId> = Vec::new();
    let base = if link { None } else { st.state };
    let dest_input: i64 = match base {
        Some(id) => {
            inputs.push(id);
            0
        }
        None => -1,
    };
    let index_of = |inputs: &mut Vec<OpId>, id: Option<OpId>| -> i64 {
        match id {
            None => -1,
            Some(id) => {
                let pos = match inputs.iter().position(|i| *i == id) {
                    Some(p) => p,
                    None => {
                        inputs.push(id);
                        inputs.len() - 1
                    }
                };
                i64::try_from(pos).unwrap_or(i64::MAX)
            }
        }
    };
    let owner = copy.chown.as_deref().and_then(|c| chown_opt(c, dest_input));

    // (secondary input, copy action) per source.
    let mut planned: Vec<(i64, pb::FileActionCopy)> = Vec::new();
    for src in &copy.sources {
        if let Some(git) = GitRef::parse(src) {
            let (op, caps) = git.source_op(copy.keep_git_dir, copy.checksum.as_deref());
            let md = metadata(&[("llb.customname", progress.as_str())], &caps);
            let repo = ops.push(op, Vec::new(), md, Some(lines));
            let secondary = index_of(&mut inputs, Some(repo));
            planned.push((
                secondary,
                pb::FileActionCopy {
                    src: "/".to_string(),
                    dest: dest.clone(),
                    owner: owner.clone(),
                    mode,
                    create_dest_path: true,
                    timestamp: -1,
                    mode_str: mode_str.clone(),
                    ..Default::default()
                },
            ));
            continue;
        }
        if is_http(src) {
            let filename = http_filename(src);
            let mut attrs = std::collections::BTreeMap::new();
            if let Some(sum) = &copy.checksum {
                attrs.insert("http.checksum".to_string(), sum.clone());
            }
            attrs.insert("http.filename".to_string(), filename.clone());
            let mut caps = vec!["source.http"];
            if copy.checksum.is_some() {
                caps.push("source.http.checksum");
            }
            let http = ops.push(
                pb::Op {
                    constraints: Some(pb::WorkerConstraints::default()),
                    op: Some(pb::op::Op::Source(pb::SourceOp {
                        identifier: src.clone(),
                        attrs,
                    })),
                    ..Default::default()
                },
                Vec::new(),
                metadata(
                    &[
                        ("com.docker.dockerfile.v1.command", ""),
                        ("llb.customname", progress.as_str()),
                    ],
                    &caps,
                ),
                Some(lines),
            );
            let secondary = index_of(&mut inputs, Some(http));
            planned.push((
                secondary,
                pb::FileActionCopy {
                    src: clean_path(&filename),
                    dest: dest.clone(),
                    owner: owner.clone(),
                    mode,
                    create_dest_path: true,
                    timestamp: -1,
                    mode_str: mode_str.clone(),
                    ..Default::default()
                },
            ));
            continue;
        }
        let src_state = match source {
            CopySource::Context => Some(ops.context()),
            CopySource::State(s) => s,
        };
        let secondary = index_of(&mut inputs, src_state);
        let (src_path, include) = if copy.parents {
            match src.split_once("/./") {
                Some((parent, pattern)) => (
                    clean_path(parent),
                    vec![clean_path(pattern).trim_start_matches('/').to_string()],
                ),
                None => (
                    "/".to_string(),
                    vec![clean_path(src).trim_start_matches('/').to_string()],
                ),
            }
        } else {
            (clean_path(src), Vec::new())
        };
        planned.push((
            secondary,
            pb::FileActionCopy {
                src: src_path,
                dest: dest.clone(),
                owner: owner.clone(),
                mode,
                follow_symlink: true,
                dir_copy_contents: true,
                attempt_unpack_docker_compatibility: is_add && copy.unpack != Some(false),
                create_dest_path: true,
                allow_wildcard: true,
                allow_empty_wildcard: true,
                timestamp: -1,
                include_patterns: include,
                exclude_patterns: copy.exclude.clone(),
                mode_str: mode_str.clone(),
                ..Default::default()
            },
        ));
        match source {
            CopySource::Context => {
                ctx_paths.insert(clean_path(src));
            }
            CopySource::State(_) => {}
        }
    }
    let heredoc_lex = Lex::new('\\').skip_quotes(true);
    for doc in &copy.source_contents {
        let mut data = doc.content();
        if doc.expand {
            data = heredoc_lex
                .process_word(&data, &st.env)
                .map_err(|e| Error::Expand { line, source: e })?;
        }
        let path = clean_path(&doc.name);
        let file = ops.push(
            file_op(vec![pb::FileAction {
                input: -1,
                secondary_input: -1,
                output: 0,
                action: Some(pb::file_action::Action::Mkfile(pb::FileActionMkFile {
                    path: path.clone(),
                    mode: 0o644,
                    data: data.into_bytes(),
                    owner: None,
                    timestamp: -1,
                })),
            }]),
            Vec::new(),
            metadata(
                &[("llb.customname", "[internal] preparing inline document")],
                &["file.base"],
            ),
            Some(lines),
        );
        let secondary = index_of(&mut inputs, Some(file));
        planned.push((
            secondary,
            pb::FileActionCopy {
                src: path,
                dest: dest.clone(),
                owner: owner.clone(),
                mode,
                create_dest_path: true,
                timestamp: -1,
                mode_str: mode_str.clone(),
                ..Default::default()
            },
        ));
    }
    if planned.is_empty() {
        return Err(invalid(format!("{kw} requires at least two arguments")));
    }

    let n_inputs = i64::try_from(inputs.len()).unwrap_or(i64::MAX);
    let last = planned.len() - 1;
    let actions = planned
        .into_iter()
        .enumerate()
        .map(|(k, (secondary, action))| pb::FileAction {
            input: if k == 0 {
                dest_input
            } else {
                n_inputs + i64::try_from(k - 1).unwrap_or(0)
            },
            secondary_input: secondary,
            output: if k == last { 0 } else { -1 },
            action: Some(pb::file_action::Action::Copy(action)),
        })
        .collect();

    let mut file_md = metadata(&[("llb.customname", progress.as_str())], &["file.base"]);
    if link {
        file_md.progress_group = Some(pb::ProgressGroup {
            id: format!("link-{}-{}", lines.0, st.cmd_index),
            name: progress.clone(),
            weak: true,
        });
    }
    let id = ops.push(file_op(actions), inputs, file_md, Some(lines));
    st.state = match (link, st.state) {
        (true, Some(base)) => {
            let link_name = st.progress_name_again(&format!("LINK {name}"));
            let mut md = metadata(&[("llb.customname", link_name.as_str())], &["mergeop"]);
            md.progress_group = Some(pb::ProgressGroup {
                id: format!("link-{}-{}", lines.0, st.cmd_index),
                name: progress.clone(),
                weak: false,
            });
            Some(ops.push(
                pb::Op {
                    constraints: Some(pb::WorkerConstraints::default()),
                    op: Some(pb::op::Op::Merge(pb::MergeOp {
                        inputs: vec![pb::MergeInput { input: 0 }, pb::MergeInput { input: 1 }],
                    })),
                    ..Default::default()
                },
                vec![base, id],
                md,
                Some(lines),
            ))
        }
        _ => Some(id),
    };

    let mut msg = kw.to_string();
    if copy.parents {
        msg.push_str(" --parents");
    }
    if let Some(c) = &copy.chown {
        msg.push_str(&format!(" --chown={c}"));
    }
    if let Some(c) = &copy.chmod {
        msg.push_str(&format!(" --chmod={c}"));
    }
    for s in &copy.sources {
        msg.push(' ');
        msg.push_str(s);
    }
    for d in &copy.source_contents {
        msg.push_str(&format!(" <<{}", d.name));
    }
    msg.push(' ');
    msg.push_str(&copy.dest);
    st.commit(msg, true);
    Ok(())
}

/// WORKDIR: set the dir and create it (mkdir -p, owned by USER when set).
pub(crate) fn workdir(
    ops: &mut Ops,
    lex: &Lex,
    st: &mut StageState,
    path: &str,
    cmd: &Command,
) -> Result<(), Error> {
    let wd = normalize_workdir(&st.cwd, path);
    st.cwd = wd.clone();
    st.image.config.working_dir = wd.clone();
    if wd == "/" {
        st.commit_empty(format!("WORKDIR {wd}"));
        return Ok(());
    }
    let mut inputs = Vec::new();
    let input = match st.state {
        Some(id) => {
            inputs.push(id);
            0
        }
        None => -1,
    };
    let owner = chown_opt(&st.user.clone(), input);
    let name_text = lex
        .process_word(&cmd.original, &st.env)
        .unwrap_or_else(|_| cmd.original.clone());
    let progress = st.progress_name(&uppercase_cmd(&name_text));
    let id = ops.push(
        pb::Op {
            constraints: Some(pb::WorkerConstraints::default()),
            op: Some(pb::op::Op::File(pb::FileOp {
                actions: vec![pb::FileAction {
                    input,
                    secondary_input: -1,
                    output: 0,
                    action: Some(pb::file_action::Action::Mkdir(pb::FileActionMkDir {
                        path: wd.clone(),
                        mode: 0o755,
                        make_parents: true,
                        owner,
                        timestamp: -1,
                    })),
                }],
            })),
            ..Default::default()
        },
        inputs,
        metadata(&[("llb.customname", progress.as_str())], &["file.base"]),
        Some((cmd.location.start_line, cmd.location.end_line)),
    );
    st.state = Some(id);
    st.commit(format!("WORKDIR {wd}"), false);
    // WORKDIR adds a layer but BuildKit records it without the " # buildkit" suffix.
    if let Some(h) = st.image.history.last_mut() {
        h.empty_layer = None;
    }
    Ok(())
}
