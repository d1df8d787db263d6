#!/usr/bin/env bash
# HTTP proxy, side by side in one run: wrk (HTTP/1.1 keep-alive, 64 connections) and h2load
# (HTTP/2 prior knowledge, 16 connections x 10 streams) against the same nginx backend directly,
# through svcd, through HAProxy (mode http, http-reuse always) and through nginx (proxy_pass with
# upstream keepalive) — every proxy with one worker thread. Prints medians and ratios, and the
# wrk p99 latency of each.
#
#   benches/http/throughput.sh [seconds] [rounds]      (defaults: 10 s, 3 rounds)
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-10}
ROUNDS=${2:-3}

source benches/common.sh
install_missing haproxy:haproxy nginx:nginx-light wrk:wrk h2load:nghttp2-client bc:bc

P_WEB=$(free_port); P_WEB2=$(free_port)
P_SVCD=$(free_port)
P_HAP=$(free_port); P_NGX=$(free_port); P_NGX2=$(free_port)

# nginx backend: a small static response, HTTP/1.1 on one port and h2c on another (nginx
# speaks h2c on a port only with prior knowledge).
start_nginx_backend "$P_WEB" "$P_WEB2"
mkdir -p "$work/ngx-proxy"

# svcd: one runtime worker; requests for host 127.0.0.1 routed to the backend.
start_svcd "[proxy]
workers = 1
[[proxy.http]]
listen = \"127.0.0.1:$P_SVCD\"
[[proxy.routes]]
host = \"127.0.0.1\"
service = \"web\"
[[registry.static]]
service = \"web\"
id = \"w1\"
ip = \"127.0.0.1\"
ports = { http = $P_WEB }
protocol = \"http\"
"

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
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 & pids+=($!)

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
nginx -c "$work/ngx-proxy/nginx.conf" -g 'daemon off;' & pids+=($!)

for port in "$P_WEB" "$P_SVCD" "$P_HAP" "$P_NGX"; do
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.2; done
  curl -sf "http://127.0.0.1:$port/" >/dev/null || { echo "port $port not serving"; cat "$work/svcd.log" "$work"/ngx-*/error.log "$work/haproxy.log"; exit 1; }
done

h1() { # port → "req/s p99_ms"
  wrk -t 1 -c 64 -d "${SECS}s" --latency "http://127.0.0.1:$1/" 2>/dev/null | awk '
    /Requests\/sec/ {rps=$2}
    / 99%/ {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v=v*1000}; p99=v}
    END {print rps, p99}'
}
h2() { # port → req/s
  h2load -t 1 -c 16 -m 10 -D "$SECS" "http://127.0.0.1:$1/" 2>/dev/null | awk '/^finished in/ {print $4}'
}
declare -A r
for round in $(seq "$ROUNDS"); do
  for t in direct svcd haproxy nginx; do
    case $t in
      direct) p=$P_WEB; p2=$P_WEB2;; svcd) p=$P_SVCD; p2=$P_SVCD;;
      haproxy) p=$P_HAP; p2=$P_HAP;; nginx) p=$P_NGX; p2=$P_NGX2;;
    esac
    read -r rps p99 < <(h1 "$p")
    h2rps=$(h2 "$p2")
    r[$t.h1]+="$rps "; r[$t.p99]+="$p99 "; r[$t.h2]+="$h2rps "
    echo "round $round $t: h1 $rps req/s (p99 $p99 ms), h2 $h2rps req/s" >&2
  done
done
echo
echo "HTTP proxy, loopback, one worker thread per proxy, ${SECS}s x $ROUNDS rounds (medians)"
printf '%-8s %14s %14s %16s\n' path "h1 req/s" "h1 p99 ms" "h2 req/s"
for t in direct svcd haproxy nginx; do
  printf '%-8s %14s %14s %16s\n' "$t" "$(echo "${r[$t.h1]}" | median)" "$(echo "${r[$t.p99]}" | median)" "$(echo "${r[$t.h2]}" | median)"
done
m() { echo "${r[$1]}" | median; }
echo
for peer in haproxy nginx; do
  printf 'svcd / %-8s h1 req/s %.2f, h2 req/s %.2f, h1 p99 %.2f (lower is better)\n' "$peer" \
    "$(echo "$(m svcd.h1)/$(m $peer.h1)" | bc -l)" "$(echo "$(m svcd.h2)/$(m $peer.h2)" | bc -l)" \
    "$(echo "$(m svcd.p99)/$(m $peer.p99)" | bc -l)"
done
