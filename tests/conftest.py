"""Session-wide fixtures shared by every test package: moto's server for the AWS APIs."""

pytest_plugins = ["tests.fixtures.moto_server"]
