//! trellis-examples: the one-command local mesh ([`demo`]) and the demo services it runs.
//!
//! [`demo_service`] is a small HTTP service (`web`, `api`, `users` in the demo): it answers with its
//! name, version and instance id, can call other services through its sidecar, and can be told to
//! fail so retries and outlier ejection have something to hide. [`cloudmap`] is the thin Cloud Map
//! wire client the demo registers everything with.

pub mod cloudmap;
pub mod demo;
pub mod demo_service;
