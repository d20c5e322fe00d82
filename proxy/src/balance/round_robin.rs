//! Round robin over the usable endpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::Pick;
use crate::endpoint::EndpointState;

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Pick for RoundRobin {
    fn pick(
        &self,
        endpoints: &[Arc<EndpointState>],
        usable: &dyn Fn(&EndpointState) -> bool,
    ) -> Option<usize> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|o| (start.wrapping_add(o)) % n)
            .find(|&i| usable(&endpoints[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn cycles_and_skips_unusable() {
        let eps = endpoints(3);
        let rr = RoundRobin::default();
        let picks: Vec<_> = (0..6).map(|_| rr.pick(&eps, &all).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let skip1 = |e: &EndpointState| e.instance_id != "e1";
        assert!((0..6).all(|_| rr.pick(&eps, &skip1).unwrap() != 1));
        assert_eq!(rr.pick(&eps, &|_| false), None);
        assert_eq!(rr.pick(&[], &all), None);
    }
}
