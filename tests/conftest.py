"""Session-wide fixtures shared by every test package: moto's server for the AWS APIs, PyTriton's servers."""

pytest_plugins = ["tests.fixtures.moto_server", "tests.fixtures.triton_fleet"]
