//! Serving the router on a listener, with the limits `axum::serve` does not offer:
//!
//! - at most `max_connections` open at once. When all are taken, the connection that has been
//!   idle longest (no request being handled, nothing moved) is closed to make room for the new
//!   one; only when every connection is busy with a request is the new one refused. Sockets
//!   opened and left silent cannot lock health checks or real clients out.
//! - a connection must start a request within the header-read timeout of opening (HTTP/1 and
//!   HTTP/2 alike: a socket that sends nothing, or only HTTP/2's preface, is closed), and is
//!   closed once nothing has moved on it for `idle_timeout` while no request is being handled
//!   (a keep-alive connection left open, a response the client stopped reading). A request
//!   being handled is never cut: its own limits (a body's minimum rate) apply.
//! - hyper's header-read timeout: a client that trickles its request headers is cut off.
//!
//! HTTP/1.1 and HTTP/2; on shutdown open connections finish their requests (live event streams
//! end themselves) and the function returns.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How connections are limited.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// What a connection's watchdog knows of it.
struct Activity {
    opened: Instant,
    /// Milliseconds after `opened` that a byte last moved either way.
    last_io_ms: AtomicU64,
    in_flight: AtomicUsize,
    requests: AtomicUsize,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            opened: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_io_ms.store(ms, Ordering::Relaxed);
    }

    fn since_io(&self) -> Duration {
        let last = Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }

    /// How long it has been idle, or `None` while a request is being handled.
    fn idle_for(&self) -> Option<Duration> {
        (self.in_flight.load(Ordering::SeqCst) == 0).then(|| self.since_io())
    }

    /// Resolves when the connection should be closed: no request started within `first`, or
    /// nothing moved for `idle` while no request was being handled.
    async fn until_idle(&self, first: Duration, idle: Duration) {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                continue;
            }
            if self.requests.load(Ordering::SeqCst) == 0 {
                if self.opened.elapsed() > first {
                    return;
                }
            } else if self.since_io() > idle {
                return;
            }
        }
    }
}

/// A stream that records when bytes move on it.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The open connections, by number: what [`serve`] closes to make room.
#[derive(Default)]
struct Open {
    by_id: std::sync::Mutex<std::collections::HashMap<u64, (Arc<Activity>, CancellationToken)>>,
    next_id: AtomicU64,
}

impl Open {
    /// A new connection's watch state and the token that closes it; its number, to remove it.
    fn register(&self) -> (u64, Arc<Activity>, CancellationToken) {
        let (activity, close) = (Activity::new(), CancellationToken::new());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, (activity.clone(), close.clone()));
        (id, activity, close)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, (Arc<Activity>, CancellationToken)>>
    {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a new connection: a free one, or the idlest connection's once it is closed;
    /// `None` when every connection is handling a request.
    async fn admit(&self, slots: &Arc<Semaphore>) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        if !self.evict_idlest() {
            return None;
        }
        // the evicted connection's task gives its slot back as it ends
        tokio::time::timeout(Duration::from_secs(1), slots.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// Closes the connection idle longest, if any is idle; whether one was.
    fn evict_idlest(&self) -> bool {
        let open = self.lock();
        let idlest = open
            .values()
            .filter_map(|(a, close)| Some((a.idle_for()?, close)))
            .max_by_key(|(idle, _)| *idle);
        match idlest {
            Some((_, close)) => {
                close.cancel();
                true
            }
            None => false,
        }
    }
}

/// `router` as one connection's service: each request counted in `activity` while it is
/// handled, and told the peer's address.
fn counted_service(
    router: Router,
    activity: Arc<Activity>,
    peer: std::net::SocketAddr,
) -> impl tower::Service<
    Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |req: Request<Incoming>| {
        let (router, activity) = (router.clone(), activity.clone());
        async move {
            activity.requests.fetch_add(1, Ordering::SeqCst);
            activity.in_flight.fetch_add(1, Ordering::SeqCst);
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            let response = router.oneshot(req).await.into_response();
            activity.in_flight.fetch_sub(1, Ordering::SeqCst);
            activity.touch();
            Ok::<_, std::convert::Infallible>(response)
        }
    })
}

/// Serves `router` until `stop` is cancelled, then waits for open requests to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let open = Arc::new(Open::default());
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // out of file descriptors and the like: wait rather than spin
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Some(slot) = open.admit(&slots).await else {
            tracing::warn!(%peer, limit = limits.max_connections, "connection refused: every connection is handling a request");
            continue;
        };
        let (id, activity, close) = open.register();
        let service = counted_service(router.clone(), activity.clone(), peer);
        let io = TokioIo::new(Watched {
            inner: stream,
            activity: activity.clone(),
        });
        let conn = builder
            .serve_connection_with_upgrades(io, TowerToHyperService::new(service))
            .into_owned();
        let conn = graceful.watch(conn);
        let (first, idle) = (limits.header_read_timeout, limits.idle_timeout);
        let open = open.clone();
        tokio::spawn(async move {
            tokio::select! {
                ended = conn => if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                },
                _ = activity.until_idle(first, idle) => {
                    tracing::debug!(%peer, "closing an idle connection");
                }
                _ = close.cancelled() => {
                    tracing::debug!(%peer, "closing the idlest connection to make room");
                }
            }
            open.remove(id);
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
