"""The shared client settings: one block in every AWS section, written flat as before."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from connectors.aws.eventbridge import EventBridgeSettings
from connectors.aws.glue import GlueCatalogSettings
from connectors.aws.s3 import S3SinkSettings
from connectors.aws.secrets import SecretsManagerSettings
from connectors.aws.settings import AwsClientSettings
from gateway.settings import load_settings

# Each section's required keys, so it can be built on its own.
REQUIRED = {
    S3SinkSettings: {"bucket": "my-lake"},
    GlueCatalogSettings: {"database": "lake"},
    EventBridgeSettings: {},
    SecretsManagerSettings: {},
}


@pytest.mark.parametrize(
    ("struct", "connect", "read", "retry_budget"),
    [
        (S3SinkSettings, 5.0, 60.0, 60.0),
        (GlueCatalogSettings, 5.0, 30.0, 60.0),
        (EventBridgeSettings, 5.0, 10.0, 60.0),
        (SecretsManagerSettings, 2.0, 5.0, 10.0),
    ],
)
def test_each_section_shares_the_block_and_keeps_its_own_defaults(
    struct: type[AwsClientSettings], connect: float, read: float, retry_budget: float
) -> None:
    s = msgspec.convert(REQUIRED[struct], struct)
    assert isinstance(s, AwsClientSettings)
    assert (s.region, s.endpoint_url) == ("", "")
    assert (s.connect_timeout_secs, s.read_timeout_secs, s.retry.max_elapsed_secs) == (connect, read, retry_budget)


@pytest.mark.parametrize("struct", list(REQUIRED))
def test_endpoint_url_needs_a_scheme_in_every_section(struct: type[AwsClientSettings]) -> None:
    with pytest.raises(msgspec.ValidationError, match="endpoint_url must start with"):
        msgspec.convert({**REQUIRED[struct], "endpoint_url": "localhost:5000"}, struct)


def test_the_keys_users_write_today_still_load(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    sections = {"s3": 'bucket = "my-lake"\n', "glue": 'database = "lake"\n', "eventbridge": "", "secretsmanager": ""}
    config.write_text(
        '[lake]\nkind = "s3"\n'
        + "".join(
            f"[{name}]\n{required}region = \"eu-west-1\"\nendpoint_url = \"http://127.0.0.1:5000\"\n"
            "connect_timeout_secs = 1.5\nread_timeout_secs = 7.0\n"
            f"[{name}.retry]\nmax_elapsed_secs = 3.0\ninitial_interval_secs = 0.2\n"
            for name, required in sections.items()
        )
    )

    settings = load_settings(config, environ={"EDGE_GATEWAY__GLUE__REGION": "us-east-2"})

    for name in sections:
        s = getattr(settings, name)
        assert s.endpoint_url == "http://127.0.0.1:5000"
        assert (s.connect_timeout_secs, s.read_timeout_secs) == (1.5, 7.0)
        assert (s.retry.max_elapsed_secs, s.retry.initial_interval_secs) == (3.0, 0.2)
        assert s.region == ("us-east-2" if name == "glue" else "eu-west-1")
