//! libFuzzer target: `cargo +nightly fuzz run --features libfuzzer reference`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (kiln_fuzz::target("reference").expect("target").run)(data);
});
