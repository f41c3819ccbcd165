//! Request paths in one canonical form, and the glob patterns rules use.
//!
//! SECURITY: matching and forwarding use the same normalised path, so what
//! the policy saw is exactly what the upstream gets. Anything a server might
//! read as a different path (`..`, encoded `/` or `\`, `..;`) is refused.

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

/// Characters re-encoded in a path segment: everything outside RFC 3986's
/// `pchar` (unreserved, sub-delims, `:` and `@`).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}')
    .add(0x7f);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with /")]
    NotAbsolute,
    #[error("path contains a `..` segment")]
    DotDot,
    #[error("path contains an encoded `/` or `\\`, or a backslash")]
    EncodedSeparator,
    #[error("path is percent-encoded twice")]
    DoubleEncoded,
    #[error("path is not valid UTF-8 once decoded")]
    NotUtf8,
    #[error("path contains a control character")]
    Control,
    #[error("path has more than {MAX_SEGMENTS} segments")]
    TooLong,
}

/// No real API nests deeper; the cap bounds the work one request can cause.
pub const MAX_SEGMENTS: usize = 256;

/// A decoded, normalised path: no `.`/`..` segments, no empty inner segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath {
    /// Decoded segments; a trailing slash gives a last empty segment.
    segments: Vec<String>,
}

impl NormalPath {
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The canonical encoded form that is forwarded upstream.
    pub fn encoded(&self) -> String {
        let mut out = String::new();
        self.push_encoded(&mut out);
        out
    }

    /// Appends the encoded form to `out`, as the upstream URL is built.
    pub fn push_encoded(&self, out: &mut String) {
        if self.segments.is_empty() {
            out.push('/');
        }
        for segment in &self.segments {
            out.push('/');
            out.extend(utf8_percent_encode(segment, SEGMENT));
        }
    }

    /// The decoded form, for audit records and messages.
    pub fn decoded(&self) -> String {
        if self.segments.is_empty() {
            return "/".to_string();
        }
        let mut out = String::new();
        for segment in &self.segments {
            out.push('/');
            out.push_str(segment);
        }
        out
    }
}

/// Normalises a raw (still percent-encoded) path without its query.
pub fn normalize(raw: &str) -> Result<NormalPath, PathError> {
    let rest = raw.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    if raw.contains('\\') {
        return Err(PathError::EncodedSeparator);
    }
    let pieces: Vec<&str> = rest.split('/').collect();
    if pieces.len() > MAX_SEGMENTS {
        return Err(PathError::TooLong);
    }
    let last = pieces.len() - 1;
    let mut segments = Vec::with_capacity(pieces.len());
    for (i, piece) in pieces.iter().enumerate() {
        let decoded = percent_decode_str(piece)
            .decode_utf8()
            .map_err(|_| PathError::NotUtf8)?;
        if decoded.contains(['/', '\\']) {
            return Err(PathError::EncodedSeparator);
        }
        // Encoded twice: an upstream that decodes again (some frameworks
        // and WAF-fronted servers do) would see `..`, `/`, `;` or `\\` where
        // the policy saw a plain name.
        if still_encoded(&decoded) {
            return Err(PathError::DoubleEncoded);
        }
        if decoded.chars().any(char::is_control) {
            return Err(PathError::Control);
        }
        // `..;x` is `..` to servlet containers; `.;x` likewise `.`.
        let bare = decoded.split(';').next().unwrap_or_default();
        if bare == ".." {
            return Err(PathError::DotDot);
        }
        // Windows and IIS drop trailing dots and spaces: `.. ` and `...`
        // are `..` there, `. ` is `.`.
        if bare.starts_with('.') && bare.len() > 1 && bare.trim_end_matches(['.', ' ']).is_empty() {
            return Err(PathError::DotDot);
        }
        if bare == "." {
            if decoded.len() > 1 {
                return Err(PathError::DotDot);
            }
            if i == last && !segments.is_empty() {
                segments.push(String::new());
            }
            continue;
        }
        // Empty segments (`//`) collapse, except a trailing slash, which
        // many APIs treat as a different resource.
        if decoded.is_empty() && (i != last || segments.is_empty()) {
            continue;
        }
        segments.push(decoded.into_owned());
    }
    Ok(NormalPath { segments })
}

/// Whether a once-decoded segment still holds a percent-escape (`%2e`) or
/// IIS's `%u002e` form.
fn still_encoded(decoded: &str) -> bool {
    let bytes = decoded.as_bytes();
    let hex = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    };
    bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%' && (hex(i + 1..i + 3) || (bytes.get(i + 1) == Some(&b'u') && hex(i + 2..i + 6)))
    })
}

/// A `paths` entry: `*` matches within one segment, `**` any number of
/// segments; everything else is literal and case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    segments: Vec<Glob>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Glob {
    /// `**`
    Any,
    /// A segment, possibly with `*` inside; split on `*`.
    Segment(Vec<String>),
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix('/')
            .ok_or_else(|| format!("path pattern {text:?} must start with /"))?;
        if text.contains(['?', '#', '%', '\\']) {
            return Err(format!(
                "path pattern {text:?} must be a plain decoded path (no ?, #, % or \\)"
            ));
        }
        let mut segments = Vec::new();
        for piece in rest.split('/') {
            if piece == "." || piece == ".." {
                return Err(format!("path pattern {text:?} has a . or .. segment"));
            }
            if piece == "**" {
                segments.push(Glob::Any);
            } else if piece.contains("**") {
                return Err(format!(
                    "path pattern {text:?}: `**` must be a whole segment"
                ));
            } else {
                segments.push(Glob::Segment(
                    piece.split('*').map(str::to_string).collect(),
                ));
            }
        }
        if rest.is_empty() {
            segments.clear();
        }
        Ok(Self {
            text: text.to_string(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Exact match, for allow rules: an allow grants only what it names.
    pub fn matches(&self, path: &NormalPath) -> bool {
        match_segments(&self.segments, path.segments(), false)
    }

    /// Loose match, for deny rules: a deny also covers the spellings that
    /// some servers read as the same resource (a `;param`, a trailing slash,
    /// other letter case, trailing dots and spaces as Windows servers drop
    /// them), so a denied path cannot be reached by respelling it.
    pub fn matches_loosely(&self, path: &NormalPath) -> bool {
        if self.matches(path) {
            return true;
        }
        let mut loose: Vec<&str> = path
            .segments()
            .iter()
            .map(|s| {
                let s = s.split(';').next().unwrap_or_default();
                let trimmed = s.trim_end_matches(['.', ' ']);
                if trimmed.is_empty() { s } else { trimmed }
            })
            .collect();
        if loose.last().is_some_and(|s| s.is_empty()) {
            loose.pop();
        }
        match_segments(&self.segments, &loose, true)
    }
}

/// Matches in O(globs × segments): `reachable[j]` says whether the globs
/// seen so far can consume exactly the first `j` segments. Backtracking over
/// several `**` would be exponential in the worst case, and the path is the
/// agent's to choose.
fn match_segments<S: AsRef<str>>(globs: &[Glob], segments: &[S], fold_case: bool) -> bool {
    let n = segments.len();
    let mut reachable = vec![false; n + 1];
    reachable[0] = true;
    for glob in globs {
        let mut next = vec![false; n + 1];
        match glob {
            Glob::Any => {
                let mut any = false;
                for j in 0..=n {
                    any |= reachable[j];
                    next[j] = any;
                }
            }
            Glob::Segment(parts) => {
                for j in 0..n {
                    if reachable[j] && match_glob(parts, segments[j].as_ref(), fold_case) {
                        next[j + 1] = true;
                    }
                }
            }
        }
        reachable = next;
    }
    reachable[n]
}

/// Matches one segment against literal parts separated by `*`.
fn match_glob(parts: &[String], segment: &str, fold_case: bool) -> bool {
    if fold_case {
        let parts: Vec<String> = parts.iter().map(|p| p.to_lowercase()).collect();
        return match_glob(&parts, &segment.to_lowercase(), false);
    }
    if parts.len() == 1 {
        return parts[0] == segment;
    }
    let (first, last) = (&parts[0], &parts[parts.len() - 1]);
    if segment.len() < first.len() + last.len()
        || !segment.starts_with(first.as_str())
        || !segment.ends_with(last.as_str())
    {
        return false;
    }
    let mut middle = &segment[first.len()..segment.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match middle.find(part.as_str()) {
            Some(i) => middle = &middle[i + part.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize(p).map(|n| n.encoded())
    }

    #[test]
    fn normalisation_table() {
        let ok = [
            ("/", "/"),
            ("/v1/chat", "/v1/chat"),
            ("/v1//chat", "/v1/chat"),
            ("//v1/chat", "/v1/chat"),
            ("/v1/./chat", "/v1/chat"),
            ("/v1/chat/", "/v1/chat/"),
            ("/v1/chat/.", "/v1/chat/"),
            ("/v1/%63hat", "/v1/chat"),
            ("/a%20b", "/a%20b"),
            ("/a;b=c", "/a;b=c"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/%25", "/%25"),
        ];
        for (input, want) in ok {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
        let bad = [
            ("v1", PathError::NotAbsolute),
            ("/v1/../admin", PathError::DotDot),
            ("/v1/%2e%2e/admin", PathError::DotDot),
            ("/v1/%2E./admin", PathError::DotDot),
            ("/v1/..;/admin", PathError::DotDot),
            ("/v1/..", PathError::DotDot),
            ("/v1/.;x/admin", PathError::DotDot),
            ("/v1%2fadmin", PathError::EncodedSeparator),
            ("/v1%2Fadmin", PathError::EncodedSeparator),
            ("/v1%5cadmin", PathError::EncodedSeparator),
            ("/v1\\admin", PathError::EncodedSeparator),
            ("/%c0%ae%c0%ae/x", PathError::NotUtf8),
            ("/%ff", PathError::NotUtf8),
            ("/a%00b", PathError::Control),
            ("/a%0d%0ab", PathError::Control),
            ("/v1/%252e%252e/admin", PathError::DoubleEncoded),
            ("/v1/%252E./admin", PathError::DoubleEncoded),
            ("/v1/%252fadmin", PathError::DoubleEncoded),
            ("/v1/x%255Cadmin", PathError::DoubleEncoded),
            ("/v1/..%253b/admin", PathError::DoubleEncoded),
            ("/v1/%25u002e%25u002e/admin", PathError::DoubleEncoded),
            ("/v1/%2541", PathError::DoubleEncoded),
            ("/v1/..%20/admin", PathError::DotDot),
            ("/v1/.../admin", PathError::DotDot),
            ("/v1/. /admin", PathError::DotDot),
        ];
        for (input, want) in bad {
            assert_eq!(norm(input), Err(want), "{input}");
        }
    }

    fn matches(pattern: &str, path: &str) -> bool {
        PathPattern::parse(pattern)
            .unwrap()
            .matches(&normalize(path).unwrap())
    }

    #[test]
    fn glob_table() {
        let cases = [
            ("/v1/chat/completions", "/v1/chat/completions", true),
            ("/v1/chat/completions", "/v1/chat/completions/", false),
            ("/v1/chat/completions", "/V1/chat/completions", false),
            ("/v1/*", "/v1/models", true),
            ("/v1/*", "/v1/models/x", false),
            ("/v1/**", "/v1", true),
            ("/v1/**", "/v1/a/b/c", true),
            ("/v1/**", "/v2/a", false),
            ("/v1/**", "/v1x", false),
            ("/acme/app.git/**", "/acme/app.git/info/refs", true),
            ("/acme/*.git/**", "/acme/app.git/info/refs", true),
            ("/acme/*.git/**", "/acme/app.gitx/info", false),
            ("/**/refs", "/a/b/refs", true),
            ("/**/refs", "/refs", true),
            ("/a*b*c", "/abc", true),
            ("/a*b*c", "/axxbyyc", true),
            ("/a*b*c", "/ac", false),
            ("/", "/", true),
            ("/", "/x", false),
            ("/**", "/anything/at/all", true),
            ("/v1/**", "/v1//../", false),
        ];
        for (pattern, path, want) in cases {
            if let Ok(normal) = normalize(path) {
                let got = PathPattern::parse(pattern).unwrap().matches(&normal);
                assert_eq!(got, want, "{pattern} vs {path}");
            }
        }
        assert!(matches("/v1/**", "/v1/%2e/x"));
    }

    #[test]
    fn loose_matching_covers_respellings_for_deny() {
        let deny = PathPattern::parse("/v1/models/secret").unwrap();
        for path in [
            "/v1/models/secret/",
            "/v1/models/secret;x",
            "/v1/Models/SECRET",
            "/v1;a/models/secret",
            "/v1/models/secret.",
            "/v1/models/secret%20",
            "/v1/models./secret. .",
        ] {
            let path = normalize(path).unwrap();
            assert!(deny.matches_loosely(&path), "{path:?}");
            assert!(!deny.matches(&path), "{path:?}");
        }
    }

    #[test]
    fn many_double_stars_stay_linear() {
        let pattern = PathPattern::parse("/**/a/**/a/**/a/**/end").unwrap();
        let path = normalize(&"/a".repeat(MAX_SEGMENTS - 1)).unwrap();
        let started = std::time::Instant::now();
        assert!(!pattern.matches(&path));
        assert!(!pattern.matches_loosely(&path));
        // Not a timing assertion on speed, only a guard against exponential blow-up.
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(
            normalize(&"/a".repeat(MAX_SEGMENTS + 1)),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn bad_patterns_are_refused() {
        for p in ["v1", "/v1/../x", "/v1/a**", "/v1?x", "/a%2f"] {
            assert!(PathPattern::parse(p).is_err(), "{p}");
        }
    }
}
