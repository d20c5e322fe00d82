//! trellis-proxy: the sidecar and the internal load balancer (work in progress).

pub mod lb;
pub mod route;
