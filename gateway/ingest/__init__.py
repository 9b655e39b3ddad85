"""Steps 1, 3 and 4 of a record's path: receive the body (spool, body), validate it, enrich it.

``handler`` is the request handler that runs the steps in order; ``records`` holds the schemas.
"""
