"""Text-to-image latent diffusion transformers: Sana, trained with flow matching on precomputed latents and captions.

The swarm trains only the transformer (diffusers' ``SanaTransformer2DModel``); the autoencoder (``AutoencoderDC``),
the text encoder (Gemma 2, ``transformers``) and its tokenizer are *frozen parts*: data preparation runs them once
per sample (latents and caption embeddings go into the shards), sampling runs them to turn a prompt into an image,
and a checkpoint carries them so that a stock ``diffusers.SanaPipeline`` loads it and draws from a prompt.

Why Sana rather than PixArt-Σ or SD3:

- **flow matching in a stock pipeline**: ``SanaPipeline`` runs ``FlowMatchEulerDiscreteScheduler`` as it is;
  PixArt-Σ's pipeline calls the scheduler's ``scale_model_input``, which the flow-matching scheduler lacks;
- **one text encoder**: SD3 needs two CLIPs and a T5 (three embeddings per caption to precompute and ship);
- **linear self-attention** in its DiT blocks: cost grows linearly with the number of latent tokens, and with its
  32x autoencoder a 1024 px image is 32x32 tokens;
- **open real sizes** with the same classes: Sana 0.6 B and 1.6 B (registered below as ``sana-600m`` and
  ``sana-1600m``; their autoencoder and text encoder are loaded from a local folder or a hub id, never built).

``sana-digits`` is the CPU toy: every part is built from config with a seed, the tokenizer is byte-level (no
vocabulary file to download), and 32x32 grayscale images become 8x8x4 latents.

>>> model, scheduler = build_transformer("sana-digits")
>>> model.config.sample_size, type(scheduler).__name__
(8, 'FlowMatchEulerDiscreteScheduler')
>>> parts = build_frozen_parts("sana-digits")
>>> [tuple(e.shape) for e in encode_captions(parts, ["a handwritten digit seven", "a digit"])]
[(27, 64), (9, 64)]
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
from omi.protos.files import sha256_file

if TYPE_CHECKING:  # the pipeline loads transformers: seconds of CPU that a process training a UNet run needn't pay
    from diffusers import SanaPipeline

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000  # timestep scale: the transformer sees sigma * 1000, as SanaPipeline feeds it
PARTS_FOLDERS = ("vae", "text_encoder", "tokenizer")  # the frozen parts' subfolders of a Sana pipeline folder
PARTS_PATTERNS = [*(f"{sub}/*" for sub in PARTS_FOLDERS), "model_index.json"]  # what a hub id's snapshot fetches


@dataclass(frozen=True)
class LatentModelConfig:
    """One registered text-to-image model."""

    transformer: dict[str, Any]  # SanaTransformer2DModel config
    resolution: int  # side of the square images, in pixels
    channels: int  # image channels (1 grayscale, 3 RGB)
    vae: dict[str, Any] | None = None  # AutoencoderDC config of a built-from-config autoencoder; None: loaded
    text_encoder: dict[str, Any] | None = None  # Gemma2Config of a built-from-config text encoder; None: loaded
    flow_shift: float = 1.0  # the scheduler's timestep shift (Sana uses 3.0 at 1024 px)
    loaded_from: str = ""  # where the frozen parts of a real model usually come from (a hub id), for messages


_SANA_DIGITS_WIDTH = 64
CONFIGS: dict[str, LatentModelConfig] = {
    # 325,508 transformer parameters: 8x8x4 latents of 32x32 digits, 4 blocks of width 64.
    "sana-digits": LatentModelConfig(
        transformer=dict(
            in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=4,
            num_cross_attention_heads=4, cross_attention_head_dim=16, cross_attention_dim=_SANA_DIGITS_WIDTH,
            caption_channels=_SANA_DIGITS_WIDTH, mlp_ratio=2.5, sample_size=8, patch_size=1,
        ),
        resolution=32, channels=1,
        # 3 stages: 32 -> 8 pixels (pixel-unshuffle downsampling), 4 latent channels, no attention.
        vae=dict(
            in_channels=1, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
            decoder_block_types="ResBlock", encoder_block_out_channels=(16, 32, 64),
            decoder_block_out_channels=(16, 32, 64), encoder_layers_per_block=(1, 1, 1),
            decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), ()),
            decoder_qkv_multiscales=((), (), ()), scaling_factor=1.0,
        ),
        text_encoder=dict(
            hidden_size=_SANA_DIGITS_WIDTH, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16,
        ),
    ),
    # Sana 0.6 B (Sana_600M_1024px): 591.7 M parameters, 32x32x32 latents of DC-AE f32c32, Gemma-2-2B captions.
    "sana-600m": LatentModelConfig(
        transformer=dict(
            in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=28,
            num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
            caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1,
        ),
        resolution=1024, channels=3, flow_shift=3.0, loaded_from="Efficient-Large-Model/Sana_600M_1024px_diffusers",
    ),
    # Sana 1.6 B (Sana_1600M_1024px): 1,604.5 M parameters, same autoencoder and text encoder.
    "sana-1600m": LatentModelConfig(
        transformer=dict(
            in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
            num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
            caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1,
        ),
        resolution=1024, channels=3, flow_shift=3.0, loaded_from="Efficient-Large-Model/Sana_1600M_1024px_diffusers",
    ),
}


def latent_config(name: str) -> LatentModelConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown text-to-image model '{name}' (known: {', '.join(CONFIGS)})")
    return CONFIGS[name]


def build_transformer(
    name: str, *, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, seed: int = 0
) -> tuple[SanaTransformer2DModel, FlowMatchEulerDiscreteScheduler]:
    """The transformer the swarm trains (seeded initialisation, caller's RNG untouched) and its flow scheduler."""
    config = latent_config(name)
    if num_train_timesteps <= 0:
        raise ValueError(f"num_train_timesteps must be > 0, got {num_train_timesteps}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SanaTransformer2DModel(**config.transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=config.flow_shift)
    return model, scheduler


def meta_transformer(name: str) -> SanaTransformer2DModel:
    """The transformer on the meta device: its size without allocating it."""
    with torch.device("meta"):
        return SanaTransformer2DModel(**latent_config(name).transformer)


@dataclass
class FrozenParts:
    """What turns captions into embeddings and latents into images; never trained, the same for every peer."""

    tokenizer: Any  # a transformers tokenizer
    text_encoder: torch.nn.Module  # a transformers model whose first output is the caption's hidden states
    vae: AutoencoderDC
    source: str = field(default="")  # where they came from: "built:<name>:<seed>", a folder or a hub id

    def pipeline(self, transformer: SanaTransformer2DModel | None = None,
                 scheduler: FlowMatchEulerDiscreteScheduler | None = None) -> SanaPipeline:
        """A stock ``SanaPipeline`` over these parts (and a transformer, for sampling)."""
        from diffusers import SanaPipeline

        return SanaPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                            transformer=transformer, scheduler=scheduler or FlowMatchEulerDiscreteScheduler())


def byte_tokenizer(model_max_length: int = 4096):
    """A byte-level tokenizer built in code (``tokenizers``): any text, no vocabulary file, 260 tokens.

    Ids 0-3 are ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>``; every byte is one token; ``<bos>`` opens each text
    (Gemma's convention, which ``SanaPipeline``'s first-token selection relies on).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                             special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=model_max_length)


def build_frozen_parts(name: str, *, seed: int = 0) -> FrozenParts:
    """The tiny random-initialised autoencoder, text encoder and byte tokenizer of a toy model, built from config.

    Real sizes are loaded (:func:`load_frozen_parts`); asking to build them is an error naming where they live.
    """
    config = latent_config(name)
    if config.vae is None or config.text_encoder is None:
        raise ValueError(f"'{name}' has no built-from-config autoencoder and text encoder: load them from a local "
                         f"folder or hub id with vae/, text_encoder/ and tokenizer/ (e.g. {config.loaded_from})")
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = byte_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                                                bos_token_id=2, **config.text_encoder))
        # Token embeddings at unit scale, not the 0.02 of Gemma's init: in an untrained encoder the random layers'
        # output would otherwise drown each token's identity, and the digit words' embeddings came out 95 % alike
        # (cosine), so the transformer could not tell the captions apart (10 % of samples matched their prompt
        # after 48 k samples); at unit scale they are nearly orthogonal.
        torch.nn.init.normal_(text_encoder.embed_tokens.weight, std=1.0)
        vae = AutoencoderDC(**config.vae)
    text_encoder.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    return FrozenParts(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, source=f"built:{name}:{seed}")


def load_frozen_parts(where: str | Path) -> FrozenParts:
    """The autoencoder, text encoder and tokenizer of a Sana pipeline folder or hub id (subfolders ``vae/``,
    ``text_encoder/``, ``tokenizer/``): a checkpoint written by :func:`save_text_to_image`, or a real Sana release."""
    from transformers import AutoModel, AutoTokenizer

    where = str(where)
    if Path(where).expanduser().exists() and not (Path(where).expanduser() / "vae").is_dir():
        raise FileNotFoundError(f"{where} is not a Sana pipeline folder (no vae/)")
    vae = AutoencoderDC.from_pretrained(where, subfolder="vae")
    text_encoder = AutoModel.from_pretrained(where, subfolder="text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(where, subfolder="tokenizer")
    text_encoder.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    return FrozenParts(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, source=where)


class PartsNotFoundError(FileNotFoundError):
    """Frozen parts that cannot be had: not a frozen-parts folder here, nor a hub id the cache or the hub gives."""


def resolve_parts(where: str | Path) -> tuple[Path, str]:
    """The local folder of the frozen parts ``where`` names, and ``where`` pinned for a manifest.

    An existing path is taken as it is (pinned as itself). Anything else is a hub id, ``ORG/NAME`` or
    ``ORG/NAME@REVISION`` (a branch, tag or commit): ``huggingface_hub.snapshot_download`` resolves it to its snapshot
    of ``vae/``, ``text_encoder/`` and ``tokenizer/`` in the local hub cache (``HF_HUB_CACHE``), downloading what is
    missing unless the hub is off (``HF_HUB_OFFLINE=1``), and it is pinned as ``ORG/NAME@<commit>``, so that a later
    reader gets exactly those files whatever the branch says by then.

    Raises :class:`PartsNotFoundError` naming ``where`` and what to do when the folder lacks a part or the hub id
    cannot be resolved (not cached while offline, no such repository or revision, no network).
    """
    needs = ", ".join(f"{sub}/" for sub in PARTS_FOLDERS)
    folder = Path(where).expanduser()
    if folder.exists():
        if not all((folder / sub).is_dir() for sub in PARTS_FOLDERS):
            raise PartsNotFoundError(f"{folder} is not a frozen-parts folder (needs {needs})")
        return folder, str(folder)
    from huggingface_hub import snapshot_download

    repo_id, _, revision = str(where).partition("@")
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=PARTS_PATTERNS))
    except (OSError, ValueError) as e:  # what huggingface_hub raises for a bad id, a missing repo, revision or network
        raise PartsNotFoundError(f"frozen parts {str(where)!r}: no such folder here, and as a hub id "
                                 f"{_hub_failure(e, repo_id, revision)}") from e
    pinned = f"{repo_id}@{snapshot.name}"  # the snapshot folder of the hub cache is named by its commit
    if not all((snapshot / sub).is_dir() for sub in PARTS_FOLDERS):
        raise PartsNotFoundError(f"hub id {pinned} is not a Sana pipeline repository (needs {needs})")
    logger.info("frozen parts %s: %s", pinned, snapshot)
    return snapshot, pinned


def _hub_failure(error: Exception, repo_id: str, revision: str) -> str:
    """Why ``snapshot_download`` could not give a hub id, and what to do, for :func:`resolve_parts`'s error."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local = "pass a local folder with vae/, text_encoder/ and tokenizer/"
    if isinstance(error, HFValidationError):
        return f"it is not valid (ORG/NAME or ORG/NAME@REVISION); {local}"
    if isinstance(error, RevisionNotFoundError):
        return f"the hub has no revision {revision!r} of {repo_id}; name a branch, tag or commit it has"
    if isinstance(error, RepositoryNotFoundError):
        return f"the hub has no repository {repo_id} you may read (a gated one needs `hf auth login`); {local}"
    if isinstance(error, LocalEntryNotFoundError):  # also a cached snapshot missing files
        return (f"it is not in the hub cache ({constants.HF_HUB_CACHE}), or only in part, and the hub cannot be "
                f"reached (offline, or HF_HUB_OFFLINE=1); run once online to fetch it into the cache, or {local}")
    first_line = (str(error).splitlines() or [""])[0]
    return f"the hub cannot give it ({type(error).__name__}: {first_line}); {local}"


def parts_hash(folder: str | Path) -> str:
    """sha256 over the frozen parts' files (``vae/``, ``text_encoder/``, ``tokenizer/``: path and bytes)."""
    folder = Path(folder)
    digest = hashlib.sha256(b"omi-parts-v1")
    for sub in PARTS_FOLDERS:
        for path in sorted(p for p in (folder / sub).rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix().encode()
            digest.update(len(name).to_bytes(4, "big") + name)
            digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def _default_instruction() -> list[str]:
    """The instruction ``SanaPipeline.__call__`` puts before every prompt by default (Sana's "complex human
    instruction"): captions are embedded the way a stock pipeline call embeds a prompt, so what was trained on is
    what a user's prompt gives."""
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


@torch.inference_mode()
def encode_captions(parts: FrozenParts, captions: list[str], *, max_sequence_length: int | None = None,
                    instruction: bool = True) -> list[torch.Tensor]:
    """Each caption's embedding as a stock ``SanaPipeline`` call computes it: float32 ``(tokens, width)`` on the CPU,
    padding dropped (the transformer masks it out; micro-batches pad again to their longest caption).

    :param max_sequence_length: caption tokens kept (``SanaPipeline``'s ``max_sequence_length``; default: the
        pipeline's 300)
    :param instruction: prepend the pipeline's default instruction (``False`` for the empty prompt of guidance,
        which the pipeline encodes without it)
    """
    if not captions:
        return []
    pipe = parts.pipeline()
    kwargs = dict(max_sequence_length=max_sequence_length) if max_sequence_length else {}
    embeds, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=torch.device("cpu"),
                                            complex_human_instruction=_default_instruction() if instruction else None,
                                            **kwargs)
    return [e[m.bool()].float().clone() for e, m in zip(embeds, mask, strict=True)]


def null_caption(parts: FrozenParts, *, max_sequence_length: int | None = None) -> torch.Tensor:
    """The embedding of the empty prompt, as ``SanaPipeline`` encodes its negative prompt for guidance."""
    return encode_captions(parts, [""], max_sequence_length=max_sequence_length, instruction=False)[0]


@torch.inference_mode()
def encode_images(vae: AutoencoderDC, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] ``(N, C, H, W)`` -> scaled latents, as ``SanaPipeline`` decodes them (``latents / scale``)."""
    device = next(vae.parameters()).device
    latents = vae.encode(images.to(device, next(vae.parameters()).dtype)).latent
    return (latents * vae.config.scaling_factor).float().cpu()


@torch.inference_mode()
def generate_from_prompts(
    model: SanaTransformer2DModel,
    scheduler: FlowMatchEulerDiscreteScheduler,
    parts: FrozenParts,
    prompts: list[str],
    *,
    steps: int = 20,
    seed: int = 0,
    guidance_scale: float = 4.5,
) -> torch.Tensor:
    """Images for prompts through a stock ``SanaPipeline``: float32 ``(N, C, H, W)`` in [-1, 1] on the CPU.

    :param steps: Euler steps of the flow scheduler
    :param seed: seeds the starting latents (a CPU generator)
    :param guidance_scale: classifier-free guidance (the pipeline's default 4.5; 1 turns it off)
    """
    if not prompts or steps <= 0:
        raise ValueError(f"need prompts and steps > 0, got {len(prompts)} prompts and steps={steps}")
    side = model.config.sample_size * (2 ** (len(parts.vae.config.encoder_block_out_channels) - 1))
    was_training = model.training
    model.eval()
    try:
        pipe = parts.pipeline(model, FlowMatchEulerDiscreteScheduler.from_config(scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, height=side, width=side,
                      use_resolution_binning=False, generator=torch.Generator("cpu").manual_seed(int(seed)),
                      output_type="pt").images
    finally:
        model.train(was_training)
    return (images.float().cpu() * 2 - 1).clamp(-1, 1)


def save_text_to_image(model: SanaTransformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler,
                       parts: FrozenParts, directory: str | Path) -> Path:
    """Write a stock ``SanaPipeline`` folder: ``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``scheduler/`` (weights in safetensors)."""
    directory = Path(directory)
    parts.pipeline(model, scheduler).save_pretrained(directory, safe_serialization=True)
    logger.info("saved diffusers SanaPipeline checkpoint to %s", directory)
    return directory


def load_text_to_image(directory: str | Path, *, device: str | torch.device = "cpu"
                       ) -> tuple[SanaTransformer2DModel, FlowMatchEulerDiscreteScheduler, FrozenParts]:
    """Load a folder written by :func:`save_text_to_image` (or any SanaPipeline folder)."""
    directory = Path(directory)
    if not (directory / "transformer").is_dir():
        raise FileNotFoundError(f"{directory} is not a diffusers SanaPipeline folder (no transformer/)")
    model = SanaTransformer2DModel.from_pretrained(directory, subfolder="transformer").to(device)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(directory, subfolder="scheduler")
    parts = load_frozen_parts(directory)
    parts.vae.to(device)
    parts.text_encoder.to(device)
    return model, scheduler, parts
