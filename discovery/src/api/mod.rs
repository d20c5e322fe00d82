//! The Cloud Map API (AWS JSON 1.1): action dispatch and the request/response shapes.

mod cloudmap;
mod input;

pub use cloudmap::handle_action;
