"""One ``Trainer`` subclass per threat of issue 7, each overriding a single hook of the real node's trainer.

Every one of them is caught in rounds by segment audits (tests/test_verification.py): a ``_micro_batch`` attack
gives records or an end state that a replay of its inner steps does not reach, a ``_before_averaging`` attack an end
state the honest steps do not reach, a ``_commit`` or ``_hand_over`` attack records that contradict the commitment,
and a ``_hold_segments`` attack no start state, or one that does not hash to the committed one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omi.models import MicroBatchRecord, micro_batch_seed
from omi.models.microbatch import gradient_segments, trainable_parameters
from omi.node.trainer import Trainer

logger = logging.getLogger(__name__)


def _grads(node: Trainer) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable_parameters(node.model)]


def _set_grads(node: Trainer, grads: list[torch.Tensor]) -> None:
    for param, grad in zip(trainable_parameters(node.model), grads, strict=True):
        param.grad = grad.clone()


def _record_of(node: Trainer, index: int, samples: int, loss: float, grads: list[torch.Tensor]):
    """The record an honest node would write for this gradient (norm and sketch of ``grads``)."""
    params = trainable_parameters(node.model)
    segments = gradient_segments(list(grads), params)
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for _, v in segments])))
    return MicroBatchRecord(index=index, samples=samples, loss=loss, grad_norm=norm,
                            sketch=node.sketch.of_segments(segments))


class Honest(Trainer):
    """The real node, unchanged (the control)."""


class ZeroGradient(Trainer):
    """Does no work: steps on a zero gradient, with a plausible loss in its record."""

    def _micro_batch(self, round_number, index, indices, seed):
        grads = [torch.zeros_like(p) for p in trainable_parameters(self.model)]
        _set_grads(self, grads)
        return _record_of(self, index, len(indices), 0.1, grads)


class RandomGradient(Trainer):
    """Steps on noise of a gradient's size instead of a gradient."""

    def _micro_batch(self, round_number, index, indices, seed):
        generator = torch.Generator().manual_seed(seed)
        grads = [torch.randn(p.shape, generator=generator) * 1e-2 for p in trainable_parameters(self.model)]
        _set_grads(self, grads)
        return _record_of(self, index, len(indices), 0.1, grads)


class CopiedGradient(Trainer):
    """Steps on a peer's gradient: the same micro-batch index computed with another node's samples and seed."""

    def _micro_batch(self, round_number, index, indices, seed):
        peer_seed = micro_batch_seed(self.spec.training.seed, self.spec.run_id, round_number, "some-peer", index)
        peer_samples = [(i + 64) % len(self.source) for i in indices]
        return super()._micro_batch(round_number, index, peer_samples, peer_seed)


class StaleGradient(Trainer):
    """Steps on last round's gradient (and record) again instead of computing this round's."""

    def _micro_batch(self, round_number, index, indices, seed):
        last = getattr(self, "_last_round", {})
        self._last_round = last
        if (round_number - 1, index) in last:
            record, grads = last.pop((round_number - 1, index))
            _set_grads(self, grads)
        else:
            record = super()._micro_batch(round_number, index, indices, seed)
            grads = [g.clone() for g in _grads(self)]
        last[(round_number, index)] = (record, grads)
        return record


class ScaledGradient(Trainer):
    """Scales its gradient (and, consistently, its record) by ``scale``: a sign flip at -1."""

    scale = -1.0

    def _micro_batch(self, round_number, index, indices, seed):
        record = super()._micro_batch(round_number, index, indices, seed)
        with torch.no_grad():
            for param in trainable_parameters(self.model):
                if param.grad is not None:
                    param.grad.mul_(self.scale)
        return MicroBatchRecord(record.index, record.samples, record.loss, record.grad_norm * abs(self.scale),
                                record.sketch * self.scale)


def scaled(name: str, scale: float) -> type[ScaledGradient]:
    return type(name, (ScaledGradient,), {"scale": scale, "__doc__": f"ScaledGradient with scale {scale:g}."})


class SendScaled(Trainer):
    """Commits to honest records but steps on its gradient x(-1000), so the pseudo-gradient it sends into the
    all-reduce is not the one its records give (commitment != averaged)."""

    scale = -1000.0

    def _before_averaging(self, round_number, index):
        with torch.no_grad():
            for param in trainable_parameters(self.model):
                if param.grad is not None:
                    param.grad.mul_(self.scale)


class WrongData(Trainer):
    """Trains on other samples than assigned (always the run's first ones)."""

    def _micro_batch(self, round_number, index, indices, seed):
        return super()._micro_batch(round_number, index, list(range(len(indices))), seed)


class WrongSeed(Trainer):
    """Draws noise and timesteps from another seed than the assigned one."""

    def _micro_batch(self, round_number, index, indices, seed):
        return super()._micro_batch(round_number, index, indices, seed + 1)


class Partial(Trainer):
    """Computes only every other micro-batch; the others repeat the last computed gradient and record."""

    def _micro_batch(self, round_number, index, indices, seed):
        if index % 2 == 0 or not hasattr(self, "_previous"):
            record = super()._micro_batch(round_number, index, indices, seed)
            self._previous = (record, [g.clone() for g in _grads(self)])
            return record
        record, grads = self._previous
        _set_grads(self, grads)
        return MicroBatchRecord(index, record.samples, record.loss, record.grad_norm, record.sketch)


class InflatedSamples(Trainer):
    """Claims twice the samples it computed (its records say so, consistently)."""

    def _commit(self, round_number, records):
        return [MicroBatchRecord(r.index, 2 * r.samples, r.loss, r.grad_norm, r.sketch) for r in records]


class Replay(Trainer):
    """Commits to the previous round's records again (a replayed contribution) while training on fresh gradients."""

    def _commit(self, round_number, records):
        previous = self.records.get(round_number - 1)
        return previous if previous is not None and len(previous) == len(records) else records


class SwapRecords(Trainer):
    """Hands over other records than it committed to (the first record's loss changed) when audited."""

    def _hand_over(self, round_number, task_id):
        records = self.records.get(round_number)
        if records:
            first = records[0]
            changed = MicroBatchRecord(first.index, first.samples, first.loss * 0.9, first.grad_norm, first.sketch)
            self.records[round_number] = [changed, *records[1:]]
        super()._hand_over(round_number, task_id)


class WithholdRecords(Trainer):
    """Never hands its records over when audited."""

    def _hand_over(self, round_number, task_id):
        logger.info("round %d audited: not handing the records over", round_number)


class WithholdStates(Trainer):
    """Trains honestly but, when audited, keeps its round's training states to itself (so no validator can replay
    a segment from them)."""

    def _hold_segments(self, round_number, segments):
        logger.info("round %d audited: not serving the training states", round_number)


class ForgedStates(Trainer):
    """Trains honestly but, when audited, serves other training states (parameters x1.01) under the committed
    hashes."""

    def _hold_segments(self, round_number, segments):
        from safetensors.torch import load_file

        for digest, held in segments.items():
            state = load_file(str(held)) if isinstance(held, Path) else held
            forged = {name: t * 1.01 if t.is_floating_point() else t for name, t in state.items()}
            self.params_server.hold(digest, forged)


HONEST = Honest
# name -> class; the threat model of issue 7, one behaviour changed each
ATTACKS: dict[str, type[Trainer]] = {
    "zero": ZeroGradient,
    "random": RandomGradient,
    "copied": CopiedGradient,
    "stale": StaleGradient,
    "sign_flip": scaled("SignFlip", -1.0),
    "flip_1000": scaled("Flip1000", -1000.0),
    "scale_10": scaled("Scale10", 10.0),
    "scale_0_1": scaled("Scale01", 0.1),
    "wrong_data": WrongData,
    "wrong_seed": WrongSeed,
    "partial": Partial,
    "inflated": InflatedSamples,
    "replay": Replay,
    "swap_records": SwapRecords,
    "withhold_records": WithholdRecords,
    "withhold_states": WithholdStates,
    "forged_states": ForgedStates,
    "send_scaled": SendScaled,
}
