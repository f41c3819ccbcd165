//! Any text is a config or a list of problems, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    sidekey::properties::config_parsing_is_total(text);
});
