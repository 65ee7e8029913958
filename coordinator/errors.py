"""Domain errors of the coordinator; the servicer turns each into the gRPC status code it names."""

import logging

logger = logging.getLogger(__name__)


class CoordinatorError(Exception):
    """A refused request. ``code`` is the name of a ``grpc.StatusCode`` (domain modules do not import grpc)."""

    code = "INTERNAL"


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
