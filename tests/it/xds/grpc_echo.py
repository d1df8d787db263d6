"""gRPC echo servers for the xDS tests: one server per id given on the command line, each on
its own loopback port. `/echo.Echo/Hi` answers with the server's id (raw bytes, no protobuf
schema needed). `/grpc.health.v1.Health/Check` answers SERVING, or NOT_SERVING while the file
`<dir>/<id>.down` exists, so a test can fail one instance's active check.

Prints `<id> <port>` per server, then `ready`, and serves until stdin closes."""

import os
import sys
from concurrent import futures

import grpc

SERVING = b"\x08\x01"
NOT_SERVING = b"\x08\x02"


def serve(ident, control_dir):
    def hi(request, context):
        return ident.encode()

    def health(request, context):
        down = os.path.exists(os.path.join(control_dir, ident + ".down"))
        return NOT_SERVING if down else SERVING

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "echo.Echo", {"Hi": grpc.unary_unary_rpc_method_handler(hi)}
            ),
            grpc.method_handlers_generic_handler(
                "grpc.health.v1.Health",
                {"Check": grpc.unary_unary_rpc_method_handler(health)},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def main():
    control_dir = sys.argv[1]
    servers = []
    for ident in sys.argv[2:]:
        server, port = serve(ident, control_dir)
        servers.append(server)
        print(ident, port, flush=True)
    print("ready", flush=True)
    sys.stdin.read()
    for s in servers:
        s.stop(0)


if __name__ == "__main__":
    main()
