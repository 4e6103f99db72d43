//! llmlogd: a local, durable buffer between apps that call LLMs and the services that record
//! those calls (Pezzo, PromptLayer, any HTTP collector).
//!
//! # Layout
//! An event flows ingest → queue → delivery → sinks:
//!
//! - [`ingest`]: loopback HTTP and the Unix socket (HTTP or NDJSON, detected per connection).
//!   Parses and validates each request in its wire format, routes it, and answers only after
//!   the queue says the event is on disk. Requests from web pages are refused on TCP
//!   (`ingest::browser`).
//! - [`formats`]: the wire formats (native, Pezzo, PromptLayer) and the canonical model they
//!   convert through. Shared by ingest (parse, validate) and sinks (render).
//! - [`event`]: the one event type every stage shares.
//! - [`queue`]: the sled write-ahead log: group-commit writer thread (fdatasync before ack)
//!   that packs small events ~8 to a value, compressed together; a cursor per sink, dead
//!   letters (with their own cap), byte and event caps, compaction, `fsck`. Its invariants
//!   are written at its top.
//! - [`delivery`]: one engine for all sinks: per-sink worker reading from its cursor,
//!   batching, rate limit, retry with backoff, Retry-After, circuit, dead-lettering.
//! - [`sinks`]: thin: build a request from a batch, classify the reply.
//! - [`config`]: TOML → validated `Config`; secrets never print.
//! - [`ops`]: signals, systemd notify/watchdog, metrics, status.
//! - [`app`]: wiring: build the stages from a `Config`, run, reload, shut down in order.
//! - [`cli`]: the command line (`run`, `send`, `status`, `check-config`, `dlq`,
//!   `fsck`).

pub mod app;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod event;
pub mod formats;
pub mod ingest;
pub mod ops;
pub mod queue;
pub mod sinks;
