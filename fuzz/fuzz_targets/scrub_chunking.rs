//! Differential: chunked scrubbing equals whole-buffer scrubbing.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<Vec<u8>>, Vec<u8>, Vec<usize>)| {
    let (patterns, body, cuts) = input;
    sidekey::properties::chunked_scrubbing_equals_whole(&patterns, &body, &cuts);
});
