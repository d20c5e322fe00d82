//! Least request by power of two choices: of two random endpoints, the one with fewer in flight.

use std::sync::Arc;

use super::{Pick, two_random};
use crate::endpoint::EndpointState;

#[derive(Debug, Default, Clone, Copy)]
pub struct LeastRequest;

impl Pick for LeastRequest {
    fn pick(
        &self,
        endpoints: &[Arc<EndpointState>],
        usable: &dyn Fn(&EndpointState) -> bool,
    ) -> Option<usize> {
        let (a, b) = two_random(endpoints, usable)?;
        Some(if endpoints[b].in_flight() < endpoints[a].in_flight() {
            b
        } else {
            a
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn avoids_the_busy_endpoint() {
        let eps = endpoints(2);
        let _busy: Vec<_> = (0..5).map(|_| eps[0].start()).collect();
        let lr = LeastRequest;
        // Two usable endpoints always give two distinct choices, so the idle one always wins.
        let ones = (0..200).filter(|_| lr.pick(&eps, &all) == Some(1)).count();
        assert_eq!(ones, 200);
    }
}
