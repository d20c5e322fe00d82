//! trellis-proxy: the sidecar and the internal load balancer (work in progress). Nothing is
//! implemented yet.
