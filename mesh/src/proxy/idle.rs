//! When a connection is idle: no request in flight and nothing moved for a while. Bytes count on
//! HTTP/1.1 and on upgraded tunnels; on h2 they do not, because the protocol's own PINGs would
//! keep every connection alive (HAProxy's `timeout client`, with h2 in mind).

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// What a connection has been doing.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    bytes_count: AtomicBool,
}

impl Activity {
    /// Starts now, counting bytes.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            bytes_count: AtomicBool::new(true),
        })
    }

    /// From now on only requests count (h2: PING frames are bytes too).
    pub fn ignore_bytes(&self) {
        self.bytes_count.store(false, Ordering::Relaxed);
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn touch_bytes(&self) {
        if self.bytes_count.load(Ordering::Relaxed) {
            self.touch();
        }
    }

    /// A body frame moved, either way: the request is not stalled.
    pub fn frame(&self) {
        self.touch();
    }

    /// Resolves once nothing moved for `limit`, requests in flight or not: a stall.
    pub async fn quiet_for(&self, limit: Duration) {
        loop {
            let deadline = self.quiet_until(limit);
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// When `limit` without anything moving will have passed, as things stand.
    fn quiet_until(&self, limit: Duration) -> Instant {
        let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        last.checked_add(limit)
            .unwrap_or_else(|| Instant::now() + limit)
    }

    /// A request started; it is in flight until the guard (and whatever holds it, such as the
    /// response body) is dropped.
    pub fn request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        RequestGuard(self.clone())
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Resolves once nothing is in flight and nothing happened for `limit`.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let deadline = self.quiet_until(limit);
            let now = Instant::now();
            if self.in_flight.load(Ordering::Relaxed) == 0 && now >= deadline {
                return;
            }
            if self.in_flight.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep_until(deadline).await;
            } else {
                // A request is in flight: look again later.
                tokio::time::sleep(limit.min(Duration::from_secs(60))).await;
            }
        }
    }
}

/// A request in flight (see [`Activity::request`]).
#[derive(Debug)]
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A body that keeps its request in flight until it ends.
#[derive(Debug)]
pub struct GuardedBody<B> {
    inner: B,
    _guard: RequestGuard,
}

impl<B> GuardedBody<B> {
    /// `inner`, holding `guard` until dropped.
    pub fn new(inner: B, guard: RequestGuard) -> Self {
        Self {
            inner,
            _guard: guard,
        }
    }
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for GuardedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self._guard.0.frame();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps an IO and records activity on every read or write that moves bytes.
#[derive(Debug)]
pub struct IdleIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> IdleIo<T> {
    /// Wrap `inner`, reporting to `activity`.
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }

    /// The wrapped IO.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch_bytes();
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch_bytes();
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch_bytes();
        }
        res
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_fires_only_after_silence() {
        let (a, mut b) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut io = IdleIo::new(a, activity.clone());
        tokio::time::advance(Duration::from_secs(4)).await;
        b.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 1];
        io.read_exact(&mut buf).await.unwrap();
        // 4s passed, but bytes just moved: not idle for another 5s.
        let idle = tokio::time::timeout(
            Duration::from_secs(4),
            activity.idle_for(Duration::from_secs(5)),
        )
        .await;
        assert!(idle.is_err());
        tokio::time::timeout(
            Duration::from_secs(2),
            activity.idle_for(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_are_never_idle_and_h2_bytes_do_not_count() {
        let (a, mut b) = tokio::io::duplex(64);
        let activity = Activity::new();
        activity.ignore_bytes();
        let mut io = IdleIo::new(a, activity.clone());
        let guard = activity.request();
        tokio::time::advance(Duration::from_secs(100)).await;
        let idle = tokio::time::timeout(
            Duration::from_secs(100),
            activity.idle_for(Duration::from_secs(5)),
        )
        .await;
        assert!(idle.is_err(), "a request in flight is not idle");
        drop(guard);
        // PINGs (bytes) after the request do not keep the connection alive.
        b.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        io.read_exact(&mut buf).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(6),
            activity.idle_for(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    }

    #[test]
    fn huge_limits_do_not_overflow() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let activity = Activity::new();
            let idle = tokio::time::timeout(
                Duration::from_millis(10),
                activity.idle_for(Duration::from_secs(u64::MAX / 4)),
            )
            .await;
            assert!(idle.is_err());
        });
    }
}
