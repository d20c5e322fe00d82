//! Circuit breaking: a cap on concurrent requests per cluster; beyond it, fail fast with 503.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct Breaker {
    max: usize,
    active: AtomicUsize,
}

/// Releases a slot when dropped.
#[derive(Debug)]
pub struct Slot<'a>(&'a Breaker);

impl Breaker {
    pub fn new(max: usize) -> Self {
        Breaker {
            max,
            active: AtomicUsize::new(0),
        }
    }

    pub fn try_acquire(&self) -> Option<Slot<'_>> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self))
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_releases() {
        let b = Breaker::new(2);
        let s1 = b.try_acquire().unwrap();
        let _s2 = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_none());
        drop(s1);
        assert!(b.try_acquire().is_some());
    }
}
