//! libFuzzer target: `cargo +nightly fuzz run parse_and_expand`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kiln_fuzz::exercise(data);
});
