"""The availability zone from EC2 instance metadata, with IMDSv2 (a session token first)."""

from __future__ import annotations

import logging

import aiohttp

log = logging.getLogger(__name__)

TOKEN_PATH = "/latest/api/token"
AZ_PATH = "/latest/meta-data/placement/availability-zone"
UNKNOWN = "unknown"


async def availability_zone(endpoint: str, timeout_secs: float) -> str:
    """The instance's AZ, or ``"unknown"`` when no metadata service answers (not on EC2)."""
    timeout = aiohttp.ClientTimeout(total=timeout_secs)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.put(
                endpoint + TOKEN_PATH, headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}
            ) as resp:
                resp.raise_for_status()
                token = await resp.text()
            async with session.get(endpoint + AZ_PATH, headers={"X-aws-ec2-metadata-token": token}) as resp:
                resp.raise_for_status()
                return (await resp.text()).strip() or UNKNOWN
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning(
            "instance metadata unavailable; set gateway.availability_zone to silence this",
            extra={"endpoint": endpoint, "error": str(exc) or type(exc).__name__},
        )
        return UNKNOWN
