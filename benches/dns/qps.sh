#!/usr/bin/env bash
# DNS QPS, side by side in one run: dnsperf against svcd, Knot DNS and dnsmasq, each serving the
# same records (web.default.svc.cluster.local: 3 A records), same server thread count, on
# loopback. Rounds alternate between servers; the median QPS per server and the ratios are
# printed.
#
#   benches/dns/qps.sh [seconds-per-run] [rounds]        (defaults: 10 s, 3 rounds)
#
# Needs: dnsperf, knot, dnsmasq (Debian packages; installed when missing).
#
# SVCD_BEFORE=PATH adds an earlier svcd build (benches/before_after.sh makes one) as the server
# svcd-before, configured as svcd, so a change is measured before and after in the same run.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_PER_RUN=${1:-10}
ROUNDS=${2:-3}
THREADS=${THREADS:-2}

source benches/common.sh
install_missing dnsperf:dnsperf knotd:knot dnsmasq:dnsmasq-base dig:bind9-dnsutils bc:bc
P_SVCD=$(free_port); P_KNOT=$(free_port); P_MASQ=$(free_port); P_ADMIN=$(free_port)
NAME=web.default.svc.cluster.local
IPS=(10.0.0.1 10.0.0.2 10.0.0.3)

# svcd (svcd_dns_config ADMIN_PORT DNS_PORT)
svcd_dns_config() {
  printf '[admin]\nlisten = "127.0.0.1:%s"\n[dns]\nlisten = "127.0.0.1:%s"\nworkers = %s\n[[proxy.http]]\nlisten = "127.0.0.1:%s"\n[log]\nlevel = "warn"\n' "$1" "$2" "$THREADS" "$(free_port)"
  i=0; for ip in "${IPS[@]}"; do i=$((i+1)); printf '[[registry.static]]\nservice = "web"\nid = "w%s"\nip = "%s"\n' "$i" "$ip"; done
}
svcd_dns_config "$P_ADMIN" "$P_SVCD" > "$work/svcd.toml"
"${SVCD_BIN:-target/release/svcd}" run --config "$work/svcd.toml" 2>"$work/svcd.log" & pids+=($!)
BEFORE=()
if [ -n "${SVCD_BEFORE:-}" ]; then
  P_BEFORE=$(free_port)
  svcd_dns_config "$(free_port)" "$P_BEFORE" > "$work/svcd-before.toml"
  "$SVCD_BEFORE" run --config "$work/svcd-before.toml" 2>"$work/svcd-before.log" & pids+=($!)
  BEFORE=(svcd-before="$P_BEFORE")
fi

# Knot DNS
mkdir -p "$work/knot"
{
  printf '$ORIGIN cluster.local.\n$TTL 5\n@ SOA ns.dns hostmaster 1 7200 1800 86400 5\n@ NS ns.dns\n'
  for ip in "${IPS[@]}"; do printf 'web.default.svc A %s\n' "$ip"; done
} > "$work/knot/cluster.local.zone"
cat > "$work/knot/knot.conf" <<CONF
server:
    rundir: "$work/knot"
    listen: 127.0.0.1@$P_KNOT
    udp-workers: $THREADS
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$work/knot"
log:
  - target: stderr
    any: warning
zone:
  - domain: cluster.local
    storage: "$work/knot"
    file: cluster.local.zone
CONF
knotd -c "$work/knot/knot.conf" 2>"$work/knot.log" & pids+=($!)

# dnsmasq (single-threaded by design)
for ip in "${IPS[@]}"; do echo "$ip $NAME"; done > "$work/hosts"
dnsmasq --no-daemon --port="$P_MASQ" --listen-address=127.0.0.1 --bind-interfaces --no-resolv \
  --no-hosts --addn-hosts="$work/hosts" --cache-size=10000 --user=root --pid-file="$work/dnsmasq.pid" \
  2>"$work/dnsmasq.log" & pids+=($!)

dns_compare "DNS A queries for $NAME (3 records), $THREADS server threads" "$NAME" \
  svcd="$P_SVCD" knot="$P_KNOT" dnsmasq="$P_MASQ" "${BEFORE[@]}"
