"""Build a wheel of the gateway stand-in, named and versioned like the real package."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

NAME = "edge_gateway"
VERSION = "0.0.0.dev1"


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def build_wheel(directory: Path) -> Path:
    dist_info = f"{NAME}-{VERSION}.dist-info"
    files = {
        "edge_gateway_stub.py": (Path(__file__).parent / "edge_gateway_stub.py").read_bytes(),
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: edge-gateway\nVersion: {VERSION}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist_info}/entry_points.txt": b"[console_scripts]\nedge-gateway = edge_gateway_stub:main\n",
    }
    record = "\n".join(_record_line(path, data) for path, data in files.items()) + f"\n{dist_info}/RECORD,,\n"
    wheel = directory / f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{dist_info}/RECORD", record)
    return wheel
