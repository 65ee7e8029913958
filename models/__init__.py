"""Diffusion models, data sources, the micro-batch function and the quality score.

One import place for the rest of the project::

    from omi.models import build_model, open_source, compute_micro_batch, micro_batch_seed, GradientSketch
"""

from omi.models.assignment import assignment_indices, micro_batch_samples, micro_batches
from omi.models.commitment import MerkleProof, merkle_proof, merkle_root, record_bytes, verify_proof
from omi.models.data import DataSource, DataSourceError, open_source
from omi.models.device import pick_device, place_model
from omi.models.microbatch import (
    GradientSketch,
    MicroBatchRecord,
    compute_micro_batch,
    micro_batch_seed,
    params_hash,
)
from omi.models.quality import QualityScore, quality_score
from omi.models.records import audited_record, proof_of, record_from_proto, record_to_proto, sent_sketch
from omi.models.registry import KNOWN_MODELS, ModelInfo, build_for_spec, build_model, model_info
from omi.models.replay import Check, Tolerances, compare, recompute
from omi.models.sampling import generate, load_pretrained, make_grid, save_grid, save_pretrained
from omi.models.train_local import TrainResult, train_local

__all__ = [
    "Check", "DataSource", "DataSourceError", "GradientSketch", "KNOWN_MODELS", "MerkleProof", "MicroBatchRecord",
    "ModelInfo", "QualityScore", "Tolerances", "TrainResult", "assignment_indices", "audited_record",
    "build_for_spec", "build_model", "compare", "compute_micro_batch", "generate", "load_pretrained", "make_grid",
    "merkle_proof", "merkle_root", "micro_batch_samples", "micro_batch_seed", "micro_batches", "model_info",
    "open_source", "params_hash", "pick_device", "place_model", "proof_of", "quality_score", "recompute",
    "record_bytes", "record_from_proto", "record_to_proto", "save_grid", "save_pretrained", "sent_sketch",
    "train_local", "verify_proof",
]
