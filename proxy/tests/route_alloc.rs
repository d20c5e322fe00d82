//! The outbound route match allocates nothing per request: a counting global allocator around
//! `RouteTables::pick` over prefix, exact, regex, header and method conditions and a weighted
//! split.

#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers to the system allocator; only counts calls.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn route_matching_does_not_allocate() {
    let config = trellis_proxy::Config::from_toml(
        r#"
[identity]
namespace = "my-app.local"
service = "web"

[outbound]
upstreams = [
  { service = "api", danger_plaintext = true },
  { service = "api-v2", danger_plaintext = true },
]

[[outbound.routes]]
upstream = "api"
priority = 1
match = { path = "/exact" }
targets = [{ cluster = "api-v2" }]

[[outbound.routes]]
upstream = "api"
priority = 2
match = { path_regex = "/users/[0-9]+", method = "GET" }
targets = [{ cluster = "api-v2" }]

[[outbound.routes]]
upstream = "api"
priority = 3
match = { prefix = "/v", headers = [{ name = "x-user", regex = "beta-.*" }, { name = "x-debug", present = true, invert = true }] }
targets = [{ cluster = "api", weight = 90 }, { cluster = "api-v2", weight = 10 }]

[[clusters]]
service = "api"
endpoints = [{ address = "127.0.0.1:1" }]
[[clusters]]
service = "api-v2"
endpoints = [{ address = "127.0.0.1:2" }]
"#,
    )
    .unwrap();
    let tables = trellis_proxy::compile_routes(&config.outbound).unwrap();
    let reqs: Vec<http::Request<()>> = [
        ("/exact", None),
        ("/users/42", None),
        ("/v2/items", Some("beta-anna")),
        ("/nothing", None),
    ]
    .into_iter()
    .map(|(path, user)| {
        let mut b = http::Request::get(path).header("host", "api.my-app.local");
        if let Some(u) = user {
            b = b.header("x-user", u);
        }
        b.body(()).unwrap()
    })
    .collect();
    let source = "127.0.0.1".parse().unwrap();
    let mut slots = [0usize; 4];
    let mut run = |n: u32| {
        for i in 0..n {
            for (k, r) in reqs.iter().enumerate() {
                let view = trellis_proxy::route::RequestView::of(r, source);
                slots[k] = tables.pick(0, &view, i.wrapping_mul(2_654_435_761));
            }
        }
    };
    run(100); // warm up (the regex engine's per-thread cache)
    let before = ALLOCS.load(Ordering::Relaxed);
    run(10_000);
    let after = ALLOCS.load(Ordering::Relaxed);
    assert_eq!(after - before, 0, "allocations during 40,000 route matches");
    assert_eq!(slots[0], 1);
    assert_eq!(slots[1], 1);
    assert_eq!(slots[3], 0);
}
