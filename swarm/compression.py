"""The compressions a run may put on the wire (``[averaging] compression``, ``[rounds] compression``).

hivemind 1.1.12's 8-bit quantizations cannot decode what they encode with numpy 2: ``Quantization.extract``
reads the codebook length with ``int(np.frombuffer(buffer, count=1, dtype=np.int64))``, which numpy 2 refuses
("only 0-dimensional arrays can be converted to Python scalars"), so every 8-bit all-reduce failed. Importing this
module registers fixed subclasses in hivemind's deserializer table (the receiving side looks the decoder up by the
message's compression type), before any averager process is forked.

>>> import torch
>>> from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
>>> x = torch.linspace(-1, 1, 1000)
>>> y = deserialize_torch_tensor(serialize_torch_tensor(x, COMPRESSIONS["uniform8bit"]().compression_type))
>>> bool((x - y).abs().max() < 0.02)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from hivemind.compression import CompressionBase, Float16Compression, NoCompression, ScaledFloat16Compression
from hivemind.compression import serialization as _serialization
from hivemind.compression.quantization import Quantile8BitQuantization, Uniform8BitQuantization
from hivemind.proto import runtime_pb2


class _FixedExtract:
    """hivemind's ``Quantization.extract`` with the codebook length read as a scalar (numpy 2)."""

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        codebook_size = int(np.frombuffer(serialized_tensor.buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(serialized_tensor.buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(serialized_tensor.buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)


class Uniform8Bit(_FixedExtract, Uniform8BitQuantization):
    """hivemind's uniform 8-bit quantization (±6σ in 256 bins, each bin decoded to its mean) that decodes."""


class Quantile8Bit(_FixedExtract, Quantile8BitQuantization):
    """hivemind's quantile 8-bit quantization that decodes."""


def _varints(values: np.ndarray) -> bytes:
    """Non-negative integers as LEB128 varints (7 bits per byte, high bit: more bytes follow), vectorised.

    >>> _varints(np.array([0, 1, 127, 128, 300])).hex()
    '00017f8001ac02'
    """
    values = np.asarray(values, dtype=np.uint64)
    if len(values) == 0:
        return b""
    lengths = np.ones(len(values), dtype=np.int64)
    for k in range(1, 10):  # a uint64 needs at most 10 bytes
        lengths += values >= np.uint64(1 << (7 * k))
    out = np.zeros(int(lengths.sum()), dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for k in range(int(lengths.max())):
        has = lengths > k
        byte = (values[has] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (lengths[has] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has] + k] = (byte | more).astype(np.uint8)
    return out.tobytes()


def _read_varints(data: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """The first ``count`` LEB128 varints of ``data`` (uint8) and how many bytes they took."""
    if count == 0:
        return np.zeros(0, dtype=np.uint64), 0
    ends = np.flatnonzero(data < 0x80)[:count]  # the last byte of each varint
    if len(ends) < count:
        raise ValueError(f"a sparse tensor message holds {len(ends)} of its {count} positions")
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    values = np.zeros(count, dtype=np.uint64)
    for k in range(int((ends - starts).max()) + 1):
        has = starts + k <= ends
        values[has] |= (data[starts[has] + k].astype(np.uint64) & np.uint64(0x7F)) << np.uint64(7 * k)
    return values, int(ends[-1]) + 1


class Sparse8Bit(CompressionBase):
    """The nonzero entries of a tensor only: their positions and their values in 8 bits.

    For pseudo-gradients sparsified by :class:`TopKErrorFeedback` (``[rounds] topk_density``). The message holds
    the number of entries sent (int64: those not rounded to zero), the value scale (float32: ``max |v| / 127``),
    the width of the position gaps (1 byte: 0 for LEB128 varints; 2 or 4 for fixed uint16 / uint32, which older
    peers sent and which still decode), the gaps between consecutive positions and the values as int8. At density
    d ≥ 1 % almost every gap is below 128, one varint byte, so that is about ``d × 2`` bytes per element instead of
    4 (``d × 3`` with uint16 gaps). hivemind's wire format has a closed set of
    compression types; this one travels in the ``BLOCKWISE_8BIT`` slot, which hivemind reserves for bitsandbytes
    (not installed, not used here).

    >>> from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    >>> x = torch.zeros(1000); x[[3, 10, 999]] = torch.tensor([0.5, -1.0, 0.25])
    >>> y = deserialize_torch_tensor(serialize_torch_tensor(x, Sparse8Bit().compression_type))
    >>> y.nonzero().flatten().tolist(), bool((x - y).abs().max() <= 1.0 / 254)
    ([3, 10, 999], True)
    """

    compression_type = runtime_pb2.CompressionType.BLOCKWISE_8BIT

    def compress(self, tensor: torch.Tensor, info, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        flat = tensor.detach().reshape(-1).to(torch.float32)
        positions = torch.nonzero(flat).reshape(-1)
        values = flat[positions]
        scale = float(values.abs().max()) / 127 if len(values) else 0.0
        quantized = torch.round(values / scale).to(torch.int8) if scale > 0 else torch.zeros(0, dtype=torch.int8)
        positions, quantized = positions[quantized != 0], quantized[quantized != 0]  # below half a step: zero
        gaps = np.diff(positions.numpy(), prepend=-1)
        buffer = b"".join([np.array([len(positions)], dtype=np.int64).tobytes(), np.float32(scale).tobytes(),
                           np.uint8(0).tobytes(), _varints(gaps), quantized.numpy().tobytes()])
        return runtime_pb2.Tensor(compression=self.compression_type, buffer=buffer, size=tensor.shape,
                                  dtype=str(tensor.dtype).removeprefix("torch."), requires_grad=tensor.requires_grad)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        count = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        scale = float(np.frombuffer(buffer, offset=8, count=1, dtype=np.float32)[0])
        width = int(buffer[12])
        if width == 0:
            gaps, used = _read_varints(np.frombuffer(buffer, offset=13, dtype=np.uint8), count)
        else:
            gaps = np.frombuffer(buffer, offset=13, count=count, dtype={2: np.uint16, 4: np.uint32}[width])
            used = gaps.nbytes
        quantized = np.frombuffer(buffer, offset=13 + used, count=count, dtype=np.int8)
        out = torch.zeros(math.prod(serialized_tensor.size), dtype=torch.float32)
        positions = torch.as_tensor(np.cumsum(gaps.astype(np.int64)) - 1)
        out[positions] = torch.as_tensor(quantized, dtype=torch.float32) * scale
        return out.reshape(tuple(serialized_tensor.size)).to(getattr(torch, serialized_tensor.dtype))

    def estimate_compression_ratio(self, info) -> float:
        return 0.1  # only sizes the parts hivemind splits tensors into


class TopKErrorFeedback:
    """Sparsify pseudo-gradients with error feedback (as SparseLoCo and Deep Gradient Compression do).

    Each call keeps, per tensor, the ``density`` share of entries of ``Δ + e`` with the largest magnitude and zeros
    the rest; what was zeroed becomes the new residual ``e``, added to this peer's next pseudo-gradient, so nothing
    this peer trained is lost, only delayed. The residual is this peer's own (it is not part of the swarm state).

    >>> feedback = TopKErrorFeedback(0.25)
    >>> feedback([torch.tensor([4.0, -1.0, 0.5, 0.25])])[0].tolist()
    [4.0, 0.0, 0.0, 0.0]
    >>> feedback([torch.tensor([0.0, -1.0, 0.5, 0.25])])[0].tolist()  # -1 + -1 from the residual
    [0.0, -2.0, 0.0, 0.0]
    """

    def __init__(self, density: float):
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], not {density}")
        self.density = density
        self.residual: list[torch.Tensor] = []

    def __call__(self, delta: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.residual:
            self.residual = [torch.zeros_like(d) for d in delta]
        kept = []
        for d, e in zip(delta, self.residual, strict=True):
            total = (d + e).reshape(-1)
            top = total.abs().topk(max(1, math.ceil(self.density * total.numel())), sorted=False).indices
            sparse = torch.zeros_like(total)
            sparse[top] = total[top]
            e.copy_((total - sparse).view_as(e))
            kept.append(sparse.view_as(d))
        return kept


_serialization._BASE_COMPRESSION_TYPES.update(UNIFORM_8BIT=Uniform8Bit(), QUANTILE_8BIT=Quantile8Bit(),
                                              BLOCKWISE_8BIT=Sparse8Bit())

COMPRESSIONS: dict[str, Callable[[], CompressionBase]] = {
    "none": NoCompression,
    "float16": Float16Compression,
    "scaled_float16": ScaledFloat16Compression,
    "uniform8bit": Uniform8Bit,
    "sparse8bit": Sparse8Bit,
}
