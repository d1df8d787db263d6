// A proxyless gRPC client on Node (@grpc/grpc-js-xds) for the xDS tests: resolves
// xds:///<target> (GRPC_XDS_BOOTSTRAP names svcd), calls /echo.Echo/Hi in a loop and prints
// `ok <server id>` or `err <code>` per call, until stdin closes.
const grpc = require('@grpc/grpc-js');
require('@grpc/grpc-js-xds').register();

const target = process.argv[2];
const client = new grpc.Client('xds:///' + target, grpc.credentials.createInsecure());
const identity = (b) => b;
let stopped = false;
process.stdin.on('end', () => { stopped = true; client.close(); process.exit(0); });
process.stdin.resume();

function call() {
  if (stopped) return;
  client.makeUnaryRequest('/echo.Echo/Hi', identity, identity, Buffer.alloc(0),
    { deadline: Date.now() + 1000 }, (err, reply) => {
      if (err) {
        console.log('err ' + err.code);
        setTimeout(call, 50);
      } else {
        console.log('ok ' + reply.toString());
        setTimeout(call, 5);
      }
    });
}
call();
