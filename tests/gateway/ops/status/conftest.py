"""The status page and the tap reuse the gateway fixtures."""

from tests.gateway.conftest import gateway_process  # noqa: F401
