//! Only the token sidekey issued verifies: random text and every change to
//! an issued token are refused.
#![no_main]
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use sidekey::token::Verifier;

static FIXTURE: LazyLock<(tempfile::TempDir, Verifier, String)> =
    LazyLock::new(sidekey::properties::token_fixture);

fuzz_target!(|input: (&str, Vec<(u16, u8)>)| {
    let (_, verifier, issued) = &*FIXTURE;
    let (text, edits) = input;
    sidekey::properties::only_issued_tokens_verify(verifier, issued, text);
    let mut bytes = issued.clone().into_bytes();
    for (at, byte) in edits {
        let at = usize::from(at) % bytes.len();
        bytes[at] = byte;
    }
    let mutated = String::from_utf8_lossy(&bytes);
    sidekey::properties::only_issued_tokens_verify(verifier, issued, &mutated);
});
