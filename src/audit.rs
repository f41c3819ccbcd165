//! The audit log: one JSON line per decision, written before the response
//! is released.
//!
//! Records carry names (agent, route, rule, secret), never a secret value, a
//! whole token or a query string. With `on_failure = "deny"` a record that
//! cannot be written makes the request fail (SPEC invariant 2).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use serde::Serialize;

use crate::config::{AuditSink, OnFailure};

/// One decision, as written.
#[derive(Debug, Clone, Serialize, Default)]
pub struct AuditEvent {
    pub ts: String,
    pub request_id: String,
    pub agent: Option<String>,
    pub session: Option<String>,
    pub token_id: Option<String>,
    pub mode: &'static str,
    pub method: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: String,
    pub route: Option<String>,
    pub rule: Option<String>,
    pub decision: &'static str,
    pub reason: &'static str,
    pub secret: Option<String>,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: u64,
    pub redactions: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write audit record to {sink}: {cause}")]
pub struct AuditError {
    sink: String,
    cause: String,
}

/// Where records go, opened lazily and reopened after a failure.
#[derive(Debug)]
pub struct AuditLog {
    target: Target,
    on_failure: OnFailure,
    file: Mutex<Option<File>>,
    /// False after a failed write until one succeeds again.
    healthy: AtomicBool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Stdout,
    File(PathBuf),
}

impl AuditLog {
    /// `sink` paths that are relative are taken from `state_dir`.
    pub fn new(sink: &AuditSink, on_failure: OnFailure, state_dir: &std::path::Path) -> Self {
        let target = match sink {
            AuditSink::Stdout => Target::Stdout,
            AuditSink::File(path) => Target::File(state_dir.join(path)),
        };
        Self {
            target,
            on_failure,
            file: Mutex::new(None),
            healthy: AtomicBool::new(true),
        }
    }

    /// Whether the last write succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn on_failure(&self) -> OnFailure {
        self.on_failure
    }

    /// Same destination and policy: a reload can keep the open file.
    pub fn same_as(&self, other: &AuditLog) -> bool {
        self.target == other.target && self.on_failure == other.on_failure
    }

    fn describe(&self) -> String {
        match &self.target {
            Target::Stdout => "stdout".to_string(),
            Target::File(p) => p.display().to_string(),
        }
    }

    /// Appends one record as a single write. The caller decides what a
    /// failure means (see [`AuditLog::on_failure`]).
    pub fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let result = self.write(event);
        self.healthy.store(result.is_ok(), Ordering::Relaxed);
        result
    }

    fn write(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(event).map_err(|e| self.error(e.to_string()))?;
        line.push(b'\n');
        match &self.target {
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&line)
                    .and_then(|()| out.flush())
                    .map_err(|e| self.error(crate::config::describe_io(&e)))
            }
            Target::File(path) => {
                let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
                if guard.is_none() {
                    let file = OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .open(path)
                        .map_err(|e| self.error(crate::config::describe_io(&e)))?;
                    *guard = Some(file);
                }
                let result = guard.as_mut().map(|f| f.write_all(&line));
                match result {
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => {
                        // Reopen next time: the file may have been rotated or repaired.
                        *guard = None;
                        Err(self.error(crate::config::describe_io(&e)))
                    }
                    None => Err(self.error("not open".to_string())),
                }
            }
        }
    }

    fn error(&self, cause: String) -> AuditError {
        AuditError {
            sink: self.describe(),
            cause,
        }
    }
}

/// The current time in RFC 3339 with milliseconds.
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
