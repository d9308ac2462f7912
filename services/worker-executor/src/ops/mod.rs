//! The one dispatch point for LLB ops: `run_op(op, inputs) -> outputs`.

pub mod exec;
pub mod file;
pub mod merge;
pub mod source;

use crate::error::{Error, Result};
use crate::pb;
use crate::pb::op::Op;
use crate::{Event, RunRequest, Worker};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::mpsc;

/// Runs one op on refs of its inputs; returns one ref per output (`None` = scratch).
pub async fn run_op(
    w: &Worker,
    req: RunRequest,
    events: mpsc::Sender<Event>,
) -> Result<Vec<Option<String>>> {
    if req.inputs.len() != req.op.inputs.len() {
        return Err(Error::InputCount {
            want: req.op.inputs.len(),
            got: req.inputs.len(),
        });
    }
    for id in req.inputs.iter().flatten() {
        w.store().meta(id)?;
    }
    check_outputs(&req.op)?;
    let _busy = w.activity.start();
    match &req.op.op {
        Some(Op::Source(s)) => Ok(vec![
            source::run(w, s, req.op.platform.as_ref(), &req, &events).await?,
        ]),
        Some(Op::Exec(e)) => {
            // a foreign platform needs an emulator: say so before the container starts
            if let Some(p) = &req.op.platform {
                w.can_run(&kiln_oci::Platform::new(
                    &p.os,
                    &p.architecture,
                    Some(p.variant.as_str()).filter(|v| !v.is_empty()),
                ))?;
            }
            exec::run(w, e, &req, &events).await
        }
        Some(Op::File(f)) => file::run(w, f, &req.inputs).await,
        Some(Op::Merge(m)) => merge::merge(w, m, &req.inputs).await,
        Some(Op::Diff(d)) => merge::diff(w, d, &req.inputs).await,
        Some(Op::Build(_)) => Err(Error::UnsupportedOp("build".into())),
        Some(Op::Passthrough(_)) => Err(Error::UnsupportedOp("passthrough".into())),
        None => Err(Error::InvalidOp("op has no body".into())),
    }
}

/// Output indexes come from the client: each must be `-1` (none) or name one of
/// the op's own outputs (at most one per mount or file action), used once, so an
/// index never sizes anything. Public for the fuzz targets (`fuzz/`).
#[doc(hidden)]
pub fn check_outputs(op: &pb::Op) -> Result<()> {
    let (kind, outputs): (&str, Vec<i64>) = match &op.op {
        // only bind mounts have outputs (others' `output` is not looked at)
        Some(Op::Exec(e)) => (
            "exec mount",
            e.mounts
                .iter()
                .map(|m| {
                    if m.mount_type == pb::MountType::Bind as i32 {
                        m.output
                    } else {
                        -1
                    }
                })
                .collect(),
        ),
        Some(Op::File(f)) => ("file action", f.actions.iter().map(|a| a.output).collect()),
        _ => return Ok(()),
    };
    let mut seen = std::collections::HashSet::new();
    for (i, o) in outputs.iter().enumerate() {
        if *o == -1 {
            continue;
        }
        if *o < 0 || *o as usize >= outputs.len() || !seen.insert(*o) {
            return Err(Error::InvalidOp(format!(
                "{kind} {i}: output index {o} is not one of the op's {} outputs (or is used twice)",
                outputs.len()
            )));
        }
    }
    Ok(())
}

/// The ref of input `index` (`-1` or out of range handled by the caller as scratch).
pub(crate) fn input_ref(inputs: &[Option<String>], index: i64) -> Result<Option<String>> {
    if index < 0 {
        return Ok(None);
    }
    inputs.get(index as usize).cloned().ok_or_else(|| {
        Error::InvalidOp(format!(
            "input index {index} out of range ({} inputs)",
            inputs.len()
        ))
    })
}

/// How many ops and layer computations are running on a worker, for
/// housekeeping that should wait for a quiet moment ([`Activity::wait_quiet`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Activity(Arc<AtomicUsize>);

/// Counts as running while alive.
pub(crate) struct Busy<'a>(&'a AtomicUsize);

impl Activity {
    /// How many are running now.
    pub(crate) fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    pub(crate) fn start(&self) -> Busy<'_> {
        self.0.fetch_add(1, Ordering::AcqRel);
        Busy(&self.0)
    }

    /// Blocks until nothing has been running for `quiet`, `urgent()` says to
    /// go on, or `max` has passed.
    pub(crate) fn wait_quiet(
        &self,
        quiet: std::time::Duration,
        max: std::time::Duration,
        urgent: impl Fn() -> bool,
    ) {
        let started = std::time::Instant::now();
        let mut idle_since: Option<std::time::Instant> = None;
        while started.elapsed() < max && !urgent() {
            if self.0.load(Ordering::Acquire) == 0 {
                let since = *idle_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= quiet {
                    return;
                }
            } else {
                idle_since = None;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod output_tests {
    use super::*;

    fn file_op(outputs: &[i64]) -> pb::Op {
        pb::Op {
            op: Some(Op::File(pb::FileOp {
                actions: outputs
                    .iter()
                    .map(|o| pb::FileAction {
                        input: -1,
                        secondary_input: -1,
                        output: *o,
                        action: None,
                    })
                    .collect(),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn output_indexes_must_name_the_ops_own_outputs() {
        assert!(check_outputs(&file_op(&[-1, 0])).is_ok());
        assert!(check_outputs(&file_op(&[1, 0])).is_ok());
        for bad in [&[1i64 << 40][..], &[0, 0], &[-2], &[2, -1]] {
            let e = check_outputs(&file_op(bad)).expect_err("refused");
            assert!(e.to_string().contains("output index"), "{e}");
        }
    }

    #[test]
    fn only_bind_mounts_have_outputs() {
        let mount = |output: i64, t: pb::MountType| pb::Mount {
            output,
            mount_type: t as i32,
            ..Default::default()
        };
        let exec = |mounts| pb::Op {
            op: Some(Op::Exec(pb::ExecOp {
                mounts,
                ..Default::default()
            })),
            ..Default::default()
        };
        // a secret mount's output (0 by default) is not an output
        let ok = exec(vec![
            mount(0, pb::MountType::Bind),
            mount(0, pb::MountType::Secret),
            mount(0, pb::MountType::Ssh),
        ]);
        assert!(check_outputs(&ok).is_ok());
        let bad = exec(vec![
            mount(0, pb::MountType::Bind),
            mount(0, pb::MountType::Bind),
        ]);
        assert!(check_outputs(&bad).is_err());
    }
}
