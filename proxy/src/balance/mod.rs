//! Load balancers behind one small trait. Each picks among the endpoints a caller marks usable
//! (not ejected, or all of them in panic mode) without locking or allocating.

mod least_request;
mod peak_ewma;
mod round_robin;
mod weighted;

use std::sync::Arc;

pub use least_request::LeastRequest;
pub use peak_ewma::PeakEwma;
pub use round_robin::RoundRobin;
pub use weighted::Weighted;

use crate::config::BalancerKind;
use crate::endpoint::EndpointState;

/// Chooses an endpoint index among `endpoints` for which `usable` holds.
pub trait Pick: Send + Sync + std::fmt::Debug {
    fn pick(
        &self,
        endpoints: &[Arc<EndpointState>],
        usable: &dyn Fn(&EndpointState) -> bool,
    ) -> Option<usize>;
}

/// The balancer a config names.
pub fn balancer(kind: BalancerKind) -> Box<dyn Pick> {
    match kind {
        BalancerKind::RoundRobin => Box::new(RoundRobin::default()),
        BalancerKind::LeastRequest => Box::new(LeastRequest),
        BalancerKind::PeakEwma => Box::new(PeakEwma),
        BalancerKind::Weighted => Box::new(Weighted),
    }
}

/// Two distinct random usable indices (or one when only one is usable), for power-of-two choices.
pub(crate) fn two_random(
    endpoints: &[Arc<EndpointState>],
    usable: &dyn Fn(&EndpointState) -> bool,
) -> Option<(usize, usize)> {
    let n = endpoints.len();
    if n == 0 {
        return None;
    }
    // A few random draws find usable endpoints quickly when most are; fall back to a scan.
    let mut found: [usize; 2] = [usize::MAX; 2];
    let mut k = 0;
    for _ in 0..8 {
        let i = rand::random_range(0..n);
        if usable(&endpoints[i]) && (k == 0 || found[0] != i) {
            found[k] = i;
            k += 1;
            if k == 2 {
                return Some((found[0], found[1]));
            }
        }
    }
    // Few usable endpoints: scan (from a random start) for what the draws missed, so two usable
    // endpoints always yield two distinct choices.
    let start = rand::random_range(0..n);
    let mut scan = (0..n)
        .map(|o| (start + o) % n)
        .filter(|&i| usable(&endpoints[i]));
    if k == 0 {
        found[0] = scan.next()?;
    }
    let second = scan.find(|&i| i != found[0]).unwrap_or(found[0]);
    Some((found[0], second))
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    pub fn endpoints(n: usize) -> Vec<Arc<EndpointState>> {
        (0..n)
            .map(|i| {
                Arc::new(EndpointState::new(
                    format!("e{i}"),
                    format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                    1,
                ))
            })
            .collect()
    }

    pub fn all(_: &EndpointState) -> bool {
        true
    }
}
