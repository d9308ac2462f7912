//! libFuzzer target: `cargo +nightly fuzz run --features libfuzzer filesync`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (kiln_fuzz::target("filesync").expect("target").run)(data);
});
