//! `sidekey audit tail`: the audit log in a readable form.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::time::Duration;

use anyhow::{Context, bail};

use super::Paths;
use crate::config::{AuditSink, Config};

pub(super) fn tail(paths: &Paths, follow: bool, lines: usize) -> anyhow::Result<()> {
    let (state, sink) = if paths.config.exists() || paths.config_named {
        let config = Config::load(&paths.config)?;
        (paths.state_dir_of(&config)?, config.audit.sink.clone())
    } else {
        (paths.state_dir()?, AuditSink::File("audit.jsonl".into()))
    };
    let AuditSink::File(file) = sink else {
        bail!("the audit log goes to stdout (audit.file = \"-\"); there is no file to read");
    };
    let path = state.root().join(file);
    // Before the first request there is no log yet: nothing to show, or,
    // following, a file to wait for, as `tail -F` does.
    let mut waiting = false;
    let file = loop {
        match std::fs::File::open(&path) {
            Ok(file) => break file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && state.root().is_dir() => {
                if !waiting {
                    let then = if follow { "; waiting for it" } else { "" };
                    eprintln!(
                        "sidekey: no audit records yet ({} does not exist){then}",
                        path.display()
                    );
                }
                if !follow {
                    return Ok(());
                }
                waiting = true;
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        }
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        bail!("{} is not a regular file", path.display());
    }
    let mut reader = BufReader::new(file);
    // Only the last `lines` are kept: a log may hold millions.
    let mut last = std::collections::VecDeque::with_capacity(lines.min(4096));
    // Where the last whole line ends: a line cut short by a crash is shown,
    // but following starts before it.
    let mut pos = 0;
    let mut offset = 0;
    loop {
        let mut line = String::new();
        let n = read_record(&mut reader, &mut line)?;
        if n == 0 {
            break;
        }
        offset += n as u64;
        if line.ends_with('\n') {
            pos = offset;
        }
        if lines > 0 {
            if last.len() == lines {
                last.pop_front();
            }
            last.push_back(line);
        }
    }
    for record in &last {
        outln!("{}", render(record));
    }
    if !follow {
        return Ok(());
    }
    let mut file = reader.into_inner();
    // As `tail -F`: a log rotated away (renamed or removed) is read to its
    // end, then the new file at the path from its start; one truncated in
    // place is read again from its start.
    loop {
        std::thread::sleep(Duration::from_millis(250));
        if truncated(&file, pos) {
            pos = 0;
        }
        pos = print_new(&mut file, pos)?;
        match std::fs::File::open(&path) {
            Ok(named) if !same_file(&named, &file) => {
                print_new(&mut file, pos)?;
                file = named;
                pos = print_new(&mut file, 0)?;
            }
            Ok(_) => {}
            // Moved away, and no record has made the new one yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open {}", path.display()));
            }
        }
    }
}

/// Prints the whole records after `pos`; where the next one starts.
fn print_new(file: &mut std::fs::File, mut pos: u64) -> anyhow::Result<u64> {
    file.seek(SeekFrom::Start(pos))
        .context("cannot read the audit log")?;
    let mut reader = BufReader::new(&*file);
    let mut line = String::new();
    loop {
        let n = read_record(&mut reader, &mut line)?;
        // A line still being written is read whole next time.
        if n == 0 || !line.ends_with('\n') {
            return Ok(pos);
        }
        pos += n as u64;
        outln!("{}", render(&line));
        line.clear();
    }
}

/// Far longer than any record (a request head is at most
/// `limits.max_header_bytes`); bounds what a garbled log costs in memory.
const MAX_RECORD: u64 = 16 << 20;

/// Reads one line into `line`, with its `\n`, its bytes that are not UTF-8
/// shown as U+FFFD: one damaged byte must not stop the rest being read.
fn read_record(reader: &mut impl BufRead, line: &mut String) -> anyhow::Result<usize> {
    let mut bytes = Vec::new();
    let n = std::io::Read::take(&mut *reader, MAX_RECORD)
        .read_until(b'\n', &mut bytes)
        .context("cannot read the audit log")?;
    *line = String::from_utf8_lossy(&bytes).into_owned();
    Ok(n)
}

/// Whether `file` was cut short since a line ended at `pos`: it is now
/// shorter, or what ends there is no longer a line (records written after
/// the cut have already grown it past `pos`).
fn truncated(file: &std::fs::File, pos: u64) -> bool {
    use std::os::unix::fs::FileExt;
    if pos == 0 {
        return false;
    }
    let mut before = [0u8];
    match file.read_exact_at(&mut before, pos - 1) {
        Ok(()) => before[0] != b'\n',
        Err(_) => true,
    }
}

fn same_file(a: &std::fs::File, b: &std::fs::File) -> bool {
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => crate::state::same_file(&a, &b),
        _ => false,
    }
}

/// `ts decision status agent method host path -> reason (rule)`.
fn render(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return format!("(unreadable record) {}", printable(line.trim_end()));
    };
    let s = |k: &str| match &v[k] {
        serde_json::Value::String(s) => printable(s),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let detail = match &v["detail"] {
        serde_json::Value::String(d) => format!(" ({})", printable(d)),
        _ => String::new(),
    };
    format!(
        "{} {:5} {} {:12} {:7} {}{} {} reason={} rule={} route={} {}ms{detail}",
        s("ts"),
        s("decision"),
        s("status"),
        s("agent"),
        s("method"),
        s("host"),
        match &v["port"] {
            serde_json::Value::Number(p) => format!(":{p}"),
            _ => String::new(),
        },
        s("path"),
        s("reason"),
        s("rule"),
        s("route"),
        s("duration_ms"),
    )
}

/// `text` with its control characters written as escapes: a record's
/// fields come from requests, and a terminal must not take one for a
/// command.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_in_a_record_are_shown_escaped() {
        let line =
            r#"{"ts":"t","decision":"deny","status":403,"agent":"a\u001b[2J","path":"/x\ny"}"#;
        let shown = render(line);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(
            shown.contains(r"a\u{1b}[2J") && shown.contains(r"/x\ny"),
            "{shown}"
        );
        let torn = render("{\"ts\":\"t\u{7}");
        assert!(
            torn.starts_with("(unreadable record)") && !torn.contains('\u{7}'),
            "{torn:?}"
        );
    }
}
