#!/usr/bin/env bash
# Discovery benchmarks, side by side in one run:
#  1. DNS: dnsperf against trellis-discovery and against unbound serving the same 1,000 names
#     (unbound: local-data), each server pinned to one core (taskset), dnsperf on the other.
#  2. register -> DNS-visible and register -> watcher latency p50/p99, RegisterInstance throughput
#     with durable writes, and 10,000 TCP-checked instances (drift, CPU)
#     (discovery/examples/discovery_bench.rs).
# Needs: dnsperf, unbound, taskset (apt-get install dnsperf unbound util-linux). Prints a summary.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-1000}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-10}
ZONE=bench.local
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cargo build --release -q -p trellis-discovery --bin trellis-discovery --example discovery_bench
bin=target/release/trellis-discovery
ex=target/release/examples/discovery_bench

# trellis, one worker thread on core 0.
api_port=$(free_port); dns_port=$(free_port)
TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 0 "$bin" serve --api-listen 127.0.0.1:$api_port \
  --dns-listen 127.0.0.1:$dns_port --data-dir "$work/trellis" > "$work/trellis.log" 2>&1 &
pids+=($!)
sleep 0.5
"$ex" populate "127.0.0.1:$api_port" "$ZONE" "$N"

# unbound with the same names as local-data, one thread on core 0.
ub_port=$(free_port)
{
  echo "server:"
  echo "  interface: 127.0.0.1"; echo "  port: $ub_port"; echo "  num-threads: 1"
  echo "  do-daemonize: no"; echo "  use-syslog: no"; echo "  username: \"\""; echo "  chroot: \"\""
  echo "  directory: \"$work\""; echo "  pidfile: \"$work/unbound.pid\""
  echo "  access-control: 127.0.0.0/8 allow"; echo "  verbosity: 0"
  echo "  local-zone: \"$ZONE.\" static"
  for ((i=0; i<N; i++)); do
    echo "  local-data: \"svc$i.$ZONE. 60 IN A 10.$((i/65536%256)).$((i/256%256)).$((i%256))\""
  done
} > "$work/unbound.conf"

for ((i=0; i<N; i++)); do echo "svc$i.$ZONE A"; done > "$work/queries.txt"

# Same answers from both (spot check).
dig +short @127.0.0.1 -p "$dns_port" "svc7.$ZONE" A

perf() { taskset -c 1 dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries.txt" -l "$DURATION" -c "$CLIENTS" -q 200 2>&1 \
  | awk '/Queries per second/ {print $4} /Average Latency/ {print $4}' | paste -sd' '; }

trellis=$(perf "$dns_port")
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true

taskset -c 0 unbound -c "$work/unbound.conf" > "$work/unbound.log" 2>&1 &
pids+=($!)
sleep 0.5
dig +short @127.0.0.1 -p "$ub_port" "svc7.$ZONE" A
unbound_r=$(perf "$ub_port")

tq=${trellis%% *}; uq=${unbound_r%% *}
echo "dns qps: trellis $tq (avg latency ${trellis##* }s), unbound $uq (avg latency ${unbound_r##* }s), ratio $(python3 -c "print(round($tq/$uq, 2))")  (target >= 1.2)"

"$ex" latency "${SAMPLES:-200}"
"$ex" health "${HEALTH_INSTANCES:-10000}"
