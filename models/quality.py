"""Quality score of generated digits: a small CNN trained on the bundled digits judges the samples.

Three numbers (see docs/models.md for what "good" looks like):

- ``confidence``: mean top-class probability the classifier gives the samples (real digits: ~0.99).
- ``coverage``: fraction of the 10 classes among the samples classified with probability >= 0.9 (real: 1.0).
- ``fid``: Fréchet distance between the classifier's penultimate features of the samples and of all 1,797
  real digits (lower is better; 256 random real digits score 5-10, noise scores hundreds).

The classifier trains on first use in a few seconds (seeded, so every machine gets the same one) and is cached
under ``~/.cache/omi-swarm`` (or ``$OMI_SWARM_CACHE``, or the ``cache_dir`` argument).

>>> from omi.models.data import DigitsSource
>>> real = DigitsSource(shard_size=64, resolution=16).images[::7]  # 257 digits spread over the set
>>> score = quality_score(real)
>>> score.confidence > 0.9, score.coverage, score.fid < 15
(True, 1.0, True)
"""

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

CLASSIFIER_VERSION = "digit-classifier-v1"
RESOLUTION = 16  # the classifier's input side; other sizes are resized to it
CONFIDENT = 0.9  # a sample counts towards coverage when its top class has at least this probability


@dataclass(frozen=True)
class QualityScore:
    """How much generated digits look like the real ones."""

    confidence: float  # mean top-class probability, 0.1 (uniform) .. 1
    coverage: float  # fraction of the 10 digit classes among confidently classified samples
    fid: float  # Fréchet distance of classifier features to the real digits; lower is better
    prompt_accuracy: float | None = None  # text-to-image: share of samples classified as the digit their prompt names

    def __str__(self) -> str:
        text = f"confidence {self.confidence:.3f}, coverage {self.coverage:.1f}, FID {self.fid:.2f}"
        return text if self.prompt_accuracy is None else f"{text}, matches its prompt {self.prompt_accuracy:.1%}"


class DigitClassifier(nn.Module):
    """A small CNN on 1x16x16 digits in [-1, 1]; ``features`` is its 64-number penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
        )
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@contextmanager
def one_thread() -> Iterator[None]:
    """The classifier is tiny: one thread is fastest, and on a busy machine two threads wait on each other
    (training took 32 s with 2 threads against 1.5 s with 1 while other jobs loaded both cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _cache_dir(cache_dir: str | Path | None) -> Path:
    from omi.models.data_cache import cache_root

    return Path(cache_dir) if cache_dir is not None else cache_root()


def _real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from omi.models.data import DigitsSource

    source = DigitsSource(shard_size=64, resolution=RESOLUTION)
    return source.images, source.labels


def _shifted(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel, so the classifier does not rely on exact placement."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + RESOLUTION, dx:dx + RESOLUTION]


def train_classifier(epochs: int = 40, seed: int = 0) -> DigitClassifier:
    """Train the digit classifier on all 1,797 bundled digits (seconds on a CPU)."""
    images, labels = _real_digits()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.enable_grad(), one_thread():  # callers may be inside no_grad (quality_score is)
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for batch in order.split(128):
                loss = F.cross_entropy(model(_shifted(images[batch], generator)), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    logger.info("trained the digit classifier: %.1f%% accuracy on the bundled digits", 100 * accuracy)
    return model


def _feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    array = features.double().numpy()
    return array.mean(axis=0), np.cov(array, rowvar=False)


class _Judge:
    """The classifier and the real digits' feature statistics, loaded once per cache path."""

    def __init__(self, cache_dir: Path):
        path = cache_dir / f"{CLASSIFIER_VERSION}.safetensors"
        if path.exists():
            tensors = load_file(str(path))
            self.model = DigitClassifier()
            self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            self.model.eval()
            self.mu, self.sigma = tensors["real.mu"].numpy(), tensors["real.sigma"].numpy()
            return
        logger.info("training the digit classifier for the quality score (first use; cached at %s)", path)
        self.model = train_classifier()
        with torch.no_grad():
            self.mu, self.sigma = _feature_stats(self.model.features(_real_digits()[0]))
        tensors = {f"model.{k}": v.contiguous() for k, v in self.model.state_dict().items()}
        tensors["real.mu"], tensors["real.sigma"] = torch.from_numpy(self.mu), torch.from_numpy(self.sigma)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)  # atomic: concurrent first uses never see half a file


_JUDGES: dict[Path, _Judge] = {}


def _judge(cache_dir: str | Path | None) -> _Judge:
    path = _cache_dir(cache_dir).resolve()
    if path not in _JUDGES:
        _JUDGES[path] = _Judge(path)
    return _JUDGES[path]


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the distance FID uses between two Gaussians."""
    # ReLU features have dead units, so the covariances are singular: a tiny ridge keeps sqrtm well defined.
    offset = np.eye(sigma1.shape[0]) * 1e-6
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset)).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@torch.no_grad()
def quality_score(images: torch.Tensor, *, labels: torch.Tensor | None = None,
                  cache_dir: str | Path | None = None) -> QualityScore:
    """Score generated digits ``(N, 1, H, W)`` in [-1, 1] (N >= 2; use a few hundred for a stable FID).

    :param labels: for digits generated from prompts, the digit each one's prompt names: ``prompt_accuracy`` is then
        the share the classifier assigns to that digit (10 % for a model that ignores its prompt)
    """
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[0] < 2:
        raise ValueError(f"expected at least 2 grayscale images (N, 1, H, W), got shape {tuple(images.shape)}")
    judge = _judge(cache_dir)
    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[-2:] != (RESOLUTION, RESOLUTION):
        images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True,
                               align_corners=False)
    with one_thread():
        features = judge.model.features(images)
        probabilities = judge.model.head(features).softmax(dim=1)
    top, classes = probabilities.max(dim=1)
    covered = classes[top >= CONFIDENT].unique().numel()
    mu, sigma = _feature_stats(features)
    if labels is not None and labels.shape != classes.shape:
        raise ValueError(f"{len(labels)} labels for {len(classes)} images")
    return QualityScore(
        confidence=float(top.mean()),
        coverage=covered / 10,
        fid=frechet_distance(mu, sigma, judge.mu, judge.sigma),
        prompt_accuracy=None if labels is None else float((classes == labels.to(classes)).float().mean()),
    )
