"""The supervisor's runtime directory: its processes' sockets and heartbeats, private to one life.

It is made under systemd's ``$RUNTIME_DIRECTORY`` when the unit has one, else under the system's
temporary directory (a Unix socket's path must stay short, which ``wal.dir`` need not be), and
removed by the supervisor when it exits. A supervisor killed (SIGKILL,
the OOM killer, a crash) cannot remove it, so its path is noted in ``<wal.dir>/runtime.dir``: the
next start of the instance, holding the instance lock, removes what the last life left. Without the
note a gateway in a crash loop left one directory per life in ``/tmp`` for good.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from connectors.durable_files import write_atomically

log = logging.getLogger(__name__)

PREFIX = "edge-gateway-"
NOTE = "runtime.dir"  # under wal.dir: the path of the runtime directory of the instance's last life


def make_runtime_dir(wal_root: str | os.PathLike[str]) -> Path:
    """A new runtime directory (mode 0700), once the one a killed predecessor left is gone."""
    remove_left_over(wal_root)
    # systemd's RuntimeDirectory= (the unit's /run/edge-gateway): never aged out by tmpfiles, gone at stop.
    path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None))
    try:
        # Not fsynced: after a power loss the temporary directory is usually gone anyway.
        write_atomically(Path(wal_root) / NOTE, str(path).encode(), fsync=False)
    except OSError as exc:  # a full disk: the start goes on, only a kill would leave the directory behind
        log.warning("cannot note the runtime directory; a kill would leave it behind", extra={"path": str(path), "error": str(exc)})
    return path


def remove_runtime_dir(wal_root: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    shutil.rmtree(path, ignore_errors=True)
    try:
        Path(wal_root, NOTE).unlink(missing_ok=True)
    except OSError:
        pass  # the next start tries again


def remove_left_over(wal_root: str | os.PathLike[str]) -> None:
    note = Path(wal_root, NOTE)
    try:
        left = Path(note.read_text().strip())
        if _made_by_a_gateway(left):
            shutil.rmtree(left, ignore_errors=True)
            log.info("removed the runtime directory a killed supervisor left", extra={"path": str(left)})
        note.unlink()
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:  # never a reason not to start
        log.warning("cannot read or remove the note of the last runtime directory", extra={"path": str(note), "error": str(exc)})


def _made_by_a_gateway(path: Path) -> bool:
    """Only a directory a supervisor of this user made: an edited or damaged note removes nothing else."""
    if not path.is_absolute() or not path.name.startswith(PREFIX) or path.is_symlink():
        return False
    try:
        status = path.lstat()
    except OSError:
        return False
    return path.is_dir() and status.st_uid == os.getuid()
