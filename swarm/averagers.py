"""hivemind averagers that average only with token holders and count whom they really averaged with."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import typing
from collections.abc import Callable

import torch
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner
from hivemind.averaging.group_info import GroupInfo
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from omi.swarm.access import PeerAccessGate
from omi.swarm.lifetime import end_with_parent
from omi.swarm.upstream import AveragerHooks, RunnerHooks


class TrackedAllReduceRunner(RunnerHooks, AllReduceRunner):
    """hivemind's ``AllReduceRunner`` that also notes which peers failed to reduce this peer's parts.

    ``failed_reducers`` holds their indices in the group's order, filled as the all-reduce runs. It also counts
    the serialized bytes this peer hands to libp2p (its parts to their reducers, the averages it returns to their
    senders) into ``byte_counter`` (a shared ``mp.Value`` the averager sets; libp2p's framing is not counted).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.failed_reducers: set[int] = set()
        self.byte_counter = None

    def count_sent(self, message: averaging_pb2.AveragingData) -> None:
        if self.byte_counter is not None:
            with self.byte_counter.get_lock():
                self.byte_counter.value += message.ByteSize()

    async def rpc_aggregate_part(self, stream, context) -> typing.AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super().rpc_aggregate_part(stream, context):
            self.count_sent(message)
            yield message


AllReduceRunnerFactory = Callable[..., TrackedAllReduceRunner]


class AccessControlledAveragerMixin(AveragerHooks):
    """Adds token checks to a hivemind ``DecentralizedAverager`` subclass (put it first in the bases).

    - ``rpc_join_group``: a leader answers a peer without a valid token with ``PROTOCOL_VIOLATION``;
    - matchmaking: it asks only a peer with a valid token to lead its group (``check_leader``);
    - ``rpc_aggregate_part``: a sender without a valid token gets ``PROTOCOL_VIOLATION`` and its part is dropped;
    - ``rpc_download_state``: a peer without a valid token gets nothing (hivemind's "not sharing" answer);
    - before an all-reduce, every member of the assembled group must hold a valid token, else the round fails
      before any tensor leaves this peer.

    It also records how many senders' parts it reduced in its last all-reduce (``last_group_size``, 0 = none
    yet; senders that never sent are not counted), counts rounds with more than itself, and lets
    the all-reduce runner be replaced (``allreduce_runner``, e.g. a robust reducer).

    :param access: the :class:`PeerAccessGate` of the run
    :param allreduce_runner: a callable with ``AllReduceRunner``'s keyword arguments that returns a
        :class:`TrackedAllReduceRunner`; default: hivemind's runner, tracked
    """

    def __init__(self, *args, access: PeerAccessGate, allreduce_runner: AllReduceRunnerFactory | None = None,
                 **kwargs):
        # set before super().__init__: hivemind may fork the averager process from inside it (start=True)
        self.access = access
        self.allreduce_runner = allreduce_runner or TrackedAllReduceRunner
        self._last_group_size = mp.Value(ctypes.c_int, 0)
        self._rounds_averaged = mp.Value(ctypes.c_int, 0)
        self._bytes_sent = mp.Value(ctypes.c_ulonglong, 0)
        super().__init__(*args, **kwargs)

    def run(self):
        # hivemind's DecentralizedAverager.run, in the forked averager process, which ends with its parent: a node
        # killed by SIGKILL would otherwise leave it running, re-parented to init, holding the model's memory
        end_with_parent(mp.parent_process().pid)
        renew_torch_thread_pool()
        super().run()

    async def _is_member(self, peer_id: PeerID) -> bool:
        return peer_id == self.peer_id or await self.access.is_allowed(self.dht, peer_id)

    async def check_leader(self, peer_id: PeerID) -> bool:
        """Ask only a token holder to lead this peer's group (a group it leads would be refused once assembled)."""
        return await self._is_member(peer_id)

    @property
    def last_group_size(self) -> int:
        """Senders whose parts this peer reduced in its last all-reduce, itself included (0 if none yet)."""
        return self._last_group_size.value

    @property
    def bytes_sent(self) -> int:
        """Serialized tensor bytes this peer sent in all its all-reduces so far (:class:`TrackedAllReduceRunner`)."""
        return self._bytes_sent.value

    @property
    def rounds_averaged(self) -> int:
        """All-reduce rounds of this averager in which it reduced parts of at least one other peer."""
        return self._rounds_averaged.value

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext
                             ) -> typing.AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not await self._is_member(context.remote_id):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    async def rpc_aggregate_part(self, stream: typing.AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                                 ) -> typing.AsyncIterator[averaging_pb2.AveragingData]:
        if not await self._is_member(context.remote_id):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest, context: P2PContext
                                 ) -> typing.AsyncIterator[averaging_pb2.DownloadData]:
        if not await self._is_member(context.remote_id):
            return
        async for message in super().rpc_download_state(request, context):
            yield message

    async def check_group(self, group_info: GroupInfo) -> None:
        """Refuse a group with a member without a valid token, before any tensor leaves this peer."""
        for peer_id in group_info.peer_ids:
            if not await self._is_member(peer_id):
                raise AllReduceRefused(f"group member {peer_id} has no valid access token")

    def group_finished(self) -> None:
        """Count an all-reduce in which this peer averaged with at least one other."""
        if self._last_group_size.value > 1:
            with self._rounds_averaged.get_lock():
                self._rounds_averaged.value += 1

    def new_runner(self, **kwargs) -> TrackedAllReduceRunner:
        """This averager's all-reduce runner (``AllReduceRunner``'s arguments), counting into ``bytes_sent``."""
        runner = self.allreduce_runner(**kwargs)
        runner.byte_counter = self._bytes_sent
        return runner

    def allreduce_finished(self, exchanged: set[PeerID]) -> None:
        """Record the group size as the peers this one really exchanged tensors with."""
        # the peers this one really exchanged tensors with, itself included (a group whose members all refused it
        # counts 1). The group's senders minus those hivemind banned also counted members that had refused and sent
        # nothing when the round ended before their timeout: an intruder then "saw" a group of 3 whose honest
        # members had refused it.
        self._last_group_size.value = len(exchanged | {self.peer_id})


def renew_torch_thread_pool() -> None:
    """In a process forked from one that used torch's thread pool: renew the pool now, in this thread.

    torch renews it lazily, in the first thread that asks for it after the fork, and a second thread asking at the
    same moment gets none: "pool INTERNAL ASSERT FAILED ... Invalid thread pool!" from ``torch.quantize_per_tensor``
    in one of the averager's executor threads, which compress parts side by side (seen: a peer's 8-bit part never
    reached its reducer, and the group's all-reduce failed for it; a child that quantizes in 8 threads at once failed
    22 times in 40 forks).
    """
    torch.set_num_threads(torch.get_num_threads())


class AllReduceRefused(AllreduceException):
    """The assembled group contains a peer without a valid access token."""
