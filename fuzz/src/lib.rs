//! Fuzz targets for every parser of untrusted input in kiln.
//!
//! Each target is a `fn(&[u8])` that must never panic, hang or allocate without
//! bound, whatever the bytes; the targets that write files also panic when
//! anything outside their temporary root changed ([`sandbox`]). The stable
//! runner (`src/bin/stable_fuzz.rs`, `fuzz/run-stable.sh`) mutates each
//! target's corpus (`corpus/<target>/` plus seeds made in code) and runs the
//! inputs; the libFuzzer targets under `fuzz_targets/` call the same functions.

pub mod dockerfile;
pub mod mutate;
pub mod rt;
pub mod sandbox;
pub mod targets;

pub use dockerfile::exercise;
pub use mutate::Rng;

/// One fuzz target.
pub struct Target {
    /// `--target NAME`
    pub name: &'static str,
    /// what it exercises, for `--list`
    pub about: &'static str,
    /// runs one input; a panic (on any thread) is a failure
    pub run: fn(&[u8]),
    /// seed inputs made in code (the files under `corpus/<name>/` are added)
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// tokens the mutator inserts
    pub tokens: &'static [&'static [u8]],
    /// a structure-aware mutation, tried on some inputs besides the byte-level ones
    pub mutate: Option<fn(&mut Rng, &mut Vec<u8>, &[&'static [u8]])>,
    /// mutated inputs are cut to this many bytes
    pub max_len: usize,
}

/// Every target, in the order `--target all` runs them.
pub fn all_targets() -> Vec<Target> {
    vec![
        targets::llb::target(),
        targets::layer::target(),
        targets::untar::target(),
        targets::filesync::target(),
        targets::image::target(),
        targets::reference::target(),
        targets::cache_config::target(),
        targets::dockerignore::target(),
        targets::dockerfile2llb::target(),
        dockerfile::target(),
    ]
}

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    all_targets().into_iter().find(|t| t.name == name)
}

/// With `KILN_FUZZ_DEBUG` set (e.g. with `--reproduce`), prints what a target
/// made of its input: how far it got, which error stopped it.
pub fn debug(what: impl FnOnce() -> String) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("KILN_FUZZ_DEBUG").is_some()) {
        eprintln!("{}", what());
    }
}
