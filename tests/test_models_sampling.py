"""Sampling, grids, the diffusers checkpoint round trip through stock DDPMPipeline, and the quality score."""

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from omi.models import build_model, generate, load_pretrained, make_grid, quality_score, save_pretrained
from omi.models.data import DigitsSource
from omi.models.quality import _Judge, _judge
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models run fastest on one thread


def test_generate_is_deterministic_and_in_range():
    model, scheduler = build_model("unet-digits-16")
    a = generate(model, scheduler, n=3, steps=4, seed=1)
    assert a.shape == (3, 1, 16, 16) and float(a.min()) >= -1 and float(a.max()) <= 1
    assert torch.equal(a, generate(model, scheduler.config, n=3, steps=4, seed=1))
    # other chunking changes the float summation order only
    assert torch.allclose(a, generate(model, scheduler, n=3, steps=4, seed=1, batch_size=2), atol=1e-4)
    assert not torch.equal(a, generate(model, scheduler, n=3, steps=4, seed=2))


def test_grid_layout():
    images = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 0.0, 1.0)])
    grid = make_grid(images, nrow=2, padding=1)
    assert grid.mode == "RGB" and grid.size == (2 * 5 + 1, 2 * 5 + 1)
    pixels = np.asarray(grid)
    assert pixels[1, 1].tolist() == [0, 0, 0] and pixels[1, 6].tolist() == [128, 128, 128]
    assert pixels[6, 1].tolist() == [255, 255, 255]
    assert make_grid(torch.zeros(4, 1, 16, 16), scale=4).size == (4 * 38, 4 * 38)


def test_checkpoint_loads_in_stock_diffusers_and_generates(tmp_path):
    model, scheduler = build_model("unet-digits-16", seed=5)
    save_pretrained(model, scheduler, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "ckpt" / "model_index.json").exists()
    # stock diffusers, none of our code
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "ckpt")
    out = pipeline(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 16, 16, 1) and np.isfinite(out.images).all()
    pil = pipeline(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(pil, Image.Image) and pil.size == (16, 16)
    loaded, loaded_scheduler = load_pretrained(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), loaded.parameters(), strict=True))
    assert loaded_scheduler.config.prediction_type == scheduler.config.prediction_type


def test_quality_score_separates_real_digits_from_noise(tmp_path):
    real = DigitsSource(shard_size=64, resolution=16).images
    picked = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:256]]
    good = quality_score(picked, cache_dir=tmp_path)
    assert (tmp_path / "digit-classifier-v1.safetensors").exists()
    noise = quality_score(torch.rand(256, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                          cache_dir=tmp_path)
    assert good.confidence > 0.95 and good.coverage == 1.0 and good.fid < 15
    assert noise.fid > 20 * good.fid and noise.confidence < good.confidence and noise.coverage < 1.0
    # a fresh load from the cache file gives the same judge as the one trained and saved on first use
    trained, loaded = _judge(tmp_path), _Judge(tmp_path)
    assert loaded is not trained
    assert all(torch.equal(a, b) for a, b in zip(trained.model.state_dict().values(),
                                                   loaded.model.state_dict().values(), strict=True))
    assert np.array_equal(trained.mu, loaded.mu) and np.array_equal(trained.sigma, loaded.sigma)
    assert torch.equal(trained.model(picked), loaded.model(picked))
    assert quality_score(picked, cache_dir=tmp_path) == good
    # larger images are resized to the classifier's 16x16
    upscaled = torch.nn.functional.interpolate(picked, size=(32, 32), mode="bilinear", align_corners=False)
    assert quality_score(upscaled, cache_dir=tmp_path).coverage == 1.0
