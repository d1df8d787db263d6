#!/usr/bin/env bash
# A fleet on one etcd (issue #28): one 3-member etcd cluster holding a 10,000-endpoint registry
# (1,000 services x 10, the shape of benches/registry_scale.rs) and N svcd daemons watching it,
# each with 3 registrations of its own under its lease. For each N, directly on the members and
# then through `etcd grpc-proxy start` (one upstream watch for all), it measures:
#
#   - a change on one daemon -> visible on all N: ROUNDS changes (register, then deregister, an
#     instance, on a different daemon each time), each timed from the write until every daemon's
#     blocking query (GET /v1/services/fleet/probe?index=N, one parked per daemon) answers with
#     it; p50/p99 over all (daemon, change) samples and of the slowest daemon per change;
#   - the etcd members' RSS per daemon ((RSS with the fleet synced - RSS before) / N, summed over
#     the members, and the largest member's share), and their CPU: per daemon started (listing
#     10,000 keys, watch, lease), per second idle (progress requests, keep-alives) and per change;
#   - bytes the members sent per change (etcd_network_client_grpc_sent_bytes_total);
#   - through the proxy, the same plus the proxy's RSS and CPU.
#
# Every configuration gets a fresh cluster (its RSS starts from the same point), loaded once
# before its daemons start. A summary table comes last.
#
#   benches/fleet.sh [N...]          (default: 50 200)
#
# ROUNDS (default 40) changes per configuration, IDLE seconds (default 15) of idle measurement,
# BATCH (default 25) daemons started at a time, MODES (default "direct proxy").
# SVCD_BIN: the svcd binary (default target/release/svcd, built when SVCD_BIN is unset).
# Needs: etcd and etcdctl 3.4+ (etcd-server, etcd-client), python3, curl; ~25 MB of RAM per
# daemon. The figures and how to read them: docs/scale.md.
#
# The daemons' own registrations are made through the admin API once every daemon has synced,
# not as [[registry.static]] entries written while the others start and list.
#
# svcd 53ccbae on etcd 3.4.23 loses writes here (docs/scale.md, "What the fleet found"): a
# progress notification can carry a revision below the events the member already sent, which
# the daemon takes for a store gone back in time, and re-lists; a listing of more than one page
# that a write races claims the newer revision and leaves the write out until the next re-list.
# The script counts what that costs instead of stopping at the first miss: own registrations
# answered "visible": false (a daemon still short of them is restarted: its new listing races
# nothing), changes a daemon did not see within 30 s, re-lists in the fleet. It still fails
# (exit 1, after the table) when any of that happened or a daemon does not converge.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(50 200)
ROUNDS=${ROUNDS:-40}
IDLE=${IDLE:-15}
BATCH=${BATCH:-25}
read -r -a MODES <<< "${MODES:-direct proxy}"
SERVICES=1000
PER_SERVICE=10
OWN=3
ENDPOINTS=$((SERVICES * PER_SERVICE))

source benches/common.sh
install_missing etcd:etcd-server etcdctl:etcd-client python3:python3 curl:curl
for cmd in etcd etcdctl python3 curl; do
  command -v "$cmd" >/dev/null || { echo "fleet.sh: $cmd is missing after install" >&2; exit 1; }
done
SVCD=${SVCD_BIN:-target/release/svcd}
[ -x "$SVCD" ] || { echo "fleet.sh: no svcd binary at $SVCD" >&2; exit 1; }
export ETCDCTL_API=3
fleet() { python3 benches/fleet.py "$@"; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
HZ=$(getconf CLK_TCK)

# The configuration's processes: stopped at the end of each configuration, and on exit (before
# common.sh's cleanup) — the daemons with SIGKILL: their cluster is thrown away with them, and
# 200 daemons marking their registrations draining would only churn it.
daemon_pids=()
etcd_pids=()
stop_config() {
  local p
  for p in "${daemon_pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${daemon_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for p in "${etcd_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${etcd_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  daemon_pids=()
  etcd_pids=()
}
trap 'stop_config; cleanup' EXIT

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
sum_rss_kb() { local t=0 p; for p in "$@"; do t=$((t + $(rss_kb "$p"))); done; echo "$t"; }
etcd_metric() { fleet etcd-metrics "$@" | tr ' ' '\n' | awk -F= -v k="$M" '$1 == k {print $2}'; }

# until_ok SECONDS WHAT CMD... — runs CMD every 100 ms until it succeeds; fails naming WHAT.
until_ok() {
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "fleet.sh: $what not within $1 s; last try:" >&2
      "$@" >&2 || true
      return 1
    fi
    sleep 0.1
  done
}

# fail_with_logs DIR — what the daemons and etcd logged (warnings counted), then exit 1.
fail_with_logs() {
  echo "fleet.sh: failed; the daemons' log lines (counted, timestamps dropped):" >&2
  cat "$1"/svcd-*.log | cut -d' ' -f2- | sed -E 's/[0-9]{3,}/N/g' | sort | uniq -c | sort -rn | head -20 >&2
  for f in "$1"/m?.log "$1"/proxy.log; do
    [ -f "$f" ] && { echo "== $f" >&2; tail -n 5 "$f" >&2; }
  done
  exit 1
}

# start_cluster DIR — a fresh 3-member cluster; sets CLIENTS (host:port each) and etcd_pids.
start_cluster() {
  local dir=$1 ports initial="" i
  read -r -a ports <<< "$(fleet ports 6)"
  CLIENTS=()
  for i in 0 1 2; do
    initial+="${initial:+,}m$i=http://127.0.0.1:${ports[$((i + 3))]}"
    CLIENTS+=("127.0.0.1:${ports[$i]}")
  done
  for i in 0 1 2; do
    etcd --name "m$i" --data-dir "$dir/m$i" \
      --listen-client-urls "http://${CLIENTS[$i]}" --advertise-client-urls "http://${CLIENTS[$i]}" \
      --listen-peer-urls "http://127.0.0.1:${ports[$((i + 3))]}" \
      --initial-advertise-peer-urls "http://127.0.0.1:${ports[$((i + 3))]}" \
      --initial-cluster "$initial" --initial-cluster-state new \
      --logger zap --log-level error 2>"$dir/m$i.log" &
    etcd_pids+=($!); pids+=($!)
  done
  MEMBER_PIDS=("${etcd_pids[@]}")
  local all; all=$(IFS=,; echo "${CLIENTS[*]}")
  until_ok 30 "etcd cluster healthy" etcdctl --endpoints="$all" endpoint health
}

# daemon_config K ADMIN DNS ENDPOINTS — daemon K's svcd.toml. No proxy listener, one DNS worker;
# max_service_series = 1 keeps /metrics small (the bench reads a gauge there before every change).
daemon_config() {
  cat <<CONF
[admin]
listen = "127.0.0.1:$2"
max_service_series = 1
[dns]
listen = "127.0.0.1:$3"
workers = 1
[proxy]
workers = 1
http = []
[log]
level = "warn"
[registry]
node = "fleet-$1"
advertise_ip = "127.0.0.1"
[registry.etcd]
endpoints = [$4]
CONF
}

figures=()
# run_config N MODE — one configuration; appends a line of figures to figures.
run_config() {
  local n=$1 mode=$2 dir="$work/$2-$1"
  mkdir -p "$dir"
  echo "== N=$n, $mode" >&2
  start_cluster "$dir"
  local all; all=$(IFS=,; echo "${CLIENTS[*]}")
  fleet load "${CLIENTS[0]}" "$SERVICES" "$PER_SERVICE"
  local targets proxy_pid="" proxy_metrics=""
  if [ "$mode" = proxy ]; then
    local pp; read -r -a pp <<< "$(fleet ports 2)"
    etcd grpc-proxy start --endpoints="$all" --listen-addr="127.0.0.1:${pp[0]}" \
      --metrics-addr="http://127.0.0.1:${pp[1]}" --data-dir "$dir/proxy" 2>"$dir/proxy.log" &
    proxy_pid=$!; etcd_pids+=($!); pids+=($!)
    until_ok 30 "grpc-proxy answering" etcdctl --endpoints="127.0.0.1:${pp[0]}" get /svcd/v1/store-id
    targets="\"127.0.0.1:${pp[0]}\""
    proxy_metrics="127.0.0.1:${pp[1]}"
  else
    targets=$(printf '"%s", ' "${CLIENTS[@]}"); targets=${targets%, }
  fi
  # Direct, each daemon is given one member (daemon k: member k mod 3; one connection each, as
  # nodes pointed at their zone's member) unless DAEMON_ENDPOINTS=all: given all three, a daemon
  # may also list on one member and watch on another that is behind it, one more way to see a
  # progress revision below its own and re-list.
  local spread=""
  [ "$mode" = direct ] && [ "${DAEMON_ENDPOINTS:-one}" = one ] && spread=1

  # Before: the registry loaded, no daemon.
  local rss0 rss0_each=() p
  rss0=$(sum_rss_kb "${MEMBER_PIDS[@]}")
  for p in "${MEMBER_PIDS[@]}"; do rss0_each+=("$(rss_kb "$p")"); done
  local prss0=0; [ -z "$proxy_pid" ] || prss0=$(rss_kb "$proxy_pid")
  # Idle with no daemon: the members' own background (raft heartbeats, ...), subtracted below.
  local tz0 cz0 tz1 cz1
  tz0=$(date +%s.%N); cz0=$(cpu_ticks "${MEMBER_PIDS[@]}")
  sleep "$IDLE"  # the measurement window itself, not a wait for anything
  tz1=$(date +%s.%N); cz1=$(cpu_ticks "${MEMBER_PIDS[@]}")
  local cpu_start; cpu_start=$(cpu_ticks "${MEMBER_PIDS[@]}")
  local pcpu_start=0; [ -z "$proxy_pid" ] || pcpu_start=$(cpu_ticks "$proxy_pid")

  # The fleet, BATCH at a time, each batch ready (synced with the registry) before the next.
  local ports admin=() k
  read -r -a ports <<< "$(fleet ports $((2 * n)))"
  local started_at=$SECONDS
  for ((k = 0; k < n; k++)); do
    admin+=("${ports[$((2 * k))]}")
    [ -z "$spread" ] || targets="\"${CLIENTS[$((k % 3))]}\""
    daemon_config "$k" "${ports[$((2 * k))]}" "${ports[$((2 * k + 1))]}" "$targets" > "$dir/svcd-$k.toml"
    "$SVCD" run --config "$dir/svcd-$k.toml" 2>"$dir/svcd-$k.log" &
    daemon_pids+=($!); pids+=($!)
    if (( (k + 1) % BATCH == 0 || k + 1 == n )); then
      fleet synced "$ENDPOINTS" 120 "${admin[@]:$(( k / BATCH * BATCH ))}" || fail_with_logs "$dir"
    fi
  done
  local startup_s=$((SECONDS - started_at))
  local cpu_started; cpu_started=$(cpu_ticks "${MEMBER_PIDS[@]}")
  local pcpu_started=0; [ -z "$proxy_pid" ] || pcpu_started=$(cpu_ticks "$proxy_pid")
  # Each daemon's own registrations, then every daemon holding all of it.
  fleet own "$OWN" "$dir/own.json" "${admin[@]}" || fail_with_logs "$dir"
  # A daemon that lost one of those writes (see the top) holds it only after its next re-list: it
  # is restarted (its listing then races nothing), registers its own again under a new lease
  # (the old one's keys may have expired meanwhile), and the fleet is checked again. Counted as
  # "restarted".
  local total=$((ENDPOINTS + OWN * n)) short restarted=0 attempt port
  for attempt in 1 2 3 4 5; do
    read -r -a short <<< "$(fleet converge "$total" 20 "${admin[@]}")"
    [ ${#short[@]} -gt 0 ] || break
    echo "fleet.sh: ${#short[@]} daemons short of $total endpoints; restarting them (attempt $attempt)" >&2
    restarted=$((restarted + ${#short[@]}))
    for port in "${short[@]}"; do
      for ((k = 0; k < n; k++)); do
        [ "${admin[$k]}" = "$port" ] || continue
        kill -9 "${daemon_pids[$k]}"; wait "${daemon_pids[$k]}" 2>/dev/null || true
        "$SVCD" run --config "$dir/svcd-$k.toml" 2>>"$dir/svcd-$k.log" &
        daemon_pids[k]=$!; pids+=($!)
      done
    done
    fleet synced 0 60 "${short[@]}" || fail_with_logs "$dir"
    fleet own "$OWN" "$dir/own-again.json" "${short[@]}" || fail_with_logs "$dir"
  done
  fleet synced "$total" 60 "${admin[@]}" || fail_with_logs "$dir"

  # Synced: RSS, watchers.
  local rss1 rss1_each=()
  rss1=$(sum_rss_kb "${MEMBER_PIDS[@]}")
  for p in "${MEMBER_PIDS[@]}"; do rss1_each+=("$(rss_kb "$p")"); done
  local prss1=0; [ -z "$proxy_pid" ] || prss1=$(rss_kb "$proxy_pid")
  local watchers; watchers=$(M=etcd_debugging_mvcc_watcher_total etcd_metric "${CLIENTS[@]}")
  local svcd_rss; svcd_rss=$(sum_rss_kb "${daemon_pids[@]}")

  # Idle: IDLE seconds with the fleet watching and nothing changing.
  local reconnects0; reconnects0=$(cat "$dir"/svcd-*.log | grep -c "reconnecting\|resuming" || true)
  local t0 c0 pc0 b0 t1 c1 pc1 b1
  M=etcd_network_client_grpc_sent_bytes_total
  t0=$(date +%s.%N); c0=$(cpu_ticks "${MEMBER_PIDS[@]}"); b0=$(etcd_metric "${CLIENTS[@]}")
  pc0=0; [ -z "$proxy_pid" ] || pc0=$(cpu_ticks "$proxy_pid")
  sleep "$IDLE"  # the measurement window itself, not a wait for anything
  t1=$(date +%s.%N); c1=$(cpu_ticks "${MEMBER_PIDS[@]}"); b1=$(etcd_metric "${CLIENTS[@]}")
  pc1=0; [ -z "$proxy_pid" ] || pc1=$(cpu_ticks "$proxy_pid")
  local reconnects1; reconnects1=$(cat "$dir"/svcd-*.log | grep -c "reconnecting\|resuming" || true)

  # Changes.
  local t2 c2 pc2 b2 t3 c3 pc3 b3
  t2=$(date +%s.%N); c2=$(cpu_ticks "${MEMBER_PIDS[@]}"); b2=$(etcd_metric "${CLIENTS[@]}")
  pc2=0; [ -z "$proxy_pid" ] || pc2=$(cpu_ticks "$proxy_pid")
  fleet rounds "$ROUNDS" "${CLIENTS[0]}" "$dir/rounds.json" "${admin[@]}" || fail_with_logs "$dir"
  t3=$(date +%s.%N); c3=$(cpu_ticks "${MEMBER_PIDS[@]}"); b3=$(etcd_metric "${CLIENTS[@]}")
  pc3=0; [ -z "$proxy_pid" ] || pc3=$(cpu_ticks "$proxy_pid")
  fleet relists "$dir/relists.json" "${admin[@]}"
  local rss2; rss2=$(sum_rss_kb "${MEMBER_PIDS[@]}")
  local prss2=0; [ -z "$proxy_pid" ] || prss2=$(rss_kb "$proxy_pid")
  local coalescing=""
  if [ -n "$proxy_metrics" ]; then
    coalescing=$(curl -sf "http://$proxy_metrics/metrics" | awk '/^etcd_grpc_proxy_watchers_coalescing_total / {print $2}')
  fi

  # Figures (python does the arithmetic and keeps them as one JSON line).
  local max_share=0 i
  for i in 0 1 2; do
    local share=$(( rss1_each[i] - rss0_each[i] ))
    [ "$share" -gt "$max_share" ] && max_share=$share
  done
  figures+=("$(python3 - "$dir/rounds.json" <<PY
import json, sys
r = json.load(open(sys.argv[1]))
r.update(json.load(open("$dir/own.json")))
r["restarted"] = $restarted
r.update(json.load(open("$dir/relists.json")))
hz, n, rounds = $HZ, $n, $ROUNDS
idle_s, round_s = $t1 - $t0, $t3 - $t2
idle_cpu_ms = ($c1 - $c0) * 1000 / hz
idle_rate = idle_cpu_ms / idle_s
idle0_rate = ($cz1 - $cz0) * 1000 / hz / ($tz1 - $tz0)
round_cpu_ms = ($c3 - $c2) * 1000 / hz
bytes_idle_rate = ($b1 - $b0) / idle_s
pidle_rate = ($pc1 - $pc0) * 1000 / hz / idle_s
r.update({
  "mode": "$mode", "n": n, "startup_s": $startup_s,
  "etcd_rss0_mb": round($rss0 / 1024, 1), "etcd_rss_mb": round($rss1 / 1024, 1),
  "etcd_rss_after_rounds_mb": round($rss2 / 1024, 1),
  "etcd_kb_per_daemon": round(($rss1 - $rss0) / n, 1),
  "etcd_max_member_kb_per_daemon": round($max_share / n, 1),
  "etcd_cpu_ms_per_start": round(($cpu_started - $cpu_start) * 1000 / hz / n, 2),
  "etcd_idle_cpu_ms_per_s": round(idle_rate, 1),
  "etcd_idle0_cpu_ms_per_s": round(idle0_rate, 1),
  "etcd_idle_cpu_us_per_daemon_s": round((idle_rate - idle0_rate) * 1000 / n, 1),
  "etcd_cpu_ms_per_change": round((round_cpu_ms - idle0_rate * round_s) / rounds, 2),
  "etcd_cpu_ms_per_change_net": round((round_cpu_ms - idle_rate * round_s) / rounds, 2),
  "etcd_bytes_out_idle_per_s": round(bytes_idle_rate),
  "etcd_bytes_out_per_change": round(($b3 - $b2) / rounds),
  "etcd_bytes_out_per_change_net": round((($b3 - $b2) - bytes_idle_rate * round_s) / rounds),
  "etcd_watchers": int("$watchers" or 0),
  "proxy_rss0_mb": round($prss0 / 1024, 1), "proxy_rss_mb": round($prss1 / 1024, 1),
  "proxy_rss_after_rounds_mb": round($prss2 / 1024, 1),
  "proxy_kb_per_daemon": round(($prss1 - $prss0) / n, 1),
  "proxy_cpu_ms_per_start": round(($pcpu_started - $pcpu_start) * 1000 / hz / n, 2),
  "proxy_idle_cpu_ms_per_s": round(pidle_rate, 1),
  "proxy_cpu_ms_per_change": round(($pc3 - $pc2) * 1000 / hz / rounds, 2),
  "proxy_watchers_coalescing": "$coalescing",
  "watch_reconnects_idle_per_daemon_min": round(($reconnects1 - $reconnects0) / n / idle_s * 60, 2),
  "svcd_rss_mb": round($svcd_rss / 1024 / n, 1),
})
print(json.dumps(r))
PY
)")
  echo "${figures[-1]}" >&2
  stop_config
}

free -m | awk '/^Mem/ {print "memory: " $7 " MiB available"}' >&2
for n in "${SIZES[@]}"; do
  for mode in "${MODES[@]}"; do run_config "$n" "$mode"; done
done

echo
echo "A fleet on one etcd: 3 members, $ENDPOINTS endpoints + $OWN per daemon, $ROUNDS changes per row, $(nproc) cores, $(date -u +%F)"
printf '%s\n' "${figures[@]}" | fleet table
