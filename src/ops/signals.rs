//! SIGTERM/SIGINT → shutdown, SIGHUP → reload, delivered on a tokio channel.
//!
//! signal-hook's iterator runs on its own thread (signal handlers can do almost nothing
//! safely; the thread does the rest) and forwards into a bounded channel. A reload request
//! that finds the channel (all but full) is merged with the ones pending; the last slot is a
//! stop's, so reloads queued while the daemon was busy (starting, say) never crowd out a
//! SIGTERM.

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Shutdown,
    Reload,
}

/// Starts listening; returns the receiving end.
pub fn listen() -> std::io::Result<mpsc::Receiver<Signal>> {
    let (tx, rx) = mpsc::channel(8);
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("llmlogd-signals".into())
        .spawn(move || {
            for s in signals.forever() {
                let sig = if s == SIGHUP {
                    Signal::Reload
                } else {
                    Signal::Shutdown
                };
                forward(&tx, sig);
            }
        })?;
    Ok(rx)
}

/// Hands a signal to the daemon. The channel's last slot is kept for a stop: a reload that
/// would take it is merged with those pending (the last of them reads the file anew).
fn forward(tx: &mpsc::Sender<Signal>, sig: Signal) {
    if sig == Signal::Reload && tx.capacity() <= 1 {
        return;
    }
    // Full on a stop: one is pending already.
    let _ = tx.try_send(sig);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_is_not_lost_behind_pending_reloads() {
        let (tx, mut rx) = mpsc::channel(8);
        // The daemon is busy (starting, say) while SIGHUPs arrive, then a SIGTERM.
        for _ in 0..20 {
            forward(&tx, Signal::Reload);
        }
        forward(&tx, Signal::Shutdown);
        drop(tx);
        let mut got = Vec::new();
        while let Some(sig) = rx.blocking_recv() {
            got.push(sig);
        }
        let mut want = vec![Signal::Reload; 7];
        want.push(Signal::Shutdown);
        assert_eq!(got, want, "reloads merged, the stop kept");
    }
}
