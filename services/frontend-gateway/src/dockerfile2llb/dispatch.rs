//! Dispatching the planned stages, BuildKit's `dispatch` loop: each reachable
//! stage starts from its base, runs the ONBUILD triggers it inherits, then
//! its own instructions, one small `dispatch` per instruction kind.

use std::collections::{BTreeMap, BTreeSet};

use kiln_dockerfile::{Command, Dockerfile, IgnoreMatcher, Instruction, Lex, Stage};
use kiln_oci::Platform;

use super::args::{self, Args};
use super::copy::{self, CopyKind, CopySource};
use super::ops::{OpId, Ops};
use super::plan::{Base, From, Plan};
use super::stage::{StageState, empty_image};
use super::{ConvertOptions, Error, image, line_of, run};

/// What every instruction's dispatch reads or adds to besides its own stage.
pub(crate) struct DispatchContext<'a> {
    pub opts: &'a ConvertOptions,
    pub lex: Lex,
    /// Global ARGs (with the platform ARGs), for ARG without a default.
    pub global_args: Args,
    /// The ops made so far.
    pub ops: Ops,
    /// Paths COPY/ADD and bind mounts read from the build context.
    pub ctx_paths: BTreeSet<String>,
    /// The `.dockerignore` of the build context.
    pub ignore: IgnoreMatcher,
    /// Source ops of named local contexts, by index into [`Plan::locals`].
    local_ops: BTreeMap<usize, OpId>,
    /// `UndefinedVar` build checks found while expanding instructions.
    pub warnings: Vec<super::lint::Warning>,
}

impl<'a> DispatchContext<'a> {
    pub(crate) fn new(opts: &'a ConvertOptions, lex: Lex, global_args: Args) -> Self {
        DispatchContext {
            opts,
            lex,
            global_args,
            ops: Ops::default(),
            ctx_paths: BTreeSet::new(),
            ignore: IgnoreMatcher::new(&opts.excludes),
            local_ops: BTreeMap::new(),
            warnings: Vec::new(),
        }
    }

    /// The (one) source op of the named local context `dir` (index `k`).
    fn local_op(&mut self, k: usize, dir: &str) -> OpId {
        let (ops, opts) = (&mut self.ops, self.opts);
        *self.local_ops.entry(k).or_insert_with(|| {
            let excludes = opts.local_excludes.get(dir).map_or(&[][..], Vec::as_slice);
            ops.named_local(dir, &opts.session_id, excludes)
        })
    }
}

/// The stages of a plan being dispatched.
pub(crate) struct Stages<'a, 'o> {
    pub df: &'a Dockerfile,
    pub plan: &'a Plan,
    pub cx: &'a mut DispatchContext<'o>,
    /// Each stage's final state, once dispatched.
    pub states: Vec<Option<StageState>>,
}

impl Stages<'_, '_> {
    /// Dispatches every stage `reachable` marks, in order.
    pub(crate) fn dispatch_reachable(&mut self, reachable: &[bool]) -> Result<(), Error> {
        for (i, stage) in self.df.stages.iter().enumerate() {
            if reachable[i] {
                let st = self.dispatch_stage(i, stage)?;
                self.states[i] = Some(st);
            }
        }
        Ok(())
    }

    fn dispatch_stage(&mut self, i: usize, stage: &Stage) -> Result<StageState, Error> {
        let mut st = self.base_state(i, stage)?;
        if self.plan.stages[i].replaced {
            // a named context of the stage's name is the stage
            return Ok(st);
        }
        self.dispatch_triggers(i, stage, &mut st)?;
        for (c, cmd) in stage.commands.iter().enumerate() {
            let sources = self.command_sources(i, c, stage, cmd)?;
            dispatch(self.cx, &mut st, cmd, &sources)?;
        }
        Ok(st)
    }

    /// The stage before its first instruction: its base's state and config.
    fn base_state(&mut self, i: usize, stage: &Stage) -> Result<StageState, Error> {
        let display_name = if self.plan.single_state() {
            String::new()
        } else {
            stage.name.clone().unwrap_or_else(|| format!("stage-{i}"))
        };
        let cmd_total = step_count(stage);
        let planned = &self.plan.stages[i];
        let opts: &ConvertOptions = self.cx.opts;
        let platform = || -> Platform {
            planned
                .platform
                .clone()
                .unwrap_or_else(|| opts.platform.clone())
        };
        let mut st = match planned.base {
            Base::Local(k) => {
                let platform = platform();
                let state = self.cx.local_op(k, &self.plan.locals[k]);
                StageState::new(Some(state), empty_image(&platform), platform)
            }
            Base::Scratch => {
                let platform = platform();
                StageState::new(None, empty_image(&platform), platform)
            }
            Base::Stage(j) => {
                let mut st = self.states[j]
                    .clone()
                    .ok_or_else(|| Error::StageNotDefinedYet {
                        line: stage.location.start_line,
                        from: stage.base.clone(),
                        stage: display_name.clone(),
                    })?;
                st.cmd_set = false;
                st
            }
            Base::Image(k) => return self.image_state(k, stage, display_name, cmd_total),
        };
        st.display_name = display_name;
        st.cmd_index = 0;
        st.cmd_total = cmd_total;
        Ok(st)
    }

    /// A stage on image `k`: its source op is the stage's first step.
    fn image_state(
        &mut self,
        k: usize,
        stage: &Stage,
        display_name: String,
        cmd_total: usize,
    ) -> Result<StageState, Error> {
        let image = &self.plan.images[k];
        let resolved = image
            .resolved
            .clone()
            .ok_or_else(|| Error::UnresolvedImage {
                line: stage.location.start_line,
                reference: image.reference.clone(),
            })?;
        let mut st = StageState::new(resolved.state, resolved.config, image.platform.clone());
        st.display_name = display_name;
        st.cmd_total = cmd_total;
        if let Some(id) = resolved.state {
            st.cmd_total += 1;
            // Give the source op its stage progress name.
            let ops = &mut self.cx.ops;
            let source = ops.source_identifier(id);
            let name = st.progress_name(&format!(
                "FROM {}",
                source.trim_start_matches("docker-image://")
            ));
            // an OCI layout's keeps the name BuildKit gives it
            if !source.starts_with(kiln_session::ocilayout::SCHEME) {
                ops.set_custom_name(id, &name);
            }
        }
        Ok(st)
    }

    /// ONBUILD triggers of the base (image config or parent stage) run first.
    fn dispatch_triggers(
        &mut self,
        i: usize,
        stage: &Stage,
        st: &mut StageState,
    ) -> Result<(), Error> {
        let triggers = st.image.config.on_build.take().unwrap_or_default();
        st.cmd_total += triggers.len();
        st.onbuild = true;
        for trigger in &triggers {
            let mut cmd = kiln_dockerfile::parse_command(trigger, self.df.directives.escape)
                .map_err(|source| Error::InvalidTrigger {
                    line: stage.location.start_line,
                    source,
                })?;
            cmd.location = stage.location;
            let sources = self.trigger_sources(&cmd, i)?;
            dispatch(self.cx, st, &cmd, &sources)?;
        }
        st.onbuild = false;
        Ok(())
    }

    /// Sources of an ONBUILD trigger's COPY --from / RUN --mount from=: an
    /// earlier stage, an image or a named context (planned by
    /// `Plan::add_trigger_deps`).
    fn trigger_sources(&mut self, cmd: &Command, current: usize) -> Result<Vec<CopySource>, Error> {
        let line = line_of(cmd);
        let froms = match &cmd.instruction {
            Instruction::Copy(c) => vec![c.from.clone()],
            Instruction::Run(r) => super::plan::mount_froms(cmd, &r.mounts)?,
            _ => return Ok(Vec::new()),
        };
        let (plan, states) = (self.plan, &self.states);
        let mut source = |from: String| {
            match plan.trigger_froms.get(&(current, from.clone())) {
                Some(From::Image(k)) => {
                    return Ok(CopySource::State(
                        plan.images[*k].resolved.as_ref().and_then(|r| r.state),
                    ));
                }
                Some(From::Local(k)) => {
                    return Ok(CopySource::State(Some(
                        self.cx.local_op(*k, &plan.locals[*k]),
                    )));
                }
                _ => {}
            }
            let index = from
                .parse::<usize>()
                .ok()
                .or_else(|| plan.names.get(&from.to_ascii_lowercase()).copied());
            match index {
                Some(j) if j < current => match &states[j] {
                    Some(s) => Ok(CopySource::State(s.state)),
                    None => Err(Error::Unsupported {
                        line,
                        feature: format!("ONBUILD reading from unbuilt stage {from:?}"),
                    }),
                },
                _ => Err(Error::Unsupported {
                    line,
                    feature: format!("ONBUILD reading from {from:?}"),
                }),
            }
        };
        froms
            .into_iter()
            .map(|from| from.map_or(Ok(CopySource::Context), &mut source))
            .collect()
    }

    /// What each source (COPY) or mount (RUN) of command `c` of stage `i` reads.
    fn command_sources(
        &mut self,
        i: usize,
        c: usize,
        stage: &Stage,
        cmd: &Command,
    ) -> Result<Vec<CopySource>, Error> {
        let planned = self.plan.stages[i].command_sources.get(&c);
        let mut sources = Vec::new();
        for named in planned.into_iter().flatten() {
            let Some(named) = named else {
                sources.push(CopySource::Context);
                continue;
            };
            sources.push(match named.from {
                From::Stage(j) if j >= i => {
                    return Err(Error::StageNotDefinedYet {
                        line: line_of(cmd),
                        from: named.name.clone(),
                        stage: stage.name.clone().unwrap_or_else(|| format!("stage-{i}")),
                    });
                }
                From::Stage(j) => CopySource::State(self.states[j].as_ref().and_then(|s| s.state)),
                From::Image(k) => {
                    CopySource::State(self.plan.images[k].resolved.as_ref().and_then(|r| r.state))
                }
                From::Local(k) => {
                    CopySource::State(Some(self.cx.local_op(k, &self.plan.locals[k])))
                }
            });
        }
        Ok(sources)
    }
}

/// The instructions of a stage that are steps (make an op) in progress names.
fn step_count(stage: &Stage) -> usize {
    stage
        .commands
        .iter()
        .filter(|c| {
            matches!(
                c.instruction,
                Instruction::Run(_)
                    | Instruction::Copy(_)
                    | Instruction::Add(_)
                    | Instruction::Workdir(_)
            )
        })
        .count()
}

/// Dispatches one instruction of a stage (its words expanded first).
fn dispatch(
    cx: &mut DispatchContext,
    st: &mut StageState,
    cmd: &Command,
    sources: &[CopySource],
) -> Result<(), Error> {
    let line = line_of(cmd);
    let mut instruction = cmd.instruction.clone();
    let env = super::lint::Recording::new(&st.env);
    instruction
        .expand(&cx.lex, &env)
        .map_err(|source| Error::Expand { line, source })?;
    let declared: BTreeSet<&str> = st.build_args.iter().map(|a| a.key.as_str()).collect();
    let keys: Vec<&str> = st.env.iter().map(|(k, _)| k.as_str()).collect();
    for name in env.missing() {
        if !declared.contains(name.as_str()) {
            cx.warnings
                .push(super::lint::undefined_var(cmd, &name, &keys));
        }
    }
    let invalid = |reason: String| Error::InvalidInstruction {
        line,
        instruction: instruction.keyword().to_string(),
        reason,
    };
    match &instruction {
        Instruction::Run(r) => run::dispatch(cx, st, cmd, r, sources)?,
        Instruction::Copy(c) => {
            let source = sources.first().copied().unwrap_or(CopySource::Context);
            copy::dispatch(cx, st, cmd, c, CopyKind::Copy, source)?
        }
        Instruction::Add(c) => copy::dispatch(cx, st, cmd, c, CopyKind::Add, CopySource::Context)?,
        Instruction::Workdir(p) => copy::workdir(cx, st, cmd, p),
        Instruction::Env(kvs) => image::env(st, kvs),
        Instruction::Arg(decls) => {
            let build_args = &cx.opts.build_args;
            let undefined = args::arg(&cx.lex, st, decls, build_args, &cx.global_args, line)?;
            for (name, keys) in undefined {
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                cx.warnings
                    .push(super::lint::undefined_var(cmd, &name, &keys));
            }
        }
        Instruction::User(u) => image::user(st, u),
        Instruction::Cmd(c) => image::cmd(st, c),
        Instruction::Entrypoint(c) => image::entrypoint(st, c),
        Instruction::Label(kvs) => image::label(st, kvs),
        Instruction::Expose(p) => image::expose(st, p).map_err(invalid)?,
        Instruction::Shell(s) => image::shell(st, s),
        Instruction::Volume(v) => image::volume(st, v).map_err(invalid)?,
        Instruction::StopSignal(s) => image::stop_signal(st, s).map_err(invalid)?,
        Instruction::Maintainer(m) => image::maintainer(st, m),
        Instruction::Healthcheck(h) => image::healthcheck(st, h, line)?,
        Instruction::Onbuild(expr, _) => image::onbuild(st, expr),
    }
    Ok(())
}
