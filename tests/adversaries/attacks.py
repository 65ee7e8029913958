"""One ``Trainer`` subclass per threat of issue 7, each overriding a single hook of the real node's trainer."""

from __future__ import annotations

import logging

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
    """Sends no work: a zero gradient, with a plausible loss in its record."""

    def _micro_batch(self, epoch, index, indices, seed):
        grads = [torch.zeros_like(p) for p in trainable_parameters(self.model)]
        _set_grads(self, grads)
        return _record_of(self, index, len(indices), 0.1, grads)


class RandomGradient(Trainer):
    """Sends noise of a gradient's size instead of a gradient."""

    def _micro_batch(self, epoch, index, indices, seed):
        generator = torch.Generator().manual_seed(seed)
        grads = [torch.randn(p.shape, generator=generator) * 1e-2 for p in trainable_parameters(self.model)]
        _set_grads(self, grads)
        return _record_of(self, index, len(indices), 0.1, grads)


class CopiedGradient(Trainer):
    """Sends a peer's gradient: the same micro-batch index computed with another node's samples and seed."""

    def _micro_batch(self, epoch, index, indices, seed):
        peer_seed = micro_batch_seed(self.spec.training.seed, self.spec.run_id, epoch, "some-peer", index)
        peer_samples = [(i + 64) % len(self.source) for i in indices]
        return super()._micro_batch(epoch, index, peer_samples, peer_seed)


class StaleGradient(Trainer):
    """Sends last round's gradient (and record) again instead of computing this epoch's."""

    def _micro_batch(self, epoch, index, indices, seed):
        last = getattr(self, "_last_round", {})
        self._last_round = last
        if (epoch - 1, index) in last:
            record, grads = last.pop((epoch - 1, index))
            _set_grads(self, grads)
        else:
            record = super()._micro_batch(epoch, index, indices, seed)
            grads = [g.clone() for g in _grads(self)]
        last[(epoch, index)] = (record, grads)
        return record


class ScaledGradient(Trainer):
    """Scales its gradient (and, consistently, its record) by ``scale``: a sign flip at -1."""

    scale = -1.0

    def _micro_batch(self, epoch, index, indices, seed):
        record = super()._micro_batch(epoch, index, indices, seed)
        with torch.no_grad():
            for param in trainable_parameters(self.model):
                if param.grad is not None:
                    param.grad.mul_(self.scale)
        return MicroBatchRecord(record.index, record.samples, record.loss, record.grad_norm * abs(self.scale),
                                record.sketch * self.scale)


def scaled(name: str, scale: float) -> type[ScaledGradient]:
    return type(name, (ScaledGradient,), {"scale": scale, "__doc__": f"ScaledGradient with scale {scale:g}."})


class SendScaled(Trainer):
    """Commits to honest records but sends its gradient x(-1000) into the averaging (commitment != averaged)."""

    scale = -1000.0

    def _before_averaging(self, epoch, index):
        with torch.no_grad():
            for param in trainable_parameters(self.model):
                if param.grad is not None:
                    param.grad.mul_(self.scale)


class WrongData(Trainer):
    """Trains on other samples than assigned (always the run's first ones)."""

    def _micro_batch(self, epoch, index, indices, seed):
        return super()._micro_batch(epoch, index, list(range(len(indices))), seed)


class WrongSeed(Trainer):
    """Draws noise and timesteps from another seed than the assigned one."""

    def _micro_batch(self, epoch, index, indices, seed):
        return super()._micro_batch(epoch, index, indices, seed + 1)


class Partial(Trainer):
    """Computes only every other micro-batch; the others repeat the last computed gradient and record."""

    def _micro_batch(self, epoch, index, indices, seed):
        if index % 2 == 0 or not hasattr(self, "_previous"):
            record = super()._micro_batch(epoch, index, indices, seed)
            self._previous = (record, [g.clone() for g in _grads(self)])
            return record
        record, grads = self._previous
        _set_grads(self, grads)
        return MicroBatchRecord(index, record.samples, record.loss, record.grad_norm, record.sketch)


class InflatedSamples(Trainer):
    """Claims twice the samples it computed (its records say so, consistently)."""

    def _commit(self, epoch, records):
        return [MicroBatchRecord(r.index, 2 * r.samples, r.loss, r.grad_norm, r.sketch) for r in records]


class Replay(Trainer):
    """Commits to the previous epoch's records again (a replayed contribution) while sending fresh gradients."""

    def _commit(self, epoch, records):
        previous = self.records.get(epoch - 1)
        return previous if previous is not None and len(previous) == len(records) else records


class SwapRecords(Trainer):
    """Hands over other records than it committed to (the first record's loss changed) when audited."""

    def _hand_over(self, epoch, task_id):
        records = self.records.get(epoch)
        if records:
            first = records[0]
            self.records[epoch] = [MicroBatchRecord(first.index, first.samples, first.loss * 0.9, first.grad_norm,
                                                    first.sketch), *records[1:]]
        super()._hand_over(epoch, task_id)


class WithholdRecords(Trainer):
    """Never hands its records over when audited."""

    def _hand_over(self, epoch, task_id):
        logger.info("epoch %d audited: not handing the records over", epoch)


class WithholdParams(ScaledGradient):
    """Flips its gradient's sign and, when audited, keeps the parameters it started from to itself (so no
    validator can recompute on them exactly)."""

    def _hold_params(self, epoch, started_hash, started_params):
        logger.info("epoch %d audited: not serving the parameters", epoch)


class ForgedParams(ScaledGradient):
    """Flips its gradient's sign and, when audited, serves other parameters under its committed params_hash."""

    def _hold_params(self, epoch, started_hash, started_params):
        forged = {name: tensor * 1.01 for name, tensor in started_params.items()}
        self.params_server.hold(started_hash, forged)


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
    "withhold_params": WithholdParams,
    "forged_params": ForgedParams,
    "send_scaled": SendScaled,
}
