"""Step 2 of a record's path: who sent it. HMAC over the body as sent (``hmac``), a client
certificate (``certificate``), the device registry from a file or Secrets Manager, request signing.
"""
