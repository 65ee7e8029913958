"""The single-process baseline: train-local on digits lowers the loss and raises the quality score; the CLI."""

import json

import pytest
from omi.models import build_model, generate, quality_score, train_local
from omi.node.cli import app
from omi.protos.runspec import load_runspec
from typer.testing import CliRunner

DIGITS_TOML = "examples/runs/digits.toml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models run fastest on one thread


def test_train_local_lowers_loss_and_improves_quality():
    spec = load_runspec(DIGITS_TOML)
    spec.training.micro_batch_size = 16
    spec.training.learning_rate = 2e-3
    model, scheduler = build_model(spec.model, seed=spec.training.seed)
    before = quality_score(generate(model, scheduler, 128, 25, seed=spec.training.seed))
    result = train_local(spec, 250 * 16, device="cpu", progress=False, batch_size=16, quality_samples=128,
                         quality_steps=25)
    early = sum(result.losses[:20]) / 20
    print(f"\ntrain-local digits: loss {early:.4f} -> {result.final_loss:.4f}, {result.samples} samples, "
          f"{result.optimizer_steps} steps, {result.samples_per_second:.0f} samples/s, {result.seconds:.1f} s; "
          f"quality {before} -> {result.quality}")
    assert result.samples == 4000 and result.optimizer_steps == 250 and len(result.losses) == 250
    assert result.final_loss < 0.5 * early
    assert result.quality.fid < 0.5 * before.fid
    assert result.quality.confidence > before.confidence and result.quality.coverage > before.coverage


def test_cli_train_local_writes_a_checkpoint_and_sample_reads_it(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["train-local", "--run", DIGITS_TOML, "--samples", "64", "--device", "cpu",
                                 "--out", str(out), "--batch-size", "32", "--quality-samples", "64"])
    assert result.exit_code == 0, result.output
    assert "64 samples" in result.output and "quality: confidence" in result.output
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists() and (out / "preview.png").exists()
    summary = json.loads((out / "train_local.json").read_text())
    assert (summary["samples"], summary["optimizer_steps"], summary["extras"]["model"]) == (64, 2, "unet-digits-16")
    grid = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", str(out), "--n", "4", "--steps", "3", "--out", str(grid), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert grid.exists()


def test_cli_refuses_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train-local", "--run", str(tmp_path / "missing.toml"), "--samples", "10"])
    assert result.exit_code == 2 and "missing.toml" in result.output
    result = runner.invoke(app, ["sample", str(tmp_path), "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 2 and "not a diffusers DDPMPipeline folder" in " ".join(result.output.split())
