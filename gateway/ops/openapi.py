"""The device API's OpenAPI 3.1 document (openapi.yaml beside this module), served as shipped."""

from __future__ import annotations

import functools
from importlib import resources

from aiohttp import web

ROUTE = "/openapi.yaml"


@functools.cache
def document() -> bytes:
    return resources.files("gateway.ops").joinpath("openapi.yaml").read_bytes()


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=document(), content_type="application/yaml", headers={"Cache-Control": "max-age=300"})
