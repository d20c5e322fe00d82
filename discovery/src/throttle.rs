//! Per-client rate limiting (token buckets keyed by client address or subnet), shared by the
//! API front (answering AWS's `ThrottlingException`) and DNS response-rate limiting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use parking_lot::Mutex;

/// A sustained rate and a burst, per client.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// Clients tracked at most; beyond it idle (full) buckets are dropped, then all.
const MAX_CLIENTS: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key.
#[derive(Debug)]
pub struct Throttle {
    limit: RateLimit,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Throttle {
    pub fn new(limit: RateLimit) -> Self {
        Throttle {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `client`; `false` when its bucket is empty.
    pub fn admit(&self, client: IpAddr) -> bool {
        self.admit_at(client, Instant::now())
    }

    fn admit_at(&self, client: IpAddr, now: Instant) -> bool {
        let burst = f64::from(self.limit.burst.max(1));
        let mut map = self.buckets.lock();
        if map.len() >= MAX_CLIENTS && !map.contains_key(&client) {
            let rate = self.limit.per_second;
            map.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            if map.len() >= MAX_CLIENTS {
                map.clear();
            }
        }
        let b = map.entry(client).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.limit.per_second;
        b.tokens = (b.tokens + refill).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The key for response-rate limiting: the client's /24 (IPv4) or /56 (IPv6), as BIND's RRL.
pub fn subnet(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::from([a, b, c, 0])
        }
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[7..].iter_mut().for_each(|x| *x = 0);
            IpAddr::from(o)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t = Throttle::new(RateLimit {
            per_second: 10.0,
            burst: 3,
        });
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        assert!((0..3).all(|_| t.admit_at(a, t0)));
        assert!(!t.admit_at(a, t0));
        // Another client has its own bucket.
        assert!(t.admit_at(b, t0));
        // 100 ms refills one token.
        assert!(t.admit_at(a, t0 + Duration::from_millis(101)));
        assert!(!t.admit_at(a, t0 + Duration::from_millis(102)));
    }

    #[test]
    fn subnets() {
        assert_eq!(
            subnet("192.0.2.77".parse().unwrap()),
            "192.0.2.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            subnet("2001:db8:1:2:3::9".parse().unwrap()),
            "2001:db8:1::".parse::<IpAddr>().unwrap()
        );
    }
}
