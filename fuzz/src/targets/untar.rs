//! `untar`: `ADD archive.tar /dest/` of a file from the build context.
//!
//! The worker's `untar::archive_kind` decides whether the file is an archive
//! (else it is tried as a plain tar anyway) and `untar::unpack` unpacks it
//! into `root/dest/`, a dir of a root that holds symlinks leading out of it.
//! Nothing outside `root/dest/` may change: not the canaries beside the root
//! ([`crate::sandbox`]) and not the rest of the root.

use std::cell::RefCell;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::Target;
use crate::sandbox::Sandbox;
use crate::targets::tarutil;
use worker_executor::untar::{ArchiveKind, archive_kind, unpack};

pub fn target() -> Target {
    Target {
        name: "untar",
        about: "ADD's archive unpacking: worker_executor::untar::archive_kind + unpack into root/dest, nothing outside dest may change",
        run,
        seeds: tarutil::seeds,
        tokens: crate::sandbox::TOKENS,
        mutate: Some(tarutil::mutate_tar),
        max_len: 256 * 1024,
    }
}

thread_local! {
    static SANDBOX: RefCell<Option<Sandbox>> = const { RefCell::new(None) };
}

/// (path, mode, uid, gid, size, mtime, link) of every entry of the root outside `dest`.
fn outside_dest(root: &Path) -> Vec<(String, u32, u32, u32, u64, i64, Option<std::path::PathBuf>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if p == root.join("dest") {
            continue;
        }
        if md.is_dir()
            && let Ok(rd) = std::fs::read_dir(&p)
        {
            stack.extend(rd.flatten().map(|e| e.path()));
        }
        out.push((
            p.display().to_string(),
            md.mode(),
            md.uid(),
            md.gid(),
            if md.is_dir() { 0 } else { md.size() },
            md.mtime(),
            std::fs::read_link(&p).ok(),
        ));
    }
    out.sort();
    out
}

pub fn run(data: &[u8]) {
    SANDBOX.with(|s| {
        let mut s = s.borrow_mut();
        let sb = s.get_or_insert_with(|| Sandbox::new("untar", &["archive"]));
        sb.reset();
        sb.populate_base();
        let dest = sb.root.join("dest");
        std::fs::create_dir(&dest).expect("dest dir");
        std::os::unix::fs::symlink("../link", dest.join("up")).expect("symlink");
        let before = outside_dest(&sb.root);
        let src = sb.work.join("archive");
        std::fs::write(&src, data).expect("write archive");
        let kind = archive_kind(&src)
            .ok()
            .flatten()
            .unwrap_or(ArchiveKind::Tar);
        let opts = worker_executor::fscopy::CopyOpts::default();
        let _ = unpack(&src, kind, &sb.root, &dest, &opts);
        sb.check();
        let after = outside_dest(&sb.root);
        assert!(
            before == after,
            "ESCAPE: the root outside dest/ changed: before {before:?}, after {after:?}"
        );
    });
}
