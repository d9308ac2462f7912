//! `layer`: an image layer blob, as a registry would serve it.
//!
//! `kiln_oci::layer::decompress` (gzip, zstd or plain by magic bytes) and
//! `kiln_oci::layer::apply` onto a root that already holds symlinks out of it
//! (as a lower layer may have left them); the layer is applied twice (the
//! second time over what the first made, as a repeated layer would). Nothing
//! outside the root may change: a file, dir, symlink, hard link, chmod, chown
//! or removal through a symlink or `..` is caught by the canaries
//! ([`crate::sandbox`]).

use std::cell::RefCell;
use std::io::Read;

use crate::Target;
use crate::sandbox::Sandbox;
use crate::targets::tarutil;

pub fn target() -> Target {
    Target {
        name: "layer",
        about: "layer blobs: kiln_oci::layer::decompress + apply into a temp root (twice), nothing outside it may change",
        run,
        seeds: tarutil::seeds,
        tokens: crate::sandbox::TOKENS,
        mutate: Some(tarutil::mutate_tar),
        max_len: 256 * 1024,
    }
}

/// Decompressed layers are cut here: a small blob may inflate to gigabytes
/// (the real pull has the same stream from a digest-verified blob).
const MAX_INFLATED: u64 = 64 << 20;

thread_local! {
    static SANDBOX: RefCell<Option<Sandbox>> = const { RefCell::new(None) };
}

pub fn run(data: &[u8]) {
    SANDBOX.with(|s| {
        let mut s = s.borrow_mut();
        let sb = s.get_or_insert_with(|| Sandbox::new("layer", &[]));
        sb.reset();
        sb.populate_base();
        for _ in 0..2 {
            let Ok(reader) = kiln_oci::layer::decompress(std::io::Cursor::new(data.to_vec()))
            else {
                break;
            };
            let r = kiln_oci::layer::apply(reader.take(MAX_INFLATED), &sb.root);
            sb.check();
            if r.is_err() {
                break;
            }
        }
    });
}
