"""Availability zone discovery through IMDSv2.

EC2's instance metadata service cannot run here, so a loopback stand-in implements the two calls
IMDSv2 needs (token, then the placement path with the token) and refuses tokenless requests.
"""

from __future__ import annotations

from aiohttp import web

from gateway.ops.instance_metadata import availability_zone


async def start_imds(aiohttp_unused=None):
    async def token(request):
        assert request.headers["X-aws-ec2-metadata-token-ttl-seconds"]
        return web.Response(text="tok-123")

    async def az(request):
        if request.headers.get("X-aws-ec2-metadata-token") != "tok-123":
            return web.Response(status=401)
        return web.Response(text="eu-west-1b")

    app = web.Application()
    app.router.add_put("/latest/api/token", token)
    app.router.add_get("/latest/meta-data/placement/availability-zone", az)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_zone_comes_from_imdsv2():
    runner, url = await start_imds()
    try:
        assert await availability_zone(url, 2.0) == "eu-west-1b"
    finally:
        await runner.cleanup()


async def test_no_metadata_service_means_unknown_quickly():
    runner, url = await start_imds()
    await runner.cleanup()  # nothing listens there any more
    assert await availability_zone(url, 0.5) == "unknown"
