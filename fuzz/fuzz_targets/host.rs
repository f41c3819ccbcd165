//! Host patterns and host normalisation are total and stable.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str)| {
    let (pattern, host) = input;
    sidekey::properties::host_patterns_are_total(pattern, host);
});
