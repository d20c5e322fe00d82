#!/usr/bin/env bash
# Soak with churn: the demo mesh as separate processes (control plane + CA, six sidecars, the LB,
# five demo apps) under steady load through the LB and the sidecars while instances
# register/deregister, health flips, certificates rotate on a short TTL, the LB shifts weights and
# the control plane restarts twice. RSS and open fds of every process are sampled every 10 s.
# Writes report.md, samples.csv and soak.svg to bench/results/soak/ (or $OUT).
#   bench/soak/run.sh [--quick]     # --quick: 5 minutes, 60 s certificates; default 30 minutes, 180 s
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=1800
cert_ttl=180s
if [ "${1:-}" = "--quick" ]; then seconds=300; cert_ttl=60s; fi
out="${OUT:-bench/results/soak}"
# Debug build by default (the soak looks for failures and leaks, not peak speed); PROFILE=release
# for a release build. The soak starts the real binaries found beside it.
profile="${PROFILE:-debug}"
flags=(-p trellis-discovery -p trellis-proxy -p trellis-examples --bins)
if [ "$profile" = release ]; then cargo build --release "${flags[@]}"; else cargo build "${flags[@]}"; fi
exec "target/$profile/soak" --seconds "$seconds" --concurrency "${CONCURRENCY:-8}" \
  --cert-ttl "${CERT_TTL:-$cert_ttl}" --out "$out"
