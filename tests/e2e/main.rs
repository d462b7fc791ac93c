//! End-to-end tests: real registries, the real `walt-server`, the real `walt` CLI.
//!
//! Run `cargo build --workspace --bins` first (tests/run does it).

mod harness;
