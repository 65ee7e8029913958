"""The compressions of pseudo-gradients (omi.swarm.compression): what a receiver decodes, and what top-k keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import CompressionInfo, deserialize_torch_tensor, serialize_torch_tensor
from omi.swarm.compression import COMPRESSIONS, Sparse4Bit, Sparse8Bit, TopKErrorFeedback, top_k_feedback


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


def _message(count: int, scale: float, format: int, body: bytes, size: int) -> object:
    """A sparse tensor message of ``size`` entries, written byte by byte as the docstring of Sparse8Bit says."""
    message = serialize_torch_tensor(torch.zeros(size), Sparse8Bit().compression_type)
    message.buffer = b"".join([np.int64(count).tobytes(), np.float32(scale).tobytes(), np.uint8(format).tobytes(),
                              body])
    return message


def test_sparse8bit_reads_the_varint_int8_messages_of_peers_without_4bit_values():
    # format byte 0: varint gaps, int8 values, as every peer sent before sparse4bit; both classes decode it
    message = _message(3, 0.5, 0, bytes([4, 1, 0xAC, 0x02]) + np.array([10, -127, 64], dtype=np.int8).tobytes(),
                       400)
    for codec in (Sparse8Bit(), Sparse4Bit()):
        decoded = codec.extract(message)
        assert decoded.nonzero().flatten().tolist() == [3, 4, 304]
        assert decoded[[3, 4, 304]].tolist() == [5.0, -63.5, 32.0]


def test_sparse4bit_messages_pack_two_signed_codes_per_byte_low_nibble_first():
    # codes 7, -1, -7 → nibbles 0x7, 0xF, 0x9 (and a zero nibble to fill the last byte)
    message = _message(3, 0.25, Sparse8Bit.VALUES_4BIT, bytes([1, 2, 3]) + bytes([0xF7, 0x09]), 10)
    assert deserialize_torch_tensor(message).tolist() == [1.75, 0, -0.25, 0, 0, -1.75, 0, 0, 0, 0]


def test_sparse4bit_round_trip_is_within_half_a_step_and_exact_on_what_it_decoded():
    generator = torch.Generator().manual_seed(2)
    dense = torch.randn(64, 1001, generator=generator)
    sparse = torch.where(torch.rand(64, 1001, generator=generator) < 0.03, dense, torch.zeros(()))
    codec = Sparse4Bit()
    message = codec.compress(sparse, CompressionInfo.from_tensor(sparse))
    decoded = deserialize_torch_tensor(message)  # by the decoder hivemind looks up: one for both widths
    step = float(sparse.abs().max()) / 7
    assert torch.equal(decoded != 0, sparse.abs() >= step / 2 * (1 + 1e-5))
    assert float((decoded - sparse).abs().max()) <= step / 2 * (1 + 1e-5)
    nonzeros = int((decoded != 0).sum())
    assert message.ByteSize() < 1.55 * nonzeros + 100  # varint gaps + half a byte per value + a small header
    again = codec.compress(decoded, CompressionInfo.from_tensor(decoded))
    assert again.buffer == message.buffer  # what a receiver decoded is sent on exactly: the same bytes

    odd = torch.tensor([0.0, 7.0, -1.0, 0.0, 2.0])  # three codes: the last byte holds one
    assert torch.equal(codec.extract(codec.compress(odd, None)), odd)
    assert torch.equal(codec.extract(codec.compress(torch.zeros(3, 5), None)), torch.zeros(3, 5))
    half = torch.tensor([0.0, 0.875, 0.0, -0.25], dtype=torch.float16)  # a step of 0.125
    decoded = codec.extract(codec.compress(half, None))
    assert decoded.dtype == torch.float16 and decoded.tolist() == [0.0, 0.875, 0.0, -0.25]


@pytest.mark.parametrize("codec", [Sparse8Bit(), Sparse4Bit()], ids=["8bit", "4bit"])
def test_a_bad_or_truncated_sparse_message_is_refused(codec):
    tensor = torch.zeros(1000)
    tensor[[5, 6, 900]] = torch.tensor([1.0, -0.5, 0.25])
    message = codec.compress(tensor, None)
    cases = {
        message.buffer[:10]: "header",
        message.buffer[:-1]: "values",
        message.buffer[:14]: "positions",  # one of three varint gaps
        np.int64(2000).tobytes() + message.buffer[8:]: "entries",  # more entries than the tensor has
        message.buffer[:12] + bytes([message.buffer[12] | 3]) + message.buffer[13:]: "width",
        message.buffer[:15] + bytes([0xFF, 0x7F]) + message.buffer[17:]: "position",  # a gap of 16,383
    }
    for buffer, what in cases.items():
        message.buffer = buffer
        with pytest.raises(ValueError, match=what):
            deserialize_torch_tensor(message)


def test_top_k_with_4bit_values_keeps_their_rounding_error_in_the_residual():
    generator = torch.Generator().manual_seed(3)
    codec = Sparse4Bit()
    feedback = top_k_feedback("sparse4bit", 0.05)
    deltas = [[torch.randn(40, 50, generator=generator), torch.randn(7, generator=generator)] for _ in range(6)]
    sent = [feedback(delta) for delta in deltas]
    received = [[codec.extract(codec.compress(t, None)) for t in round_sent] for round_sent in sent]
    for round_sent, round_received in zip(sent, received, strict=True):
        for t, r in zip(round_sent, round_received, strict=True):
            assert torch.equal(t, r)  # sent exactly: the rounding happened in the feedback
            assert 0 < int((t != 0).sum()) <= max(1, round(0.05 * t.numel()))
    for i in range(2):  # everything trained is received by now or still in the residual, rounding included
        trained = sum(delta[i] for delta in deltas)
        delivered = sum(round_received[i] for round_received in received) + feedback.residual[i]
        assert torch.allclose(trained, delivered, atol=1e-5)
    assert top_k_feedback("sparse8bit", 0.05).codec is None  # the default run's feedback is unchanged
    assert top_k_feedback("sparse4bit", 1.0) is None


def test_4bit_feedback_quantizes_in_the_parts_hivemind_sends():
    # a tensor larger than one part: each part is one message with its own scale, so the feedback must quantize
    # part by part for the averager's messages to be exact
    codec = Sparse4Bit()
    big = torch.randn(codec.part_values() * 2 + 1000, generator=torch.Generator().manual_seed(4))
    big[0] = 1000.0  # one scale for the whole tensor would round every other entry to zero
    (sent,) = TopKErrorFeedback(0.01, codec=codec)([big])
    container = TensorPartContainer([sent], [1.0], compression=codec)
    parts = container.get_raw_input_parts(0)
    assert [len(p) for p in parts] == [codec.part_values(), codec.part_values(), 1000]
    for part in parts:
        assert torch.equal(codec.extract(codec.compress(part, None)), part)
    for part in parts[1:]:  # their own scale: their top entries were not rounded away
        assert int((part != 0).sum()) > 0.005 * len(part)


def test_every_named_compression_decodes_what_it_encodes():
    x = torch.linspace(-1, 1, 4096)
    tolerance = {"sparse4bit": 1 / 14 + 1e-6}  # half a step of max |x| / 7
    for name, compression in COMPRESSIONS.items():
        message = compression().compress(x, CompressionInfo.from_tensor(x))
        assert float((deserialize_torch_tensor(message) - x).abs().max()) < tolerance.get(name, 0.02), name
