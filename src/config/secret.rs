//! API keys: a newtype that never prints its value, and where a key comes from.

use std::fmt;

/// A secret string. `Debug` and `Display` print `***`, so a key cannot leak through a log line,
/// an error message or `check-config`; only [`Secret::expose`] gives the value, at the one place
/// that puts it into a request header or body.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The key itself; call only where it goes onto the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where a sink's key was read from, shown by `check-config` instead of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// No key configured: the key the app sent on ingest is used (see README).
    None,
    Inline,
    Env(String),
    File(String),
    Credential(String),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::None => f.write_str("none (the app's own key is used)"),
            KeySource::Inline => f.write_str("inline"),
            KeySource::Env(v) => write!(f, "env {v}"),
            KeySource::File(p) => write!(f, "file {p}"),
            KeySource::Credential(c) => write!(f, "systemd credential {c}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_the_value() {
        let s = Secret::new("pl_live_abcdef");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "pl_live_abcdef");
    }
}
