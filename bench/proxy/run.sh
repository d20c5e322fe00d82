#!/usr/bin/env bash
# Sidecar benchmark: wrk keep-alive through trellis-proxy vs nginx vs HAProxy vs direct, one worker
# each, side by side in one run, same origin (nginx), with ratios. Also 1 MiB bodies and idle RSS.
#
#   bash bench/proxy/run.sh [seconds-per-run]      (needs: wrk nginx haproxy, apt: wrk nginx-light haproxy)
#
# On a 2-core machine the subject is pinned to CPU 1 and wrk + origin to CPU 0.
set -euo pipefail
cd "$(dirname "$0")/../.."
DUR="${1:-10}"
CONNS="${CONNS:-64}"
for t in wrk nginx haproxy taskset; do command -v "$t" >/dev/null || { echo "missing $t (apt-get install wrk nginx-light haproxy)"; exit 2; }; done
[ -x target/release/trellis-proxy ] || cargo build --release -p trellis-proxy
WORK="$(mktemp -d /tmp/trellis-bench-proxy.XXXXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$WORK"; }
trap cleanup EXIT
. bench/proxy/common.sh
NCPU=$(nproc)
SUBJ_CPU=$(( NCPU > 1 ? 1 : 0 ))

# Origin.
ORIGIN_PORT=$(free_port)
head -c 1048576 /dev/zero | tr '\0' x > "$WORK/large.bin"
origin_conf "$ORIGIN_PORT" "location = /large { root $WORK; try_files /large.bin =404; }" > "$WORK/origin.conf"
taskset -c 0 nginx -p "$WORK/" -c "$WORK/origin.conf" & PIDS+=($!)
wait_port "$ORIGIN_PORT"

# Subjects.
start_trellis() {
  local port=$1
  trellis_toml "$port" "$ORIGIN_PORT" > "$WORK/trellis.toml"
  taskset -c $SUBJ_CPU target/release/trellis-proxy sidecar --config "$WORK/trellis.toml" >/dev/null 2>"$WORK/trellis.err" & PIDS+=($!)
  SUBJECT_PID=$!
}
start_nginx() {
  local port=$1
  { nginx_common proxy; cat <<C
http { $(temp_paths proxy) access_log off; keepalive_requests 1000000;
  upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 256; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$port reuseport backlog=4096;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; } } }
C
  } > "$WORK/proxy.conf"
  taskset -c $SUBJ_CPU nginx -p "$WORK/" -c "$WORK/proxy.conf" & PIDS+=($!)
  SUBJECT_PID=$!
}
start_haproxy() {
  local port=$1
  haproxy_cfg "$port" "$ORIGIN_PORT" > "$WORK/haproxy.cfg"
  taskset -c $SUBJ_CPU haproxy -f "$WORK/haproxy.cfg" >/dev/null 2>&1 & PIDS+=($!)
  SUBJECT_PID=$!
}

# wrk → "req/s p99_ms"
measure() {
  local url=$1 d=$2
  taskset -c 0 wrk -t1 -c"$CONNS" -d"${d}s" --latency "$url" > "$WORK/wrk.out" 2>&1 || true
  local rps p99
  rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' "$WORK/wrk.out")
  echo "${rps:-0} ${p99:-0}"
}
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

declare -A RPS P99 LRPS RSS
for subj in direct trellis nginx haproxy; do
  if [ "$subj" = direct ]; then port=$ORIGIN_PORT; SUBJECT_PID=""; else port=$(free_port); "start_$subj" "$port"; wait_port "$port"; fi
  sleep 0.3
  [ -n "$SUBJECT_PID" ] && RSS[$subj]=$(rss_kb "$SUBJECT_PID") || RSS[$subj]=0
  measure "http://127.0.0.1:$port/" 2 >/dev/null   # warm-up
  read -r RPS[$subj] P99[$subj] < <(measure "http://127.0.0.1:$port/" "$DUR")
  read -r LRPS[$subj] _ < <(CONNS=16 measure "http://127.0.0.1:$port/large" "$DUR")
  if [ -n "$SUBJECT_PID" ]; then kill "$SUBJECT_PID" 2>/dev/null || true; wait "$SUBJECT_PID" 2>/dev/null || true; fi
done

printf '\nHTTP/1.1 keep-alive small responses, %s connections, %ss, 1 worker each (subject on CPU %s)\n' "$CONNS" "$DUR" "$SUBJ_CPU"
printf '%-9s %12s %9s %14s %12s %12s\n' subject req/s p99_ms "1MiB req/s" "vs haproxy" "idle RSS kB"
for s in direct trellis nginx haproxy; do
  ratio=$(awk -v a="${RPS[$s]}" -v b="${RPS[haproxy]}" 'BEGIN { if (b>0) printf "%.2fx", a/b; else print "-" }')
  printf '%-9s %12s %9s %14s %12s %12s\n' "$s" "${RPS[$s]}" "${P99[$s]}" "${LRPS[$s]}" "$ratio" "${RSS[$s]}"
done
