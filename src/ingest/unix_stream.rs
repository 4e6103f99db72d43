//! A Unix stream connection that the reactor watches for input only.
//!
//! Tokio registers every `UnixStream` with epoll for both readability and writability,
//! edge-triggered. On a Unix socket the kernel signals "writable" each time the peer takes
//! data out of the connection (`unix_write_space` runs for every buffer the peer reads), not
//! only when a full send buffer drains, as TCP does. So every ack an app reads woke one of
//! llmlogd's worker threads for nothing, and paid for it in the app's own `recv`.
//!
//! `LeanUnix` reads through an `AsyncFd` registered for readability only and writes straight
//! to the socket. Replies are small and the send buffer is normally empty, so a write almost
//! never blocks; the first one that would (a client that stopped reading) registers a second
//! descriptor of the same socket for writability, and the connection waits on that one from
//! then on. The read registration is never touched, so no read wake-up can be lost.
//!
//! The benchmark's load generator and its transport floor use it too: like a blocking or
//! libuv client, they then wake only for replies.

use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

pub struct LeanUnix {
    read: AsyncFd<UnixStream>,
    /// A second descriptor of the socket, watched for writability: made by the first write
    /// that would block.
    write: Option<AsyncFd<UnixStream>>,
}

impl LeanUnix {
    /// Takes over a connection from tokio's reactor.
    pub fn new(s: tokio::net::UnixStream) -> io::Result<LeanUnix> {
        let s = s.into_std()?;
        s.set_nonblocking(true)?;
        Ok(LeanUnix {
            read: watch(s, Interest::READABLE)?,
            write: None,
        })
    }
}

/// Registers a socket the `AsyncFd` owns.
fn watch(s: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: a `UnixStream` owns its descriptor, open until it is dropped with the `AsyncFd`,
    // and its `as_raw_fd` always returns that same descriptor.
    unsafe { AsyncFd::register_with_interest(s, interest) }.map_err(io::Error::from)
}

impl AsyncRead for LeanUnix {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.read.poll_read_ready(cx))?;
            // Into the spare capacity as it is: zeroing a 16 KiB buffer before each read
            // would cost more than the read.
            // SAFETY: nothing here de-initialises what the buffer holds.
            let unfilled: &mut [MaybeUninit<u8>] = unsafe { buf.unfilled_mut() };
            let want = unfilled.len();
            let read = |s: &AsyncFd<UnixStream>| {
                // SAFETY: `read(2)` writes at most `want` bytes into memory we own and may
                // write; only the bytes it reports are marked initialised below.
                let n = unsafe {
                    libc::read(
                        s.get_ref().as_raw_fd(),
                        unfilled.as_mut_ptr().cast::<libc::c_void>(),
                        want,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            };
            match guard.try_io(read) {
                Ok(Ok(n)) => {
                    // A short read took everything there was: the next read would only say
                    // so (tokio's own streams skip it the same way). An arrival after the
                    // read is a new readiness event, which this does not clear.
                    if n > 0 && n < want {
                        guard.clear_ready();
                    }
                    // SAFETY: `read` wrote these `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for LeanUnix {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.write.is_none() {
            match self.read.get_ref().write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let dup = self.read.get_ref().try_clone()?;
                    self.write = Some(watch(dup, Interest::WRITABLE)?);
                }
                r => return Poll::Ready(r),
            }
        }
        let write = self.write.as_ref().expect("registered above");
        loop {
            let mut guard = ready!(write.poll_write_ready(cx))?;
            match guard.try_io(|s| s.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.read.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads and writes both ways, including a write that blocks until the peer reads (the
    /// path that registers for writability) and end of input.
    #[tokio::test]
    async fn reads_writes_and_waits_for_a_full_send_buffer() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let mut lean = LeanUnix::new(a).unwrap();
        let (mut br, mut bw) = b.into_split();

        bw.write_all(b"hello\n").await.unwrap();
        let mut got = [0u8; 16];
        let n = lean.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"hello\n");

        // Far more than a Unix socket buffers: the writes must block and resume.
        let big: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let expect = big.clone();
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            br.read_to_end(&mut all).await.unwrap();
            all
        });
        lean.write_all(&big).await.unwrap();
        assert!(
            lean.write.is_some(),
            "a blocked write registers for writability"
        );
        lean.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), expect);

        // Reading goes on after the write side waited; end of input reads as 0.
        bw.write_all(b"more").await.unwrap();
        drop(bw);
        let mut rest = Vec::new();
        lean.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"more");
    }
}
