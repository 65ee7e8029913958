"""Segments of a round: a node's training state every k inner steps, hashed, and the replay of one segment.

Within a round the parameters move with every inner step, so a micro-batch can be
recomputed only from the state the node held right before it: its parameters *and* its inner optimizer's moments.
A node therefore commits, in its contribution, to the hash of its **training state** (parameters + AdamW state,
:func:`training_state`) at the start of the round and after every ``k`` inner steps; a validator that gets the
start state of one segment (hash-checked) replays its ``k`` inner steps with the node's samples and seeds
(:func:`replay_segment`) and must reach both the node's records and the committed end state.

Both sides compute the same thing with these functions, so on the same device and thread count an honest
segment replays bitwise.

>>> model = torch.nn.Linear(3, 1)
>>> optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
>>> state = training_state(model, optimizer)
>>> sorted(state)  # no optimizer statistics before the first step
['bias', 'weight']
>>> model(torch.ones(1, 3)).sum().backward(); optimizer.step()
>>> sorted(training_state(model, optimizer))  # doctest: +NORMALIZE_WHITESPACE
['bias', 'bias|exp_avg', 'bias|exp_avg_sq', 'bias|step', 'weight', 'weight|exp_avg', 'weight|exp_avg_sq',
 'weight|step']
>>> training_state_hash(training_state(model, optimizer)) != training_state_hash(state)
True
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omi.models.data import DataSource
from omi.models.microbatch import GradientSketch, MicroBatchRecord
from omi.models.replay import recompute
from omi.protos import pb

SPILL_BYTES = 256 << 20  # a training state larger than this is kept on disk, not in memory (RoundStates)
SEPARATOR = "|"  # between a parameter's name and the name of one of its optimizer statistics
DEFAULT_SEGMENT_STEPS = 5  # a RunSpec built in code without verification.segment_steps


def segment_steps(spec: pb.RunSpec) -> int:
    """Inner steps between two committed training states of a round (``verification.segment_steps``)."""
    return spec.verification.segment_steps or DEFAULT_SEGMENT_STEPS


def held_states(spec: pb.RunSpec) -> int:
    """How many audited states a node keeps for validators: each audited round's training states in the audit window
    (one every ``segment_steps`` of up to 2H inner steps, and the start and end).

    >>> held_states(pb.RunSpec(rounds=pb.RoundsSpec(inner_steps=20), verification=pb.VerificationSpec(
    ...     audit_window_rounds=5, segment_steps=2)))
    132
    """
    per_round = 2 * spec.rounds.inner_steps // max(segment_steps(spec), 1) + 2
    return (spec.verification.audit_window_rounds + 1) * per_round


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The model's parameters (by name) and, for each, its optimizer statistics (``name|exp_avg``, ...), copied to
    the CPU."""
    state = {}
    names = {id(p): name for name, p in model.named_parameters()}
    for name, param in model.named_parameters():
        state[name] = param.detach().to("cpu", copy=True)
    for param, statistics in optimizer.state.items():
        for key, value in statistics.items():
            if isinstance(value, torch.Tensor):
                state[f"{names[id(param)]}{SEPARATOR}{key}"] = value.detach().to("cpu", copy=True)
    return state


def training_state_hash(state: dict[str, torch.Tensor]) -> bytes:
    """SHA-256 over every tensor of a training state in name order, with its name, dtype and shape."""
    digest = hashlib.sha256(b"omi-training-state-v1")
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        header = f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode()
        digest.update(struct.pack("<I", len(header)) + header)
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.digest()


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class RoundStates:
    """The training states a node commits to in one round (start, every k inner steps, end), kept until it learns
    whether the round is audited: in memory, or as safetensors files in ``folder`` once one state is larger than
    ``spill_bytes`` (a 0.6 B model with AdamW is ~7 GB per state, a round holds H/k + 1 of them).

    >>> states = RoundStates(folder=None)
    >>> digest = states.add({"w": torch.zeros(2)})
    >>> states.hashes == [digest] and isinstance(states.held(digest), dict)
    True

    :param folder: where spilled states go (a temporary folder of this round is made in it); None: in memory only
    :param spill_bytes: states larger than this go to disk when ``folder`` is set
    """

    def __init__(self, folder: Path | None, spill_bytes: int = SPILL_BYTES):
        self.folder, self.spill_bytes = folder, spill_bytes
        self._held: dict[bytes, dict[str, torch.Tensor] | Path] = {}
        self.hashes: list[bytes] = []  # in the order they were taken (the contribution's segment_hashes)
        self._dir: Path | None = None

    @staticmethod
    def clean(folder: Path) -> None:
        """Delete the rounds' states a node killed mid-round left in ``folder``."""
        for stale in folder.glob("round-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def add(self, state: dict[str, torch.Tensor]) -> bytes:
        """Keep ``state``; returns its :func:`training_state_hash`."""
        from safetensors.torch import save_file

        digest = training_state_hash(state)
        self.hashes.append(digest)
        if digest in self._held:
            return digest
        if self.folder is not None and state_bytes(state) > self.spill_bytes:
            if self._dir is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._dir = Path(tempfile.mkdtemp(prefix="round-", dir=self.folder))
            path = self._dir / f"{digest.hex()}.safetensors"
            save_file({name: t.contiguous() for name, t in state.items()}, str(path))
            self._held[digest] = path
        else:
            self._held[digest] = state
        return digest

    def held(self, digest: bytes) -> dict[str, torch.Tensor] | Path:
        """The state with ``digest``: the tensors, or the safetensors file they were spilled to."""
        return self._held[digest]

    def items(self) -> Iterator[tuple[bytes, dict[str, torch.Tensor] | Path]]:
        return iter(list(self._held.items()))

    def release(self, digest: bytes) -> None:
        """Forget ``digest`` without deleting its file (whoever took the file owns it now)."""
        self._held.pop(digest, None)

    def hand_over(self, server) -> None:
        """Give every state to ``server`` (an :class:`omi.swarm.params_p2p.ParamsServer`): tensors are copied, a
        spilled file is taken over by the server (which deletes it when it drops it)."""
        for digest, held in self.items():
            if isinstance(held, Path):
                server.hold_file(digest, held)
                self.release(digest)
            else:
                server.hold(digest, held)

    def discard(self) -> None:
        """Drop every state still held; spilled files are deleted."""
        for held in self._held.values():
            if isinstance(held, Path):
                held.unlink(missing_ok=True)
        self._held.clear()
        if self._dir is not None:
            try:
                os.rmdir(self._dir)
            except OSError:  # files handed over to a server still live there
                pass


def load_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict[str, torch.Tensor]) -> None:
    """Put a :func:`training_state` into ``model`` and ``optimizer`` (whose statistics are replaced)."""
    params = dict(model.named_parameters())
    unknown = {name.split(SEPARATOR)[0] for name in state} - set(params)
    if unknown or any(name not in state for name in params):
        raise ValueError(f"the state does not fit the model (unknown: {sorted(unknown)[:3]})")
    optimizer.state.clear()
    with torch.no_grad():
        for name, tensor in state.items():
            base, _, key = name.partition(SEPARATOR)
            param = params[base]
            if not key:
                param.copy_(tensor.to(param.device, param.dtype))
            else:
                device = "cpu" if key == "step" else param.device
                optimizer.state[param][key] = tensor.to(device, copy=True)


@dataclass
class SegmentStep:
    """One inner step of a segment: the micro-batch's index in the round, its samples and its seed."""

    index: int
    samples: Sequence[int]
    seed: int


def replay_segment(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, source: DataSource,
                   steps: Sequence[SegmentStep], *, prediction_type: str,
                   sketch: GradientSketch | None) -> list[MicroBatchRecord]:
    """Replay inner steps from the state ``model`` and ``optimizer`` hold: each recomputes its micro-batch (its
    record is returned) and takes the optimizer step, as the node's round does (``RoundOptimizer.inner_step``)."""
    records = []
    for step in steps:
        record = recompute(model, scheduler, source, step.samples, step.seed, prediction_type, sketch,
                           index=step.index, keep_grad=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        records.append(record)
    return records
