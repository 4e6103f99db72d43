//! Web pages are not llmlogd's clients, and must not become them.
//!
//! Any page the user opens in a browser can send requests to `127.0.0.1`. Two attacks follow
//! for a daemon on a loopback port, and both are refused here, on TCP (a page cannot reach the
//! Unix socket):
//!
//! - **Cross-site posts.** A page can `POST` to a loopback port without asking (a "simple"
//!   request: `fetch(url, {method: "POST", mode: "no-cors", body: new Blob([..])})` sends no
//!   Content-Type). It cannot read the answer, but the event would be stored and delivered
//!   with the sinks' keys to the user's Pezzo or PromptLayer account. A browser marks every such
//!   request with an `Origin` header, which a page cannot remove; llmlogd's clients (SDKs,
//!   scripts, `curl`) send none. A request that carries one is refused.
//! - **DNS rebinding.** A page on `evil.example` has its name re-resolve to `127.0.0.1`, and its
//!   requests are then same-origin: it could read `/v1/status` or post events. Its requests say
//!   `Host: evil.example`. On a loopback connection the Host must be an IP address,
//!   `localhost` (or a name under `.localhost`), this machine's hostname, a name `/etc/hosts`
//!   gives a loopback address (`ip6-localhost`, a name the admin added), or a name in
//!   `server.allowed_hosts`. None of these can be a page's own name: a rebinding page's name
//!   comes from its own DNS, which `/etc/hosts` overrides. A connection on a non-loopback
//!   address (`allow_non_loopback`) takes any Host: its clients reach it by the names the
//!   network gives it.
//!
//! A request without a Host (HTTP/1.0, hand-written scripts) is not from a browser, and is
//! served. The checks read two headers and cost well under a microsecond.

use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{header, HeaderMap, Request};
use axum::response::{IntoResponse, Response};
use axum::Router;

use super::{FieldError, IngestError};
use crate::ops::log_throttle::LogThrottle;
use crate::ops::metrics::Metrics;

/// What a loopback connection accepts as its Host, besides IP addresses and `localhost`.
#[derive(Debug)]
pub struct HostNames {
    /// Lowercase, without a trailing dot: `server.allowed_hosts`, the machine's hostname and
    /// the names `/etc/hosts` gives a loopback address (read once, at start).
    names: Vec<String>,
}

impl HostNames {
    /// `allowed` (from `server.allowed_hosts`), this machine's hostname and the loopback
    /// names in `/etc/hosts`.
    pub fn new(allowed: &[String]) -> HostNames {
        let mut names: Vec<String> = allowed.iter().map(|n| normal(n)).collect();
        if let Some(h) = hostname() {
            names.push(normal(&h));
        }
        if let Ok(hosts) = std::fs::read_to_string("/etc/hosts") {
            names.extend(loopback_names(&hosts));
        }
        names.retain(|n| !n.is_empty());
        HostNames { names }
    }

    /// Why a request with these headers, on a connection to a loopback address when
    /// `loopback`, is refused; `None` to serve it.
    pub fn refusal(&self, headers: &HeaderMap, loopback: bool) -> Option<IngestError> {
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = String::from_utf8_lossy(origin.as_bytes());
            return Some(forbidden(
                "forbidden_origin",
                "Origin",
                format!(
                    "a request from a web page (Origin: {}) is refused: a page the user opens must not post events through this machine's sinks; apps log from their own process, which sends no Origin",
                    shown(&origin)
                ),
            ));
        }
        if !loopback {
            return None;
        }
        let host = headers.get(header::HOST)?;
        let text = String::from_utf8_lossy(host.as_bytes());
        if self.accepts(&text) {
            return None;
        }
        Some(forbidden(
            "forbidden_host",
            "Host",
            format!(
                "Host `{}` is not a name for this machine: llmlogd on a loopback address answers requests to an IP address, localhost, or its hostname (a web page whose name was made to resolve here must not reach it); add the name to server.allowed_hosts if it is yours",
                shown(&text)
            ),
        ))
    }

    fn accepts(&self, host: &str) -> bool {
        let name = strip_port(host.trim());
        if name.starts_with('[') {
            // An IPv6 literal: `[::1]`.
            return name
                .strip_prefix('[')
                .and_then(|n| n.strip_suffix(']'))
                .is_some_and(|n| n.parse::<std::net::Ipv6Addr>().is_ok());
        }
        if name.parse::<std::net::Ipv4Addr>().is_ok() {
            return true;
        }
        // Compared without a copy: this runs for every request.
        let name = name.trim_end_matches('.').as_bytes();
        let under_localhost = name.len() >= b".localhost".len()
            && name[name.len() - b".localhost".len()..].eq_ignore_ascii_case(b".localhost");
        name.eq_ignore_ascii_case(b"localhost")
            || under_localhost
            || self
                .names
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
    }
}

/// `host:port` → `host`; `[v6]:port` → `[v6]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// The names a hosts file (`/etc/hosts` format) gives loopback addresses.
fn loopback_names(hosts: &str) -> Vec<String> {
    hosts
        .lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            let ip: std::net::IpAddr = words.next()?.parse().ok()?;
            ip.is_loopback().then_some(words)
        })
        .flatten()
        .map(normal)
        .collect()
}

fn normal(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// A header value as it may appear in a message: at most 100 characters, no control
/// characters.
fn shown(value: &str) -> String {
    let clean: String = value
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    match clean.char_indices().nth(100) {
        Some((cut, _)) => format!("{}…", &clean[..cut]),
        None => clean,
    }
}

fn forbidden(code: &'static str, field: &str, message: String) -> IngestError {
    let mut e = IngestError::new(403, code, message.clone());
    e.fields.push(FieldError {
        field: field.into(),
        problem: message,
    });
    // Refused before its body is read: the connection closes after the reply.
    e.unread_body()
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end]).ok().map(str::to_string)
}

/// The router behind the checks, for one TCP connection.
#[derive(Clone)]
pub struct Guarded {
    pub router: Router,
    pub hosts: Arc<HostNames>,
    pub metrics: Arc<Metrics>,
    /// The connection's local address is a loopback one.
    pub loopback: bool,
}

/// One line a minute at most: a page that keeps trying must not fill the journal.
static REFUSED_LOG: LogThrottle = LogThrottle::new(60_000);

impl Guarded {
    fn refused(&self, e: &IngestError) {
        self.metrics.forbidden(match e.code {
            "forbidden_origin" => "origin",
            _ => "host",
        });
        if let Some(held) = REFUSED_LOG.ready() {
            tracing::warn!(code = e.code, more_since_last_line = held, "{}", e.message);
        }
    }
}

impl<B> tower::Service<Request<B>> for Guarded
where
    Router: tower::Service<Request<B>, Response = Response, Error = std::convert::Infallible>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::Either<
        std::future::Ready<Result<Response, std::convert::Infallible>>,
        <Router as tower::Service<Request<B>>>::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<Request<B>>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match self.hosts.refusal(req.headers(), self.loopback) {
            Some(e) => {
                self.refused(&e);
                futures_util::future::Either::Left(std::future::ready(Ok(e.into_response())))
            }
            None => futures_util::future::Either::Right(self.router.call(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn refused(
        hosts: &HostNames,
        pairs: &[(&'static str, &str)],
        loopback: bool,
    ) -> Option<String> {
        hosts
            .refusal(&headers(pairs), loopback)
            .map(|e| format!("{} {} {}", e.status, e.code, e.fields[0].field))
    }

    #[test]
    fn loopback_names_and_addresses_are_served() {
        let h = HostNames::new(&["LLM.Internal.".to_string()]);
        for host in [
            "127.0.0.1:8411",
            "127.0.0.1",
            "127.0.1.1:80",
            "[::1]:8411",
            "[::1]",
            "localhost",
            "localhost:8411",
            "LOCALHOST.:8411",
            "app.localhost:8411",
            "llm.internal:8411",
            "llm.internal",
        ] {
            assert_eq!(refused(&h, &[("host", host)], true), None, "{host}");
        }
        // No Host at all (HTTP/1.0, a hand-written request).
        assert_eq!(refused(&h, &[], true), None);
        // The machine's own name.
        if let Some(name) = hostname() {
            assert_eq!(refused(&h, &[("host", &name)], true), None, "{name}");
        }
    }

    #[test]
    fn another_name_on_loopback_is_refused_but_not_off_loopback() {
        let h = HostNames::new(&[]);
        for host in [
            "evil.example",
            "evil.example:8411",
            "localhost.evil.example",
            "127.0.0.1.evil.example:8411",
            "[::1",
            "",
        ] {
            assert_eq!(
                refused(&h, &[("host", host)], true).as_deref(),
                Some("403 forbidden_host Host"),
                "{host}"
            );
            assert_eq!(refused(&h, &[("host", host)], false), None, "{host}");
        }
    }

    #[test]
    fn a_request_from_a_web_page_is_refused_on_any_address() {
        let h = HostNames::new(&[]);
        for origin in ["https://evil.example", "null", "http://localhost:3000"] {
            for loopback in [true, false] {
                let r = h
                    .refusal(
                        &headers(&[("host", "127.0.0.1:8411"), ("origin", origin)]),
                        loopback,
                    )
                    .unwrap();
                assert_eq!((r.status, r.code), (403, "forbidden_origin"));
                assert_eq!(r.fields[0].field, "Origin");
                assert!(r.message.contains(origin), "{}", r.message);
                assert!(r.closes);
            }
        }
    }

    #[test]
    fn names_the_hosts_file_gives_loopback_are_this_machine() {
        let hosts = "127.0.0.1\tlocalhost\n127.0.1.1 box.lan box # the machine\n\
                     ::1 ip6-localhost ip6-loopback\nfe00::0 ip6-localnet\n\
                     10.0.0.5 db.lan\n# 127.0.0.1 commented.out\n";
        assert_eq!(
            loopback_names(hosts),
            [
                "localhost",
                "box.lan",
                "box",
                "ip6-localhost",
                "ip6-loopback"
            ]
        );
    }

    #[test]
    fn a_long_or_odd_header_is_shown_cut_short() {
        let h = HostNames::new(&[]);
        let long = format!("{}.example", "a".repeat(500));
        let e = h.refusal(&headers(&[("host", &long)]), true).unwrap();
        assert!(e.message.len() < 600, "{}", e.message);
        assert!(e.message.contains('…'));
    }
}
