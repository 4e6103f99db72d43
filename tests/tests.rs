//! Integration tests: one binary, sharing `util/`.

mod util;

mod foundation;
mod ops;
