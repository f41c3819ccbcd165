//! Path normalisation is total and stable; pattern matching is total.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str)| {
    let (pattern, path) = input;
    sidekey::properties::normalizing_paths_is_stable(path);
    sidekey::properties::path_patterns_are_total(pattern, path);
});
