"""A ``WorkAssignment`` → the samples of each micro-batch, as the node walks them and a validator replays them.

>>> assignment = pb.WorkAssignment(shards=[pb.ShardRange(shard_id=0, start=0, end=6)], seed=3)
>>> order = assignment_indices(assignment)
>>> sorted(order)
[0, 1, 2, 3, 4, 5]
>>> batches = micro_batches(order, 4)
>>> next(batches) == micro_batch_samples(assignment, 0, 4), next(batches) == micro_batch_samples(assignment, 1, 4)
(True, True)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from omi.protos import pb


def assignment_indices(assignment: pb.WorkAssignment) -> list[int]:
    """The sample indices of an assignment in a seeded order (every node shuffles its shards differently)."""
    indices = [i for shard in assignment.shards for i in range(shard.start, shard.end)]
    generator = torch.Generator().manual_seed(int(assignment.seed) & (2**63 - 1))
    return [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]


def micro_batches(indices: list[int], size: int) -> Iterator[list[int]]:
    """Consecutive micro-batches of ``size`` samples, wrapping around the assignment if the round lasts longer
    (none for an empty assignment)."""
    if not indices:
        return
    position = 0
    while True:
        yield [indices[(position + k) % len(indices)] for k in range(size)]
        position += size


def micro_batch_samples(assignment: pb.WorkAssignment, index: int, size: int) -> list[int]:
    """Sample indices of micro-batch ``index`` of ``size`` samples, as :func:`micro_batches` walks them."""
    order = assignment_indices(assignment)
    return [order[(index * size + k) % len(order)] for k in range(size)]
