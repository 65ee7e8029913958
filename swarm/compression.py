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
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
from hivemind.compression import CompressionBase, Float16Compression, NoCompression, ScaledFloat16Compression
from hivemind.compression.quantization import Quantile8BitQuantization, Uniform8BitQuantization
from hivemind.proto import runtime_pb2
from omi.swarm.upstream import FixedExtract, register_decoders


class Uniform8Bit(FixedExtract, Uniform8BitQuantization):
    """hivemind's uniform 8-bit quantization (±6σ in 256 bins, each bin decoded to its mean) that decodes."""


class Quantile8Bit(FixedExtract, Quantile8BitQuantization):
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
    one format byte, the gaps between consecutive positions and the values. The format byte's low 7 bits are the
    width of the gaps: 0 for LEB128 varints; 2 or 4 for fixed uint16 / uint32, which older peers sent and which
    still decode. Its high bit (``VALUES_4BIT``) says the values are 4-bit codes packed two per byte
    (:class:`Sparse4Bit`); without it they are int8. At density d ≥ 1 % almost every gap is below 128, one varint
    byte, so that is about ``d × 2`` bytes per element instead of 4 (``d × 1.5`` with 4-bit values). hivemind's
    wire format has a closed set of compression types; both widths travel in the ``BLOCKWISE_8BIT`` slot, which
    hivemind reserves for bitsandbytes (not installed, not used here), and this class decodes both.

    >>> from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    >>> x = torch.zeros(1000); x[[3, 10, 999]] = torch.tensor([0.5, -1.0, 0.25])
    >>> y = deserialize_torch_tensor(serialize_torch_tensor(x, Sparse8Bit().compression_type))
    >>> y.nonzero().flatten().tolist(), bool((x - y).abs().max() <= 1.0 / 254)
    ([3, 10, 999], True)
    """

    compression_type = runtime_pb2.CompressionType.BLOCKWISE_8BIT
    HEADER = 13  # bytes: count (int64), scale (float32), format
    VALUES_4BIT = 0x80  # the format byte's bit for 4-bit values, two per byte
    levels = 127  # the largest code: codes lie in [-levels, levels]
    format = 0  # the format byte this class writes: varint gaps, int8 values

    def scale(self, values: torch.Tensor) -> float:
        """The step between two codes: ``max |v| / levels``."""
        return float(values.abs().max()) / self.levels if len(values) else 0.0

    def compress(self, tensor: torch.Tensor, info, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        flat = tensor.detach().reshape(-1).to(torch.float32)
        positions = torch.nonzero(flat).reshape(-1)
        values = flat[positions]
        scale = self.scale(values)
        codes = (torch.round(values / scale).clamp(-self.levels, self.levels).to(torch.int8) if scale > 0
                 else torch.zeros(0, dtype=torch.int8))
        positions, codes = positions[codes != 0], codes[codes != 0]  # below half a step: zero
        gaps = np.diff(positions.numpy(), prepend=-1)
        buffer = b"".join([np.array([len(positions)], dtype=np.int64).tobytes(), np.float32(scale).tobytes(),
                           np.uint8(self.format).tobytes(), _varints(gaps), self.pack(codes.numpy())])
        return runtime_pb2.Tensor(compression=self.compression_type, buffer=buffer, size=tensor.shape,
                                  dtype=str(tensor.dtype).removeprefix("torch."), requires_grad=tensor.requires_grad)

    def pack(self, codes: np.ndarray) -> bytes:
        """The message body's values."""
        return codes.tobytes()

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer, numel = serialized_tensor.buffer, math.prod(serialized_tensor.size)
        if len(buffer) < self.HEADER:
            raise ValueError(f"a sparse tensor message of {len(buffer)} bytes is shorter than its "
                             f"{self.HEADER}-byte header")
        count = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        scale = float(np.frombuffer(buffer, offset=8, count=1, dtype=np.float32)[0])
        width, four_bit = buffer[12] & ~self.VALUES_4BIT, bool(buffer[12] & self.VALUES_4BIT)
        if not 0 <= count <= numel or width not in (0, 2, 4):
            raise ValueError(f"a sparse tensor message of {numel} entries says it holds {count} with gap width "
                             f"{width}: expected at most {numel} and width 0, 2 or 4")
        data = np.frombuffer(buffer, offset=self.HEADER, dtype=np.uint8)
        if width == 0:
            gaps, used = _read_varints(data, count)
        else:
            used = count * width
            if len(data) < used:
                raise ValueError(f"a sparse tensor message holds {len(data)} bytes of its {used} bytes of gaps")
            gaps = data[:used].view({2: np.uint16, 4: np.uint32}[width])
        codes = _unpack_4bit(data[used:], count) if four_bit else data[used:used + count].view(np.int8)
        if len(codes) < count:
            raise ValueError(f"a sparse tensor message holds {len(codes)} of its {count} values")
        positions = np.cumsum(gaps.astype(np.int64)) - 1
        if count and (positions[-1] >= numel or (gaps == 0).any()):
            raise ValueError(f"a sparse tensor message of {numel} entries names position {positions[-1]} "
                             "or the same position twice")
        out = torch.zeros(numel, dtype=torch.float32)
        out[torch.from_numpy(positions)] = torch.from_numpy(codes.astype(np.float32)) * scale
        return out.reshape(tuple(serialized_tensor.size)).to(getattr(torch, serialized_tensor.dtype))

    def estimate_compression_ratio(self, info) -> float:
        return 0.1  # only sizes the parts hivemind splits tensors into

    def part_values(self, element_size: int = 4) -> int:
        """How many values of a tensor one message carries: hivemind's ``TensorPartContainer`` splits every tensor
        into parts of ``part_size_bytes / (element size × estimate_compression_ratio)`` values, computed as here."""
        return int(DEFAULT_PART_SIZE_BYTES / (element_size * self.estimate_compression_ratio(None)))


class Sparse4Bit(Sparse8Bit):
    """:class:`Sparse8Bit` with 4-bit values: codes in [-7, 7], two per byte, one scale per message.

    One scale per message (a message is one part of one tensor, see :meth:`part_values`), symmetric, ``max |v| /
    7``: the codes of top-k entries of a tensor are spread by the tensor's own largest entry, and a per-message
    float32 is 4 bytes against the ~1.5 bytes per entry of the body. Zero needs no code (zeros are not sent), but
    entries below half a step are dropped like zeros; under :class:`TopKErrorFeedback` with this codec they, and
    every rounding error, stay in the residual. The scale is rounded up to 21 significant bits, so that ``7 ×
    scale`` and every ``code × scale`` are exact in float32: encoding what a receiver decoded gives back the same
    message, bit for bit, which is what lets the feedback quantize before the all-reduce does.

    >>> x = torch.tensor([0.0, 0.875, 0.0, -0.4, 0.03])
    >>> codec = Sparse4Bit()
    >>> y = codec.extract(codec.compress(x, None))
    >>> y.tolist(), torch.equal(codec.extract(codec.compress(y, None)), y)  # a step of 0.125: 0.03 rounds to 0
    ([0.0, 0.875, 0.0, -0.375, 0.0], True)
    """

    levels = 7
    format = Sparse8Bit.VALUES_4BIT  # varint gaps, 4-bit values

    def scale(self, values: torch.Tensor) -> float:
        bits = np.array([super().scale(values)], dtype=np.float32).view(np.uint32)
        rounded = (bits | np.uint32(7)) + np.uint32(1) if bits[0] & 7 else bits  # up to 21 significant bits
        return float(rounded.view(np.float32)[0])

    def pack(self, codes: np.ndarray) -> bytes:
        """Two codes per byte, the first in the low nibble (an odd count ends with a zero nibble)."""
        nibbles = np.append(codes, np.int8(0)) if len(codes) % 2 else codes
        nibbles = nibbles.astype(np.uint8) & np.uint8(0x0F)
        return (nibbles[0::2] | (nibbles[1::2] << np.uint8(4))).tobytes()

    def decoded(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as a receiver decodes it, in messages of :meth:`part_values` values as hivemind splits it."""
        flat = tensor.detach().reshape(-1).to(torch.float32)
        parts = [self.extract(self.compress(part, None)) for part in flat.split(self.part_values())]
        return torch.cat(parts).view_as(tensor)


def _unpack_4bit(data: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` signed 4-bit codes of ``data`` (two per byte, the low nibble first) as int8."""
    pairs = data[:(count + 1) // 2]
    nibbles = np.stack([pairs & 0x0F, pairs >> 4], axis=1).reshape(-1)[:count]
    return ((nibbles ^ 8).astype(np.int8) - 8).astype(np.int8)


class TopKErrorFeedback:
    """Sparsify pseudo-gradients with error feedback (as SparseLoCo and Deep Gradient Compression do).

    Each call keeps, per tensor, the ``density`` share of entries of ``Δ + e`` with the largest magnitude and zeros
    the rest; what was zeroed becomes the new residual ``e``, added to this peer's next pseudo-gradient, so nothing
    this peer trained is lost, only delayed. The residual is this peer's own (it is not part of the swarm state).

    :param density: the share of each tensor's entries sent, in (0, 1] (at least one entry per tensor)
    :param codec: when given, the kept entries are returned as this codec's receivers decode them, and the
      rounding error stays in the residual too: ``e ← (Δ + e) − decoded(sent)``. The codec then sends them
      exactly (:class:`Sparse4Bit` re-encodes what it decoded bit for bit). None: the residual holds only what
      top-k left out, and the codec's rounding is lost (``sparse8bit``, int8).

    >>> feedback = TopKErrorFeedback(0.25)
    >>> feedback([torch.tensor([4.0, -1.0, 0.5, 0.25])])[0].tolist()
    [4.0, 0.0, 0.0, 0.0]
    >>> feedback([torch.tensor([0.0, -1.0, 0.5, 0.25])])[0].tolist()  # -1 + -1 from the residual
    [0.0, -2.0, 0.0, 0.0]
    >>> feedback = TopKErrorFeedback(0.5, codec=Sparse4Bit())
    >>> feedback([torch.tensor([7.0, -3.25, 0.5, 0.25])])[0].tolist(), feedback.residual[0].tolist()
    ([7.0, -3.0, 0.0, 0.0], [0.0, -0.25, 0.5, 0.25])
    """

    def __init__(self, density: float, *, codec: Sparse4Bit | None = None):
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], not {density}")
        self.density = density
        self.codec = codec
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
            if self.codec is not None:
                sparse = self.codec.decoded(sparse)
            e.copy_((total - sparse).view_as(e))
            kept.append(sparse.view_as(d))
        return kept


def top_k_feedback(compression: str, density: float) -> TopKErrorFeedback | None:
    """The error feedback of a run's ``[rounds] compression`` and ``topk_density``; None for dense Δ (density 1).

    ``sparse4bit`` feeds its rounding error back into the residual; ``sparse8bit`` does not (its int8 rounding is
    what the default run was measured with, docs/benchmarks.md "rounds_varint").
    """
    if density >= 1:
        return None
    return TopKErrorFeedback(density, codec=Sparse4Bit() if compression == "sparse4bit" else None)


register_decoders(UNIFORM_8BIT=Uniform8Bit(), QUANTILE_8BIT=Quantile8Bit(),
                  BLOCKWISE_8BIT=Sparse8Bit())  # decodes Sparse4Bit's messages too

COMPRESSIONS: dict[str, Callable[[], CompressionBase]] = {
    "none": NoCompression,
    "float16": Float16Compression,
    "scaled_float16": ScaledFloat16Compression,
    "uniform8bit": Uniform8Bit,
    "sparse8bit": Sparse8Bit,
    "sparse4bit": Sparse4Bit,
}
