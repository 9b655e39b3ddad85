"""The whole bytes of an HTTP/1.1 answer that closes its connection: for what answers a socket
without a web server behind it (a refusal at accept, the listener while the instance starts).

Only the standard library is imported here: the supervisor answers before any worker starts.
"""

from __future__ import annotations

from http import HTTPStatus


def closing_answer(
    status: int, body: bytes, retry_after_secs: int | None = None, *, head_only: bool = False, content_type: str = "application/json"
) -> bytes:
    """``status`` with ``body`` (JSON unless ``content_type`` says otherwise) and ``Connection: close``;
    ``Retry-After`` where given. ``head_only`` (a HEAD request): the same head, the body left out."""
    retry = b"Retry-After: %d\r\n" % retry_after_secs if retry_after_secs is not None else b""
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%bConnection: close\r\nContent-Length: %d\r\n\r\n" % (
        status, HTTPStatus(status).phrase.encode(), content_type.encode(), retry, len(body),
    )
    return head if head_only else head + body
