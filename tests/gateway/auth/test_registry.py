"""The device registry in memory: what a large fleet costs each worker."""

from __future__ import annotations

import gc
import json
import os
import tracemalloc

import pytest

from gateway.auth.registry import DeviceRegistry, RegistryError

DEVICES = 20_000
SITES = 40


def fleet_file(tmp_path) -> tuple[os.PathLike, dict]:
    devices = {
        f"dev-{i:06d}": {"keys": [f"{i:064x}"], "enabled": i % 7 != 0, "metadata": {"site": f"site-{i % SITES}", "model": "m-2"}}
        for i in range(DEVICES)
    }
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"devices": devices}))
    path.chmod(0o600)
    return path, devices


def test_a_fleet_shares_its_few_metadata_values_and_reads_back_whole(tmp_path):
    """Each device kept its own copy of metadata most of a fleet shares (its site, its model): over a
    third of the registry's memory in every worker, and, decoded whole, the peak of its load stayed
    in the worker for good. Now one mapping per distinct value, decoded once; every device still
    reads back as the file says."""
    path, devices = fleet_file(tmp_path)
    gc.collect()
    tracemalloc.start()
    try:
        registry = DeviceRegistry.load(path)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(registry) == DEVICES
    for device_id, entry in devices.items():
        device = registry.get(device_id)
        assert (device.keys, device.enabled, device.metadata) == (entry["keys"], entry["enabled"], entry["metadata"])
        assert registry.keys(device_id) == (entry["keys"][0].encode(),)
    # About 500 bytes a device with the sharing, 800 without (CPython 3.11).
    assert held / DEVICES < 650, f"{held / DEVICES:.0f} bytes per device"
    assert len({id(registry.get(d).metadata) for d in devices}) == SITES


def test_devices_with_metadata_of_their_own_keep_it(tmp_path):
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"devices": {"d1": {"keys": ["k" * 64], "metadata": {"serial": "1"}}, "d2": {"keys": ["j" * 64], "metadata": {"serial": "2"}}, "d3": {"keys": ["i" * 64]}}}))
    path.chmod(0o600)
    other = DeviceRegistry.load(path)
    assert [other.get(d).metadata for d in ("d1", "d2", "d3")] == [{"serial": "1"}, {"serial": "2"}, {}]


def test_metadata_that_is_not_strings_is_refused_naming_the_device(tmp_path):
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"devices": {"d1": {"keys": ["k" * 64], "metadata": {"site": "a"}}, "d2": {"keys": ["j" * 64], "metadata": {"rack": 7}}}}))
    path.chmod(0o600)
    with pytest.raises(RegistryError, match=r"the metadata of device 'd2': Expected `str`, got `int`"):
        DeviceRegistry.load(path)


def test_a_device_entry_that_is_wrong_is_refused_naming_the_device(tmp_path):
    """Each device is decoded on its own (a reload never holds the interpreter for the whole file):
    the refusal says which one is wrong."""
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"devices": {"d1": {"keys": ["k" * 64]}, "d2": {"keys": ["short"]}}}))
    path.chmod(0o600)
    with pytest.raises(RegistryError, match=r"device 'd2': Expected `str` of length >= 32"):
        DeviceRegistry.load(path)
