//! Weighted random (canary versions): each usable endpoint in proportion to its weight.

use std::sync::Arc;

use super::Pick;
use crate::endpoint::EndpointState;

#[derive(Debug, Default, Clone, Copy)]
pub struct Weighted;

impl Pick for Weighted {
    fn pick(
        &self,
        endpoints: &[Arc<EndpointState>],
        usable: &dyn Fn(&EndpointState) -> bool,
    ) -> Option<usize> {
        let total: u64 = endpoints
            .iter()
            .filter(|e| usable(e))
            .map(|e| u64::from(e.weight))
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = rand::random_range(0..total);
        for (i, e) in endpoints.iter().enumerate() {
            if !usable(e) {
                continue;
            }
            let w = u64::from(e.weight);
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_weights() {
        let eps = vec![
            Arc::new(EndpointState::new(
                "stable",
                "127.0.0.1:1".parse().unwrap(),
                9,
            )),
            Arc::new(EndpointState::new(
                "canary",
                "127.0.0.1:2".parse().unwrap(),
                1,
            )),
        ];
        let canary = (0..10_000)
            .filter(|_| Weighted.pick(&eps, &|_| true) == Some(1))
            .count();
        assert!((700..1300).contains(&canary), "{canary}");
        assert_eq!(Weighted.pick(&eps, &|e| e.instance_id == "canary"), Some(1));
    }
}
