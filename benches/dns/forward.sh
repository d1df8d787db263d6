#!/usr/bin/env bash
# Cached forwarded answers, side by side in one run: dnsperf against svcd (dns.forward), dnsmasq
# (server=) and unbound (forward-zone), each forwarding to the same Knot DNS upstream and
# answering a name outside svcd's zone from its cache (host.example.test: 3 A records, TTL 300).
# Rounds alternate between resolvers; the median QPS per resolver and the ratios are printed.
#
#   benches/dns/forward.sh [seconds-per-run] [rounds]     (defaults: 10 s, 3 rounds)
#
# Needs: dnsperf, knot, dnsmasq, unbound (Debian packages; installed when missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_PER_RUN=${1:-10}
ROUNDS=${2:-3}
THREADS=${THREADS:-2}

source benches/common.sh
install_missing dnsperf:dnsperf knotd:knot dnsmasq:dnsmasq-base unbound:unbound dig:bind9-dnsutils bc:bc
# Debian starts unbound on install; this run starts its own.
systemctl stop unbound 2>/dev/null || true
P_KNOT=$(free_port); P_SVCD=$(free_port); P_MASQ=$(free_port); P_UNB=$(free_port)
NAME=host.example.test

# The upstream: Knot DNS, authoritative for example.test.
mkdir -p "$work/knot"
{
  printf '$ORIGIN example.test.\n$TTL 300\n@ SOA ns hostmaster 1 7200 1800 86400 300\n@ NS ns\nns A 127.0.0.1\n'
  for ip in 10.1.0.1 10.1.0.2 10.1.0.3; do printf 'host A %s\n' "$ip"; done
} > "$work/knot/example.test.zone"
cat > "$work/knot/knot.conf" <<CONF
server:
    rundir: "$work/knot"
    listen: 127.0.0.1@$P_KNOT
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$work/knot"
log:
  - target: stderr
    any: warning
zone:
  - domain: example.test
    storage: "$work/knot"
    file: example.test.zone
CONF
knotd -c "$work/knot/knot.conf" 2>"$work/knot.log" & pids+=($!)

# svcd, forwarding what is outside cluster.local.
cat > "$work/svcd.toml" <<CONF
[admin]
listen = "127.0.0.1:$(free_port)"
[dns]
listen = "127.0.0.1:$P_SVCD"
workers = $THREADS
forward = ["127.0.0.1:$P_KNOT"]
[[proxy.http]]
listen = "127.0.0.1:$(free_port)"
[log]
level = "warn"
CONF
target/release/svcd run --config "$work/svcd.toml" 2>"$work/svcd.log" & pids+=($!)

# dnsmasq (single-threaded by design).
dnsmasq --no-daemon --port="$P_MASQ" --listen-address=127.0.0.1 --bind-interfaces --no-resolv \
  --no-hosts --server="127.0.0.1#$P_KNOT" --cache-size=10000 --user=root \
  --pid-file="$work/dnsmasq.pid" 2>"$work/dnsmasq.log" & pids+=($!)

# unbound, forwarding everything, no DNSSEC validation (the test zone is unsigned).
cat > "$work/unbound.conf" <<CONF
server:
    interface: 127.0.0.1@$P_UNB
    num-threads: $THREADS
    so-reuseport: yes
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    module-config: "iterator"
    # "test." is one of unbound's built-in local zones (RFC 6761); the upstream serves it here.
    local-zone: "test." nodefault
    username: ""
    chroot: ""
    directory: "$work"
    pidfile: "$work/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 0
    msg-cache-size: 16m
    rrset-cache-size: 32m
forward-zone:
    name: "."
    forward-addr: 127.0.0.1@$P_KNOT
CONF
unbound -d -c "$work/unbound.conf" 2>"$work/unbound.log" & pids+=($!)

dns_compare "Cached forwarded A queries for $NAME (3 records), $THREADS threads (dnsmasq: 1)" "$NAME" \
  svcd="$P_SVCD" dnsmasq="$P_MASQ" unbound="$P_UNB"
