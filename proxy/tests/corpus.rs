//! Replays the committed fuzz corpora (`fuzz/corpus/`) through the fuzz targets' library code.
#![allow(clippy::unwrap_used)]

use trellis_proxy::fuzz;
use trellis_test_support::corpus::replay;

#[test]
fn route_match_corpus() {
    replay("route_match", fuzz::route_match);
}

#[test]
fn sidecar_config_corpus() {
    replay("sidecar_config", fuzz::sidecar_config);
}

#[test]
fn lb_config_corpus() {
    replay("lb_config", fuzz::lb_config);
}

#[test]
fn http_detect_corpus() {
    replay("http_detect", |d| {
        let _ = fuzz::http_detect(d);
    });
}

#[test]
fn h1_response_corpus() {
    replay("h1_response", fuzz::h1_response);
}
