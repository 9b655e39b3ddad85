"""The bare ceiling: aiohttp on uvloop with a msgspec-validating handler, no auth, no WAL, no lake.

Whatever the gateway costs beyond this is the price of authentication, durability and landing;
benchmarks report the gateway as a ratio of this ceiling measured in the same run.
"""

from __future__ import annotations

import argparse

import msgspec
import uvloop
from aiohttp import web

from gateway.ingest.records import Record

_decoder = msgspec.json.Decoder(Record)


async def telemetry(request: web.Request) -> web.Response:
    body = await request.read()
    records = _decoder.decode_lines(body)
    return web.json_response({"accepted": len(records), "rejected": 0, "errors": []}, status=202)


async def ready(request: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/telemetry", telemetry)
    app.router.add_get("/readyz", ready)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
