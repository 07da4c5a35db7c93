"""TLS material made by openssl for the tests (the ``pki`` fixture)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from support.waiting import require_binary


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_binary("openssl"), *args], cwd=cwd, check=True, capture_output=True)


def issue(name: str, ca: Path, cwd: Path, extension: str) -> None:
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip
    (cwd / f"{name}.ext").write_text(extension)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca / "ca.crt"), "-CAkey",
            str(ca / "ca.key"), "-CAcreateserial", "-out", f"{name}.crt", "-days", "1",
            "-extfile", f"{name}.ext", cwd=cwd)  # fmt: skip


def make_pki(path: Path) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate in ``path``."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-days", "1", "-subj", "/CN=pricestream-test-ca", cwd=path)  # fmt: skip
    issue("server", path, path, "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    issue("client", path, path, "extendedKeyUsage=clientAuth\n")
    return path
