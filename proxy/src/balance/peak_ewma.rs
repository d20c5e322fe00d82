//! Peak-EWMA (as Linkerd does): power of two choices on latency × (in flight + 1).

use std::sync::Arc;

use super::{Pick, two_random};
use crate::endpoint::EndpointState;

#[derive(Debug, Default, Clone, Copy)]
pub struct PeakEwma;

impl Pick for PeakEwma {
    fn pick(
        &self,
        endpoints: &[Arc<EndpointState>],
        usable: &dyn Fn(&EndpointState) -> bool,
    ) -> Option<usize> {
        let (a, b) = two_random(endpoints, usable)?;
        Some(if endpoints[b].ewma_cost() < endpoints[a].ewma_cost() {
            b
        } else {
            a
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_util::*;
    use super::*;

    #[test]
    fn prefers_the_fast_endpoint() {
        let eps = endpoints(2);
        eps[0].observe_latency(Duration::from_millis(200));
        eps[1].observe_latency(Duration::from_millis(2));
        let ones = (0..50)
            .filter(|_| PeakEwma.pick(&eps, &all) == Some(1))
            .count();
        assert!(ones > 40, "{ones}");
    }
}
