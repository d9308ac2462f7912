//! The build plan, made before any op: what each stage is built on, what each
//! `COPY --from` / `RUN --mount from=` reads, which images must be resolved,
//! and which stages the target needs (BuildKit's `dispatchState` graph with
//! its `deps`, before `dispatch`).

use std::collections::{BTreeMap, BTreeSet};

use kiln_dockerfile::{Command, Dockerfile, Instruction, Lex, Stage};
use kiln_oci::{ImageConfig, Platform};

use super::args::Args;
use super::ops::OpId;
use super::{ConvertOptions, Error, NamedContext, line_of, reference};

/// The reference an `oci-layout://` named context's image goes by (the
/// context's name pinned to the digest, as BuildKit names it) and where it
/// is read from.
fn oci_use(context: &str, store: &str, digest: &str, opts: &ConvertOptions) -> (String, OciUse) {
    let oci = OciUse {
        context: context.to_string(),
        store: store.to_string(),
        session_id: opts.session_id.clone(),
    };
    (format!("{context}@{digest}"), oci)
}

/// What a stage is built on.
#[derive(Debug, Clone, Copy)]
pub(super) enum Base {
    Scratch,
    /// A named local context (index into [`Plan::locals`]).
    Local(usize),
    /// An earlier stage, by index.
    Stage(usize),
    /// An image (index into [`Plan::images`]).
    Image(usize),
}

/// What a `from=` names.
#[derive(Debug, Clone, Copy)]
pub(super) enum From {
    Stage(usize),
    /// An image (index into [`Plan::images`]).
    Image(usize),
    /// A named local context (index into [`Plan::locals`]).
    Local(usize),
}

/// A `from=` as written and what it names.
#[derive(Debug, Clone)]
pub(super) struct NamedFrom {
    pub name: String,
    pub from: From,
}

/// A resolved image: its source op (None when it has no layers) and config.
#[derive(Debug, Clone)]
pub(super) struct ResolvedBase {
    pub state: Option<OpId>,
    pub config: ImageConfig,
}

/// An image to resolve.
#[derive(Debug)]
pub(super) struct ImageUse {
    /// Normalised reference (`docker.io/library/busybox:latest`).
    pub reference: String,
    /// The name as the Dockerfile gives it (expanded), for messages.
    pub written: String,
    pub platform: Platform,
    /// The line naming it, for errors and the source op's location.
    pub line: usize,
    /// The FROM line (`com.docker.dockerfile.v1.command`), empty for COPY --from.
    pub command: String,
    pub resolved: Option<ResolvedBase>,
    /// An image in an OCI layout the client serves, not in a registry.
    pub oci: Option<OciUse>,
}

/// Where an `oci-layout://` named context's image is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OciUse {
    /// the named context (`context:NAME`)
    pub context: String,
    /// the client's store (`oci.store`)
    pub store: String,
    /// the client's session (`oci.session`)
    pub session_id: String,
}

/// One stage of the plan.
#[derive(Debug)]
pub(super) struct StagePlan {
    pub base: Base,
    /// `FROM --platform=`, when given.
    pub platform: Option<Platform>,
    /// Every `from=` of the stage's instructions.
    pub deps: Vec<From>,
    /// By command index: the `from=` of each source of a COPY or of each
    /// mount of a RUN (None reads the build context).
    pub command_sources: BTreeMap<usize, Vec<Option<NamedFrom>>>,
    /// A named context has the stage's name: it is the stage, whose
    /// instructions are not run (BuildKit's `toDispatchState`).
    pub replaced: bool,
}

#[derive(Debug)]
pub(super) struct Plan {
    pub stages: Vec<StagePlan>,
    /// Stage names (lowercased) to indexes.
    pub names: BTreeMap<String, usize>,
    pub images: Vec<ImageUse>,
    /// Dirs of named local contexts.
    pub locals: Vec<String>,
    /// The stage to build.
    pub target: usize,
    /// `COPY --from` images, by reference (one source op each).
    image_by_ref: BTreeMap<String, usize>,
    /// What the `from=` of a stage's inherited ONBUILD triggers name when it
    /// is not a stage (an image or a named context), by (stage, name).
    pub trigger_froms: BTreeMap<(usize, String), From>,
    has_mounts: bool,
}

impl Plan {
    /// Plans `df`; errors name the line of the FROM or instruction at fault.
    pub(super) fn new(
        df: &Dockerfile,
        opts: &ConvertOptions,
        lex: &Lex,
        global_args: &Args,
    ) -> Result<Plan, Error> {
        let mut plan = Plan {
            stages: Vec::new(),
            names: BTreeMap::new(),
            images: Vec::new(),
            locals: Vec::new(),
            target: 0,
            image_by_ref: BTreeMap::new(),
            trigger_froms: BTreeMap::new(),
            has_mounts: false,
        };
        for (i, stage) in df.stages.iter().enumerate() {
            plan.add_stage(i, stage, opts, lex, global_args)?;
        }
        plan.target = plan.target_index(opts)?;
        for (i, stage) in df.stages.iter().enumerate() {
            if plan.stages[i].replaced {
                continue;
            }
            for (c, cmd) in stage.commands.iter().enumerate() {
                plan.add_command_sources(i, c, cmd, opts)?;
            }
        }
        plan.add_trigger_deps(df, opts)?;
        plan.check_cycles(df)?;
        Ok(plan)
    }

    /// The ONBUILD triggers a stage declares run in each stage `FROM` it
    /// (BuildKit's `initOnBuildTriggers`): the stages a trigger's `COPY
    /// --from` or `RUN --mount from=` names are needed by those children.
    fn add_trigger_deps(&mut self, df: &Dockerfile, opts: &ConvertOptions) -> Result<(), Error> {
        for i in 0..self.stages.len() {
            let Base::Stage(j) = self.stages[i].base else {
                continue;
            };
            if self.stages[i].replaced || self.stages[j].replaced {
                continue;
            }
            let Some(base) = df.stages.get(j) else {
                continue;
            };
            for cmd in &base.commands {
                let Instruction::Onbuild(_, inner) = &cmd.instruction else {
                    continue;
                };
                let froms = match inner.as_ref() {
                    Instruction::Copy(c) => vec![c.from.clone()],
                    Instruction::Run(r) if !r.mounts.is_empty() => mount_froms(cmd, &r.mounts)?,
                    _ => continue,
                };
                for name in froms.into_iter().flatten() {
                    let k = name
                        .parse::<usize>()
                        .ok()
                        .or_else(|| self.names.get(&name.to_ascii_lowercase()).copied());
                    if let Some(k) = k.filter(|k| *k < self.stages.len()) {
                        self.stages[i].deps.push(From::Stage(k));
                    } else {
                        let from = self.named_from(&name, line_of(cmd), opts)?;
                        self.stages[i].deps.push(from);
                        self.trigger_froms.insert((i, name), from);
                    }
                }
            }
        }
        Ok(())
    }

    fn add_stage(
        &mut self,
        i: usize,
        stage: &Stage,
        opts: &ConvertOptions,
        lex: &Lex,
        global_args: &Args,
    ) -> Result<(), Error> {
        let line = stage.location.start_line;
        let expand = |word: &str| {
            lex.process_word(word, global_args.pairs())
                .map_err(|source| Error::Expand { line, source })
        };
        let base = expand(&stage.base)?;
        if base.is_empty() {
            return Err(Error::BlankBaseName {
                line,
                base: stage.base.clone(),
            });
        }
        let platform = match &stage.platform {
            Some(p) => {
                Some(
                    Platform::parse(&expand(p)?).map_err(|source| Error::InvalidPlatform {
                        line,
                        value: p.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let replaced = stage
            .name
            .as_ref()
            .is_some_and(|n| opts.named_contexts.contains_key(n));
        let base = match &stage.name {
            Some(name) if replaced => self.base_of(name, stage, platform.as_ref(), opts)?,
            _ => self.base_of(&base, stage, platform.as_ref(), opts)?,
        };
        self.stages.push(StagePlan {
            base,
            platform,
            deps: Vec::new(),
            command_sources: BTreeMap::new(),
            replaced,
        });
        if let Some(name) = &stage.name {
            self.names.insert(name.clone(), i);
        }
        Ok(())
    }

    /// What `FROM base` (expanded) names: a stage, a named context, scratch or an image.
    fn base_of(
        &mut self,
        base: &str,
        stage: &Stage,
        platform: Option<&Platform>,
        opts: &ConvertOptions,
    ) -> Result<Base, Error> {
        let named = opts.named_contexts.get(base);
        if let Some(&j) = self.names.get(base) {
            return Ok(Base::Stage(j));
        }
        if let Some(NamedContext::Local(dir)) = named {
            return Ok(Base::Local(self.local_index(dir)));
        }
        if base.eq_ignore_ascii_case("scratch") && named.is_none() {
            return Ok(Base::Scratch);
        }
        let line = stage.location.start_line;
        let written = base.to_string();
        let (base, oci) = match named {
            Some(NamedContext::Image(r)) => (r.clone(), None),
            Some(NamedContext::OciLayout { store, digest }) => {
                let (r, oci) = oci_use(base, store, digest, opts);
                (r, Some(oci))
            }
            _ => (base.to_string(), None),
        };
        let reference = reference::normalize(&base).map_err(|source| Error::InvalidReference {
            line,
            reference: base.clone(),
            source,
        })?;
        self.images.push(ImageUse {
            reference,
            written,
            platform: platform.cloned().unwrap_or_else(|| opts.platform.clone()),
            line,
            command: stage.original.clone(),
            resolved: None,
            oci,
        });
        Ok(Base::Image(self.images.len() - 1))
    }

    fn target_index(&self, opts: &ConvertOptions) -> Result<usize, Error> {
        match &opts.target {
            Some(t) if !t.is_empty() => self
                .names
                .get(&t.to_ascii_lowercase())
                .copied()
                .ok_or_else(|| Error::TargetNotFound {
                    target: t.clone(),
                    hint: super::lint::suggest(t, self.names.keys().map(String::as_str))
                        .map(|s| format!(" (did you mean {s}?)"))
                        .unwrap_or_default(),
                }),
            _ => Ok(self.stages.len() - 1),
        }
    }

    /// Records what command `c` of stage `i` reads through `from=`.
    fn add_command_sources(
        &mut self,
        i: usize,
        c: usize,
        cmd: &Command,
        opts: &ConvertOptions,
    ) -> Result<(), Error> {
        let froms = match &cmd.instruction {
            Instruction::Copy(copy) => vec![copy.from.clone()],
            Instruction::Run(run) if !run.mounts.is_empty() => {
                self.has_mounts = true;
                mount_froms(cmd, &run.mounts)?
            }
            _ => return Ok(()),
        };
        let mut named = Vec::new();
        for from in froms {
            let Some(name) = from else {
                named.push(None);
                continue;
            };
            let from = self.named_from(&name, line_of(cmd), opts)?;
            self.stages[i].deps.push(from);
            named.push(Some(NamedFrom { name, from }));
        }
        self.stages[i].command_sources.insert(c, named);
        Ok(())
    }

    /// What `from=NAME` names: a stage by index or name, a named context, else an image.
    fn named_from(
        &mut self,
        name: &str,
        line: usize,
        opts: &ConvertOptions,
    ) -> Result<From, Error> {
        let invalid_index = || Error::InvalidStageIndex {
            line,
            index: name.to_string(),
        };
        if let Ok(index) = name.parse::<usize>() {
            return if index < self.stages.len() {
                Ok(From::Stage(index))
            } else {
                Err(invalid_index())
            };
        }
        if name.starts_with('-') && name[1..].parse::<usize>().is_ok() {
            return Err(invalid_index());
        }
        if let Some(&j) = self.names.get(&name.to_ascii_lowercase()) {
            return Ok(From::Stage(j));
        }
        let (image, oci) = match opts.named_contexts.get(name) {
            Some(NamedContext::Local(dir)) => return Ok(From::Local(self.local_index(dir))),
            Some(NamedContext::Image(r)) => (r.clone(), None),
            Some(NamedContext::OciLayout { store, digest }) => {
                let (r, oci) = oci_use(name, store, digest, opts);
                (r, Some(oci))
            }
            None => (name.to_string(), None),
        };
        let reference = reference::normalize(&image).map_err(|source| Error::InvalidReference {
            line,
            reference: name.to_string(),
            source,
        })?;
        let key = match &oci {
            Some(_) => format!("{}{reference}", kiln_session::ocilayout::SCHEME),
            None => reference.clone(),
        };
        if let Some(&k) = self.image_by_ref.get(&key) {
            return Ok(From::Image(k));
        }
        self.images.push(ImageUse {
            reference,
            written: name.to_string(),
            platform: opts.platform.clone(),
            line,
            command: String::new(),
            resolved: None,
            oci,
        });
        let k = self.images.len() - 1;
        self.image_by_ref.insert(key, k);
        Ok(From::Image(k))
    }

    /// The index of the named local context `dir`, added on first use.
    fn local_index(&mut self, dir: &str) -> usize {
        match self.locals.iter().position(|l| l == dir) {
            Some(k) => k,
            None => {
                self.locals.push(dir.to_string());
                self.locals.len() - 1
            }
        }
    }

    /// The stages a stage needs: its base stage and every stage it reads.
    fn stage_edges(&self, i: usize) -> Vec<usize> {
        let stage = &self.stages[i];
        let base = match stage.base {
            Base::Stage(j) => Some(j),
            _ => None,
        };
        base.into_iter()
            .chain(stage.deps.iter().filter_map(|d| match d {
                From::Stage(j) => Some(*j),
                _ => None,
            }))
            .collect()
    }

    /// A stage that (through COPY --from, RUN --mount from= or FROM) needs itself.
    fn check_cycles(&self, df: &Dockerfile) -> Result<(), Error> {
        match find_cycle(self.stages.len(), |i| self.stage_edges(i)) {
            Some(i) => {
                let stage = &df.stages[i];
                Err(Error::CircularStage {
                    line: stage.location.start_line,
                    stage: stage.name.clone().unwrap_or_else(|| format!("stage-{i}")),
                })
            }
            None => Ok(()),
        }
    }

    /// The stages the target needs, and the images they read (in Dockerfile order).
    pub(super) fn reachable(&self) -> (Vec<bool>, BTreeSet<usize>) {
        let mut reachable = vec![false; self.stages.len()];
        let mut images = BTreeSet::new();
        let mut todo = vec![self.target];
        while let Some(i) = todo.pop() {
            if std::mem::replace(&mut reachable[i], true) {
                continue;
            }
            let stage = &self.stages[i];
            match stage.base {
                Base::Stage(j) => todo.push(j),
                Base::Image(k) => {
                    images.insert(k);
                }
                Base::Scratch | Base::Local(_) => {}
            }
            for d in &stage.deps {
                match *d {
                    From::Stage(j) => todo.push(j),
                    From::Image(k) => {
                        images.insert(k);
                    }
                    From::Local(_) => {}
                }
            }
        }
        (reachable, images)
    }

    /// One stage reading no other state: progress names carry no stage name.
    pub(super) fn single_state(&self) -> bool {
        self.stages.len() + self.image_by_ref.len() == 1 && !self.has_mounts
    }
}

/// The `from=` of each `--mount` of a RUN.
pub(super) fn mount_froms(cmd: &Command, mounts: &[String]) -> Result<Vec<Option<String>>, Error> {
    mounts
        .iter()
        .map(|m| {
            kiln_dockerfile::mount_from(m).map_err(|source| Error::InvalidMount {
                line: line_of(cmd),
                source,
            })
        })
        .collect()
}

/// A node on a cycle of the graph with `n` nodes and these edges, if any.
fn find_cycle(n: usize, edges: impl Fn(usize) -> Vec<usize>) -> Option<usize> {
    // 0 = unvisited, 1 = on the current path, 2 = done
    let mut color = vec![0u8; n];
    for start in 0..n {
        if color[start] != 0 {
            continue;
        }
        let mut stack = vec![(start, edges(start), 0usize)];
        color[start] = 1;
        while let Some((node, next, k)) = stack.last_mut() {
            if let Some(&to) = next.get(*k) {
                *k += 1;
                match color.get(to) {
                    Some(1) => return Some(to),
                    Some(0) => {
                        color[to] = 1;
                        let e = edges(to);
                        stack.push((to, e, 0));
                    }
                    _ => {}
                }
            } else {
                color[*node] = 2;
                stack.pop();
            }
        }
    }
    None
}
