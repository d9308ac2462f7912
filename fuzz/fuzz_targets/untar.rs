//! libFuzzer target: `cargo +nightly fuzz run --features libfuzzer untar`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (kiln_fuzz::target("untar").expect("target").run)(data);
});
