"""What an operator reads and runs: health checks, the ops and admin listeners, metrics, logs, the
status page, the OpenAPI document, configuration checks and its reference.
"""
