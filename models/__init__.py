"""Diffusion models, data sources, the micro-batch function and the quality score.

One import place for the rest of the project::

    from omi.models import build_model, open_source, compute_micro_batch, micro_batch_seed, GradientSketch

Each name loads its module on first use (PEP 562), so a process that needs one part (the coordinator reading a
RunSpec, the swarm's optimizer) does not pay for the others: diffusers' models and schedulers, transformers, scipy
cost seconds of CPU at every start of every process.
"""

import importlib

_EXPORTS = {  # module -> the names this package re-exports from it
    "omi.models.assignment": ["assignment_indices", "micro_batch_samples", "micro_batches"],
    "omi.models.commitment": ["MerkleProof", "merkle_proof", "merkle_root", "record_bytes", "verify_proof"],
    "omi.models.data": ["DataSource", "DataSourceError", "open_source"],
    "omi.models.device": ["pick_device", "place_model"],
    "omi.models.microbatch": ["GradientSketch", "MicroBatchRecord", "compute_micro_batch", "micro_batch_seed",
                              "params_hash"],
    "omi.models.quality": ["QualityScore", "quality_score"],
    "omi.models.records": ["audited_record", "proof_of", "record_from_proto", "record_to_proto", "sent_sketch"],
    "omi.models.registry": ["KNOWN_MODELS", "ModelInfo", "build_for_spec", "build_model", "model_info"],
    "omi.models.replay": ["Check", "Tolerances", "compare", "recompute"],
    "omi.models.sampling": ["generate", "load_pretrained", "make_grid", "save_grid", "save_pretrained"],
    "omi.models.train_local": ["TrainResult", "train_local"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # the next use is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
