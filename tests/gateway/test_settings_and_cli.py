"""Configuration validation, environment overrides and the ``edge-gateway`` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.__main__ import main
from gateway.auth.registry import read_registry
from gateway.settings import ConfigError, load_settings

TESTDATA = Path(__file__).parent / "testdata"


def test_valid_file_and_defaults():
    s = load_settings(TESTDATA / "valid.toml", environ={})
    assert s.listen.port == 9000 and s.limits.max_records_per_request == 500
    assert s.wal.fsync is True and s.auth.mode == "hmac"


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("bad_unknown_key.toml", "unknown field `max_body_byte` - at `$.limits`"),
        ("bad_negative_limit.toml", "at `$.wal.max_total_bytes`"),
        ("bad_open_without_auth.toml", "only allowed on a loopback address"),
        ("bad_not_toml.toml", "not valid TOML"),
    ],
)
def test_bad_files_name_the_offending_path(name, fragment):
    with pytest.raises(ConfigError) as err:
        load_settings(TESTDATA / name, environ={})
    assert fragment in str(err.value)


def test_environment_overrides_the_file():
    s = load_settings(
        TESTDATA / "valid.toml",
        environ={"EDGE_GATEWAY__LISTEN__PORT": "9100", "EDGE_GATEWAY__LAKE__DIR": "/data/lake", "EDGE_GATEWAY__WAL__FSYNC": "false"},
    )
    assert (s.listen.port, s.lake.dir, s.wal.fsync) == (9100, "/data/lake", False)
    with pytest.raises(ConfigError, match="max_body_bytes"):
        load_settings(TESTDATA / "valid.toml", environ={"EDGE_GATEWAY__LIMITS__MAX_BODY_BYTES": "lots"})
    with pytest.raises(ConfigError, match="SECTION"):
        load_settings(None, environ={"EDGE_GATEWAY__PORT": "1"})


def test_check_config_prints_the_effective_config(capsys):
    assert main(["check-config", str(TESTDATA / "valid.toml")]) == 0
    out = capsys.readouterr().out
    assert "[limits]" in out and "max_records_per_request = 500" in out and "segment_bytes = " in out


def test_check_config_fails_with_the_path(capsys):
    assert main(["check-config", str(TESTDATA / "bad_unknown_key.toml")]) == 2
    assert "$.limits" in capsys.readouterr().err


@pytest.mark.parametrize("wal, lake", [("data", "data"), ("data", "data/lake"), ("data/wal", "data"), ("data/./wal/..", "data")])
def test_a_local_lake_sharing_the_wals_directory_is_refused_with_both_paths(tmp_path, capsys, wal, lake):
    config = tmp_path / "gateway.toml"
    config.write_text(f'[wal]\ndir = "{tmp_path / wal}"\n[lake]\ndir = "{tmp_path / lake}"\n')
    assert main(["check-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "lake.dir" in err and "give the lake and the WAL a directory each" in err, err
    assert main(["serve", "--config", str(config)]) == 2, "a start is refused the same way"


def test_a_lake_beside_the_wal_passes(tmp_path, capsys):
    config = tmp_path / "gateway.toml"
    config.write_text(f'[wal]\ndir = "{tmp_path / "data" / "wal"}"\n[lake]\ndir = "{tmp_path / "data" / "wal-lake"}"\n')
    assert main(["check-config", str(config)]) == 0, capsys.readouterr().err


def test_the_filesystem_holding_a_path_is_the_deepest_mount_above_it(tmp_path):
    from gateway.ops.config_check import filesystem_type

    (tmp_path / "var" / "lib").mkdir(parents=True)
    table = tmp_path / "mountinfo"
    table.write_text(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        f"2 1 0:30 / {tmp_path}/var rw - tmpfs tmpfs rw,size=8m\n"
        f"3 2 8:2 / {tmp_path}/var/lib rw - xfs /dev/sdb1 rw\n"
        f"4 1 0:31 / {tmp_path}/with\\040space rw - ramfs none rw\n"
    )
    assert filesystem_type(str(tmp_path / "var" / "wal"), table) == "tmpfs", "not created yet: its parent's"
    assert filesystem_type(str(tmp_path / "var" / "lib" / "wal"), table) == "xfs"
    assert filesystem_type(str(tmp_path / "variable"), table) == "ext4", "a mount point is a whole path component"
    (tmp_path / "with space").mkdir()
    assert filesystem_type(str(tmp_path / "with space"), table) == "ramfs"


def test_a_wal_on_a_tmpfs_is_started_with_a_warning(tmp_path, capsys):
    memory = tmp_path / "memory"
    memory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(memory)], capture_output=True, text=True)
    assert mounted.returncode == 0, f"this check needs root to mount a tmpfs: {mounted.stderr}"
    try:
        config = tmp_path / "gateway.toml"
        wal = "segment_bytes = 1048576\nmax_total_bytes = 2097152\n"  # fits the 4 MiB tmpfs
        config.write_text(f'[wal]\ndir = "{memory / "wal"}"\n{wal}[lake]\ndir = "{tmp_path / "lake"}"\n')
        assert main(["check-config", str(config)]) == 0, "a warning, not an error"
        err = capsys.readouterr().err
        assert "wal.dir" in err and "tmpfs (memory)" in err and "lost if the machine restarts" in err, err
        config.write_text(f'[wal]\ndir = "{tmp_path / "wal"}"\n{wal}[lake]\ndir = "{tmp_path / "lake"}"\n')
        assert main(["check-config", str(config)]) == 0
        assert "(memory)" not in capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(memory)], capture_output=True)


def test_device_add_prints_a_key_that_the_registry_holds(tmp_path, capsys):
    registry = tmp_path / "devices.json"
    assert main(["device", "add", "pump-7", "--registry", str(registry), "--site", "plant-1", "--meta", "fw=2.1"]) == 0
    key = capsys.readouterr().out.strip()
    device = read_registry(registry).devices["pump-7"]
    assert device.keys == [key] and len(key) == 64
    assert device.metadata == {"site": "plant-1", "fw": "2.1"}
    assert registry.stat().st_mode & 0o077 == 0  # keys are secrets
    assert main(["device", "add", "pump-7", "--registry", str(registry)]) == 2
    assert main(["device", "rotate", "pump-7", "--registry", str(registry)]) == 0
    new_key = capsys.readouterr().out.strip()
    assert read_registry(registry).devices["pump-7"].keys == [new_key, key]
    assert main(["device", "add", "bad id!", "--registry", str(registry)]) == 2


def test_serve_refuses_a_public_address_without_authentication():
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(TESTDATA / "bad_open_without_auth.toml")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "refusing to listen on '0.0.0.0'" in proc.stderr


def test_json_logs_are_one_object_per_line(capsys):
    import logging

    from gateway.ops import logs

    logs.configure("INFO")
    logging.getLogger("x").info("hello", extra={"zone": "raw"})
    line = capsys.readouterr().err.strip().splitlines()[-1]
    entry = json.loads(line)
    assert entry["msg"] == "hello" and entry["zone"] == "raw" and entry["level"] == "INFO"


async def test_an_empty_registry_is_reported_at_start(tmp_path, caplog):
    import logging

    from gateway.server import start_gateway
    from tests.gateway.conftest import write_config

    config = write_config(tmp_path)  # no device was ever added
    with caplog.at_level(logging.WARNING):
        running = await start_gateway(load_settings(config, environ={}))
        await running.stop()
    assert "holds no devices" in caplog.text and "edge-gateway device add" in caplog.text


def test_an_inference_endpoint_url_with_a_scheme_is_refused_when_the_config_loads(tmp_path):
    """Triton's clients take host:port for both protocols; a scheme would only fail at start-up."""
    from gateway.settings import ConfigError, load_settings

    config = tmp_path / "gateway.toml"
    config.write_text('[inference]\nbackend = "triton"\n[[inference.endpoints]]\nurl = "http://127.0.0.1:8000"\nprotocol = "http"\n')
    with pytest.raises(ConfigError, match="url"):
        load_settings(config, environ={})


def test_the_supervisor_loads_the_settings_without_the_workers_stack():
    """The supervisor (and check-config) parse the configuration only: every worker loads the HTTP
    server, Arrow and NumPy itself, and a supervisor that loaded them too started its workers later."""
    probe = (
        "import sys, gateway.__main__, gateway.supervisor, gateway.ops.config_check, gateway.settings;"
        "print(sorted(m for m in ('aiohttp', 'pyarrow', 'numpy', 'gateway.server', 'botocore') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_worker_without_the_curated_zone_loads_neither_arrow_nor_numpy(tmp_path):
    """Only the curated zone needs them: a gateway landing the raw zone starts sooner and smaller."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[listen]\nhost = "127.0.0.1"\nport = 0\n[ops]\nhost = "127.0.0.1"\nport = 0\n'
        f'[gateway]\navailability_zone = "az-1"\n[auth]\nmode = "none"\n[wal]\ndir = "{tmp_path / "wal"}"\n'
        f'[lake]\ndir = "{tmp_path / "lake"}"\n[inference]\nenabled = false\n'
    )
    probe = "\n".join([
        "import asyncio, sys",
        "from gateway.server import start_gateway",
        "from gateway.settings import load_settings",
        "async def main():",
        f"    running = await start_gateway(load_settings({str(config)!r}, environ={{}}))",
        "    await running.stop()",
        "asyncio.run(main())",
        "print(sorted(m for m in ('pyarrow', 'numpy', 'gateway.lake.curated') if m in sys.modules))",
    ])
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
