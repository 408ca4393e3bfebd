#![no_main]
// The harness lives in thaw-fuzz-targets, shared with the stable driver.
libfuzzer_sys::fuzz_target!(|data: &[u8]| thaw_fuzz_targets::shard_index(data));
