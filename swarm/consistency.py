"""The consistency rules of a round: what a group concludes, which served state is trusted, and whether an outer
step applies.

Plain functions of plain inputs, so every peer that sees the same inputs decides the same: :func:`group_outcome`
(which θ_r a group trained from, how many trainers it had), :func:`should_apply` (the one predicate that decides, at a
round's end, whether this peer takes the outer step and whether it must load the swarm's state first: torchft's
``Manager.should_commit``) and :class:`Provenance` (the peer a state came from, and the peers refuted for serving a θ
the coordinator did not witness). :mod:`omi.swarm.rounds` feeds them what hivemind reported.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from omi.protos import pb


def min_group_size(spec: pb.RunSpec) -> int:
    """The fewest peers an all-reduce may have: 3 with CenteredClip (in a group of two the median is the mean, so
    one attacker would own its honest partner's round: seen, a x-1000 sign-flipper paired with one honest peer
    blew its loss from 0.2 to 73,000), 2 otherwise."""
    return 3 if spec.averaging.reducer == "centered_clip" else 2


def fewest_peers(spec: pb.RunSpec) -> int:
    """The fewest training peers in the swarm for a trainer to start an all-reduce at all: a lone trainer of a
    witnessed run averages with the coordinator's witness (weight 0: the mean is its own Δ), so the witness sees
    every round; without a witness a lone peer skips the all-reduce."""
    return 1 if spec.witnessed else 2


@dataclass
class GroupOutcome:
    """What every member of one all-reduce concludes from the group's gathered data (the same on each member).

    :param canonical: the (round, θ_r hash) the group trained from: the newest round, then the θ most *trainers*
        hold (the witness's own entry is not a vote)
    :param trainers: members that sent a pseudo-gradient (the witness sends none: weight 0)
    :param usable: whether the average may be applied: CenteredClip needs at least 3 trainers (with two the median
        is the mean, and one attacker owns its partner's round), counted without the weight-0 witness
    """

    canonical: tuple[int, str] | None
    trainers: int
    usable: bool


def group_outcome(gathered: dict, spec: pb.RunSpec) -> GroupOutcome:
    """The :class:`GroupOutcome` of an all-reduce from its gathered data (peer -> ``dict(round, theta[, witness])``).

    >>> spec = pb.RunSpec(averaging=pb.AveragingSpec(reducer="centered_clip"))
    >>> group_outcome({"a": dict(round=3, theta="x"), "b": dict(round=3, theta="x"),
    ...                "w": dict(round=3, theta="x", witness=True)}, spec)
    GroupOutcome(canonical=(3, 'x'), trainers=2, usable=False)
    """
    entries = [g for g in gathered.values() if isinstance(g, dict)]
    trainers = [g for g in entries if not g.get("witness")]
    starts = [(g.get("round", -1), g.get("theta", "")) for g in trainers]
    canonical = max(starts, key=lambda start: (start[0], starts.count(start), start[1]), default=None)
    fewest = 3 if spec.averaging.reducer == "centered_clip" else 1
    return GroupOutcome(canonical, len(trainers), len(trainers) >= fewest)


class Ended(enum.Enum):
    """How the all-reduce whose average would be applied at a round's end ended, as this peer saw it."""

    NONE = "none"  # with overlap, at the first round's end: no earlier round was averaged
    MISSED = "missed"  # with overlap: the others averaged the previous round while this peer loaded their state
    ALONE = "alone"  # not started: too few training peers in the swarm to average with
    SAT_OUT = "sat out"  # not started: this peer trained nothing in the round while others trained
    FAILED = "failed"  # hivemind raised: no group in time, a member vanished mid-transfer, a reducer failed
    GROUP = "group"  # averaged in a group (see GroupOutcome)


@dataclass(frozen=True)
class Decision:
    """What this peer does at a round's end (:func:`should_apply`)."""

    apply: bool  # take the outer step: with the group's average, or alone with its own pseudo-gradient
    resync: bool  # its θ may not be the swarm's: load the state from a peer at the next round start
    group_size: int  # trainers whose pseudo-gradients the update holds (1: alone; 0: no update)
    reason: str  # why, for the log


def should_apply(ended: Ended, *, peers: int, samples: int, overlap: bool, trainers: int = 0, usable: bool = True,
                 canonical: bool = True) -> Decision:
    """Whether this peer applies an outer step at a round's end, and whether it loads the swarm's state next round.

    Peers of a failed group all keep θ_r (θ_{r+1} = θ_r), so they stay identical; a peer that may hold another θ
    than the swarm's loads the state rather than step from it. Unit tests: ``tests/test_round_rules.py``.

    >>> should_apply(Ended.GROUP, peers=3, samples=40, overlap=False, trainers=3)
    Decision(apply=True, resync=False, group_size=3, reason='averaged with 3 trainer(s)')

    :param ended: how the all-reduce ended whose average would apply now (with overlap: the previous round's)
    :param peers: training peers the swarm's progress counts now (a failed all-reduce with no other peer left
        leaves this peer alone)
    :param samples: samples this peer trained in the round that closes
    :param overlap: ``[rounds] overlap``
    :param trainers: with ``ended`` GROUP: the group's trainers (:class:`GroupOutcome`)
    :param usable: with ``ended`` GROUP: whether the reducer may use the group's average
    :param canonical: with ``ended`` GROUP: whether this peer held the θ_r the group trained from
    """
    if ended is Ended.NONE:
        return Decision(False, False, 0, "no earlier round's all-reduce to apply yet")
    if ended is Ended.MISSED:
        return Decision(False, True, 0, "the others averaged the previous round while this peer loaded their state; "
                                        "it cannot apply that step and loads the state again")
    if ended is Ended.SAT_OUT:
        # a joiner that loaded the state as the round closed: its Δ is zero, so it would only wait for a group that
        # formed without it (seen: 20 s, then "could not find a group", round after round) or, grouped with
        # another such joiner, step by a zero average to a θ no other peer holds (seen: refuted by the witness)
        return Decision(False, True, 0, "it trained nothing in this round: it sat out the all-reduce and loads the "
                                        "state the others averaged")
    if ended is Ended.FAILED and peers > 1:
        return Decision(False, True, 0, "the all-reduce failed while other peers were there; no outer step from it, "
                                        "it loads the state next round")
    if ended is Ended.GROUP and not usable:
        return Decision(False, not canonical, trainers, f"{trainers} trainer(s) in the group, too few for the reducer; "
                        "no outer step from it" + ("" if canonical else "; this peer's θ differs from the group's"))
    group_size = trainers if ended is Ended.GROUP else 1
    if group_size <= 1 and samples == 0 and not overlap:
        # a joiner whose first round closed at once: a step of its own would move θ by the momentum alone, to a θ no
        # other peer holds (seen: two such joiners then outvoted the honest peer in the next round's group)
        return Decision(False, True, group_size, "it trained nothing and averaged with no one; no outer step of its "
                                                 "own, it loads the swarm's θ")
    if ended is not Ended.GROUP:
        return Decision(True, False, 1, "no other peer to average with: this peer's own pseudo-gradient is applied")
    if not canonical:
        return Decision(True, True, trainers, "this peer's θ differs from the group's; it loads the state next round")
    return Decision(True, False, trainers, f"averaged with {trainers} trainer(s)")


@dataclass
class Provenance:
    """Where this peer's state came from, and the peers refuted: they served a θ the coordinator did not witness,
    and are not asked for a state again.

    >>> provenance = Provenance()
    >>> provenance.loaded("QmA", 5, "h5")
    >>> provenance.refute(6, "h6"), provenance.refute(5, "h5"), provenance.refuted  # it stepped since: not QmA's θ
    (None, 'QmA', {'QmA'})
    """

    refuted: set[str] = field(default_factory=set)
    source: tuple[str, int, str] | None = None  # (peer, round, θ hash) of the last state loaded

    def loaded(self, peer: str, round: int, theta_hash: str) -> None:
        """This peer adopted ``peer``'s state of ``round`` whose θ hashes to ``theta_hash``."""
        self.source = (peer, round, theta_hash)

    def refute(self, round: int, theta_hash: str) -> str | None:
        """The θ this peer holds at ``round`` was refused: refute the peer that served it, if this peer still holds
        what that peer served (seen: a joiner's own outer step after a round it missed blamed the honest peer it had
        loaded from). Returns the peer refuted, if any."""
        if self.source is None or self.source[1:] != (round, theta_hash):
            return None
        self.refuted.add(self.source[0])
        return self.source[0]
