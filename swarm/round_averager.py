"""The round averager on hivemind: the all-reduce of the pseudo-gradients, identical on every peer, and the state
it serves to late joiners, built in one place (:func:`make_round_averager`) for trainer, witness and follower.

**Bitwise identical θ_{r+1}.** hivemind's runner sends each sender the *difference* between the average and the
sender's own part, compressed; adding it back gives every peer a slightly different average (by the compression
error of its own difference). :class:`ExactResultMixin` makes the reducer of each part send the average itself,
compressed once, and use the decompressed copy for its own part too, so every member of the group receives the
same bytes; the outer step runs on the CPU in float32 on the same inputs, so honest peers hold bitwise the same
θ_{r+1} (tests/test_rounds.py checks the hashes).

:class:`RoundAllReduce` is one round's all-reduce on it, from matchmaking to what the group gathered.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.averaging.partition import AllreduceException
from hivemind.compression import CompressionInfo
from hivemind.utils import MPFuture
from omi.protos import pb
from omi.swarm.access import PeerAccessGate
from omi.swarm.averagers import AccessControlledAveragerMixin, TrackedAllReduceRunner
from omi.swarm.compression import COMPRESSIONS
from omi.swarm.consistency import Ended, group_outcome, min_group_size
from omi.swarm.diloco import GlobalState, ServedState, theta_hash
from omi.swarm.reduce import CenteredClipAllReduceRunner
from omi.swarm.upstream import AverageReturningRunner, load_state_checked, run_in_averager

logger = logging.getLogger(__name__)


class ExactResultMixin(AverageReturningRunner):
    """Makes a :class:`TrackedAllReduceRunner` return the averages themselves, identical on every peer.

    The reducer of a part sends each sender ``average`` (compressed like the sender's part) instead of hivemind's
    ``average − sender's part``, and registers for its own part the same compressed-and-decompressed average.
    The averager copies results instead of adding them (``returns_averages``). A part whose reducer failed comes
    back as the peer's own part (hivemind's part container with ``return_deltas = False``): the all-reduce then
    fails, so no peer applies a partial average.
    """

    returns_averages = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._serialized: dict[int, asyncio.Future] = {}  # part -> the average's message

    def _serialized_average(self, part_index: int, averaged: torch.Tensor) -> asyncio.Future:
        """The message of a part's average, serialized **once** for every receiver, this peer included.

        It is compressed by the run's compression object, as the senders' parts are (hivemind's runner serializes
        by the sender's compression *type*, whose encoder is the one registered in that slot: ``Sparse8Bit`` for
        ``sparse4bit`` too, which would send a 4-bit run's averages in 8 bits).

        Serializing it once per receiver is not safe: the 8-bit codecs reduce over the tensor (mean, norm), and
        threads of the executor may do so in another order than the event loop's thread (OpenMP's thread count is
        per calling thread), so two serializations of the same average may differ in the last bit of the scale
        and give two receivers two averages (seen: peers 1e-4 apart in loss after a round they averaged together).
        """
        if part_index not in self._serialized:
            self._serialized[part_index] = asyncio.get_event_loop().run_in_executor(
                None, functools.partial(self.part_compression.compress, averaged,
                                        CompressionInfo.from_tensor(averaged)))
        return self._serialized[part_index]

    def raise_if_partial(self) -> None:
        """Fail the all-reduce if a part came back unaveraged (its reducer failed): this peer's result is then not the
        group's. The averager calls it after the last output: hivemind's ``azip`` stops iterating the runner there,
        so a check after the loop of :meth:`run` may never run (seen: a peer applied 11 % of the group's average and
        89 % of its own pseudo-gradient, "Averaging: received 11.3% results", and held another θ than its group)."""
        failed = len(self.failed_reducers)
        if failed or self.unaveraged_size:
            raise AllreduceException(f"{failed} reducer(s) failed; the partial average is unused")

    async def run(self):
        async for output in super().run():
            yield output
        self.raise_if_partial()


class RoundAllReduceRunner(ExactResultMixin, TrackedAllReduceRunner):
    """The weighted mean, identical on every peer."""


class RoundCenteredClipRunner(ExactResultMixin, CenteredClipAllReduceRunner):
    """CenteredClip, identical on every peer."""


class RoundAverager(AccessControlledAveragerMixin, DecentralizedAverager):
    """The all-reduce of the pseudo-gradients, and the state (θ_r, outer momentum, round) served to late joiners.

    :param deltas: the averaged tensors (pseudo-gradients; moved to shared memory by hivemind)
    :param state: returns ``(metadata, tensors)`` of the current state (``GlobalState.serve``), called in this (the
        host) process
    :param kwargs: ``DecentralizedAverager``'s and the mixin's arguments
    """

    def __init__(self, deltas: list[torch.Tensor], *, state=None, **kwargs):
        self._state = state
        super().__init__(averaged_tensors=deltas, **kwargs)

    def get_current_state(self):
        if self._state is None:
            return super().get_current_state()
        metadata, tensors = self._state()
        return metadata, tensors, [CompressionInfo.from_tensor(t, key=i) for i, t in enumerate(tensors)]

    def load_state_checked(self, *, timeout: float, count: int, expect: str | None = None,
                           skip: frozenset[str] = frozenset()):
        """hivemind's ``load_state_from_peers``, trying the peers in order of priority but skipping those in ``skip``
        (base58 peer ids) and, with ``expect``, every peer whose θ (the first ``count`` tensors) does not hash to
        it (without: the witness, :data:`WITNESS_PRIORITY`); returns ``(metadata, tensors, peer id)`` of the first
        state accepted, or None."""
        return run_in_averager(self, "_load_state_checked", timeout=timeout, count=count, expect=expect,
                               skip=sorted(skip))

    async def _load_state_checked(self, future: MPFuture, count: int, expect: str | None, skip: list[str]):
        await load_state_checked(self, future, count=count, expect=expect, skip=skip, theta_hash=theta_hash,
                                 checked_only=WITNESS_PRIORITY)

    def download_state(self, state: GlobalState, *, timeout: float, skip: set[str], expect: str | None = None
                       ) -> tuple[ServedState, str] | None:
        """A state of ``state``'s model (:meth:`GlobalState.read`) from the peer of highest priority not in ``skip``
        (with ``expect``: whose θ hashes to it), and that peer's id; None if no peer served one."""
        loaded = self.load_state_checked(timeout=timeout, count=len(state.theta), expect=expect, skip=frozenset(skip))
        if loaded is None:
            return None
        served = state.read(*loaded[:2])
        if served is None:
            logger.warning("peer %s served a state of the wrong shape; ignored", loaded[2])
            return None
        return served, loaded[2]


# the state-sharing priority of the coordinator's witness: below every trainer's (about their round), and a load
# takes its state only when it checks θ against the hash the coordinator published (``expect``); a plain load skips
# it (a witness one round behind made a peer that needed the newest round retry for the whole load timeout)
WITNESS_PRIORITY = -1e9


def rounds_prefix(spec: pb.RunSpec) -> str:
    """The hivemind prefix of a run's round averager (its all-reduce and its state for late joiners)."""
    return f"{spec.dht_prefix}_rounds"


def make_runner(spec: pb.RunSpec):
    """The round averager's all-reduce runner for the run's reducer."""
    averaging = spec.averaging
    if averaging.reducer == "centered_clip":
        return functools.partial(RoundCenteredClipRunner, tau=averaging.clip_tau, iterations=averaging.clip_iterations)
    return RoundAllReduceRunner


def make_round_averager(spec: pb.RunSpec, dht: hivemind.DHT, *, deltas: list[torch.Tensor],
                        state: Callable[[], tuple[dict, list[torch.Tensor]]] | None = None, client_mode: bool = False,
                        **overrides) -> RoundAverager:
    """The run's round averager, as every member of its all-reduces and every reader of its state builds it: only
    token holders, the run's reducer, compression and timeouts (``[averaging]``, ``[rounds] compression``).

    :param spec: the run
    :param dht: this peer's DHT of the run
    :param deltas: tensors shaped as the pseudo-gradient (the averager's shared buffers)
    :param state: what this peer serves to late joiners (``GlobalState.serve``; None: the averaged tensors)
    :param client_mode: outgoing connections only (behind NAT, or the coordinator's witness)
    :param overrides: ``DecentralizedAverager`` arguments that differ for this user (a follower serves no state)
    """
    averaging = spec.averaging
    arguments = dict(
        access=PeerAccessGate(spec.coordinator_public_key, spec.run_id, spec.dht_prefix),
        allreduce_runner=make_runner(spec), dht=dht, prefix=rounds_prefix(spec), start=True,
        min_group_size=min_group_size(spec),
        min_matchmaking_time=averaging.matchmaking_time, request_timeout=min(3.0, averaging.matchmaking_time / 2),
        allreduce_timeout=averaging.averaging_timeout,
        next_chunk_timeout=max(averaging.matchmaking_time, averaging.averaging_timeout / 2),
        compression=COMPRESSIONS[spec.rounds.compression or "none"](), client_mode=client_mode)
    return RoundAverager(deltas, state=state, **(arguments | overrides))


def cancel_step(control: StepControl | None) -> None:
    """Cancel a hivemind StepControl that may be None or finished already (cancelling one twice raises)."""
    if control is not None and not control.done():
        try:
            control.cancel()
        except Exception as e:  # it finished between the check and the call
            logger.debug("could not cancel an averaging step: %r", e)


@dataclass
class Finished:
    """How a :class:`RoundAllReduce` ended (:meth:`RoundAllReduce.finish`)."""

    ended: Ended
    average: list[torch.Tensor] | None = None  # ended GROUP: the group's average
    trainers: int = 0  # ended GROUP: the group's trainers (GroupOutcome)
    usable: bool = True  # ended GROUP: whether the reducer may use the average (GroupOutcome)
    canonical: bool = True  # ended GROUP: whether this peer held the θ_r the group trained from
    error: BaseException | None = None  # ended FAILED: what hivemind raised


class RoundAllReduce:
    """One round's all-reduce of this peer's pseudo-gradient Δ on the round averager (one at a time per averager).

    Matchmaking may begin before the round closes (:meth:`schedule`, as hivemind.Optimizer pre-schedules its
    gradient averaging); :meth:`start` puts Δ in and lets it run (or keeps Δ alone, with no peer to average with);
    :meth:`finish` waits for it. The group key carries the round (its low 8 bits as hivemind's group bits): with
    overlap, a peer's all-reduce of round r can still look for a group while a late joiner already averages round
    r+1; one group of both would mix two rounds' pseudo-gradients and make the older peers look out of sync (seen in
    tests/test_rounds.py). hivemind re-derives the bits after each group, so they are set before every step.

    :param averager: the round averager (:func:`make_round_averager`)
    :param spec: the run (``[averaging]``: matchmaking time and timeout, the reducer)
    :param round: the round whose Δ it averages
    :param theta_hash: the hash of the θ_r that Δ is relative to, gathered by the group
    :param missed: the others' all-reduce of ``round``, which this peer did not take part in (it loaded their state
        while it ran): nothing to start, nothing to apply
    """

    def __init__(self, averager: RoundAverager, spec: pb.RunSpec, round: int, theta_hash: str, *,
                 missed: bool = False):
        self.averager, self.spec, self.round, self.theta_hash, self.missed = averager, spec, round, theta_hash, missed
        self.control: StepControl | None = None  # hivemind's step, once matchmaking began
        self.delta: list[torch.Tensor] | None = None  # the Δ this peer put in (None before start)

    def _step(self, **step_kwargs) -> None:
        averaging = self.spec.averaging
        self.averager.set_group_bits(format(self.round % 256, "08b"))
        self.control = self.averager.step(wait=False, timeout=averaging.matchmaking_time + averaging.averaging_timeout,
                                          gather=dict(round=self.round, theta=self.theta_hash), **step_kwargs)

    def schedule(self, at: float) -> None:
        """Begin matchmaking now for an all-reduce at DHT time ``at``, to run once :meth:`start` triggers it."""
        self._step(scheduled_time=at, weight=1.0, require_trigger=True)

    def running(self) -> bool:
        return self.control is not None and not self.control.done()

    def start(self, delta: list[torch.Tensor], weight: float | None) -> None:
        """Average ``delta`` with ``weight`` (samples) in the background; None: this peer is alone, Δ is kept."""
        self.delta = delta
        if weight is None:
            return
        with self.averager.get_tensors() as tensors:
            for t, d in zip(tensors, delta, strict=True):
                t.copy_(d)
        if self.control is None:
            self._step(weight=weight)
        else:  # matchmaking began before the round closed: let it run with these tensors
            self.control.weight = weight
            self.control.allow_allreduce()

    def finish(self, gone: Callable[[], bool] | None = None) -> Finished:
        """Wait for the all-reduce; what the group gathered and averaged.

        :param gone: whether the swarm moved on past this round (the others averaged it and stepped): while this peer
            still looks for a group then, no group will come (seen: a straggler that began matchmaking after the
            others' group formed waited the whole averaging timeout), so it gives up at once
        """
        if self.missed:
            return Finished(Ended.MISSED)
        if self.control is None:
            return Finished(Ended.ALONE)
        while gone is not None and not self.control.done():
            if self.control.stage is AveragingStage.LOOKING_FOR_GROUP and gone():
                self.cancel()
                return Finished(Ended.FAILED, error=AllreduceException(
                    f"the others averaged round {self.round} without this peer"))
            time.sleep(0.1)
        try:
            gathered = self.control.result()
        except Exception as e:  # hivemind raises what its matchmaking or all-reduce raised
            return Finished(Ended.FAILED, error=e)
        if not gathered:
            return Finished(Ended.FAILED)
        with self.averager.get_tensors() as tensors:
            average = [t.clone() for t in tensors]
        group = group_outcome(gathered, self.spec)
        return Finished(Ended.GROUP, average, group.trainers, group.usable,
                        canonical=group.canonical == (self.round, self.theta_hash))

    def cancel(self) -> None:
        cancel_step(self.control)
