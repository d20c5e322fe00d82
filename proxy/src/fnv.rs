//! FNV-1a, for hash maps on the request path whose keys are short and not attacker-chosen
//! (path segments of configured rules, endpoint addresses from discovery): a few instructions
//! per byte instead of SipHash's setup and rounds.

use std::hash::{BuildHasherDefault, Hasher};

#[derive(Default)]
pub struct Fnv1a(u64);

/// `HashMap<K, V, FnvBuild>`.
pub type FnvBuild = BuildHasherDefault<Fnv1a>;

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;
    use std::net::SocketAddr;

    #[test]
    fn spreads_addresses() {
        let b = FnvBuild::default();
        let a = SocketAddr::from(([127, 0, 0, 1], 8080));
        let c = SocketAddr::from(([127, 0, 0, 1], 8081));
        assert_ne!(b.hash_one(a), b.hash_one(c));
        assert_eq!(b.hash_one(a), b.hash_one(a));
    }
}
