"""Why the coordinator refused a call, typed: a ``pb.Refusal`` carried beside the gRPC status code.

The coordinator attaches a ``pb.RefusalDetail`` as the binary trailing metadata entry :data:`REFUSAL_KEY`
(:func:`refusal_metadata`); a caller reads it with :func:`refusal_of` and decides on the enum, never on the status
details, which are words for people. Both sides of the wire use this module, so the key and the encoding live once.

>>> metadata = refusal_metadata(pb.REFUSAL_RUN_STOPPED)
>>> pb.Refusal.Name(pb.RefusalDetail.FromString(dict(metadata)[REFUSAL_KEY]).reason)
'REFUSAL_RUN_STOPPED'
"""

import logging

import grpc
from google.protobuf.message import DecodeError
from omi.protos import pb

logger = logging.getLogger(__name__)

REFUSAL_KEY = "omi-refusal-bin"  # grpc carries a key ending in -bin as raw bytes


def refusal_metadata(reason: int) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that tells the caller ``reason`` (a ``pb.Refusal``); none for REFUSAL_UNSPECIFIED."""
    if reason == pb.REFUSAL_UNSPECIFIED:
        return ()
    return ((REFUSAL_KEY, pb.RefusalDetail(reason=reason).SerializeToString()),)


def refusal_of(error: grpc.RpcError) -> int:
    """The ``pb.Refusal`` the coordinator gave with ``error``; REFUSAL_UNSPECIFIED when it gave none (or the error
    never reached it, e.g. an unreachable coordinator)."""
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if trailing is not None else None) or ():
        if key == REFUSAL_KEY:
            try:
                return pb.RefusalDetail.FromString(value).reason
            except DecodeError:
                logger.warning("unreadable %s in the coordinator's answer: %r", REFUSAL_KEY, value[:64])
    return pb.REFUSAL_UNSPECIFIED
