'use strict';
/* What client.js and server.js share: grpc.testing's TestService loaded from the repository's
 * own .proto files (examples/interop), the interop constants, and the JSON-lines output. */

const path = require('path');
const protoLoader = require('@grpc/proto-loader');

const REPO = path.resolve(__dirname, '..', '..');

const ECHO_INITIAL = 'x-grpc-test-echo-initial';
const ECHO_INITIAL_VALUE = 'test_initial_metadata_value';
const ECHO_TRAILING = 'x-grpc-test-echo-trailing-bin';
const ECHO_TRAILING_VALUE = Buffer.from([0xab, 0xab, 0xab]);
const SPECIAL_MESSAGE = '\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \u{1f608}\t\n';

function loadTesting(grpc) {
  // testing.proto imports "examples/interop/empty.proto": the include path is the repository.
  const definition = protoLoader.loadSync('examples/interop/testing.proto', {
    includeDirs: [REPO],
    keepCase: true,
    longs: String,
    enums: Number,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).grpc.testing;
}

/** One JSON object per line on stdout: what the Python side reads. */
function emit(object) {
  process.stdout.write(JSON.stringify(object) + '\n');
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

module.exports = {
  ECHO_INITIAL,
  ECHO_INITIAL_VALUE,
  ECHO_TRAILING,
  ECHO_TRAILING_VALUE,
  SPECIAL_MESSAGE,
  emit,
  loadTesting,
  sleep,
};
