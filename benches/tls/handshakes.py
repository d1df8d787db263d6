"""TLS 1.3 connections, one after another, for SECONDS (used by benches/tls/throughput.sh).

    handshakes.py PORT SECONDS new|resume

new:    a fresh handshake per connection (no session offered: always a full handshake), closed
        right after it, no request.
resume: each connection offers the last session ticket received (a full handshake only when
        none is held yet), sends one HTTP/1.1 GET with "Connection: close" and reads the answer
        (that read is how TLS 1.3 tickets, sent after the handshake, reach the client).
Prints "connections/s connections resumed". The certificate is not verified (the client's cost
is not what is measured); SNI is bench.test.
"""
import socket
import ssl
import sys
import time

port, secs, mode = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
n = resumed = 0
session = None
start = time.monotonic()
while time.monotonic() - start < secs:
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = ctx.wrap_socket(raw, server_hostname="bench.test",
                           session=session if mode == "resume" else None)
    if mode == "resume":
        conn.sendall(request)
        while conn.recv(65536):
            pass
        resumed += conn.session_reused
        if conn.session is not None and conn.session.has_ticket:
            session = conn.session
    elif conn.session_reused:
        sys.exit("a new connection was resumed")
    conn.close()
    n += 1
print(n / (time.monotonic() - start), n, resumed)
