//! Response scrubbing: every secret value is replaced by `[REDACTED]`.
//!
//! One multi-pattern searcher holds every form in which a held secret could
//! come back (raw, percent-encoded, JSON-escaped, inside a Basic credential).
//! A stream is scrubbed chunk by chunk: only the tail that could still be the
//! start of a secret is held back, so an SSE event is never delayed unless it
//! ends in what may be the first bytes of a secret.

use aho_corasick::{AhoCorasick, MatchKind, packed};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use zeroize::Zeroizing;

use crate::secret::Secret;

pub mod websocket;

pub const REDACTED: &[u8] = b"[REDACTED]";

/// The patterns of one set of secrets. The default scrubs nothing.
pub struct Scrubber {
    finder: Option<Finder>,
    patterns: Vec<Zeroizing<Vec<u8>>>,
    longest: usize,
    shortest: usize,
    /// Bytes some pattern starts with, so the end-of-chunk check skips
    /// every position that cannot begin a secret.
    starts: Box<[bool; 256]>,
}

/// Finds the leftmost-longest pattern occurrences.
enum Finder {
    /// SIMD search on the patterns' first bytes (Teddy), for up to about 64
    /// patterns on CPUs that have it. The automaton's own prefilter looks
    /// for single start bytes: a secret's forms begin with few distinct
    /// bytes, which in compressed or binary bodies (git packs, downloads)
    /// occur every hundred bytes or so, each a call into the automaton.
    Packed(packed::Searcher),
    Automaton(AhoCorasick),
}

impl Finder {
    fn new(patterns: &[Zeroizing<Vec<u8>>]) -> Result<Self, aho_corasick::BuildError> {
        let packed = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostLongest)
            .builder()
            .extend(patterns.iter().map(|p| p.as_slice()))
            .build();
        if let Some(searcher) = packed {
            return Ok(Self::Packed(searcher));
        }
        AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(patterns.iter().map(|p| p.as_slice()))
            .map(Self::Automaton)
    }

    fn find_iter<'a>(&'a self, haystack: &'a [u8]) -> Matches<'a> {
        match self {
            Self::Packed(searcher) => Matches::Packed(searcher.find_iter(haystack)),
            Self::Automaton(automaton) => Matches::Automaton(automaton.find_iter(haystack)),
        }
    }
}

enum Matches<'a> {
    Packed(packed::FindIter<'a, 'a>),
    Automaton(aho_corasick::FindIter<'a, 'a>),
}

impl Iterator for Matches<'_> {
    type Item = aho_corasick::Match;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Packed(matches) => matches.next(),
            Self::Automaton(matches) => matches.next(),
        }
    }
}

impl Default for Scrubber {
    fn default() -> Self {
        Self {
            finder: None,
            patterns: Vec::new(),
            longest: 0,
            shortest: 0,
            starts: Box::new([false; 256]),
        }
    }
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrubber({} patterns)", self.patterns.len())
    }
}

/// RFC 3986 unreserved characters stay; as `encodeURIComponent` and most
/// URL builders encode a query value.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
/// JavaScript's `encodeURIComponent` also keeps `!*'()`.
const JS_COMPONENT: &AsciiSet = &UNRESERVED
    .remove(b'!')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');
/// Python's `quote()` keeps `/` as well.
const PY_QUOTE: &AsciiSet = &UNRESERVED.remove(b'/');

/// The forms in which `secret` may come back in a response: raw; percent-
/// encoded the ways common libraries do it, with upper- and lower-case hex,
/// and form-encoded; JSON-escaped (with and without `\/`, and as Go
/// escapes `<>&`); base64 of the
/// value alone and inside longer encoded text; hex; and, for Basic
/// credentials, base64 of `user:secret`.
pub fn variants(secret: &Secret, basic_username: Option<&str>) -> Vec<Zeroizing<Vec<u8>>> {
    let raw = secret.expose();
    let mut out = vec![Zeroizing::new(raw.as_bytes().to_vec())];
    for set in [NON_ALPHANUMERIC, UNRESERVED, JS_COMPONENT, PY_QUOTE] {
        let upper = Zeroizing::new(utf8_percent_encode(raw, set).collect::<String>());
        out.push(Zeroizing::new(upper.replace("%20", "+").into_bytes()));
        out.push(Zeroizing::new(lower_hex(&upper).into_bytes()));
        out.push(Zeroizing::new(upper.as_bytes().to_vec()));
    }
    let json = Zeroizing::new(serde_json::to_string(raw).unwrap_or_default());
    if json.len() > 2 {
        let inner = &json[1..json.len() - 1];
        out.push(Zeroizing::new(inner.as_bytes().to_vec()));
        out.push(Zeroizing::new(inner.replace('/', "\\/").into_bytes()));
        // Go's encoding/json (and so most Go APIs) also writes `<`, `>` and
        // `&` as `\u003c`, `\u003e` and `\u0026`.
        let html = inner.bytes().filter(|b| b"<>&".contains(b)).count();
        if html > 0 {
            let mut go = Zeroizing::new(Vec::with_capacity(inner.len() + 5 * html));
            for b in inner.bytes() {
                match b {
                    b'<' => go.extend_from_slice(b"\\u003c"),
                    b'>' => go.extend_from_slice(b"\\u003e"),
                    b'&' => go.extend_from_slice(b"\\u0026"),
                    _ => go.push(b),
                }
            }
            out.push(go);
        }
    }
    for engine in [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        out.push(Zeroizing::new(engine.encode(raw).into_bytes()));
    }
    // Inside longer base64 text (the whole header value `Bearer <secret>`,
    // a MIME part, a JSON document encoded whole) the secret may start at
    // any of the three byte positions of a 3-byte group; the characters
    // that depend on its bytes alone are the encoding of its whole groups.
    for engine in [
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        for skip in 0..3 {
            let rest = raw.as_bytes().get(skip..).unwrap_or_default();
            let groups = &rest[..rest.len() / 3 * 3];
            // Fewer characters than this could turn up by chance.
            if groups.len() >= MIN_BASE64_GROUPS_BYTES {
                out.push(Zeroizing::new(engine.encode(groups).into_bytes()));
            }
        }
    }
    // Hex, as dumps and error reports print bytes: S3's
    // `SignatureDoesNotMatch` lists the canonical request (session token
    // included) as space-separated hex.
    let mut lower = Zeroizing::new(String::with_capacity(2 * raw.len()));
    crate::token::push_hex(&mut lower, raw.as_bytes());
    // Each buffer is allocated at its final size: one that grew would leave
    // copies in freed memory, out of `Zeroizing`'s reach.
    let mut spaced = Zeroizing::new(Vec::with_capacity(3 * raw.len()));
    for (i, pair) in lower.as_bytes().chunks(2).enumerate() {
        if i > 0 {
            spaced.push(b' ');
        }
        spaced.extend_from_slice(pair);
    }
    out.push(spaced);
    out.push(Zeroizing::new(lower.to_ascii_uppercase().into_bytes()));
    out.push(Zeroizing::new(lower.as_bytes().to_vec()));
    if let Some(user) = basic_username {
        let pair = Zeroizing::new(format!("{user}:{raw}"));
        let b64 = base64::engine::general_purpose::STANDARD.encode(pair.as_bytes());
        out.push(Zeroizing::new(b64.into_bytes()));
    }
    out
}

/// The shortest run of a secret's bytes whose base64 is matched within
/// longer encoded text: 16 characters.
const MIN_BASE64_GROUPS_BYTES: usize = 12;

/// `%2F` -> `%2f`, leaving everything else alone.
fn lower_hex(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut chars = encoded.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '%' {
            for _ in 0..2 {
                if let Some(h) = chars.next() {
                    out.push(h.to_ascii_lowercase());
                }
            }
        }
    }
    out
}

impl Scrubber {
    /// Fails only if the searcher cannot be built; callers must then treat
    /// every secret as unavailable rather than serve unscrubbed.
    pub fn new(
        patterns: impl IntoIterator<Item = Zeroizing<Vec<u8>>>,
    ) -> Result<Self, aho_corasick::BuildError> {
        let mut patterns: Vec<Zeroizing<Vec<u8>>> =
            patterns.into_iter().filter(|p| !p.is_empty()).collect();
        patterns.sort_by(|a, b| a.as_slice().cmp(b.as_slice()));
        patterns.dedup_by(|a, b| a.as_slice() == b.as_slice());
        let longest = patterns.iter().map(|p| p.len()).max().unwrap_or(0);
        let shortest = patterns.iter().map(|p| p.len()).min().unwrap_or(0);
        let mut starts = Box::new([false; 256]);
        for p in &patterns {
            starts[usize::from(p[0])] = true;
        }
        let finder = if patterns.is_empty() {
            None
        } else {
            Some(Finder::new(&patterns)?)
        };
        Ok(Self {
            finder,
            patterns,
            longest,
            shortest,
            starts,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.finder.is_none()
    }

    /// Whether `text` holds one of the patterns in any letter case: for
    /// header names, which HTTP/2 and hyper lower-case, so an echoed
    /// secret arrives there in a case of its own. Rare enough to search
    /// without an automaton; most names are shorter than any secret.
    pub fn holds_in_any_case(&self, text: &[u8]) -> bool {
        if text.len() < self.shortest {
            return false;
        }
        self.patterns.iter().any(|p| {
            p.len() <= text.len() && text.windows(p.len()).any(|w| w.eq_ignore_ascii_case(p))
        })
    }

    /// A scrubber for these patterns and `extra` (a dynamic credential's).
    pub fn extended(
        &self,
        extra: impl IntoIterator<Item = Zeroizing<Vec<u8>>>,
    ) -> Result<Self, aho_corasick::BuildError> {
        Self::new(self.patterns.iter().cloned().chain(extra))
    }

    /// Scrubs a whole buffer; `None` when nothing matched.
    pub fn scrub_all(&self, input: &[u8]) -> Option<(Vec<u8>, usize)> {
        let finder = self.finder.as_ref()?;
        let mut out = Vec::new();
        let mut pos = 0;
        let mut count = 0;
        for m in finder.find_iter(input) {
            out.extend_from_slice(&input[pos..m.start()]);
            out.extend_from_slice(REDACTED);
            pos = m.end();
            count += 1;
        }
        if count == 0 {
            return None;
        }
        out.extend_from_slice(&input[pos..]);
        Some((out, count))
    }

    /// Where the longest suffix of `buf` that is a proper prefix of some
    /// pattern begins (`buf.len()` when there is none).
    fn partial_start(&self, buf: &[u8]) -> usize {
        let from = buf.len().saturating_sub(self.longest.saturating_sub(1));
        (from..buf.len())
            .find(|&start| {
                if !self.starts[usize::from(buf[start])] {
                    return false;
                }
                let tail = &buf[start..];
                self.patterns
                    .iter()
                    .any(|p| p.len() > tail.len() && p.starts_with(tail))
            })
            .unwrap_or(buf.len())
    }
}

/// Scrubbing state for one response body.
#[derive(Debug, Default)]
pub struct ScrubStream {
    carry: Vec<u8>,
    redactions: usize,
    /// Replace each match with as many `*` as it has bytes, for streams whose
    /// framing counts bytes (WebSocket frames), instead of `[REDACTED]`.
    masking: bool,
}

impl ScrubStream {
    /// A stream that keeps every length: matches become `*` of the same length.
    pub fn masking() -> Self {
        Self {
            masking: true,
            ..Self::default()
        }
    }

    fn replace(&self, out: &mut BytesMut, len: usize) {
        if self.masking {
            out.extend(std::iter::repeat_n(b'*', len));
        } else {
            out.extend_from_slice(REDACTED);
        }
    }

    pub fn redactions(&self) -> usize {
        self.redactions
    }

    /// Scrubs one chunk, holding back only a possible partial secret at its end.
    pub fn push(&mut self, scrubber: &Scrubber, chunk: Bytes) -> Bytes {
        let Some(finder) = scrubber.finder.as_ref() else {
            return chunk;
        };
        let joined;
        let buf: &[u8] = if self.carry.is_empty() {
            &chunk
        } else {
            joined = [self.carry.as_slice(), &chunk].concat();
            &joined
        };
        let hold = scrubber.partial_start(buf);
        let mut out = BytesMut::new();
        let mut pos = 0;
        for m in finder.find_iter(buf) {
            // A match starting before `hold` is complete: were it the start of
            // a longer pattern running past the end, `hold` would be at or
            // before its start.
            if m.start() >= hold {
                break;
            }
            out.extend_from_slice(&buf[pos..m.start()]);
            self.replace(&mut out, m.len());
            pos = m.end();
            self.redactions += 1;
        }
        let emit_end = pos.max(hold);
        let emitted = if pos == 0 && self.carry.is_empty() {
            chunk.slice(..emit_end)
        } else {
            out.extend_from_slice(&buf[pos..emit_end]);
            out.freeze()
        };
        let rest = buf[emit_end..].to_vec();
        self.carry = rest;
        emitted
    }

    /// Flushes what was held back at the end of the body.
    pub fn finish(&mut self, scrubber: &Scrubber) -> Bytes {
        let carry = std::mem::take(&mut self.carry);
        let Some(finder) = scrubber.finder.as_ref() else {
            return Bytes::from(carry);
        };
        let mut out = BytesMut::with_capacity(carry.len());
        let mut pos = 0;
        for m in finder.find_iter(&carry) {
            out.extend_from_slice(&carry[pos..m.start()]);
            self.replace(&mut out, m.len());
            pos = m.end();
            self.redactions += 1;
        }
        out.extend_from_slice(&carry[pos..]);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrubber(patterns: &[&str]) -> Scrubber {
        Scrubber::new(
            patterns
                .iter()
                .map(|p| Zeroizing::new(p.as_bytes().to_vec())),
        )
        .unwrap()
    }

    #[test]
    fn a_secret_is_found_in_a_header_name_in_any_case() {
        let s = scrubber(&["Sk-MiXeD-42"]);
        assert!(s.holds_in_any_case(b"x-key-sk-mixed-42"));
        assert!(s.holds_in_any_case(b"SK-MIXED-42"));
        assert!(!s.holds_in_any_case(b"x-key-sk-mixed-4"));
        assert!(!s.holds_in_any_case(b"short"));
        assert!(!Scrubber::default().holds_in_any_case(b"anything"));
    }

    fn chunked(s: &Scrubber, input: &[u8], cuts: &[usize]) -> (Vec<u8>, usize) {
        let mut stream = ScrubStream::default();
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            let cut = cut.clamp(start, input.len());
            out.extend_from_slice(&stream.push(s, Bytes::copy_from_slice(&input[start..cut])));
            start = cut;
        }
        out.extend_from_slice(&stream.push(s, Bytes::copy_from_slice(&input[start..])));
        out.extend_from_slice(&stream.finish(s));
        (out, stream.redactions())
    }

    fn whole(s: &Scrubber, input: &[u8]) -> (Vec<u8>, usize) {
        s.scrub_all(input).unwrap_or((input.to_vec(), 0))
    }

    #[test]
    fn replaces_a_secret_split_across_chunks() {
        let s = scrubber(&["sk-live-123"]);
        let (out, n) = chunked(&s, b"token=sk-live-123!", &[9, 12]);
        assert_eq!(out, b"token=[REDACTED]!");
        assert_eq!(n, 1);
    }

    #[test]
    fn holds_back_only_a_possible_prefix() {
        let s = scrubber(&["sk-live-123"]);
        let mut stream = ScrubStream::default();
        assert_eq!(
            &stream.push(&s, Bytes::from_static(b"data: a\n\n"))[..],
            b"data: a\n\n"
        );
        assert_eq!(&stream.push(&s, Bytes::from_static(b"x sk-li"))[..], b"x ");
        assert_eq!(&stream.push(&s, Bytes::from_static(b"ve"))[..], b"");
        assert_eq!(&stream.push(&s, Bytes::from_static(b"!"))[..], b"sk-live!");
        assert_eq!(&stream.finish(&s)[..], b"");
    }

    #[test]
    fn masking_keeps_lengths() {
        let s = scrubber(&["secret"]);
        let mut stream = ScrubStream::masking();
        let mut out = stream.push(&s, Bytes::from_static(b"a secr")).to_vec();
        out.extend_from_slice(&stream.push(&s, Bytes::from_static(b"et b")));
        out.extend_from_slice(&stream.finish(&s));
        assert_eq!(out, b"a ****** b");
    }

    #[test]
    fn variants_cover_encodings() {
        let secret = Secret::new("a/b\"c+d e".into());
        let s = Scrubber::new(variants(&secret, Some("user"))).unwrap();
        for form in [
            "a/b\"c+d e".to_string(),
            "a%2Fb%22c%2Bd%20e".to_string(),
            "a%2fb%22c%2bd%20e".to_string(),
            "a%2Fb%22c%2Bd+e".to_string(),
            "a/b%22c%2Bd%20e".to_string(),
            "a/b\\\"c+d e".to_string(),
            "a\\/b\\\"c+d e".to_string(),
            base64::engine::general_purpose::STANDARD.encode("a/b\"c+d e"),
            base64::engine::general_purpose::STANDARD.encode("user:a/b\"c+d e"),
        ] {
            let (out, n) = whole(&s, format!("<{form}>").as_bytes());
            assert_eq!(n, 1, "{form}");
            assert_eq!(out, b"<[REDACTED]>");
        }
    }

    #[test]
    fn a_secret_as_go_escapes_it_in_json_is_found() {
        let s = Scrubber::new(variants(&Secret::new("k&y<1>/2".into()), None)).unwrap();
        let (out, n) = whole(&s, br#"{"key":"k\u0026y\u003c1\u003e/2"}"#);
        assert_eq!(n, 1);
        assert_eq!(out, br#"{"key":"[REDACTED]"}"#);
    }

    #[test]
    fn a_secret_inside_longer_base64_or_printed_as_hex_is_found() {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        const KEY: &str = "sk-live-A1b2C3+d4/E5==&<z>?";
        let s = Scrubber::new(variants(&Secret::new(KEY.into()), None)).unwrap();
        let hex: Vec<String> = KEY.bytes().map(|b| format!("{b:02x}")).collect();
        let mut texts = vec![
            hex.concat(),
            hex.concat().to_uppercase(),
            format!("50 55 54 0a {} 0a", hex.join(" ")),
        ];
        // Every alignment within a longer encoded text, both alphabets.
        for prefix in ["", "B", "Be", "Bearer "] {
            let whole = format!("{prefix}{KEY} and more");
            texts.push(STANDARD.encode(&whole));
            texts.push(URL_SAFE_NO_PAD.encode(&whole));
        }
        for text in texts {
            let (out, n) = whole(&s, text.as_bytes());
            assert!(n >= 1, "{text}");
            let out = String::from_utf8(out).unwrap();
            assert!(out.contains("[REDACTED]"), "{text}");
        }
        // A short secret gets no partial-base64 forms that could match by chance.
        let short = variants(&Secret::new("sk-1234567".into()), None);
        for skip in 0..3 {
            let groups = &b"sk-1234567"[skip..][..(10 - skip) / 3 * 3];
            let partial = STANDARD.encode(groups);
            assert!(
                !short.iter().any(|v| v.as_slice() == partial.as_bytes()),
                "{partial}"
            );
        }
    }

    // Chunked equals whole for any input: `properties::chunked_scrubbing_equals_whole`.
}
