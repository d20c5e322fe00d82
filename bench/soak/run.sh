#!/usr/bin/env bash
# Soak with churn: the demo mesh (control plane + CA, six sidecars, the LB, the demo apps) under
# steady load through the LB and the sidecars while instances register/deregister, health flips,
# the LB shifts weights and the control plane restarts twice. Writes report.md, samples.csv and
# soak.svg to bench/results/soak/ (or $OUT).
#   bench/soak/run.sh [--quick]     # --quick: 5 minutes; default 30 minutes
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=1800
if [ "${1:-}" = "--quick" ]; then seconds=300; fi
out="${OUT:-bench/results/soak}"
# Debug build by default (the soak looks for failures and leaks, not peak speed); PROFILE=release
# for a release build.
profile="${PROFILE:-debug}"
if [ "$profile" = release ]; then cargo build --release -p trellis-examples --bin soak; else cargo build -p trellis-examples --bin soak; fi
exec "target/$profile/soak" --seconds "$seconds" --concurrency "${CONCURRENCY:-8}" --out "$out"
