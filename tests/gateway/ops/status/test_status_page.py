"""The live status page in a real browser (Chromium driven by Playwright) while devices send load."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.server import start_gateway
from gateway.settings import load_settings
from tests.gateway.conftest import free_port, make_env

pytestmark = pytest.mark.slow
TOKEN = "s" * 32


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed: `make system-deps` (tests/fixtures/install-browser.sh) installs it")
    return path


async def send_load(url: str, devices, stop: asyncio.Event) -> int:
    """Signed requests from every device until told to stop; returns how many were accepted."""
    accepted = 0
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            for device in devices:
                body, headers = device.request(50)
                async with http.post(url + "/v1/telemetry", data=body, headers=headers) as resp:
                    accepted += resp.status == 202
            await asyncio.sleep(0.02)
    return accepted


async def test_status_page_draws_live_charts_while_load_runs(tmp_path):
    from playwright.async_api import async_playwright

    (tmp_path / "admin-token").write_text(TOKEN + "\n")
    (tmp_path / "admin-token").chmod(0o600)
    port = free_port()
    env = make_env(
        tmp_path,
        n_devices=4,
        admin={"enabled": True, "port": port, "token_path": str(tmp_path / "admin-token")},
        lake={"max_object_age_secs": 1.0},
    )
    running = await start_gateway(load_settings(env.config, environ={}))
    stop = asyncio.Event()
    load = asyncio.create_task(send_load(running.url, list(env.devices.values()), stop))
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium(), args=["--disable-gpu"])
            page = await browser.new_page(viewport={"width": 1280, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"http://127.0.0.1:{port}/status#token={TOKEN}")
            # Six charts, each a canvas drawn by the vendored uPlot (no CDN: the page works offline).
            await page.wait_for_function("document.querySelectorAll('#charts .uplot canvas').length === 6", timeout=10_000)
            await page.wait_for_function("window.edgeStatus.polls >= 3", timeout=15_000)
            first = await page.evaluate("document.querySelector('#c-throughput canvas').toDataURL()")
            polls = await page.evaluate("window.edgeStatus.polls")
            await page.wait_for_function(f"window.edgeStatus.polls >= {polls + 3}", timeout=15_000)
            # The charts move: new points, new pixels.
            assert await page.evaluate("document.querySelector('#c-throughput canvas').toDataURL()") != first
            accepted = await page.evaluate("window.edgeStatus.series['c-throughput'][1].filter(v => v > 0).length")
            landed = await page.evaluate("window.edgeStatus.series['c-throughput'][2].filter(v => v > 0).length")
            p99 = await page.evaluate("window.edgeStatus.series['c-latency'][3].filter(v => v > 0).length")
            assert accepted >= 2 and landed >= 1 and p99 >= 2, (accepted, landed, p99)
            assert (await page.text_content("#s-devices")) == "4"
            assert await page.evaluate("window.edgeStatus.lastError") is None and not errors
            # Without the token the data is refused, and the page asks for it.
            other = await browser.new_page()
            await other.goto(f"http://127.0.0.1:{port}/status")
            await other.wait_for_selector("#token-form:not([hidden])", timeout=5_000)
            shot = os.environ.get("STATUS_SCREENSHOT")
            await page.screenshot(path=shot or str(tmp_path / "status.png"), full_page=True)
            await browser.close()
    finally:
        stop.set()
        assert await load > 0
        await running.stop()
