//! MergeOp and DiffOp (what `COPY --link` builds on): snapshot chains composed
//! without re-running anything.
//!
//! * merge(A, B, C): A's chain, then each layer of B's chain and of C's chain
//!   re-parented on top. Re-parented layers share their files with the
//!   originals (hard links; snapshots are immutable) and keep their layer
//!   blobs, so an exported image reuses the same blobs on the new base.
//! * diff(lower, upper): when upper's chain extends lower's, the layers above
//!   lower re-parented onto scratch; otherwise one layer computed by comparing
//!   the two filesystems (changed entries plus whiteouts for removed ones).

use crate::error::{Error, Result};
use crate::snapshot::{Kind, Meta, Store};
use crate::{Worker, pb};
use nix::sys::stat::{Mode, SFlag};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

pub async fn merge(
    w: &Worker,
    m: &pb::MergeOp,
    inputs: &[Option<String>],
) -> Result<Vec<Option<String>>> {
    let refs = m
        .inputs
        .iter()
        .map(|i| super::input_ref(inputs, i.input))
        .collect::<Result<Vec<_>>>()?;
    let store = w.store().clone();
    let out = tokio::task::spawn_blocking(move || -> Result<Option<String>> {
        let mut top: Option<String> = None;
        for r in refs.into_iter().flatten() {
            top = match top {
                None => Some(r),
                Some(base) => {
                    let mut chain = store.chain(Some(&r))?;
                    chain.reverse();
                    Some(rebase(&store, &chain, Some(base))?)
                }
            };
        }
        Ok(top)
    })
    .await??;
    Ok(vec![out])
}

pub async fn diff(
    w: &Worker,
    d: &pb::DiffOp,
    inputs: &[Option<String>],
) -> Result<Vec<Option<String>>> {
    let lower = match &d.lower {
        Some(l) => super::input_ref(inputs, l.input)?,
        None => None,
    };
    let upper = match &d.upper {
        Some(u) => super::input_ref(inputs, u.input)?,
        None => None,
    };
    let store = w.store().clone();
    let out = tokio::task::spawn_blocking(move || -> Result<Option<String>> {
        if lower == upper {
            return Ok(None);
        }
        let Some(upper) = upper else {
            // everything in lower removed: a layer of whiteouts
            return compare(&store, lower.as_deref(), None).map(Some);
        };
        let Some(lower) = lower else {
            return Ok(Some(upper));
        };
        let mut chain = store.chain(Some(&upper))?;
        if let Some(pos) = chain.iter().position(|m| m.id == lower) {
            chain.truncate(pos);
            chain.reverse();
            if chain.is_empty() {
                return Ok(None);
            }
            return rebase(&store, &chain, None).map(Some);
        }
        compare(&store, Some(&lower), Some(&upper)).map(Some)
    })
    .await??;
    Ok(vec![out])
}

/// Re-parents `layers` (root first) onto `base`; returns the new top.
fn rebase(store: &Store, layers: &[Meta], base: Option<String>) -> Result<String> {
    let mut parent = base;
    for layer in layers {
        let st = store.prepare(parent.as_deref())?;
        clone_tree(&store.diff_dir(&layer.id), &st.diff())
            .map_err(Error::io("clone layer", store.diff_dir(&layer.id)))?;
        let id = store.commit(st, layer.kind, layer.blob.clone())?;
        if !layer.layers.is_empty() {
            let mut meta = store.meta(&id)?;
            meta.layers = layer.layers.clone();
            store.update_meta(&meta)?;
        }
        parent = Some(id);
    }
    parent.ok_or_else(|| Error::InvalidOp("rebase of an empty chain".into()))
}

/// Recreates `src` at `dst`: directories (with owner, mode, times and xattrs such as
/// overlay's opaque marker) are created, everything else is hard-linked.
pub fn clone_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    let md = std::fs::symlink_metadata(src)?;
    if md.is_dir() {
        if std::fs::symlink_metadata(dst).is_err() {
            std::fs::create_dir(dst)?;
        }
        for e in std::fs::read_dir(src)? {
            let e = e?;
            clone_tree(&e.path(), &dst.join(e.file_name()))?;
        }
        copy_xattrs(src, dst)?;
        crate::fscopy::set_meta(
            dst,
            (md.uid(), md.gid()),
            Some(md.mode()),
            (
                nix::sys::time::TimeSpec::new(md.atime(), md.atime_nsec()),
                nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec()),
            ),
        )
    } else {
        std::fs::hard_link(src, dst)
    }
}

/// Copies the extended attributes of `src` to `dst` (neither followed when a
/// symlink); attributes that cannot be read are skipped.
fn copy_xattrs(src: &Path, dst: &Path) -> std::io::Result<()> {
    let Ok(names) = xattr::list(src) else {
        return Ok(());
    };
    for name in names {
        if let Ok(Some(value)) = xattr::get(src, &name) {
            xattr::set(dst, &name, &value)?;
        }
    }
    Ok(())
}

/// One layer holding what changed from `lower` to `upper` (`None` = empty).
fn compare(store: &Store, lower: Option<&str>, upper: Option<&str>) -> Result<String> {
    let lo = store.mount_ro(lower)?;
    let up = store.mount_ro(upper)?;
    let st = store.prepare(None)?;
    let diff = st.diff();
    compare_dir(lo.path(), up.path(), &diff, Path::new(""))
        .map_err(Error::io("diff", up.path()))?;
    lo.unmount()?;
    up.unmount()?;
    store.commit(st, Kind::Built, None)
}

fn same(a: &std::fs::Metadata, pa: &Path, b: &std::fs::Metadata, pb: &Path) -> bool {
    if a.file_type() != b.file_type()
        || a.mode() != b.mode()
        || a.uid() != b.uid()
        || a.gid() != b.gid()
    {
        return false;
    }
    if a.is_dir() {
        return true;
    }
    if a.file_type().is_symlink() {
        return std::fs::read_link(pa).ok() == std::fs::read_link(pb).ok();
    }
    if a.is_file() {
        return a.size() == b.size()
            && ((a.mtime(), a.mtime_nsec()) == (b.mtime(), b.mtime_nsec())
                || std::fs::read(pa).ok() == std::fs::read(pb).ok());
    }
    a.rdev() == b.rdev()
}

fn compare_dir(lower: &Path, upper: &Path, out: &Path, rel: &Path) -> std::io::Result<()> {
    let names = |d: &Path| -> std::io::Result<std::collections::BTreeSet<std::ffi::OsString>> {
        match std::fs::read_dir(d.join(rel)) {
            Ok(rd) => rd.map(|e| e.map(|e| e.file_name())).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
            Err(e) => Err(e),
        }
    };
    let (lnames, unames) = (names(lower)?, names(upper)?);
    for n in lnames.difference(&unames) {
        let o = out.join(rel).join(n);
        std::fs::create_dir_all(out.join(rel))?;
        nix::sys::stat::mknod(&o, SFlag::S_IFCHR, Mode::empty(), 0)
            .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
    }
    for n in &unames {
        let r = rel.join(n);
        let (pl, pu) = (lower.join(&r), upper.join(&r));
        let mu = std::fs::symlink_metadata(&pu)?;
        match std::fs::symlink_metadata(&pl) {
            Ok(ml) if ml.is_dir() && mu.is_dir() => {
                if !same(&ml, &pl, &mu, &pu) {
                    ensure_parent_dirs(upper, out, &r)?;
                    copy_dir_node(&pu, &out.join(&r), &mu)?;
                }
                compare_dir(lower, upper, out, &r)?;
            }
            Ok(ml) if same(&ml, &pl, &mu, &pu) => {}
            _ => {
                ensure_parent_dirs(upper, out, &r)?;
                crate::fscopy::copy_entry(&pu, &out.join(&r), &Default::default())?;
                if mu.is_dir() {
                    // a directory replacing a non-directory hides nothing below
                    set_opaque(&out.join(&r))?;
                }
            }
        }
    }
    Ok(())
}

/// Creates the parents of `rel` in `out` with the metadata they have in `upper`.
fn ensure_parent_dirs(upper: &Path, out: &Path, rel: &Path) -> std::io::Result<()> {
    let mut cur = std::path::PathBuf::new();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            cur.push(c);
            let o = out.join(&cur);
            if std::fs::symlink_metadata(&o).is_err() {
                let md = std::fs::symlink_metadata(upper.join(&cur))?;
                copy_dir_node(&upper.join(&cur), &o, &md)?;
            }
        }
    }
    Ok(())
}

fn copy_dir_node(src: &Path, dst: &Path, md: &std::fs::Metadata) -> std::io::Result<()> {
    if std::fs::symlink_metadata(dst).is_err() {
        std::fs::create_dir(dst)?;
    }
    let _ = src;
    crate::fscopy::set_meta(
        dst,
        (md.uid(), md.gid()),
        Some(md.mode()),
        (
            nix::sys::time::TimeSpec::new(md.atime(), md.atime_nsec()),
            nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec()),
        ),
    )
}

fn set_opaque(p: &Path) -> std::io::Result<()> {
    xattr::set(p, crate::rootless::overlay_opaque_xattr(), b"y")
}

#[cfg(test)]
mod tests {
    use crate::pb::{self, op::Op};
    use crate::testutil;
    use crate::{RunRequest, Worker};

    async fn run(w: &Worker, op: Op, inputs: Vec<Option<String>>) -> Option<String> {
        let n = inputs.len();
        let req = RunRequest {
            build_id: "b".into(),
            session_id: String::new(),
            session_shared_key: String::new(),
            name: "m".into(),
            op: pb::Op {
                inputs: (0..n)
                    .map(|i| pb::Input {
                        digest: format!("sha256:{i}"),
                        index: 0,
                    })
                    .collect(),
                op: Some(op),
                ..Default::default()
            },
            inputs,
            entitlements: Vec::new(),
        };
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        w.run(req, tx).await.expect("run")[0].clone()
    }

    fn read(w: &Worker, r: &str, p: &str) -> Option<String> {
        let m = w.store().mount_ro(Some(r)).expect("mount");
        let v = std::fs::read_to_string(m.path().join(p)).ok();
        m.unmount().expect("unmount");
        v
    }

    #[tokio::test]
    async fn merge_stacks_chains_and_diff_extracts_the_upper_layers() {
        let (_tmp, w) = testutil::worker();
        let base = testutil::snapshot(&w, None, |d| {
            std::fs::write(d.join("base"), "b").expect("w");
            std::fs::write(d.join("shared"), "from-base").expect("w");
        });
        let top = testutil::snapshot(&w, Some(&base), |d| {
            std::fs::write(d.join("top"), "t").expect("w");
        });
        let other = testutil::snapshot(&w, None, |d| {
            std::fs::write(d.join("shared"), "from-other").expect("w");
        });
        // merge(base+top, other): other's file wins, both chains visible
        let merged = run(
            &w,
            Op::Merge(pb::MergeOp {
                inputs: vec![pb::MergeInput { input: 0 }, pb::MergeInput { input: 1 }],
            }),
            vec![Some(top.clone()), Some(other.clone())],
        )
        .await
        .expect("merged");
        assert_eq!(read(&w, &merged, "shared").as_deref(), Some("from-other"));
        assert_eq!(read(&w, &merged, "top").as_deref(), Some("t"));
        let chain = w.store().chain(Some(&merged)).expect("chain");
        assert_eq!(chain.len(), 3);
        assert_eq!(chain[1].id, top, "the first input's chain is reused as is");

        // diff(base, top) = just top's layer, on scratch
        let d = run(
            &w,
            Op::Diff(pb::DiffOp {
                lower: Some(pb::LowerDiffInput { input: 0 }),
                upper: Some(pb::UpperDiffInput { input: 1 }),
            }),
            vec![Some(base.clone()), Some(top.clone())],
        )
        .await
        .expect("diff");
        assert_eq!(read(&w, &d, "top").as_deref(), Some("t"));
        assert_eq!(read(&w, &d, "base"), None);
        assert_eq!(w.store().chain(Some(&d)).expect("chain").len(), 1);

        // diff of unrelated snapshots: changed files plus whiteouts
        let d2 = run(
            &w,
            Op::Diff(pb::DiffOp {
                lower: Some(pb::LowerDiffInput { input: 0 }),
                upper: Some(pb::UpperDiffInput { input: 1 }),
            }),
            vec![Some(base.clone()), Some(other.clone())],
        )
        .await
        .expect("diff");
        let diff_dir = w.store().diff_dir(&d2);
        use std::os::unix::fs::FileTypeExt;
        assert!(
            std::fs::symlink_metadata(diff_dir.join("base"))
                .expect("whiteout")
                .file_type()
                .is_char_device()
        );
        assert_eq!(
            std::fs::read_to_string(diff_dir.join("shared")).expect("changed"),
            "from-other"
        );
        // applying that diff onto base gives other
        let re = run(
            &w,
            Op::Merge(pb::MergeOp {
                inputs: vec![pb::MergeInput { input: 0 }, pb::MergeInput { input: 1 }],
            }),
            vec![Some(base), Some(d2)],
        )
        .await
        .expect("merged");
        assert_eq!(read(&w, &re, "base"), None);
        assert_eq!(read(&w, &re, "shared").as_deref(), Some("from-other"));
    }
}
