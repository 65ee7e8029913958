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


_serialization._BASE_COMPRESSION_TYPES.update(UNIFORM_8BIT=Uniform8Bit(), QUANTILE_8BIT=Quantile8Bit())

COMPRESSIONS: dict[str, Callable[[], CompressionBase]] = {
    "none": NoCompression,
    "float16": Float16Compression,
    "scaled_float16": ScaledFloat16Compression,
    "uniform8bit": Uniform8Bit,
}
