//! libFuzzer target: `cargo +nightly fuzz run --features libfuzzer cache_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (kiln_fuzz::target("cache_config").expect("target").run)(data);
});
