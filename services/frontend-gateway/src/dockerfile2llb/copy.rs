//! COPY / ADD (local sources, git, HTTP, heredocs) -> one FileOp with a
//! chain of copy actions (merged onto the stage for `--link`), and WORKDIR ->
//! a mkdir FileOp.

use std::collections::BTreeMap;

use kiln_dockerfile::{Command, Copy, Heredoc, Lex};
use kiln_llb::pb;

use super::dispatch::DispatchContext;
use super::git::GitRef;
use super::ops::{Lines, OpId, Ops, file_op, inline_document, metadata, source_op};
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

/// COPY, or ADD (which also fetches URLs and git refs and unpacks archives).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyKind {
    Copy,
    Add,
}

impl CopyKind {
    fn keyword(self) -> &'static str {
        match self {
            CopyKind::Copy => "COPY",
            CopyKind::Add => "ADD",
        }
    }
}

/// `--chmod` as a copy action takes it: an octal mode or a symbolic spec.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chmod {
    /// -1 when not given or symbolic.
    mode: i32,
    /// The symbolic spec (`u=rwx,go=rx`), empty otherwise.
    mode_str: String,
}

impl Chmod {
    const UNSET: Chmod = Chmod {
        mode: -1,
        mode_str: String::new(),
    };
}

/// `--chmod`: octal gives a mode, a symbolic spec (`u=rwx,go=rx`) a mode string.
fn parse_chmod(spec: &str) -> Option<Chmod> {
    if spec.chars().all(|c| c.is_ascii_digit()) {
        return match u32::from_str_radix(spec, 8) {
            Ok(m) if m <= 0o7777 => i32::try_from(m).ok().map(|mode| Chmod {
                mode,
                mode_str: String::new(),
            }),
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
    valid.then(|| Chmod {
        mode: 0,
        mode_str: spec.to_string(),
    })
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

/// The checks BuildKit makes before a COPY/ADD is converted; the reason on failure.
fn validate(copy: &Copy, kind: CopyKind) -> Result<(), String> {
    if kind == CopyKind::Copy && copy.sources.iter().any(|s| is_git(s)) {
        return Err("source can't be a git ref for COPY".to_string());
    }
    if kind == CopyKind::Copy && copy.sources.iter().any(|s| is_http(s)) {
        return Err("source can't be a URL for COPY".to_string());
    }
    if copy.checksum.is_some() {
        if copy.sources.len() != 1 {
            return Err("checksum can't be specified for multiple sources".to_string());
        }
        if !is_http(&copy.sources[0]) && !is_git(&copy.sources[0]) {
            return Err("checksum can't be specified for non-HTTP(S) or git sources".to_string());
        }
    }
    Ok(())
}

/// A source the .dockerignore removes from the context can only fail; say
/// why now instead of a bare "not found" from the worker.
fn check_not_ignored(
    copy: &Copy,
    source: CopySource,
    ignore: &kiln_dockerfile::IgnoreMatcher,
) -> Result<(), String> {
    if !matches!(source, CopySource::Context) || ignore.is_empty() {
        return Ok(());
    }
    for src in copy.sources.iter().filter(|s| !is_http(s) && !is_git(s)) {
        let path = clean_path(src);
        if !has_wildcard(&path) && ignore.excluded(&path) && !ignore.may_reinclude_below(&path) {
            return Err(format!(
                "failed to compute cache key: {path:?}: not found: the path is excluded by .dockerignore"
            ));
        }
    }
    Ok(())
}

/// One copy action of the FileOp and the input it reads.
struct PlannedCopy {
    secondary_input: i64,
    action: pb::FileActionCopy,
}

/// One COPY/ADD being turned into a FileOp.
struct CopyOp<'a> {
    copy: &'a Copy,
    kind: CopyKind,
    lines: Lines,
    /// The step's progress name (`[stage 2/3] COPY a b`).
    progress: String,
    dest: String,
    owner: Option<pb::ChownOpt>,
    chmod: Chmod,
    /// The FileOp's inputs: the destination state first (none for --link),
    /// then each distinct source.
    inputs: Vec<OpId>,
    /// The destination's input index, -1 for scratch.
    dest_input: i64,
    planned: Vec<PlannedCopy>,
}

impl<'a> CopyOp<'a> {
    /// The input index of `id`, added on first use; -1 for scratch.
    fn input_index(&mut self, id: Option<OpId>) -> i64 {
        let Some(id) = id else {
            return -1;
        };
        let pos = match self.inputs.iter().position(|i| *i == id) {
            Some(p) => p,
            None => {
                self.inputs.push(id);
                self.inputs.len() - 1
            }
        };
        i64::try_from(pos).unwrap_or(i64::MAX)
    }

    /// A copy of `src` (in the input `from`) to the destination, with the
    /// options every source shares.
    fn plan(&mut self, from: Option<OpId>, src: String) -> &mut pb::FileActionCopy {
        let secondary_input = self.input_index(from);
        self.planned.push(PlannedCopy {
            secondary_input,
            action: pb::FileActionCopy {
                src,
                dest: self.dest.clone(),
                owner: self.owner.clone(),
                mode: self.chmod.mode,
                create_dest_path: true,
                timestamp: -1,
                mode_str: self.chmod.mode_str.clone(),
                ..Default::default()
            },
        });
        let last = self.planned.len() - 1;
        &mut self.planned[last].action
    }

    /// ADD of a git ref: a git source, copied from its root.
    fn plan_git(&mut self, ops: &mut Ops, git: &GitRef) -> Result<(), String> {
        let (op, caps) = git.source_op(self.copy.keep_git_dir, self.copy.checksum.as_deref())?;
        let md = metadata(&[("llb.customname", self.progress.as_str())], &caps);
        let repo = ops.push(op, Vec::new(), md, Some(self.lines));
        self.plan(Some(repo), "/".to_string());
        Ok(())
    }

    /// ADD of a URL: an HTTP source saved under the URL's file name.
    fn plan_http(&mut self, ops: &mut Ops, url: &str) {
        let filename = http_filename(url);
        let mut attrs = BTreeMap::new();
        let mut caps = vec!["source.http"];
        if let Some(sum) = &self.copy.checksum {
            attrs.insert("http.checksum".to_string(), sum.clone());
            caps.push("source.http.checksum");
        }
        attrs.insert("http.filename".to_string(), filename.clone());
        let op = source_op(url.to_string(), attrs);
        let md = metadata(
            &[
                ("com.docker.dockerfile.v1.command", ""),
                ("llb.customname", self.progress.as_str()),
            ],
            &caps,
        );
        let http = ops.push(op, Vec::new(), md, Some(self.lines));
        self.plan(Some(http), clean_path(&filename));
    }

    /// A path (wildcards allowed) of the build context or of another state.
    fn plan_local(&mut self, cx: &mut DispatchContext, src: &str, source: CopySource) {
        let state = match source {
            CopySource::Context => {
                cx.ctx_paths.insert(clean_path(src));
                Some(cx.ops.context())
            }
            CopySource::State(s) => s,
        };
        let (src_path, include) = match (self.copy.parents, src.split_once("/./")) {
            (false, _) => (clean_path(src), Vec::new()),
            (true, Some((parent, pattern))) => (clean_path(parent), vec![relative(pattern)]),
            (true, None) => ("/".to_string(), vec![relative(src)]),
        };
        // a --parents source without wildcards must exist, as a plain one must
        let required = match include.first() {
            Some(pattern) if !has_wildcard(&src_path) && !has_wildcard(pattern) => {
                vec![clean_path(&format!("{src_path}/{pattern}"))]
            }
            _ => Vec::new(),
        };
        let unpack = self.kind == CopyKind::Add && self.copy.unpack != Some(false);
        let exclude = self.copy.exclude.clone();
        let action = self.plan(state, src_path);
        action.follow_symlink = true;
        action.dir_copy_contents = true;
        action.attempt_unpack_docker_compatibility = unpack;
        action.allow_wildcard = true;
        action.allow_empty_wildcard = true;
        action.include_patterns = include;
        action.required_paths = required;
        action.exclude_patterns = exclude;
    }

    /// A heredoc source: an inline file made first, then copied.
    fn plan_heredoc(&mut self, ops: &mut Ops, doc: &Heredoc, data: String) {
        let path = clean_path(&doc.name);
        let file = inline_document(ops, path.clone(), 0o644, data, self.lines);
        self.plan(Some(file), path);
    }

    /// The FileOp: each action applies to the previous one's output, the last is the result.
    fn file_op(self, ops: &mut Ops, link_group: Option<pb::ProgressGroup>) -> OpId {
        let n_inputs = i64::try_from(self.inputs.len()).unwrap_or(i64::MAX);
        let last = self.planned.len() - 1;
        let dest_input = self.dest_input;
        let actions = self
            .planned
            .into_iter()
            .enumerate()
            .map(|(k, planned)| pb::FileAction {
                input: if k == 0 {
                    dest_input
                } else {
                    n_inputs + i64::try_from(k - 1).unwrap_or(0)
                },
                secondary_input: planned.secondary_input,
                output: if k == last { 0 } else { -1 },
                action: Some(pb::file_action::Action::Copy(planned.action)),
            })
            .collect();
        let mut md = metadata(
            &[("llb.customname", self.progress.as_str())],
            &["file.base"],
        );
        md.progress_group = link_group;
        ops.push(file_op(actions), self.inputs, md, Some(self.lines))
    }
}

/// A path relative to the root of its source (`--parents` include patterns).
fn relative(pattern: &str) -> String {
    clean_path(pattern).trim_start_matches('/').to_string()
}

pub(crate) fn dispatch(
    cx: &mut DispatchContext,
    st: &mut StageState,
    cmd: &Command,
    copy: &Copy,
    kind: CopyKind,
    source: CopySource,
) -> Result<(), Error> {
    let line = line_of(cmd);
    let invalid = |reason: String| Error::InvalidInstruction {
        line,
        instruction: kind.keyword().to_string(),
        reason,
    };
    validate(copy, kind).map_err(invalid)?;
    let chmod = match &copy.chmod {
        Some(spec) => parse_chmod(spec).ok_or_else(|| {
            invalid(format!(
                "invalid chmod parameter: '{spec}'. it should be octal string and between 0 and 07777"
            ))
        })?,
        None => Chmod::UNSET,
    };
    check_not_ignored(copy, source, &cx.ignore).map_err(invalid)?;
    let link = copy.link && copy.chmod.is_none();
    let name = uppercase_cmd(
        &cx.lex
            .process_word(&cmd.original, &st.env)
            .unwrap_or_else(|_| cmd.original.clone()),
    );
    let progress = st.progress_name(&name);
    let base = if link { None } else { st.state };
    let dest_input = if base.is_some() { 0 } else { -1 };
    let mut op = CopyOp {
        copy,
        kind,
        lines: Lines::of(cmd),
        progress,
        dest: dest_path(&st.cwd, &copy.dest),
        owner: copy.chown.as_deref().and_then(|c| chown_opt(c, dest_input)),
        chmod,
        inputs: base.into_iter().collect(),
        dest_input,
        planned: Vec::new(),
    };
    for src in &copy.sources {
        match GitRef::parse(src) {
            Some(git) => op.plan_git(&mut cx.ops, &git).map_err(invalid)?,
            None if is_http(src) => op.plan_http(&mut cx.ops, src),
            None => op.plan_local(cx, src, source),
        }
    }
    let heredoc_lex = Lex::new('\\').skip_quotes(true);
    for doc in &copy.source_contents {
        let mut data = doc.content();
        if doc.expand {
            data = heredoc_lex
                .process_word(&data, &st.env)
                .map_err(|source| Error::Expand { line, source })?;
        }
        op.plan_heredoc(&mut cx.ops, doc, data);
    }
    if op.planned.is_empty() {
        return Err(invalid(format!(
            "{} requires at least two arguments, but only one was provided. \
             Destination could not be determined",
            kind.keyword()
        )));
    }
    st.state = Some(if link {
        link_onto(&mut cx.ops, st, op, &name)
    } else {
        op.file_op(&mut cx.ops, None)
    });
    st.commit(history(copy, kind), true);
    Ok(())
}

/// `COPY --link`: the files are copied onto scratch and merged onto the stage.
fn link_onto(ops: &mut Ops, st: &StageState, op: CopyOp, name: &str) -> OpId {
    let lines = op.lines;
    let group = |weak| pb::ProgressGroup {
        id: format!("link-{}-{}", lines.start, st.cmd_index),
        name: op.progress.clone(),
        weak,
    };
    let (copy_group, merge_group) = (group(true), group(false));
    let copied = op.file_op(ops, Some(copy_group));
    let Some(base) = st.state else {
        return copied;
    };
    let link_name = st.progress_name_again(&format!("LINK {name}"));
    let mut md = metadata(&[("llb.customname", link_name.as_str())], &["mergeop"]);
    md.progress_group = Some(merge_group);
    let merge = pb::Op {
        constraints: Some(pb::WorkerConstraints::default()),
        op: Some(pb::op::Op::Merge(pb::MergeOp {
            inputs: vec![pb::MergeInput { input: 0 }, pb::MergeInput { input: 1 }],
        })),
        ..Default::default()
    };
    ops.push(merge, vec![base, copied], md, Some(lines))
}

/// The history entry of a COPY/ADD (`COPY --chown=1:1 a b /dst`).
fn history(copy: &Copy, kind: CopyKind) -> String {
    let mut msg = kind.keyword().to_string();
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
    msg
}

/// WORKDIR: set the dir and create it (mkdir -p, owned by USER when set).
pub(crate) fn workdir(cx: &mut DispatchContext, st: &mut StageState, cmd: &Command, path: &str) {
    let wd = normalize_workdir(&st.cwd, path);
    st.cwd = wd.clone();
    st.image.config.working_dir = wd.clone();
    if wd == "/" {
        st.commit_empty(format!("WORKDIR {wd}"));
        return;
    }
    let inputs: Vec<OpId> = st.state.into_iter().collect();
    let input = if inputs.is_empty() { -1 } else { 0 };
    let owner = chown_opt(&st.user.clone(), input);
    let name_text = cx
        .lex
        .process_word(&cmd.original, &st.env)
        .unwrap_or_else(|_| cmd.original.clone());
    let progress = st.progress_name(&uppercase_cmd(&name_text));
    let mkdir = pb::FileAction {
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
    };
    let md = metadata(&[("llb.customname", progress.as_str())], &["file.base"]);
    let id = cx
        .ops
        .push(file_op(vec![mkdir]), inputs, md, Some(Lines::of(cmd)));
    st.state = Some(id);
    st.commit(format!("WORKDIR {wd}"), false);
    // WORKDIR adds a layer but BuildKit records it without the " # buildkit" suffix.
    if let Some(h) = st.image.history.last_mut() {
        h.empty_layer = None;
    }
}
