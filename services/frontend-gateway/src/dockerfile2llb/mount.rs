//! `RUN --mount` -> ExecOp mounts (bind, cache, tmpfs, secret, ssh), the way
//! BuildKit's dispatchRunMounts and the LLB exec marshaller lay them out.

use std::collections::BTreeSet;

use kiln_dockerfile::{MountType, RunMount, Sharing};
use kiln_llb::pb;

use super::copy::CopySource;
use super::dispatch::DispatchContext;
use super::ops::{Lines, OpId, Ops, file_op, metadata};
use super::stage::{StageState, chown_opt, clean_path};

/// A mount that reads a state (None: scratch), before input indexes are assigned.
pub(crate) struct InputMount {
    pub mount: pb::Mount,
    pub state: Option<OpId>,
}

/// Mounts of one exec, before input indexes are assigned.
#[derive(Default)]
pub(crate) struct ExecMounts {
    /// Ordinary mounts (root included).
    pub ordinary: Vec<InputMount>,
    /// Secret and SSH mounts, in declaration order (no inputs).
    pub special: Vec<pb::Mount>,
    pub secret_env: Vec<pb::SecretEnv>,
    /// Extra env for the exec unless the stage sets it (SSH_AUTH_SOCK).
    pub env: Vec<(String, String)>,
    pub caps: BTreeSet<&'static str>,
    /// SSH mounts so far (the first is the agent socket).
    ssh_count: usize,
}

fn target_path(cwd: &str, target: &str) -> String {
    if target.starts_with('/') {
        clean_path(target)
    } else {
        clean_path(&format!("{cwd}/{target}"))
    }
}

impl ExecMounts {
    /// Adds the mounts in `specs` (parsed) with their `sources` (parallel, one per spec).
    pub(crate) fn add(
        &mut self,
        cx: &mut DispatchContext,
        st: &StageState,
        specs: &[RunMount],
        sources: &[CopySource],
        lines: Lines,
    ) {
        for (i, m) in specs.iter().enumerate() {
            let source = sources.get(i).copied().unwrap_or(CopySource::Context);
            let dest = m.target.as_deref().map(|t| target_path(&st.cwd, t));
            match m.kind {
                MountType::Bind => self.bind(cx, m, source, dest.unwrap_or_default()),
                MountType::Cache => {
                    let ns = cx.opts.cache_namespace.clone();
                    self.cache(&mut cx.ops, m, &ns, source, dest.unwrap_or_default(), lines)
                }
                MountType::Tmpfs => self.tmpfs(m, dest.unwrap_or_default()),
                MountType::Secret => self.secret(m, dest),
                MountType::Ssh => self.ssh(m, dest),
            }
        }
    }

    /// Adds an ordinary mount that reads `state` and writes no output of its own (-1),
    /// with the selector cap when it mounts a path inside its input.
    fn push_input(&mut self, mount: pb::Mount, state: Option<OpId>) {
        if !mount.selector.is_empty() {
            self.caps.insert("exec.mount.selector");
        }
        self.ordinary.push(InputMount {
            mount: pb::Mount {
                output: -1,
                ..mount
            },
            state,
        });
    }

    fn bind(&mut self, cx: &mut DispatchContext, m: &RunMount, source: CopySource, dest: String) {
        let state = match source {
            CopySource::Context => {
                cx.ctx_paths
                    .insert(clean_path(m.source.as_deref().unwrap_or("/")));
                Some(cx.ops.context())
            }
            CopySource::State(s) => s,
        };
        let selector = m.source.as_deref().map(clean_path).unwrap_or_default();
        let mount = pb::Mount {
            selector,
            dest,
            readonly: m.readonly,
            ..Default::default()
        };
        self.push_input(mount, state);
    }

    /// A cache mount; its id is `NAMESPACE/ID` (`BUILDKIT_CACHE_MOUNT_NS`,
    /// empty by default, so `/ID`).
    fn cache(
        &mut self,
        ops: &mut Ops,
        m: &RunMount,
        namespace: &str,
        source: CopySource,
        dest: String,
        lines: Lines,
    ) {
        let (state, selector) = match source {
            CopySource::State(s) if m.from.is_some() => {
                (s, m.source.as_deref().map(clean_path).unwrap_or_default())
            }
            _ if m.mode.is_some() || m.uid.is_some() || m.gid.is_some() => {
                (Some(cache_permissions(ops, m, lines)), "/cache".to_string())
            }
            _ => (None, String::new()),
        };
        self.caps.insert("exec.mount.cache");
        self.caps.insert("exec.mount.cache.sharing");
        let id = format!(
            "{namespace}/{}",
            m.id.clone().unwrap_or_else(|| dest.clone())
        );
        let sharing = match m.sharing {
            Sharing::Shared => pb::CacheSharingOpt::Shared,
            Sharing::Private => pb::CacheSharingOpt::Private,
            Sharing::Locked => pb::CacheSharingOpt::Locked,
        };
        self.push_input(
            pb::Mount {
                selector,
                dest,
                readonly: m.readonly,
                mount_type: pb::MountType::Cache as i32,
                cache_opt: Some(pb::CacheOpt {
                    id,
                    sharing: sharing as i32,
                }),
                ..Default::default()
            },
            state,
        );
    }

    fn tmpfs(&mut self, m: &RunMount, dest: String) {
        self.caps.insert("exec.mount.tmpfs");
        if m.size.is_some() {
            self.caps.insert("exec.mount.tmpfs.size");
        }
        self.push_input(
            pb::Mount {
                dest,
                mount_type: pb::MountType::Tmpfs as i32,
                tmpfs_opt: Some(pb::TmpfsOpt {
                    size: m.size.unwrap_or(0),
                }),
                ..Default::default()
            },
            None,
        );
    }

    fn secret(&mut self, m: &RunMount, dest: Option<String>) {
        let id = m.id.clone().unwrap_or_else(|| {
            m.target
                .as_deref()
                .and_then(|t| t.rsplit('/').next())
                .unwrap_or_default()
                .to_string()
        });
        if let Some(env) = &m.env {
            self.caps.insert("exec.secretenv");
            self.secret_env.push(pb::SecretEnv {
                id: id.clone(),
                name: env.clone(),
                optional: !m.required,
            });
            if m.target.is_none() {
                return;
            }
        }
        self.caps.insert("exec.mount.secret");
        self.special.push(pb::Mount {
            input: -1,
            dest: dest.unwrap_or_else(|| format!("/run/secrets/{id}")),
            mount_type: pb::MountType::Secret as i32,
            secret_opt: Some(pb::SecretOpt {
                id,
                uid: m.uid.unwrap_or(0),
                gid: m.gid.unwrap_or(0),
                mode: m.mode.unwrap_or(0o400),
                optional: !m.required,
            }),
            ..Default::default()
        });
    }

    fn ssh(&mut self, m: &RunMount, dest: Option<String>) {
        self.caps.insert("exec.mount.ssh");
        let dest = dest.unwrap_or_else(|| format!("/run/buildkit/ssh_agent.{}", self.ssh_count));
        // the first ssh mount is the agent, wherever it is mounted
        if self.ssh_count == 0 {
            self.env.push(("SSH_AUTH_SOCK".to_string(), dest.clone()));
        }
        self.ssh_count += 1;
        self.special.push(pb::Mount {
            input: -1,
            dest,
            mount_type: pb::MountType::Ssh as i32,
            ssh_opt: Some(pb::SshOpt {
                id: m.id.clone().unwrap_or_else(|| "default".to_string()),
                uid: m.uid.unwrap_or(0),
                gid: m.gid.unwrap_or(0),
                mode: m.mode.unwrap_or(0o600),
                optional: !m.required,
            }),
            ..Default::default()
        });
    }

    /// Sorts ordinary mounts by dest, assigns input indexes (deduplicated), and
    /// appends the special mounts. Returns (inputs, mounts).
    pub(crate) fn layout(self) -> (Vec<OpId>, Vec<pb::Mount>) {
        let mut ordinary = self.ordinary;
        ordinary.sort_by(|a, b| a.mount.dest.as_bytes().cmp(b.mount.dest.as_bytes()));
        let mut inputs: Vec<OpId> = Vec::new();
        let mut out = Vec::new();
        for InputMount { mut mount, state } in ordinary {
            mount.input = match state {
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
            };
            out.push(mount);
        }
        out.extend(self.special);
        (inputs, out)
    }
}

/// The mkdir that gives a cache mount its `mode`/`uid`/`gid`.
fn cache_permissions(ops: &mut Ops, m: &RunMount, lines: Lines) -> OpId {
    let owner = chown_opt(
        &format!("{}:{}", m.uid.unwrap_or(0), m.gid.unwrap_or(0)),
        -1,
    );
    let mode = i32::try_from(m.mode.unwrap_or(0o755)).unwrap_or(0o755);
    let mkdir = pb::FileAction {
        input: -1,
        secondary_input: -1,
        output: 0,
        action: Some(pb::file_action::Action::Mkdir(pb::FileActionMkDir {
            path: "/cache".to_string(),
            mode,
            make_parents: false,
            owner,
            timestamp: -1,
        })),
    };
    let md = metadata(
        &[(
            "llb.customname",
            "[internal] setting cache mount permissions",
        )],
        &["file.base"],
    );
    ops.push(file_op(vec![mkdir]), Vec::new(), md, Some(lines))
}
