//! libFuzzer target: `cargo +nightly fuzz run --features libfuzzer dockerfile2llb`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (kiln_fuzz::target("dockerfile2llb").expect("target").run)(data);
});
