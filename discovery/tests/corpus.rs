//! Replays the committed fuzz corpora (`fuzz/corpus/`) through the fuzz targets' library code.
#![allow(clippy::unwrap_used)]

use trellis_discovery::fuzz;
use trellis_test_support::corpus::replay;

#[test]
fn cloud_map_request_corpus() {
    replay("cloud_map_request", fuzz::cloud_map_request);
}

#[test]
fn dns_query_corpus() {
    replay("dns_query", |d| {
        let _ = fuzz::dns_query(d);
    });
}

#[test]
fn store_bytes_corpus() {
    replay("store_bytes", fuzz::store_bytes);
}

/// Every Cloud Map action has a seed, so each decoder is exercised on stable.
#[test]
fn every_action_is_seeded() {
    let dir = trellis_test_support::corpus::dir("cloud_map_request");
    for (i, action) in fuzz::CLOUD_MAP_ACTIONS.iter().enumerate() {
        let seed = dir.join(format!("{i:02}-{action}"));
        assert!(seed.exists(), "no seed {}", seed.display());
    }
}

/// A real store file (the fuzz fixture's registry) damaged in many ways: truncated at many
/// lengths, or a run of bytes overwritten at many offsets. Each opens with a clear error naming
/// the file, or to a registry that still holds records: never silently empty.
#[test]
fn damaged_store_file_is_an_error_or_keeps_its_records() {
    use trellis_discovery::{RedbStore, STORE_FILE, Store};
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    drop(fuzz::fixture_on(Box::new(store)).unwrap());
    let good = std::fs::read(dir.path().join(STORE_FILE)).unwrap();
    let mut variants: Vec<Vec<u8>> = Vec::new();
    for cut in [
        1,
        512,
        4096,
        8192,
        65536,
        good.len() / 2,
        good.len() - 4096,
        good.len() - 1,
    ] {
        variants.push(good[..cut].to_vec());
    }
    for off in (0..good.len()).step_by(good.len() / 24) {
        let mut v = good.clone();
        let end = (off + 512).min(v.len());
        v[off..end].iter_mut().for_each(|b| *b ^= 0xA5);
        variants.push(v);
    }
    let (mut errors, mut opened) = (0, 0);
    for (i, bytes) in variants.iter().enumerate() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(STORE_FILE), bytes).unwrap();
        match RedbStore::open(d.path()) {
            Err(e) => {
                assert!(e.to_string().contains(STORE_FILE), "variant {i}: {e}");
                errors += 1;
            }
            Ok(s) => {
                let records = s.load().unwrap();
                assert!(
                    !records.is_empty(),
                    "variant {i} opened as an empty registry"
                );
                opened += 1;
            }
        }
        // And the fuzz target's own properties.
        fuzz::store_bytes(bytes);
    }
    eprintln!("{errors} damaged store files refused, {opened} opened with their records");
}

/// Regenerates the valid-store seed: `TRELLIS_WRITE_SEEDS=1 cargo test -p trellis-discovery
/// --test corpus -- --ignored`.
#[test]
#[ignore]
fn write_store_seed() {
    let dir = tempfile::tempdir().unwrap();
    let store = trellis_discovery::RedbStore::open(dir.path()).unwrap();
    let f = fuzz::fixture_on(Box::new(store)).unwrap();
    drop(f);
    let bytes = std::fs::read(dir.path().join(trellis_discovery::STORE_FILE)).unwrap();
    let out = trellis_test_support::corpus::dir("store_bytes").join("valid-store");
    std::fs::write(&out, &bytes).unwrap();
}
