"""The compressions of pseudo-gradients (omi.swarm.compression): what a receiver decodes, and what top-k keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from omi.swarm.compression import COMPRESSIONS, Sparse8Bit, TopKErrorFeedback


def _over_the_wire(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    message = serialize_torch_tensor(tensor, Sparse8Bit().compression_type)
    return deserialize_torch_tensor(message), message.ByteSize()


def test_sparse8bit_keeps_positions_exactly_and_values_within_half_a_step():
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 1000, generator=generator)
    sparse = torch.where(torch.rand(64, 1000, generator=generator) < 0.02, dense, torch.zeros(()))
    decoded, size = _over_the_wire(sparse)
    assert decoded.shape == sparse.shape and decoded.dtype == sparse.dtype
    step = float(sparse.abs().max()) / 127
    assert torch.equal(decoded != 0, sparse.abs() >= step / 2)  # what rounds to zero is not sent
    assert float((decoded - sparse).abs().max()) <= step / 2 * (1 + 1e-5)
    nonzeros = int((sparse != 0).sum())
    assert size < 2.1 * nonzeros + 100  # varint gaps (one byte below 128) + int8 values + a small header
    assert size < sparse.numel() * 4 / 50  # ~95x smaller than float32 at 2 %


def test_sparse8bit_handles_wide_gaps_empty_tensors_and_half_precision():
    wide = torch.zeros(200_000)
    wide[[0, 150_000, 199_999]] = torch.tensor([1.0, -2.0, 3.0])  # a gap of 150,000: a 3-byte varint
    decoded, _ = _over_the_wire(wide)
    assert decoded.nonzero().flatten().tolist() == [0, 150_000, 199_999]
    assert torch.allclose(decoded, wide, atol=3 / 254)

    empty, _ = _over_the_wire(torch.zeros(3, 5))
    assert torch.equal(empty, torch.zeros(3, 5))

    half = torch.tensor([0.0, 0.5, 0.0, -0.25], dtype=torch.float16)
    decoded, _ = _over_the_wire(half)
    assert decoded.dtype == torch.float16 and decoded.nonzero().flatten().tolist() == [1, 3]


def test_sparse8bit_reads_the_fixed_width_gaps_older_peers_sent():
    # before varint gaps the message carried uint16 (or uint32) gaps, width byte 2 (4): a mixed swarm still decodes
    for dtype in (np.uint16, np.uint32):
        gaps, values = np.array([4, 1, 300], dtype=dtype), np.array([10, -127, 64], dtype=np.int8)
        width = np.uint8(np.dtype(dtype).itemsize)
        buffer = b"".join([np.int64(3).tobytes(), np.float32(0.5).tobytes(), width.tobytes(), gaps.tobytes(),
                           values.tobytes()])
        message = serialize_torch_tensor(torch.zeros(400), Sparse8Bit().compression_type)
        message.buffer = buffer
        decoded = deserialize_torch_tensor(message)
        assert decoded.nonzero().flatten().tolist() == [3, 4, 304]
        assert decoded[[3, 4, 304]].tolist() == [5.0, -63.5, 32.0]


def test_top_k_error_feedback_loses_nothing_and_sends_k_entries():
    generator = torch.Generator().manual_seed(1)
    feedback = TopKErrorFeedback(0.05)
    deltas = [[torch.randn(40, 50, generator=generator), torch.randn(7, generator=generator)] for _ in range(6)]
    sent = [feedback(delta) for delta in deltas]
    for round_sent in sent:
        assert [int((t != 0).sum()) for t in round_sent] == [100, 1]  # ceil(5 % of 2000), at least one
    for i in range(2):  # everything trained is either sent by now or still in the residual
        trained = sum(delta[i] for delta in deltas)
        delivered = sum(round_sent[i] for round_sent in sent) + feedback.residual[i]
        assert torch.allclose(trained, delivered, atol=1e-5)
    with pytest.raises(ValueError, match="density"):
        TopKErrorFeedback(0.0)


def test_every_named_compression_decodes_what_it_encodes():
    x = torch.linspace(-1, 1, 4096)
    for name, compression in COMPRESSIONS.items():
        message = serialize_torch_tensor(x, compression().compression_type)
        assert float((deserialize_torch_tensor(message) - x).abs().max()) < 0.02, name
