//! Replays the committed fuzz corpora (`fuzz/corpus/`) through the fuzz targets' library code.
#![allow(clippy::unwrap_used)]

use trellis_ca::fuzz;
use trellis_test_support::corpus::replay;

#[test]
fn acm_pca_request_corpus() {
    replay("acm_pca_request", fuzz::acm_pca_request);
}

#[test]
fn csr_corpus() {
    replay("csr", fuzz::csr);
}
