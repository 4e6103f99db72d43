//! Operations: signals, systemd integration, metrics, status.

pub mod log_throttle;
pub mod metrics;
pub mod signals;
pub mod status;
pub mod systemd;
