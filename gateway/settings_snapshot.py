"""The settings an instance runs with, handed by its supervisor to every process it starts.

Each process used to read the configuration file itself when it started. The file can change under
a running instance (an operator preparing the next restart, an editor writing it in place), so a
worker or lake process that the supervisor started later (after a crash, a kill by the watchdog)
ran with other settings than its siblings: another ``wal.dir``, another lake, another
``gateway_id``, and the records it acknowledged were landed where the instance does not land them,
or not at all. Now the supervisor writes the settings it runs with into its runtime directory, and
its processes start from that file. On SIGHUP the supervisor applies the configuration file's
run-time sections (``RELOADABLE_SECTIONS``) to it, as each running process does to its own, so a
process started after a reload starts with what its siblings run.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from connectors.durable_files import write_atomically
from gateway.settings import ConfigError, Problem, Settings

SETTINGS_ENV = "EDGE_GATEWAY_SETTINGS"  # set by the supervisor for its processes: the snapshot's path
FILE = "settings.json"


def write_snapshot(runtime_dir: str | os.PathLike[str], settings: Settings) -> Path:
    path = Path(runtime_dir, FILE)
    # Not fsynced: it lives as long as the supervisor, in its private runtime directory.
    write_atomically(path, msgspec.json.encode(settings), mode=0o600, fsync=False)
    return path


def read_snapshot(path: str | os.PathLike[str]) -> Settings:
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=Settings)
    except (OSError, msgspec.DecodeError) as exc:
        message = f"the settings the supervisor handed over are unreadable: {exc}"
        raise ConfigError(message, [Problem(message, str(path))]) from None
