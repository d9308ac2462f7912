//! libFuzzer target: `cargo +nightly fuzz run --features libfuzzer llb`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (kiln_fuzz::target("llb").expect("target").run)(data);
});
