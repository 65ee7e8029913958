"""Model registry: every model builds with the right shapes, sizes are reported, unknown names are refused."""

import pytest
import torch
from omi.models import KNOWN_MODELS, build_model, model_info

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models run fastest on one thread


@pytest.mark.parametrize("name", [name for name in KNOWN_MODELS if name.startswith("unet-")])
def test_every_unet_builds_and_predicts_the_input_shape(name):
    info = model_info(name)
    model, scheduler = build_model(name, prediction_type="v_prediction", num_train_timesteps=500)
    assert sum(p.numel() for p in model.parameters()) == info.parameters
    assert info.bytes == 4 * info.parameters
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.num_train_timesteps == 500
    x = torch.randn(1, info.channels, info.sample_size, info.sample_size)
    with torch.no_grad():
        out = model(x, torch.tensor([10])).sample
    assert out.shape == x.shape


def test_sizes_are_what_the_registry_promises():
    assert 700_000 <= model_info("unet-digits-16").parameters <= 1_000_000
    assert (model_info("unet-digits-16").sample_size, model_info("unet-digits-16").channels) == (16, 1)
    for name, side in (("unet-32", 32), ("unet-64", 64)):
        info = model_info(name)
        assert 10_000_000 <= info.parameters <= 100_000_000 and (info.sample_size, info.channels) == (side, 3)


def test_digits_model_forward_on_a_batch():
    model, _ = build_model("unet-digits-16")
    out = model(torch.randn(8, 1, 16, 16), torch.randint(0, 1000, (8,))).sample
    assert out.shape == (8, 1, 16, 16)


def test_same_seed_same_parameters_without_touching_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, _ = build_model("unet-digits-16", seed=7)
    assert torch.equal(torch.rand(1), before), "build_model must not consume the caller's random stream"
    b, _ = build_model("unet-digits-16", seed=7)
    c, _ = build_model("unet-digits-16", seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_unknown_model_and_prediction_type_are_refused():
    with pytest.raises(ValueError, match=r"unknown model 'unet-huge' \(known: unet-digits-16, unet-32, unet-64, sana-"):
        build_model("unet-huge")
    with pytest.raises(ValueError, match="unknown model"):
        model_info("unet-huge")
    with pytest.raises(ValueError, match="prediction_type"):
        build_model("unet-digits-16", prediction_type="sample-ish")
    with pytest.raises(ValueError, match="prediction_type"):
        build_model("unet-digits-16", prediction_type="flow")
    with pytest.raises(ValueError, match="trained with prediction_type 'flow'"):
        build_model("sana-digits", prediction_type="epsilon")
