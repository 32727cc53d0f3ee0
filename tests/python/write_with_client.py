#!/usr/bin/env python3
"""Write points through the agent with the official `influxdb-client` package.

Used by tests/python_client.rs. Writes `--count` points with the batching
write API and gzip, like a real application would, and fails (exit 1) if the
client reported any error. Point i belongs to series `sensor=s{i % series}`
and has timestamp `start_ns + (i // series)` milliseconds, so every
(series, timestamp) pair is unique and the test can count back exactly.
"""

import argparse
import json
import sys

from influxdb_client import InfluxDBClient, Point, WriteOptions, WritePrecision


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--org", default="test-org")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--measurement", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--start-ns", type=int, required=True)
    args = parser.parse_args()

    outcome = {"batches_ok": 0, "errors": [], "retries": 0}

    def on_success(conf, data):
        outcome["batches_ok"] += 1

    def on_error(conf, data, exception):
        outcome["errors"].append(repr(exception))

    def on_retry(conf, data, exception):
        outcome["retries"] += 1

    options = WriteOptions(
        batch_size=1000,
        flush_interval=1000,
        jitter_interval=0,
        retry_interval=500,
        max_retries=3,
        max_retry_delay=5000,
    )
    with InfluxDBClient(
        url=args.url, token=args.token, org=args.org, enable_gzip=True, timeout=30_000
    ) as client:
        with client.write_api(
            write_options=options,
            success_callback=on_success,
            error_callback=on_error,
            retry_callback=on_retry,
        ) as write_api:
            chunk = []
            for i in range(args.count):
                s = i % args.series
                ts = args.start_ns + (i // args.series) * 1_000_000
                point = (
                    Point(args.measurement)
                    .tag("sensor", f"s{s}")
                    .tag("host", f"gw-{s % 3:04d}")
                    .tag("site", "plant 1")
                    .field("value", 20.0 + (i % 100) / 8)
                    .field("seq", i)
                    .field("ok", i % 2 == 0)
                    .field("status", f"ok \"{i}\"")
                    .time(ts, WritePrecision.NS)
                )
                chunk.append(point)
                if len(chunk) == 250:
                    write_api.write(bucket=args.bucket, record=chunk)
                    chunk = []
            if chunk:
                write_api.write(bucket=args.bucket, record=chunk)
        # Leaving the write_api block flushes every pending batch.

    print(json.dumps(outcome))
    return 1 if outcome["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
