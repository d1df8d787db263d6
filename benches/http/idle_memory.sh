#!/usr/bin/env bash
# Memory per idle keep-alive client connection, side by side: 10,000 clients (by default) each
# send one HTTP/1.1 request through the proxy, read the answer and then stay connected, idle.
# Prints the growth of each proxy's resident memory (VmRSS) over the idle connections, per
# connection: svcd (one worker), HAProxy (one thread, http-reuse always) and nginx (one worker,
# upstream keepalive). Each proxy's keep-alive timeout is a minute, longer than the run.
#
#   benches/http/idle_memory.sh [connections] [rounds]     (defaults: 10000, 3; medians printed)
set -euo pipefail
cd "$(dirname "$0")/../.."
CONNS=${1:-10000}
ROUNDS=${2:-3}

source benches/common.sh
install_missing haproxy:haproxy nginx:nginx-light python3:python3 bc:bc
ulimit -n "$(ulimit -Hn)"
# The open-file limit caps the run: HAProxy reserves two descriptors per connection (client and
# server) and refuses to start without them, and svcd lets one listener hold at most half of its
# descriptor budget (the limit less an eighth kept for admin and DNS; proxy/src/fds.rs).
LIMIT=$(ulimit -n)
FIT=$(( (LIMIT - 1100) / 2 ))
SVCD_FIT=$(( (LIMIT - LIMIT / 8) / 2 - 100 ))
[ "$SVCD_FIT" -lt "$FIT" ] && FIT=$SVCD_FIT
if [ "$CONNS" -gt "$FIT" ]; then
  echo "open-file limit $LIMIT: measuring $FIT connections, not $CONNS" >&2
  CONNS=$FIT
fi

P_WEB=$(free_port); P_SVCD=$(free_port); P_HAP=$(free_port); P_NGX=$(free_port)
start_nginx_backend "$P_WEB"
mkdir -p "$work/ngx-proxy"
# Each round starts every proxy afresh: memory a process freed stays mapped (the allocator keeps
# it for reuse), so a second measure in the same process would see the first's pages.
start_proxy() { # NAME → starts it; sets PROCS and PORT
  case $1 in
    svcd)
      start_svcd "$(svcd_web_config "$P_SVCD" 1 'header_read_timeout = "60s"')"
      PROCS=${pids[-1]}; PORT=$P_SVCD;;
    haproxy)
      cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  ulimit-n $(ulimit -n)
  maxconn $((CONNS + 500))
defaults
  mode http
  maxconn $((CONNS + 500))
  timeout connect 5s
  timeout client 1m
  timeout server 1m
  timeout http-keep-alive 1m
  http-reuse always
listen web
  bind 127.0.0.1:$P_HAP
  server s1 127.0.0.1:$P_WEB
CONF
      haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 & pids+=($!)
      PROCS=${pids[-1]}; PORT=$P_HAP;;
    nginx)
      cat > "$work/ngx-proxy/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile $(ulimit -n);
pid $work/ngx-proxy/nginx.pid;
error_log $work/ngx-proxy/error.log;
events { worker_connections $((CONNS * 2 + 1000)); }
http {
  access_log off;
  keepalive_timeout 60s;
  keepalive_requests 1000000;
  upstream web { server 127.0.0.1:$P_WEB; keepalive 64; }
  server {
    listen 127.0.0.1:$P_NGX backlog=4096;
    location / { proxy_pass http://web; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
      nginx -c "$work/ngx-proxy/nginx.conf" -g 'daemon off;' & pids+=($!)
      PORT=$P_NGX; sleep 0.5; PROCS="${pids[-1]} $(pgrep -P "${pids[-1]}" | tr '\n' ' ')";;
  esac
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 0.2; done
  curl -sf "http://127.0.0.1:$PORT/" >/dev/null || { echo "$1 not serving"; cat "$work"/*.log; exit 1; }
}

# The clients: open CONNS connections, one request each, then signal and hold until stdin closes.
cat > "$work/idle_clients.py" <<'PY'
import asyncio, sys
port, conns = int(sys.argv[1]), int(sys.argv[2])
REQ = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
async def one(held):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(REQ)
    head = await r.readuntil(b"\r\n\r\n")
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    await r.readexactly(length)
    held.append(w)
async def main():
    held = []
    for start in range(0, conns, 500):
        await asyncio.gather(*(one(held) for _ in range(min(500, conns - start))))
    print(len(held), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
PY

rss_kb() { # PID... → summed VmRSS in kB
  local total=0 pid
  for pid in "$@"; do total=$((total + $(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status"))); done
  echo "$total"
}
declare -A r
for round in $(seq "$ROUNDS"); do
  for t in svcd haproxy nginx; do
    start_proxy "$t"
    procs=$PROCS; port=$PORT
    # Warm: a few hundred requests on a few connections, as the clients' single requests will.
    for _ in $(seq 20); do curl -sf "http://127.0.0.1:$port/" "http://127.0.0.1:$port/" >/dev/null; done
    sleep 0.5
    before=$(rss_kb $procs)
    exec {hold}> >(python3 "$work/idle_clients.py" "$port" "$CONNS" > "$work/held" 2>"$work/clients.err")
    for _ in $(seq 600); do [ -s "$work/held" ] && break; sleep 0.1; done
    held=$(cat "$work/held")
    [ "$held" = "$CONNS" ] || { echo "$t: only '$held' connections held"; cat "$work/clients.err"; exit 1; }
    sleep 1
    after=$(rss_kb $procs)
    exec {hold}>&-
    per=$(echo "($after - $before) * 1024 / $CONNS" | bc)
    r[$t]+="$per "
    echo "round $round $t: RSS $before kB -> $after kB with $CONNS idle connections: $per bytes each" >&2
    : > "$work/held"
    kill $procs 2>/dev/null || true
    wait $procs 2>/dev/null || true
  done
done
m() { echo "${r[$1]}" | median; }
echo
echo "Resident memory per idle keep-alive client connection ($CONNS connections, one request each, $ROUNDS rounds, medians)"
printf '%-8s %14s\n' proxy "bytes / conn"
for t in svcd haproxy nginx; do printf '%-8s %14s\n' "$t" "$(m $t)"; done
echo
for peer in haproxy nginx; do
  echo "svcd / $peer: $(echo "$(m svcd) / $(m $peer)" | bc -l | xargs printf '%.2f') (lower is better)"
done
