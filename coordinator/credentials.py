"""The coordinator's credentials in its state dir, created at first start with mode 0600: its Ed25519 key (it signs
tokens, assignments and checkpoint manifests; its public half is in every RunSpec), the admin token (admin RPCs
carry it as ``authorization: Bearer <token>``, only over TLS) and the TLS key and self-signed certificate of the
gRPC API (clients pin its fingerprint: :mod:`omi.protos.channels`).

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as state_dir:
...     first = load_or_create_admin_token(state_dir)
...     same = load_or_create_admin_token(state_dir) == first
...     _ = (Path(state_dir) / ADMIN_TOKEN_FILENAME).write_text("")  # left empty by a crash
...     same, len(load_or_create_admin_token(state_dir)) > 20
(True, True)
"""

import datetime
import ipaddress
import logging
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from omi.protos import signing
from omi.protos.channels import TLS_NAME, fingerprint

logger = logging.getLogger(__name__)

KEY_FILENAME = "coordinator_key.pem"
ADMIN_TOKEN_FILENAME = "admin_token"
TLS_KEY_FILENAME, TLS_CERT_FILENAME = "tls_key.pem", "tls_cert.pem"
TLS_VALID_DAYS = 3650


def load_or_create_coordinator_key(state_dir: str | Path) -> Ed25519PrivateKey:
    """The coordinator's key in its state dir, created (mode 0600) at first start."""
    return signing.load_or_create_key(Path(state_dir) / KEY_FILENAME)


def load_or_create_admin_token(state_dir: str | Path) -> str:
    """The admin token of a state dir, created (mode 0600) at first start."""
    path = Path(state_dir) / ADMIN_TOKEN_FILENAME
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
        # an empty file (an older version left one when it crashed mid-write) must not become an empty token
        logger.warning("the admin token file %s is empty: writing a new token", path)
    token = secrets.token_urlsafe(32)
    signing.write_private_file(path, (token + "\n").encode())
    logger.info("created the admin token in %s", path)
    return token


def load_or_create_tls(state_dir: str | Path) -> tuple[bytes, bytes]:
    """(private key PEM, certificate PEM) of the gRPC API, made at first start: an ECDSA P-256 key and a self-signed
    certificate for :data:`~omi.protos.channels.TLS_NAME` (and localhost), valid ten years. Clients pin it, so it
    must stay the same across restarts: it lives in the state dir like the coordinator's key."""
    key_path, cert_path = Path(state_dir) / TLS_KEY_FILENAME, Path(state_dir) / TLS_CERT_FILENAME
    if key_path.exists() and cert_path.exists():
        return key_path.read_bytes(), cert_path.read_bytes()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=TLS_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME), x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    signing.write_private_file(key_path, key_pem)
    signing.write_private_file(cert_path, cert_pem)
    logger.info("created the gRPC API's TLS certificate %s (sha256:%s): clients pin it", cert_path,
                fingerprint(cert_pem))
    return key_pem, cert_pem
