#!/usr/bin/env bash
# HA benchmarks, etcd vs the embedded store, side by side in one run:
#  1. RegisterInstance throughput (CLIENTS keep-alive clients, DURATION s): embedded (fsync per
#     write) vs one replica on a 1-member etcd vs one replica on a 3-member etcd.
#  2. register -> visible: ack on replica A -> a watch held on replica B answers (p50/p99, ms);
#     embedded baseline: ack -> a watch on the same node.
#  3. DNS QPS per replica: dnsperf against an etcd-backed replica vs an embedded node, same 1,000
#     names, each server pinned to core 0 with one worker thread, dnsperf on core 1; both servers
#     run side by side and are measured in turn ROUNDS times (medians).
# Needs: etcd (etcd-server), dnsperf, taskset, python3. Prints a summary; numbers go to RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-1000}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-8}
SAMPLES=${SAMPLES:-200}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
load() { python3 bench/ha/ha_load.py "$@"; }

cargo build --release -q -p trellis-discovery --bin trellis-discovery --example discovery_bench
bin=target/release/trellis-discovery
ex=target/release/examples/discovery_bench

# etcd cluster of $1 members in $work/$2; sets $urls to the client URLs.
start_etcd() {
  local n=$1 name=$2 cluster="" i
  urls=""
  local -a cps pps
  for ((i=0; i<n; i++)); do cps[$i]=$(free_port); pps[$i]=$(free_port); done
  for ((i=0; i<n; i++)); do cluster+="${name}$i=http://127.0.0.1:${pps[$i]},"; urls+="http://127.0.0.1:${cps[$i]},"; done
  for ((i=0; i<n; i++)); do
    etcd --name "${name}$i" --data-dir "$work/$name$i" \
      --listen-client-urls "http://127.0.0.1:${cps[$i]}" --advertise-client-urls "http://127.0.0.1:${cps[$i]}" \
      --listen-peer-urls "http://127.0.0.1:${pps[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${pps[$i]}" \
      --initial-cluster "${cluster%,}" --initial-cluster-token "$name" --initial-cluster-state new \
      --log-level error --logger zap > "$work/$name$i.log" 2>&1 &
    pids+=($!)
  done
  for ((i=0; i<n; i++)); do
    until curl -sf "http://127.0.0.1:${cps[$i]}/health" | grep -q '"health":"true"'; do sleep 0.1; done
  done
  urls=${urls%,}
}

# A control plane named $1; the other args select the store. Sets ${1}_api, ${1}_dns, ${1}_pid.
serve() {
  local name=$1; shift
  local out=$work/$name.out
  # --api-rate-limit 0: the per-client throttle (200/s by default) would cap bulk registration.
  RUST_LOG=warn "$bin" serve --api-listen 127.0.0.1:0 --dns-listen 127.0.0.1:0 --api-rate-limit 0 "$@" > "$out" 2>"$out.err" &
  pids+=($!)
  eval "${name}_pid=$!"
  until grep -q '^trellis-discovery: api' "$out" 2>/dev/null; do sleep 0.05; done
  eval "$(awk -v n="$name" '/^trellis-discovery: api/ {sub("http://","",$3); print n "_api=" $3 " " n "_dns=" $5}' "$out")"
}

start_etcd 1 one; etcd1=$urls
start_etcd 3 three; etcd3=$urls

serve emb --data-dir "$work/embedded"
serve a1 --data-dir "$work/a1" --store etcd --etcd-endpoints "$etcd1" --etcd-prefix /b1/
serve b1 --data-dir "$work/b1" --store etcd --etcd-endpoints "$etcd1" --etcd-prefix /b1/
serve a3 --data-dir "$work/a3" --store etcd --etcd-endpoints "$etcd3" --etcd-prefix /b3/
serve b3 --data-dir "$work/b3" --store etcd --etcd-endpoints "$etcd3" --etcd-prefix /b3/

emb_svc=$(load setup "$emb_api" tp.local)
e1_svc=$(load setup "$a1_api" tp.local)
e3_svc=$(load setup "$a3_api" tp.local)

echo "== RegisterInstance throughput, $CLIENTS clients, ${DURATION}s (req/s, failures)"
echo "embedded:      $(load throughput "$emb_api" "$emb_svc" "$DURATION" "$CLIENTS")"
echo "etcd 1 member: $(load throughput "$a1_api" "$e1_svc" "$DURATION" "$CLIENTS")"
echo "etcd 3 members: $(load throughput "$a3_api" "$e3_svc" "$DURATION" "$CLIENTS")"

echo "== register -> visible, $SAMPLES samples (p50 ms, p99 ms)"
echo "embedded, same node:          $(load visible "$emb_api" "$emb_api" tp.local "$emb_svc" "$SAMPLES")"
echo "etcd 1 member, A -> B watch:  $(load visible "$a1_api" "$b1_api" tp.local "$e1_svc" "$SAMPLES")"
echo "etcd 3 members, A -> B watch: $(load visible "$a3_api" "$b3_api" tp.local "$e3_svc" "$SAMPLES")"

# DNS: the same 1,000 names on an embedded node and on an etcd replica. Populated through the API,
# then each served by a fresh server pinned to core 0 with one worker thread, one after the other.
"$ex" populate "$emb_api" dns.local "$N"
"$ex" populate "$a1_api" dns.local "$N"
for ((i=0; i<N; i++)); do echo "svc$i.dns.local A"; done > "$work/queries.txt"
kill "$emb_pid"; wait "$emb_pid" 2>/dev/null || true
sleep 0.5
perf() { taskset -c 1 dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries.txt" -l "$DURATION" -c 10 -q 200 2>&1 \
  | awk '/Queries per second/ {print $4}'; }
# `exec`: the server replaces the backgrounded function's subshell, so $! is its pid and the
# cleanup trap stops it.
pinned() { TOKIO_WORKER_THREADS=1 RUST_LOG=warn exec taskset -c 0 "$bin" serve --api-listen 127.0.0.1:0 \
  --dns-listen 127.0.0.1:0 "$@"; }
# Both servers run side by side on core 0 and are measured in turn, ROUNDS times (median), so a
# burst of background load hits both alike instead of deciding the ratio.
ROUNDS=${ROUNDS:-5}
start_pinned() {  # $1 = name, rest = store args; sets ${1}_port
  local name=$1; shift
  local out=$work/pinned-$name.log
  pinned "$@" > "$out" 2>&1 & pids+=($!)
  until grep -q '^trellis-discovery: api' "$out"; do sleep 0.05; done
  local port; port=$(awk '/^trellis-discovery: api/ {print $5}' "$out"); port=${port##*:}
  eval "${name}_port=$port"
  dig +short @127.0.0.1 -p "$port" svc7.dns.local A > /dev/null
}
start_pinned emb --data-dir "$work/embedded"
start_pinned rep --data-dir "$work/c1" --store etcd --etcd-endpoints "$etcd1" --etcd-prefix /b1/
[ "$(dig +short @127.0.0.1 -p "$rep_port" svc7.dns.local A)" = "$(dig +short @127.0.0.1 -p "$emb_port" svc7.dns.local A)" ] \
  || echo "warning: the replica and the embedded node answer svc7 differently" >&2
emb_all=(); rep_all=()
for ((r=1; r<=ROUNDS; r++)); do
  emb_all+=("$(perf "$emb_port")"); rep_all+=("$(perf "$rep_port")")
  echo "round $r: embedded ${emb_all[-1]}, etcd replica ${rep_all[-1]}"
done
python3 - "${emb_all[*]}" "${rep_all[*]}" <<'PY'
import statistics, sys
emb = [float(x) for x in sys.argv[1].split()]
rep = [float(x) for x in sys.argv[2].split()]
me, mr = statistics.median(emb), statistics.median(rep)
print(f"== DNS QPS per server (1,000 names, 1 core, median of {len(emb)}): embedded {me:,.0f}, "
      f"etcd replica {mr:,.0f}, ratio {mr/me:.3f}  (target >= 0.9); per-round ratios "
      + ", ".join(f"{r/e:.2f}" for e, r in zip(emb, rep)))
PY
