//! trellis-examples: the demo services and (soon) the one-command local mesh.
//!
//! [`demo_service`] is a small HTTP service (`web`, `api`, `users` in the demo): it answers with its
//! name, version and instance id, can call other services through its sidecar, and can be told to
//! fail so retries and outlier ejection have something to hide.

pub mod demo_service;
