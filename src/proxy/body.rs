//! Bodies that cross the proxy: counted on the way in, scrubbed on the way out.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

use crate::scrub::{ScrubStream, Scrubber};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body sidekey sends, to the agent or to an upstream.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// The agent's request body on its way upstream: counts the data bytes,
/// drops trailers (a trailer could carry a credential slot past injection,
/// and no upstream sidekey serves needs request trailers), and marks the
/// agent's own errors so they are told apart from the upstream's.
#[derive(Debug)]
pub struct AgentBody<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> AgentBody<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

/// The agent's request body failed: malformed chunking, a connection cut
/// short, or the body limit.
#[derive(Debug, thiserror::Error)]
#[error("request body: {0}")]
pub struct AgentBodyError(#[source] BoxError);

impl<B> HttpBody for AgentBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        loop {
            match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Err(_trailers) => continue,
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(AgentBodyError(e.into()).into()))),
                None => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body scrubbed as it streams.
#[derive(Debug)]
pub struct Scrubbed<B> {
    inner: B,
    scrubber: Arc<Scrubber>,
    stream: ScrubStream,
    /// Trailers held while the carry-over is flushed ahead of them.
    pending_trailers: Option<HeaderMap>,
    done: bool,
}

impl<B> Scrubbed<B> {
    pub fn new(inner: B, scrubber: Arc<Scrubber>) -> Self {
        Self {
            inner,
            scrubber,
            stream: ScrubStream::default(),
            pending_trailers: None,
            done: false,
        }
    }
}

impl<B> HttpBody for Scrubbed<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(trailers) = this.pending_trailers.take() {
            this.done = true;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.stream.push(&this.scrubber, data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => {
                        let Ok(mut trailers) = frame.into_trailers() else {
                            continue;
                        };
                        super::scrub_headers(&mut trailers, &this.scrubber);
                        let rest = this.stream.finish(&this.scrubber);
                        if rest.is_empty() {
                            this.done = true;
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        this.pending_trailers = Some(trailers);
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                },
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                None => {
                    this.done = true;
                    let rest = this.stream.finish(&this.scrubber);
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending_trailers.is_none()
    }
}
