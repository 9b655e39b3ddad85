"""TLS on the device listener, and which device a client certificate names.

Two ways a certificate reaches us:

- the gateway terminates TLS itself (``[tls]``): Python's ``ssl`` has already verified the chain
  against ``client_ca_path``, and ``device_from_peercert`` reads the verified certificate;
- an ALB in mTLS passthrough mode (or HAProxy) forwards it in ``X-Amzn-Mtls-Clientcert`` (URL-encoded
  PEM, leaf first; base64 DER is accepted too). The proxy does not verify it, so
  ``ForwardedCertVerifier`` checks the chain against the same CA bundle (``cryptography``), and only
  when the TCP peer is a trusted proxy (``proxy.py``).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import ssl
import time
import urllib.parse
from collections import OrderedDict
from typing import Any

from gateway.edge.settings import TlsSettings

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_MAX_HEADER_CHARS = 32 * 1024
_CACHE_ENTRIES = 10_000
_CACHE_SECS = 300.0


class CertificateError(Exception):
    """A client certificate that does not verify or does not name a device."""


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[settings.min_version]
    context.load_cert_chain(settings.cert_path, settings.key_path)
    if settings.client_ca_path:
        context.load_verify_locations(cafile=settings.client_ca_path)
        context.verify_mode = ssl.CERT_REQUIRED if settings.client_cert == "required" else ssl.CERT_OPTIONAL
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def device_from_peercert(peercert: dict[str, Any] | None, settings: TlsSettings) -> str | None:
    """The device a verified certificate (``SSLObject.getpeercert()``) names, or None."""
    if not peercert:
        return None
    if settings.device_id_from == "subject_cn":
        for rdn in peercert.get("subject", ()):
            for name, value in rdn:
                if name == "commonName":
                    return value
        return None
    wanted = "DNS" if settings.device_id_from == "san_dns" else "URI"
    names = [value for kind, value in peercert.get("subjectAltName", ()) if kind == wanted]
    return _pick(names, settings)


def _pick(names: list[str], settings: TlsSettings) -> str | None:
    if settings.device_id_from == "san_uri":
        prefix = settings.san_uri_prefix
        names = [n[len(prefix) :] for n in names if n.startswith(prefix)]
    return names[0] if names else None


class ForwardedCertVerifier:
    """Verifies certificates forwarded in a header; remembers recent answers (verification is costly)."""

    def __init__(self, settings: TlsSettings, *, clock=time.monotonic) -> None:
        from cryptography import x509  # needed only when forwarded certificates are honoured

        self._x509 = x509
        self._settings = settings
        self._clock = clock
        with open(settings.client_ca_path, "rb") as f:
            self._roots = x509.load_pem_x509_certificates(f.read())
        self._cache: OrderedDict[bytes, tuple[float, str | None, str]] = OrderedDict()

    def device_id(self, header: str) -> str:
        """The device the forwarded certificate names; raises ``CertificateError``."""
        if len(header) > _MAX_HEADER_CHARS:
            raise CertificateError("the forwarded client certificate is too large")
        digest = hashlib.sha256(header.encode("utf-8", "surrogateescape")).digest()
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            if hit[1] is None:
                raise CertificateError(hit[2])
            return hit[1]
        try:
            device, error = self._verify(header), ""
        except CertificateError as exc:
            device, error = None, str(exc)
        self._cache[digest] = (now + _CACHE_SECS, device, error)
        while len(self._cache) > _CACHE_ENTRIES:
            self._cache.popitem(last=False)
        if device is None:
            raise CertificateError(error)
        return device

    def _verify(self, header: str) -> str:
        x509 = self._x509
        from cryptography.x509 import verification

        chain = self._parse(header)
        store = verification.Store(self._roots)
        verifier = (
            verification.PolicyBuilder()
            .store(store)
            .time(datetime.datetime.now(datetime.timezone.utc))
            .build_client_verifier()
        )
        try:
            verifier.verify(chain[0], chain[1:])
        except verification.VerificationError as exc:
            raise CertificateError(f"the forwarded client certificate does not verify: {exc}") from None
        leaf = chain[0]
        if self._settings.device_id_from == "subject_cn":
            names = [a.value for a in leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
        else:
            try:
                san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            except x509.ExtensionNotFound:
                names = []
            else:
                kind = x509.DNSName if self._settings.device_id_from == "san_dns" else x509.UniformResourceIdentifier
                names = san.get_values_for_type(kind)
            names = [_pick(list(names), self._settings)] if names else []
        device = next((str(n) for n in names if n), None)
        if device is None:
            raise CertificateError(f"the client certificate has no {self._settings.device_id_from}")
        return device

    def _parse(self, header: str) -> list[Any]:
        x509 = self._x509
        text = urllib.parse.unquote(header.strip())
        try:
            if "-----BEGIN" in text:
                chain = x509.load_pem_x509_certificates(text.encode("ascii", "replace"))
            else:
                chain = [x509.load_der_x509_certificate(base64.b64decode(text, validate=True))]
        except (ValueError, binascii.Error):
            raise CertificateError("the forwarded client certificate cannot be parsed") from None
        if not chain:
            raise CertificateError("the forwarded client certificate is empty")
        return chain
