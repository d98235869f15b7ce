'use strict';
/* grpc.testing.TestService on grpc-js's server: the peer our Channel is tested against
 * (tests/test_grpc_js.py). It implements the server features of gRPC's interop test
 * descriptions that grpc-js has: echoed metadata and status, reply sizes and intervals. Not
 * CompressedResponse: grpc-js's server never compresses a reply (server-interceptors.ts:
 * "response compression is currently not supported"), nor CompressedRequest (it does not show
 * a handler whether a message came compressed).
 *
 * Usage: node server.js. Prints {"port": N} once it listens on 127.0.0.1, then one JSON line
 * per event the tests check: "call" (with the deadline the server saw), "cancelled" (the call
 * ended before its handler sent a status: grpc-js's 'cancelled' event also fires when a call's
 * stream closes after a normal end, which is not reported), "received" (a client stream's
 * message sizes). Exits when its stdin closes, so it never outlives the test process.
 */

const grpc = require('@grpc/grpc-js');
const common = require('./common');

const { ECHO_INITIAL, ECHO_TRAILING, emit, sleep } = common;
const testing = common.loadTesting(grpc);

function caseOf(call) {
  const values = call.metadata.get('x-case');
  return values.length ? String(values[0]) : null;
}

function report(call, method, event, extra) {
  emit({ event, method, case: caseOf(call), ...extra });
}

/** Report the call (and the deadline it came with), and its cancellation if it comes before
 * the handler ended it: done(call) says the handler sent its status. */
function started(call, method) {
  const deadline = call.getDeadline();
  const when = deadline instanceof Date ? deadline.getTime() : deadline;
  report(call, method, 'call', { deadline_ms: Number.isFinite(when) ? when - Date.now() : null });
  call.on('cancelled', () => {
    if (!call.done) report(call, method, 'cancelled');
  });
}

function done(call) {
  call.done = true;
}

function echoInitial(call) {
  const values = call.metadata.get(ECHO_INITIAL);
  if (values.length) {
    const metadata = new grpc.Metadata();
    for (const value of values) metadata.add(ECHO_INITIAL, value);
    call.sendMetadata(metadata);
  }
}

function echoedTrailers(call) {
  const metadata = new grpc.Metadata();
  for (const value of call.metadata.get(ECHO_TRAILING)) metadata.add(ECHO_TRAILING, value);
  return metadata;
}

function failure(status, call) {
  return { code: status.code, details: status.message, metadata: echoedTrailers(call) };
}

function reply(size) {
  return { payload: { body: Buffer.alloc(size) } };
}

/** One reply per ResponseParameters, each after its interval; false once the call is cancelled. */
async function sendReplies(call, parameters) {
  for (const entry of parameters) {
    if (entry.interval_us) await sleep(entry.interval_us / 1000);
    if (call.cancelled) return false;
    call.write(reply(entry.size));
  }
  return true;
}

/** Handle a stream's requests one at a time, in order, then its end. */
function serveDuplex(call, method, onRequest) {
  started(call, method);
  echoInitial(call);
  let over = false;
  let chain = Promise.resolve();
  const finish = (error) => {
    if (over || call.cancelled) return;
    over = true;
    done(call);
    if (error) call.emit('error', error);
    else call.end(echoedTrailers(call));
  };
  call.on('data', (request) => {
    chain = chain.then(async () => {
      if (over || call.cancelled) return;
      const status = request.response_status;
      if (status && status.code) {
        finish(failure(status, call));
        return;
      }
      await onRequest(request);
    });
  });
  call.on('end', () => {
    chain = chain.then(() => finish(null));
  });
  call.on('error', () => {});  // a cancelled call's stream is destroyed: nothing to answer
}

const service = {
  EmptyCall(call, callback) {
    started(call, 'EmptyCall');
    echoInitial(call);
    done(call);
    callback(null, {}, echoedTrailers(call));
  },

  UnaryCall(call, callback) {
    started(call, 'UnaryCall');
    echoInitial(call);
    const request = call.request;
    done(call);
    if (request.response_status && request.response_status.code) {
      callback(failure(request.response_status, call));
      return;
    }
    callback(null, reply(request.response_size), echoedTrailers(call));
  },

  async StreamingOutputCall(call) {
    started(call, 'StreamingOutputCall');
    echoInitial(call);
    const request = call.request;
    if (!(await sendReplies(call, request.response_parameters))) return;
    done(call);
    if (request.response_status && request.response_status.code) {
      call.emit('error', failure(request.response_status, call));
    } else {
      call.end(echoedTrailers(call));
    }
  },

  StreamingInputCall(call, callback) {
    started(call, 'StreamingInputCall');
    const sizes = [];
    call.on('data', (request) => sizes.push(request.payload ? request.payload.body.length : 0));
    call.on('end', () => {
      report(call, 'StreamingInputCall', 'received', { sizes });
      echoInitial(call);
      const total = sizes.reduce((a, b) => a + b, 0);
      done(call);
      callback(null, { aggregated_payload_size: total }, echoedTrailers(call));
    });
    call.on('error', () => {});
  },

  FullDuplexCall(call) {
    serveDuplex(call, 'FullDuplexCall', (request) => sendReplies(call, request.response_parameters));
  },

  HalfDuplexCall(call) {
    const buffered = [];
    started(call, 'HalfDuplexCall');
    call.on('data', (request) => buffered.push(request));
    call.on('error', () => {});
    call.on('end', async () => {
      echoInitial(call);
      for (const request of buffered) {
        const status = request.response_status;
        if (status && status.code) {
          done(call);
          call.emit('error', failure(status, call));
          return;
        }
        if (!(await sendReplies(call, request.response_parameters))) return;
      }
      done(call);
      call.end(echoedTrailers(call));
    });
  },
  // UnimplementedCall is left out: grpc-js answers it UNIMPLEMENTED, as interop servers must.
};

const server = new grpc.Server();
server.addService(testing.TestService.service, service);
server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (error, port) => {
  if (error) {
    process.stderr.write(`bind failed: ${error.message}\n`);
    process.exit(2);
  }
  emit({ port });
});

process.stdin.on('end', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
process.stdin.resume();
