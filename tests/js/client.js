'use strict';
/* grpc-js client cases against a grpc.testing.TestService server (tests/test_grpc_js.py runs
 * them against app_kit's). One run does every case, so Node starts once.
 *
 * Usage: node client.js '<config JSON>' with
 *   target            host:port of the server for the interop and load cases
 *   keepaliveTarget   host:port for the keepalive case (a connection of its own)
 *   keepaliveIdleTarget  host:port for its control (the same settings, no calls)
 *   uploadTarget      host:port for the 64 x 1 MiB uploads (a relay cutting into larger pieces)
 *   closeTarget       host:port of a server the Python side closes during the graceful_close case
 *   uploadRepeats     how many times to run the 64 x 1 MiB client-streaming upload
 *   keepaliveMs       how long the keepalive case keeps calling
 *
 * Prints one JSON line per case: {"case", "ok", "ms", "details"} or {"case", "ok": false,
 * "error"}; and asks the Python side to act with {"event": ...} lines, waiting for its answer
 * on stdin: "await_server" (the server has the call: answer "go <case>") and "in_flight"
 * (close the server now: answer "closed"). Ends with {"event": "done"}.
 *
 * Each call carries "x-case: <case>" metadata, so the server side can tell which case a call
 * belongs to.
 */

// Before grpc-js loads (it reads them once): its keepalive and transport traces, which the
// keepalive case counts PINGs and GOAWAYs in. They go to the logger below, not to stderr.
process.env.GRPC_NODE_TRACE = 'keepalive,transport';
process.env.GRPC_NODE_VERBOSITY = 'DEBUG';

const assert = require('assert/strict');
const readline = require('readline');
const grpc = require('@grpc/grpc-js');
const common = require('./common');

const { ECHO_INITIAL, ECHO_INITIAL_VALUE, ECHO_TRAILING, ECHO_TRAILING_VALUE, SPECIAL_MESSAGE, emit, sleep } = common;
const Status = grpc.status;
const STATUS_NAMES = Object.fromEntries(Object.entries(Status).map(([name, code]) => [code, name]));
const testing = common.loadTesting(grpc);
const config = JSON.parse(process.argv[2]);

// -- grpc-js's log: traces kept in memory, errors to stderr ---------------------------------
const traces = [];
grpc.setLogger({
  error: (message) => process.stderr.write(`grpc-js: ${message}\n`),
  info: (message) => traces.push(String(message)),
  debug: (message) => traces.push(String(message)),
});

// -- the Python side's answers -----------------------------------------------------------
const answered = new Set();
const waiting = new Map();
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const answer = line.trim();
  const resolve = waiting.get(answer);
  if (resolve) {
    waiting.delete(answer);
    resolve();
  } else {
    answered.add(answer);
  }
});

function ask(event, answer, extra) {
  emit({ event, ...extra });
  if (answered.delete(answer)) return Promise.resolve();
  return new Promise((resolve) => waiting.set(answer, resolve));
}

// -- calls ---------------------------------------------------------------------------------
function newClient(target, options) {
  return new testing.TestService(target, grpc.credentials.createInsecure(), options || {});
}

function meta(name, pairs) {
  const metadata = new grpc.Metadata();
  metadata.set('x-case', name);
  for (const [key, value] of pairs || []) metadata.add(key, value);
  return metadata;
}

function within(ms) {
  return { deadline: new Date(Date.now() + ms) };
}

function describeStatus(status) {
  return `${STATUS_NAMES[status.code] || status.code}: ${JSON.stringify(status.details)}`;
}

/** A unary or client-streaming call's outcome: {error, response, initial, status}. */
function finished(start) {
  return new Promise((resolve) => {
    const out = { error: null, response: null, initial: null, status: null };
    const call = start((error, response) => {
      out.error = error;
      out.response = response;
    });
    call.on('metadata', (metadata) => {
      out.initial = metadata;
    });
    call.on('status', (status) => {
      out.status = status;
      resolve(out);
    });
    out.call = call;
  });
}

function unary(client, method, request, metadata, options) {
  return finished((callback) => client[method](request, metadata, options || {}, callback));
}

/** Everything a call with a stream of replies brings: {messages, initial, status, error}. */
function collect(call, onMessage) {
  return new Promise((resolve) => {
    const out = { messages: [], initial: null, status: null, error: null };
    let ended = false;
    const settle = () => {
      if (out.status && (ended || out.status.code !== Status.OK)) resolve(out);
    };
    call.on('data', (message) => {
      out.messages.push(message);
      if (onMessage) onMessage(message, out.messages.length);
    });
    call.on('metadata', (metadata) => {
      out.initial = metadata;
    });
    call.on('error', (error) => {
      out.error = error;
    });
    call.on('end', () => {
      ended = true;
      settle();
    });
    call.on('status', (status) => {
      out.status = status;
      settle();
    });
  });
}

/** Replies one at a time: next() resolves to the next message, or null once the call ended. */
function replies(call) {
  const queue = [];
  const takers = [];
  let over = false;
  const put = (item) => (takers.length ? takers.shift()(item) : queue.push(item));
  call.on('data', put);
  call.on('error', () => {});
  call.on('end', () => {
    over = true;
    while (takers.length) takers.shift()(null);
  });
  const status = new Promise((resolve) => call.on('status', resolve));
  return {
    next: () => (queue.length ? Promise.resolve(queue.shift()) : over ? Promise.resolve(null) : new Promise((r) => takers.push(r))),
    status,
  };
}

function expectOk(out, step) {
  assert.equal(out.status.code, Status.OK, `${step}: ${describeStatus(out.status)}`);
}

function expectCode(out, code, step) {
  assert.equal(out.status.code, code, `${step}: ${describeStatus(out.status)}, expected ${STATUS_NAMES[code]}`);
}

function zeros(size) {
  return Buffer.alloc(size);
}

function assertZeros(body, size, step) {
  assert.equal(body.length, size, `${step}: ${body.length} bytes, expected ${size}`);
  assert.ok(body.equals(zeros(size)), `${step}: the payload is not all zeros`);
}

function largeRequest(extra) {
  return { response_size: 314159, payload: { body: zeros(271828) }, ...extra };
}

function pingPongRequest(responseSize, payloadSize) {
  return { response_parameters: [{ size: responseSize }], payload: { body: zeros(payloadSize) } };
}

// -- the cases -------------------------------------------------------------------------------
const main = newClient(config.target);
const uploader = newClient(config.uploadTarget);
// grpc.default_compression_algorithm 2 is gzip (grpc-js's CompressionAlgorithms).
const gzip = newClient(config.target, { 'grpc.default_compression_algorithm': 2 });

const INTEROP = {
  // gRPC's interop test descriptions, step by step, on one channel.
  async empty_unary(name) {
    const out = await unary(main, 'EmptyCall', {}, meta(name));
    expectOk(out, 'EmptyCall');
    assert.deepEqual(out.response, {});
  },

  async large_unary(name) {
    const out = await unary(main, 'UnaryCall', largeRequest(), meta(name));
    expectOk(out, 'UnaryCall');
    assertZeros(out.response.payload.body, 314159, 'the reply');
  },

  async client_streaming(name) {
    const out = await finished((callback) => {
      const call = main.StreamingInputCall(meta(name), callback);
      for (const size of [27182, 8, 1828, 45904]) call.write({ payload: { body: zeros(size) } });
      call.end();
      return call;
    });
    expectOk(out, 'StreamingInputCall');
    assert.equal(out.response.aggregated_payload_size, 74922);
  },

  async server_streaming(name) {
    const sizes = [31415, 9, 2653, 58979];
    const call = main.StreamingOutputCall({ response_parameters: sizes.map((size) => ({ size })) }, meta(name));
    const out = await collect(call);
    expectOk(out, 'StreamingOutputCall');
    assert.deepEqual(out.messages.map((m) => m.payload.body.length), sizes);
  },

  async ping_pong(name) {
    const call = main.FullDuplexCall(meta(name));
    const stream = replies(call);
    for (const [responseSize, payloadSize] of [[31415, 27182], [9, 8], [2653, 1828], [58979, 45904]]) {
      call.write(pingPongRequest(responseSize, payloadSize));
      const reply = await stream.next();
      assert.ok(reply, `no reply to the request for ${responseSize} bytes`);
      assertZeros(reply.payload.body, responseSize, 'a reply');
    }
    call.end();
    assert.equal(await stream.next(), null, 'a reply after the last request');
    const status = await stream.status;
    assert.equal(status.code, Status.OK, describeStatus(status));
  },

  async empty_stream(name) {
    const call = main.FullDuplexCall(meta(name));
    call.end();
    const out = await collect(call);
    expectOk(out, 'FullDuplexCall');
    assert.equal(out.messages.length, 0);
  },

  async custom_metadata(name) {
    const pairs = [[ECHO_INITIAL, ECHO_INITIAL_VALUE], [ECHO_TRAILING, ECHO_TRAILING_VALUE]];
    const checkEcho = (out, step) => {
      assert.deepEqual(out.initial.get(ECHO_INITIAL), [ECHO_INITIAL_VALUE], `${step}: initial metadata`);
      const trailing = out.status.metadata.get(ECHO_TRAILING);
      assert.equal(trailing.length, 1, `${step}: trailing metadata ${JSON.stringify(out.status.metadata.toJSON())}`);
      assert.ok(Buffer.isBuffer(trailing[0]) && trailing[0].equals(ECHO_TRAILING_VALUE), `${step}: ${trailing[0]}`);
    };
    const out = await unary(main, 'UnaryCall', largeRequest(), meta(name, pairs));
    expectOk(out, 'UnaryCall');
    assertZeros(out.response.payload.body, 314159, 'UnaryCall');
    checkEcho(out, 'UnaryCall');
    const call = main.FullDuplexCall(meta(name, pairs));
    call.write(pingPongRequest(314159, 271828));
    call.end();
    const duplex = await collect(call);
    expectOk(duplex, 'FullDuplexCall');
    assert.deepEqual(duplex.messages.map((m) => m.payload.body.length), [314159]);
    checkEcho(duplex, 'FullDuplexCall');
  },

  async status_code_and_message(name) {
    const status = { code: 2, message: 'test status message' };
    const out = await unary(main, 'UnaryCall', { response_status: status }, meta(name));
    expectCode(out, Status.UNKNOWN, 'UnaryCall');
    assert.equal(out.status.details, status.message);
    const call = main.FullDuplexCall(meta(name));
    call.write({ response_status: status });
    call.end();
    const duplex = await collect(call);
    expectCode(duplex, Status.UNKNOWN, 'FullDuplexCall');
    assert.equal(duplex.status.details, status.message);
  },

  async special_status_message(name) {
    const out = await unary(main, 'UnaryCall', { response_status: { code: 2, message: SPECIAL_MESSAGE } }, meta(name));
    expectCode(out, Status.UNKNOWN, 'UnaryCall');
    assert.equal(out.status.details, SPECIAL_MESSAGE);
  },

  async unimplemented_method(name) {
    const out = await unary(main, 'UnimplementedCall', {}, meta(name));
    expectCode(out, Status.UNIMPLEMENTED, 'UnimplementedCall');
  },

  async cancel_after_begin(name) {
    let call;
    const result = finished((callback) => {
      call = main.StreamingInputCall(meta(name), callback);
      return call;
    });
    // Cancel once the server runs the call's handler (so that it has a cancellation to see).
    await ask('await_server', `go ${name}`, { case: name });
    call.cancel();
    const out = await result;
    expectCode(out, Status.CANCELLED, 'after cancel');
  },

  async cancel_after_first_response(name) {
    const call = main.FullDuplexCall(meta(name));
    const stream = replies(call);
    call.write(pingPongRequest(31415, 27182));
    const reply = await stream.next();
    assert.ok(reply, 'no first reply');
    assertZeros(reply.payload.body, 31415, 'the first reply');
    call.cancel();
    const status = await stream.status;
    assert.equal(status.code, Status.CANCELLED, describeStatus(status));
  },

  async timeout_on_sleeping_server(name) {
    const call = main.FullDuplexCall(meta(name), within(1));
    call.write({ payload: { body: zeros(27182) } });
    const out = await collect(call);
    expectCode(out, Status.DEADLINE_EXCEEDED, 'the sleeping call');
  },
};

const EXTRA = {
  // A cancellation the handler must see: a server stream (its request side closed with the
  // request) cancelled after 2 of its 20 replies, so only RST_STREAM goes out. (grpc-js's
  // cancel() is Node's Http2Stream.close(NGHTTP2_CANCEL), which half-closes an open request
  // side first: above, the server may see that END_STREAM before the RST_STREAM.)
  async cancel_server_stream(name) {
    const call = main.StreamingOutputCall({ response_parameters: Array.from({ length: 20 }, () => ({ size: 1000, interval_us: 50000 })) }, meta(name));
    const stream = replies(call);
    for (let i = 0; i < 2; i++) assert.ok(await stream.next(), `reply ${i}`);
    call.cancel();
    const status = await stream.status;
    assert.equal(status.code, Status.CANCELLED, describeStatus(status));
  },

  // A deadline long enough to reach the server (the 1 ms one above usually does not), on a
  // server stream whose one reply is due in 2 s. (Not a bidi call: when its deadline passes,
  // grpc-js half-closes an open request side before it resets the stream, see
  // cancel_server_stream, and a handler may answer that half-close first.)
  async deadline_reaches_server(name) {
    const started = Date.now();
    const call = main.StreamingOutputCall({ response_parameters: [{ size: 1, interval_us: 2000000 }] }, meta(name), within(300));
    const out = await collect(call);
    expectCode(out, Status.DEADLINE_EXCEEDED, 'the sleeping call');
    return { elapsed_ms: Date.now() - started };
  },

  // Client compression (grpc.default_compression_algorithm): the server checks each message's
  // compressed flag against expect_compressed (CompressedRequest), and answers in gzip.
  async client_compressed_unary(name) {
    const probe = await unary(main, 'UnaryCall', largeRequest({ expect_compressed: { value: true } }), meta(name));
    expectCode(probe, Status.INVALID_ARGUMENT, 'the uncompressed probe');
    // Twice: grpc-js's second call compresses only if the first reply's grpc-accept-encoding lists gzip.
    for (const step of ['first call', 'second call']) {
      const out = await unary(gzip, 'UnaryCall', largeRequest({ expect_compressed: { value: true } }), meta(name));
      expectOk(out, step);
      assertZeros(out.response.payload.body, 314159, step);
    }
  },

  async client_compressed_streaming(name) {
    const out = await finished((callback) => {
      const call = gzip.StreamingInputCall(meta(name), callback);
      for (const size of [27182, 8, 1828, 45904]) {
        call.write({ payload: { body: zeros(size) }, expect_compressed: { value: true } });
      }
      call.end();
      return call;
    });
    expectOk(out, 'StreamingInputCall');
    assert.equal(out.response.aggregated_payload_size, 74922);
  },

  async concurrent_unary_100(name) {
    const outs = await Promise.all(
      Array.from({ length: 100 }, () => unary(main, 'UnaryCall', { response_size: 2048, payload: { body: zeros(1024) } }, meta(name))),
    );
    const failed = outs.filter((out) => out.status.code !== Status.OK).map((out) => describeStatus(out.status));
    assert.deepEqual(failed, [], `${failed.length} of 100 calls failed`);
    for (const out of outs) assertZeros(out.response.payload.body, 2048, 'a reply');
  },
};

// The bug report's upload: 64 messages of 1 MiB in one client-streaming call. Odd runs write
// as fast as grpc-js takes them, even runs wait for 'drain' as a careful writer does.
async function upload(name, careful) {
  const count = 64;
  const size = 1024 * 1024;
  const started = Date.now();
  const out = await finished((callback) => {
    const call = uploader.StreamingInputCall(meta(name), callback);
    (async () => {
      for (let i = 0; i < count; i++) {
        if (!call.write({ payload: { body: zeros(size) } }) && careful) {
          await new Promise((resolve) => call.once('drain', resolve));
        }
      }
      call.end();
    })();
    return call;
  });
  expectOk(out, 'the upload');
  assert.equal(out.response.aggregated_payload_size, count * size);
  return { elapsed_ms: Date.now() - started };
}

// grpc-js keepalive as production clients set it up (keepalive_time_ms 10000,
// keepalive_permit_without_calls), 20 times faster so that a few seconds see several PINGs.
const KEEPALIVE = {
  'grpc.keepalive_time_ms': 500,
  'grpc.keepalive_timeout_ms': 5000,
  'grpc.keepalive_permit_without_calls': 1,
};

function keepaliveTraces(target) {
  const ours = traces.filter((line) => line.includes(target));
  return {
    pings: ours.filter((line) => line.includes('Sending ping')).length,
    acks: ours.filter((line) => line.includes('Received ping response')).length,
    goaways: ours.filter((line) => line.includes('GOAWAY')).map((line) => line.slice(line.indexOf('connection closed'))),
  };
}

// With calls going on, PINGs must never earn a GOAWAY ENHANCE_YOUR_CALM "too_many_pings".
async function keepalive(name) {
  const client = newClient(config.keepaliveTarget, KEEPALIVE);
  const until = Date.now() + config.keepaliveMs;
  // A long server stream (a reply every 250 ms) and unary calls every 100 ms beside it.
  const ticks = Math.ceil(config.keepaliveMs / 250);
  const stream = collect(
    client.StreamingOutputCall({ response_parameters: Array.from({ length: ticks }, () => ({ size: 64, interval_us: 250000 })) }, meta(name)),
  );
  let calls = 0;
  while (Date.now() < until) {
    const out = await unary(client, 'UnaryCall', { response_size: 64, payload: { body: zeros(64) } }, meta(name));
    expectOk(out, `unary call ${calls}`);
    calls += 1;
    await sleep(100);
  }
  const streamed = await stream;
  expectOk(streamed, 'the server stream');
  assert.equal(streamed.messages.length, ticks);
  const last = await unary(client, 'EmptyCall', {}, meta(name));
  expectOk(last, 'the last call');
  client.close();
  const seen = keepaliveTraces(config.keepaliveTarget);
  assert.deepEqual(seen.goaways, [], 'GOAWAYs on the keepalive connection');
  // Past max_ping_strikes (2) + 1 PINGs, unlicensed ones would have been told off.
  assert.ok(seen.pings >= 4, `only ${seen.pings} keepalive PINGs sent in ${config.keepaliveMs} ms`);
  return { ...seen, unary_calls: calls };
}

// The control: the same settings on a connection without calls, where nothing licenses the
// PINGs (gRPC's A8 enforcement: 2 h between PINGs without calls, 2 strikes), are told off.
async function keepaliveIdle() {
  const client = newClient(config.keepaliveIdleTarget, KEEPALIVE);
  const channel = client.getChannel();
  channel.getConnectivityState(true); // connect, with no call
  const until = Date.now() + 5000;
  let seen = keepaliveTraces(config.keepaliveIdleTarget);
  while (!seen.goaways.length && Date.now() < until) {
    await sleep(50);
    seen = keepaliveTraces(config.keepaliveIdleTarget);
  }
  client.close();
  assert.equal(seen.goaways.length, 1, `no GOAWAY after ${seen.pings} PINGs on an idle connection`);
  return seen;
}

// A graceful close(grace) with a call in flight: the call completes; once grpc-js has the
// GOAWAY, a new call fails UNAVAILABLE (nothing listens any more) rather than hanging.
async function gracefulClose(name) {
  const client = newClient(config.closeTarget);
  let inFlight;
  const closed = new Promise((resolve) => {
    inFlight = resolve;
  });
  const parameters = [{ size: 1000 }, { size: 1000, interval_us: 300000 }, { size: 1000, interval_us: 300000 }];
  const call = client.StreamingOutputCall({ response_parameters: parameters }, meta(name));
  const result = collect(call, (message, count) => {
    if (count === 1) inFlight(ask('in_flight', 'closed', { case: name }));
  });
  await closed;
  const channel = client.getChannel();
  const state = channel.getConnectivityState(false);
  if (state === grpc.connectivityState.READY) {
    await new Promise((resolve, reject) =>
      channel.watchConnectivityState(state, Date.now() + 5000, (error) => (error ? reject(new Error('still READY 5 s after the close')) : resolve())),
    );
  }
  const started = Date.now();
  const after = await unary(client, 'EmptyCall', {}, meta(`${name}/after`), within(5000));
  const afterMs = Date.now() - started;
  expectCode(after, Status.UNAVAILABLE, 'a call after the close');
  const out = await result;
  expectOk(out, 'the call in flight');
  assert.deepEqual(out.messages.map((m) => m.payload.body.length), [1000, 1000, 1000]);
  client.close();
  return { after_ms: afterMs, after: describeStatus(after.status) };
}

// -- the runner -------------------------------------------------------------------------------
function describeError(error) {
  if (error && error.code !== undefined && error.details !== undefined) return `${STATUS_NAMES[error.code]}: ${error.details}`;
  return error && error.stack ? error.stack : String(error);
}

async function run(name, body) {
  const started = Date.now();
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error('timed out after 20 s')), 20000);
  });
  try {
    const details = await Promise.race([body(name), timeout]);
    emit({ case: name, ok: true, ms: Date.now() - started, details: details || null });
  } catch (error) {
    emit({ case: name, ok: false, ms: Date.now() - started, error: describeError(error) });
  } finally {
    clearTimeout(timer);
  }
}

async function sequence() {
  for (const [name, body] of Object.entries({ ...INTEROP, ...EXTRA })) await run(name, body);
  for (let i = 0; i < config.uploadRepeats; i++) {
    await run(`upload_64x1MiB/${i}`, (name) => upload(name, i % 2 === 1));
  }
}

(async () => {
  await Promise.all([
    sequence(),
    run('keepalive', keepalive),
    run('keepalive_idle', keepaliveIdle),
    run('graceful_close', gracefulClose),
  ]);
  main.close();
  uploader.close();
  gzip.close();
  emit({ event: 'done' });
  process.exit(0);
})();
