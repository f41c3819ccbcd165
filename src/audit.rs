//! The audit log: one JSON line per decision, written before the response
//! is released.
//!
//! Records carry names (agent, route, rule, secret), never a secret value, a
//! whole token or a query string. With `on_failure = "deny"` a record that
//! cannot be written makes the request fail (SPEC invariant 2).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};

use crate::config::{AuditSink, OnFailure};

mod line;

/// One decision, as written (see `line.rs` for its JSON).
#[derive(Debug, Clone, Default)]
#[cfg_attr(test, derive(serde::Serialize))]
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
    /// Beyond SPEC's fields, on a refusal only: the cause the agent was not
    /// told (a secret source or token endpoint that failed). Absent, not
    /// null, otherwise.
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    pub detail: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write audit record to {sink}: {cause}")]
pub struct AuditError {
    sink: String,
    cause: String,
}

/// Where records go. One writer task takes every record waiting, lets the
/// runtime's ready tasks add theirs, and has them written with one `write`
/// and synced with one `fdatasync` on a blocking thread; only then are their
/// requests released. Records that arrive during a sync form the next
/// batch, so under load one sync covers many records and no request queues
/// behind a sync of its own (group commit). The runtime thread never
/// touches the sink: a log pipe nobody reads or a hung file system stalls
/// the records, not every connection.
#[derive(Debug)]
pub struct AuditLog {
    target: Target,
    on_failure: OnFailure,
    /// The writer task, started at the first record.
    writer: OnceLock<mpsc::UnboundedSender<Pending>>,
    /// False after a failed or unanswered write until a batch is written.
    /// Shared with the writer, which sets it after every batch.
    healthy: Arc<AtomicBool>,
    /// Records sent to the writer and not yet taken into a batch.
    queued: Arc<AtomicUsize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Stdout,
    File(PathBuf),
}

/// One record waiting for its batch.
#[derive(Debug)]
struct Pending {
    line: Vec<u8>,
    written: oneshot::Sender<Result<(), String>>,
}

/// No batch grows past this many records, so a burst is released in steps.
const MAX_BATCH: usize = 4096;

/// How many times the writer lets other tasks run, while they keep adding
/// records, before it syncs a batch.
const GATHER_ROUNDS: usize = 3;

/// How long a request waits for its record. A sink that has not answered by
/// then (a hung network file system, a log pipe nobody reads) has failed,
/// as one that returned an error has: with `on_failure = "deny"` the
/// request is refused rather than left hanging.
const DEADLINE: Duration = Duration::from_secs(10);

/// While the sink is failing, records still queue for it (they are written
/// once it recovers) up to this many; later ones are dropped, so a long
/// outage under load cannot exhaust memory. Their requests are refused
/// under `on_failure = "deny"`.
const MAX_QUEUED_WHILE_FAILING: usize = 16 * MAX_BATCH;

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
            writer: OnceLock::new(),
            healthy: Arc::new(AtomicBool::new(true)),
            queued: Arc::new(AtomicUsize::new(0)),
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

    /// Appends one record and returns once it is on disk (synced) or known
    /// to have failed: an error, no answer within [`DEADLINE`], or a sink
    /// already failing, whose record is queued for it without waiting. The
    /// caller decides what a failure means (see [`AuditLog::on_failure`]).
    /// Must run inside the runtime.
    pub async fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        self.write(event).await.map_err(|cause| AuditError {
            sink: self.describe(),
            cause,
        })
    }

    async fn write(&self, event: &AuditEvent) -> Result<(), String> {
        // Sized for a typical record, so the line is not regrown field by field.
        let mut line = Vec::with_capacity(640);
        event.write_json(&mut line);
        line.push(b'\n');
        let failing = !self.is_healthy();
        if failing && self.queued.load(Ordering::Relaxed) >= MAX_QUEUED_WHILE_FAILING {
            return Err("the sink is failing and its queue is full; record dropped".into());
        }
        let (written, done) = oneshot::channel();
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.writer().send(Pending { line, written }).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.healthy.store(false, Ordering::Relaxed);
            return Err("the audit writer has stopped".into());
        }
        if failing {
            // The writer retries with this record and says when the sink
            // is back; the request does not wait for it.
            return Err("the sink is failing; record queued".into());
        }
        let result = match tokio::time::timeout(DEADLINE, done).await {
            Ok(written) => {
                written.unwrap_or_else(|_| Err("the audit writer has stopped".to_string()))
            }
            Err(_) => Err(format!(
                "no answer within {} s; record queued",
                DEADLINE.as_secs()
            )),
        };
        if result.is_err() {
            // The writer marks failed batches itself; this covers a sink
            // that never answers.
            self.healthy.store(false, Ordering::Relaxed);
        }
        result
    }

    fn writer(&self) -> &mpsc::UnboundedSender<Pending> {
        self.writer.get_or_init(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            let sink = LogFile {
                target: self.target.clone(),
                file: None,
            };
            let writer = Writer {
                receiver,
                healthy: self.healthy.clone(),
                queued: self.queued.clone(),
            };
            tokio::spawn(writer.run(sink));
            sender
        })
    }
}

/// Where the writer puts a batch of whole lines: the log in the service, a
/// recorder in tests.
trait BatchSink {
    /// Returns once `bytes` are written and synced, or known not to be.
    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), String>;
}

struct LogFile {
    target: Target,
    /// The open log, kept for the next batch while its path still names it.
    file: Option<File>,
}

impl BatchSink for LogFile {
    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        let target = self.target.clone();
        let file = self.file.take();
        let (file, result) = tokio::task::spawn_blocking(move || append(&target, file, &bytes))
            .await
            .unwrap_or_else(|_| (None, Err("the audit write stopped".to_string())));
        self.file = file;
        result
    }
}

/// Writes and syncs one batch, opening the log if `file` is not open yet
/// or its path now names another file; the log to keep open for the next
/// batch, and the outcome. Blocks.
fn append(target: &Target, file: Option<File>, bytes: &[u8]) -> (Option<File>, Result<(), String>) {
    let describe = |e: std::io::Error| crate::config::describe_io(&e);
    let path = match target {
        Target::Stdout => {
            let mut out = std::io::stdout().lock();
            let result = out.write_all(bytes).and_then(|()| out.flush());
            return (None, result.map_err(describe));
        }
        Target::File(path) => path,
    };
    let open = match file.filter(|file| still_named(path, file)) {
        Some(open) => open,
        None => match open_log(path) {
            Ok(open) => open,
            Err(e) => return (None, Err(describe(e))),
        },
    };
    match append_locked(&open, bytes) {
        Ok(()) => (Some(open), Ok(())),
        // Reopened next time: the file may have been rotated or repaired.
        Err(e) => (None, Err(describe(e))),
    }
}

/// Whether stdout is `/dev/null`, as it is when sidekey was started with
/// stdout closed (the Rust runtime puts `/dev/null` there).
pub fn stdout_is_null() -> bool {
    use std::os::unix::fs::MetadataExt;
    let stdout = rustix::fs::fstat(std::io::stdout());
    let null = std::fs::metadata("/dev/null");
    match (stdout, null) {
        (Ok(stdout), Ok(null)) => {
            rustix::fs::FileType::from_raw_mode(stdout.st_mode)
                == rustix::fs::FileType::CharacterDevice
                && stdout.st_rdev == null.rdev()
        }
        _ => false,
    }
}

/// Whether `path` still names the open log. A log rotated away (renamed or
/// removed, as logrotate does) is let go, so the next record starts a new
/// file at `path` rather than go on into one that may be compressed or
/// deleted. Two `stat`s per batch, beside the batch's `fdatasync`.
fn still_named(path: &std::path::Path, file: &File) -> bool {
    match (std::fs::metadata(path), file.metadata()) {
        (Ok(named), Ok(open)) => crate::state::same_file(&named, &open),
        _ => false,
    }
}

/// Appends and syncs `bytes` under an exclusive lock on the log, which every
/// sidekey process writing it takes (`run` and `exec` may share one). The
/// length measured under it is this batch's start, whatever was appended
/// or truncated (`copytruncate`) before, so a batch that fails halfway is
/// cut back to it, and only it: never another process's synced records. A
/// line left unfinished by a crash is ended first, so the next record
/// starts a line of its own.
fn append_locked(open: &File, bytes: &[u8]) -> std::io::Result<()> {
    open.lock()?;
    let written = (|| {
        let mut start = open.metadata()?.len();
        let mut last = [b'\n'];
        if start > 0 {
            open.read_exact_at(&mut last, start - 1)?;
        }
        if last[0] != b'\n' {
            (&*open).write_all(b"\n")?;
            start += 1;
        }
        let result = (&*open).write_all(bytes).and_then(|()| open.sync_data());
        if result.is_err() {
            let _ = open.set_len(start);
        }
        result
    })();
    let _ = open.unlock();
    written
}

/// The writer task's ends of what it shares with its [`AuditLog`].
struct Writer {
    receiver: mpsc::UnboundedReceiver<Pending>,
    healthy: Arc<AtomicBool>,
    queued: Arc<AtomicUsize>,
}

impl Writer {
    /// Until every sender is gone (the config that owned this log was
    /// replaced): take what is waiting, write it, sync it, release it.
    async fn run(mut self, mut sink: impl BatchSink) {
        while let Some(first) = self.receiver.recv().await {
            let mut batch = vec![first];
            self.take_waiting(&mut batch);
            // A sync costs the same however many records it covers. Before
            // paying for one, let the runtime run its ready tasks: requests
            // already in progress reach their record and join this batch
            // rather than need a sync of their own. The wait is bounded by
            // scheduler rounds, not time; a yield with nothing else to run
            // comes straight back, so on an idle runtime a lone record is
            // synced at once.
            for _ in 0..GATHER_ROUNDS {
                if batch.len() >= MAX_BATCH {
                    break;
                }
                tokio::task::yield_now().await;
                if !self.take_waiting(&mut batch) {
                    break;
                }
            }
            self.queued.fetch_sub(batch.len(), Ordering::Relaxed);
            let mut bytes = Vec::with_capacity(batch.iter().map(|p| p.line.len()).sum());
            for pending in &batch {
                bytes.extend_from_slice(&pending.line);
            }
            let result = sink.write(bytes).await;
            // A sink that recovers is trusted again, even if no request
            // is waiting on this batch.
            self.healthy.store(result.is_ok(), Ordering::Relaxed);
            for pending in batch {
                let _ = pending.written.send(result.clone());
            }
        }
    }

    /// Moves the records waiting into `batch`, up to [`MAX_BATCH`]; whether
    /// there were any.
    fn take_waiting(&mut self, batch: &mut Vec<Pending>) -> bool {
        let before = batch.len();
        while batch.len() < MAX_BATCH {
            match self.receiver.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        batch.len() > before
    }
}

/// Opens the log for appending, creating it if need be.
fn open_log(path: &std::path::Path) -> std::io::Result<File> {
    let open = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    if open.metadata()?.len() == 0 {
        // Likely just created: its name must survive a crash as its
        // records do.
        crate::state::sync_parent(path);
    }
    Ok(open)
}

/// The current time in RFC 3339 with milliseconds.
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::Mutex;
    use std::time::Duration;

    /// Records how many lines each batch held.
    #[derive(Clone, Default)]
    struct Batches(Arc<Mutex<Vec<usize>>>);

    impl BatchSink for Batches {
        async fn write(&mut self, bytes: Vec<u8>) -> Result<(), String> {
            let lines = bytes.iter().filter(|&&b| b == b'\n').count();
            self.0.lock().unwrap().push(lines);
            Ok(())
        }
    }

    /// Queues one line; the receiver resolves once its batch is written.
    fn send_line(sender: &mpsc::UnboundedSender<Pending>) -> oneshot::Receiver<Result<(), String>> {
        let (written, done) = oneshot::channel();
        let line = b"{}\n".to_vec();
        sender.send(Pending { line, written }).unwrap();
        done
    }

    /// Runs the writer and `records` (given the writer's sender) on a
    /// one-thread runtime, as sidekey runs on one core; the lines per batch.
    /// Fails rather than hangs if the records never complete.
    fn batches_of<F, R>(records: F) -> Vec<usize>
    where
        F: FnOnce(mpsc::UnboundedSender<Pending>) -> R,
        R: Future<Output = ()>,
    {
        let batches = Batches::default();
        one_thread_runtime().block_on(async {
            let (sender, receiver) = mpsc::unbounded_channel();
            let writer = Writer {
                receiver,
                healthy: Arc::default(),
                queued: Arc::default(),
            };
            let writer = tokio::spawn(writer.run(batches.clone()));
            tokio::time::timeout(Duration::from_secs(10), records(sender))
                .await
                .expect("every record is written");
            writer.await.unwrap();
        });
        batches.0.lock().unwrap().clone()
    }

    #[test]
    fn requests_that_reach_their_record_while_a_batch_gathers_share_its_sync() {
        // Each request queues its record and then makes the next request
        // ready, as responses arriving one after another do. Queuing the
        // record wakes the writer first, so without the gathering rounds it
        // would take each record alone. Four, the first and one per round:
        // tokio promises no more than that a yielding task goes to the back
        // of the queue, behind the one request then ready.
        let requests = 4;
        let batches = batches_of(|sender| async move {
            let (first, mut ready) = oneshot::channel::<()>();
            let mut tasks = Vec::new();
            for _ in 0..requests {
                let (next, next_ready) = oneshot::channel::<()>();
                let sender = sender.clone();
                tasks.push(tokio::spawn(async move {
                    ready.await.unwrap();
                    let done = send_line(&sender);
                    let _ = next.send(());
                    done.await.unwrap().unwrap();
                }));
                ready = next_ready;
            }
            // Let every request be polled once and wait, so that none is
            // already ready, and ahead of the writer, when the first is woken.
            tokio::task::yield_now().await;
            first.send(()).unwrap();
            for task in tasks {
                task.await.unwrap();
            }
        });
        assert_eq!(batches, vec![requests]);
    }

    fn one_thread_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    /// A log to `dir/audit.jsonl` whose sink is marked failing.
    fn failing_log(dir: &std::path::Path) -> AuditLog {
        let log = AuditLog::new(&AuditSink::File("audit.jsonl".into()), OnFailure::Deny, dir);
        log.healthy.store(false, Ordering::Relaxed);
        log
    }

    #[test]
    fn a_failing_sink_is_not_waited_on_and_is_trusted_again_once_a_batch_lands() {
        let dir = tempfile::tempdir().unwrap();
        let log = failing_log(dir.path());
        one_thread_runtime().block_on(async {
            let refused = log.record(&AuditEvent::default()).await.unwrap_err();
            assert!(refused.to_string().contains("record queued"), "{refused}");
            // The writer still writes it, and the sink is trusted again.
            for _ in 0..500 {
                if log.is_healthy() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(log.is_healthy());
            log.record(&AuditEvent::default()).await.unwrap();
        });
        let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn a_failing_sink_queues_records_only_up_to_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let log = failing_log(dir.path());
        log.queued
            .store(MAX_QUEUED_WHILE_FAILING, Ordering::Relaxed);
        let dropped = one_thread_runtime()
            .block_on(log.record(&AuditEvent::default()))
            .unwrap_err();
        assert!(dropped.to_string().contains("record dropped"), "{dropped}");
        assert!(log.writer.get().is_none(), "the record was queued");
    }

    #[test]
    fn a_record_that_can_only_follow_a_written_one_gets_its_own_sync() {
        // The writer never holds a batch open for records still to come: the
        // second line is sent only once the first is written.
        let batches = batches_of(|sender| async move {
            send_line(&sender).await.unwrap().unwrap();
            send_line(&sender).await.unwrap().unwrap();
        });
        assert_eq!(batches, vec![1, 1]);
    }

    /// `run` and `exec` may append to one log: a batch waits for the other
    /// process's lock, so the start it measures (and cuts back to if it
    /// fails) is past everything the other has written.
    #[test]
    fn a_batch_is_written_under_the_logs_lock_and_ends_a_torn_line_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, b"{\"whole\":1}\n{\"torn").unwrap();
        let other = File::open(&path).unwrap();
        other.lock().unwrap();
        let open = open_log(&path).unwrap();
        let writer = std::thread::spawn(move || append_locked(&open, b"{\"next\":2}\n"));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!writer.is_finished(), "wrote without the lock");
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"whole\":1}\n{\"torn");
        other.unlock().unwrap();
        writer.join().unwrap().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"whole\":1}\n{\"torn\n{\"next\":2}\n"
        );
    }
}
