"""Text-to-image (issue 13): data preparation throughput, the captioned digits' conditional quality, shard fetching,
and the transformer's throughput and peak memory per size on this machine.

    python -m bench.bench_text_to_image --threads 1                  # writes the "text_to_image" section
    python -m bench.bench_text_to_image --threads 1 --samples 16000,32000 --big

1. **Preparation**: ``omi-data toy-parts`` (the toy autoencoder fitted to the digits) and ``omi-data prepare
   builtin:digits``, timed; samples/s of the encoding.
2. **Conditional quality**: ``train-local`` of ``examples/runs/digits-captioned.toml`` on the prepared data for each
   sample count, one AdamW step per micro-batch of 32 (as a volunteer's inner steps); 250 samples drawn through a
   stock SanaPipeline, 25 per digit prompt, guidance 4.5 (the pipeline's default); the share the digit classifier
   assigns to the prompt's digit (goal >= 90 %, a model that ignores the prompt: 10 %), beside confidence, coverage
   and FID (the unconditional score).
3. **Shard fetch**: a node's source over HTTP from a coordinator-like file server reading one work shard: bytes
   fetched against the data set's size, and seconds to the first micro-batch.
4. **Throughput and peak memory** of one training micro-batch (forward + backward through ``compute_micro_batch``)
   per model size: the toy at 8 samples; with ``--big``, ``sana-600m`` at 1 sample of 32x32 latents (1024 px).
"""

import argparse
import functools
import http.server
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "examples" / "runs" / "digits-captioned.toml"


def prepare_data(root: Path) -> dict:
    from omi.models.prepare import prepare
    from omi.models.toy_parts import make_toy_parts

    started = time.perf_counter()
    parts, mse = make_toy_parts("sana-digits", root / "parts", steps=200)
    fitted = time.perf_counter()
    manifest = prepare("builtin:digits", parts, root / "data", model="sana-digits", shard_size=64)
    done = time.perf_counter()
    return dict(fit_seconds=fitted - started, reconstruction_mse=mse, prepare_seconds=done - fitted,
                samples=manifest.samples, samples_per_second=manifest.samples / (done - fitted),
                bytes=sum(s.bytes for s in manifest.shards), shards=len(manifest.shards))


def conditional_quality(data: Path, samples: int) -> dict:
    from omi.models import train_local
    from omi.protos.runspec import load_runspec

    spec = load_runspec(RUN)
    spec.data.source = f"manifest:{data}"
    # train-local's default: one AdamW step per micro-batch, as a volunteer's inner steps take them
    result = train_local(spec, samples, device="cpu", progress=False, quality_samples=250, quality_steps=20)
    return dict(samples=result.samples, seconds=result.seconds, samples_per_second=result.samples_per_second,
                loss=result.final_loss, guided=result.quality)


def fetch_figures(data: Path) -> dict:
    from omi.models.latent_source import LatentShardSource

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(data))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cache = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    try:
        started = time.perf_counter()
        source = LatentShardSource(f"http://127.0.0.1:{server.server_address[1]}", 64, 32, cache_dir=cache)
        source.get(list(range(5 * 64, 5 * 64 + 32)))
        seconds = time.perf_counter() - started
    finally:
        server.shutdown()
        shutil.rmtree(cache, ignore_errors=True)
    total = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    return dict(fetched=source.fetched_bytes, total=total, seconds=seconds)


def step_figures(name: str, batch: int) -> dict:
    """One model size in a fresh process, so its peak memory is its own."""
    out = subprocess.run([sys.executable, "-m", "bench.bench_text_to_image", "--worker", name, "--batch", str(batch),
                          "--threads", str(torch.get_num_threads())], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return dict(error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker(name: str, batch: int) -> None:
    from omi.models import build_model, compute_micro_batch, model_info
    from omi.models.flow import LatentBatch
    from omi.models.text_to_image import latent_config

    model, scheduler = build_model(name)
    config = latent_config(name)
    side = config.transformer["sample_size"]
    latents = torch.randn(batch, config.transformer["in_channels"], side, side)
    captions = [torch.randn(20, config.transformer["caption_channels"]) for _ in range(batch)]
    micro = LatentBatch.collate(latents, captions, torch.randn(1, config.transformer["caption_channels"]))
    times = []
    for step in range(3):
        started = time.perf_counter()
        compute_micro_batch(model, scheduler, micro, step, prediction_type="flow", sketch=None)
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    best = min(times[1:])  # the first step warms up
    # VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across fork + exec, so a worker would report its
    # parent's peak (7.7 GB, from drawing the quality samples, in the first run)
    peak_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
    print(json.dumps(dict(model=name, parameters=model_info(name).parameters, batch=batch, seconds=best,
                          samples_per_second=batch / best, peak_rss_gb=peak_kb / 2**20)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--samples", default="32000", help="train-local sample counts, comma-separated")
    parser.add_argument("--big", action="store_true", help="also time sana-600m (about 10 GB of memory)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args.worker, args.batch)
    from bench.report import write_section

    root = Path(tempfile.mkdtemp(prefix="bench-t2i-"))
    try:
        prep = prepare_data(root)
        print(f"prepare: {prep}", flush=True)
        quality = [conditional_quality(root / "data", int(n)) for n in args.samples.split(",")]
        for row in quality:
            print(f"train-local {row['samples']}: {row['guided']}", flush=True)
        fetch = fetch_figures(root / "data")
        print(f"fetch: {fetch}", flush=True)
        steps = [step_figures("sana-digits", 8)] + ([step_figures("sana-600m", 1)] if args.big else [])
        print(f"steps: {steps}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    command = "python -m bench.bench_text_to_image " + " ".join(sys.argv[1:])
    lines = [f"Command: `{command}` on cpu, {args.threads} torch thread(s).", "",
             "**Preparation** of the captioned digits (`omi-data toy-parts` + `omi-data prepare builtin:digits`):",
             f"the toy autoencoder fitted in {prep['fit_seconds']:.0f} s (200 steps, reconstruction MSE "
             f"{prep['reconstruction_mse']:.4f}); {prep['samples']:,} samples encoded in "
             f"{prep['prepare_seconds']:.1f} s "
             f"(**{prep['samples_per_second']:.0f} samples/s**, captions and latents), {prep['shards']} shards, "
             f"{prep['bytes'] / 1e6:.1f} MB.", "",
             "**Conditional quality** (`train-local`, examples/runs/digits-captioned.toml, one AdamW step per "
             "micro-batch of 32 as a volunteer's inner steps; 250 samples through a stock "
             "SanaPipeline, 25 per digit prompt, 20 Euler steps, guidance 4.5; goal: >= 90 % of samples are the "
             "digit their prompt names, 10 % for a model that ignores it):", "",
             "| samples | train time | samples/s | loss | matches its prompt | confidence | coverage | FID |",
             "|---|---|---|---|---|---|---|---|"]
    for row in quality:
        q = row["guided"]
        verdict = "✓" if q.prompt_accuracy >= 0.9 else "✗"
        lines.append(f"| {row['samples']:,} | {row['seconds']:.0f} s | {row['samples_per_second']:.0f} | "
                     f"{row['loss']:.4f} | **{q.prompt_accuracy:.1%}** {verdict} | {q.confidence:.3f} | "
                     f"{q.coverage:.1f} | {q.fid:.1f} |")
    lines += ["", f"**Shard fetch**: a node's source over HTTP reading one work shard fetched "
              f"{fetch['fetched']:,} of the data set's {fetch['total']:,} bytes "
              f"({fetch['fetched'] / fetch['total']:.1%}: the manifest's one shard and the empty prompt) and had its "
              f"first micro-batch {fetch['seconds']:.2f} s after opening (loopback).", "",
              "**One training micro-batch** (forward + backward, `compute_micro_batch`, random latents and captions):",
              "", "| model | parameters | batch | seconds | samples/s | peak RSS |", "|---|---|---|---|---|---|"]
    for row in steps:
        if "error" in row:
            lines.append(f"| ? | | | failed: {row['error']} | | |")
            continue
        lines.append(f"| {row['model']} | {row['parameters']:,} | {row['batch']} | {row['seconds']:.3f} | "
                     f"{row['samples_per_second']:.3g} | {row['peak_rss_gb']:.2f} GB |")
    lines += ["", "No GPU was lent for this run: bf16 autocast, gradient checkpointing and the audit tolerances on a "
              "GPU are not measured."]
    write_section("text_to_image", "Text-to-image: preparation, conditional quality, shard fetch, step cost",
                  "\n".join(lines))


if __name__ == "__main__":
    main()
