"""The operator's command line: check-config as a real validation, start-up refusals, devices."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.__main__ import main
from gateway.auth.registry import add_device
from gateway.server import start_gateway
from gateway.settings import load_settings
from gateway.simulator import SimulatedDevice
from tests.gateway.conftest import make_env, record, signed, write_config
from tests.gateway.conftest import ndjson

TESTDATA = Path(__file__).parents[1] / "testdata"


def check(capsys, path: Path, env: dict[str, str] | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if env and monkeypatch:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
    code = main(["check-config", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_config_reports_every_error_with_its_line_or_variable(tmp_path, capsys, monkeypatch):
    config = tmp_path / "gateway.toml"
    config.write_text(
        "[listen]\n"
        "port = -1\n"  # line 2
        "workerz = 2\n"  # line 3
        "\n"
        "[auth]\n"
        'mode = "hmca"\n'  # line 6
        "\n"
        "[limitz]\n"  # line 8
        "x = 1\n"
    )
    code, out, err = check(capsys, config, {"EDGE_GATEWAY__LOG__LEVEL": "LOUD"}, monkeypatch)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert f"{config}:2: Expected `int` >= 0 - at `$.listen.port`" in lines
    assert f"{config}:3: Object contains unknown field `workerz` - at `$.listen` (did you mean `workers`?)" in lines
    assert f"{config}:6: Invalid enum value 'hmca' - at `$.auth.mode` (allowed: `hmac`, `none`)" in lines
    assert f"{config}:8: Object contains unknown field `limitz` - at `$` (did you mean `limits`?)" in lines
    assert (
        "EDGE_GATEWAY__LOG__LEVEL: Invalid enum value 'LOUD' - at `$.log.level` (allowed: `DEBUG`, `INFO`, `WARNING`, `ERROR`)"
        in lines
    )
    assert lines[-1] == "edge-gateway: invalid configuration: 5 errors"


def test_check_config_checks_the_files_the_gateway_will_need(tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("short\n")
    token.chmod(0o644)
    (tmp_path / "wal-is-a-file").write_text("")
    config = write_config(
        tmp_path,
        tls={"enabled": True, "cert_path": str(tmp_path / "missing-cert.pem"), "key_path": str(tmp_path / "missing-key.pem")},
        admin={"enabled": True, "port": 9999, "token_path": str(token)},
        wal={"dir": str(tmp_path / "wal-is-a-file")},
        auth={"registry_path": str(tmp_path / "no-such-dir" / "devices.json")},
    )
    code, out, err = check(capsys, config)
    assert code == 2
    assert f"tls.cert_path: {tmp_path / 'missing-cert.pem'}: no such file" in err
    assert f"tls.key_path: {tmp_path / 'missing-key.pem'}: no such file" in err
    assert f"admin.token_path: {token}: the token must be at least 16 characters" in err
    assert "warning: admin.token_path" in err and "readable by others" in err
    assert f"wal.dir: {tmp_path / 'wal-is-a-file'}: not a directory" in err
    assert f"warning: auth.registry_path: {tmp_path / 'no-such-dir' / 'devices.json'}: its directory" in err
    # Each one names the line of the setting it is about.
    assert all(line.startswith(f"{config}:") for line in err.splitlines()[:-1])
    assert err.splitlines()[-1] == "edge-gateway: invalid configuration: 4 errors"


def test_check_config_output_loads_back_unchanged(tmp_path, capsys, monkeypatch):
    s3 = tmp_path / "s3.toml"
    s3.write_text(
        '[lake]\nkind = "s3"\n[s3]\nbucket = "my-lake"\ntags = { "cost center" = "x" }\n'
        '[inference]\nfeatures = ["a", "b"]\n[[inference.endpoints]]\nurl = "localhost:8001"\n'
    )
    for source in (TESTDATA / "valid.toml", s3):
        code, out, err = check(capsys, source, {"EDGE_GATEWAY__DRAIN__DEADLINE_SECS": "12.5"}, monkeypatch)
        assert code == 0, err
        assert "deadline_secs = 12.5  # EDGE_GATEWAY__DRAIN__DEADLINE_SECS" in out
        assert "features = [" in out and "features = (" not in out
        printed = tmp_path / "printed.toml"
        printed.write_text(out)
        assert load_settings(printed, environ={}) == load_settings(source)


def test_a_missing_tls_certificate_is_one_json_line_naming_it_and_exit_2(tmp_path):
    make_env(tmp_path)
    config = write_config(
        tmp_path, tls={"enabled": True, "cert_path": str(tmp_path / "cert.pem"), "key_path": str(tmp_path / "key.pem")}
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    entry = json.loads(lines[0])
    assert entry["level"] == "CRITICAL" and entry["msg"].startswith("the gateway cannot start")
    assert str(tmp_path / "cert.pem") in entry["error"] and "no such file" in entry["error"]
    assert {p["setting"] for p in entry["problems"]} == {"tls.cert_path", "tls.key_path"}


def test_a_port_in_use_is_one_json_line_and_exit_2(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        make_env(tmp_path)
        config = write_config(tmp_path, listen={"port": port})
        proc = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 2
    entry = json.loads(proc.stderr.strip().splitlines()[-1])
    assert entry["msg"] == "the gateway cannot start" and str(port) in entry["error"]
    assert "Traceback" not in proc.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("edge-gateway ")


def test_device_list_and_remove_and_no_silent_directories(tmp_path, capsys):
    registry = tmp_path / "devices.json"
    assert main(["device", "list", "--registry", str(registry)]) == 2  # no such file: said, not an empty list
    assert "no such registry file" in capsys.readouterr().err
    key = add_device(registry, "pump-7", {"site": "plant-1"})
    add_device(registry, "pump-8", {})
    assert main(["device", "disable", "pump-8", "--registry", str(registry)]) == 0
    assert main(["device", "list", "--registry", str(registry)]) == 0
    out = capsys.readouterr().out
    assert "pump-7" in out and "site=plant-1" in out and key not in out
    assert main(["device", "list", "--registry", str(registry), "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed == [
        {"device_id": "pump-7", "enabled": True, "keys": 1, "metadata": {"site": "plant-1"}},
        {"device_id": "pump-8", "enabled": False, "keys": 1, "metadata": {}},
    ]
    assert main(["device", "remove", "pump-7", "--registry", str(registry)]) == 0
    assert main(["device", "remove", "pump-7", "--registry", str(registry)]) == 2
    assert "no device 'pump-7'" in capsys.readouterr().err
    missing = tmp_path / "nonexistent" / "dir" / "x.json"
    assert main(["device", "add", "pump-9", "--registry", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nonexistent").exists()


def test_devices_changed_at_once_all_keep_their_change(tmp_path):
    """Each change read the file, changed it and wrote it back: of 20 devices added in parallel by a
    provisioning script, 7 stayed, and the other 13 held printed keys the gateway never knew."""
    import threading

    from gateway.auth.registry import DeviceRegistry, rotate_key, set_enabled

    registry = tmp_path / "devices.json"
    for i in range(8):
        add_device(registry, f"old-{i}", {})
    start = threading.Barrier(24)
    keys: dict[str, str] = {}

    def add(i: int) -> None:
        start.wait()
        keys[f"new-{i}"] = add_device(registry, f"new-{i}", {"site": "plant-1"})

    def rotate(i: int) -> None:
        start.wait()
        keys[f"old-{i}"] = rotate_key(registry, f"old-{i}")

    def disable(i: int) -> None:
        start.wait()
        set_enabled(registry, f"old-{i}", False)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(16)]
    threads += [threading.Thread(target=rotate, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=disable, args=(i,)) for i in range(4, 8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    loaded = DeviceRegistry.load(registry)
    assert len(loaded) == 24
    assert all(loaded.keys(device_id)[0] == key.encode() for device_id, key in keys.items())
    assert [loaded.get(f"old-{i}").enabled for i in range(8)] == [True] * 4 + [False] * 4


def test_a_registry_change_waits_for_the_one_before_and_says_so_when_it_never_ends(tmp_path, monkeypatch):
    import fcntl
    import os

    from gateway.auth import registry as registry_module

    registry = tmp_path / "devices.json"
    add_device(registry, "pump-1", {})
    monkeypatch.setattr(registry_module, "LOCK_WAIT_SECS", 0.3)
    held = os.open(tmp_path / ".devices.json.lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        with pytest.raises(registry_module.RegistryError, match="held its lock for 0.3 s"):
            add_device(registry, "pump-2", {})
    finally:
        os.close(held)
    add_device(registry, "pump-2", {})
    assert len(registry_module.DeviceRegistry.load(registry)) == 2


async def test_a_device_added_while_running_is_accepted_without_sighup(tmp_path):
    env = make_env(tmp_path, n_devices=1)
    running = await start_gateway(load_settings(env.config, environ={}))
    try:
        key = add_device(tmp_path / "devices.json", "late-1", {"site": "plant-9"})
        device = SimulatedDevice("late-1", key)
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 5
            status = None
            while time.monotonic() < deadline:
                body = ndjson(record("late-1", seq=1))
                async with http.post(running.url + "/v1/telemetry", data=body, headers=signed(device, body)) as resp:
                    status = resp.status
                if status == 202:
                    break
                await asyncio.sleep(0.2)
            assert status == 202
            # Removing it is picked up the same way.
            from gateway.auth.registry import remove_device

            remove_device(tmp_path / "devices.json", "late-1")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and running.gateway.registry.get("late-1") is not None:
                await asyncio.sleep(0.1)
            assert running.gateway.registry.get("late-1") is None
        assert running.gateway.metrics.registry_refreshes.labels("ok")._value.get() >= 2
    finally:
        await running.stop()


async def test_a_registry_file_gone_for_a_while_refuses_no_device(tmp_path, caplog):
    """A registry moved aside (an editor's save, a restore, an unmounted volume) read as no devices at
    all: every device got 401 until it was back, and a SIGHUP meanwhile emptied the registry too. The
    devices known before stay in use meanwhile."""
    env = make_env(tmp_path, n_devices=1)
    registry = tmp_path / "devices.json"
    running = await start_gateway(load_settings(env.config, environ={}))
    try:
        registry.rename(tmp_path / "devices.json.moved")
        from gateway.auth.registry import RegistryError

        with pytest.raises(RegistryError, match="registry file is gone"):  # SIGHUP meanwhile: refused, changing nothing
            running.gateway.reload(load_settings(env.config, environ={}))
        assert running.gateway.registry.get("dev-1") is not None
        errors = running.gateway.metrics.registry_refreshes.labels("error")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not errors._value.get():
            await asyncio.sleep(0.1)
        said = [r.error for r in caplog.records if "cannot be read; the previous devices stay" in r.getMessage()]
        assert errors._value.get() == 1 and said and "registry file is gone" in said[0]
        async with aiohttp.ClientSession() as http:
            body = ndjson(record(seq=1))
            async with http.post(running.url + "/v1/telemetry", data=body, headers=signed(env.device(), body)) as resp:
                assert resp.status == 202, await resp.text()
            (tmp_path / "devices.json.moved").rename(registry)
            key = add_device(registry, "late-1", {})
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and running.gateway.registry.get("late-1") is None:
                await asyncio.sleep(0.1)
            assert running.gateway.registry.get("late-1").keys == [key] and running.gateway.registry.get("dev-1")
    finally:
        await running.stop()


BLOCK_OPTIONAL = """
import sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("aiobotocore", "botocore", "boto3", "tritonclient"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Missing())
from gateway.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_the_core_install_runs_the_local_default_and_names_the_missing_extra(tmp_path):
    """Without the AWS SDK and the Triton client (the `s3` and `triton` extras) the embedded default works."""
    demo = subprocess.run(
        [sys.executable, "-c", BLOCK_OPTIONAL, "demo", "--dir", str(tmp_path / "demo"), "--seconds", "1", "--devices", "2",
         "--rate", "20", "--records", "5"],
        capture_output=True, text=True, timeout=120,
    )
    assert demo.returncode == 0, demo.stderr
    assert "curated" in demo.stdout and "raw" in demo.stdout
    s3 = tmp_path / "s3.toml"
    s3.write_text('[lake]\nkind = "s3"\n[s3]\nbucket = "my-lake"\n[inference]\nbackend = "triton"\n[[inference.endpoints]]\nurl = "h:8001"\n')
    check_ = subprocess.run([sys.executable, "-c", BLOCK_OPTIONAL, "check-config", str(s3)], capture_output=True, text=True, timeout=60)
    assert check_.returncode == 2
    assert "pip install 'edge-gateway[s3]'" in check_.stderr and "pip install 'edge-gateway[triton]'" in check_.stderr
