//! Replays the committed fuzz corpora (`fuzz/corpus/`) through the fuzz targets' library code.
#![allow(clippy::unwrap_used)]

use trellis_test_support::corpus::replay;

#[test]
fn spiffe_id_corpus() {
    replay("spiffe_id", trellis_core::fuzz::spiffe_id);
}

#[test]
fn names_corpus() {
    replay("names", trellis_core::fuzz::names);
}
