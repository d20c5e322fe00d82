# Sourced by bench/proxy/run.sh and bench/proxy/cross-cpu.sh: the helpers and the configs both give
# the origin and the subjects, in one place so that both scripts measure the same setup.
# The functions write into $WORK, which the caller sets.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened"; exit 1; }

# nginx's main and events blocks for the instance named $1 (single process, one worker).
nginx_common() { cat <<C
daemon off; master_process off; user root; worker_processes 1;
pid $WORK/nginx-$1.pid; error_log $WORK/nginx-$1.err warn; worker_rlimit_nofile 65536;
events { worker_connections 16384; multi_accept on; }
C
}
temp_paths() { echo "client_body_temp_path $WORK/nb-$1; proxy_temp_path $WORK/np-$1; fastcgi_temp_path $WORK/nf-$1; uwsgi_temp_path $WORK/nu-$1; scgi_temp_path $WORK/ns-$1;"; }

# The origin on port $1: nginx `return 200` (as in trellis-bench), after any location blocks in $2.
origin_conf() {
  local port=$1 extra=${2:-}
  nginx_common origin; cat <<C
http { $(temp_paths origin) access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$port reuseport backlog=4096;
    $extra
    location / { default_type text/plain; return 200 "hello from the origin\n"; } } }
C
}

# trellis sidecar on local port $1 in front of the origin on port $2: one worker, static cluster.
trellis_toml() { cat <<C
[identity]
namespace = "bench.local"
service = "bench"
[admin]
listen = "127.0.0.1:0"
[runtime]
worker_threads = 1
[outbound]
upstreams = [{ service = "origin", local_port = $1, danger_plaintext = true }]
[[clusters]]
service = "origin"
endpoints = [{ address = "127.0.0.1:$2" }]
C
}

# HAProxy on port $1 in front of the origin on port $2: one thread, keep-alive both ways.
haproxy_cfg() { cat <<C
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend f
  bind 127.0.0.1:$1
  default_backend b
backend b
  server origin 127.0.0.1:$2
C
}
