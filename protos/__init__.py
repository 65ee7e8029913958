"""The omi-swarm wire protocol: generated messages and stubs, and how they are signed."""

from omi.protos.omi.v1 import coordinator_pb2 as pb
from omi.protos.omi.v1 import coordinator_pb2_grpc as rpc

__all__ = ["pb", "rpc"]
