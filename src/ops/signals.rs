//! SIGTERM/SIGINT → shutdown, SIGHUP → reload, delivered on a tokio channel.
//!
//! signal-hook's iterator runs on its own thread (signal handlers can do almost nothing
//! safely; the thread does the rest) and forwards into a bounded channel. A reload request
//! while one is pending is merged: two SIGHUPs in a row reload once.

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
                // Full channel: a like signal is already pending; merging is fine.
                let _ = tx.try_send(sig);
            }
        })?;
    Ok(rx)
}
