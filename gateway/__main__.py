"""``edge-gateway``: serve, check a config, run the demo or the AZ failover drill, manage devices."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import sys
from pathlib import Path

from gateway import early_signals, open_files, service_manager

# Signals that arrive while `serve` is still importing and starting are remembered, not fatal:
# a supervisor's SIGTERM must drain a young worker (its WAL may hold acknowledged records), and
# SIGHUP's default action would kill it (SIGUSR1's too: it tells the lake process to drain).
if len(sys.argv) > 1 and sys.argv[1] == "serve":
    early_signals.remember()
    service_manager.notify_ready()  # systemd may send SIGHUP from now on
    from gateway.allocator import tune_allocators

    tune_allocators()

from gateway.ops import logs  # noqa: E402  (after the handlers: these imports take a while)
from gateway.auth.registry import RegistryError, add_device, read_registry, remove_device, rotate_key, set_enabled  # noqa: E402
from gateway.settings import ConfigError, dump_toml, load_settings  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-gateway", description="Edge telemetry gateway")
    p.add_argument("--version", action="version", version=f"edge-gateway {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", "-c", type=Path, help="TOML configuration file (defaults apply without one)")
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--lake-process", action="store_true", help=argparse.SUPPRESS)

    check = sub.add_parser(
        "check-config",
        help="validate a configuration file (every error, with its line or environment variable) and print the effective config",
    )
    check.add_argument("config", type=Path)

    demo = sub.add_parser("demo", help="run the gateway on a local lake and drive it with simulated devices")
    demo.add_argument("--dir", type=Path, default=Path("var/demo"), help="where the demo's WAL and lake go")
    demo.add_argument("--seconds", type=float, default=8.0)
    demo.add_argument("--devices", type=int, default=50)
    demo.add_argument("--rate", type=float, default=100.0, help="requests per second")
    demo.add_argument("--records", type=int, default=100, help="records per request")
    demo.add_argument("--s3", action="store_true", help="land through the S3 API in a local S3-compatible server (moto)")

    drill = sub.add_parser("drill", help="run the AZ failover drill on this machine (three zones behind HAProxy)")
    drill.add_argument("--config", "-c", type=Path, help="drill.toml: fleet, load and step durations (defaults: make drill)")
    drill.add_argument("--out", type=Path, default=None, help="report directory (default: <workdir>/report)")
    drill.add_argument("--runbook", type=Path, default=None, help="runbook (default: deploy/runbooks/az-failover.yaml)")
    drill.add_argument("--print-config", action="store_true", help="print the effective drill configuration and exit")

    tap = sub.add_parser("tap", help="stream a sample of the records passing a stage of a running gateway (NDJSON)")
    tap.add_argument("--config", "-c", type=Path, help="the running gateway's configuration: its [admin] listener and token")
    tap.add_argument("--stage", default="received", help="received, quarantined, landed, scored; comma-separated (default: received)")
    tap.add_argument("--device", default=None, help="only this device's records")
    tap.add_argument("--rate", type=float, default=10.0, help="events per second and stage at most (default: 10)")
    tap.add_argument("--limit", type=int, default=None, help="stop after this many events")
    tap.add_argument("--url", default=None, help="the admin listener, e.g. http://127.0.0.1:9090 (default: from --config)")

    device = sub.add_parser("device", help="manage the device registry file")
    dsub = device.add_subparsers(dest="action", required=True)
    add = dsub.add_parser("add", help="create a device and print its key")
    add.add_argument("device_id")
    add.add_argument("--registry", type=Path, required=True)
    add.add_argument("--site", default=None)
    add.add_argument("--model", default=None)
    add.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="more metadata (repeatable)")
    listing = dsub.add_parser("list", help="the devices in the registry (never their keys)")
    listing.add_argument("--registry", type=Path, required=True)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    for name, help_text in (("rotate", "issue a new key; the old one keeps working until the next rotation"),
                            ("disable", "refuse the device's requests (403)"), ("enable", "accept the device again"),
                            ("remove", "delete the device and its keys (a running gateway refuses it within a second)")):
        cmd = dsub.add_parser(name, help=help_text)
        cmd.add_argument("device_id")
        cmd.add_argument("--registry", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args.config, args.worker_index, args.listen_fd, args.lake_process)
        if args.command == "check-config":
            return _check_config(args.config)
        if args.command == "demo":
            from gateway.demo import main as demo_main

            logs.configure("WARNING")
            return demo_main(args.dir, args.seconds, args.devices, args.rate, args.records, args.s3)
        if args.command == "drill":
            from gateway.drill.run import main as drill_main

            logs.configure("WARNING")
            return drill_main(args.config, args.out, args.runbook, args.print_config)
        if args.command == "device":
            return _device(args)
        if args.command == "tap":
            return _tap(args)
    except ConfigError as exc:
        print(f"edge-gateway: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except RegistryError as exc:
        print(f"edge-gateway: {exc}", file=sys.stderr)
        return 2
    return 1


def _handed_over(snapshot: str):
    from gateway.settings import ConfigError
    from gateway.settings_snapshot import read_snapshot

    try:
        return read_snapshot(snapshot), []
    except ConfigError as exc:
        return None, exc.problems


def _serve(config: Path | None, worker_index: int | None, listen_fd: int | None, lake_process: bool = False) -> int:
    from gateway.supervisor import Supervisor
    from gateway.durable.wal_layout import WalLocked

    from gateway.ops.config_check import check_config, errors
    from gateway.settings_snapshot import SETTINGS_ENV

    if snapshot := os.environ.get(SETTINGS_ENV):
        # Started by a supervisor: its settings, whatever the file says by now (gateway/settings_snapshot.py).
        settings, problems = _handed_over(snapshot)
    else:
        settings, problems, _ = check_config(config)
    # Written from a thread of its own: a stderr nobody reads must not stop the event loop.
    logs.configure(settings.log.level if settings is not None else "INFO", background=True)
    start_log = logging.getLogger("gateway")
    if errors(problems):
        # One JSON line for the whole refusal: every problem, each with its source and the path it names.
        start_log.critical(
            "the gateway cannot start: invalid configuration",
            extra={"config": str(config or "<defaults>"), "error": str(errors(problems)[0]), "problems": _problem_list(problems)},
        )
        return 2
    for problem in problems:
        start_log.warning(problem.message, extra={"source": problem.source, "setting": problem.path})
    stop_requested = early_signals.stop_requested
    open_files.raise_limit()  # before any child starts: they inherit it
    try:
        if lake_process:  # started by the supervisor: lands every worker's WAL (gateway/lake/lake_process.py)
            return _run_lake(settings, early_signals.remembered)
        if settings.listen.workers > 1 and worker_index is None:
            return Supervisor(config, settings).run(stop_requested=stop_requested)
        import socket

        # Start-up builds objects that live as long as the process: collecting them while importing
        # the worker's stack only walked them again and again (a tenth of a worker's start). serve()
        # freezes them once started and turns the collector back on.
        gc.disable()
        from gateway.server import serve  # the worker's whole stack: the supervisor never loads it

        # Landing threads (compression, the curated zone's decoding) hold the GIL in bursts; a shorter
        # switch interval hands it back to the event loop sooner, which keeps ack latency low.
        sys.setswitchinterval(0.001)
        try:
            import uvloop

            uvloop.install()
        except ImportError:  # uvloop is optional on platforms without it
            pass
        listener = socket.socket(fileno=listen_fd) if listen_fd is not None else None
        return asyncio.run(
            serve(
                settings,
                lambda: load_settings(config),
                stop_requested,
                early_signals.reload_requested,
                worker_index=worker_index,
                listener=listener,
            )
        )
    except (WalLocked, OSError) as exc:
        # Start-up refused (another owner, a port in use, a file it cannot read): one line, with the path.
        extra = {"error": str(exc)}
        if getattr(exc, "filename", None):
            extra["path"] = str(exc.filename)
        # A disk's error without a path (an fsync's, a full disk's write) says where it happened only in its trace.
        disk_failed = isinstance(exc, OSError) and exc.errno in (errno.EIO, errno.ENOSPC) and not exc.filename
        start_log.critical("the gateway cannot start", extra=extra, exc_info=disk_failed)
        return 2
    except early_signals.StoppedWhileStarting as exc:
        start_log.warning(str(exc))
        return 0
    except Exception as exc:  # anything else that stops a start: still one JSON line (the trace inside it)
        start_log.critical("the gateway cannot start", exc_info=True, extra={"error": f"{type(exc).__name__}: {exc}"})
        return 2
    finally:
        early_signals.ignore_from_now()


def _run_lake(settings, remembered: list[int]) -> int:
    from gateway.lake.lake_process import run_lake

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(run_lake(settings, remembered))


def _version() -> str:
    from gateway.ops.build import version

    return version()


def _problem_list(problems) -> list[dict[str, str]]:
    return [{"severity": p.severity, "source": p.source, "setting": p.path, "message": p.message} for p in problems]


def _check_config(config: Path) -> int:
    """Every problem on stderr (errors and warnings); the effective config, as loadable TOML, on stdout."""
    from gateway.ops.config_check import check_config, errors

    settings, problems, sources = check_config(config)
    for problem in problems:
        print(problem, file=sys.stderr)
    if errors(problems):
        n = len(errors(problems))
        print(f"edge-gateway: invalid configuration: {n} error{'s' if n > 1 else ''}", file=sys.stderr)
        return 2
    sys.stdout.write(dump_toml(settings, sources))
    return 0


def _device(args: argparse.Namespace) -> int:
    if args.action == "add":
        metadata = {k: v for k, v in (("site", args.site), ("model", args.model)) if v}
        for item in args.meta:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise RegistryError(f"--meta expects KEY=VALUE, got {item!r}")
            metadata[key] = value
        key = add_device(args.registry, args.device_id, metadata)
        print(key)
    elif args.action == "rotate":
        print(rotate_key(args.registry, args.device_id))
    elif args.action == "list":
        _list_devices(args.registry, args.json)
    elif args.action == "remove":
        remove_device(args.registry, args.device_id)
    else:
        set_enabled(args.registry, args.device_id, args.action == "enable")
    return 0


def _tap(args: argparse.Namespace) -> int:
    from gateway.ops.status.tap import TapError, TapRequest, run_client

    settings = load_settings(args.config)
    admin = settings.admin
    if not admin.enabled or not admin.token_path:
        print("edge-gateway: tap needs the admin listener: set [admin] enabled = true and token_path", file=sys.stderr)
        return 2
    host = "127.0.0.1" if admin.host in ("0.0.0.0", "") else ("[::1]" if admin.host == "::" else admin.host)
    url = args.url or f"http://{host}:{admin.port}"
    try:
        request = TapRequest.from_query({"stage": args.stage, "rate": str(args.rate), **({"device": args.device} if args.device else {})})
        token = Path(admin.token_path).read_text(encoding="utf-8").strip()
        return run_client(url, token, request, args.limit, sys.stdout)
    except (ValueError, OSError, TapError) as exc:
        print(f"edge-gateway: tap: {exc}", file=sys.stderr)
        return 2


def _list_devices(registry: Path, as_json: bool) -> None:
    if not registry.exists():
        raise RegistryError(f"{registry}: no such registry file")
    devices = read_registry(registry).devices
    if as_json:
        import orjson

        for device_id, device in sorted(devices.items()):
            line = {"device_id": device_id, "enabled": device.enabled, "keys": len(device.keys), "metadata": device.metadata}
            print(orjson.dumps(line).decode())
        return
    print(f"{'DEVICE':<32} {'ENABLED':<8} {'KEYS':<5} METADATA")
    for device_id, device in sorted(devices.items()):
        meta = " ".join(f"{k}={v}" for k, v in sorted(device.metadata.items()))
        print(f"{device_id:<32} {'yes' if device.enabled else 'no':<8} {len(device.keys):<5} {meta}")


if __name__ == "__main__":
    sys.exit(main())
