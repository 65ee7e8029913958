"""TLS to the coordinator's gRPC API, pinned by the certificate's fingerprint or trusted on first use.

A coordinator makes a self-signed certificate at its first start (``<state dir>/tls/``,
:func:`omi.coordinator.credentials.load_or_create_tls`) and serves only TLS. A client names it by a *target*:
``HOST:PORT`` or ``HOST:PORT#sha256:<hex fingerprint>``. With a fingerprint the client accepts exactly that
certificate; without one it trusts the certificate it sees first and remembers it per address in a
known-coordinators file (``$OMI_HOME/known_coordinators.json`` for nodes), refusing clearly when it changes, as
ssh does with known hosts. The channel trusts that one certificate as its only root and checks the name every
coordinator certificate carries (:data:`TLS_NAME`), so no other key can answer for the address.

>>> parse_target("coord.example.org:50051#sha256:" + "ab" * 32).pin == "ab" * 32
True
>>> parse_target("127.0.0.1:50051")
Target(address='127.0.0.1:50051', pin=None)
"""

import hashlib
import json
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

TLS_NAME = "omi-coordinator"  # a DNS name in every coordinator certificate; clients check it (the pin does the rest)
PIN_SEPARATOR = "#sha256:"
CHANNEL_OPTIONS = (("grpc.ssl_target_name_override", TLS_NAME),)
KNOWN_FILENAME = "known_coordinators.json"
_known_lock = threading.Lock()


class CertificateRefused(Exception):
    """The coordinator presented another certificate than the one pinned or seen before."""


class CoordinatorUnreachable(grpc.RpcError):
    """The TLS handshake that fetches the coordinator's certificate failed: as ``UNAVAILABLE`` for retries."""

    def __init__(self, details: str):
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


@dataclass(frozen=True)
class Target:
    address: str  # HOST:PORT
    pin: str | None  # hex SHA-256 of the certificate (DER), or None: trust on first use


def parse_target(target: str) -> Target:
    """``HOST:PORT[#sha256:HEX]`` -> Target; ValueError if the fingerprint is not 64 hex characters."""
    address, _, pin = target.partition(PIN_SEPARATOR)
    if pin:
        pin = pin.lower()
        if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
            raise ValueError(f"the fingerprint in {target!r} must be 64 hex characters (SHA-256)")
    return Target(address, pin or None)


def pinned(address: str, certificate_pem: bytes) -> str:
    """The target that pins ``certificate_pem`` at ``address``."""
    return f"{parse_target(address).address}{PIN_SEPARATOR}{fingerprint(certificate_pem)}"


def fingerprint(certificate: bytes) -> str:
    """Hex SHA-256 of a certificate's DER bytes (PEM is converted)."""
    der = ssl.PEM_cert_to_DER_cert(certificate.decode()) if certificate.lstrip().startswith(b"-----") else certificate
    return hashlib.sha256(der).hexdigest()


def fetch_certificate(address: str, timeout: float = 10.0) -> bytes:
    """The DER certificate the server at ``HOST:PORT`` presents (no verification: the caller pins it)."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=TLS_NAME) as tls:
            return tls.getpeercert(binary_form=True)
    except (OSError, ValueError) as e:
        raise CoordinatorUnreachable(f"no TLS handshake with the coordinator at {address}: {e}") from e


def check_known(path: Path, address: str, seen: str) -> None:
    """Trust on first use: remember ``seen`` for ``address`` in the JSON file ``path``, or refuse a change."""
    with _known_lock:
        known = json.loads(path.read_text()) if path.exists() else {}
        if known.get(address, seen) != seen:
            raise CertificateRefused(
                f"the coordinator at {address} presents certificate sha256:{seen}, but sha256:{known[address]} was "
                f"seen there before: someone may be in the middle, or the coordinator was reinstalled. If you trust "
                f"the new one, remove the entry for {address} from {path} or pin it with "
                f"--coordinator '{address}{PIN_SEPARATOR}{seen}'")
        if address not in known:
            known[address] = seen
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
            os.replace(tmp, path)


def default_known_file() -> Path:
    return Path(os.environ.get("OMI_HOME", Path.home() / ".omi")) / KNOWN_FILENAME


def open_channel(target: str, *, known: Path | None = None, aio: bool = False, options=()) -> grpc.Channel:
    """A TLS channel to the coordinator named by ``target``, its certificate pinned (``#sha256:``) or checked
    against the known-coordinators file ``known`` (default :func:`default_known_file`).

    Raises :class:`CoordinatorUnreachable` (an ``UNAVAILABLE`` RpcError) when no handshake is possible and
    :class:`CertificateRefused` when the certificate is not the one expected.
    """
    parsed = parse_target(target)
    der = fetch_certificate(parsed.address)
    seen = fingerprint(der)
    if parsed.pin is not None:
        if seen != parsed.pin:
            raise CertificateRefused(f"the coordinator at {parsed.address} presents certificate sha256:{seen}, not "
                                     f"the pinned sha256:{parsed.pin}")
    else:
        check_known(known or default_known_file(), parsed.address, seen)
    credentials = grpc.ssl_channel_credentials(root_certificates=ssl.DER_cert_to_PEM_cert(der).encode())
    factory = grpc.aio.secure_channel if aio else grpc.secure_channel
    return factory(parsed.address, credentials, options=[*CHANNEL_OPTIONS, *options])
