"""Models shipped with the gateway: the telemetry anomaly model (see README.md in this folder)."""
