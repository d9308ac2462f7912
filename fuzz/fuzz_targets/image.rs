//! libFuzzer target: `cargo +nightly fuzz run --features libfuzzer image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (kiln_fuzz::target("image").expect("target").run)(data);
});
