"""Benchmark the swarm against one process: quality at equal samples, compute utilization, bytes on the wire.

    .venv/bin/python -m bench.bench_swarm                  # 2 nodes: rounds, overlapped rounds (~10 min)
    .venv/bin/python -m bench.bench_swarm --nodes 2,3 --modes rounds --rounds 4

Modes, side by side in one invocation: ``rounds`` (DiLoCo as the default run does it: ``[rounds] inner_steps =
20``, top 5 % of Δ with error feedback, 8-bit, outer SGD at lr 1) and ``overlap`` (the same with the all-reduce
overlapped with the next round).

For each mode and swarm size it starts a real coordinator and N real `omi-node join` processes on 127.0.0.1 (the
first one alone, the others once it trains, as a swarm forms), lets each contribute ``--rounds`` rounds, and then:

- **quality at equal samples**: trains `train-local` in one process on as many samples as the swarm's ledger
  holds, one AdamW step per micro-batch as the inner optimizer steps, and compares the final loss (the swarm's:
  mean loss of the last round; the baseline's: train-local's ``final_loss``) and the quality score of a node's
  final model with the baseline's;
- **compute utilization**: per node, the share of wall time between its first and last contribution that it
  spent in forward/backward (the contributions' ``compute_seconds``) rather than waiting on the swarm;
- **bytes on the wire**: per node, what its libp2p daemon sent over TCP (``ss -ti`` bytes_sent of its sockets,
  polled every second), all nodes together per trained sample, against a full-precision (float32) butterfly
  all-reduce of the gradient every 256 samples (data-parallel training; the reference of the bytes goal),
  N × 2·(N−1)/N × 4 bytes × parameters / 256 per sample;
- **swarm throughput**: the ledger's samples over the wall time between the first and the last contribution.

Writes the "swarm" section of docs/benchmarks.md.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omi.models import generate, load_pretrained, model_info, quality_score
from omi.models.train_local import FINAL_LOSS_WINDOW, train_local
from omi.protos import pb
from omi.protos.runspec import parse_runspec

from bench.report import write_section

BIN = Path(sys.executable).parent
RUN = """
[run]
id = "digits"
model = "unet-digits-16"
[training]
micro_batch_size = 32
learning_rate = 0.002
[averaging]
matchmaking_time = 3.0
averaging_timeout = 30.0
[liveness]
heartbeat_interval = 2.0
heartbeat_timeout = 20.0
"""
# the default run's rounds (examples/runs/digits.toml): top 5 % of Δ with error feedback, 8-bit, plain outer SGD
ROUNDS = ('[rounds]\ninner_steps = 20\ncompression = "sparse8bit"\ntopk_density = 0.05\nouter_learning_rate = 1.0\n'
          'outer_momentum = 0.0\nouter_nesterov = false\n')
MODES = {  # name -> the [rounds] section of its RunSpec
    "rounds": ROUNDS,
    "overlap": ROUNDS + "overlap = true\n",
}
# the bytes reference: data-parallel training's float32 all-reduce of the gradient, once per this many samples (the
# batch the bytes goal was set against, and every swarm section of docs/benchmarks.md since)
STEP_SAMPLES = 256
QUALITY_SAMPLES = 256
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)


def p2pd_bytes_sent(state_dirs: dict[int, Path], seen: dict[tuple[int, str], int], net=None) -> None:
    """Record the bytes_sent of every TCP socket of each node's libp2p daemon (max over polls per socket); with a
    WAN (``net``), the sockets of every host's namespace."""
    pids = {}
    for line in subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines():
        if "p2pd" in line:
            for node, folder in state_dirs.items():
                if f"-id={folder}/p2p.id" in line:
                    pids[int(line.split()[0])] = node
    commands = [host.argv("ss", "-tinpH") for host in net.hosts] if net else [["ss", "-tinpH"]]
    output = "".join(subprocess.run(command, capture_output=True, text=True).stdout for command in commands)
    # ss prints a socket's line, then its details (with bytes_sent) on the next line
    for header, details in zip(output.splitlines()[::2], output.splitlines()[1::2], strict=False):
        pid_match = re.search(r"pid=(\d+)", header)
        sent = re.search(r"bytes_sent:(\d+)", details)
        if pid_match and sent and int(pid_match.group(1)) in pids:
            key = (pids[int(pid_match.group(1))], " ".join(header.split()[3:5]))
            seen[key] = max(seen.get(key, 0), int(sent.group(1)))


def run_swarm(nodes: int, rounds: int, workdir: Path, rounds_toml: str, wan_mbit: float | None = None) -> dict:
    """A coordinator and ``nodes`` volunteers of the run with ``[rounds]`` table ``rounds_toml`` until each
    contributed ``rounds`` rounds; returns the figures. With
    ``wan_mbit``, each volunteer runs on a host of its own (a network namespace, tests/wan.py) whose link is capped
    at that rate each way, and the coordinator listens on the bridge in the root namespace."""
    if wan_mbit is None:
        return _run_swarm(nodes, rounds, workdir, rounds_toml, None)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from wan import wan  # the harness of tests/test_wan.py

    with wan(nodes, rate_mbit=wan_mbit) as net:
        return _run_swarm(nodes, rounds, workdir, rounds_toml, net)


def _run_swarm(nodes: int, rounds: int, workdir: Path, rounds_toml: str, net) -> dict:
    run_file = workdir / "run.toml"
    run_file.write_text(RUN + rounds_toml)
    host = net.gateway if net else "127.0.0.1"
    grpc_address = f"{host}:{free_port()}"
    coordinator = start([BIN / "omi-coordinator", "serve", "--state-dir", workdir / "coordinator", "--grpc",
                         grpc_address, "--http", "", "--run", run_file, "--no-validator",  # the swarm alone
                         *(["--swarm-host", net.gateway] if net else [])], workdir / "coordinator.log")
    state_dirs = {i: workdir / f"node-{i}" for i in range(nodes)}
    processes: list[subprocess.Popen] = []
    sent: dict[tuple[int, str], int] = {}
    started = time.monotonic()
    try:
        time.sleep(8)  # the coordinator and its bootstrap peer come up
        for i in range(nodes):
            join = [BIN / "omi-node", "join", "--coordinator", grpc_address, "--state-dir", state_dirs[i], "--quiet",
                    "--max-rounds", rounds, "--save", workdir / f"model-{i}"]
            if net:  # inside host i; its swarm peer listens on the host's address, the one the others dial
                join = net.hosts[i].argv(*join, "--host", net.hosts[i].ip)
            processes.append(start(join, workdir / f"node-{i}.log"))
            if i == 0:  # the others join a swarm that already trains, as in a real run
                deadline = time.monotonic() + 120
                while "state: training" not in (workdir / "node-0.log").read_text() and time.monotonic() < deadline:
                    time.sleep(0.5)
        while any(p.poll() is None for p in processes):
            p2pd_bytes_sent(state_dirs, sent, net)
            if time.monotonic() - started > 60 * (5 + rounds):
                raise RuntimeError(f"the {nodes}-node swarm did not finish in time; see {workdir}")
            time.sleep(1.0)
    finally:
        for process in [*processes, coordinator]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
        for process in [*processes, coordinator]:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    with sqlite3.connect(workdir / "coordinator" / "coordinator.db") as db:
        rows = db.execute("SELECT message, received_at_ms FROM contributions ORDER BY received_at_ms").fetchall()
    contributions = [(pb.Contribution.FromString(m), at / 1000) for m, at in rows]
    by_node: dict[str, list] = {}
    for c, at in contributions:
        by_node.setdefault(c.node_id, []).append((c, at))
    utilization = []
    for items in by_node.values():
        if len(items) >= 3:  # the wall time between the first and last report covers the rounds after the first
            wall = items[-1][1] - items[0][1]
            utilization.append(sum(c.compute_seconds for c, _ in items[1:]) / wall)
    last_round = max(c.round for c, _ in contributions)
    rounds_done = len({c.round for c, _ in contributions})
    total = sum(c.samples for c, _ in contributions)
    final = [c for c, _ in contributions if c.round == last_round]
    node_bytes = [sum(v for (node, _), v in sent.items() if node == i) for i in range(nodes)]
    wall = contributions[-1][1] - contributions[0][1]
    params = model_info("unet-digits-16").parameters
    model, scheduler = load_pretrained(workdir / "model-0")
    quality = quality_score(generate(model, scheduler, QUALITY_SAMPLES, 50, seed=0))
    return {
        "nodes": nodes, "rounds": rounds_done, "samples": total,
        "final_loss": sum(c.mean_loss * c.samples for c in final) / sum(c.samples for c in final),
        "quality": quality, "utilization": utilization, "seconds": time.monotonic() - started,
        "bytes_per_node_round": [b / rounds for b in node_bytes],
        "bytes_per_sample": sum(node_bytes) / max(total, 1),  # all nodes' bytes over all samples trained
        # every node sends 2·(N−1)/N × 4 bytes × parameters per all-reduce: N of those per 256 samples of the swarm
        "allreduce_bytes_per_sample": nodes * 2 * (nodes - 1) / nodes * 4 * params / STEP_SAMPLES,
        "samples_per_second": total / max(wall, 1e-9),
    }


def run_local(samples: int) -> dict:
    """train-local on ``samples`` samples, one AdamW step per micro-batch (as a volunteer's inner steps)."""
    torch.set_num_threads(1)
    result = train_local(parse_runspec(RUN), samples, device="cpu", progress=False, quality_samples=QUALITY_SAMPLES)
    return {"final_loss": result.final_loss, "quality": result.quality, "seconds": result.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="2", help="swarm sizes to run (comma-separated)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"modes to run (comma-separated: {', '.join(MODES)})")
    parser.add_argument("--rounds", type=int, default=5, help="contributions (rounds) per node")
    parser.add_argument("--inner-steps", type=int, default=20,
                        help="H, inner steps per round (4 volunteers on digits need H <= 14: a round takes H x 32 "
                             "samples from each, and digits has 1,797)")
    parser.add_argument("--keep", action="store_true", help="keep the working folders")
    parser.add_argument("--wan", type=float, default=None, metavar="MBIT",
                        help="each volunteer on a host of its own (network namespace) capped at MBIT Mbit/s each way "
                             "(needs root); writes the 'swarm_wan' section instead of 'swarm'")
    parser.add_argument("--section", default=None,
                        help="the section of docs/benchmarks.md to write (default: 'swarm', or 'swarm_wan' with --wan)")
    args = parser.parse_args()

    rows = []
    for nodes in [int(n) for n in args.nodes.split(",")]:
        for mode in args.modes.split(","):
            workdir = Path(tempfile.mkdtemp(prefix=f"omi-bench-swarm-{mode}-{nodes}-"))
            rounds_toml = MODES[mode].replace("inner_steps = 20", f"inner_steps = {args.inner_steps}")
            swarm = run_swarm(nodes, args.rounds, workdir, rounds_toml, args.wan)
            local = run_local(swarm["samples"])
            print(json.dumps({"mode": mode, "swarm": {**swarm, "quality": str(swarm["quality"])},
                              "local": {**local, "quality": str(local["quality"])}}, indent=2, default=str))
            loss_ratio = swarm["final_loss"] / local["final_loss"]
            fid_ratio = swarm["quality"].fid / local["quality"].fid
            util = swarm["utilization"]
            ratio = swarm["allreduce_bytes_per_sample"] / max(swarm["bytes_per_sample"], 1e-9)
            rows.append(
                f"| {mode} | {nodes} | {swarm['rounds']} | {swarm['samples']:,} | {swarm['samples_per_second']:.0f} | "
                f"{swarm['final_loss']:.4f} / {local['final_loss']:.4f} ({loss_ratio:.2f}×) | {swarm['quality']} / "
                f"{local['quality']} (FID {fid_ratio:.2f}×) | {min(util):.0%}–{max(util):.0%} | "
                f"{swarm['bytes_per_sample'] / 1e3:.1f} kB vs {swarm['allreduce_bytes_per_sample'] / 1e3:.1f} kB "
                f"({ratio:.1f}× less) | {swarm['seconds']:.0f} s |")
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)

    where = ("on 127.0.0.1" if args.wan is None else
             f"each volunteer in a network namespace of its own whose link is capped at {args.wan:g} Mbit/s each way "
             "with `tc tbf` (tests/wan.py), the coordinator on the bridge in the root namespace")
    wan_flag = "" if args.wan is None else f" --wan {args.wan:g}"
    body = f"""Command: `python -m bench.bench_swarm --nodes {args.nodes} --modes {args.modes} --rounds {args.rounds} \
--inner-steps {args.inner_steps}{wan_flag}`. Each swarm is a real coordinator and real
`omi-node join` processes, {where}, one torch thread each, all on this 2-core machine; the first node starts alone
and the others join once it trains. Modes: rounds (DiLoCo as examples/runs/digits.toml: {args.inner_steps} inner
steps per node, top 5 % of Δ with error feedback, 8-bit, outer SGD at lr 1), overlap (rounds, all-reduce during the
next round). The baseline is `train-local` on the same number of samples, one AdamW step per 32-sample micro-batch
as the inner steps. Loss: mean of the last round (swarm) or of the last {FINAL_LOSS_WINDOW} micro-batches (local);
quality: 256 DDIM-50 samples of node 0's final model (swarm). Throughput: the ledger's samples over the wall time
between the first and last contribution. Utilization: compute seconds / wall seconds between a node's first and
last contribution (goal ≥ 95 %). Bytes: TCP bytes the nodes' libp2p daemons sent (pseudo-gradients, state downloads,
DHT), measured with `ss -ti`, per trained sample, against a float32 butterfly all-reduce of the gradient every
{STEP_SAMPLES} samples (data-parallel training; the reference of the bytes goal).

| mode | nodes | rounds | samples | samples/s | final loss swarm / local | quality swarm / local | utilization \
| bytes per sample vs float32 all-reduce | wall |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Goal: swarm within 5 % of local at equal samples (loss and quality). On 2 shared cores the nodes compete with
each other and the coordinator for CPU, so wall time and utilization here understate what separate machines do.
"""
    if args.wan is None:
        write_section(args.section or "swarm", "Swarm vs one process (quality, utilization, bytes)", body)
    else:
        write_section(args.section or "swarm_wan", f"Swarm across emulated WAN links of {args.wan:g} Mbit/s "
                      "(quality, utilization, bytes)", body)


if __name__ == "__main__":
    main()
