//! A lean HTTP/1.1 client for plaintext upstream hops, driven inline by the task that serves the
//! downstream request: no connection task, no dispatch channel, no wake-up to hand a request over
//! or a response back. The request future writes the head (and streams the body) and parses the
//! response head; the response body reads the remaining bytes straight from the upstream socket
//! and gives the connection back to its pool ([`crate::pool`]) when the body ends.
//!
//! What it does not do: upgrades and CONNECT (hyper's client keeps those), HTTP/2, TLS.
//!
//! The server side ([`serve`]) is the same idea for downstream connections: the proxy listeners'
//! HTTP/1.1 loop, which hands a connection to hyper for anything but plain bodiless requests.

mod body;
pub(crate) mod chunked;
mod conn;
mod date;
pub(crate) mod head;
mod raw_head;
mod request_head;
mod response_head;
mod rewind;
mod serve;

pub use body::UpstreamBody;
pub use conn::{Conn, SendError, exchange};
pub use raw_head::{RawHead, RawHeadSource, materialize};
pub use rewind::Rewind;
pub use serve::{Answer, Ended, ServerLimits, serve};

/// Why an upstream response could not be read; the request fails with 502.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed upstream response: {0}")]
pub struct Malformed(pub &'static str);

#[cfg(test)]
mod tests;
