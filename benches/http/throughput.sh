#!/usr/bin/env bash
# HTTP proxy, side by side in one run: wrk (HTTP/1.1 keep-alive, 64 connections) and h2load
# (HTTP/2 prior knowledge, 16 connections x 10 streams) against the same nginx backend directly,
# through svcd (one worker: the HTTP/1.1 fast path, and hyper for every request as before it;
# and two workers), through HAProxy (mode http, http-reuse always, one thread) and through nginx
# (proxy_pass with upstream keepalive, one worker). Prints medians and ratios: req/s, wrk's p99,
# and each proxy's CPU time per request (user + system, from /proc: what the proxy itself costs,
# which req/s alone hides when the load generator and the backend share the machine's cores).
#
#   benches/http/throughput.sh [seconds] [rounds]      (defaults: 10 s, 3 rounds)
#
# SVCD_BEFORE=PATH adds an earlier svcd build (benches/before_after.sh makes one) as the target
# svcd-before, configured as svcd, so a change is measured before and after in the same run.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-10}
ROUNDS=${2:-3}

source benches/common.sh
install_missing haproxy:haproxy nginx:nginx-light wrk:wrk h2load:nghttp2-client bc:bc

P_WEB=$(free_port); P_WEB2=$(free_port)
P_SVCD=$(free_port); P_HYPER=$(free_port); P_SVCD2=$(free_port)
P_HAP=$(free_port); P_NGX=$(free_port); P_NGX2=$(free_port)

# nginx backend: a small static response, HTTP/1.1 on one port and h2c on another (nginx
# speaks h2c on a port only with prior knowledge).
start_nginx_backend "$P_WEB" "$P_WEB2"
mkdir -p "$work/ngx-proxy"

start_svcd "$(svcd_web_config "$P_SVCD" 1 "http1_fast_path = true")" svcd; PID_SVCD=${pids[-1]}
start_svcd "$(svcd_web_config "$P_HYPER" 1 "http1_fast_path = false")" svcd-hyper; PID_HYPER=${pids[-1]}
start_svcd "$(svcd_web_config "$P_SVCD2" 2 "http1_fast_path = true")" svcd-2w; PID_SVCD2=${pids[-1]}
TARGETS="direct svcd svcd-hyper svcd-2w haproxy nginx"
if [ -n "${SVCD_BEFORE:-}" ]; then
  P_BEFORE=$(free_port)
  start_svcd "$(svcd_web_config "$P_BEFORE" 1 "http1_fast_path = true")" svcd-before "$SVCD_BEFORE"
  PID_BEFORE=${pids[-1]}; TARGETS+=" svcd-before"
fi

cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 5000
defaults
  mode http
  timeout connect 5s
  timeout client 1m
  timeout server 1m
  http-reuse always
listen web
  bind 127.0.0.1:$P_HAP
  server s1 127.0.0.1:$P_WEB
CONF
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 & pids+=($!); PID_HAP=${pids[-1]}

cat > "$work/ngx-proxy/nginx.conf" <<CONF
worker_processes 1;
pid $work/ngx-proxy/nginx.pid;
error_log $work/ngx-proxy/error.log;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream web { server 127.0.0.1:$P_WEB; keepalive 64; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$P_NGX;
    listen 127.0.0.1:$P_NGX2 http2;
    location / { proxy_pass http://web; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
nginx -c "$work/ngx-proxy/nginx.conf" -g 'daemon off;' & pids+=($!); PID_NGX=${pids[-1]}

for port in "$P_WEB" "$P_SVCD" "$P_HYPER" "$P_SVCD2" "$P_HAP" "$P_NGX" ${P_BEFORE:-}; do
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.2; done
  curl -sf "http://127.0.0.1:$port/" >/dev/null || { echo "port $port not serving"; cat "$work"/*.log "$work"/ngx-*/error.log; exit 1; }
done

h1() { # port → "req/s p99_ms requests"
  wrk -t 1 -c 64 -d "${SECS}s" --latency "http://127.0.0.1:$1/" 2>/dev/null | awk '
    /Requests\/sec/ {rps=$2}
    /requests in/ {n=$1}
    / 99%/ {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v=v*1000}; p99=v}
    END {print rps, p99, n}'
}
h2() { # port → "req/s requests"
  h2load -t 1 -c 16 -m 10 -D "$SECS" "http://127.0.0.1:$1/" 2>/dev/null \
    | awk '/^finished in/ {rps=$4} /^requests:/ {n=$8} END {print rps, n}'
}
declare -A r
for round in $(seq "$ROUNDS"); do
  for t in $(rotated "$round" $TARGETS); do
    case $t in
      direct) p=$P_WEB; p2=$P_WEB2; procs="";;
      svcd) p=$P_SVCD; p2=$P_SVCD; procs=$PID_SVCD;;
      svcd-hyper) p=$P_HYPER; p2=$P_HYPER; procs=$PID_HYPER;;
      svcd-2w) p=$P_SVCD2; p2=$P_SVCD2; procs=$PID_SVCD2;;
      svcd-before) p=$P_BEFORE; p2=$P_BEFORE; procs=$PID_BEFORE;;
      haproxy) p=$P_HAP; p2=$P_HAP; procs=$PID_HAP;;
      nginx) p=$P_NGX; p2=$P_NGX2; procs="$PID_NGX $(pgrep -P "$PID_NGX" | tr '\n' ' ')";;
    esac
    before=0; [ -n "$procs" ] && before=$(cpu_ticks $procs)
    read -r rps p99 n < <(h1 "$p")
    cpu1=-; [ -n "$procs" ] && cpu1=$(us_per_request $(( $(cpu_ticks $procs) - before )) "$n")
    before=0; [ -n "$procs" ] && before=$(cpu_ticks $procs)
    read -r h2rps n2 < <(h2 "$p2")
    cpu2=-; [ -n "$procs" ] && cpu2=$(us_per_request $(( $(cpu_ticks $procs) - before )) "$n2")
    r[$t.h1]+="$rps "; r[$t.p99]+="$p99 "; r[$t.h2]+="$h2rps "; r[$t.cpu1]+="$cpu1 "; r[$t.cpu2]+="$cpu2 "
    echo "round $round $t: h1 $rps req/s (p99 $p99 ms, $cpu1 us CPU/req), h2 $h2rps req/s ($cpu2 us CPU/req)" >&2
  done
done
m() { echo "${r[$1]}" | median; }
echo
echo "HTTP proxy, loopback, ${SECS}s x $ROUNDS rounds (medians); CPU = the proxy's user+system time per request"
printf '%-12s %11s %10s %13s %11s %13s\n' path "h1 req/s" "h1 p99 ms" "h1 CPU us/req" "h2 req/s" "h2 CPU us/req"
for t in $TARGETS; do
  printf '%-12s %11s %10s %13s %11s %13s\n' "$t" "$(m $t.h1)" "$(m $t.p99)" "$(m $t.cpu1)" "$(m $t.h2)" "$(m $t.cpu2)"
done
echo
ratio() { echo "$1 / $2" | bc -l | xargs printf '%.2f'; }
PEERS="haproxy nginx"; [ -n "${SVCD_BEFORE:-}" ] && PEERS+=" svcd-before"
for peer in $PEERS; do
  echo "svcd / $peer: h1 req/s $(ratio "$(m svcd.h1)" "$(m $peer.h1)"), h2 req/s $(ratio "$(m svcd.h2)" "$(m $peer.h2)"), h1 p99 $(ratio "$(m svcd.p99)" "$(m $peer.p99)") (lower is better), CPU per h1 request $(ratio "$(m svcd.cpu1)" "$(m $peer.cpu1)"), per h2 request $(ratio "$(m svcd.cpu2)" "$(m $peer.cpu2)") (lower is better)"
done
echo "svcd fast path / hyper path: h1 req/s $(ratio "$(m svcd.h1)" "$(m svcd-hyper.h1)"), CPU per h1 request $(ratio "$(m svcd.cpu1)" "$(m svcd-hyper.cpu1)")"
echo "svcd 2 workers / 1 worker: h1 req/s $(ratio "$(m svcd-2w.h1)" "$(m svcd.h1)"), h2 req/s $(ratio "$(m svcd-2w.h2)" "$(m svcd.h2)")"
