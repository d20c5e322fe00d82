#!/usr/bin/env bash
# What feeding a proxy costs CPU 0: wrk keep-alive through each subject (pinned to CPU 1) with wrk
# and the origin on CPU 0, in alternating rounds; per request, the subject's user and kernel time,
# all of CPU 0's time, and the origin's own time. `direct` is wrk straight to the origin.
#
#   ROUNDS=3 SECONDS_PER_RUN=5 bash bench/proxy/cross-cpu.sh [subjects...]
#
# Subjects: trellis, haproxy, floor, direct (default: all four). The origin is nginx's
# `return 200`, as in trellis-bench. See bench/README.md, "What feeding a proxy costs CPU 0".
set -uo pipefail
cd "$(dirname "$0")/../.."
DUR=${SECONDS_PER_RUN:-5}; ROUNDS=${ROUNDS:-3}; CONNS=${CONNS:-64}
SUBJECTS=${*:-"trellis haproxy floor direct"}
for t in wrk nginx haproxy taskset; do command -v "$t" >/dev/null || { echo "missing $t (apt-get install wrk nginx-light haproxy)"; exit 2; }; done
[ -x target/release/trellis-bench-floor ] || cargo build --release -p trellis-proxy -p trellis-bench
WORK=$(mktemp -d /tmp/trellis-cross-cpu.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; sleep 0.3; rm -rf "$WORK"; }
trap cleanup EXIT
. bench/proxy/common.sh
OP=$(free_port)
origin_conf $OP > $WORK/origin.conf
taskset -c 0 nginx -p "$WORK/" -c "$WORK/origin.conf" &
OPID=$!; PIDS+=($OPID)
wait_port $OP
declare -A PORT SPID
start() { local s=$1 port=$2
  case $s in
  trellis) trellis_toml $port $OP > $WORK/trellis.toml
    taskset -c 1 target/release/trellis-proxy sidecar --config $WORK/trellis.toml >/dev/null 2>$WORK/trellis.err & ;;
  floor) taskset -c 1 target/release/trellis-bench-floor 127.0.0.1:$port 127.0.0.1:$OP >/dev/null 2>&1 & ;;
  haproxy) haproxy_cfg $port $OP > $WORK/haproxy.cfg
    taskset -c 1 haproxy -f $WORK/haproxy.cfg >/dev/null 2>&1 & ;;
  *) echo "unknown subject $s"; exit 2 ;;
  esac
  SPID[$s]=$!; PIDS+=($!)
}
for s in $SUBJECTS; do
  if [[ $s == direct ]]; then PORT[$s]=$OP; SPID[$s]=$OPID; continue; fi
  p=$(free_port); PORT[$s]=$p; start $s $p; wait_port $p
done
sleep 0.5
for s in $SUBJECTS; do taskset -c 0 wrk -t1 -c$CONNS -d2s http://127.0.0.1:${PORT[$s]}/ >/dev/null 2>&1; done
ticks() { awk '{print $14, $15}' /proc/$1/stat; }
cpu0() { awk '$1=="cpu0" {print $2+$3+$4+$6+$7+$8}' /proc/stat; }
echo "$ROUNDS rounds x ${DUR}s; µs per request (direct: subject = the origin)"
printf "%-8s %5s %8s %7s %8s %8s %8s %8s\n" subject round req/s p99 user kernel cpu0 origin
subs=($SUBJECTS); n=${#subs[@]}
for r in $(seq $ROUNDS); do
  for i in $(seq 0 $((n-1))); do s=${subs[$(( (i + r) % n ))]}; sp=${SPID[$s]}
    read u0 k0 < <(ticks $sp); c0=$(cpu0); read ou0 ok0 < <(ticks $OPID)
    taskset -c 0 wrk -t1 -c$CONNS -d${DUR}s --latency http://127.0.0.1:${PORT[$s]}/ > $WORK/wrk.out 2>&1
    read u1 k1 < <(ticks $sp); c1=$(cpu0); read ou1 ok1 < <(ticks $OPID)
    rps=$(awk '/Requests\/sec/ {print $2}' $WORK/wrk.out); p99=$(awk '$1=="99%" {print $2}' $WORK/wrk.out)
    reqs=$(awk '/requests in/ {print $1}' $WORK/wrk.out)
    awk -v s=$s -v r=$r -v q=$rps -v p=$p99 -v n=$reqs -v u=$((u1-u0)) -v k=$((k1-k0)) -v c=$((c1-c0)) -v o=$((ou1+ok1-ou0-ok0)) \
      'BEGIN { printf "%-8s %5d %8.0f %7s %8.2f %8.2f %8.2f %8.2f\n", s, r, q, p, u*10000/n, k*10000/n, c*10000/n, o*10000/n }'
  done
done | tee $WORK/rows
echo "medians (req/s, CPU 0 µs/req, origin µs/req):"
for s in $SUBJECTS; do
  awk -v s=$s '$1==s {print $3, $7, $8}' $WORK/rows | sort -n | awk -v s=$s '{a[NR]=$0} END {printf "  %-8s %s\n", s, a[int((NR+1)/2)]}'
done
