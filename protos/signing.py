"""Canonical bytes of protocol messages and Ed25519 signatures over them, shared by node and coordinator.

A signed message has a ``bytes signature`` field; its canonical bytes are the deterministic
protobuf serialization of a copy with that field cleared. Keys are raw 32-byte Ed25519 keys.

>>> key = generate_key()
>>> token = pb.AccessToken(node_id=node_id(public_bytes(key)), run_id="digits")
>>> _ = sign(token, key)
>>> verify(token, public_bytes(key))
True
"""

import hashlib
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import Message
from omi.protos import pb  # noqa: F401  (used in the doctest)

logger = logging.getLogger(__name__)

SIGNATURE_FIELD = "signature"


def canonical_bytes(message: Message, field: str = SIGNATURE_FIELD) -> bytes:
    """Deterministic serialization of ``message`` with its signature field cleared."""
    copy = type(message)()
    copy.CopyFrom(message)
    copy.ClearField(field)
    return copy.SerializeToString(deterministic=True)


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """Raw 32 bytes of the public key of ``key`` (or of ``key`` itself if it is public)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def node_id(public_key: bytes) -> str:
    """A node's id: hex SHA-256 of its raw Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
    return hashlib.sha256(public_key).hexdigest()


def sign_bytes(data: bytes, key: Ed25519PrivateKey) -> bytes:
    return key.sign(data)


def verify_bytes(data: bytes, signature: bytes, public_key: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``data`` under the raw ``public_key``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
        return True
    except (InvalidSignature, ValueError):
        return False


def sign(message: Message, key: Ed25519PrivateKey, field: str = SIGNATURE_FIELD) -> Message:
    """Set ``message.<field>`` to the signature of its canonical bytes; returns the message."""
    setattr(message, field, key.sign(canonical_bytes(message, field)))
    return message


def verify(message: Message, public_key: bytes, field: str = SIGNATURE_FIELD) -> bool:
    """True if the message's signature field signs its canonical bytes under ``public_key``."""
    signature = getattr(message, field)
    return bool(signature) and verify_bytes(canonical_bytes(message, field), signature, public_key)


REQUEST_DOMAIN = b"omi.v1 node request\0"
NONCE_BYTES = 16


def request_bytes(message: Message) -> bytes:
    """What a node signs of an authenticated request: a domain tag, the request's type name (one per RPC, so a
    request signed for ``RenewToken`` is refused by ``Leave``) and its canonical bytes (nonce included)."""
    return REQUEST_DOMAIN + message.DESCRIPTOR.full_name.encode() + b"\0" + canonical_bytes(message)


def sign_request(message: Message, key: Ed25519PrivateKey) -> Message:
    """Give a node request a fresh random nonce (unless it has one) and sign it for its RPC; returns it.

    >>> key = generate_key()
    >>> request = sign_request(pb.LeaveRequest(timestamp_ms=1), key)
    >>> verify_request(request, public_bytes(key)), len(request.nonce)
    (True, 16)
    >>> as_renewal = pb.RenewTokenRequest.FromString(request.SerializeToString())  # the same bytes, another RPC
    >>> verify_request(as_renewal, public_bytes(key))
    False
    """
    if not message.nonce:
        message.nonce = os.urandom(NONCE_BYTES)
    message.signature = sign_bytes(request_bytes(message), key)
    return message


def verify_request(message: Message, public_key: bytes) -> bool:
    """True if the request carries a nonce of :data:`NONCE_BYTES` and its signature signs
    :func:`request_bytes` under ``public_key``."""
    return (len(message.nonce) == NONCE_BYTES and bool(message.signature)
            and verify_bytes(request_bytes(message), message.signature, public_key))


def write_private_file(path: str | Path, data: bytes) -> None:
    """Write ``data`` with file mode 0600, atomically (never a half-written key or token file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_key(key, path: str | Path) -> None:
    """Write a private key (Ed25519, or the RSA key of the swarm authorizer) as PEM, mode 0600, atomically."""
    write_private_file(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))


def load_key(path: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key


def load_or_create_key(path: str | Path) -> Ed25519PrivateKey:
    """Load the Ed25519 key at ``path``, creating it (mode 0600) on first use."""
    path = Path(path)
    if path.exists():
        return load_key(path)
    key = generate_key()
    save_key(key, path)
    logger.info("created a new Ed25519 key at %s", path)
    return key
