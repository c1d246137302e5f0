//! Serving the agent API over TCP (optionally TLS) with bounds a slow or hostile client
//! cannot push past:
//!
//! - a **connection cap**: at the cap the hub stops accepting, so further connections wait
//!   in the kernel's listen backlog instead of costing the hub memory;
//! - a **header-read timeout**: a request's head must arrive in full within it, counted from
//!   the connection's start (after the TLS handshake, which has the same limit) or from the
//!   first byte of a later request;
//! - an **idle timeout**: a keep-alive connection with no request in flight, and no byte
//!   read or written, is closed after it. A request in flight, such as a long-poll holding
//!   `GET desired?wait=60`, is never cut by either timeout (its deadline is the request's own).
//!
//! hyper's own header timeout also runs between requests, which would make the idle
//! timeout the header timeout; so both are kept here, per connection, from what its I/O
//! and its requests do.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum_server::accept::{Accept, DefaultAcceptor};
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::{Service, service_fn};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::metrics::ApiMetrics;

/// Largest buffer of a connection, and so the largest request head: agents send heads of a
/// few hundred bytes, and hyper's default (~400 KiB) times the connection cap would be
/// gigabytes a slow client could make the hub hold. Longer heads are answered 431.
const MAX_BUFFER: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    /// Time allowed for a request's head (and for a TLS handshake).
    pub header_read_timeout: Duration,
    /// Time a connection may sit between requests without any I/O.
    pub idle_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// On shutdown, time requests in flight get to finish.
    pub grace: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            header_read_timeout: Duration::from_secs(10),
            // Longer than the agent's HTTP client keeps an idle connection (90 s), so the
            // client, not the hub, closes it: no request races a closing connection.
            idle_timeout: Duration::from_secs(120),
            // Two connections per agent (long-poll, and heartbeats or fetches) for 10,000
            // agents, and room to spare; ~30 KiB each.
            max_connections: 25_000,
            grace: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` until `shutdown`, then lets requests in flight finish for up
/// to `limits.grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<RustlsConfig>,
    limits: ServeLimits,
    metrics: ApiMetrics,
    shutdown: impl Future<Output = ()>,
) {
    let tls = tls.map(|config| {
        RustlsAcceptor::new(http1_only(&config)).handshake_timeout(limits.header_read_timeout)
    });
    let (stop_tx, stop) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    let mut capped = false;
    let mut warned: Option<Instant> = None;
    loop {
        let at_cap = connections.len() >= limits.max_connections.max(1);
        if at_cap && !capped {
            metrics.connection_cap_reached.inc();
            // A fleet at the cap touches it on every close: say so once a minute.
            if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                warned = Some(Instant::now());
                warn!(
                    connections = connections.len(),
                    "the agent API is at its connection cap; new connections wait"
                );
            }
        }
        capped = at_cap;
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept(), if !at_cap => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let connection = Connection {
                        peer,
                        app: app.clone(),
                        limits,
                        metrics: metrics.clone(),
                        stop: stop.clone(),
                    };
                    match &tls {
                        Some(acceptor) => connections.spawn(connection.tls(acceptor.clone(), stream)),
                        None => connections.spawn(connection.serve(stream)),
                    };
                }
                Err(err) => {
                    // Out of file descriptors, say: wait, as the connections in flight end.
                    warn!(error = %err, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
        metrics.connections.set(connections.len() as i64);
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.grace, async {
        while connections.join_next().await.is_some() {
            metrics.connections.set(connections.len() as i64);
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = connections.len(),
            "closing agent API connections still busy after the grace period"
        );
    }
    connections.shutdown().await;
    metrics.connections.set(0);
}

/// `config` offering only HTTP/1.1 in ALPN: axum-server's default also offers h2, which
/// this server does not speak (agents use HTTP/1.1).
fn http1_only(config: &RustlsConfig) -> RustlsConfig {
    let mut server = (*config.get_inner()).clone();
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    RustlsConfig::from_config(Arc::new(server))
}

struct Connection {
    /// The client's address, given to handlers as `ConnectInfo` (the audit of failed
    /// authentications names it).
    peer: std::net::SocketAddr,
    app: Router,
    limits: ServeLimits,
    metrics: ApiMetrics,
    stop: watch::Receiver<bool>,
}

impl Connection {
    async fn tls<S>(self, acceptor: RustlsAcceptor<DefaultAcceptor>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match acceptor.accept(stream, ()).await {
            Ok((stream, ())) => self.serve(stream).await,
            Err(err) => {
                debug!(error = %err, "TLS handshake failed");
                self.metrics.connection_closed_because("tls_handshake");
            }
        }
    }

    async fn serve<S>(mut self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new(Instant::now()));
        let app = TowerToHyperService::new(self.app);
        let peer = axum::extract::ConnectInfo(self.peer);
        let service = service_fn({
            let activity = activity.clone();
            move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(peer);
                let busy = Busy::start(activity.clone());
                let response = app.call(request);
                async move {
                    let response = response.await;
                    drop(busy);
                    response
                }
            }
        });
        let io = TokioIo::new(Watched {
            inner: stream,
            activity: activity.clone(),
        });
        let mut connection = pin!(
            http1::Builder::new()
                .max_buf_size(MAX_BUFFER)
                // Otherwise hyper reads on while a response is pending, to notice the
                // client leaving, into a fresh 8 KiB buffer per parked long-poll (a third of
                // the hub's memory at 10,000 agents). A client that leaves is noticed when its
                // long-poll answers instead, within the longest wait.
                .half_close(true)
                .serve_connection(io, service)
        );
        let mut stopping = *self.stop.borrow();
        if stopping {
            connection.as_mut().graceful_shutdown();
        }
        loop {
            let changed = activity.changed.notified();
            let deadline = activity.deadline(&self.limits);
            let expiry = async {
                match deadline {
                    Some((at, _)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(err) = served {
                        debug!(error = %err, "agent API connection ended with an error");
                    }
                    return;
                }
                () = changed => {}
                () = expiry => {
                    // Reads and writes move deadlines without a notification: look again.
                    if let Some((at, reason)) = activity.deadline(&self.limits)
                        && at <= Instant::now()
                    {
                        debug!(reason, "closing an agent API connection");
                        self.metrics.connection_closed_because(reason);
                        return;
                    }
                }
                _ = self.stop.changed(), if !stopping => {
                    stopping = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// What a connection is doing, as its timeouts need to know.
struct Activity {
    state: Mutex<State>,
    /// Woken when a request starts or ends, or a request's head starts to arrive.
    changed: Notify,
}

struct State {
    /// Requests whose response is not yet produced (a parked long-poll is one).
    in_flight: usize,
    /// Since when the connection has waited for a request's head, if it has.
    head_since: Option<Instant>,
    /// Last I/O, or the end of the last request, while no request is in flight.
    quiet_since: Instant,
}

impl Activity {
    fn new(now: Instant) -> Activity {
        Activity {
            state: Mutex::new(State::new(now)),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        super::lock(&self.state)
    }

    fn deadline(&self, limits: &ServeLimits) -> Option<(Instant, &'static str)> {
        self.lock().deadline(limits)
    }

    fn read(&self) {
        let started = self.lock().read(Instant::now());
        if started {
            self.changed.notify_one();
        }
    }

    fn wrote(&self) {
        self.lock().wrote(Instant::now());
    }
}

impl State {
    /// A new connection owes its first request's head at once.
    fn new(now: Instant) -> State {
        State {
            in_flight: 0,
            head_since: Some(now),
            quiet_since: now,
        }
    }

    /// When the connection is to be closed, and why, unless something happens first.
    fn deadline(&self, limits: &ServeLimits) -> Option<(Instant, &'static str)> {
        if self.in_flight > 0 {
            return None;
        }
        Some(match self.head_since {
            Some(since) => (since + limits.header_read_timeout, "header_timeout"),
            None => (self.quiet_since + limits.idle_timeout, "idle_timeout"),
        })
    }

    /// Bytes arrived; true when they start a request's head.
    fn read(&mut self, now: Instant) -> bool {
        let starts = self.in_flight == 0 && self.head_since.is_none();
        if starts {
            self.head_since = Some(now);
        }
        starts
    }

    fn wrote(&mut self, now: Instant) {
        if self.in_flight == 0 {
            self.quiet_since = now;
        }
    }

    fn request_started(&mut self) {
        self.in_flight += 1;
        self.head_since = None;
    }

    fn request_ended(&mut self, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.in_flight == 0 {
            self.quiet_since = now;
        }
    }
}

/// A request being answered; dropped when its response is produced (or abandoned).
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: Arc<Activity>) -> Busy {
        activity.lock().request_started();
        activity.changed.notify_one();
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.lock().request_ended(Instant::now());
        self.0.changed.notify_one();
    }
}

/// A connection's stream, telling its [`Activity`] about reads and writes.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
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
    use super::*;

    const LIMITS: ServeLimits = ServeLimits {
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(120),
        max_connections: 1,
        grace: Duration::from_secs(1),
    };

    #[test]
    fn deadlines_follow_what_the_connection_does() {
        let start = Instant::now();
        let at = |seconds| start + Duration::from_secs(seconds);
        let mut state = State::new(start);
        // A new connection owes a request head.
        assert_eq!(state.deadline(&LIMITS), Some((at(10), "header_timeout")));
        // A request in flight (a long-poll) has no connection deadline at all, and reads
        // (of its body, or of the next request) do not start one.
        state.request_started();
        assert!(!state.read(at(1)));
        assert_eq!(state.deadline(&LIMITS), None);
        // Between requests, the idle timeout runs from the end of the last one...
        state.request_ended(at(300));
        assert_eq!(state.deadline(&LIMITS), Some((at(420), "idle_timeout")));
        // ...or from the last byte written (a response still being sent).
        state.wrote(at(305));
        assert_eq!(state.deadline(&LIMITS), Some((at(425), "idle_timeout")));
        // The first byte of the next request starts its header timeout; later ones do not
        // move it.
        assert!(state.read(at(310)));
        assert!(!state.read(at(313)));
        assert_eq!(state.deadline(&LIMITS), Some((at(320), "header_timeout")));
        // Two requests at once (pipelined): the connection is busy until both end.
        state.request_started();
        state.request_started();
        state.request_ended(at(330));
        assert_eq!(state.deadline(&LIMITS), None);
        state.request_ended(at(331));
        assert_eq!(state.deadline(&LIMITS), Some((at(451), "idle_timeout")));
    }
}
