//! trellis-ca integration tests: real files, real `openssl`, real sockets, real `aws` CLI.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns; failures should panic.

mod support;

mod api;
mod cli;
mod hierarchy;
mod tls;
