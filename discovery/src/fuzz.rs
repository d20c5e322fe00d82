//! Entry points for the `fuzz/` targets and the corpus-replay tests: arbitrary bytes in, never a
//! panic, and the properties of each parser checked with `assert!`.

use std::sync::{Arc, OnceLock};

use hickory_proto::op::Message;
use serde_json::{Value, json};

use crate::dns::DnsHandler;
use crate::dns_udp::{self, Cache, Reply, udp_limit};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryConfig};
use crate::store::{MemoryStore, RedbStore, STORE_FILE, Store};

/// Every Cloud Map action, in the order the first input byte selects them.
pub const CLOUD_MAP_ACTIONS: &[&str] = crate::http::KNOWN_ACTIONS;

/// A registry with one DNS namespace (`example.local`), a MULTIVALUE A service `api` with many
/// instances (large answers), a WEIGHTED SRV service `srv` and an HTTP namespace.
pub struct Fixture {
    pub registry: Arc<Registry>,
    pub namespace_id: String,
    pub service_id: String,
}

fn call(reg: &Registry, action: &str, body: Value) -> Result<Value, ApiError> {
    crate::api::handle_action(reg, action, body.to_string().as_bytes())
}

/// Builds the fixture over an in-memory store.
pub fn fixture() -> Result<Fixture, ApiError> {
    fixture_on(Box::new(MemoryStore::default()))
}

/// Builds the fixture over `store` (a redb store gives the `store_bytes` seed file).
pub fn fixture_on(store: Box<dyn Store>) -> Result<Fixture, ApiError> {
    fixture_with(store, 40)
}

/// The fixture with `instances` instances of `api` (the DNS target wants many, the API target a
/// few so it runs fast).
fn fixture_with(store: Box<dyn Store>, instances: usize) -> Result<Fixture, ApiError> {
    let registry = Registry::open(store, RegistryConfig::default())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    call(
        &registry,
        "CreatePrivateDnsNamespace",
        json!({"Name": "example.local", "Vpc": "vpc-1"}),
    )?;
    call(&registry, "CreateHttpNamespace", json!({"Name": "web"}))?;
    let ns = call(&registry, "ListNamespaces", json!({}))?;
    let namespace_id = ns["Namespaces"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["Name"] == "example.local"))
        .and_then(|n| n["Id"].as_str())
        .unwrap_or_default()
        .to_owned();
    let svc = |name: &str, policy: &str, kind: &str| {
        json!({"Name": name, "NamespaceId": namespace_id, "DnsConfig": {
            "RoutingPolicy": policy, "DnsRecords": [{"Type": kind, "TTL": 60}]}})
    };
    let api = call(&registry, "CreateService", svc("api", "MULTIVALUE", "A"))?;
    let srv = call(&registry, "CreateService", svc("srv", "WEIGHTED", "SRV"))?;
    let service_id = api["Service"]["Id"].as_str().unwrap_or_default().to_owned();
    let srv_id = srv["Service"]["Id"].as_str().unwrap_or_default().to_owned();
    for i in 0..instances {
        call(
            &registry,
            "RegisterInstance",
            json!({"ServiceId": service_id, "InstanceId": format!("instance-with-a-long-name-{i}"),
                "Attributes": {"AWS_INSTANCE_IPV4": format!("10.0.{}.{}", i / 200, i % 200 + 1)}}),
        )?;
    }
    call(
        &registry,
        "RegisterInstance",
        json!({"ServiceId": srv_id, "InstanceId": "s1",
            "Attributes": {"AWS_INSTANCE_IPV4": "10.1.0.1", "AWS_INSTANCE_PORT": "8080"}}),
    )?;
    Ok(Fixture {
        registry,
        namespace_id,
        service_id,
    })
}

/// One Cloud Map request on a fresh fixture: the first byte picks the action, the rest is the
/// JSON body, in which `$NS` and `$SVC` stand for the fixture's namespace and service ids.
/// Properties: an answer is a JSON object; an error maps to a 4xx (or a 5xx only for `Internal`);
/// and the registry still answers reads afterwards.
pub fn cloud_map_request(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let Ok(f) = fixture_with(Box::new(MemoryStore::default()), 3) else {
        panic!("fixture must build");
    };
    let action = CLOUD_MAP_ACTIONS[usize::from(which) % CLOUD_MAP_ACTIONS.len()];
    let body = match std::str::from_utf8(body) {
        Ok(text) => text
            .replace("$NS", &f.namespace_id)
            .replace("$SVC", &f.service_id)
            .into_bytes(),
        Err(_) => body.to_vec(),
    };
    match crate::api::handle_action(&f.registry, action, &body) {
        Ok(v) => assert!(v.is_object(), "{action} answered {v}"),
        Err(e) => {
            let (_, status) = e.wire();
            assert!(
                status.is_client_error() || matches!(e, ApiError::Internal(_)),
                "{action}: {e:?} maps to {status}"
            );
        }
    }
    for check in ["ListNamespaces", "ListServices", "ListOperations"] {
        assert!(
            crate::api::handle_action(&f.registry, check, b"{}").is_ok(),
            "{check} fails after {action}"
        );
    }
}

fn dns_handler() -> &'static DnsHandler {
    static HANDLER: OnceLock<DnsHandler> = OnceLock::new();
    HANDLER.get_or_init(|| {
        let f = match fixture() {
            Ok(f) => f,
            Err(e) => panic!("fixture must build: {e}"),
        };
        DnsHandler::new(f.registry, Metrics::new(), None)
    })
}

/// One UDP datagram through the server's receive-loop logic (names outside the zones answered
/// as without a forwarder: REFUSED). Properties: the answer fits the query's UDP size; a name
/// we do not serve, or a negative answer, is at most twice the query's bytes; a cached answer
/// equals the fresh one. Returns the answer.
pub fn dns_query(data: &[u8]) -> Option<Vec<u8>> {
    let handler = dns_handler();
    let mut cache = Cache::default();
    let mut slot = vec![0u8; dns_udp::MAX_UDP];
    let cached_before = cache.hit(handler, data, &mut slot);
    assert!(cached_before.is_none(), "empty cache hit");
    let out = match dns_udp::decide(handler, data) {
        Reply::Nothing => return None,
        Reply::Now(bytes, cacheable) => {
            if let Some((counter, fail_open)) = cacheable {
                cache.insert(&bytes, counter, fail_open);
                if let Some(len) = cache.hit(handler, data, &mut slot) {
                    assert_eq!(
                        slot[..len],
                        bytes[..],
                        "cached answer differs from the fresh one"
                    );
                }
            }
            bytes
        }
        Reply::Foreign(req) => {
            let refused = crate::dns::Answer {
                rcode: Some(hickory_proto::op::ResponseCode::Refused),
                ..Default::default()
            };
            let bytes = dns_udp::encode(&req, refused, false, data.len(), udp_limit(&req))?;
            assert!(
                bytes.len() <= 2 * data.len(),
                "REFUSED answer of {} bytes to a {}-byte query",
                bytes.len(),
                data.len()
            );
            bytes
        }
    };
    let limit = Message::from_vec(data)
        .map(|m| udp_limit(&m))
        .unwrap_or(512);
    assert!(
        out.len() <= limit,
        "answer of {} bytes to a query allowing {limit}",
        out.len()
    );
    Some(out)
}

/// The store's recovery from arbitrary bytes on disk: opening a data directory whose store file
/// holds `data` ends in a clear error or a registry that loads and reopens to the same records.
/// A non-empty file never opens as a silently empty registry unless it is a valid empty store.
pub fn store_bytes(data: &[u8]) {
    // redb asserts on some damaged files and `RedbStore::open` contains that panic by design; a
    // fuzzer's panic hook would still abort on it. Silence the hook for this call only: a panic
    // that escapes is re-raised below, so the fuzzer still sees real failures.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| store_bytes_inner(data));
    std::panic::set_hook(hook);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

fn store_bytes_inner(data: &[u8]) {
    let dir = TempDir(std::env::temp_dir().join(format!("trellis-fuzz-{}", uuid::Uuid::new_v4())));
    if std::fs::create_dir_all(dir.path())
        .and_then(|()| std::fs::write(dir.path().join(STORE_FILE), data))
        .is_err()
    {
        return;
    }
    let records = match RedbStore::open(dir.path()) {
        Err(e) => {
            assert!(
                e.to_string().contains(STORE_FILE),
                "error must name the file: {e}"
            );
            return;
        }
        Ok(store) => match store.load() {
            Ok(r) => {
                // A store that opens must also build a registry or name the bad record.
                let _ = Registry::open(Box::new(store), RegistryConfig::default());
                r
            }
            Err(e) => panic!("opened store fails to load: {e}"),
        },
    };
    let reopened = RedbStore::open(dir.path()).and_then(|s| s.load());
    assert_eq!(
        reopened.ok(),
        Some(records),
        "a store that opened must reopen with the same records"
    );
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
