# Sourced by the benchmark scripts (from the repository root): peers installed when missing,
# svcd built in release, a work dir whose processes are stopped and files removed on exit, free
# loopback ports, medians.

# install_missing CMD:PACKAGE ... — CMD is a command name, or an absolute path that must exist.
install_missing() {
  local need=() pair cmd
  for pair in "$@"; do
    cmd=${pair%%:*}
    if [[ $cmd == /* ]]; then [ -e "$cmd" ] || need+=("${pair#*:}")
    else command -v "$cmd" >/dev/null || need+=("${pair#*:}"); fi
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  scripts/setup
  # SVCD_BIN: a build made elsewhere (benches/before_after.sh's), used instead of this tree's.
  [ -n "${SVCD_BIN:-}" ] || cargo build --release --bin svcd -q
}

work=$(mktemp -d)
chmod 755 "$work"  # nginx workers run as www-data
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# rotated ROUND ITEM... — the items, starting at the ROUND-th (round 1: as given). Each target
# then runs first, last and in between across rounds: a connection-rate run leaves tens of
# thousands of sockets in TIME_WAIT, and whoever runs right after pays for them.
rotated() {
  local round=$1; shift
  local n=$# i
  for ((i = 0; i < n; i++)); do
    local k=$(( (i + round - 1) % n + 1 ))
    printf '%s ' "${!k}"
  done
}

# Median of whitespace-separated numbers on stdin.
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# start_nginx_backend PORT [H2C_PORT] — one nginx worker serving a small static file ("ok") over
# HTTP/1.1 on PORT and, when given, h2c (prior knowledge only) on H2C_PORT.
start_nginx_backend() {
  local h2=""
  [ -n "${2:-}" ] && h2="server { listen 127.0.0.1:$2 http2; root $work/www; }"
  mkdir -p "$work/www" "$work/ngx-backend"
  echo ok > "$work/www/index.html"
  cat > "$work/ngx-backend/nginx.conf" <<CONF
worker_processes 1;
pid $work/ngx-backend/nginx.pid;
error_log $work/ngx-backend/error.log;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$1 backlog=4096; root $work/www; }
  $h2
}
CONF
  nginx -c "$work/ngx-backend/nginx.conf" -g 'daemon off;' & pids+=($!)
}

# start_svcd TOML [NAME [BINARY]] — svcd (release, $SVCD_BIN, or BINARY: an earlier build) with its admin and DNS on free ports, one DNS worker,
# warn logging, plus TOML (listeners, [proxy], registrations); its config and log are
# $work/NAME.toml and $work/NAME.log (NAME defaults to svcd).
start_svcd() {
  local name=${2:-svcd}
  cat > "$work/$name.toml" <<CONF
[admin]
listen = "127.0.0.1:$(free_port)"
[dns]
listen = "127.0.0.1:$(free_port)"
workers = 1
[log]
level = "warn"
$1
CONF
  "${3:-${SVCD_BIN:-target/release/svcd}}" run --config "$work/$name.toml" 2>"$work/$name.log" & pids+=($!)
}

# svcd_web_config PORT WORKERS L7_KEYS — an HTTP listener on PORT routing host 127.0.0.1 to the
# backend on $P_WEB, with WORKERS proxy workers and L7_KEYS under [proxy.l7].
svcd_web_config() {
  echo "[proxy]
workers = $2
[proxy.l7]
$3
[[proxy.http]]
listen = \"127.0.0.1:$1\"
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

# cpu_ticks PID... — user + system CPU of the processes (all their threads), in clock ticks.
cpu_ticks() {
  local total=0 pid
  for pid in "$@"; do total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat"))); done
  echo "$total"
}

# us_per_request TICKS REQUESTS — CPU microseconds per request.
us_per_request() {
  echo "$1 * 1000000 / $(getconf CLK_TCK) / $2" | bc -l | xargs printf '%.1f'
}

# wait_for_dns PORT NAME COUNT — until the server on PORT answers NAME with COUNT A records (10 s);
# else print what it answers and the work dir's logs, and fail.
wait_for_dns() {
  local port=$1 name=$2 count=$3 f
  for _ in $(seq 50); do
    [ "$(dig +short +time=1 +tries=1 @127.0.0.1 -p "$port" "$name" A | wc -l)" = "$count" ] && return 0
    sleep 0.2
  done
  echo "server on $port not answering $count records for $name"
  dig @127.0.0.1 -p "$port" "$name" A || true
  for f in "$work"/*.log; do echo "== $f"; tail -n 5 "$f"; done
  return 1
}

# dnsperf_qps PORT QUERIES SECONDS — QPS of dnsperf (16 clients, 200 outstanding) on PORT.
dnsperf_qps() {
  dnsperf -s 127.0.0.1 -p "$1" -d "$2" -l "$3" -c 16 -q 200 -T 1 2>/dev/null \
    | awk '/Queries per second/ {print $4}'
}

# dns_compare TITLE NAME svcd=PORT peer=PORT ... — waits until each server answers NAME with 3 A
# records, runs $ROUNDS rounds of dnsperf ($SECONDS_PER_RUN s each, servers alternating), then
# prints each server's median QPS and svcd's ratio to it. svcd comes first.
dns_compare() {
  local title=$1 name=$2; shift 2
  local servers=() ports=() pair server round qps
  for pair in "$@"; do servers+=("${pair%%=*}"); ports+=("${pair#*=}"); done
  for i in "${!servers[@]}"; do wait_for_dns "${ports[$i]}" "$name" 3; done
  echo "$name A" > "$work/queries"
  declare -A results
  for round in $(seq "$ROUNDS"); do
    for i in "${!servers[@]}"; do
      qps=$(dnsperf_qps "${ports[$i]}" "$work/queries" "$SECONDS_PER_RUN")
      results[${servers[$i]}]+="$qps "
      echo "round $round: ${servers[$i]} $qps qps" >&2
    done
  done
  local svcd
  svcd=$(echo "${results[svcd]}" | median)
  echo
  echo "$title, dnsperf -c 16 -q 200 -T 1, ${SECONDS_PER_RUN}s x $ROUNDS rounds"
  printf '%-12s %12s %14s\n' server "median QPS" "svcd / server"
  for server in "${servers[@]}"; do
    qps=$(echo "${results[$server]}" | median)
    printf '%-12s %12.0f %14.2f\n' "$server" "$qps" "$(echo "$svcd / $qps" | bc -l)"
  done
}
