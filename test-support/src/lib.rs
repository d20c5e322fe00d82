//! trellis-test-support: fixtures for tests, never linked into a shipped binary.
//!
//! - [`tools`]: find real clients (`aws`, `python3` with boto3, `dig`, `openssl`) and decide whether a
//!   missing one skips the test (developer machine) or fails it (CI sets `TRELLIS_REQUIRE_TOOLS`).
//! - [`memory`]: the test process's resident memory.
//! - [`corpus`]: replay the committed fuzz corpora on stable `cargo test`.
//! - [`bins`]: paths of the workspace's binaries (built on demand) for tests that run them as processes.
//! - [`etcd`]: a cluster of real etcd members on loopback, killed and restarted by index.
//! - [`netns`]: a lab of hosts in network namespaces the test creates, joined by a bridge that lives in
//!   its own namespace; removed on drop, even when the test fails.

pub mod bins;
pub mod corpus;
pub mod etcd;
pub mod memory;
pub mod netns;
pub mod tools;
