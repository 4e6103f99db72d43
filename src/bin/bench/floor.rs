//! The transport floor: a stand-in for llmlogd that answers every event the moment it has
//! read it, parsing nothing and storing nothing. The ingest phase drives it with the same
//! clients as llmlogd, so the report shows what loopback TCP, the Unix socket and the load
//! generator alone allow on this machine, and how much of that llmlogd reaches.
//!
//! It runs as a child process like the daemon (`llmlogd-bench --serve-transport-floor run
//! --unix-socket S ...`, the daemon's command line after the flag), on a tokio runtime with
//! the daemon's default worker count (one per CPU), prints a `llmlogd ready` line of the same
//! shape, and stops on SIGTERM. Replies have the shape and size of llmlogd's:
//! NDJSON `{"ok":true,"id":"…","seq":N}` lines, HTTP `202` with
//! `{"accepted":1,"ids":["…"],"seqs":[N]}`.
//! It has no `/metrics` (any `GET` is answered `404`), so its rows show no events per sync.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use llmlogd::ingest::LeanUnix;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The first argument that starts the floor server instead of the bench.
pub const FLAG: &str = "--serve-transport-floor";

const READ_CHUNK: usize = 16 * 1024;
/// A request head longer than this closes the connection (the bench's are ~200 bytes).
const MAX_HEAD: usize = 16 * 1024;
/// An id of llmlogd's length (a hyphenated UUID).
const ID: &str = "0190a0b0-0000-7000-8000-000000000000";

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Serves until SIGTERM. `args` is the daemon's command line (after [`FLAG`]); only
/// `--unix-socket` is used, HTTP listens on an ephemeral loopback port.
pub fn serve(args: &[String]) -> anyhow::Result<()> {
    let socket = args
        .iter()
        .position(|a| a == "--unix-socket")
        .and_then(|i| args.get(i + 1))
        .context("--unix-socket PATH is required")?
        .clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let _ = std::fs::remove_file(&socket);
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let uds = tokio::net::UnixListener::bind(&socket)?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        eprintln!(
            "transport floor: llmlogd ready listening=http://{} and unix:{socket}",
            tcp.local_addr()?
        );
        loop {
            tokio::select! {
                Ok((s, _)) = tcp.accept() => {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(http(s, Vec::new()));
                }
                Ok((s, _)) = uds.accept() => {
                    if let Ok(s) = LeanUnix::new(s) {
                        tokio::spawn(unix(s));
                    }
                }
                _ = term.recv() => break,
            }
        }
        let _ = std::fs::remove_file(&socket);
        Ok(())
    })
}

/// The Unix socket carries NDJSON or HTTP, told apart by the first bytes, as llmlogd does.
async fn unix(mut s: LeanUnix) {
    let mut first = vec![0u8; READ_CHUNK];
    let n = match s.read(&mut first).await {
        Ok(0) | Err(_) => return,
        Ok(n) => n,
    };
    first.truncate(n);
    if first.starts_with(b"POST ") || first.starts_with(b"GET ") {
        http(s, first).await
    } else {
        ndjson(s, first).await
    }
}

/// One reply line per complete line read, all of a read's replies in one write.
async fn ndjson(mut s: LeanUnix, mut buf: Vec<u8>) {
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut out = Vec::with_capacity(4096);
    loop {
        out.clear();
        let mut done = 0;
        while let Some(i) = memchr::memchr(b'\n', &buf[done..]) {
            done += i + 1;
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            out.extend_from_slice(
                format!("{{\"ok\":true,\"id\":\"{ID}\",\"seq\":{seq}}}\n").as_bytes(),
            );
        }
        buf.drain(..done);
        if !out.is_empty() && s.write_all(&out).await.is_err() {
            return;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Keep-alive HTTP/1.1: reads a head and its `Content-Length` body, answers at once.
async fn http<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, mut buf: Vec<u8>) {
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let head_end = loop {
            if let Some(i) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD {
                return;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let body_len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + body_len {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + body_len);
        let reply = if head.starts_with("post ") {
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            let body = format!("{{\"accepted\":1,\"ids\":[\"{ID}\"],\"seqs\":[{seq}]}}");
            format!(
                "HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
        } else {
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_string()
        };
        if s.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}
