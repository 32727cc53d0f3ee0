#!/usr/bin/env python3
"""Write points with the v1 Python client, PyPI `influxdb` (InfluxDBClient).

Used by tests/clients.rs, once through the agent and once straight into
InfluxDB 1.6, with the same arguments but the host, port and database. The
client sends gzip bodies (gzip=True). For every time precision the client
offers (n, u, ms, s, m, h) it writes `--per-precision` points into retention
policy `--rp` and as many again into the database's default retention policy
(no retention_policy given). Timestamps are integers in the precision's unit
counted back from `--base-s`, so every point of a precision is its own. The
fields hold every type the client writes: float, integer, string (with a
quote, a backslash and a newline) and boolean. Prints a JSON summary.
"""

import argparse
import json
import sys

from influxdb import InfluxDBClient

# Nanoseconds in one unit of each precision the client offers.
PRECISIONS = {"n": 1, "u": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def points(measurement, precision, rp_tag, base_s, count):
    unit = PRECISIONS[precision]
    base = base_s * 10**9 // unit
    out = []
    for k in range(count):
        out.append(
            {
                "measurement": measurement,
                "tags": {"precision": precision, "rp": rp_tag, "host": f"gw {k % 3}"},
                # Whole units of the precision: an integer time is sent as given.
                "time": base - 7 * k,
                "fields": {
                    "value": k / 3 if k % 4 else float(k),
                    "seq": k - 10,
                    "ok": k % 2 == 0,
                    "msg": f'{precision} "{k}" \\ first\nsecond',
                },
            }
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--rp", required=True)
    parser.add_argument("--measurement", required=True)
    parser.add_argument("--base-s", type=int, required=True)
    parser.add_argument("--per-precision", type=int, default=40)
    args = parser.parse_args()

    client = InfluxDBClient(host=args.host, port=args.port, database=args.db, gzip=True, timeout=30)
    written = 0
    for precision in PRECISIONS:
        for rp in (args.rp, None):
            batch = points(args.measurement, precision, rp or "default", args.base_s, args.per_precision)
            ok = client.write_points(batch, time_precision=precision, retention_policy=rp, batch_size=25)
            if not ok:
                print(json.dumps({"written": written, "error": f"write_points {precision} {rp} returned {ok}"}))
                return 1
            written += len(batch)
    client.close()
    print(json.dumps({"written": written}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
