"""Single-process training of a RunSpec without a swarm: the baseline swarm training is compared against.

Run it from the command line::

    omi-node train-local --run examples/runs/digits.toml --samples 20000
    omi-node train-local --run examples/runs/digits.toml --samples 100000 --out runs/digits-local

It trains exactly what a swarm node trains: the same model, data source, micro-batches (through
:func:`compute_micro_batch`, with sketches), seeds and optimizer settings. The difference: one process, no rounds;
the optimizer steps after ``batch_size`` samples (default: one micro-batch, as a volunteer's inner step does).
"""

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omi.models.data import DIGIT_PROMPTS, DataSource, open_source
from omi.models.device import pick_device, place_model
from omi.models.microbatch import GradientSketch, compute_micro_batch, micro_batch_seed, trainable_parameters
from omi.models.optimizer import optimizer_for
from omi.models.quality import QualityScore, quality_score
from omi.models.registry import build_for_spec, model_info
from omi.models.sampling import draw, generate, run_drawing, save_grid, save_model
from omi.protos import pb
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

logger = logging.getLogger(__name__)

LOCAL_NODE_ID = "local"  # stands in for the node id in micro-batch seeds
QUALITY_SAMPLES = 256  # generated digits the quality score is taken on (FID needs a few hundred)
QUALITY_STEPS = 50  # DDIM steps for those samples
FINAL_LOSS_WINDOW = 20  # micro-batches averaged into final_loss (single losses vary a lot with the timestep)


@dataclass
class TrainResult:
    """What a local training run did and how good the model came out."""

    losses: list[float]  # loss of every micro-batch, in order
    samples: int  # samples trained on
    seconds: float  # wall time of the training loop (not the quality evaluation or saving)
    samples_per_second: float
    final_loss: float  # mean loss of the last FINAL_LOSS_WINDOW micro-batches
    quality: QualityScore | None  # for builtin:digits and captioned digits; None for other sources
    optimizer_steps: int = 0
    extras: dict = field(default_factory=dict)  # run id, model, device, batch sizes: for the summary file


def sample_order(source: DataSource, seed: int) -> Iterator[tuple[int, int]]:
    """Endless (pass, sample index) stream: each pass visits the shards in a seeded order, each shard's samples
    in a seeded order, as a swarm node walks through the shards it is assigned."""
    pass_index = 0
    while True:
        generator = torch.Generator().manual_seed(micro_batch_seed(seed, "order", pass_index, LOCAL_NODE_ID, 0))
        for shard_id in torch.randperm(source.num_shards, generator=generator).tolist():
            start, end = source.shard_range(shard_id)
            for offset in torch.randperm(end - start, generator=generator).tolist():
                yield pass_index, start + offset
        pass_index += 1


def _micro_batches(source: DataSource, seed: int, samples: int, size: int) -> Iterator[tuple[int, list[int]]]:
    """(pass, indices) of consecutive micro-batches covering exactly ``samples`` samples."""
    order = sample_order(source, seed)
    done = 0
    while done < samples:
        chunk = [next(order) for _ in range(min(size, samples - done))]
        done += len(chunk)
        yield chunk[0][0], [index for _, index in chunk]


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]train-local"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
        TextColumn("{task.fields[rate]:>6.0f}/s"), TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
        disable=not enabled,
    )


def train_local(
    spec: pb.RunSpec,
    samples: int,
    *,
    device: str | torch.device = "auto",
    out_dir: str | Path | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    quality_samples: int = QUALITY_SAMPLES,
    quality_steps: int = QUALITY_STEPS,
    max_seconds: float | None = None,
) -> TrainResult:
    """Train ``spec`` in this process for ``samples`` samples.

    :param spec: the RunSpec (model, data, training settings, sketch size, preview count)
    :param samples: samples to train on (passes over the data repeat as needed)
    :param device: ``auto``, ``cpu``, ``cuda`` or a torch.device
    :param out_dir: where to save the diffusers checkpoint, ``preview.png`` and ``train_local.json`` (optional)
    :param progress: show a rich progress bar
    :param batch_size: samples per optimizer step (default: ``spec.training.micro_batch_size``)
    :param quality_samples: digits generated for the quality score (0: skip it)
    :param quality_steps: DDIM steps for those digits
    :param max_seconds: stop early after this much training time (for time-boxed benchmarks)
    """
    if samples <= 0:
        raise ValueError(f"samples must be > 0, got {samples}")
    training = spec.training
    device = pick_device(device) if isinstance(device, str) else device
    step_batch = batch_size or training.micro_batch_size
    if step_batch < training.micro_batch_size:
        raise ValueError(f"batch_size {step_batch} is smaller than the micro-batch size {training.micro_batch_size}")
    info = model_info(spec.model)
    if spec.data.resolution != info.sample_size:
        raise ValueError(f"data.resolution {spec.data.resolution} does not match model {spec.model} "
                         f"({info.sample_size}x{info.sample_size})")

    # 1. the model, built from config with the run's seed, and the data source
    model, scheduler = build_for_spec(spec)
    place_model(model, device)
    source = open_source(spec.data, channels=info.channels)
    sketch = GradientSketch(model, spec.verification.sketch_size, seed=training.seed)
    params = trainable_parameters(model)
    optimizer = optimizer_for(training)(params)  # clips the step's gradient to max_grad_norm, as swarm nodes do
    logger.info("train-local %s: %s (%d parameters) on %s, %s, %d samples, %d per step", spec.run_id, spec.model,
                info.parameters, device, source, samples, step_batch)

    # 2. the loop: micro-batches accumulate into .grad until a step's worth of samples, then step
    losses: list[float] = []
    trained, in_step, parts, steps = 0, 0, 0, 0
    started = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task("train", total=samples, rate=0.0, loss=float("nan"))
        for index, (pass_index, indices) in enumerate(_micro_batches(source, training.seed, samples,
                                                                     training.micro_batch_size)):
            seed = micro_batch_seed(training.seed, spec.run_id, pass_index, LOCAL_NODE_ID, index)
            record = compute_micro_batch(model, scheduler, source.get(indices), seed,
                                         prediction_type=training.prediction_type, sketch=sketch, index=index)
            losses.append(record.loss)
            trained, in_step, parts = trained + len(indices), in_step + len(indices), parts + 1
            elapsed = time.perf_counter() - started
            out_of_time = max_seconds is not None and elapsed >= max_seconds
            if in_step >= step_batch or trained >= samples or out_of_time:
                # the accumulated grad is a sum of micro-batch means: divide to get the mean over the step
                for param in params:
                    if param.grad is not None:
                        param.grad.div_(parts)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                in_step, parts, steps = 0, 0, steps + 1
            bar.update(task, completed=trained, rate=trained / max(elapsed, 1e-9),
                       loss=sum(losses[-FINAL_LOSS_WINDOW:]) / len(losses[-FINAL_LOSS_WINDOW:]))
            if out_of_time:
                break
    seconds = time.perf_counter() - started
    model.eval()

    # 3. quality of samples (digits, and captioned digits drawn from their prompts), then the checkpoint and previews
    quality = None
    parts, prompts = run_drawing(source)
    if quality_samples and parts is not None and prompts == DIGIT_PROMPTS:
        labels = torch.arange(quality_samples) % 10  # each digit's prompt in turn
        images = torch.cat([draw(model, scheduler, len(chunk), quality_steps, training.seed + i, parts=parts,
                                 prompts=prompts) for i, chunk in enumerate(labels.split(100))])
        quality = quality_score(images, labels=labels)
    elif quality_samples and spec.data.source == "builtin:digits":
        quality = quality_score(generate(model, scheduler, quality_samples, quality_steps, seed=training.seed))
    window = losses[-FINAL_LOSS_WINDOW:]
    result = TrainResult(
        losses=losses, samples=trained, seconds=seconds, samples_per_second=trained / seconds,
        final_loss=sum(window) / len(window), quality=quality, optimizer_steps=steps,
        extras={"run_id": spec.run_id, "model": spec.model, "device": str(device), "batch_size": step_batch,
                "micro_batch_size": training.micro_batch_size, "threads": torch.get_num_threads()},
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        save_model(model.to("cpu"), scheduler, out_dir, parts=parts)
        previews = draw(model, scheduler, spec.checkpoints.preview_samples, QUALITY_STEPS, training.seed, parts=parts,
                        prompts=prompts)
        save_grid(previews, out_dir / "preview.png")
        summary = {k: v for k, v in asdict(result).items() if k != "losses"}
        (out_dir / "train_local.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("train-local %s: %d samples in %.1f s (%.0f/s), final loss %.4f, quality %s", spec.run_id, trained,
                seconds, result.samples_per_second, result.final_loss, quality)
    return result
