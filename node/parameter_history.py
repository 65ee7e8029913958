"""θ_r a validator holds: the parameters of the last rounds, keyed by their hash, to audit those rounds' work."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from omi.models import params_hash


@dataclass
class Snapshot:
    """The parameters θ_r some peer held at the start of a round."""

    round: int
    params_hash: bytes
    state: dict[str, torch.Tensor]


class ParameterHistory:
    """θ_r of the last ``keep_rounds`` rounds, several per round (one per distinct hash).

    :param keep_rounds: rounds kept (the audit window + 1)
    :param per_round: distinct snapshots kept per round
    """

    def __init__(self, keep_rounds: int, per_round: int = 4):
        self.keep_rounds, self.per_round = keep_rounds, per_round
        self._snapshots: OrderedDict[bytes, Snapshot] = OrderedDict()

    def add(self, round_number: int, model: torch.nn.Module) -> bytes:
        digest = params_hash(model)
        if digest not in self._snapshots:
            state = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}
            self._snapshots[digest] = Snapshot(round_number, digest, state)
        latest = max(s.round for s in self._snapshots.values())
        for key, snap in list(self._snapshots.items()):
            same_round = [s for s in self._snapshots.values() if s.round == snap.round]
            if snap.round <= latest - self.keep_rounds or len(same_round) > self.per_round:
                del self._snapshots[key]
        return digest

    def find(self, digest: bytes, round_number: int) -> tuple[Snapshot | None, bool]:
        """The snapshot with ``digest`` (exact: True), else the newest one of ``round_number`` (False), else None."""
        if digest in self._snapshots:
            return self._snapshots[digest], True
        same = [s for s in self._snapshots.values() if s.round == round_number]
        return (same[-1], False) if same else (None, False)

    def rounds(self) -> list[int]:
        return sorted({s.round for s in self._snapshots.values()})
