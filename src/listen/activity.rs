//! Idle detection for agent connections: a connection is idle when no
//! request is being handled and no byte has moved for the idle timeout.
//! A stream that keeps sending (SSE, a large download) is never idle.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared between a connection's IO and its service.
#[derive(Debug)]
pub(crate) struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// Marks a request in progress until the guard drops.
    pub(crate) fn busy(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::Relaxed);
        BusyGuard(self.clone())
    }

    /// Resolves once the connection has been idle for `limit`.
    pub(crate) async fn idle_for(&self, limit: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let idle = self.origin.elapsed().saturating_sub(last);
            if idle >= limit && self.busy.load(Ordering::Relaxed) == 0 {
                return;
            }
            let wait = limit.saturating_sub(idle).max(Duration::from_millis(100));
            tokio::time::sleep(wait).await;
            // A request that was busy may have just finished; count from now.
            if self.busy.load(Ordering::Relaxed) > 0 {
                self.touch();
            }
        }
    }
}

#[derive(Debug)]
pub struct BusyGuard(Arc<Activity>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An IO that records when bytes move.
#[derive(Debug)]
pub(crate) struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    pub(crate) fn new(inner: T, activity: Arc<Activity>) -> Self {
        activity.touch();
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How long a tunnel or WebSocket must be quiet, once sidekey is stopping,
/// to be taken as between requests and closed.
const QUIET_WHEN_STOPPING: Duration = Duration::from_secs(1);

/// A connection's place under `limits.max_connections`, held for as long as
/// the connection or anything it was upgraded into (a CONNECT tunnel, a
/// WebSocket) lives, so tunnels count against the cap and go idle too.
/// It is also counted by graceful shutdown, which thus waits for the
/// requests inside tunnels as for those on the listener.
#[derive(Debug)]
pub struct ConnSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _counted: hyper_util::server::graceful::Watcher,
    stopping: tokio::sync::watch::Receiver<bool>,
    open: prometheus_client::metrics::gauge::Gauge,
    activity: Arc<Activity>,
    idle_timeout: Duration,
}

impl ConnSlot {
    pub(crate) fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        counted: hyper_util::server::graceful::Watcher,
        stopping: tokio::sync::watch::Receiver<bool>,
        open: prometheus_client::metrics::gauge::Gauge,
        activity: Arc<Activity>,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        open.inc();
        Arc::new(Self {
            _permit: permit,
            _counted: counted,
            stopping,
            open,
            activity,
            idle_timeout,
        })
    }

    /// Marks a request in progress (so a slow upstream is not idleness).
    pub fn busy(&self) -> BusyGuard {
        self.activity.busy()
    }

    /// Resolves once nothing has moved for the idle timeout.
    pub async fn idle(&self) {
        self.activity.idle_for(self.idle_timeout).await;
    }

    /// Resolves once sidekey is stopping (a dropped sender means stopping
    /// too).
    pub async fn stopping(&self) {
        let mut stopping = self.stopping.clone();
        let _ = stopping.wait_for(|stop| *stop).await;
    }

    /// As [`ConnSlot::idle`] or, when sidekey is stopping, once no request
    /// is in progress and nothing has moved for a moment: for a blind
    /// tunnel or a WebSocket, whose requests sidekey cannot see end.
    pub async fn idle_or_quiet_while_stopping(&self) {
        tokio::select! {
            () = self.idle() => {}
            () = async {
                self.stopping().await;
                self.activity.idle_for(QUIET_WHEN_STOPPING).await;
            } => {}
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}
