"""A proxyless gRPC client for the xDS tests: resolves `xds:///<target>` through grpcio's xDS
resolver (GRPC_XDS_BOOTSTRAP names svcd) and calls `/echo.Echo/Hi` in a loop, printing one
line per call: `ok <server id>` or `err <status code>`. Runs until stdin closes."""

import sys
import threading
import time

import grpc


def main():
    target = sys.argv[1]
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    channel = grpc.insecure_channel("xds:///" + target)
    hi = channel.unary_unary("/echo.Echo/Hi")
    while not stop.is_set():
        try:
            reply = hi(b"", timeout=1.0, wait_for_ready=False)
            print("ok", reply.decode(), flush=True)
        except grpc.RpcError as e:
            print("err", e.code().name, flush=True)
            # An unavailable target fails at once: pace the retries like a real client would.
            time.sleep(0.05)
        # Pacing of the load, not a wait for a condition: about 200 calls a second.
        time.sleep(0.005)


if __name__ == "__main__":
    main()
