#!/usr/bin/env bash
# L4 proxy, side by side in one run: the same bulk transfer (iperf3, 1 and 4 streams) and a
# short-connection rate test (wrk with "Connection: close" against an nginx backend: every request
# is a new TCP connection through the proxy) via direct (no proxy), svcd, HAProxy (mode tcp,
# splices by default) and nginx (stream) — every proxy with one worker thread.
#
#   benches/l4/throughput.sh [seconds] [rounds]      (defaults: 10 s, 3 rounds; medians printed)
#
# SVCD_BEFORE=PATH adds an earlier svcd build (benches/before_after.sh makes one) as the target
# svcd-before, configured as svcd, so a change is measured before and after in the same run.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-10}
ROUNDS=${2:-3}

source benches/common.sh
install_missing iperf3:iperf3 haproxy:haproxy nginx:nginx-light /usr/lib/nginx/modules/ngx_stream_module.so:libnginx-mod-stream wrk:wrk bc:bc

P_IPERF=$(free_port); P_WEB=$(free_port)
P_SVCD=$(free_port); P_SVCD_WEB=$(free_port)
P_HAP=$(free_port); P_HAP_WEB=$(free_port); P_NGX=$(free_port); P_NGX_WEB=$(free_port)

iperf3 -s -p "$P_IPERF" >/dev/null 2>&1 & pids+=($!)

# nginx backend (small static response) for the connection-rate test.
start_nginx_backend "$P_WEB"
mkdir -p "$work/ngx-proxy"

# svcd: one runtime worker, two L4 listeners (svcd_l4_config IPERF_PORT WEB_PORT).
svcd_l4_config() {
  echo "[proxy]
workers = 1
max_connections = 100000
[[proxy.http]]
listen = \"127.0.0.1:$(free_port)\"
[[proxy.tcp]]
listen = \"127.0.0.1:$1\"
service = \"iperf\"
[[proxy.tcp]]
listen = \"127.0.0.1:$2\"
service = \"web\"
[[registry.static]]
service = \"iperf\"
id = \"i1\"
ip = \"127.0.0.1\"
ports = { tcp = $P_IPERF }
[[registry.static]]
service = \"web\"
id = \"w1\"
ip = \"127.0.0.1\"
ports = { http = $P_WEB }
"
}
start_svcd "$(svcd_l4_config "$P_SVCD" "$P_SVCD_WEB")"
PID_SVCD=${pids[-1]}
TARGETS="direct svcd haproxy nginx"
if [ -n "${SVCD_BEFORE:-}" ]; then
  P_BEFORE=$(free_port); P_BEFORE_WEB=$(free_port)
  start_svcd "$(svcd_l4_config "$P_BEFORE" "$P_BEFORE_WEB")" svcd-before "$SVCD_BEFORE"
  PID_BEFORE=${pids[-1]}; TARGETS+=" svcd-before"
fi

cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 9000
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
listen iperf
  bind 127.0.0.1:$P_HAP
  server s1 127.0.0.1:$P_IPERF
listen web
  bind 127.0.0.1:$P_HAP_WEB
  server s1 127.0.0.1:$P_WEB
CONF
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 & pids+=($!); PID_HAP=${pids[-1]}

cat > "$work/ngx-proxy/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
pid $work/ngx-proxy/nginx.pid;
error_log $work/ngx-proxy/error.log;
events { worker_connections 20000; }
stream {
  server { listen 127.0.0.1:$P_NGX; proxy_pass 127.0.0.1:$P_IPERF; }
  server { listen 127.0.0.1:$P_NGX_WEB backlog=4096; proxy_pass 127.0.0.1:$P_WEB; }
}
CONF
nginx -c "$work/ngx-proxy/nginx.conf" -g 'daemon off;' & pids+=($!); PID_NGX=${pids[-1]}

for port in "$P_WEB" "$P_SVCD_WEB" "$P_HAP_WEB" "$P_NGX_WEB" ${P_BEFORE_WEB:-}; do
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.2; done
  curl -sf "http://127.0.0.1:$port/" >/dev/null || { echo "port $port not serving"; cat "$work/svcd.log" "$work"/ngx-*/error.log; ls -la "$work" "$work/www"; exit 1; }
done

gbps() { # port streams → Gbit/s received
  iperf3 -c 127.0.0.1 -p "$1" -P "$2" -t "$SECS" -J 2>/dev/null \
    | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
cps() { # port → "connections/s connections": requests with "Connection: close", one each
  wrk -t 1 -c 32 -d "${SECS}s" -H "Connection: close" "http://127.0.0.1:$1/" 2>/dev/null \
    | awk '/Requests\/sec/ {rps=$2} /requests in/ {n=$1} END {print rps, n}'
}
declare -A r
for round in $(seq "$ROUNDS"); do
  for t in $(rotated "$round" $TARGETS); do
    case $t in
      direct) p=$P_IPERF; w=$P_WEB; procs="";; svcd) p=$P_SVCD; w=$P_SVCD_WEB; procs=$PID_SVCD;;
      haproxy) p=$P_HAP; w=$P_HAP_WEB; procs=$PID_HAP;;
      svcd-before) p=$P_BEFORE; w=$P_BEFORE_WEB; procs=$PID_BEFORE;;
      nginx) p=$P_NGX; w=$P_NGX_WEB; procs="$PID_NGX $(pgrep -P "$PID_NGX" | tr '\n' ' ')";;
    esac
    r[$t.1]+="$(gbps "$p" 1) "; r[$t.4]+="$(gbps "$p" 4) "
    before=0; [ -n "$procs" ] && before=$(cpu_ticks $procs)
    read -r rate n < <(cps "$w")
    cpu=-; [ -n "$procs" ] && cpu=$(us_per_request $(( $(cpu_ticks $procs) - before )) "$n")
    r[$t.c]+="$rate "; r[$t.cpu]+="$cpu "
    echo "round $round $t: $rate conn/s, $cpu us CPU/conn" >&2
  done
done
echo
echo "L4 proxy, loopback, one worker thread per proxy, ${SECS}s x $ROUNDS rounds (medians); CPU = the proxy's user+system time per connection"
printf '%-12s %14s %14s %10s %12s\n' path "1 stream Gb/s" "4 streams Gb/s" "conn/s" "CPU us/conn"
for t in $TARGETS; do
  printf '%-12s %14s %14s %10s %12s\n' "$t" "$(echo "${r[$t.1]}" | median)" "$(echo "${r[$t.4]}" | median)" "$(echo "${r[$t.c]}" | median)" "$(echo "${r[$t.cpu]}" | median)"
done
s1=$(echo "${r[svcd.1]}" | median); h1=$(echo "${r[haproxy.1]}" | median)
s4=$(echo "${r[svcd.4]}" | median); h4=$(echo "${r[haproxy.4]}" | median)
sc=$(echo "${r[svcd.c]}" | median); hc=$(echo "${r[haproxy.c]}" | median); nc=$(echo "${r[nginx.c]}" | median)
n1=$(echo "${r[nginx.1]}" | median)
echo
printf 'svcd / haproxy: 1 stream %.2f, 4 streams %.2f, conn/s %.2f\n' "$(echo "$s1/$h1" | bc -l)" "$(echo "$s4/$h4" | bc -l)" "$(echo "$sc/$hc" | bc -l)"
printf 'svcd / nginx:   1 stream %.2f, conn/s %.2f\n' "$(echo "$s1/$n1" | bc -l)" "$(echo "$sc/$nc" | bc -l)"
sp=$(echo "${r[svcd.cpu]}" | median)
printf 'CPU per connection, svcd / haproxy %.2f, svcd / nginx %.2f (lower is better)\n' \
  "$(echo "$sp/$(echo "${r[haproxy.cpu]}" | median)" | bc -l)" "$(echo "$sp/$(echo "${r[nginx.cpu]}" | median)" | bc -l)"
if [ -n "${SVCD_BEFORE:-}" ]; then
  b1=$(echo "${r[svcd-before.1]}" | median); b4=$(echo "${r[svcd-before.4]}" | median); bc_=$(echo "${r[svcd-before.c]}" | median)
  printf 'svcd / svcd-before: 1 stream %.2f, 4 streams %.2f, conn/s %.2f, CPU per connection %.2f (lower is better)\n' \
    "$(echo "$s1/$b1" | bc -l)" "$(echo "$s4/$b4" | bc -l)" "$(echo "$sc/$bc_" | bc -l)" "$(echo "$sp/$(echo "${r[svcd-before.cpu]}" | median)" | bc -l)"
fi
