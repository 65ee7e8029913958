"""libp2p peer ids, and the proof that a registering node holds the private key of the peer id it names.

A hivemind peer's libp2p identity is an RSA key stored as a libp2p ``PrivateKey`` protobuf (hivemind's
``P2P.generate_identity``); its peer id is the base58 sha2-256 multihash of the libp2p ``PublicKey`` protobuf
(https://github.com/libp2p/specs/blob/master/peer-ids/peer-ids.md). libp2p authenticates that id on every stream,
so binding it to a node's Ed25519 identity at registration is what lets the swarm's gate and a validator's fetch
trust it. The node signs, with its libp2p key, the coordinator's challenge nonce together with its Ed25519 public
key and the run (:func:`sign_binding`); the coordinator derives the peer id from the public key it was sent and
checks the signature (:func:`verify_binding`). Both sides need only ``cryptography``.

>>> from cryptography.hazmat.primitives.asymmetric import rsa
>>> identity = private_key_proto(rsa.generate_private_key(public_exponent=65537, key_size=2048))
>>> public, signature = sign_binding(identity, b"nonce", b"k" * 32, "digits")
>>> verify_binding(public, signature, b"nonce", b"k" * 32, "digits") == peer_id_of(public)
True
>>> verify_binding(public, signature, b"nonce", b"k" * 32, "other-run")
Traceback (most recent call last):
...
ValueError: the peer signature does not sign this challenge, node key and run with the peer id's key
"""

import hashlib

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

BINDING_DOMAIN = b"omi.v1 peer id binding\0"
MIN_RSA_BITS, MAX_RSA_BITS = 2048, 4096  # hivemind makes 2048-bit keys; the bound caps what a check costs
MAX_PUBLIC_KEY_BYTES = 1024  # a 4096-bit RSA key's PublicKey protobuf has ~550 bytes
_RSA_TYPE = b"\x08\x00"  # field 1 (KeyType, a required proto2 enum, so always written) = RSA (0)
_DATA_TAG = b"\x12"  # field 2 (bytes Data)
_SHA2_256 = b"\x12\x20"  # multihash code and digest length


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_key_proto(data: bytes) -> bytes:
    """The ``Data`` of a libp2p key protobuf (``PublicKey`` or ``PrivateKey``) of type RSA, written as libp2p
    writes it; ValueError otherwise."""
    if not data.startswith(_RSA_TYPE + _DATA_TAG):
        raise ValueError("not a libp2p RSA key protobuf (hivemind peers have RSA identities)")
    length, shift, position = 0, 0, len(_RSA_TYPE + _DATA_TAG)
    while True:
        if position >= len(data) or shift > 28:
            raise ValueError("a libp2p key protobuf with a malformed length")
        byte = data[position]
        length |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if not byte & 0x80:
            break
    if position + length != len(data):
        raise ValueError("a libp2p key protobuf with trailing or missing bytes")
    return data[position:]


def private_key_proto(key: rsa.RSAPrivateKey) -> bytes:
    """The libp2p ``PrivateKey`` protobuf of an RSA key, PKCS#1 DER inside (what hivemind's identity files hold)."""
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    return _RSA_TYPE + _DATA_TAG + _varint(len(der)) + der


def public_key_proto(key: rsa.RSAPublicKey) -> bytes:
    """The libp2p ``PublicKey`` protobuf of an RSA public key: what the peer id hashes."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _RSA_TYPE + _DATA_TAG + _varint(len(der)) + der


def peer_id_of(public_key: bytes) -> str:
    """The base58 peer id of a libp2p ``PublicKey`` protobuf (RSA keys: the sha2-256 multihash)."""
    return base58.b58encode(_SHA2_256 + hashlib.sha256(public_key).digest()).decode()


def peer_id_of_identity(identity: bytes) -> str:
    """The peer id of a libp2p identity file's bytes (hivemind's ``PeerID.from_identity``, without hivemind)."""
    return peer_id_of(public_key_proto(_load_private(identity).public_key()))


def _load_private(identity: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_der_private_key(_read_key_proto(identity), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("a libp2p identity that is not an RSA key")
    return key


def binding_bytes(challenge_nonce: bytes, node_public_key: bytes, run_id: str) -> bytes:
    """What the libp2p key signs: this challenge, this Ed25519 identity, this run (a signature made for one
    registration is no use for another identity, run or challenge)."""
    return (BINDING_DOMAIN + len(challenge_nonce).to_bytes(2, "big") + challenge_nonce
            + len(node_public_key).to_bytes(2, "big") + node_public_key + run_id.encode())


def sign_binding(identity: bytes, challenge_nonce: bytes, node_public_key: bytes, run_id: str) -> tuple[bytes, bytes]:
    """(libp2p public key protobuf, RSA PKCS#1 v1.5 SHA-256 signature of :func:`binding_bytes`) for the identity
    file's bytes ``identity``."""
    key = _load_private(identity)
    signature = key.sign(binding_bytes(challenge_nonce, node_public_key, run_id), padding.PKCS1v15(),
                         hashes.SHA256())
    return public_key_proto(key.public_key()), signature


def verify_binding(public_key: bytes, signature: bytes, challenge_nonce: bytes, node_public_key: bytes,
                   run_id: str) -> str:
    """The peer id that ``public_key`` (a libp2p ``PublicKey`` protobuf) stands for, if ``signature`` signs this
    registration with it; ValueError saying what is wrong otherwise."""
    if len(public_key) > MAX_PUBLIC_KEY_BYTES:
        raise ValueError(f"peer_public_key has more than {MAX_PUBLIC_KEY_BYTES} bytes")
    try:
        key = serialization.load_der_public_key(_read_key_proto(public_key))
    except ValueError as e:
        raise ValueError(f"peer_public_key is not a libp2p RSA public key: {e}") from None
    if not isinstance(key, rsa.RSAPublicKey) or not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise ValueError(f"peer_public_key must be an RSA key of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits")
    try:
        key.verify(signature, binding_bytes(challenge_nonce, node_public_key, run_id), padding.PKCS1v15(),
                   hashes.SHA256())
    except InvalidSignature:
        raise ValueError("the peer signature does not sign this challenge, node key and run with the peer id's "
                         "key") from None
    return peer_id_of(public_key)


def new_identity() -> bytes:
    """A fresh libp2p identity (RSA 2048, as hivemind's ``P2P.generate_identity`` makes): its file's bytes."""
    return private_key_proto(rsa.generate_private_key(public_exponent=65537, key_size=2048))
