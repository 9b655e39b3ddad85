"""What an operator sees: one truthful /metrics per instance, figures of the present read at scrape time."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest

from gateway.server import start_gateway
from gateway.settings import load_settings
from tests.gateway.conftest import make_env, record, signed
from tests.gateway.conftest import ndjson


def samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric's samples in an exposition."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


async def healthz(http: aiohttp.ClientSession, url: str) -> None:
    async with http.get(url + "/healthz") as resp:
        assert resp.status == 200


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


# Both workers, and the lake process that lands their WALs (gateway/lake/lake_process.py).
EVERY_PROCESS_UP = {'{worker="0"}': 1.0, '{worker="1"}': 1.0, '{worker="lake"}': 1.0}


@pytest.mark.slow
async def test_every_scrape_of_a_multi_worker_instance_shows_every_worker(tmp_path, gateway_process):
    env = make_env(tmp_path, n_devices=4, listen={"workers": 2})
    gp = gateway_process(env)
    gp.start()
    async with aiohttp.ClientSession() as http:
        # Both workers must be up before the first request, or one of them would answer them all.
        for _ in range(200):
            if samples(await scrape(http, gp.ops_url), "edge_gateway_worker_up") == EVERY_PROCESS_UP:
                break
            await asyncio.sleep(0.1)
        sent = 0
        for i in range(12):
            device = env.device(f"dev-{i % 4 + 1}")
            body, headers = device.request(3)
            async with http.post(gp.url + "/v1/telemetry", data=body, headers=headers) as resp:
                assert resp.status == 202
                sent += 3
        totals = []
        for _ in range(8):
            text = await scrape(http, gp.ops_url)
            accepted = {k: v for k, v in samples(text, "edge_gateway_records_total").items() if 'outcome="accepted"' in k}
            totals.append(sum(accepted.values()))
            assert samples(text, "edge_gateway_worker_up") == EVERY_PROCESS_UP
            assert all('worker="' in k for k in accepted)
            # One process per worker and the lake process, each with its own process metrics.
            assert len(samples(text, "process_resident_memory_bytes")) == 3
        assert totals == [float(sent)] * 8


async def test_backlog_and_oldest_age_are_read_at_scrape_time(tmp_path):
    env = make_env(tmp_path, lake={"max_object_age_secs": 2.5})
    running = await start_gateway(load_settings(env.config, environ={}))
    try:
        async with aiohttp.ClientSession() as http:
            body = ndjson(record(seq=1))
            async with http.post(running.url + "/v1/telemetry", data=body, headers=signed(env.device(), body)) as resp:
                assert resp.status == 202
            await asyncio.sleep(1.2)
            text = await scrape(http, running.ops_url)
            # The record has waited more than a second and has not landed: the gauges say so now.
            assert samples(text, "edge_gateway_wal_oldest_unlanded_age_seconds")['{consumer="raw"}'] >= 1.0
            assert samples(text, "edge_gateway_wal_backlog_bytes")['{consumer="raw"}'] > 0
            assert samples(text, "edge_gateway_registry_devices") == {"": 3.0}
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                text = await scrape(http, running.ops_url)
                if samples(text, "edge_gateway_records_landed_total").get('{zone="raw"}') == 1.0:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)  # the lander's last report is long gone: nothing may keep it alive
            text = await scrape(http, running.ops_url)
            assert samples(text, "edge_gateway_wal_oldest_unlanded_age_seconds")['{consumer="raw"}'] == 0.0
            assert samples(text, "edge_gateway_wal_backlog_bytes")['{consumer="raw"}'] == 0.0
    finally:
        await running.stop()


async def test_no_created_series_and_build_and_process_metrics(gateway, http, env):
    body = ndjson(record(seq=1))
    async with http.post(gateway.url + "/v1/telemetry", data=body, headers=signed(env.device(), body)) as resp:
        assert resp.status == 202
    text = await scrape(http, gateway.ops_url)
    assert "_created" not in text
    build = samples(text, "edge_gateway_build_info")
    assert len(build) == 1 and list(build.values()) == [1.0] and 'version="' in next(iter(build))
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert samples(text, name), name


async def test_reloads_are_counted_by_outcome(tmp_path):
    import os
    import signal

    from gateway.server import serve
    from tests.gateway.conftest import free_port

    port = free_port()
    env = make_env(tmp_path, ops={"port": port})
    settings = load_settings(env.config, environ={})
    answers = [settings, ValueError("broken file")]

    def reload_settings():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    task = asyncio.create_task(serve(settings, reload_settings))
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                await scrape(http, url)
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.2)
        text = await scrape(http, url)
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(task, 30) == 0
    assert samples(text, "edge_gateway_config_reloads_total") == {'{outcome="applied"}': 1.0, '{outcome="refused"}': 1.0}
    assert samples(text, "edge_gateway_config_last_reload_success") == {"": 0.0}


async def test_access_log_follows_reload_one_json_line_per_request_and_is_bounded(tmp_path, capsys):
    import json
    import logging

    import msgspec

    from gateway.ops import logs

    env = make_env(tmp_path)
    settings = load_settings(env.config, environ={})
    running = await start_gateway(settings)
    logging.getLogger().handlers.clear()  # a handler an earlier test configured writes to that test's stderr
    logs.configure("INFO")
    try:
        async with aiohttp.ClientSession() as http:
            await healthz(http, running.url)
            assert "gateway.access" not in capsys.readouterr().err  # off by default
            on = msgspec.structs.replace(settings, log=msgspec.structs.replace(settings.log, access_log=True, access_log_max_per_sec=5))
            running.gateway.reload(on)
            body = ndjson(record(seq=1))
            async with http.post(running.url + "/v1/telemetry", data=body, headers=signed(env.device(), body)) as resp:
                assert resp.status == 202
            for _ in range(20):
                await healthz(http, running.url)
            await asyncio.sleep(1.1)
            await healthz(http, running.url)
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"gateway.access"' in line]
        first = lines[0]
        assert (first["method"], first["path"], first["status"], first["device_id"]) == ("POST", "/v1/telemetry", 202, "dev-1")
        assert first["duration_ms"] >= 0 and first["bytes_in"] == len(body)
        # 5 a second at most; the next second's first line counts what was skipped.
        assert len(lines) == 6 and lines[-1]["skipped"] == 16
    finally:
        await running.stop()
        logging.getLogger().handlers.clear()


def test_repeated_errors_are_throttled_and_counted():
    import logging

    from gateway.ops.logs import ThrottleFilter

    now = [0.0]
    f = ThrottleFilter(burst=3, per_sec=1.0, clock=lambda: now[0])

    def rec(msg="upload failed", level=logging.ERROR):
        return logging.LogRecord("gateway.lake.landing", level, "", 0, msg, (), None)

    assert [f.filter(rec()) for _ in range(5)] == [True, True, True, False, False]
    assert f.filter(rec("another message"))  # per message
    assert f.filter(rec(level=logging.INFO)) and f.filter(rec(level=logging.CRITICAL))
    now[0] = 1.0
    passed = rec()
    assert f.filter(passed) and passed.suppressed == 2


def test_a_stream_that_blocks_never_blocks_the_logging_thread_and_drops_are_counted():
    """serve's log lines are written by a thread of their own: while stderr blocks (nobody reads the
    pipe), logging returns at once; past the lines it may hold, lines are dropped, and the first line
    written afterwards says how many."""
    import io
    import json
    import logging
    import threading

    from gateway.ops.logs import BackgroundStreamHandler, JsonFormatter

    class BlockedStream(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.released = threading.Event()

        def write(self, text: str) -> int:
            self.released.wait()
            return super().write(text)

    stream = BlockedStream()
    handler = BackgroundStreamHandler(stream, max_pending=5)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.blocked.stderr")
    logger.propagate, logger.handlers[:] = False, [handler]
    try:
        started = time.monotonic()
        logger.warning("first")  # taken by the writer, which then blocks in write()
        time.sleep(0.2)
        for n in range(12):
            logger.warning("line %d", n)
        assert time.monotonic() - started < 1.0  # the writer waits; the callers did not
        stream.released.set()
        handler.flush()
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [line["msg"] for line in lines[:6]] == ["first", "line 0", "line 1", "line 2", "line 3", "line 4"]
        assert lines[6]["log_lines_dropped"] == 7 and lines[6]["level"] == "WARNING"
        logger.warning("after")
        handler.flush()
        assert json.loads(stream.getvalue().splitlines()[-1])["msg"] == "after"
    finally:
        stream.released.set()
        handler.close()
        logger.handlers.clear()


async def test_debug_shows_the_gateways_own_detail_not_the_sdks(tmp_path, capsys):
    import json
    import logging

    from gateway.ops import logs

    env = make_env(tmp_path, lake={"max_object_age_secs": 0.2})
    running = await start_gateway(load_settings(env.config, environ={}))
    logs.configure("DEBUG")
    try:
        assert logging.getLogger("botocore").getEffectiveLevel() == logging.INFO
        async with aiohttp.ClientSession() as http:
            body = ndjson(record(seq=1))
            async with http.post(running.url + "/v1/telemetry", data=body, headers=signed(env.device(), body)) as resp:
                assert resp.status == 202
        deadline = time.monotonic() + 10
        landed = []
        while not landed and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            landed += [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"object landed"' in line]
        assert landed and landed[0]["level"] == "DEBUG" and landed[0]["key"].startswith(("raw/", "quarantine/", "curated/"))
    finally:
        await running.stop()
        logging.getLogger().handlers.clear()
        logging.getLogger().setLevel(logging.WARNING)
