"""What stands between a device's connection and the request path: admission, rate limits,
connection limits, the trusted proxy, TLS identity, replay refusal, the tarpit and their settings.
"""
