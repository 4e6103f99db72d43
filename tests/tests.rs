//! Integration tests: one binary, sharing `util/`.

mod util;

mod big_events;
mod clients;
mod delivery;
mod foundation;
mod http_clients;
mod ops;
mod reliability;
mod socket;
