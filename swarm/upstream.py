"""Every piece of omi that follows hivemind's internals, in one place, each pinned to the upstream source it follows.

hivemind has no public hook for what these pieces do, so each is copied from (or follows) one hivemind function
and opens with a comment naming it: ``# Copied from hivemind.<module>.<Class>.<method> (hivemind 1.1.12), changed:
…`` (``Follows`` where only its contract is relied on or the code is adapted). :data:`PINNED` holds the sha256 of
each named function's source (dedented) under hivemind 1.1.12; ``tests/test_upstream_copies.py`` fails with the
list of upstream functions whose source differs in the installed hivemind. Then re-read the upstream change, adapt
the copy here, and update its pin. Nothing outside this module reads a private attribute of a hivemind object or
overrides a private hivemind method (the same test scans swarm/, node/, coordinator/ and models/).

The rest of ``omi.swarm`` uses these pieces as mixins and functions: the all-reduce runners
(:mod:`omi.swarm.averagers`, :mod:`omi.swarm.rounds`, :mod:`omi.swarm.reduce`) fill in the hooks named below.
"""

from __future__ import annotations

import asyncio
import logging
import random
import typing
from collections.abc import Callable

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.averaging.allreduce import AllreduceException, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import BannedException
from hivemind.compression import CompressionBase, deserialize_torch_tensor
from hivemind.compression import serialization as _serialization
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.p2p import PeerID
from hivemind.proto import auth_pb2, averaging_pb2, runtime_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import (
    achain,
    aiter_with_timeout,
    amap_in_executor,
    anext,
    as_aiter,
    azip,
    enter_asynchronously,
)
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.streaming import combine_from_streaming
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

logger = logging.getLogger(__name__)

# asyncio tasks of hivemind's averager process that must not be garbage-collected before they end (AveragerHooks._step)
HELD_TASKS: set[asyncio.Task] = set()

HIVEMIND_VERSION = "1.1.12"  # the hivemind whose sources PINNED hashes

# upstream function -> sha256 of ``textwrap.dedent(inspect.getsource(function))`` under hivemind HIVEMIND_VERSION
PINNED = {
    "hivemind.optim.progress_tracker.ProgressTracker._progress_fetcher":
        "8b8f8801173e8c8b76e47f55f5b35e7cc579e88986f0d6789b121b2d41d4fec4",
    "hivemind.optim.progress_tracker.ProgressTracker.shutdown":
        "806b6000c115fc54d93b3a0d0acd69946f29521a0fd864f2841e62e9fb865910",
    "hivemind.averaging.allreduce.AllReduceRunner.__init__":
        "b83602f7892d7a88d50c1b0888fde486584d40904492b099d0547e78a4a7bb40",
    "hivemind.averaging.allreduce.AllReduceRunner._generate_input_for_peer":
        "63ffe178a41ac64d5fc614e3f9cba7066876be737463ab7a099c55756912f4b5",
    "hivemind.averaging.allreduce.AllReduceRunner._communicate_with_peer":
        "acc68e7362cef39cf7b86b6891f0c73e4254520c298cbdcc40880b45f4e54648",
    "hivemind.averaging.allreduce.AllReduceRunner._accumulate_parts_streaming":
        "9253765b570fac268fe592a8915b1258e37e7a3d6253f796077fec0fd81c777b",
    "hivemind.averaging.partition.TensorPartContainer.register_failed_reducer":
        "700d938380cb6ace978da8b1e247a49314b16042b246eac5693780932991e0c2",
    "hivemind.averaging.partition.TensorPartReducer.accumulate_part":
        "c26694602645246eadd98c2af1dcdf48d1549b50c238daa8601a70230ba0b34b",
    "hivemind.averaging.partition.TensorPartReducer.check_current_part_finished":
        "b4b6d729f329e73d11d197434776b6b7eafe32539833746d50d7c5a09ff1c4b4",
    "hivemind.averaging.averager.DecentralizedAverager.rpc_aggregate_part":
        "af1261f670fff5f15864aff613f64f6c53bb76c0aba1d21d42e90fa932daaab9",
    "hivemind.averaging.averager.DecentralizedAverager._step":
        "f70e44b237abd51d331867ca6ece630aef677ac61df54815f2cd46b2cf162a7e",
    "hivemind.averaging.matchmaking.Matchmaking._request_join_group":
        "2dd44b047f01c3770f948cbb6019150bbe5885d97be9bf17b73077d972c5bef1",
    "hivemind.averaging.control.StepControl.cancel":
        "c8638e0f8408bf3a6e0557650a89ec1d1d541f1ecfe92714d2feb5c864b39302",
    "hivemind.averaging.matchmaking.Matchmaking.look_for_group":
        "c17a13faa5b99d0b3c79c7fc01bd53a2c7464318272664ef84f375987fadb53d",
    "hivemind.averaging.matchmaking.PotentialLeaders._declare_averager_periodically":
        "22b0b11217092f574859d8366629c7a3423e629c0ef2075b8c02e8fad476a33e",
    "hivemind.averaging.averager.DecentralizedAverager._aggregate_with_group":
        "d9a3d2012affe949763491ef603237ea3e567dcb359eba473b857d2b6e0c4bf4",
    "hivemind.averaging.averager.DecentralizedAverager._run_allreduce_inplace_":
        "b45f817c9078ed5e21044ccee0b22f4439458755fcc5d0de6c70f0034bf142ad",
    "hivemind.averaging.averager.DecentralizedAverager.load_state_from_peers":
        "6c45a7909f35c66ba259af3fe8fd85c924b9c856cb1392bb73f7c1c50515e961",
    "hivemind.averaging.averager.DecentralizedAverager._load_state_from_peers":
        "03582fcb128d72f7d0539ff4be9f9a09a5af19a47a8bad8de73974132492c63c",
    "hivemind.p2p.servicer.ServicerBase._collect_rpc_handlers":
        "1b41a1f5de2e12edb21cb6b2d2a7020353bce3c18b55d5e4965d52c282bfcad2",
    "hivemind.compression.quantization.Quantization.extract":
        "9ecbb7c2b61bff51e0e3181ad0b36bc2577513c4ed55405e7797754d5584476c",
    "hivemind.compression.serialization.deserialize_torch_tensor":
        "74f1eed9fb9b7de3fc0811cea2c0a1d8445e15472abb43da6fa3acadb63e92d8",
    "hivemind.utils.auth.TokenAuthorizerBase.refresh_token_if_needed":
        "437c0f9b951b89bdb6e0b6cc0d4b6492e89b51ead4083d3e532ee8afd0425046",
    "hivemind.utils.crypto.RSAPrivateKey.__setstate__":
        "20f26be4969584f1b3c4ff42570822c4618b68e5eb4c6c272233c66a9af6aacc",
}


# ------------------------------------------------------------------------- hivemind.averaging.allreduce


class RunnerHooks:
    """Put before hivemind's ``AllReduceRunner`` in a runner's bases: its private steps, with the hooks omi fills in.

    The runner provides ``count_sent(message)`` (called for every part this peer sends to a reducer) and a set
    ``failed_reducers`` (receives the group index of every reducer that failed this peer's parts).
    """

    # Follows hivemind.averaging.allreduce.AllReduceRunner._generate_input_for_peer (hivemind 1.1.12), changed:
    # every message it yields is counted (count_sent) on its way to libp2p
    async def _generate_input_for_peer(self, peer_index: int) -> typing.AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super()._generate_input_for_peer(peer_index):
            self.count_sent(message)
            yield message

    # Follows hivemind.averaging.allreduce.AllReduceRunner._communicate_with_peer (hivemind 1.1.12), changed:
    # hivemind registers a failed reducer with the part container and raises; its index is noted in failed_reducers
    async def _communicate_with_peer(self, peer_id: PeerID):
        try:
            await super()._communicate_with_peer(peer_id)
        except BaseException:
            self.failed_reducers.add(self.ordered_peer_ids.index(peer_id))
            raise

    # Follows hivemind.averaging.allreduce.AllReduceRunner.__init__ (hivemind 1.1.12), changed: the
    # TensorPartReducer it builds for this peer's parts is replaced by make(part_shapes, num_senders)
    def replace_part_reducer(self, make: Callable[[tuple[torch.Size, ...], int], object]) -> None:
        """Reduce this peer's parts with ``make(part shapes, number of senders)`` instead of the weighted mean."""
        self.tensor_part_reducer = make(tuple(part.shape for part in self.parts_for_local_averaging),
                                        len(self.sender_peer_ids))

    # Follows hivemind.averaging.allreduce.AllReduceRunner.__init__ (hivemind 1.1.12), changed: reads what its part
    # container and reducer counted
    def exchanged_peers(self) -> set[PeerID]:
        """The peers this one really exchanged tensors with: senders whose parts it received, and reducers that
        returned its parts averaged (a peer may reduce nothing yet get every part averaged)."""
        received = self.tensor_part_reducer.num_parts_received
        senders = {self.sender_peer_ids[i] for i, parts in enumerate(received) if parts > 0}
        by_peer = self.tensor_part_container.num_parts_by_peer
        reducers = {peer for i, peer in enumerate(self.ordered_peer_ids)
                    if by_peer[i] > 0 and i not in self.failed_reducers}
        return senders | reducers


class AverageReturningRunner:
    """Put before a :class:`RunnerHooks` runner: hivemind's runner steps that return averages, not differences.

    The runner provides ``_serialized_average(part_index, averaged)``: an awaitable of the average's message.
    """

    # Follows hivemind.averaging.partition.TensorPartContainer.register_failed_reducer (hivemind 1.1.12), changed:
    # nothing; AllReduceRunner builds its container with return_deltas=True, set False here so that results are
    # taken as they are and a part whose reducer failed comes back as this peer's own part (not a zero delta)
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tensor_part_container.return_deltas = False

    @property
    def part_compression(self) -> CompressionBase:
        """The compression this peer's parts travel in (the run's compression object)."""
        return self.tensor_part_container.compression

    @property
    def unaveraged_size(self) -> int:
        """Entries of this peer's result that came back as its own (their reducer failed; hivemind's part container
        counts them for its "Averaging: received N% results" warning)."""
        return self.tensor_part_container.failed_size

    # Copied from hivemind.averaging.allreduce.AllReduceRunner._communicate_with_peer (hivemind 1.1.12), changed:
    # only the local part (other peers: hivemind's), registering the average serialized once as sent, not a delta
    async def _communicate_with_peer(self, peer_id):
        if peer_id != self.peer_id:
            return await super()._communicate_with_peer(peer_id)
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
            averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, tensor_part,
                                                                      weight=self.weight)
            message = await self._serialized_average(part_index, averaged)
            self.tensor_part_container.register_processed_part(peer_index, part_index,
                                                               deserialize_torch_tensor(message))

    # Copied from hivemind.averaging.allreduce.AllReduceRunner._accumulate_parts_streaming (hivemind 1.1.12),
    # changed: sends the average (serialized once, _serialized_average) instead of average − sender's part
    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        part_index = 0
        try:
            async for tensor_part, weight in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight),
                stream, max_prefetch=self.tensor_part_container.prefetch,
            ):
                try:
                    averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, tensor_part,
                                                                              weight=weight)
                    part_index += 1
                except BannedException:
                    break
                serialized = await self._serialized_average(part_index - 1, averaged)
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


# ------------------------------------------------------------------------- hivemind.averaging.partition


class PartReducerHooks:
    """Put before hivemind's ``TensorPartReducer``: its accumulation, with the hooks of a reducer that keeps parts.

    The reducer provides ``add_part(tensor_part, weight)`` (keep one sender's copy of the current part) and
    ``reduce_part(shape)`` (the reduced current part from the copies kept).
    """

    # Copied from hivemind.averaging.partition.TensorPartReducer.accumulate_part (hivemind 1.1.12), changed: the part
    # goes to add_part instead of a running weighted sum
    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self.add_part(tensor_part, weight)
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    # Follows hivemind.averaging.partition.TensorPartReducer.check_current_part_finished (hivemind 1.1.12), changed:
    # the result is reduce_part(shape) instead of the running sum divided by the weights
    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            self.current_part_future.set_result(self.reduce_part(self.part_shapes[self.current_part_index]))
            self.reset_accumulators()


# ------------------------------------------------------------------------- hivemind.averaging.averager


# Follows hivemind.averaging.control.StepControl.cancel (hivemind 1.1.12), changed: nothing; it resolves the step's
# cancel future and then cancels the step itself, each a message to the averager's process. hivemind's _step checks
# step.cancelled() once the cancel future resolved: when the second message had not arrived yet (seen under load),
# it kept looking for a group, with the matchmaking lock, until the step's deadline, and the peer's next step waited
# for that lock (tests/test_round_averager.py: "Another look_for_group is already in progress", then no group)
async def look_for_group_until_cancelled(look_for_group, step_control):
    """``look_for_group(step_control)``, ended (CancelledError) as soon as the step's cancel is requested; once it is,
    every later call ends at once too (after a short wait), until hivemind's _step sees the step cancelled."""
    if step_control._cancel.done():
        await asyncio.sleep(0.05)
        raise asyncio.CancelledError()
    looking = asyncio.ensure_future(look_for_group(step_control))
    HELD_TASKS.add(looking)
    cancel = asyncio.ensure_future(step_control.wait_for_cancel())
    try:
        await asyncio.wait({looking, cancel}, return_when=asyncio.FIRST_COMPLETED)
        if not looking.done():
            raise asyncio.CancelledError()
        return looking.result()
    finally:
        cancel.cancel()
        if not looking.done():
            looking.cancel()
            await asyncio.gather(looking, return_exceptions=True)  # its clean-up: leave the DHT, free the lock
        HELD_TASKS.discard(looking)


class AveragerHooks:
    """Put before hivemind's ``DecentralizedAverager``: its private all-reduce steps, with the hooks omi fills in.

    The averager provides ``check_group(group_info)`` (a coroutine that raises to refuse a group before any tensor
    leaves this peer), ``check_leader(peer_id)`` (a coroutine: whether to ask that peer to lead this one's group),
    ``new_runner(**kwargs)`` (an all-reduce runner with ``AllReduceRunner``'s arguments, a
    :class:`RunnerHooks` runner), ``allreduce_finished(exchanged)`` (the peers it exchanged tensors with) and
    ``group_finished()`` (called after each all-reduce of a group).
    """

    # Follows hivemind.p2p.servicer.ServicerBase._collect_rpc_handlers (hivemind 1.1.12), changed: nothing; it caches
    # the RPC table on the first class that asks and subclasses inherit it, so each averager class starts without one
    _rpc_handlers = None
    _stub_type = None

    # Follows hivemind.averaging.averager.DecentralizedAverager._step (hivemind 1.1.12), changed: nothing in it;
    # Follows hivemind.averaging.matchmaking.Matchmaking._request_join_group (hivemind 1.1.12), changed: nothing in
    # it; before each step, the Matchmaking that hivemind creates in the averager's process (no hook) is made to skip a
    # leader that check_leader refuses, as if it had not answered. Honest leaders refuse a peer without a valid
    # token, but honest followers still asked such a peer to lead them and refused its group only once assembled:
    # a round lost (seen: an honest peer averaged in none of its 3 rounds beside an intruder).
    # Follows hivemind.averaging.matchmaking.Matchmaking.look_for_group (hivemind 1.1.12) and
    # Follows hivemind.averaging.matchmaking.PotentialLeaders._declare_averager_periodically (hivemind 1.1.12),
    # changed: nothing in them; the task that runs look_for_group is held (HELD_TASKS) until it ends. A cancelled step
    # cancels that task and drops it (_step keeps no reference), and its clean-up awaits a DHT store, an MPFuture
    # that hivemind refers to only weakly: the garbage collector then destroyed the task mid-clean-up, inside
    # `async with lock_looking_for_group`, so the lock stayed taken and every later step of the peer waited for it
    # (seen: "Task was destroyed but it is pending!", then a peer that averaged in none of its next 4 rounds)
    async def _step(self, *, step, future_for_init):
        matchmaking = self._matchmaking
        if not getattr(matchmaking, "omi_hooks_installed", False):
            request_join_group, look_for_group = matchmaking._request_join_group, matchmaking.look_for_group

            async def request_join_checked_group(leader):
                if not await self.check_leader(leader):
                    return None
                return await request_join_group(leader)

            async def look_for_group_held(step_control):
                task = asyncio.current_task()
                HELD_TASKS.add(task)
                try:
                    return await look_for_group_until_cancelled(look_for_group, step_control)
                finally:
                    HELD_TASKS.discard(task)

            matchmaking._request_join_group = request_join_checked_group
            matchmaking.look_for_group, matchmaking.omi_hooks_installed = look_for_group_held, True
        return await super()._step(step=step, future_for_init=future_for_init)

    # Copied from hivemind.averaging.averager.DecentralizedAverager.rpc_aggregate_part (hivemind 1.1.12), changed: the
    # wait for a group to register is bounded by next_chunk_timeout (the sender gives up on this peer by then anyway).
    # Upstream waits without a bound: a part for an unknown group that came after this peer's last averaging step
    # failed in matchmaking held its stream open until the next group formed, forever on a peer that stopped
    # averaging (seen: tests/test_swarm_training.py's probe of a finished peer timed out in 5 of 11 runs)
    async def rpc_aggregate_part(self, stream, context):
        request = await anext(stream)
        if request.group_id not in self._running_groups:
            try:
                await asyncio.wait_for(self._pending_groups_registered.wait(),
                                       self.next_chunk_timeout or self._allreduce_timeout)
            except TimeoutError:
                pass

        future = self._running_groups.get(request.group_id)
        if future is None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return

        group = await future
        async for message in group.rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message

    # Follows hivemind.averaging.averager.DecentralizedAverager._aggregate_with_group (hivemind 1.1.12), changed:
    # check_group first, group_finished after
    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        await self.check_group(group_info)
        result = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        self.group_finished()
        return result

    # Copied from hivemind.averaging.averager.DecentralizedAverager._run_allreduce_inplace_ (hivemind 1.1.12),
    # changed: the runner comes from new_runner; results are copied when the runner returns averages
    # (returns_averages), hivemind's deltas added, and a partial result raises (raise_if_partial); allreduce_finished
    # gets the peers exchanged with; a failed all-reduce leaves the inputs as they were, so hivemind's retry (a new
    # group) starts from them
    async def _run_allreduce_inplace_(self, tensors, group_info: GroupInfo, group_id: bytes | None = None,
                                      **kwargs):
        inputs = [t.clone() for t in tensors]
        try:
            group_id = group_info.group_id if group_id is None else group_id
            runner = self.new_runner(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
                                     group_id=group_id, ordered_peer_ids=group_info.peer_ids, **kwargs)
            assert group_id in self._running_groups, \
                f"Group id {group_id} was not registered in _register_allreduce_group"
            self._running_groups[group_id].set_result(runner)
            if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
                exact = getattr(runner, "returns_averages", False)
                async for tensor, update in azip(as_aiter(*tensors), runner):
                    if exact:
                        tensor.copy_(update)
                    else:
                        tensor.add_(update, alpha=self._averaging_alpha)
                    self.last_updated = get_dht_time()
                    self._state_updated.set()
                if exact:  # azip stops at the last tensor: what the runner checks after its last output may not run
                    runner.raise_if_partial()
            else:
                async for _ in runner:
                    raise ValueError("aux peers should not receive averaged tensors")
            self.allreduce_finished(runner.exchanged_peers())
        except BaseException:
            for t, original in zip(tensors, inputs, strict=True):
                t.copy_(original)
            raise


# Follows hivemind.averaging.averager.DecentralizedAverager.load_state_from_peers (hivemind 1.1.12), changed: the
# coroutine method to run in the averager's process is named by the caller (hivemind's loop runs any it is sent)
def run_in_averager(averager, method: str, *, timeout: float, **kwargs):
    """``averager.<method>(future=…, **kwargs)`` run in the averager's process; its result, within ``timeout``."""
    future = MPFuture()
    averager._outer_pipe.send((method, [], dict(future=future, **kwargs)))
    return future.result(timeout=timeout)


# Follows hivemind.averaging.averager.DecentralizedAverager._load_state_from_peers (hivemind 1.1.12), changed: skips
# the peers in `skip` and, with `expect`, every peer whose θ (the first `count` tensors, hashed by theta_hash) is not
# it; without `expect`, every peer announcing the priority `checked_only` or less; returns the peer too; each read
# waits next_chunk_timeout (hivemind's applies it only when given a timeout)
async def load_state_checked(averager, future: MPFuture, *, count: int, expect: str | None, skip: list[str],
                             theta_hash: Callable[[list[torch.Tensor]], str], checked_only: float) -> None:
    """Run in the averager's process (:func:`run_in_averager`); sets ``future`` to ``(metadata, tensors, peer id)``
    of the first state accepted, or None."""
    timeout = averager.next_chunk_timeout if averager.next_chunk_timeout is not None else averager.request_timeout
    try:
        found, _ = averager.dht.get(f"{averager._matchmaking.group_key_manager.prefix}.all_averagers",
                                    latest=True) or ({}, None)
        priority = {PeerID(peer): (float(info.value), random.random()) for peer, info in found.items()
                    if isinstance(info, ValueWithExpiration) and isinstance(info.value, (float, int))} \
            if isinstance(found, dict) else {}
        for peer in sorted(priority, key=priority.get, reverse=True):
            if peer == averager.peer_id or peer.to_base58() in skip or \
                    (expect is None and priority[peer][0] <= checked_only):
                continue
            try:
                stub = averager.get_stub(averager._p2p, peer, namespace=averager.prefix)
                stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
                metadata, tensors = await read_state(stream, averager.serializer, timeout)
            except Exception as e:
                logger.warning("could not download the state of peer %s: %r", peer, e)
                continue
            if not metadata or len(tensors) < count:
                continue
            if expect is not None and theta_hash(tensors[:count]) != expect:
                logger.warning("peer %s serves a state whose θ does not hash to %s…; refused", peer, expect[:12])
                continue
            future.set_result((metadata, tensors, peer.to_base58()))
            return
    finally:
        if not future.done():
            future.set_result(None)


# Copied from hivemind.averaging.averager.DecentralizedAverager._load_state_from_peers (hivemind 1.1.12), changed:
# only its loop that reads one peer's rpc_download_state stream, as a function
async def read_state(stream, serializer, timeout: float) -> tuple[object, list[torch.Tensor]]:
    """(metadata, tensors) of a peer's ``rpc_download_state`` stream."""
    metadata, parts, tensors = None, [], []
    async for message in aiter_with_timeout(stream, timeout=timeout):
        if message.metadata:
            metadata = serializer.loads(message.metadata)
        if message.tensor_part.dtype and parts:  # the start of the next tensor
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
            parts = []
        parts.append(message.tensor_part)
    if parts:
        tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
    return metadata, tensors


# ------------------------------------------------------------------------- hivemind.optim


class RoundProgressTracker(ProgressTracker):
    """hivemind's ``ProgressTracker`` whose background reads of the swarm's progress do not block the round's end.

    Upstream holds ``lock_global_progress`` while it reads the progress records from the DHT, and the peer that
    ends a round must take that lock to move to the next one (``pause_updates`` around ``update_epoch``). A DHT read
    waits for the slowest of the peers it asks (a loaded or vanished one until its request timeout): measured in a
    three-volunteer swarm on 2 cores, each peer waited 0-5 s (2.3 s on average) per round there, as long as the
    round's matchmaking. Here only the parse of what was read runs under the lock."""

    # Copied from hivemind.optim.progress_tracker.ProgressTracker._progress_fetcher (hivemind 1.1.12), changed: the
    # DHT read runs outside lock_global_progress; the parse stays inside. The parse reads the local progress, so a
    # read begun before update_epoch still yields the new round (the global round is at least the local one, and
    # only records at the global round count samples)
    async def _progress_fetcher(self):
        loop = asyncio.get_event_loop()
        shutdown_checker = asyncio.create_task(
            asyncio.wait_for(loop.run_in_executor(None, self.shutdown_triggered.wait), None)
        )

        async def _fetch_progress_unless_shutdown_triggered():
            getter = asyncio.create_task(
                asyncio.wait_for(self.dht.get(self.training_progress_key, latest=True, return_future=True), None)
            )
            await asyncio.wait({getter, shutdown_checker}, return_when=asyncio.FIRST_COMPLETED)
            if self.shutdown_triggered.is_set():
                return
            return await getter

        try:
            while not self.shutdown_triggered.is_set():
                time_to_next_update = max(0.0, self.global_progress.next_fetch_time - get_dht_time())
                state_updated_externally = await loop.run_in_executor(
                    None, self.global_state_updated.wait, time_to_next_update
                )
                if state_updated_externally:
                    self.global_state_updated.clear()
                    continue

                maybe_metadata = await _fetch_progress_unless_shutdown_triggered()
                if self.shutdown_triggered.is_set():
                    break
                metadata = maybe_metadata.value if isinstance(maybe_metadata, ValueWithExpiration) else None
                async with enter_asynchronously(self.lock_global_progress):
                    self.global_progress = self._parse_swarm_progress_data(metadata)
                    self.fetched_global_progress_this_epoch.set()

        finally:
            logger.log(self.status_loglevel, f"No longer fetching {self.training_progress_key}")


# Follows hivemind.optim.progress_tracker.ProgressTracker.shutdown (hivemind 1.1.12), changed: waits (at most
# `timeout`) until the DHT stored the empty record that withdraws this peer's progress (hivemind's store is not
# awaited, so a peer that shuts its DHT down right after may leave its last record behind for a minute: seen, the
# records of volunteers that had left closed a newcomer's round before it trained a step)
def withdraw_progress(tracker, timeout: float) -> bool:
    """Stop ``tracker`` and withdraw this peer's progress record from the swarm; True once the DHT stored that."""
    tracker.shutdown(timeout)
    try:
        return bool(tracker.dht.store(tracker.training_progress_key, subkey=tracker._local_public_key, value=None,
                                      expiration_time=get_dht_time() + tracker.metadata_expiration,
                                      return_future=True).result(timeout=timeout))
    except Exception as e:  # the DHT is gone or slow: the record then expires on its own
        logger.warning("could not withdraw this peer's progress record: %r", e)
        return False


# ------------------------------------------------------------------------- hivemind.compression


class FixedExtract:
    """Put before one of hivemind's 8-bit ``Quantization`` classes: its decoder, working with numpy 2."""

    # Copied from hivemind.compression.quantization.Quantization.extract (hivemind 1.1.12), changed: the codebook
    # length is read as a scalar ([0]): numpy 2 refuses int() of a one-element array
    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        codebook_size = int(np.frombuffer(serialized_tensor.buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(serialized_tensor.buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(serialized_tensor.buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)


# Follows hivemind.compression.serialization.deserialize_torch_tensor (hivemind 1.1.12), changed: nothing; it looks
# the decoder up in its private table by the message's compression type, which has no public setter
def register_decoders(**codecs: CompressionBase) -> None:
    """Decode messages of each compression type (``UNIFORM_8BIT=…``) with the given codec, in this process."""
    _serialization._BASE_COMPRESSION_TYPES.update(codecs)


# ------------------------------------------------------------------------- hivemind.utils


# Follows hivemind.utils.auth.TokenAuthorizerBase.refresh_token_if_needed (hivemind 1.1.12), changed: nothing; it
# keeps the token it presents in a private attribute without a reader
def presented_token(authorizer: TokenAuthorizerBase) -> auth_pb2.AccessToken | None:
    """The access token ``authorizer`` currently presents (None before its first request)."""
    return authorizer._local_access_token


# Follows hivemind.utils.crypto.RSAPrivateKey.__setstate__ (hivemind 1.1.12), changed: sets the key object itself
# instead of loading it from DER bytes (hivemind's constructor only generates a new key)
def rsa_private_key(raw: rsa.RSAPrivateKey) -> RSAPrivateKey:
    """hivemind's ``RSAPrivateKey`` holding ``raw``."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = raw
    return key
