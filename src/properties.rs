//! Properties that must hold for any input, stated once and explored by two
//! engines: the property tests in this module (proptest, in every test run)
//! and the fuzz targets in `fuzz/` (libFuzzer, coverage-guided). Each
//! function panics when its property is broken; both engines report that.

use std::path::Path;

use bytes::Bytes;
use zeroize::Zeroizing;

use crate::policy::path::{PathPattern, normalize};
use crate::policy::{HostPattern, normalize_host};
use crate::scrub::{ScrubStream, Scrubber};
use crate::token::Verifier;

/// Scrubbing a body in chunks, cut anywhere, gives the same bytes and the
/// same count as scrubbing it whole.
pub fn chunked_scrubbing_equals_whole(patterns: &[Vec<u8>], input: &[u8], cuts: &[usize]) {
    let Ok(scrubber) = Scrubber::new(patterns.iter().map(|p| Zeroizing::new(p.clone()))) else {
        return;
    };
    let whole = scrubber
        .scrub_all(input)
        .unwrap_or_else(|| (input.to_vec(), 0));
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.sort_unstable();
    let mut stream = ScrubStream::default();
    let mut out = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([input.len()]) {
        let chunk = Bytes::copy_from_slice(&input[start..cut]);
        out.extend_from_slice(&stream.push(&scrubber, chunk));
        start = cut;
    }
    out.extend_from_slice(&stream.finish(&scrubber));
    assert_eq!(
        whole,
        scrubbed_by_reference(patterns, input),
        "whole-buffer scrubbing differs from a plain leftmost-longest automaton"
    );
    assert_eq!(out, whole.0, "chunked output differs from whole");
    assert_eq!(
        stream.redactions(),
        whole.1,
        "chunked count differs from whole"
    );
}

/// What scrubbing must give, by the plainest means: an Aho-Corasick
/// automaton without any SIMD searcher in front of it.
fn scrubbed_by_reference(patterns: &[Vec<u8>], input: &[u8]) -> (Vec<u8>, usize) {
    let patterns: Vec<&[u8]> = patterns
        .iter()
        .filter(|p| !p.is_empty())
        .map(Vec::as_slice)
        .collect();
    let Ok(automaton) = aho_corasick::AhoCorasick::builder()
        .match_kind(aho_corasick::MatchKind::LeftmostLongest)
        .prefilter(false)
        .build(&patterns)
    else {
        return (input.to_vec(), 0);
    };
    let (mut out, mut pos, mut count) = (Vec::new(), 0, 0);
    for m in automaton.find_iter(input) {
        out.extend_from_slice(&input[pos..m.start()]);
        out.extend_from_slice(crate::scrub::REDACTED);
        pos = m.end();
        count += 1;
    }
    out.extend_from_slice(&input[pos..]);
    (out, count)
}

/// Normalising is total and idempotent: the form sidekey forwards reads
/// back as the same path, so the policy saw what the upstream gets; and
/// nothing that could climb or split a segment survives in it.
pub fn normalizing_paths_is_stable(raw: &str) {
    let Ok(path) = normalize(raw) else { return };
    let encoded = path.encoded();
    let again = normalize(&encoded).expect("the forwarded form normalises");
    assert_eq!(
        again, path,
        "{raw:?} -> {encoded:?} changed on a second pass"
    );
    for segment in path.segments() {
        assert!(
            segment != "." && segment != "..",
            "{raw:?} kept a dot segment"
        );
        assert!(
            !segment.contains('/'),
            "{raw:?} kept a slash inside a segment"
        );
    }
}

/// Path patterns are total, and a deny's loose match covers at least what
/// the exact match does.
pub fn path_patterns_are_total(pattern: &str, raw_path: &str) {
    let (Ok(pattern), Ok(path)) = (PathPattern::parse(pattern), normalize(raw_path)) else {
        return;
    };
    if pattern.matches(&path) {
        assert!(
            pattern.matches_loosely(&path),
            "{:?} matches {raw_path:?} exactly but not loosely",
            pattern.as_str()
        );
    }
}

/// Host patterns are total, normalising a host is idempotent, and a name
/// pattern matches the host it names, however it is cased.
pub fn host_patterns_are_total(pattern: &str, host: &str) {
    let normal = normalize_host(host);
    assert_eq!(
        normalize_host(&normal),
        normal,
        "normalize_host({host:?}) is not stable"
    );
    if let Ok(parsed) = HostPattern::parse(pattern) {
        let _ = parsed.matches(&normal);
        if let HostPattern::Exact(name) = &parsed {
            assert!(parsed.matches(&normalize_host(&name.to_ascii_uppercase())));
        }
    }
}

/// Any text is a valid config or a list of one-line problems; never a panic.
pub fn config_parsing_is_total(text: &str) {
    if let Err(e) = crate::config::Config::parse(text, Path::new("/nonexistent/sidekey.toml")) {
        assert!(!e.problems.is_empty(), "an error with no problem");
        for problem in &e.problems {
            assert!(
                !problem.message.contains(char::is_control)
                    && !problem.at.contains(char::is_control),
                "a problem with control characters: {problem:?}"
            );
        }
    }
}

/// Only the token sidekey issued verifies; any other string, including any
/// change to that token, is refused.
pub fn only_issued_tokens_verify(verifier: &Verifier, issued: &str, candidate: &str) {
    if candidate != issued {
        assert!(
            verifier.verify(candidate).is_err(),
            "a token that was never issued verified: {candidate:?}"
        );
    }
}

/// A Verifier and one token it accepts, for token properties.
pub fn token_fixture() -> (tempfile::TempDir, Verifier, String) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let state = crate::state::StateDir::new(dir.path());
    state.create().expect("a state dir");
    crate::token::create_signing_key(&state).expect("a signing key");
    let issuer = crate::token::Issuer::load(&state).expect("the signing key loads");
    let (token, _) = issuer.issue("coder", None, std::time::Duration::from_secs(3600));
    let verifier = Verifier::load(&state).expect("the verifier loads");
    (dir, verifier, token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Paths drawn from the pieces that make normalisation hard.
    fn tricky_path() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("a".to_string()),
            Just("..".to_string()),
            Just(".".to_string()),
            Just("%2e%2e".to_string()),
            Just("%2E".to_string()),
            Just("%2f".to_string()),
            Just("%5c".to_string()),
            Just("%c0%ae".to_string()),
            Just("%e2%82%ac".to_string()),
            Just(";x=1".to_string()),
            Just("%00".to_string()),
            Just("%25".to_string()),
            Just("*".to_string()),
            Just(" ".to_string()),
            Just("A".to_string()),
            "[a-z%;.*]{0,4}",
        ];
        proptest::collection::vec(piece, 0..8).prop_map(|pieces| format!("/{}", pieces.join("/")))
    }

    proptest! {
        #[test]
        fn chunked_scrubbing(
            input in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), Just(b'c'), any::<u8>()], 0..200),
            cuts in proptest::collection::vec(0usize..200, 0..8),
            patterns in proptest::collection::vec(proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), Just(b'c')], 1..6), 1..4),
        ) {
            chunked_scrubbing_equals_whole(&patterns, &input, &cuts);
        }

        #[test]
        fn path_normalization(raw in tricky_path()) {
            normalizing_paths_is_stable(&raw);
        }

        #[test]
        fn path_normalization_any_text(raw in "/\\PC{0,40}") {
            normalizing_paths_is_stable(&raw);
        }

        #[test]
        fn path_patterns(pattern in "/[a-z*;. ]{0,3}(/[a-z*;. ]{0,3}){0,3}(/\\*\\*)?", path in tricky_path()) {
            path_patterns_are_total(&pattern, &path);
        }

        #[test]
        fn host_patterns(pattern in "(\\*\\.)?[a-zA-Z0-9.\\-_\\[\\]:]{0,20}\\.?", host in "[a-zA-Z0-9.\\-_\\[\\]:]{0,20}\\.?") {
            host_patterns_are_total(&pattern, &host);
        }

        #[test]
        fn config_parsing(text in "\\PC{0,200}") {
            config_parsing_is_total(&text);
        }
    }

    #[test]
    fn config_parsing_of_near_valid_configs() {
        // Mutations of a valid config reach deeper than random text.
        let valid = r#"
listen = "127.0.0.1:8080"
[secrets.api]
source = "env:API_KEY"
[routes.api]
upstream = "https://api.example.com/v1"
inject = { header = "authorization", format = "Bearer {secret}", secret = "api" }
[[rules]]
agents = ["coder"]
route = "api"
paths = ["/v1/**"]
action = "allow"
"#;
        let mut runner = proptest::test_runner::TestRunner::default();
        let strategy = (0..valid.len(), 0..valid.len(), "\\PC{0,12}");
        runner
            .run(&strategy, |(a, b, insert)| {
                let (from, to) = (a.min(b), a.max(b));
                let (Some(head), Some(tail)) = (valid.get(..from), valid.get(to..)) else {
                    return Ok(());
                };
                config_parsing_is_total(&format!("{head}{insert}{tail}"));
                Ok(())
            })
            .expect("config parsing is total");
    }

    #[test]
    fn token_mutations_never_verify() {
        let (_dir, verifier, token) = token_fixture();
        assert!(verifier.verify(&token).is_ok());
        let mut runner = proptest::test_runner::TestRunner::default();
        let strategy = (0..token.len(), any::<u8>());
        runner
            .run(&strategy, |(at, byte)| {
                let mut bytes = token.clone().into_bytes();
                bytes[at] = byte;
                let candidate = String::from_utf8_lossy(&bytes).into_owned();
                only_issued_tokens_verify(&verifier, &token, &candidate);
                Ok(())
            })
            .expect("only the issued token verifies");
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(&"\\PC{0,300}", |candidate| {
                only_issued_tokens_verify(&verifier, &token, &candidate);
                Ok(())
            })
            .expect("random text never verifies");
    }
}
