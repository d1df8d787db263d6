#!/usr/bin/env python3
"""The client side of benches/fleet.sh (standard library only): free ports, the bulk load of the
registry into etcd (its JSON gateway), waiting for a fleet of svcd daemons to sync, and the
registration rounds that time a change on one daemon until every daemon's view has it (blocking
queries, GET /v1/services/{ns}/{svc}?index=N&wait=D, one parked per daemon).

    fleet.py ports COUNT
    fleet.py load ETCD_HOST:PORT SERVICES PER_SERVICE
    fleet.py synced EXPECTED_ENDPOINTS TIMEOUT_S ADMIN_PORT...   (0: ready, whatever it holds)
    fleet.py rounds ROUNDS ETCD_HOST:PORT OUT_JSON ADMIN_PORT...
    fleet.py own COUNT OUT_JSON ADMIN_PORT... (COUNT registrations of each daemon's own)
    fleet.py relists OUT_JSON ADMIN_PORT...   (re-lists in the fleet since its first listings)
    fleet.py converge EXPECTED TIMEOUT_S ADMIN_PORT...  (prints the daemons not holding EXPECTED)
    fleet.py etcd-metrics HOST:PORT...        (sums of a few etcd /metrics series)
    fleet.py table < FIGURES                  (the summary table of fleet.sh's JSON lines)
"""

import asyncio
import base64
import json
import socket
import sys
import time
import urllib.request

NAMESPACE = "fleet"
PROBE = "probe"


def b64(text):
    return base64.b64encode(text.encode()).decode()


def cmd_ports(count):
    """COUNT distinct free loopback ports, all bound at once (no duplicates among them)."""
    socks = []
    for _ in range(int(count)):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))


def key(service, instance):
    # benches/registry_scale.rs key() and value(), seq 0.
    return f"/svcd/v1/endpoints/default/svc-{service}/inst-{instance}"


def value(service, instance, seq=0):
    return (
        f'{{"ip":"10.{service // 256 % 256}.{service % 256}.{instance % 250 + 1}",'
        f'"ports":{{"http":8080,"grpc":9090}},"node":"node-{service % 50}","protocol":"http",'
        f'"meta":{{"seq":"{seq}"}}}}'
    )


def gateway(etcd, path, body):
    req = urllib.request.Request(
        f"http://{etcd}/v3/{path}", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def cmd_load(etcd, services, per_service):
    """SERVICES x PER_SERVICE endpoints in transactions of 100 puts (etcd's --max-txn-ops is
    128), without a lease: they stay for the whole run."""
    services, per_service = int(services), int(per_service)
    pairs = [(s, i) for s in range(services) for i in range(per_service)]
    started = time.monotonic()
    for at in range(0, len(pairs), 100):
        ops = [
            {"request_put": {"key": b64(key(s, i)), "value": b64(value(s, i))}}
            for s, i in pairs[at : at + 100]
        ]
        answer = gateway(etcd, "kv/txn", {"success": ops})
        if not answer.get("succeeded"):
            sys.exit(f"fleet.py: load: transaction failed: {answer}")
    print(f"{len(pairs)} endpoints loaded in {time.monotonic() - started:.1f} s", file=sys.stderr)


async def http(port, method, path, body=None, timeout=30.0):
    """One request on its own connection (Connection: close): (status, body bytes)."""

    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            data = body.encode() if body is not None else b""
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            )
            writer.write(head.encode() + data)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            payload = dechunk(payload)
        return status, payload

    return await asyncio.wait_for(go(), timeout)


def dechunk(payload):
    out = b""
    while payload:
        size, _, rest = payload.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out += rest[:n]
        payload = rest[n + 2 :]
    return out


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def poll_all(ports, check, timeout, what):
    """Until check(port) is true for every port (each polled every 100 ms), or fail naming the
    ports that never got there."""
    deadline = time.monotonic() + timeout
    last = {}

    async def one(port):
        while True:
            try:
                ok, seen = await check(port)
            except (OSError, asyncio.TimeoutError, ValueError, IndexError) as e:
                ok, seen = False, repr(e)
            last[port] = seen
            if ok:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)

    results = await asyncio.gather(*(one(p) for p in ports))
    failed = [p for p, ok in zip(ports, results) if not ok]
    if failed:
        sample = ", ".join(f"{p}: {last.get(p)}" for p in failed[:5])
        raise SystemExit(f"fleet.py: {len(failed)} of {len(ports)} daemons not {what} within {timeout} s ({sample})")


async def synced(expected, timeout, ports):
    async def check(port):
        status, body = await http(port, "GET", "/readyz", timeout=5)
        if status != 200:
            return False, f"/readyz {status} {body[:200]!r}"
        if not expected:
            return True, "ready"
        status, body = await http(port, "GET", "/metrics", timeout=10)
        n = metric(body.decode(), "svcd_registry_endpoints")
        return n == expected, f"svcd_registry_endpoints {n}, want {expected}"

    started = time.monotonic()
    holding = f", each with {expected} endpoints" if expected else ""
    await poll_all(ports, check, timeout, f"ready{holding}")
    print(f"{len(ports)} daemons ready{holding}, {time.monotonic() - started:.1f} s", file=sys.stderr)


async def converge(expected, timeout, ports):
    """Waits up to TIMEOUT s for every daemon to hold EXPECTED endpoints; prints the admin ports
    of those that do not."""
    deadline = time.monotonic() + timeout
    short = list(ports)
    while short:
        async def count(port):
            _, body = await http(port, "GET", "/metrics", timeout=10)
            return metric(body.decode(), "svcd_registry_endpoints")
        counts = await asyncio.gather(*(count(p) for p in short))
        short = [p for p, n in zip(short, counts) if n != expected]
        if not short or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    print(" ".join(map(str, short)))


def cmd_converge(expected, timeout, *ports):
    asyncio.run(converge(int(expected), float(timeout), [int(p) for p in ports]))


def cmd_synced(expected, timeout, *ports):
    asyncio.run(synced(int(expected), float(timeout), [int(p) for p in ports]))


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


async def rounds(count, etcd, out, ports):
    """COUNT changes (even: register probe instance p-<i> on daemon i*stride mod N; odd:
    deregister it there), each timed from the write until every daemon's blocking query answers
    with the change. Before each write, every daemon has a query parked (its gauge
    svcd_admin_blocking_queries >= 1). A change some daemon has not seen within 30 s is counted
    as missed (by how many daemons) and left out of the "on all" figures."""
    n = len(ports)
    svc_path = f"/v1/services/{NAMESPACE}/{PROBE}"
    stride = max(1, n // 7) if n > 7 else 1
    index = {}

    async def current(port):
        status, body = await http(port, "GET", svc_path)
        if status != 200:
            raise SystemExit(f"fleet.py: daemon on {port}: GET {svc_path}: {status} {body[:200]!r}")
        index[port] = json.loads(body)["index"]

    await asyncio.gather(*(current(p) for p in ports))
    per_daemon, visible_all, writes, sizes, missed = [], [], [], {}, []
    started = time.monotonic()
    for r in range(count):
        i, registering = r // 2, r % 2 == 0
        writer_port = ports[(i * stride) % n]
        instance = f"p-{i}"
        arrived = {}
        t0 = [0.0]

        def has(body):
            return any(x["id"] == instance for x in json.loads(body)["instances"])

        async def waiter(port):
            while True:
                status, body = await http(port, "GET", f"{svc_path}?index={index[port]}&wait=60s", timeout=70)
                got = time.perf_counter()
                if status != 200:
                    raise SystemExit(f"fleet.py: daemon on {port}: blocking query: {status} {body[:200]!r}")
                index[port] = json.loads(body)["index"]
                if t0[0] and has(body) == registering:
                    arrived[port] = got - t0[0]
                    return

        tasks = [asyncio.create_task(waiter(p)) for p in ports]

        async def parked(port):
            status, body = await http(port, "GET", "/metrics", timeout=10)
            g = metric(body.decode(), "svcd_admin_blocking_queries")
            return (g or 0) >= 1, f"svcd_admin_blocking_queries {g}"

        await poll_all(ports, parked, 30, "parked on a blocking query")
        t0[0] = time.perf_counter()
        path = f"{svc_path}/instances/{instance}"
        if registering:
            body = json.dumps({"ip": "10.254.0.1", "ports": {"http": 8080}, "protocol": "http",
                               "node": f"fleet-{writer_port}"})
            status, answer = await http(writer_port, "PUT", path, body)
        else:
            status, answer = await http(writer_port, "DELETE", path)
        writes.append(time.perf_counter() - t0[0])
        if status != 200 or not json.loads(answer).get("visible"):
            raise SystemExit(f"fleet.py: {'PUT' if registering else 'DELETE'} {path} on {writer_port}: {status} {answer[:300]!r}")
        if registering and not sizes:
            kv = gateway(etcd, "kv/range", {"key": b64(f"/svcd/v1/endpoints/{NAMESPACE}/{PROBE}/{instance}")})["kvs"][0]
            sizes = {"key_bytes": len(base64.b64decode(kv["key"])),
                     "value_bytes": len(base64.b64decode(kv["value"]))}
        done, pending = await asyncio.wait(tasks, timeout=30)
        for t in done:
            if t.exception():
                raise t.exception()
        lat = list(arrived.values())
        per_daemon.extend(lat)
        if pending:
            # Daemons that did not see the change within 30 s: counted, and their next round
            # starts from their current index.
            for t in pending:
                t.cancel()
            missing = [p for p in ports if p not in arrived]
            missed.append(len(missing))
            print(f"fleet.py: change {r} ({'register' if registering else 'deregister'} {instance} "
                  f"on {writer_port}): {len(missing)} of {n} daemons did not see it within 30 s "
                  f"(e.g. {missing[:5]})", file=sys.stderr)
            await asyncio.gather(*(current(p) for p in missing))
        else:
            visible_all.append(max(lat))
    elapsed = time.monotonic() - started
    ms = lambda v: round(v * 1000, 1)
    result = {
        "daemons": n,
        "changes": count,
        "seconds": round(elapsed, 2),
        "per_daemon_p50_ms": ms(pct(per_daemon, 50)),
        "per_daemon_p99_ms": ms(pct(per_daemon, 99)),
        "all_p50_ms": ms(pct(visible_all, 50)) if visible_all else None,
        "all_p99_ms": ms(pct(visible_all, 99)) if visible_all else None,
        "all_max_ms": ms(max(visible_all)) if visible_all else None,
        "changes_missed": len(missed),
        "daemon_misses": sum(missed),
        "write_p50_ms": ms(pct(writes, 50)),
        **sizes,
    }
    with open(out, "w") as f:
        json.dump(result, f)
    print(f"{count} changes on {n} daemons: per daemon p50 {result['per_daemon_p50_ms']} ms "
          f"p99 {result['per_daemon_p99_ms']} ms; on all p50 {result['all_p50_ms']} ms "
          f"p99 {result['all_p99_ms']} ms", file=sys.stderr)


def cmd_rounds(count, etcd, out, *ports):
    asyncio.run(rounds(int(count), etcd, out, [int(p) for p in ports]))


async def own(count, out, ports):
    """COUNT instances of service own-<port> in namespace fleet on the daemon whose admin API is
    on that port, under its lease
    (no ?ttl=), one write at a time (a burst makes the re-lists of fleet.sh's header feed on
    each other); each answered once visible on its daemon, or after 5 s with "visible": false
    (counted, not fatal: fleet.sh then checks every daemon converges)."""
    gate = asyncio.Semaphore(1)
    not_visible = []

    async def put(port, j):
        async with gate:
            path = f"/v1/services/{NAMESPACE}/own-{port}/instances/i{j}"
            body = json.dumps({"ip": "127.0.0.1", "ports": {"http": 8080 + j}, "protocol": "http"})
            status, answer = await http(port, "PUT", path, body)
            if status != 200:
                raise SystemExit(f"fleet.py: PUT {path} on {port}: {status} {answer[:300]!r}")
            if not json.loads(answer).get("visible"):
                not_visible.append(port)

    await asyncio.gather(*(put(p, j) for p in ports for j in range(count)))
    if not_visible:
        print(f"fleet.py: {len(not_visible)} own registrations answered \"visible\": false "
              f"(daemons {sorted(set(not_visible))[:10]})", file=sys.stderr)
    with open(out, "w") as f:
        json.dump({"own_not_visible": len(not_visible)}, f)


def cmd_own(count, out, *ports):
    asyncio.run(own(int(count), out, [int(p) for p in ports]))


async def relists(out, ports):
    """Re-lists beyond each daemon's first listing, and those of them for a store revision seen
    going backwards, summed over the fleet."""
    total = behind = 0
    for port in ports:
        _, body = await http(port, "GET", "/metrics")
        text = body.decode()
        total += (metric(text, "svcd_registry_relists_total") or 0) - 1
        for line in text.splitlines():
            if line.startswith('svcd_registry_store_replaced_total{reason="revision_behind"}'):
                behind += float(line.rsplit(" ", 1)[1])
    with open(out, "w") as f:
        json.dump({"relists": int(total), "relists_revision_behind": int(behind)}, f)


def cmd_relists(out, *ports):
    asyncio.run(relists(out, [int(p) for p in ports]))


ETCD_SERIES = [
    "etcd_debugging_mvcc_watcher_total",
    "etcd_debugging_mvcc_watch_stream_total",
    "etcd_network_client_grpc_sent_bytes_total",
    "etcd_network_client_grpc_received_bytes_total",
]


def cmd_etcd_metrics(*endpoints):
    """name=value for each of ETCD_SERIES, summed over the endpoints' /metrics."""
    sums = dict.fromkeys(ETCD_SERIES, 0.0)
    for ep in endpoints:
        with urllib.request.urlopen(f"http://{ep}/metrics", timeout=10) as r:
            text = r.read().decode()
        for name in ETCD_SERIES:
            sums[name] += metric(text, name) or 0
    print(" ".join(f"{k}={int(v)}" for k, v in sums.items()))


def cmd_table():
    rows = [json.loads(line) for line in sys.stdin if line.strip()]
    proxy = lambda name: lambda r: r[name] if r["mode"] == "proxy" else "-"
    cols = [
        ("daemons", lambda r: r["n"]),
        ("via", lambda r: r["mode"]),
        ("seen p50", lambda r: r["per_daemon_p50_ms"]),
        ("seen p99", lambda r: r["per_daemon_p99_ms"]),
        ("all p50", lambda r: r["all_p50_ms"]),
        ("all p99", lambda r: r["all_p99_ms"]),
        ("/200ms", lambda r: f"{r['all_p99_ms'] / 200:.2f}" if r["all_p99_ms"] else "-"),
        ("etcd KB/d", lambda r: r["etcd_kb_per_daemon"]),
        ("/100KB", lambda r: f"{r['etcd_kb_per_daemon'] / 100:.2f}"),
        ("max mbr KB/d", lambda r: r["etcd_max_member_kb_per_daemon"]),
        ("etcd ms/start", lambda r: r["etcd_cpu_ms_per_start"]),
        ("etcd ms/chg", lambda r: r["etcd_cpu_ms_per_change"]),
        ("etcd idle ms/s", lambda r: f"{r['etcd_idle0_cpu_ms_per_s']}>{r['etcd_idle_cpu_ms_per_s']}"),
        ("etcd B/chg", lambda r: r["etcd_bytes_out_per_change"]),
        ("watchers", lambda r: r["etcd_watchers"]),
        ("proxy KB/d", proxy("proxy_kb_per_daemon")),
        ("proxy ms/chg", proxy("proxy_cpu_ms_per_change")),
        ("proxy idle ms/s", proxy("proxy_idle_cpu_ms_per_s")),
        ("reconn/d/min", lambda r: r["watch_reconnects_idle_per_daemon_min"]),
        ("relists", lambda r: f"{r['relists']}({r['relists_revision_behind']})"),
        ("missed", lambda r: f"{r['changes_missed']}/{r['changes']}({r['daemon_misses']})"),
        ("own lost", lambda r: f"{r['own_not_visible']}({r['restarted']})"),
        ("svcd MB", lambda r: r["svcd_rss_mb"]),
    ]
    table = [[c[0] for c in cols]] + [[str(f(r)) for _, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    # The marginal RSS per daemon between two sizes of one mode: each configuration starts from a
    # fresh cluster loaded the same way, so the difference is the daemons' alone, without the
    # listing garbage of the first ones that (RSS_N - RSS_0) / N spreads over few daemons.
    marginal = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        sized = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["n"])
        for a, b in zip(sized, sized[1:]):
            kb = (b["etcd_rss_mb"] - a["etcd_rss_mb"]) * 1024 / (b["n"] - a["n"])
            line = f"{mode} {a['n']}->{b['n']}: etcd {kb:.1f} KB per added daemon"
            if mode == "proxy":
                pkb = (b["proxy_rss_mb"] - a["proxy_rss_mb"]) * 1024 / (b["n"] - a["n"])
                line += f", proxy {pkb:.1f} KB"
            marginal.append(line)
    if marginal:
        print("\nmarginal RSS: " + "; ".join(marginal))
    event = rows[0] if rows else {}
    print(f"""
seen: a change visible on one daemon, p50/p99 over every (daemon, change), ms; all: visible on
all of them (the slowest daemon per change); /200ms: all p99 against the 200 ms target.
etcd KB/d: the 3 members' RSS growth per watching daemon (/100KB: against the 100 KB target);
max mbr: the member that grew most. ms/start: etcd CPU per daemon started (list, watch, lease);
ms/chg, B/chg: etcd CPU (beyond the members' own, idle ms/s without daemons > with the fleet)
and bytes sent to clients during the changes, per change, the fleet's background included (in
the JSON, *_net: less the fleet's idle rate; meaningless when idling cost more, see reconn).
watchers: etcd_debugging_mvcc_watcher_total on the members. reconn/d/min: watch reconnects per
daemon per idle minute. relists: re-lists in the fleet after the first listing (of them, for a
progress or status revision below the daemon's). missed: changes some daemon had not seen after
30 s (daemons that missed). own lost: own registrations answered "visible": false (daemons
restarted because they did not converge after them). svcd MB: RSS per daemon. A registration's key is {event.get('key_bytes')} B, its value {event.get('value_bytes')} B.""")
    for r in rows:
        print(json.dumps(r, sort_keys=True))
    bad = [r for r in rows if r["changes_missed"] or r["own_not_visible"]]
    if bad:
        sys.exit("fleet.sh: daemons missed changes: " + "; ".join(
            f"{r['n']} {r['mode']}: {r['changes_missed']} of {r['changes']} changes missed by "
            f"{r['daemon_misses']} daemons, {r['own_not_visible']} own registrations not visible"
            for r in bad))


if __name__ == "__main__":
    commands = {"ports": cmd_ports, "load": cmd_load, "synced": cmd_synced, "own": cmd_own,
                "relists": cmd_relists, "converge": cmd_converge,
                "rounds": cmd_rounds, "etcd-metrics": cmd_etcd_metrics, "table": cmd_table}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
