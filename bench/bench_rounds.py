"""Benchmark DiLoCo rounds as an algorithm: bytes on the wire per trained sample against the quality reached.

    .venv/bin/python -m bench.bench_rounds --threads 1           # the full table, 38,400 samples per row (~1 h)
    .venv/bin/python -m bench.bench_rounds --quick --threads 1   # smoke test: 3,840 samples, H in {1, 20} (~4 min)
    .venv/bin/python -m bench.bench_rounds --samples 76800 --device cuda --out rounds.json
    .venv/bin/python -m bench.bench_rounds --rows H20-uniform8bit,H500-uniform8bit
    .venv/bin/python -m bench.bench_rounds --threads 1 --samples 51200 --section rounds_4bit \
        --rows H20-topk0.05-sgd,H30-topk0.03q4-sgd                    # top-k with 4-bit values

**Simulated** (one process, no hivemind networking): K = 2 workers train the digits run
(examples/runs/digits.toml, model ``unet-digits-16``) in DiLoCo rounds as swarm/rounds.py does. Each round
every worker starts from the global parameters θ_r, takes H inner steps (the RunSpec's ``ClippedAdamW``, one per
micro-batch of 32, its optimizer state kept across rounds) on micro-batches from its own half of a seeded shuffle of
the digits, and computes Δ_k = θ_r − θ_k. The butterfly all-reduce of ``RoundAllReduceRunner`` is replayed part by
part: hivemind's ``TensorPartContainer`` splits the Δ tensors among the K reducers exactly as the averager does;
each sender's part goes through the compression once (sender → reducer; the reducer's own part does not travel),
the reducer takes the sample-weighted mean and the mean goes through the compression once more (reducer → every
member, the reducer included, as ``ExactResultMixin`` does). Every worker then applies the RunSpec's outer SGD
(examples/runs/digits.toml: plain SGD at lr 1, no momentum) with grad = the average. With overlap, round r+1
starts from θ_{r+1} = Outer(θ_r, avg Δ_{r−1}); the last round's average is applied after the loop, so every
trained sample reaches the scored model.

**Measured**: bytes on the wire, the sum of ``serialize_torch_tensor(part, compression).ByteSize()`` of every part
a butterfly all-reduce sends (each worker sends (K−1)/K of its Δ and receives (K−1)/K of the average), per trained
sample, against data-parallel training (a float32 all-reduce of the gradient after every global batch of K × 32
samples, measured the same way: the reference of the bytes goal); and the quality (confidence, coverage, FID of
DDIM samples, ``quality_score``) against ``train-local`` (one process, the same AdamW stepping every micro-batch of
32) at the same number of samples.

Times are for one thread on 2 CPU cores shared with other jobs; there, two torch threads ran ~8× slower.
Writes the "rounds" section of docs/benchmarks.md (not with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import diffusers
import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import CompressionBase, CompressionInfo, deserialize_torch_tensor
from omi.models import (
    QualityScore,
    build_for_spec,
    compute_micro_batch,
    generate,
    load_pretrained,
    micro_batch_seed,
    model_info,
    open_source,
    pick_device,
    quality_score,
    train_local,
)
from omi.models.data import DataSource
from omi.models.microbatch import trainable_parameters
from omi.models.optimizer import optimizer_for
from omi.models.quality import one_thread
from omi.protos import pb
from omi.protos.runspec import load_runspec
from omi.swarm.compression import COMPRESSIONS, TopKErrorFeedback, top_k_feedback  # also fixes the 8-bit decoder
from omi.swarm.rounds import outer_optimizer, outer_step
from rich import get_console
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

logger = logging.getLogger(__name__)

RUN = Path(__file__).resolve().parent.parent / "examples" / "runs" / "digits.toml"
WORKERS = 2  # K
DEFAULT_SAMPLES = 38_400  # 600 inner steps of 32 per worker: a whole number of rounds for every H of the table
QUICK_SAMPLES = 3_840  # 60 inner steps per worker: 3 rounds at H = 20
DEFAULT_ROWS = ("H1-none", "H1-uniform8bit", "H5-none", "H5-uniform8bit", "H20-none", "H20-float16",
                "H20-uniform8bit", "H50-none", "H50-uniform8bit", "H200-none", "H200-uniform8bit",
                "H20-uniform8bit-overlap")
QUICK_ROWS = ("H1-none", "H1-uniform8bit", "H20-none", "H20-uniform8bit", "H20-uniform8bit-overlap")
DEFAULT_RUN_ROW = "H20-topk0.05-sgd"  # examples/runs/digits.toml's [rounds]
QUALITY = (256, 50)  # DDIM samples scored, DDIM steps: as train-local scores
QUICK_QUALITY = (128, 20)
GOAL_REDUCTION = 1000.0  # the bytes goal: ≥ 1000× fewer bytes than a float32 all-reduce per global batch ...
GOAL_QUALITY = 0.05  # ... with FID at most 5 % above train-local's and confidence at most 5 % below
LOSS_WINDOW = 20  # micro-batches per worker averaged into the final loss


@dataclass(frozen=True)
class Row:
    """One setting of the table: H inner steps per round, the compression of Δ, overlap or not."""

    inner_steps: int  # H
    compression: str  # a key of omi.swarm.compression.COMPRESSIONS
    overlap: bool = False  # the outer update lands one round late
    density: float = 1.0  # < 1: top-k of Δ with error feedback (compression sparse8bit or sparse4bit)
    sgd: bool = False  # outer plain SGD, lr 1, no momentum (SparseLoCo's: error feedback carries the history)

    @property
    def name(self) -> str:
        kind = (f"topk{self.density:g}" + ("q4" if self.compression == "sparse4bit" else "") if self.density < 1
                else self.compression)
        return f"H{self.inner_steps}-{kind}" + ("-overlap" if self.overlap else "") + ("-sgd" if self.sgd else "")

    @classmethod
    def parse(cls, text: str) -> Row:
        """``H20-uniform8bit``, ``H20-uniform8bit-overlap``, ``H20-topk0.02`` (2 % of Δ, sparse8bit),
        ``H20-topk0.02q4`` (2 % of Δ, sparse4bit: 4-bit values, their rounding error fed back) or any of these with
        ``-sgd`` (outer SGD lr 1 without momentum instead of the RunSpec's outer optimizer)."""
        match = re.fullmatch(r"H(\d+)-(topk(0?\.\d+)(q4)?|[a-z0-9_]+?)(-overlap)?(-sgd)?", text.strip())
        dense = {name for name in COMPRESSIONS if not name.startswith("sparse")}
        if not match or int(match[1]) <= 0 or not (match[3] and 0 < float(match[3]) < 1 or match[2] in dense):
            raise ValueError(f"bad row {text!r}: expected H<inner steps>-<{'|'.join(sorted(dense))}|topk<density>"
                             f"[q4]>[-overlap][-sgd] (q4: 4-bit values), e.g. {DEFAULT_RUN_ROW}, H20-topk0.02 or "
                             "H30-topk0.03q4-sgd")
        if match[3]:
            compression = "sparse4bit" if match[4] else "sparse8bit"
            return cls(int(match[1]), compression, bool(match[5]), float(match[3]), bool(match[6]))
        return cls(int(match[1]), match[2], bool(match[5]), sgd=bool(match[6]))


# ---------------------------------------------------------------- the wire


def over_the_wire(part: torch.Tensor, compression: CompressionBase) -> tuple[torch.Tensor, int]:
    """``part`` as its receiver decodes it, and the serialized bytes it took. Encoded by the compression object,
    as hivemind's ``TensorPartContainer`` encodes a sender's parts and ``ExactResultMixin`` the averages."""
    message = compression.compress(part, CompressionInfo.from_tensor(part))
    return deserialize_torch_tensor(message), message.ByteSize()


def butterfly_all_reduce(deltas: list[list[torch.Tensor]], weights: list[float],
                         compression: CompressionBase) -> tuple[list[torch.Tensor], int]:
    """The sample-weighted mean of every worker's tensors as ``RoundAllReduceRunner`` computes it, and the bytes
    all workers sent for it.

    Reducer p owns the parts hivemind's ``TensorPartContainer`` assigns to peer p (equal peer fractions). For each
    of its parts it receives every other sender's part compressed, adds its own uncompressed, and sends the mean,
    compressed, to the K−1 others; every member, p included, uses that decoded mean.
    """
    num_peers, total = len(deltas), float(sum(weights))
    parts = [[TensorPartContainer(tensors, [1.0] * num_peers, compression=compression).get_raw_input_parts(p)
              for p in range(num_peers)] for tensors in deltas]  # parts[sender][reducer]: that reducer's parts
    averaged, sent = [], 0
    # hivemind's 8-bit quantizer calls torch.quantize_per_tensor once per tensor part: with two threads on two
    # busy cores each call waits ~7 ms for the thread pool, with one it takes microseconds (measured)
    with one_thread():
        for reducer in range(num_peers):
            for index in range(len(parts[reducer][reducer])):
                accumulator = torch.zeros_like(parts[reducer][reducer][index])
                for sender, weight in enumerate(weights):
                    part = parts[sender][reducer][index]
                    if sender != reducer:
                        part, size = over_the_wire(part, compression)
                        sent += size
                    accumulator.add_(part, alpha=weight)
                mean, size = over_the_wire(accumulator / total, compression)
                sent += (num_peers - 1) * size
                averaged.append(mean)
    flat = torch.cat(averaged)  # reducers own consecutive ranges, in order: this is the flat vector again
    shapes = [t.shape for t in deltas[0]]
    return [piece.view(shape) for piece, shape in zip(flat.split([s.numel() for s in shapes]), shapes,
                                                       strict=True)], sent


def allreduce_bytes(params: list[torch.Tensor], num_workers: int, compression: str) -> int:
    """Bytes of one butterfly all-reduce of random tensors shaped like ``params``. With ``none``, what data-parallel
    training sends per global batch: the float32 gradient, averaged."""
    tensors = [torch.randn_like(p, requires_grad=False) for p in params]
    return butterfly_all_reduce([tensors] * num_workers, [1.0] * num_workers, COMPRESSIONS[compression]())[1]


# ---------------------------------------------------------------- the workers


def worker_order(num_samples: int, seed: int, worker: str, share: int, shares: int) -> Iterator[tuple[int, int]]:
    """Endless (pass, sample index) stream over share ``share`` of ``shares`` of a seeded shuffle of the data;
    each pass visits the share in a new seeded order (the same for every row, so rows differ only in the
    algorithm)."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    mine = order.chunk(shares)[share].tolist()
    pass_index = 0
    while True:
        generator = torch.Generator().manual_seed(micro_batch_seed(seed, "order", pass_index, worker, 0))
        for i in torch.randperm(len(mine), generator=generator).tolist():
            yield pass_index, mine[i]
        pass_index += 1


@dataclass
class Worker:
    """One simulated volunteer: its local model, its inner AdamW (state kept across rounds) and its data."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    order: Iterator[tuple[int, int]]
    micro_batches: int = 0
    losses: list[float] = field(default_factory=list)
    feedback: TopKErrorFeedback | None = None  # top-k of Δ with error feedback, as RoundOptimizer does

    def start_round(self, theta: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, g in zip(trainable_parameters(self.model), theta, strict=True):
                p.copy_(g.to(p.device, p.dtype))

    def inner_steps(self, steps: int, spec: pb.RunSpec, source: DataSource, scheduler) -> int:
        """``steps`` AdamW steps, one per micro-batch; returns the samples trained."""
        training, samples = spec.training, 0
        for _ in range(steps):
            chunk = [next(self.order) for _ in range(training.micro_batch_size)]
            seed = micro_batch_seed(training.seed, spec.run_id, chunk[0][0], self.name, self.micro_batches)
            record = compute_micro_batch(self.model, scheduler, source.get([index for _, index in chunk]), seed,
                                         prediction_type=training.prediction_type, sketch=None,
                                         index=self.micro_batches)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.losses.append(record.loss)
            self.micro_batches += 1
            samples += record.samples
        return samples

    def delta(self, theta: list[torch.Tensor]) -> list[torch.Tensor]:
        """The pseudo-gradient θ_r − θ_k as it is sent: float32 on the CPU, top-k'd if the row says so."""
        delta = [g - p.detach().to("cpu", torch.float32) for g, p in zip(theta, trainable_parameters(self.model),
                                                                          strict=True)]
        return self.feedback(delta) if self.feedback is not None else delta


# ---------------------------------------------------------------- one row


@dataclass
class RowResult:
    """What one row trained, sent and reached."""

    row: str
    inner_steps: int
    compression: str
    overlap: bool
    rounds: int  # all-reduces
    samples: int  # trained by all workers together
    bytes: int  # sent by all workers together, over all rounds
    bytes_per_sample: float
    reduction: float  # float32 all-reduce (data-parallel) bytes per sample / this row's
    final_loss: float  # mean of the last LOSS_WINDOW micro-batches of every worker
    quality: QualityScore
    fid_vs_local: float  # (FID − local FID) / local FID
    within_quality: bool  # FID ≤ (1 + GOAL_QUALITY) × local's and confidence ≥ (1 − GOAL_QUALITY) × local's
    seconds: float  # training and all-reduce simulation (not the quality score)


@dataclass
class RoundsRun:
    """A row's training: the model holding the final θ, and what it took."""

    model: torch.nn.Module  # on the training device
    scheduler: object  # the run's DDPM scheduler, for sampling
    rounds: int  # all-reduces
    samples: int  # trained by all workers together
    bytes: int  # sent by all workers together
    final_loss: float
    seconds: float


def recent_loss(workers: list[Worker]) -> float:
    """The mean over workers of each one's last LOSS_WINDOW micro-batch losses."""
    return sum(sum(w.losses[-LOSS_WINDOW:]) / len(w.losses[-LOSS_WINDOW:]) for w in workers) / len(workers)


def train_rounds(spec: pb.RunSpec, row: Row, samples: int, device: torch.device,
                 advance: Callable[[int, float], None]) -> RoundsRun:
    """Train ``samples`` samples (all workers together) in DiLoCo rounds; ``advance(samples, loss)`` reports
    progress after every round. The last round is shorter when H does not divide the steps per worker."""
    training = spec.training
    model, scheduler = build_for_spec(spec)
    source = open_source(spec.data, channels=model_info(spec.model).channels)
    theta = [p.detach().to("cpu", torch.float32, copy=True) for p in trainable_parameters(model)]
    rounds_spec = pb.RoundsSpec()
    rounds_spec.CopyFrom(spec.rounds)
    if row.sgd:
        rounds_spec.outer_learning_rate, rounds_spec.outer_momentum, rounds_spec.outer_nesterov = 1.0, 0.0, False
    outer = outer_optimizer(theta, rounds_spec)
    workers = []
    for k in range(WORKERS):
        local = copy.deepcopy(model).to(device).train()
        name = f"worker-{k}"
        workers.append(Worker(name, local, optimizer_for(training)(trainable_parameters(local)),
                              worker_order(len(source), training.seed, name, k, WORKERS),
                              feedback=top_k_feedback(row.compression, row.density)))
    compression = COMPRESSIONS[row.compression]()
    steps_per_worker = samples // (WORKERS * training.micro_batch_size)
    done = rounds = sent = trained = 0
    pending = None  # overlap: the average of the previous round, applied at the end of this one
    started = time.perf_counter()
    while done < steps_per_worker:
        # 1. every worker takes up to H inner steps from θ_r
        steps = min(row.inner_steps, steps_per_worker - done)
        deltas, weights = [], []
        for worker in workers:
            worker.start_round(theta)
            weights.append(float(worker.inner_steps(steps, spec, source, scheduler)))
            deltas.append(worker.delta(theta))
        # 2. the compressed butterfly all-reduce of Δ
        averaged, size = butterfly_all_reduce(deltas, weights, compression)
        sent, rounds, done, trained = sent + size, rounds + 1, done + steps, trained + int(sum(weights))
        # 3. the outer step: this round's average, or with overlap the previous round's
        if row.overlap:
            averaged, pending = pending, averaged
        if averaged is not None:
            outer_step(outer, theta, averaged)
        advance(int(sum(weights)), recent_loss(workers))
    if pending is not None:  # the last round's average lands as it would at the next round's end
        outer_step(outer, theta, pending)
    seconds = time.perf_counter() - started
    workers[0].start_round(theta)
    logger.info("%s: %d rounds, %d samples, %.2f MB sent, %.0f s", row.name, rounds, trained, sent / 1e6, seconds)
    return RoundsRun(workers[0].model, scheduler, rounds, trained, sent, recent_loss(workers), seconds)


def score(model: torch.nn.Module, scheduler, quality: tuple[int, int], seed: int) -> QualityScore:
    """The quality of ``quality[0]`` DDIM samples in ``quality[1]`` steps, seeded as train-local seeds them."""
    return quality_score(generate(model, scheduler, quality[0], quality[1], seed=seed))


def within(q: QualityScore, local: QualityScore) -> bool:
    """The goal's quality bar: FID at most GOAL_QUALITY above train-local's, confidence at most GOAL_QUALITY below."""
    return q.fid <= (1 + GOAL_QUALITY) * local.fid and q.confidence >= (1 - GOAL_QUALITY) * local.confidence


def measure_local(spec: pb.RunSpec, samples: int, device: torch.device, quality: tuple[int, int]) -> dict:
    """train-local on ``samples`` samples, one AdamW step per micro-batch, scored with the rows' sampling seed and
    once more with another seed: how far FID moves with the sampling noise alone."""
    training = spec.training
    with tempfile.TemporaryDirectory() as folder:
        result = train_local(spec, samples, device=device, out_dir=folder, batch_size=training.micro_batch_size,
                             quality_samples=quality[0], quality_steps=quality[1])
        model, scheduler = load_pretrained(folder, device=device)
    reseeded = score(model, scheduler, quality, training.seed + 1)
    logger.info("train-local: %s (another sampling seed: %s), final loss %.4f, %.0f s", result.quality, reseeded,
                result.final_loss, result.seconds)
    return dict(samples=result.samples, final_loss=result.final_loss, seconds=result.seconds,
                quality=asdict(result.quality), reseeded_quality=asdict(reseeded),
                fid_noise=abs(reseeded.fid - result.quality.fid) / result.quality.fid)


def measure_row(spec: pb.RunSpec, row: Row, samples: int, device: torch.device, quality: tuple[int, int], *,
                local: QualityScore, step_bytes_per_sample: float, advance: Callable[[int, float], None]) -> RowResult:
    """Train one row, score it and set its bytes and quality against the baselines."""
    run = train_rounds(spec, row, samples, device, advance)
    q = score(run.model, run.scheduler, quality, spec.training.seed)
    per_sample = run.bytes / run.samples
    result = RowResult(row=row.name, inner_steps=row.inner_steps, compression=row.compression, overlap=row.overlap,
                       rounds=run.rounds, samples=run.samples, bytes=run.bytes, bytes_per_sample=per_sample,
                       reduction=step_bytes_per_sample / per_sample, final_loss=run.final_loss, quality=q,
                       fid_vs_local=(q.fid - local.fid) / local.fid, within_quality=within(q, local),
                       seconds=run.seconds)
    logger.info("%s: %s, %.0f× fewer bytes than data-parallel float32", row.name, q, result.reduction)
    return result


# ---------------------------------------------------------------- the report (from the raw figures of --out)


HEADERS = ["row", "rounds", "bytes/sample", "vs float32", "loss", "confidence", "coverage", "FID", "FID vs local"]
CAPTION = ("◀ the default run (examples/runs/digits.toml); ✓ within the quality bar "
           f"(FID ≤ +{100 * GOAL_QUALITY:g} %, confidence ≥ −{100 * GOAL_QUALITY:g} % of train-local's)")


def table_cells(figures: dict) -> list[list[str]]:
    """One list of cells per row, train-local first."""
    local = figures["local"]
    q = local["quality"]
    cells = [["train-local", "", "", "", f"{local['final_loss']:.4f}", f"{q['confidence']:.3f}",
              f"{q['coverage']:.1f}", f"{q['fid']:.1f}", ""]]
    for r in figures["rows"]:
        q = r["quality"]
        cells.append([r["row"] + (" ◀" if r["row"] == DEFAULT_RUN_ROW else ""), f"{r['rounds']}",
                      f"{r['bytes_per_sample']:,.0f}", f"{r['reduction']:,.0f}×", f"{r['final_loss']:.4f}",
                      f"{q['confidence']:.3f}", f"{q['coverage']:.1f}", f"{q['fid']:.1f}",
                      f"{100 * r['fid_vs_local']:+.1f} %" + (" ✓" if r["within_quality"] else "")])
    return cells


def print_table(figures: dict, console: Console) -> None:
    table = Table(*HEADERS, title="DiLoCo rounds: bytes per trained sample against quality", caption=CAPTION)
    for cells in table_cells(figures):
        table.add_row(*cells)
    console.print(table)
    console.print(figures["goal"].replace("**", ""))


def markdown_table(figures: dict) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for cells in table_cells(figures):
        name = f"**{cells[0]}**" if cells[0].endswith("◀") else cells[0]
        lines.append("| " + " | ".join([name, *cells[1:]]) + " |")
    return "\n".join(lines)


def goal_line(rows: list[dict]) -> str:
    """Whether any row reaches ≥ GOAL_REDUCTION× fewer bytes within the quality bar."""
    goal = (f"Goal (≥ {GOAL_REDUCTION:,.0f}× fewer bytes than a float32 all-reduce per global batch within "
            f"{100 * GOAL_QUALITY:g} % quality)")
    reached = [r["row"] for r in rows if r["reduction"] >= GOAL_REDUCTION and r["within_quality"]]
    if reached:
        return f"{goal}: reached by {', '.join(reached)}."
    best = max(rows, key=lambda r: r["reduction"])
    return (f"{goal}: **no row reaches it**; the largest reduction is {best['reduction']:,.0f}× ({best['row']}, "
            f"FID {100 * best['fid_vs_local']:+.1f} % against train-local).")


def section_body(figures: dict, command: str) -> str:
    """The "rounds" section of docs/benchmarks.md."""
    s, step, local = figures["settings"], figures["data_parallel"], figures["local"]
    return f"""Command: `{command}` on {s['device']}, {s['threads']} torch thread(s), in one process (no networking):
{s['workers']} workers train `{s['model']}` on digits in DiLoCo rounds as `swarm/rounds.py` does — H inner
`ClippedAdamW` steps (lr {s['learning_rate']}, one per micro-batch of {s['micro_batch_size']}, each worker on its own
half of a seeded shuffle, its AdamW state kept across rounds), the pseudo-gradients all-reduced part by part as
`RoundAllReduceRunner` does (hivemind's `TensorPartContainer` split, each sender's part compressed once, the
sample-weighted mean compressed once), then the run's outer SGD (lr {s['outer_learning_rate']}, momentum
{s['outer_momentum']}{', Nesterov' if s['outer_nesterov'] else ''}; `-sgd` rows: lr 1, no momentum). Overlap: the outer
step of a round's end applies the previous round's mean. Every row trains {s['samples']:,} samples (both workers
together); train-local trains as many, one AdamW step per micro-batch.
Seed {s['seed']} (`[training] seed`: initial weights, data order, noise, sampling).

Bytes: the measured `ByteSize()` of every serialized part a butterfly all-reduce sends (each worker sends (K−1)/K of
its Δ and receives (K−1)/K of the mean), per trained sample. "vs float32": data-parallel training, one
float32 all-reduce of the gradient per global batch of {step['samples_per_allreduce']} samples
({step['bytes_per_allreduce']:,} bytes, {step['bytes_per_sample']:,.0f} per sample; the reference of the bytes goal),
divided by the row's bytes per sample. Quality:
{s['quality_samples']} DDIM-{s['quality_steps']} samples scored by `quality_score`, the same sampling seed for every
row; "loss": mean of each worker's last {LOSS_WINDOW} micro-batches (train-local: its last {LOSS_WINDOW}).

{markdown_table(figures)}

{CAPTION}.

{figures['goal']}

Sampling noise: train-local's model scored with another sampling seed gives FID
{local['reseeded_quality']['fid']:.1f} ({100 * local['fid_noise']:.1f} % away from {local['quality']['fid']:.1f}), so
FID differences of that size are noise. An 8-bit part
carries a 1,032-byte codebook and the averager splits Δ per parameter tensor ({s['tensors']} tensors in
`{s['model']}`), so uniform8bit sends {s['uniform8bit_ratio']:.1f}× fewer bytes than float32 here, not 4×.

Benchmark wall time: {s['wall_seconds']:.0f} s.
"""


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=None,
                        help=f"samples trained per row, all workers together (default {DEFAULT_SAMPLES}, "
                             f"--quick {QUICK_SAMPLES})")
    parser.add_argument("--quick", action="store_true", help="smoke test: few samples, H in {1, 20}, small score")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--rows", default=None,
                        help="comma-separated rows such as H20-uniform8bit,H20-uniform8bit-overlap "
                             f"(default: {','.join(DEFAULT_ROWS)})")
    parser.add_argument("--out", default=None, help="write the raw figures to this JSON file")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--section", default="rounds", help="the section of docs/benchmarks.md to write")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (1 is much faster when other jobs share the cores)")
    parser.add_argument("--seed", type=int, default=None,
                        help="replace the run's [training] seed (initial weights, data order, noise, sampling): "
                             "a replicate of the table with other random draws")
    args = parser.parse_args()
    spec = load_runspec(RUN)
    if args.seed is not None:
        spec.training.seed = args.seed
    training = spec.training
    samples = args.samples or (QUICK_SAMPLES if args.quick else DEFAULT_SAMPLES)
    step_samples = WORKERS * training.micro_batch_size
    if samples <= 0 or samples % step_samples:
        parser.error(f"--samples must be a positive multiple of {step_samples} (K × micro-batch)")
    try:
        rows = [Row.parse(text) for text in (args.rows.split(",") if args.rows else
                                             QUICK_ROWS if args.quick else DEFAULT_ROWS)]
    except ValueError as e:
        parser.error(str(e))

    torch.set_num_threads(args.threads)
    console = get_console()  # the one train-local's progress bar draws on
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    # hivemind's 8-bit quantizer calls torch.quantize_per_tensor, deprecated in torch; it is what the swarm runs
    warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")
    diffusers.utils.logging.set_verbosity_error()  # its advice to install accelerate when train-local's model loads
    device = pick_device(args.device)
    quality = QUICK_QUALITY if args.quick else QUALITY
    logger.info("%d workers, %d samples per row, %s on %s, quality on %d DDIM-%d samples", WORKERS, samples,
                spec.model, device, *quality)
    started = time.perf_counter()

    # 1. the bytes reference: data-parallel training's float32 all-reduce per global batch of K × micro-batch samples
    params = trainable_parameters(build_for_spec(spec)[0])
    step_bytes = allreduce_bytes(params, WORKERS, "none")
    uniform8bit_bytes = allreduce_bytes(params, WORKERS, "uniform8bit")
    logger.info("data-parallel float32 all-reduce: %d bytes per %d samples", step_bytes, step_samples)

    # 2. train-local at the same samples
    local = measure_local(spec, samples, device, quality)
    local_quality = QualityScore(**local["quality"])

    # 3. the rows
    results = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
                  TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=console) as bar:
        for row in rows:
            task = bar.add_task(row.name, total=samples, loss=float("nan"))
            results.append(measure_row(spec, row, samples, device, quality, local=local_quality,
                                       step_bytes_per_sample=step_bytes / step_samples,
                                       advance=lambda n, loss, task=task: bar.update(task, advance=n, loss=loss)))

    # 4. the report
    rows_figures = [asdict(r) for r in results]
    figures = dict(
        settings=dict(workers=WORKERS, samples=samples, model=spec.model, device=str(device), threads=args.threads,
                      seed=training.seed,
                      micro_batch_size=training.micro_batch_size,
                      learning_rate=training.learning_rate, outer_learning_rate=spec.rounds.outer_learning_rate,
                      outer_momentum=spec.rounds.outer_momentum, outer_nesterov=spec.rounds.outer_nesterov,
                      quality_samples=quality[0],
                      quality_steps=quality[1], tensors=len(params), uniform8bit_ratio=step_bytes / uniform8bit_bytes,
                      wall_seconds=time.perf_counter() - started),
        data_parallel=dict(bytes_per_allreduce=step_bytes, samples_per_allreduce=step_samples,
                           bytes_per_sample=step_bytes / step_samples),
        local=local, rows=rows_figures, goal=goal_line(rows_figures))
    print_table(figures, console)
    console.print(f"wall time {figures['settings']['wall_seconds']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
        logger.info("wrote %s", args.out)
    if not args.quick and not args.no_docs:
        from bench.report import write_section

        command = shlex.join(["python", "-m", "bench.bench_rounds", *sys.argv[1:]])
        title = "DiLoCo rounds: bytes on the wire against quality (the algorithm alone)"
        write_section(args.section, title if args.section == "rounds" else f"{title}: {args.section}",
                      section_body(figures, command))


if __name__ == "__main__":
    main()
