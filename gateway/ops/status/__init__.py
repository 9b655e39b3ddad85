"""Seeing what a running gateway does: one answer per instance whatever its worker count.

    cluster.py  each worker's local socket; /metrics merged across workers with a ``worker`` label
    page.py     the live status page and its JSON feed on the admin listener
    tap.py      a sample of the records passing a stage (received, quarantined, landed, scored)
    static/     the page, its script and the vendored charting library (no build step, no CDN)
"""
