"""Benchmark omi.models on this machine: training throughput and peak memory per model, the cost of the gradient
sketch against the backward pass, cross-thread determinism, and the quality of train-local on digits over time.

    .venv/bin/python -m bench.bench_models                 # ~8 minutes: quality after 1 and 3 minutes
    .venv/bin/python -m bench.bench_models --minutes 1,3,10
    .venv/bin/python -m bench.bench_models --quick         # ~2 minutes: fewer steps, quality after 0.5 minutes

Each model is measured in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own. Writes the "models"
section of docs/benchmarks.md.
"""

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

logger = logging.getLogger(__name__)

# model -> (micro-batch size, timed steps, timed steps with --quick); the big UNets get a small batch and few steps
MODELS = {"unet-digits-16": (32, 20, 8), "unet-32": (8, 4, 2), "unet-64": (2, 3, 1)}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker_throughput(model_name: str, batch: int, steps: int) -> dict:
    """Time compute_micro_batch + AdamW steps, and split one micro-batch into forward, backward, norm, sketch."""
    from omi.models import GradientSketch, build_model, compute_micro_batch, model_info
    from omi.models.microbatch import gradient_segments, trainable_parameters

    info = model_info(model_name)
    rss_before = _rss_mib()
    model, scheduler = build_model(model_name)
    sketch = GradientSketch(model, 1024, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.rand(batch, info.channels, info.sample_size, info.sample_size) * 2 - 1

    def step(seed: int) -> None:
        compute_micro_batch(model, scheduler, data, seed, prediction_type="epsilon", sketch=sketch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)  # warm-up: allocator, AdamW state
    started = time.perf_counter()
    for seed in range(1, steps + 1):
        step(seed)
    seconds = time.perf_counter() - started

    # one micro-batch taken apart, as compute_micro_batch does it
    params = trainable_parameters(model)
    timesteps = torch.randint(0, 1000, (batch,))
    parts = {"forward": [], "backward": [], "norm": [], "sketch": []}
    for _ in range(max(2, min(steps, 5))):
        t0 = time.perf_counter()
        loss = ((model(data, timesteps).sample - data) ** 2).mean()
        t1 = time.perf_counter()
        grads = torch.autograd.grad(loss, params)
        t2 = time.perf_counter()
        segments = gradient_segments(list(grads), params)
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(values) for _, values in segments]))
        t3 = time.perf_counter()
        sketch.of_segments(segments)
        t4 = time.perf_counter()
        for name, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[name].append(value)
    median = {name: sorted(values)[len(values) // 2] for name, values in parts.items()}
    return {"model": model_name, "parameters": info.parameters, "batch": batch, "steps": steps,
            "samples_per_second": batch * steps / seconds, "peak_rss_mib": _rss_mib(),
            "rss_delta_mib": _rss_mib() - rss_before, **{f"{k}_ms": 1000 * v for k, v in median.items()}}


def worker_determinism(path: str) -> None:
    """Compute four digits micro-batches and save their records and flat gradients."""
    from omi.models import GradientSketch, build_model, compute_micro_batch, micro_batch_seed, open_source
    from omi.models.microbatch import flatten_grads, trainable_parameters
    from omi.protos import pb

    model, scheduler = build_model("unet-digits-16")
    source = open_source(pb.DataSpec(source="builtin:digits", shard_size=64, resolution=16))
    sketch = GradientSketch(model, 1024, seed=0)
    out = []
    for i in range(4):
        model.zero_grad(set_to_none=True)
        record = compute_micro_batch(model, scheduler, source.get(range(32 * i, 32 * i + 32)),
                                     micro_batch_seed(0, "digits", 0, "bench", i), prediction_type="epsilon",
                                     sketch=sketch, index=i)
        params = trainable_parameters(model)
        out.append((record.loss, record.grad_norm, record.sketch, flatten_grads([p.grad for p in params], params)))
    torch.save(out, path)


def _run_worker(args: list[str], threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "bench.bench_models", "--threads", str(threads), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout


def bench_throughput(quick: bool, threads: int) -> str:
    rows = ["| model | parameters | micro-batch | samples/s | peak RSS (MiB) | forward ms | backward ms | "
            "norm ms | sketch ms | sketch / backward |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, (batch, steps, quick_steps) in MODELS.items():
        stats = json.loads(_run_worker(["--worker", "throughput", "--model", name, "--batch", str(batch),
                                        "--steps", str(quick_steps if quick else steps)], threads).splitlines()[-1])
        print(json.dumps(stats))
        rows.append(f"| {name} | {stats['parameters'] / 1e6:.2f} M | {batch} | {stats['samples_per_second']:.1f} | "
                    f"{stats['peak_rss_mib']:.0f} | {stats['forward_ms']:.1f} | {stats['backward_ms']:.1f} | "
                    f"{stats['norm_ms']:.2f} | {stats['sketch_ms']:.2f} | "
                    f"{100 * stats['sketch_ms'] / stats['backward_ms']:.2f} % |")
    return "\n".join(rows)


def bench_determinism() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: f"{tmp}/{name}.pt" for name in ("1a", "1b", "2")}
        for name, path in paths.items():
            _run_worker(["--worker", "determinism", "--out", path], threads=int(name[0]))
        runs = {name: torch.load(path, weights_only=False) for name, path in paths.items()}
    same = all(torch.equal(a[3], b[3]) and a[0] == b[0] and torch.equal(a[2], b[2])
               for a, b in zip(runs["1a"], runs["1b"], strict=True))
    worst = {"grad max abs": 0.0, "grad rel": 0.0, "loss rel": 0.0, "norm rel": 0.0, "sketch rel": 0.0}
    for (loss1, norm1, sketch1, grad1), (loss2, norm2, sketch2, grad2) in zip(runs["1a"], runs["2"], strict=True):
        worst["grad max abs"] = max(worst["grad max abs"], float((grad1 - grad2).abs().max()))
        worst["grad rel"] = max(worst["grad rel"], float((grad1 - grad2).norm() / grad2.norm()))
        worst["loss rel"] = max(worst["loss rel"], abs(loss1 - loss2) / abs(loss2))
        worst["norm rel"] = max(worst["norm rel"], abs(norm1 - norm2) / abs(norm2))
        worst["sketch rel"] = max(worst["sketch rel"], float((sketch1 - sketch2).norm() / sketch2.norm()))
    print("determinism:", same, worst)
    return (f"Two processes with 1 torch thread each, 4 digits micro-batches of 32: bitwise equal gradients, losses "
            f"and sketches: **{same}**.\n\n1 thread against 2 threads, worst of the 4 micro-batches: "
            + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + ".")


def bench_calibration() -> str:
    """Relative differences honest and dishonest recomputations show, against Tolerances' defaults."""
    import copy

    from omi.models import GradientSketch, Tolerances, build_model, compare, compute_micro_batch, open_source
    from omi.protos import pb

    model, scheduler = build_model("unet-digits-16")
    source = open_source(pb.DataSpec(source="builtin:digits", shard_size=64, resolution=16))
    sketch = GradientSketch(model, 1024, seed=0)

    def record(m=model, batch=None, seed=7):
        m.zero_grad(set_to_none=True)
        batch = source.get(range(32)) if batch is None else batch
        return compute_micro_batch(m, scheduler, batch, seed, prediction_type="epsilon", sketch=sketch)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(30):  # away from the initialisation, where gradients are atypical
        record(batch=source.get(range(32 * (i + 1), 32 * (i + 2))), seed=i)
        optimizer.step()
    reference = record()
    double = copy.deepcopy(model).double()
    one_swapped, half_swapped = source.get(range(32)), source.get(range(32))
    one_swapped[31], half_swapped[16:] = source.get([600])[0], source.get(range(500, 516))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = record()
    stale = copy.deepcopy(model)
    stale_optimizer = torch.optim.AdamW(stale.parameters(), lr=1e-3)
    record(stale, source.get(range(900, 932)), seed=5)
    stale_optimizer.step()
    cases = {
        "float64 recompute (honest, other precision)": record(double),
        "bfloat16 autocast": bf16,
        "1 of 32 samples swapped": record(batch=one_swapped),
        "16 of 32 samples swapped": record(batch=half_swapped),
        "another seed": record(seed=8),
        "parameters one AdamW step apart": record(stale),
    }
    tol = Tolerances()
    rows = ["| recomputation against the float32 record | loss | norm | sketch | passes defaults |",
            "|---|---|---|---|---|",
            f"| **default Tolerances** | {tol.loss:.0e} | {tol.norm:.0e} | {tol.sketch:.0e} | |"]
    for name, other in cases.items():
        check = compare(other, reference, tol)
        rows.append(f"| {name} | {check.loss_diff:.1e} | {check.norm_diff:.1e} | {check.sketch_diff:.1e} | "
                    f"{check.passed} |")
    print("\n".join(rows))
    return "\n".join(rows)


def bench_quality(minutes: list[float], batch_size: int) -> str:
    from omi.models import train_local
    from omi.protos.runspec import load_runspec

    spec = load_runspec("examples/runs/digits.toml")
    rows = ["| minutes | samples | optimizer steps | samples/s | final loss | confidence | coverage | FID |",
            "|---|---|---|---|---|---|---|---|"]
    for budget in minutes:
        result = train_local(spec, 10**9, device="cpu", progress=False, batch_size=batch_size,
                             max_seconds=60 * budget)
        q = result.quality
        print(f"quality after {budget} min: {result.samples} samples, loss {result.final_loss:.4f}, {q}")
        rows.append(f"| {budget:g} | {result.samples} | {result.optimizer_steps} | {result.samples_per_second:.0f} | "
                    f"{result.final_loss:.4f} | {q.confidence:.3f} | {q.coverage:.1f} | {q.fid:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps; quality after 0.5 minutes")
    parser.add_argument("--minutes", default=None, help="train-local budgets for the quality table, e.g. 1,3,10")
    parser.add_argument("--batch-size", type=int, default=32, help="train-local samples per optimizer step")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--worker", choices=["throughput", "determinism"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker == "throughput":
        print(json.dumps(worker_throughput(args.model, args.batch, args.steps)))
        return
    if args.worker == "determinism":
        worker_determinism(args.out)
        return

    from bench.report import write_section

    logging.basicConfig(level=logging.WARNING)
    minutes = [float(m) for m in (args.minutes or ("0.5" if args.quick else "1,3")).split(",")]
    load = os.getloadavg()
    started = time.perf_counter()
    throughput = bench_throughput(args.quick, args.threads)
    determinism = bench_determinism()
    calibration = bench_calibration()
    quality = bench_quality(minutes, args.batch_size)
    body = f"""Load average when it started: {load[0]:.1f} (other jobs share the 2 cores, so figures vary run to run).
Each row of the first table ran in its own process with {args.threads} torch thread(s); `compute_micro_batch`
(forward, backward, record, sketch of 1,024 buckets) plus an AdamW step, random data.

{throughput}

"sketch / backward" is the CountSketch (`GradientSketch.of_segments`) against the backward pass of the same
micro-batch (goal: < 2 %); "norm" is gathering the gradient pieces (small tensors concatenated, large
ones in place) and their L2 norm for the record. Small micro-batches make the backward pass cheap, so the big
UNets' ratios here (batch 8 and 2) are upper bounds.

### Determinism (unet-digits-16)

{determinism}

### Tolerance calibration (unet-digits-16, micro-batch of 32, after 30 training steps)

Relative differences (as `omi.models.replay.compare` computes them) of a recomputation against the honest float32
record: honest ones must pass, careless or dishonest ones must fail.

{calibration}

### Quality of `train-local` on digits

`omi-node train-local --run examples/runs/digits.toml --batch-size {args.batch_size}` stopped after each budget
(each row a fresh run), scored on 256 DDIM-50 samples. Real digits score confidence ~0.99, coverage 1.0, FID 5-10
(256 random real digits); the untrained model about confidence 0.67, coverage 0.3, FID ~790.

{quality}

Benchmark wall time: {time.perf_counter() - started:.0f} s.
"""
    write_section("models", "Models: throughput, memory, sketch cost, determinism, train-local quality", body)


if __name__ == "__main__":
    main()
