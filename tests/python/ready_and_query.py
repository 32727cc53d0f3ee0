#!/usr/bin/env python3
"""Ask the agent what clients ask an InfluxDB besides writes, with the
official `influxdb-client` package.

Used by tests/python_client.rs. Prints one JSON object: what `ready()` and
`ping()` returned, and the status and message of the errors that a query
and a bucket listing raised (the agent is write-only).
"""

import argparse
import json

from influxdb_client import InfluxDBClient
from influxdb_client.rest import ApiException


def failure(call):
    try:
        call()
    except ApiException as e:
        body = e.body.decode() if isinstance(e.body, bytes) else e.body
        return {"status": e.status, "message": e.message, "body": body}
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    with InfluxDBClient(url=args.url, token=args.token, org="test-org") as client:
        ready = client.ready()
        outcome = {
            "ready": {
                "status": ready.status,
                "started": ready.started.isoformat() if ready.started else None,
                "up": ready.up,
            },
            "ping": client.ping(),
            "query": failure(lambda: client.query_api().query("buckets()")),
            "buckets": failure(lambda: client.buckets_api().find_buckets()),
        }
    print(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
