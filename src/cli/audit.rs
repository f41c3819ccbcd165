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
    let mut reader = BufReader::new(
        std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?,
    );
    let mut all = Vec::new();
    let mut line = String::new();
    while reader
        .read_line(&mut line)
        .context("cannot read the audit log")?
        > 0
    {
        all.push(std::mem::take(&mut line));
    }
    for record in &all[all.len().saturating_sub(lines)..] {
        println!("{}", render(record));
    }
    if !follow {
        return Ok(());
    }
    let mut pos = reader
        .stream_position()
        .context("cannot read the audit log")?;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let mut file = std::fs::File::open(&path).context("audit log disappeared")?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < pos {
            pos = 0; // rotated or truncated
        }
        file.seek(SeekFrom::Start(pos))
            .context("cannot read the audit log")?;
        let mut reader = BufReader::new(file);
        loop {
            let n = reader
                .read_line(&mut line)
                .context("cannot read the audit log")?;
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            pos += n as u64;
            println!("{}", render(&line));
            line.clear();
        }
        line.clear();
    }
}

/// `ts decision status agent method host path -> reason (rule)`.
fn render(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return format!("(unreadable record) {}", line.trim_end());
    };
    let s = |k: &str| match &v[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    format!(
        "{} {:5} {} {:12} {:7} {}{} {} reason={} rule={} route={} {}ms",
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
