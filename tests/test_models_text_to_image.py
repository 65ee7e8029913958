"""Text-to-image latent transformers (Sana): built from config, trained with flow matching on latents and caption
embeddings through the one micro-batch function, saved as a stock SanaPipeline that draws from a prompt."""

import pytest
import torch
from diffusers import SanaPipeline
from omi.models import GradientSketch, build_model, compute_micro_batch, flow, micro_batch_seed, model_info, params_hash
from omi.models import text_to_image as t2i

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models run fastest on one thread

PROMPTS = ["a handwritten digit zero", "a handwritten digit seven", "a handwritten digit one", "a digit"]


@pytest.fixture(scope="module")
def parts():
    return t2i.build_frozen_parts("sana-digits", seed=0)


@pytest.fixture(scope="module")
def batch(parts):
    images = torch.rand(len(PROMPTS), 1, 32, 32) * 2 - 1
    latents = t2i.encode_images(parts.vae, images)
    return flow.LatentBatch.collate(latents, t2i.encode_captions(parts, PROMPTS), t2i.null_caption(parts))


def _record(model, scheduler, batch, seed, sketch=None):
    model.zero_grad(set_to_none=True)
    record = compute_micro_batch(model, scheduler, batch, seed, prediction_type="flow", sketch=sketch)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return record, grads


def test_the_toy_builds_from_config_with_a_seed_and_the_real_sizes_are_registered():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a, scheduler = build_model("sana-digits", seed=3)
    assert torch.equal(torch.rand(1), before), "building must not consume the caller's random stream"
    b, _ = build_model("sana-digits", seed=3)
    c, _ = build_model("sana-digits", seed=4)
    assert params_hash(a) == params_hash(b) != params_hash(c)
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    info = model_info("sana-digits")
    assert sum(p.numel() for p in a.parameters()) == info.parameters
    assert (info.sample_size, info.channels) == (32, 1)
    # Sana 0.6 B and 1.6 B, counted on the meta device (nothing allocated, nothing downloaded)
    assert 590_000_000 < model_info("sana-600m").parameters < 600_000_000
    assert model_info("sana-1600m").parameters > 1_600_000_000
    assert (model_info("sana-1600m").sample_size, model_info("sana-1600m").channels) == (1024, 3)
    with pytest.raises(ValueError, match="Efficient-Large-Model/Sana_600M_1024px_diffusers"):
        t2i.build_frozen_parts("sana-600m")


def test_a_latent_micro_batch_recomputes_bitwise_and_its_sketch_is_the_gradients(batch):
    model, scheduler = build_model("sana-digits")
    sketch = GradientSketch(model, size=128, seed=1)
    seed = micro_batch_seed(0, "captions", 3, "node-a", 0)
    first, grads = _record(model, scheduler, batch, seed, sketch)
    again, grads_again = _record(model, scheduler, batch, seed, sketch)
    assert first.samples == len(PROMPTS) and first.grad_norm > 0
    assert first.loss == again.loss and torch.equal(first.sketch, again.sketch)
    assert all(torch.equal(g, h) for g, h in zip(grads, grads_again, strict=True))
    flat = torch.cat([g.reshape(-1) for g in grads])
    assert torch.allclose(sketch.of_vector(flat), first.sketch, rtol=1e-5, atol=1e-6)
    other, _ = _record(model, scheduler, batch, seed + 1, sketch)
    assert other.loss != first.loss, "another seed draws other noise and times"
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        compute_micro_batch(model, scheduler, batch, seed, prediction_type="epsilon", sketch=None)


def test_captions_condition_the_loss_and_dropped_captions_see_the_empty_prompt(parts, batch, monkeypatch):
    model, scheduler = build_model("sana-digits", seed=1)
    seed = micro_batch_seed(0, "captions", 0, "node-a", 1)
    shuffled = flow.LatentBatch(batch.latents, batch.embeds.flip(0), batch.mask.flip(0), batch.null)
    assert _record(model, scheduler, batch, seed)[0].loss != _record(model, scheduler, shuffled, seed)[0].loss

    monkeypatch.setattr(flow, "CAPTION_DROPOUT", 1.0)  # every caption dropped: only the empty prompt is seen
    blank = flow.LatentBatch.collate(batch.latents, [batch.null] * len(PROMPTS), batch.null)
    dropped, _ = _record(model, scheduler, batch, seed)
    assert dropped.loss == _record(model, scheduler, blank, seed)[0].loss
    assert dropped.loss == _record(model, scheduler, shuffled, seed)[0].loss


def test_flow_matching_steps_lower_the_loss_on_fixed_latents(batch):
    model, scheduler = build_model("sana-digits", seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def mean_loss() -> float:  # over fixed seeds, so the two measurements see the same noise and times
        return sum(_record(model, scheduler, batch, 1000 + k)[0].loss for k in range(8)) / 8

    before = mean_loss()
    for step in range(40):
        model.zero_grad(set_to_none=True)
        compute_micro_batch(model, scheduler, batch, step, prediction_type="flow", sketch=None)
        optimizer.step()
    after = mean_loss()
    assert after < 0.7 * before, f"40 steps on 4 samples should fit them: loss {before:.3f} -> {after:.3f}"


def test_a_checkpoint_is_a_stock_sana_pipeline_that_draws_from_a_prompt(parts, tmp_path):
    model, scheduler = build_model("sana-digits", seed=4)
    folder = t2i.save_text_to_image(model, scheduler, parts, tmp_path / "ckpt")
    assert {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= {p.name for p in folder.iterdir()}

    pipe = SanaPipeline.from_pretrained(folder)  # no code of ours from here on
    image = pipe("a handwritten digit seven", num_inference_steps=2, height=32, width=32,
                 use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32) and image.mode == "L"

    ours = t2i.generate_from_prompts(model, scheduler, parts, ["a handwritten digit seven"], steps=2, seed=0)
    theirs = pipe("a handwritten digit seven", num_inference_steps=2, height=32, width=32, output_type="pt",
                  use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images
    assert ours.shape == (1, 1, 32, 32)
    assert torch.allclose(ours, theirs * 2 - 1, atol=1e-5)

    loaded = t2i.load_frozen_parts(folder)
    assert torch.equal(t2i.encode_captions(loaded, PROMPTS[:1])[0], t2i.encode_captions(parts, PROMPTS[:1])[0])
    with pytest.raises(FileNotFoundError, match="not a Sana pipeline folder"):
        t2i.load_frozen_parts(tmp_path)


def test_captions_are_embedded_as_a_stock_pipeline_call_embeds_the_prompt(parts):
    """What the transformer trains on is what it sees when a user prompts the pipeline with its defaults."""
    model, scheduler = build_model("sana-digits")
    seen = {}

    def capture(module, args, kwargs):
        seen["embeds"], seen["mask"] = kwargs["encoder_hidden_states"], kwargs["encoder_attention_mask"]

    model.register_forward_pre_hook(capture, with_kwargs=True)
    pipe = parts.pipeline(model, scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe(PROMPTS[1], num_inference_steps=1, guidance_scale=1.0, height=32, width=32, use_resolution_binning=False)
    used = seen["embeds"][0][seen["mask"][0].bool()]
    assert torch.equal(used, t2i.encode_captions(parts, PROMPTS[1:2])[0])


def test_bad_micro_batches_are_refused(parts, batch):
    with pytest.raises(ValueError, match="3 latents and 2 captions"):
        flow.LatentBatch.collate(batch.latents[:3], t2i.encode_captions(parts, PROMPTS[:2]), batch.null)
    with pytest.raises(ValueError, match=r"caption 0: expected \(tokens, 64\)"):
        flow.LatentBatch.collate(batch.latents[:1], [torch.zeros(3, 32)], batch.null)
    with pytest.raises(ValueError, match="unknown text-to-image model"):
        t2i.build_frozen_parts("sana-huge")
