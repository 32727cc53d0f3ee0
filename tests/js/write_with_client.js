#!/usr/bin/env node
// Writes points through the agent with the official npm client
// `@influxdata/influxdb-client` (installed by scripts/install-test-deps.sh
// into target/node; the test puts target/node/node_modules on NODE_PATH).
//
// Used by tests/clients.rs. Every body is gzipped (gzipThreshold 0), points
// carry every field type the client writes toward InfluxDB 1.x (float,
// integer, string, boolean), every 97th point has a string holding a
// newline, and the points go out in batches of 500: the script awaits
// flush() after every 500th point, because a batch the client sends on its
// own when batchSize fills up is not awaited by close(), and exiting would
// cut it off. The client's own line
// protocol of each point (Point.toLineProtocol()) is written to --lp-out so
// that the test can post the same points straight to InfluxDB 1.6, which
// has no v2 write API for the client itself. Prints a JSON summary and exits
// 1 if the client reported any error.
'use strict';

const fs = require('fs');
const {InfluxDB, Point} = require('@influxdata/influxdb-client');

function arg(name) {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0 || i + 1 >= process.argv.length) {
    throw new Error(`missing --${name}`);
  }
  return process.argv[i + 1];
}

async function main() {
  const url = arg('url');
  const token = arg('token');
  const bucket = arg('bucket');
  const measurement = arg('measurement');
  const count = Number(arg('count'));
  const startNs = BigInt(arg('start-ns'));
  const lpOut = arg('lp-out');

  const outcome = {written: 0, batches_failed: 0, errors: []};
  const writeApi = new InfluxDB({url, token, timeout: 30000}).getWriteApi(
    'test-org',
    bucket,
    'ns',
    {
      batchSize: count + 1,
      flushInterval: 0,
      gzipThreshold: 0,
      maxRetries: 3,
      writeFailed(error, lines, attempt) {
        outcome.batches_failed += 1;
        outcome.errors.push(`attempt ${attempt}: ${error}`);
      },
    }
  );

  const lines = [];
  for (let i = 0; i < count; i++) {
    const s = i % 5;
    // Nanosecond steps that are not whole microseconds or milliseconds.
    const ts = (startNs + BigInt(i) * 1000003n).toString();
    const point = new Point(measurement)
      .tag('sensor', `s${s}`)
      .tag('site', s % 2 === 0 ? 'plant 1' : 'plant,2=b')
      .floatField('value', i % 10 === 0 ? i : i / 7)
      .floatField('tiny', 1e-9 * (i + 1))
      .intField('seq', i - 1500)
      .booleanField('ok', i % 3 === 0)
      .stringField('label', `label "${i}" \\ end`)
      .timestamp(ts);
    if (i % 97 === 0) {
      point.stringField('note', `line one of ${i}\nline two, "quoted"\n\tthree`);
    }
    lines.push(point.toLineProtocol());
    writeApi.writePoint(point);
    outcome.written += 1;
    if (outcome.written % 500 === 0) {
      try {
        await writeApi.flush();
      } catch (e) {
        outcome.errors.push(`flush: ${e}`);
      }
    }
  }
  fs.writeFileSync(lpOut, lines.join('\n') + '\n');
  try {
    await writeApi.close();
  } catch (e) {
    outcome.errors.push(`close: ${e}`);
  }
  process.stdout.write(JSON.stringify(outcome) + '\n');
  return outcome.errors.length === 0 ? 0 : 1;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (e) => {
    process.stderr.write(`${e && e.stack ? e.stack : e}\n`);
    process.exit(2);
  }
);
