//! The `Type=notify` contract: READY=1 once listeners are bound and the queue is open,
//! RELOADING=1/READY=1 around a reload, STOPPING=1 (with EXTEND_TIMEOUT_USEC) on stop, WATCHDOG=1 pings at half the
//! `WatchdogSec` interval; and socket activation (`LISTEN_FDS`). Outside systemd
//! (`NOTIFY_SOCKET` unset) every call is a no-op.

use std::os::fd::FromRawFd;
use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    // Failing to notify must not stop the daemon; systemd will time out and say so.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn reloading() {
    // RELOADING=1 wants MONOTONIC_USEC alongside it (systemd 253+ Type=notify-reload).
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(m) => send(&[NotifyState::Reloading, m]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// STOPPING=1, and EXTEND_TIMEOUT_USEC so that systemd waits `up_to` for the stop (the
/// configured drain may be longer than the unit's `TimeoutStopSec=`, which would otherwise
/// SIGKILL the daemon mid-drain).
pub fn stopping(up_to: Duration) {
    let usec = u32::try_from(up_to.as_micros()).unwrap_or(u32::MAX);
    send(&[
        NotifyState::Stopping,
        NotifyState::ExtendTimeoutUsec(usec),
        NotifyState::Status("stopping"),
    ]);
}

pub fn status(s: &str) {
    send(&[NotifyState::Status(s)]);
}

/// The watchdog ping interval (half of `WatchdogSec`), when systemd asked for one. Same rule
/// as sd_watchdog_enabled(3): `WATCHDOG_USEC` set, and `WATCHDOG_PID`, if set, is us.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

pub fn watchdog_ping() {
    send(&[NotifyState::Watchdog]);
}

/// A listening socket passed in by systemd.
pub enum Inherited {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// Sockets passed by socket activation, classified by address family. Empty when not
/// socket-activated (or `LISTEN_PID` is not us).
pub fn listen_fds() -> Vec<Inherited> {
    let Ok(fds) = sd_notify::listen_fds() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for fd in fds {
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: getsockname writes at most `len` bytes into `addr`, which we own.
        let rc =
            unsafe { libc::getsockname(fd, &mut addr as *mut _ as *mut libc::sockaddr, &mut len) };
        if rc != 0 || !is_stream(fd) {
            // Not a listening stream socket (a `ListenDatagram=`, a FIFO): nothing to accept
            // on; said once, and closed.
            tracing::warn!(
                fd,
                "an inherited file descriptor is not a stream socket; ignoring it"
            );
            // SAFETY: the fd was passed to us and nothing else uses it.
            unsafe { libc::close(fd) };
            continue;
        }
        // SAFETY: systemd passed us ownership of these listening fds (LISTEN_FDS protocol).
        match addr.ss_family as i32 {
            libc::AF_UNIX => out.push(Inherited::Unix(unsafe {
                std::os::unix::net::UnixListener::from_raw_fd(fd)
            })),
            libc::AF_INET | libc::AF_INET6 => out.push(Inherited::Tcp(unsafe {
                std::net::TcpListener::from_raw_fd(fd)
            })),
            _ => {}
        }
    }
    out
}

/// Whether `fd` is a `SOCK_STREAM` socket (what `ListenStream=` hands over).
fn is_stream(fd: std::os::fd::RawFd) -> bool {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `ty`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            &mut ty as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    rc == 0 && ty == libc::SOCK_STREAM
}
