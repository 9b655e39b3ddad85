"""Steps 5 and 6 of a record's path: the write-ahead log, its layout on disk, durable file writes and
the retry ledger that knows every acknowledged request.
"""
