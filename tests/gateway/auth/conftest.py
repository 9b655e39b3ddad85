"""Fixtures for mutual TLS: a PKI generated per session and HAProxy terminating TLS in front of a gateway."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.gateway.conftest import free_port


INSTALL_SCRIPT = "tests/fixtures/install-haproxy.sh"


# -- PKI --------------------------------------------------------------------------------------------


@dataclass
class Issued:
    cert: Path
    key: Path
    pem: bytes  # the certificate alone


@dataclass
class Pki:
    ca: Path  # the fleet CA bundle (what tls.client_ca_path names)
    server: Issued  # 127.0.0.1 / localhost
    device: Callable[[str], Issued]  # a client certificate whose CN and SAN name the device
    rogue_device: Callable[[str], Issued]  # the same names, from a CA nobody trusts


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Edge test fleet"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class _Authority:
    def __init__(self, root: Path, label: str) -> None:
        self.root = root
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{label} CA"))
            .issuer_name(_name(f"{label} CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.path = root / f"{label}-ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, dns: list[str], ips: list[str] = (), client: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM)
        stem = self.root / f"{self.path.stem}-{name}"
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_path.write_bytes(pem)
        key_path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return Issued(cert_path, key_path, pem)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    fleet, rogue = _Authority(root, "fleet"), _Authority(root, "rogue")
    server = fleet.issue("gateway", dns=["localhost"], ips=["127.0.0.1"], client=False)
    cache: dict[tuple[str, str], Issued] = {}

    def issue(authority: _Authority, device_id: str) -> Issued:
        key = (authority.path.name, device_id)
        if key not in cache:
            cache[key] = authority.issue(device_id, dns=[device_id], client=True)
        return cache[key]

    return Pki(fleet.path, server, lambda d: issue(fleet, d), lambda d: issue(rogue, d))


# -- HAProxy ----------------------------------------------------------------------------------------


class HAProxy:
    """``haproxy`` on a loopback port: TLS with client certificates, forwarding the certificate header."""

    def __init__(self, root: Path, pki: Pki, backend_port: int) -> None:
        self.port = free_port()
        crt = root / "haproxy-server.pem"
        crt.write_bytes(pki.server.cert.read_bytes() + pki.server.key.read_bytes())
        self.config = root / "haproxy.cfg"
        self.config.write_text(
            f"""
global
    log stderr format raw local0 warning
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend devices
    bind 127.0.0.1:{self.port} ssl crt {crt} ca-file {pki.ca} verify required
    http-request del-header X-Amzn-Mtls-Clientcert
    http-request set-header X-Amzn-Mtls-Clientcert %[ssl_c_der,base64]
    http-request set-header X-Forwarded-Proto https
    option forwardfor
    default_backend gateway
backend gateway
    server gw 127.0.0.1:{backend_port}
"""
        )
        self.log_path = root / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
        if binary is None:
            pytest.fail(f"haproxy is not installed: run {INSTALL_SCRIPT} (apt-get install -y haproxy)")
        check = subprocess.run([binary, "-c", "-f", str(self.config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejected its config:\n{check.stdout}{check.stderr}")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config)], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"haproxy did not listen within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if hasattr(self, "_log"):
            self._log.close()


@pytest.fixture
def haproxy(tmp_path: Path, pki: Pki) -> Iterator[Callable[[int], HAProxy]]:
    started: list[HAProxy] = []

    def factory(backend_port: int) -> HAProxy:
        proxy = HAProxy(tmp_path, pki, backend_port)
        started.append(proxy)
        proxy.start()
        return proxy

    yield factory
    for proxy in started:
        proxy.stop()
