"""Domain errors of the coordinator; the servicer turns each into the gRPC status code it names, and its reason.

>>> error = FailedPrecondition("run 'digits' is stopped", reason=pb.REFUSAL_RUN_STOPPED)
>>> error.code, pb.Refusal.Name(error.reason), str(error)
('FAILED_PRECONDITION', 'REFUSAL_RUN_STOPPED', "run 'digits' is stopped")
"""

import logging

from omi.protos import pb
from omi.protos.refusals import refusal_metadata

logger = logging.getLogger(__name__)


class CoordinatorError(Exception):
    """A refused request. ``code`` is the name of a ``grpc.StatusCode`` (domain modules do not import grpc).

    :param message: the status details, for people
    :param reason: a ``pb.Refusal`` where the caller acts on why (the node leaves a stopped run, exits 4 on an
        unknown run, ...); it reaches the caller as trailing metadata (:meth:`trailing_metadata`)
    """

    code = "INTERNAL"

    def __init__(self, message: str = "", *, reason: int = pb.REFUSAL_UNSPECIFIED):
        super().__init__(message)
        self.reason = reason

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """What the servicer sends with the status so that the caller reads :attr:`reason` typed."""
        return refusal_metadata(self.reason)


class InvalidArgument(CoordinatorError):
    code = "INVALID_ARGUMENT"


class Unauthenticated(CoordinatorError):
    code = "UNAUTHENTICATED"


class PermissionDenied(CoordinatorError):
    code = "PERMISSION_DENIED"


class NotFound(CoordinatorError):
    code = "NOT_FOUND"


class AlreadyExists(CoordinatorError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(CoordinatorError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(CoordinatorError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(CoordinatorError):
    """Not ready yet; the caller retries (the node's client retries UNAVAILABLE with backoff)."""

    code = "UNAVAILABLE"
