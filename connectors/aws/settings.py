"""``AwsClientSettings``: the options every AWS connector's section shares.

Each connector's settings struct inherits from it, so its section stays flat (``[s3] region = ...``,
``[glue.retry]``) while the options are declared once. A connector whose service wants other
defaults (Secrets Manager answers fast; S3 bodies take long) redeclares only the default.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from connectors.retry import RetrySettings

PositiveSecs = Annotated[float, Meta(gt=0)]


class AwsClientSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where an AWS connector's client connects, how long it waits, and how it retries."""

    # Empty: the AWS chain's region (AWS_REGION, profile, instance metadata).
    region: str = ""
    # Empty: AWS itself. Set for a VPC interface endpoint or a local stand-in (MinIO, moto).
    endpoint_url: str = ""
    connect_timeout_secs: PositiveSecs = 5.0
    read_timeout_secs: PositiveSecs = 30.0
    retry: RetrySettings = RetrySettings()

    def __post_init__(self) -> None:
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError("endpoint_url must start with http:// or https://")
