"""Choosing the torch device a node trains on, set up so its micro-batches can be audited on a CPU."""

import logging

import torch

logger = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda`` or ``cuda:N`` as asked.

    On CUDA, TF32 matmuls and convolutions are switched off: with TF32 a float32 gradient differs from the CPU's
    by about 1e-3 relative, which a validator recomputing on a CPU could not tell from a wrong sample
    (see ``omi.models.replay.Tolerances``); plain float32 differs by about 1e-6.

    >>> pick_device("cpu")
    device(type='cpu')
    >>> pick_device("tpu")
    Traceback (most recent call last):
    ...
    ValueError: unknown device 'tpu' (use auto, cpu, cuda or cuda:N)
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device '{name}' asked for, but there are {torch.cuda.device_count()} CUDA GPU(s)")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        logger.info("training on %s (%s), TF32 off", device, torch.cuda.get_device_name(device))
        return device
    raise ValueError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)")


def place_model(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """Move a model to the device it trains on, in training mode.

    On CUDA a text-to-image transformer also turns on gradient checkpointing (diffusers'
    ``enable_gradient_checkpointing``: activations of each block are recomputed in the backward pass, so a 0.6-1.6 B
    transformer fits a volunteer's GPU; the gradient is the same computation, so audits are unaffected); its forward
    runs under bfloat16 autocast (:func:`omi.models.flow.flow_matching_loss`).
    """
    device = torch.device(device)
    model.to(device).train()
    if device.type == "cuda" and type(model).__name__ == "SanaTransformer2DModel":
        model.enable_gradient_checkpointing()
        logger.info("gradient checkpointing on for %s", type(model).__name__)
    return model
