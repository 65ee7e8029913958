"""Diffusion models, data sources, the micro-batch function and the quality score.

One import place for the rest of the project::

    from omi.models import build_model, open_source, compute_micro_batch, micro_batch_seed, GradientSketch
"""

from omi.models.commitment import MerkleProof, merkle_proof, merkle_root, record_bytes, verify_proof
from omi.models.data import DataSource, DataSourceError, open_source
from omi.models.device import pick_device
from omi.models.microbatch import (
    GradientSketch,
    MicroBatchRecord,
    compute_micro_batch,
    micro_batch_seed,
    params_hash,
)
from omi.models.quality import QualityScore, quality_score
from omi.models.registry import KNOWN_MODELS, ModelInfo, build_model, model_info
from omi.models.sampling import generate, load_pretrained, make_grid, save_grid, save_pretrained
from omi.models.train_local import TrainResult, train_local
from omi.models.verify import Check, Tolerances, compare, recompute

__all__ = [
    "KNOWN_MODELS", "Check", "DataSource", "DataSourceError", "GradientSketch", "MerkleProof", "MicroBatchRecord",
    "ModelInfo", "QualityScore", "Tolerances", "TrainResult", "build_model", "compare", "compute_micro_batch",
    "generate", "load_pretrained", "make_grid", "merkle_proof", "merkle_root", "micro_batch_seed", "model_info",
    "open_source", "params_hash", "pick_device", "quality_score", "recompute", "record_bytes", "save_grid",
    "save_pretrained", "train_local", "verify_proof",
]
