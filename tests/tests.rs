//! Integration tests: one binary, sharing `util/`.

mod util;

mod clients;
mod foundation;
mod ops;
mod socket;
