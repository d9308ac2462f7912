//! libFuzzer target: `cargo +nightly fuzz run --features libfuzzer dockerignore`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (kiln_fuzz::target("dockerignore").expect("target").run)(data);
});
