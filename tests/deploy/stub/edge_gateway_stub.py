"""A stand-in for the edge-gateway console script, used only to exercise the Ansible role.

It speaks the gateway's operational contract with the standard library alone: `check-config FILE`
validates the TOML sections and keys (exit 2 on an invalid file) and prints the effective config;
`serve --config FILE` answers /healthz, /readyz and /metrics on [listen], turns /readyz to 503 and
exits on SIGTERM, and re-reads the config on SIGHUP.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECTIONS = {
    "listen": {"host", "port", "workers"},
    "gateway": {"gateway_id", "availability_zone", "dataset"},
    "auth": {"mode", "registry_source", "registry_path", "timestamp_window_secs"},
    "limits": {"max_body_bytes", "max_decompressed_bytes", "max_record_bytes", "max_records_per_request"},
    "wal": {"dir", "segment_bytes", "max_total_bytes"},
    "lake": {"kind", "dir", "target_object_bytes", "max_object_age_secs", "max_open_partitions"},
    "s3": {"bucket", "prefix", "region", "endpoint_url", "kms_key_id"},
    "glue": {"database", "datasets", "region"},
    "eventbridge": {"event_bus_name", "region"},
    "secretsmanager": {"secret_ids", "region", "refresh_interval_secs"},
    "drain": {"deadline_secs"},
    "log": {"level"},
}


def load(path: str) -> dict:
    with open(path, "rb") as handle:
        config = tomllib.load(handle)
    for section, keys in config.items():
        if section not in SECTIONS:
            raise ValueError(f"unknown section [{section}]")
        unknown = set(keys) - SECTIONS[section]
        if unknown:
            raise ValueError(f"unknown keys in [{section}]: {', '.join(sorted(unknown))}")
    if config.get("lake", {}).get("kind") not in {"local", "s3"}:
        raise ValueError("at $.lake.kind: expected 'local' or 's3'")
    if config.get("auth", {}).get("mode") not in {"hmac", "none"}:
        raise ValueError("at $.auth.mode: expected 'hmac' or 'none'")
    if not isinstance(config.get("listen", {}).get("port"), int):
        raise ValueError("at $.listen.port: expected an integer")
    return config


def check_config(path: str) -> int:
    try:
        config = load(path)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"invalid config {path}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(config, indent=2, sort_keys=True))
    return 0


def serve(path: str) -> int:
    config = load(path)
    state = {"draining": False}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/healthz":
                self.reply(200, b'{"status": "ok"}')
            elif self.path == "/readyz":
                self.reply(503 if state["draining"] else 200, b'{"ready": %s}' % (b"false" if state["draining"] else b"true"))
            elif self.path == "/metrics":
                self.reply(200, b"edge_gateway_draining %d\n" % state["draining"], "text/plain; version=0.0.4")
            else:
                self.reply(404, b'{"error": "not_found", "message": "No such route."}')

        def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((config["listen"]["host"], config["listen"]["port"]), Handler)

    def drain(signum: int, frame: object) -> None:
        state["draining"] = True
        print("draining: readyz now 503", flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()

    def reload(signum: int, frame: object) -> None:
        load(path)
        print("reloaded run-time settings", flush=True)

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGHUP, reload)
    print(f"listening on {config['listen']['host']}:{config['listen']['port']}", flush=True)
    server.serve_forever()
    print("drained", flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="edge-gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check-config").add_argument("file")
    commands.add_parser("serve").add_argument("--config", required=True)
    args = parser.parse_args()
    sys.exit(check_config(args.file) if args.command == "check-config" else serve(args.config))
