"""A local swarm on 127.0.0.1: one coordinator (gRPC, dashboard, DHT bootstrap peer) and N volunteers.

    make demo                                   # = python scripts/demo.py
    python scripts/demo.py --volunteers 3 --state-dir demo-state --minutes 10

Everything runs as separate processes, exactly as people would start them by hand; their logs go to
``<state-dir>/logs/``. The terminal shows the run's progress from the coordinator's API. Ctrl-C stops the
volunteers gracefully (they leave the run), then the coordinator.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from omi.coordinator.credentials import TLS_CERT_FILENAME
from omi.protos import pb, rpc
from omi.protos.channels import open_channel, pinned
from rich.console import Console
from rich.live import Live
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
console = Console()


def wait_for_grpc(address: str, state_dir: Path, process: subprocess.Popen, timeout: float = 60.0) -> str:
    """Wait until the coordinator answers ListRuns (bounded), or fail if it exited; returns its address with its TLS
    certificate pinned (read from its state dir), which the volunteers get."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the coordinator exited with code {process.returncode}; see its log")
        certificate = state_dir / TLS_CERT_FILENAME
        if certificate.exists():
            target = pinned(address, certificate.read_bytes())
            try:
                with open_channel(target) as channel:
                    rpc.CoordinatorStub(channel).ListRuns(pb.ListRunsRequest(), timeout=1.0)
                return target
            except grpc.RpcError:
                pass
        time.sleep(0.5)
    sys.exit(f"the coordinator did not answer on {address} within {timeout:.0f} s")


def progress_table(status: pb.RunStatus, volunteers: list[subprocess.Popen], dashboard: str) -> Table:
    summary = status.summary
    table = Table(title=f"omi-swarm demo · {dashboard}", show_header=False, title_justify="left", min_width=56)
    table.add_column(style="dim")
    table.add_column(justify="right")
    state = pb.RunState.Name(summary.state).removeprefix("RUN_STATE_").lower()
    alive = sum(p.poll() is None for p in volunteers)
    for name, value in [
        ("run", f"{summary.run_id} ({state})"), ("model", summary.model), ("round", str(summary.round)),
        ("samples trained", f"{summary.total_samples:,}"),
        ("samples/s (ledger, last minute)", f"{status.samples_per_second:,.0f}"),
        ("volunteers online", f"{summary.volunteers_online} (processes alive: {alive}/{len(volunteers)})"),
        ("last loss", f"{status.last_loss:.4f}" if status.last_loss else "—"),
        ("contributions", str(status.contributions)),
    ]:
        table.add_row(name, value)
    return table


def stop(process: subprocess.Popen, name: str, timeout: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            console.print(f"{name} did not stop within {timeout:.0f} s; killing it")
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volunteers", type=int, default=2, help="volunteer processes to start (default 2)")
    parser.add_argument("--state-dir", type=Path, default=ROOT / "demo-state", help="coordinator and node state")
    parser.add_argument("--run", type=Path, default=ROOT / "examples/runs/digits.toml",
                        help="RunSpec TOML (default: the digits run in DiLoCo rounds)")
    parser.add_argument("--grpc", default="127.0.0.1:50051", help="coordinator gRPC address")
    parser.add_argument("--http", default="127.0.0.1:8080", help="dashboard address")
    parser.add_argument("--minutes", type=float, default=0, help="stop by itself after this long (0: Ctrl-C)")
    parser.add_argument("--fresh", action="store_true", help="delete the state dir first")
    args = parser.parse_args()

    if args.fresh and args.state_dir.exists():
        shutil.rmtree(args.state_dir)
    logs = args.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # two cores shared by several processes: one torch thread each avoids oversubscription
    env.setdefault("OMP_NUM_THREADS", "1")

    coordinator = subprocess.Popen(
        [BIN / "omi-coordinator", "serve", "--state-dir", args.state_dir / "coordinator", "--grpc", args.grpc,
         "--http", args.http, "--run", args.run],
        stdout=open(logs / "coordinator.log", "ab"), stderr=subprocess.STDOUT, env=env)
    volunteers: list[subprocess.Popen] = []
    dashboard = f"http://{args.http}"
    try:
        target = wait_for_grpc(args.grpc, args.state_dir / "coordinator", coordinator)
        console.print(f"coordinator: gRPC on [bold]{args.grpc}[/bold], dashboard on [bold]{dashboard}[/bold], "
                      f"logs in {logs}")
        for i in range(args.volunteers):
            volunteers.append(subprocess.Popen(
                [BIN / "omi-node", "join", "--coordinator", target, "--state-dir", args.state_dir / f"node-{i}",
                 "--name", f"demo-volunteer-{i}", "--quiet"],
                stdout=open(logs / f"node-{i}.log", "ab"), stderr=subprocess.STDOUT, env=env))
        console.print(f"{args.volunteers} volunteers started; Ctrl-C stops the demo")
        deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
        with open_channel(target) as channel, Live(console=console, refresh_per_second=1) as live:
            stub = rpc.CoordinatorStub(channel)
            run_id = stub.ListRuns(pb.ListRunsRequest(), timeout=5).runs[0].run_id
            while deadline is None or time.monotonic() < deadline:
                if coordinator.poll() is not None:
                    console.print(f"the coordinator exited with code {coordinator.returncode}")
                    break
                try:
                    live.update(progress_table(stub.GetRunStatus(pb.GetRunStatusRequest(run_id=run_id), timeout=5),
                                               volunteers, dashboard))
                except grpc.RpcError as e:
                    console.print(f"status unavailable: {e.code().name}")
                time.sleep(1.0)
    except KeyboardInterrupt:
        console.print("stopping: volunteers leave first, then the coordinator")
    finally:
        for i, volunteer in enumerate(volunteers):
            stop(volunteer, f"volunteer {i}", timeout=60)
        stop(coordinator, "the coordinator", timeout=30)
        console.print(f"demo stopped; state kept in {args.state_dir} (--fresh starts over)")


if __name__ == "__main__":
    main()
