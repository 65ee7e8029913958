"""Quality at equal wall-clock on this machine: `make demo` (coordinator + 2 volunteers) against `train-local`.

    .venv/bin/python -m bench.bench_demo                       # 5 minutes each: the demo, then train-local
    .venv/bin/python -m bench.bench_demo --minutes 2           # 2 minutes each

For each run file it starts ``scripts/demo.py`` (a real coordinator and two real volunteers, exactly what
``make demo`` runs) for ``--minutes``, then scores the newest checkpoint the coordinator published with the
project's quality score (confidence, coverage, FID on classifier features; 256 DDIM-50 samples), and the ledger's
samples. The baseline is ``train-local`` on the same run for the same wall time, in one process on this machine.
Goal (issue 11): the demo's checkpoint draws clean digits of all 10 classes (coverage 1.0) and its FID is within 2×
of train-local's. Writes the "demo" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omi.models import generate, load_pretrained, quality_score
from omi.models.train_local import train_local
from omi.protos.runspec import load_runspec

from bench.report import write_section

ROOT = Path(__file__).resolve().parent.parent
QUALITY_SAMPLES = 256


def run_demo(run_file: Path, minutes: float, workdir: Path) -> dict:
    """``scripts/demo.py`` for ``minutes``; the newest checkpoint's quality and the ledger's samples."""
    spec = load_runspec(run_file)
    subprocess.run([sys.executable, str(ROOT / "scripts/demo.py"), "--run", str(run_file), "--state-dir",
                    str(workdir), "--fresh", "--minutes", str(minutes)], check=True, stdout=subprocess.DEVNULL,
                   timeout=60 * minutes + 300)
    folders = sorted((workdir / "coordinator" / "checkpoints" / spec.run_id).glob("round-*"))
    with sqlite3.connect(workdir / "coordinator" / "coordinator.db") as db:
        samples = db.execute("SELECT coalesce(sum(samples), 0) FROM contributions WHERE status != 'voided'"
                             ).fetchone()[0]
    if not folders:
        return {"run": spec.run_id, "samples": samples, "checkpoint": None, "quality": None}
    model, scheduler = load_pretrained(folders[-1])
    return {"run": spec.run_id, "samples": samples, "checkpoint": folders[-1].name,
            "quality": quality_score(generate(model, scheduler, QUALITY_SAMPLES, 50, seed=0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="wall time of each demo and of train-local")
    parser.add_argument("--runs", default="examples/runs/digits.toml", help="run files to demo (comma-separated)")
    args = parser.parse_args()

    rows = []
    for run in args.runs.split(","):
        workdir = Path(tempfile.mkdtemp(prefix="omi-bench-demo-"))
        try:
            result = run_demo(ROOT / run, args.minutes, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(run, result)
        q = result["quality"]
        rows.append(f"| demo, `{run}` | {result['samples']:,} | {result['checkpoint'] or 'none yet'} | "
                    f"{q.confidence:.3f} | {q.coverage:.1f} | {q.fid:.1f} |" if q else
                    f"| demo, `{run}` | {result['samples']:,} | none yet | – | – | – |")
    torch.set_num_threads(1)  # as each volunteer of the demo
    local = train_local(load_runspec(ROOT / "examples/runs/digits.toml"), 10**9, device="cpu", progress=False,
                        max_seconds=60 * args.minutes, quality_samples=QUALITY_SAMPLES)
    q = local.quality
    print("train-local", local.samples, q)
    rows.append(f"| train-local (1 thread) | {local.samples:,} | its final model | {q.confidence:.3f} | "
                f"{q.coverage:.1f} | {q.fid:.1f} |")
    body = f"""Command: `python -m bench.bench_demo --minutes {args.minutes:g} --runs {args.runs}`. Each demo is
`scripts/demo.py` (what `make demo` runs: a coordinator and two volunteers on this 2-core machine) for
{args.minutes:g} minutes; its quality is the newest checkpoint the coordinator published (256 DDIM-50 samples);
train-local trains the digits run in one process for the same wall time. Goal: the demo's checkpoint covers all
10 classes (coverage 1.0) and its FID is within 2× of train-local's.

| what | samples | checkpoint | confidence | coverage | FID |
|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    write_section("demo", "Quality at equal wall-clock: the demo against train-local", body)


if __name__ == "__main__":
    main()
