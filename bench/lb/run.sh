#!/usr/bin/env bash
# Path-rule scaling: trellis-proxy lb vs HAProxy (ACLs) vs nginx (location blocks), same run, same
# backend (an nginx answering 200 "ok"), 1 / 100 / 1,000 path rules, the request always hitting
# the LAST rule (worst case for a linear scan). Prints requests/s and p99 per proxy and rule count,
# and the ratios the issue asks for.
#
#   bash bench/lb/run.sh                 # DURATION=10 CONNS=64 THREADS=2 WORKERS=1 by default
#
# Needs: wrk, haproxy, nginx (apt: wrk haproxy nginx-light) and a release build of trellis-proxy
# (`cargo build --release -p trellis-proxy`). Loopback only. Each proxy gets WORKERS worker
# threads/processes so the comparison is per core.
set -euo pipefail

DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
WORKERS=${WORKERS:-1}
RULES=${RULES:-"1 100 1000"}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TRELLIS=${TRELLIS:-$ROOT/target/release/trellis-proxy}
for t in wrk haproxy nginx "$TRELLIS"; do
  command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

# The backend every proxy forwards to.
BACKEND=$(free_port)
mkdir -p "$WORK/backend"
cat >"$WORK/backend/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/backend/nginx.pid;
error_log $WORK/backend/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND; location / { return 200 "ok"; } }
}
CONF
nginx -p "$WORK/backend" -c "$WORK/backend/nginx.conf" -g "daemon off;" >"$WORK/backend/out.log" 2>&1 &
PIDS+=($!)
wait_port "$BACKEND" || { cat "$WORK/backend/out.log" "$WORK/backend/error.log" >&2; exit 1; }

# run_wrk URL -> "rps p99_ms"
run_wrk() {
  local out
  out=$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency "$1")
  if grep -q "Non-2xx" <<<"$out"; then echo "non-2xx answers from $1" >&2; echo "$out" >&2; exit 1; fi
  local rps p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v=v*1000}; print v}' <<<"$out")
  echo "$rps $p99"
}

declare -A RES
for n in $RULES; do
  path="/svc$n/item"
  # trellis
  d="$WORK/trellis-$n"; mkdir -p "$d"
  tp=$(free_port); ap=$(free_port)
  {
    echo "[admin]"; echo "listen = \"127.0.0.1:$ap\""
    echo "[[target_group]]"; echo "name = \"be\""; echo "targets = [\"127.0.0.1:$BACKEND\"]"
    echo "health_check = { path = \"/\", interval = \"5s\", timeout = \"1s\" }"
    echo "[[listener]]"; echo "name = \"web\""; echo "listen = \"127.0.0.1:$tp\""
    echo 'default_action = { type = "fixed-response", status = 404 }'
    for i in $(seq 1 "$n"); do
      echo "[[listener.rule]]"; echo "name = \"r$i\""; echo "priority = $i"
      echo "conditions = [{ field = \"path-pattern\", values = [\"/svc$i/*\"] }]"
      echo 'action = { type = "forward", target_groups = [{ name = "be" }] }'
    done
  } >"$d/lb.toml"
  TOKIO_WORKER_THREADS=$WORKERS TRELLIS_LOG=warn "$TRELLIS" lb --config "$d/lb.toml" >"$d/out.log" 2>&1 &
  tpid=$!; PIDS+=($tpid)
  wait_port "$tp"
  RES[trellis,$n]=$(run_wrk "http://127.0.0.1:$tp$path")
  kill "$tpid"; wait "$tpid" 2>/dev/null || true

  # HAProxy: one ACL + use_backend per rule, evaluated in order.
  d="$WORK/haproxy-$n"; mkdir -p "$d"
  hp=$(free_port)
  {
    echo "global"; echo "  nbthread $WORKERS"; echo "  maxconn 4096"
    echo "defaults"; echo "  mode http"; echo "  timeout connect 2s"; echo "  timeout client 30s"; echo "  timeout server 30s"
    echo "  option http-keep-alive"
    echo "frontend fe"; echo "  bind 127.0.0.1:$hp"
    for i in $(seq 1 "$n"); do echo "  acl r$i path_beg /svc$i/"; done
    for i in $(seq 1 "$n"); do echo "  use_backend be if r$i"; done
    echo "  default_backend nomatch"
    echo "backend be"; echo "  server s1 127.0.0.1:$BACKEND"
    echo "backend nomatch"; echo "  http-request return status 404"
  } >"$d/haproxy.cfg"
  haproxy -f "$d/haproxy.cfg" -db >"$d/out.log" 2>&1 &
  hpid=$!; PIDS+=($hpid)
  wait_port "$hp"
  RES[haproxy,$n]=$(run_wrk "http://127.0.0.1:$hp$path")
  kill "$hpid"; wait "$hpid" 2>/dev/null || true

  # nginx: one location block per rule.
  d="$WORK/nginx-$n"; mkdir -p "$d"
  np=$(free_port)
  {
    echo "worker_processes $WORKERS;"; echo "pid $d/nginx.pid;"; echo "error_log $d/error.log;"
    echo "events { worker_connections 4096; }"
    echo "http {"; echo "  access_log off;"
    echo "  upstream be { server 127.0.0.1:$BACKEND; keepalive 64; }"
    echo "  server {"; echo "    listen 127.0.0.1:$np;"; echo "    keepalive_requests 1000000;"
    for i in $(seq 1 "$n"); do
      echo "    location /svc$i/ { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; }"
    done
    echo "    location / { return 404; }"
    echo "  }"; echo "}"
  } >"$d/nginx.conf"
  nginx -p "$d" -c "$d/nginx.conf" -g 'daemon off;' &
  npid=$!; PIDS+=($npid)
  wait_port "$np"
  RES[nginx,$n]=$(run_wrk "http://127.0.0.1:$np$path")
  kill "$npid"; wait "$npid" 2>/dev/null || true
done

printf "\n%-8s %6s %12s %10s\n" proxy rules "requests/s" "p99 ms"
for n in $RULES; do
  for p in trellis haproxy nginx; do
    read -r rps p99 <<<"${RES[$p,$n]}"
    printf "%-8s %6s %12s %10s\n" "$p" "$n" "$rps" "$p99"
  done
done
echo
first=$(echo $RULES | awk '{print $1}')
for n in $RULES; do
  read -r t _ <<<"${RES[trellis,$n]}"
  read -r h _ <<<"${RES[haproxy,$n]}"
  read -r g _ <<<"${RES[nginx,$n]}"
  read -r t1 _ <<<"${RES[trellis,$first]}"
  python3 - "$n" "$t" "$h" "$g" "$t1" <<'PY'
import sys
n, t, h, g, t1 = sys.argv[1], *map(float, sys.argv[2:])
print(f"rules={n}: trellis/haproxy={t/h:.2f} (target >= 1.2)  trellis/nginx={t/g:.2f}  trellis vs {int(t1) and 'first'} rule count={t/t1:.2f} (target >= 0.90)")
PY
done
