"""``edge-gateway check-config``: everything wrong with a configuration at once, before it is used.

On top of decoding (``settings.read_config``: every key on its own, with its source and the allowed
values), this checks what the gateway will touch when it starts: the TLS certificate and key, the
client CA, the device registry file, the admin token, and the WAL and lake directories (they exist
or can be created, and can be written). ``serve`` runs the same checks and refuses to start on an
error, so a mistake is reported in one line naming its path instead of as a traceback.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgspec

from gateway.settings import Problem, Settings, Sources, is_loopback, nearest_existing, read_config, wal_budget_problem


def check_config(path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None) -> tuple[Settings | None, list[Problem], Sources]:
    settings, problems, sources = read_config(path, environ)
    if settings is not None:
        problems = check_files(settings, sources)
    return settings, problems, sources


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def check_files(settings: Settings, sources: Sources) -> list[Problem]:
    """Problems with the files and directories ``settings`` names (errors stop a start, warnings do not)."""
    problems: list[Problem] = []

    def add(section: str, key: str, message: str, severity: str = "error") -> None:
        problems.append(Problem(f"{section}.{key}: {message}", sources.of(section, key), f"{section}.{key}", severity))

    tls = settings.tls
    if tls.enabled:
        for key in ("cert_path", "key_path"):
            _readable_file(getattr(tls, key), lambda m, k=key: add("tls", k, m))
        _private(tls.key_path, lambda m: add("tls", "key_path", m, "warning"))
    if tls.client_ca_path:
        _readable_file(tls.client_ca_path, lambda m: add("tls", "client_ca_path", m))

    auth = settings.auth
    if auth.mode == "hmac" and auth.registry_source == "file":
        registry = Path(auth.registry_path)
        if not registry.exists():
            if not registry.parent.is_dir():
                add(
                    "auth",
                    "registry_path",
                    f"{registry}: its directory {registry.parent} does not exist; every request gets 401 until the file is there",
                    "warning",
                )
            else:
                add(
                    "auth",
                    "registry_path",
                    f"{registry}: no such file yet; every request gets 401 until `edge-gateway device add DEVICE_ID "
                    f"--registry {registry}` creates it",
                    "warning",
                )
        elif _readable_file(str(registry), lambda m: add("auth", "registry_path", m)):
            from gateway.auth.registry import RegistryError, read_registry

            try:
                read_registry(registry)
            except RegistryError as exc:
                add("auth", "registry_path", f"not a device registry: {exc}")
            _private(str(registry), lambda m: add("auth", "registry_path", m, "warning"))

    admin = settings.admin
    if admin.enabled and _readable_file(admin.token_path, lambda m: add("admin", "token_path", m)):
        token = Path(admin.token_path).read_text(encoding="utf-8").strip()
        if len(token) < 16:
            add("admin", "token_path", f"{admin.token_path}: the token must be at least 16 characters")
        _private(admin.token_path, lambda m: add("admin", "token_path", m, "warning"))

    ops = settings.ops
    if ops.enabled and not is_loopback(ops.host):
        add("ops", "host", f"{ops.host}: /metrics is readable by anyone who reaches this address; keep it off the device network", "warning")

    _check_extras(settings, add)
    _writable_dir(settings.wal.dir, lambda m: add("wal", "dir", m))
    if (kind := filesystem_type(settings.wal.dir)) in MEMORY_FILESYSTEMS:
        add("wal", "dir", f"{settings.wal.dir} is on a {kind} (memory): acknowledged records not yet landed are lost if the machine restarts; put the WAL on a disk", "warning")
    if settings.lake.kind == "local":
        _writable_dir(settings.lake.dir, lambda m: add("lake", "dir", m))
        if overlap := _overlap(settings.wal.dir, settings.lake.dir):
            add("lake", "dir", overlap)
    budget = wal_budget_problem(settings)
    if budget is not None:
        problems.append(Problem(budget, sources.of("wal", "max_total_bytes"), "wal.max_total_bytes"))
    return problems


def _check_extras(settings: Settings, add) -> None:
    """Connectors the configuration uses whose optional packages are not installed."""
    import importlib.util

    def missing(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except (ImportError, ValueError):
            return True

    if missing("aiobotocore"):
        hint = "needs the AWS SDK, which is not installed: pip install 'edge-gateway[s3]'"
        if settings.lake.kind == "s3":
            add("lake", "kind", f'"s3" {hint}')
        for section in ("glue", "eventbridge"):
            if getattr(settings, section) is not None:
                add(section, next(iter(msgspec.structs.asdict(getattr(settings, section)))), f"[{section}] {hint}")
        if settings.auth.registry_source == "secretsmanager":
            add("auth", "registry_source", f'"secretsmanager" {hint}')
    if settings.inference.enabled and settings.inference.backend == "triton" and missing("tritonclient"):
        add("inference", "backend", "\"triton\" needs the Triton client, which is not installed: pip install 'edge-gateway[triton]'")


MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def filesystem_type(path: str, mountinfo: str | os.PathLike[str] = "/proc/self/mountinfo") -> str | None:
    """The type of the filesystem that holds ``path`` (or would, once created), from the kernel's mount table."""
    target = nearest_existing(path).resolve()
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines:
        fields, _, after = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not after:
            continue
        mount_point = Path(parts[4].replace("\\040", " "))
        if mount_point == target or mount_point in target.parents:
            depth = len(mount_point.parts)
            if best is None or depth >= best[0]:  # the last of equal depth is the one on top
                best = (depth, after.split()[0])
    return best[1] if best else None


def _overlap(wal_dir: str, lake_dir: str) -> str | None:
    """Why a local lake may not share the WAL's directory, or None: each would hold the other's files
    (the lake's readers would read WAL segments as data; the WAL's disk budget would count objects)."""
    wal, lake = Path(wal_dir).resolve(), Path(lake_dir).resolve()
    if wal == lake:
        return f"{lake_dir} is also wal.dir; give the lake and the WAL a directory each"
    if wal in lake.parents:
        return f"{lake_dir} is inside wal.dir ({wal_dir}); give the lake and the WAL a directory each"
    if lake in wal.parents:
        return f"{lake_dir} holds wal.dir ({wal_dir}); give the lake and the WAL a directory each"
    return None


def _readable_file(path: str, problem) -> bool:
    p = Path(path)
    if not path:
        problem("is empty")
    elif not p.exists():
        problem(f"{p}: no such file")
    elif not p.is_file():
        problem(f"{p}: not a file")
    elif not os.access(p, os.R_OK):
        problem(f"{p}: not readable by this user (uid {os.getuid()})")
    else:
        return True
    return False


def _private(path: str, problem) -> None:
    """Secrets (keys, tokens, the registry) should be readable by their owner only."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        problem(f"{path}: readable by others (mode {stat.filemode(mode)}); chmod 600 it")


def _writable_dir(path: str, problem) -> None:
    """The directory exists and can be written, or its nearest existing parent lets us create it."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            problem(f"{p}: not a directory")
        elif not os.access(p, os.W_OK | os.X_OK):
            problem(f"{p}: not writable by this user (uid {os.getuid()})")
        return
    parent = nearest_existing(p.absolute().parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        problem(f"{p}: does not exist, and {parent} does not let this user (uid {os.getuid()}) create it")
