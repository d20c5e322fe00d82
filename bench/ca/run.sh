#!/usr/bin/env bash
# Certificates issued per second: trellis in-process (1 core), trellis over HTTP, and
# `openssl x509 -req` per certificate as the peer, in the same run. Prints ratios.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p trellis-ca --bin trellis-ca-bench
exec ./target/release/trellis-ca-bench "$@"
