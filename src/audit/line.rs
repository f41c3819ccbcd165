//! An [`AuditEvent`] as one JSON line.
//!
//! Every request writes one, so this is on the hot path: through serde's
//! derive, every key went through serde_json's byte-by-byte string escaper
//! and every value through another call of it, 5-6 % of sidekey's
//! instructions per request. The keys here are constants, and a value that
//! holds nothing JSON must escape (almost every one: names, ids, paths) is
//! copied as it is; any other value is still escaped by serde_json, so the
//! line is byte for byte what `serde_json::to_writer` writes for the struct
//! (a unit test holds the two together).

use super::AuditEvent;

impl AuditEvent {
    /// Appends the record to `line` as one JSON object (no newline), its
    /// fields in SPEC order; absent values are `null`. Each key is written
    /// with its separator as one constant.
    pub(super) fn write_json(&self, line: &mut Vec<u8>) {
        text(line, b"{\"ts\":", &self.ts);
        text(line, b",\"request_id\":", &self.request_id);
        optional_text(line, b",\"agent\":", self.agent.as_deref());
        optional_text(line, b",\"session\":", self.session.as_deref());
        optional_text(line, b",\"token_id\":", self.token_id.as_deref());
        text(line, b",\"mode\":", self.mode);
        text(line, b",\"method\":", &self.method);
        optional_text(
            line,
            b",\"host\":",
            self.host.as_deref().map(without_jwts).as_deref(),
        );
        optional_number(line, b",\"port\":", self.port.map(u64::from));
        text(line, b",\"path\":", &without_jwts(&self.path));
        optional_text(line, b",\"route\":", self.route.as_deref());
        optional_text(line, b",\"rule\":", self.rule.as_deref());
        text(line, b",\"decision\":", self.decision);
        text(line, b",\"reason\":", self.reason);
        optional_text(line, b",\"secret\":", self.secret.as_deref());
        number(line, b",\"status\":", self.status.into());
        number(line, b",\"bytes_in\":", self.bytes_in);
        number(line, b",\"bytes_out\":", self.bytes_out);
        number(line, b",\"duration_ms\":", self.duration_ms);
        number(line, b",\"redactions\":", self.redactions);
        if let Some(detail) = &self.detail {
            text(line, b",\"detail\":", detail);
        }
        line.push(b'}');
    }
}

fn text(line: &mut Vec<u8>, key: &[u8], value: &str) {
    line.extend_from_slice(key);
    if needs_no_escape(value) {
        line.push(b'"');
        line.extend_from_slice(value.as_bytes());
        line.push(b'"');
    } else {
        // Writing a `&str` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *line, value);
    }
}

fn optional_text(line: &mut Vec<u8>, key: &[u8], value: Option<&str>) {
    match value {
        Some(value) => text(line, key, value),
        None => null(line, key),
    }
}

fn number(line: &mut Vec<u8>, key: &[u8], value: u64) {
    line.extend_from_slice(key);
    line.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

fn optional_number(line: &mut Vec<u8>, key: &[u8], value: Option<u64>) {
    match value {
        Some(value) => number(line, key, value),
        None => null(line, key),
    }
}

fn null(line: &mut Vec<u8>, key: &[u8]) {
    line.extend_from_slice(key);
    line.extend_from_slice(b"null");
}

/// `value` with every JWT in it (an agent token, a workload token) as
/// `[REDACTED]`. The request's own token is taken out before, but an agent
/// can put any token in a path or host, someone else's too, and a record
/// never holds one whole.
fn without_jwts(value: &str) -> std::borrow::Cow<'_, str> {
    // A JWT's header is base64url JSON, so it starts `eyJ` (`{"`).
    const START: &str = "eyJ";
    // A plain scan: `str::contains` sets up a substring searcher, which
    // costs more than the short paths and hosts of every record.
    if !value
        .as_bytes()
        .windows(START.len())
        .any(|w| w == START.as_bytes())
    {
        return std::borrow::Cow::Borrowed(value);
    }
    let base64url = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
    // The length of the run of base64url bytes at the start of `bytes`.
    let run = |bytes: &[u8]| bytes.iter().take_while(|b| base64url(b)).count();
    let bytes = value.as_bytes();
    let mut out = String::with_capacity(value.len());
    let (mut copied, mut at) = (0, 0);
    while let Some(found) = value[at..].find(START) {
        let start = at + found;
        // header `.` payload, then `.` signature if there is one.
        let mut end = start + run(&bytes[start..]);
        let mut segments = 1;
        while segments < 3 && bytes.get(end) == Some(&b'.') && run(&bytes[end + 1..]) > 0 {
            end += 1 + run(&bytes[end + 1..]);
            segments += 1;
        }
        if segments >= 2 {
            out.push_str(&value[copied..start]);
            out.push_str("[REDACTED]");
            copied = end;
        }
        at = end.max(start + START.len());
    }
    out.push_str(&value[copied..]);
    std::borrow::Cow::Owned(out)
}

/// Whether serde_json would write `value` between its quotes unchanged: no
/// quote, backslash or control character (it leaves DEL, `/` and non-ASCII
/// UTF-8 as they are). Folded without an early exit so it compiles to a
/// vector loop.
fn needs_no_escape(value: &str) -> bool {
    !value.bytes().fold(false, |found, b| {
        found | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_of(event: &AuditEvent) -> String {
        let mut line = Vec::new();
        event.write_json(&mut line);
        String::from_utf8(line).unwrap()
    }

    /// Values that need escaping in every position serde_json treats
    /// differently: quotes, backslashes, each control character, and the
    /// characters it leaves alone.
    const AWKWARD: &[&str] = &[
        "",
        "plain",
        "quote\"in",
        "back\\slash",
        "new\nline\r\ttab",
        "\u{0}\u{1}\u{8}\u{b}\u{c}\u{1f}",
        "del\u{7f} slash/ é ✓ 🦀",
        "\"",
        "\\\\\"\"",
        "/v1/chat?completions%20x",
    ];

    #[test]
    fn lines_are_what_serde_json_writes_for_the_record() {
        let mut events = vec![AuditEvent::default()];
        for (i, awkward) in AWKWARD.iter().enumerate() {
            let text = |n: usize| AWKWARD[(i + n) % AWKWARD.len()].to_string();
            events.push(AuditEvent {
                ts: text(0),
                request_id: text(1),
                agent: Some(awkward.to_string()),
                session: (i % 2 == 0).then(|| text(2)),
                token_id: (i % 3 == 0).then(|| text(3)),
                mode: "intercept",
                method: text(4),
                host: (i % 2 == 1).then(|| text(5)),
                port: (i % 2 == 0).then_some(u16::MAX - i as u16),
                path: text(6),
                route: Some(text(7)),
                rule: (i % 4 != 0).then(|| text(8)),
                decision: "deny",
                reason: "policy_denied",
                secret: (i % 3 != 1).then(|| text(9)),
                status: 100 + i as u16,
                bytes_in: u64::MAX,
                bytes_out: i as u64,
                duration_ms: 10u64.pow(i as u32),
                redactions: 0,
                detail: (i % 2 == 0).then(|| text(10)),
            });
        }
        for event in &events {
            let expected = serde_json::to_string(event).unwrap();
            assert_eq!(line_of(event), expected);
            serde_json::from_str::<serde_json::Value>(&line_of(event)).unwrap();
        }
    }

    #[test]
    fn tokens_in_a_path_or_host_are_redacted() {
        let token = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJjb2RlciJ9.c2lnbmF0dXJl-_x";
        for (value, expected) in [
            (format!("/v1/{token}/x"), "/v1/[REDACTED]/x".to_string()),
            (format!("/{token}"), "/[REDACTED]".into()),
            // Run together, the pieces still hold nothing whole.
            (
                format!("/a{token}{token}"),
                "/a[REDACTED].[REDACTED]".into(),
            ),
            (
                "/eyJhbGciOiJFZERTQSJ9.eyJzdWIi/x".into(),
                "/[REDACTED]/x".into(),
            ),
            (
                format!("{token}.example.com"),
                "[REDACTED].example.com".into(),
            ),
            (
                "/eyJ/only.one/segment".into(),
                "/eyJ/only.one/segment".into(),
            ),
            ("/eyJeyJ".into(), "/eyJeyJ".into()),
            ("/v1/chat/completions".into(), "/v1/chat/completions".into()),
            ("/é/eyJa.b.c/✓".into(), "/é/[REDACTED]/✓".into()),
        ] {
            assert_eq!(without_jwts(&value), expected, "{value}");
        }
    }

    #[test]
    fn only_values_that_json_leaves_alone_skip_the_escaper() {
        for b in 0u8..=0x7f {
            let value = (b as char).to_string();
            let escaped = serde_json::to_string(&value).unwrap();
            let unchanged = escaped == format!("\"{value}\"");
            assert_eq!(needs_no_escape(&value), unchanged, "byte {b:#04x}");
        }
    }
}
