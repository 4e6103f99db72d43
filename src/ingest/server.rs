//! Listeners: loopback TCP and the Unix socket, one accept loop each.
//!
//! Bounded: a semaphore caps connections over both listeners (`server.max_connections`). An
//! accept loop takes a slot for each connection it accepts; when none is free it holds the one
//! it accepted (unserved) and accepts nothing more, so the kernel backlog holds the rest until
//! a connection closes. A client must send its headers within `header_timeout` (hyper's timer,
//! which also closes idle keep-alive connections) and in at most `HTTP_READ_BUFFER` bytes, and
//! its body within `body_timeout` (in the handlers); a client that takes nothing we write to
//! it (its replies) for `body_timeout` is cut off (`WriteStall`), so it cannot keep a slot or
//! hold up a stop.
//!
//! On the Unix socket the protocol is chosen per connection from its first byte: an ASCII
//! capital letter starts an HTTP request line (`POST /v1/events HTTP/1.1`); anything else is
//! NDJSON (`ndjson.rs`). A connection that has sent nothing yet is idle, and waits up to
//! `idle_timeout` for its first byte.
//!
//! The socket file: a stale one (no process answers on it) is removed before binding; a live
//! one means another daemon uses it, and we refuse to start naming its pid; a path that is not
//! a socket is never removed. At exit we remove the file only if it is still the one we bound.
//!
//! Stop: when `shutdown` is cancelled the loops stop accepting, every HTTP connection is told
//! to finish the request it is serving and close, and NDJSON connections stop reading new
//! lines but answer the ones already read. A request body still arriving `BODY_STOP_GRACE`
//! after that is refused `503` (`shutting_down`), and a connection still busy `STOP_GRACE`
//! after it is dropped (its client got no ack, so it will retry). The caller waits on the returned tracker.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::browser::{Guarded, HostNames};
use super::ndjson::{self, NdjsonLimits};
use super::parse_errors::JsonParseErrors;
use super::unix_stream::LeanUnix;
use super::Ingest;
use crate::config::ServerConfig;

/// Errors binding the listeners (reported before READY=1, so startup fails cleanly).
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// (`error`, not `source`: the message already says it, and a `source` would print twice
    /// in the one-line error.)
    #[error("cannot listen on {addr}: {error}")]
    Tcp { addr: String, error: io::Error },
    #[error("unix socket {path}: {problem}")]
    Unix { path: PathBuf, problem: String },
}

/// The bound listeners, ready to serve.
pub struct Listeners {
    /// Usually one; socket activation may hand over several (`ListenStream=127.0.0.1:8411`
    /// and `ListenStream=[::1]:8411`), and each is served.
    pub tcp: Vec<TcpListener>,
    /// The sockets, each with its path and whether we bound it (and so remove it on exit) or
    /// systemd handed it to us (and keeps it).
    pub unix: Vec<(UnixListener, PathBuf, bool)>,
}

impl Listeners {
    /// Binds what the config asks for. Inherited sockets (systemd socket activation) are
    /// used when present, every one of them: the TCP ones for HTTP, the Unix ones for the
    /// socket; the config's address of a kind is bound only when none of that kind came.
    pub async fn bind(cfg: &ServerConfig) -> Result<Listeners, BindError> {
        let (mut tcp, mut unix) = (Vec::new(), Vec::new());
        for fd in crate::ops::systemd::listen_fds() {
            match fd {
                crate::ops::systemd::Inherited::Tcp(l) => {
                    // The socket unit's address is held to the config's rule: an edited
                    // `ListenStream=8411` (every interface) would otherwise expose ingest,
                    // which has no authentication, to the network.
                    if let Ok(addr) = l.local_addr() {
                        inherited_allowed(addr, cfg)?;
                    }
                    l.set_nonblocking(true).ok();
                    tcp.extend(TcpListener::from_std(l).ok());
                }
                crate::ops::systemd::Inherited::Unix(l) => {
                    l.set_nonblocking(true).ok();
                    let path = l
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
                        .unwrap_or_default();
                    unix.extend(UnixListener::from_std(l).ok().map(|u| (u, path, false)));
                }
            }
        }
        if tcp.is_empty() {
            if let Some(addr) = cfg.http_listen {
                tcp.push(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|error| BindError::Tcp {
                            addr: addr.to_string(),
                            error,
                        })?,
                );
            }
        }
        if unix.is_empty() {
            if let Some(path) = &cfg.unix_socket {
                unix.push((bind_unix(path, cfg).await?, path.clone(), true));
            }
        }
        Ok(Listeners { tcp, unix })
    }

    /// The HTTP addresses served.
    pub fn http_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.tcp
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The socket paths served.
    pub fn unix_paths(&self) -> Vec<PathBuf> {
        self.unix.iter().map(|(_, p, _)| p.clone()).collect()
    }
}

/// An inherited TCP socket must be on a loopback address, as `server.http_listen` must,
/// unless `server.allow_non_loopback` is set.
fn inherited_allowed(addr: std::net::SocketAddr, cfg: &ServerConfig) -> Result<(), BindError> {
    if addr.ip().is_loopback() || cfg.allow_non_loopback {
        return Ok(());
    }
    Err(BindError::Tcp {
        addr: addr.to_string(),
        error: io::Error::other(
            "the socket systemd handed over is not on a loopback address; set server.allow_non_loopback = true to expose it",
        ),
    })
}

async fn bind_unix(path: &Path, cfg: &ServerConfig) -> Result<UnixListener, BindError> {
    let err = |problem: String| BindError::Unix {
        path: path.to_path_buf(),
        problem,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| err(format!("cannot create its directory: {e}")))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(err(
                "exists and is not a socket; not removing it (choose another server.unix_socket)"
                    .into(),
            ));
        }
        Ok(_) => match UnixStream::connect(path).await {
            // A live daemon answers on it.
            Ok(s) => return Err(err(format!("in use by {}", describe_peer(&s)))),
            // A stale file from a crash: nobody listens.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
                    .map_err(|e| err(format!("cannot remove the stale socket file: {e}")))?;
            }
            Err(e) => {
                return Err(err(format!(
                    "exists and cannot be probed ({e}); remove it if no llmlogd uses it"
                )))
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let l = UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(cfg.socket_mode))
        .map_err(|e| err(format!("cannot set its mode: {e}")))?;
    if let Some(group) = &cfg.socket_group {
        chown_group(path, group).map_err(err)?;
    }
    Ok(l)
}

/// "another running llmlogd (pid 123)", from the peer's credentials and /proc.
fn describe_peer(s: &UnixStream) -> String {
    match s.peer_cred().ok().and_then(|c| c.pid()) {
        Some(pid) => {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|n| n.trim().to_string())
                .ok()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "process".into());
            format!("another running {name} (pid {pid})")
        }
        None => "another running process".into(),
    }
}

fn chown_group(path: &Path, group: &str) -> Result<(), String> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let cgroup = CString::new(group).map_err(|_| format!("bad group name {group:?}"))?;
    // SAFETY: getgrnam returns a pointer into static storage or null; we read gr_gid at once.
    let gid = unsafe {
        let g = libc::getgrnam(cgroup.as_ptr());
        if g.is_null() {
            return Err(format!("group {group:?} does not exist"));
        }
        (*g).gr_gid
    };
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| "bad path".to_string())?;
    // SAFETY: a valid C string path; uid -1 leaves the owner unchanged.
    let rc = unsafe { libc::chown(cpath.as_ptr(), u32::MAX, gid) };
    if rc != 0 {
        return Err(format!(
            "cannot give it to group {group:?}: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Everything a connection needs.
#[derive(Clone)]
pub struct ServeContext {
    pub router: Router,
    /// What a TCP connection's requests are checked against (`browser`): the Unix socket is
    /// out of a web page's reach.
    pub hosts: Arc<HostNames>,
    pub ingest: Arc<Ingest>,
    pub header_timeout: std::time::Duration,
    pub ndjson: NdjsonLimits,
    pub connections: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

impl ServeContext {
    /// How long a client may leave what we write to it unread: `server.body_timeout`, the
    /// same patience we have for a client sending its request.
    fn write_timeout(&self) -> Duration {
        self.ndjson.line_timeout
    }
}

/// Starts the accept loops; returns at once. Connections run on `ctx.tracker`.
pub fn spawn(listeners: Listeners, ctx: ServeContext) {
    for l in listeners.tcp {
        let c = ctx.clone();
        ctx.tracker
            .spawn(async move { accept_loop(c, AnyListener::Tcp(l)).await });
    }
    for (l, path, owned) in listeners.unix {
        let c = ctx.clone();
        // The file as we bound it, to recognise it at exit.
        let ours = std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        ctx.tracker.spawn(async move {
            accept_loop(c, AnyListener::Unix(l)).await;
            // Remove our socket file on the way out, so the next start finds none; an
            // inherited one belongs to systemd, which keeps it for the next start. A file
            // someone put in its place since (another daemon's) is not ours to remove.
            let still_ours = std::fs::symlink_metadata(&path)
                .ok()
                .map(|m| (m.dev(), m.ino()))
                .is_some_and(|id| Some(id) == ours);
            if owned && still_ours {
                let _ = std::fs::remove_file(&path);
            }
        });
    }
}

/// How long a connection may go on after stop (see the module doc): most of the daemon's
/// ingest grace (`app::INGEST_GRACE`, 10 s), so a request whose body is still arriving at stop
/// is answered: stored and `202` if it arrives within [`BODY_STOP_GRACE`], else `503`
/// (`shutting_down`). At 3 s, and with no reply, a slow upload was cut off unanswered.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(8);

/// How long after stop a request body may go on arriving (`http::read_body`); a second under
/// [`STOP_GRACE`], so the refusal goes out before the connection is dropped.
pub(crate) const BODY_STOP_GRACE: Duration = Duration::from_secs(7);

/// Largest read buffer of one HTTP connection, so the most its request headers may take.
/// hyper's default (~400 KiB) let 1,000 connections trickling in long headers hold ~470 MiB;
/// at 16 KiB the 1,024 connections allowed hold at most 16 MiB. Real clients send well under
/// 4 KiB of headers; a request with more than this gets hyper's `431` (with a JSON body, see
/// `parse_errors`). Bodies are read through it in parts, and held within the shared body
/// budget (`http::body_budget`).
pub(crate) const HTTP_READ_BUFFER: usize = 16 << 10;

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(UnixStream),
}

enum AnyListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl AnyListener {
    async fn accept(&self) -> io::Result<Conn> {
        match self {
            AnyListener::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
            AnyListener::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
        }
    }
}

async fn accept_loop(ctx: ServeContext, listener: AnyListener) {
    let mut last_error_log: Option<std::time::Instant> = None;
    loop {
        let conn = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            c = listener.accept() => c,
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning; log once a minute.
                if last_error_log.is_none_or(|t| t.elapsed().as_secs() >= 60) {
                    tracing::warn!(error = %e, "accept failed");
                    last_error_log = Some(std::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Taken after the accept: an idle loop must not sit on a slot. While none is free
        // this connection waits unserved and the backlog holds the next ones.
        let permit = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            p = ctx.connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let c = ctx.clone();
        ctx.tracker.spawn(async move {
            let _permit = permit;
            let serve = async {
                match conn {
                    Conn::Tcp(s) => {
                        let _ = s.set_nodelay(true);
                        let guarded = Guarded {
                            router: c.router.clone(),
                            hosts: c.hosts.clone(),
                            metrics: c.ingest.metrics.clone(),
                            loopback: s.local_addr().is_ok_and(|a| a.ip().is_loopback()),
                        };
                        serve_http(WriteStall::new(s, c.write_timeout()), guarded, &c).await
                    }
                    Conn::Unix(s) => serve_unix(s, &c).await,
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = async {
                    c.shutdown.cancelled().await;
                    tokio::time::sleep(STOP_GRACE).await
                } => {}
            }
        });
    }
}

async fn serve_http<S, R>(io: S, svc: R, ctx: &ServeContext)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    R: tower::Service<
            axum::http::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    R::Future: Send + 'static,
{
    let svc = TowerToHyperService::new(svc);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.header_timeout)
        .max_buf_size(HTTP_READ_BUFFER)
        .keep_alive(true)
        // A client may shut down its write side once its request is sent (`nc -N`, `socat`,
        // a shell script piping a request into the socket) and wait for the reply. Without
        // this hyper took that end of input for a vanished client and closed the connection
        // unanswered, while the event it had read was stored anyway: an event stored and
        // never acknowledged. A client that hangs up for good still stops the connection: the
        // reply cannot be written.
        .half_close(true)
        .serve_connection(TokioIo::new(JsonParseErrors::new(io)), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = ctx.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn serve_unix(s: UnixStream, ctx: &ServeContext) {
    let Ok(mut s) = LeanUnix::new(s) else {
        return;
    };
    // Sniff the first byte, then hand the stream on with it. Until then the connection is
    // idle, whichever protocol it will speak: an app may connect at start and log its first
    // event later, so it gets `idle_timeout` like any idle NDJSON connection (an HTTP
    // client sends its request line at once, and `header_timeout` runs from there).
    let mut first = [0u8; 1];
    let n = tokio::select! {
        _ = ctx.shutdown.cancelled() => return,
        r = tokio::time::timeout(ctx.ndjson.idle_timeout, s.read(&mut first)) => match r {
            Ok(Ok(n)) => n,
            _ => return,
        },
    };
    if n == 0 {
        return;
    }
    let stream = Prefixed {
        prefix: first[..n].to_vec(),
        pos: 0,
        inner: WriteStall::new(s, ctx.write_timeout()),
    };
    if first[0].is_ascii_uppercase() {
        serve_http(stream, ctx.router.clone(), ctx).await
    } else {
        ndjson::serve(
            stream,
            ctx.ingest.clone(),
            ctx.ndjson.clone(),
            ctx.shutdown.clone(),
        )
        .await
    }
}

/// A stream that first yields bytes already read from it.
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A stream whose writes fail with `TimedOut` once one has made no progress for `limit`: a
/// peer that stops reading what we send it is cut off instead of holding its task forever.
pub(crate) struct WriteStall<S> {
    inner: S,
    limit: Duration,
    /// Running while a write (or flush) is pending; reset by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteStall<S> {
    pub(crate) fn new(inner: S, limit: Duration) -> Self {
        WriteStall {
            inner,
            limit,
            stalled: None,
        }
    }

    fn guard<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if sleep.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?}"),
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStall<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteStall<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.guard(cx, r)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.guard(cx, r)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.guard(cx, r)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.guard(cx, r)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    fn server(text: &str) -> ServerConfig {
        Config::parse(text, &Overrides::default()).unwrap().server
    }

    /// A socket systemd hands over is held to the loopback rule `http_listen` is: an edited
    /// `ListenStream=8411` (every interface) was served, exposing unauthenticated ingest.
    #[test]
    fn an_inherited_socket_off_loopback_needs_allow_non_loopback() {
        let cfg = server("");
        for ok in ["127.0.0.1:8411", "[::1]:8411", "127.0.0.2:1"] {
            assert!(inherited_allowed(ok.parse().unwrap(), &cfg).is_ok(), "{ok}");
        }
        for bad in ["0.0.0.0:8411", "[::]:8411", "192.168.1.5:8411"] {
            let e = inherited_allowed(bad.parse().unwrap(), &cfg)
                .expect_err(bad)
                .to_string();
            assert!(
                e.contains(bad) && e.contains("allow_non_loopback"),
                "{bad}: {e}"
            );
        }
        let open = server("[server]\nallow_non_loopback = true\n");
        assert!(inherited_allowed("0.0.0.0:8411".parse().unwrap(), &open).is_ok());
    }
}
