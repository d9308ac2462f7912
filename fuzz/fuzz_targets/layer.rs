//! libFuzzer target: `cargo +nightly fuzz run --features libfuzzer layer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (kiln_fuzz::target("layer").expect("target").run)(data);
});
