//! The serde mirror of the TOML file: every key optional, unknown keys refused.
//!
//! Nothing here is validated; `Config::from_raw` in `mod.rs` fills defaults and checks each
//! value once, naming the key when it refuses one.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub queue: RawQueue,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub delivery: RawDelivery,
    #[serde(default)]
    pub sinks: BTreeMap<String, RawSink>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub http_listen: Option<String>,
    pub allow_non_loopback: Option<bool>,
    pub allowed_hosts: Option<Vec<String>>,
    pub unix_socket: Option<String>,
    pub socket_mode: Option<String>,
    pub socket_group: Option<String>,
    pub max_body_bytes: Option<ByteSize>,
    pub max_line_bytes: Option<ByteSize>,
    pub max_connections: Option<u64>,
    pub header_timeout: Option<String>,
    pub body_timeout: Option<String>,
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQueue {
    pub data_dir: Option<String>,
    pub max_bytes: Option<ByteSize>,
    pub max_events: Option<u64>,
    pub when_full: Option<String>,
    pub cache_bytes: Option<ByteSize>,
    pub compression: Option<String>,
    pub compact_above: Option<ByteSize>,
    pub dead_letter_max_bytes: Option<ByteSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDelivery {
    pub drain_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSink {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub url: Option<String>,
    pub api_key: Option<String>,
    pub api_key_env: Option<String>,
    pub api_key_file: Option<String>,
    pub api_key_credential: Option<String>,
    pub project_id: Option<String>,
    pub encoding: Option<String>,
    pub gzip: Option<bool>,
    pub headers: Option<BTreeMap<String, String>>,
    pub batch_max_events: Option<u64>,
    pub batch_max_bytes: Option<ByteSize>,
    pub batch_max_wait: Option<String>,
    pub concurrency: Option<u64>,
    pub timeout: Option<String>,
    pub rate_limit: Option<f64>,
    pub rate_burst: Option<u64>,
    pub retry_initial: Option<String>,
    pub retry_max: Option<String>,
    pub max_age: Option<String>,
    pub max_retry_after: Option<String>,
    pub poison_after: Option<u64>,
    pub circuit_after: Option<u64>,
    #[serde(default)]
    pub route: RawRoute,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub formats: Option<Vec<String>>,
    pub environments: Option<Vec<String>>,
    pub tags: Option<Vec<String>>,
}

/// A byte size written either as an integer (bytes) or a string such as `"64MiB"`.
#[derive(Debug, Clone)]
pub(crate) enum ByteSize {
    Int(u64),
    Text(String),
}

/// By hand rather than `#[serde(untagged)]`, whose refusal of anything else (`-1`, `1.5`) was
/// "data did not match any variant of untagged enum ByteSize".
impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size in bytes (a whole number) or a string like \"64MiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize::Int(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize::Int)
                    .map_err(|_| E::custom(format!("{v} is negative; a size is 0 or more bytes")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ByteSize, E> {
                Err(E::custom(format!(
                    "{v} is not a whole number of bytes (write a size like \"1.5MiB\" as a string)"
                )))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                Ok(ByteSize::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}
