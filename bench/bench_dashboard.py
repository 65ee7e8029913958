"""Dashboard under 200 viewers on loopback, and what it costs the volunteers' gRPC calls in the same process.

    .venv/bin/python -m bench.bench_dashboard                 # 200 viewers, 8 s per phase (about 40 s in all)
    .venv/bin/python -m bench.bench_dashboard --viewers 50 --seconds 4 --no-report

The coordinator (gRPC API and dashboard in one asyncio loop, SQLite in a temporary state dir) serves from its
own process. Simulated volunteers (``omi.node.client.CoordinatorClient``, in a second process) register, report
a contribution each, then send signed heartbeats at a steady rate for the whole run; their latency is the
"gRPC" figure. Three phases follow one another:

1. baseline: heartbeats only;
2. page: plus ``--viewers`` viewers (a third process, one keep-alive HTTP connection each) polling what the page
   polls: status and history every 2 s, contributors and checkpoints every third time;
3. saturation: the same viewers asking for the status back to back, as fast as the coordinator answers.

Goal: in the page phase, the heartbeats' p99 within 10 % of the baseline.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.bench_coordinator import round_hashes, serve_until_signalled
from bench.identities import identities
from bench.report import write_section

RUN_ID = "bench"
BENCH_RUN = f"""
[run]
id = "{RUN_ID}"
model = "unet-digits-16"
[data]
source = "builtin:digits"
shard_size = 64
[training]
shards_per_assignment = 1
[verification]
audit_rate = 0.0
"""
PAGE_POLL = 2.0   # seconds between a viewer's polls (dashboard.js POLL_MS)
SLOW_EVERY = 3    # contributors and checkpoints every 3rd poll (dashboard.js SLOW_EVERY)
GOAL_SLOWDOWN = 0.10
CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] if len(values) > 1 else (values or [0.0])[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- the coordinator's process

def _serve(state_dir: str, grpc_port: int, http_port: int, ready) -> None:
    from omi.coordinator.config import CoordinatorConfig, RegistryConfig, ServerConfig, WorkConfig
    from omi.coordinator.server import CoordinatorServer
    from omi.coordinator.work import uniform_layout
    from omi.dashboard.app import create_app

    limits = RegistryConfig(register_rate=1e6, register_burst=10**6, node_rate=1e6, node_burst=10**6)
    config = ServerConfig(state_dir=Path(state_dir), grpc_address=f"127.0.0.1:{grpc_port}",
                          http_address=f"127.0.0.1:{http_port}", swarm_host=None,
                          coordinator=CoordinatorConfig(registry=limits, metrics_interval=1.0,
                                                        work=WorkConfig(0)))  # every volunteer is on 127.0.0.1
    # a synthetic 1 M-sample layout, so that every simulated volunteer gets shards (the data is never read)
    server = CoordinatorServer(config, http_app=create_app,
                               layout=lambda data: uniform_layout(1_000_000, data.shard_size))
    server.coordinator.runs.create(BENCH_RUN, start=True)
    serve_until_signalled(server, ready)


# ---------------------------------------------------------------- simulated volunteers (gRPC)

def _volunteers(address: str, count: int, rate: float, ready, stop, results) -> None:
    """Register ``count`` volunteers, one contribution each, then ``rate`` heartbeats/s in all until ``stop``."""
    from omi.node.client import CoordinatorClient
    from omi.protos import pb
    from omi.protos.signing import generate_key

    clients = []
    for i, identity in enumerate(identities(count)):
        client = CoordinatorClient(address, generate_key(), attempts=1, timeout=30)
        client.register(RUN_ID, identity, display_name=f"volunteer {i}")
        work = client.get_work(round_number=0)
        samples = sum(s.end - s.start for s in work.shards)
        client.report_contribution(pb.Contribution(
            round=0, assignment_id=work.assignment_id, samples=samples, mean_loss=0.3, compute_seconds=1.0,
            params_hash=b"p" * 32, commitment=b"c" * 32, micro_batches=1, gradient_sketch=[0.0] * 8,
            **round_hashes(BENCH_RUN, 1)))
        clients.append(client)
    ready.set()
    threads_n = 4
    samples: list[tuple[float, float]] = []  # (wall time sent, latency in seconds)

    def sender(mine: list) -> None:
        period = threads_n / rate
        next_at = time.perf_counter()
        i = 0
        while not stop.is_set():
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            client = mine[i % len(mine)]
            sent, start = time.time(), time.perf_counter()
            client.heartbeat(round_number=0, samples_per_second=random.uniform(50, 150), swarm_peers=count,
                             loss=random.uniform(0.2, 0.4))
            samples.append((sent, time.perf_counter() - start))
            next_at += period
            i += 1

    threads = [threading.Thread(target=sender, args=(clients[k::threads_n],)) for k in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(samples)


# ---------------------------------------------------------------- viewers (HTTP)

async def _get(reader, writer, path: str) -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return await reader.readexactly(int(CONTENT_LENGTH.search(head).group(1)))


async def _viewers(port: int, viewers: int, seconds: float, mode: str) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    base = f"/api/runs/{RUN_ID}"

    async def viewer(index: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        since, polls = 0, 0
        if mode == "page":
            await asyncio.sleep(PAGE_POLL * index / viewers)  # viewers opened the page at different moments
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                paths = [f"{base}/status"]
                if mode == "page":
                    paths.append(f"{base}/history?since={since}")
                    if polls % SLOW_EVERY == 0:
                        paths += [f"{base}/contributors", f"{base}/checkpoints"]
                for path in paths:
                    t = time.perf_counter()
                    try:
                        body = await _get(reader, writer, path)
                    except (AssertionError, OSError, asyncio.IncompleteReadError):
                        errors += 1
                        continue
                    latencies.append(time.perf_counter() - t)
                    if "/history" in path:
                        since = json.loads(body)["next_since_ms"]
                polls += 1
                if mode == "page":
                    await asyncio.sleep(max(0.0, PAGE_POLL - (time.perf_counter() - started)))
        finally:
            writer.close()

    await asyncio.gather(*(viewer(i) for i in range(viewers)))
    return latencies, errors


def _viewer_process(port: int, viewers: int, seconds: float, mode: str, results) -> None:
    results.put(asyncio.run(_viewers(port, viewers, seconds, mode)))


# ---------------------------------------------------------------- the run

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--viewers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    parser.add_argument("--volunteers", type=int, default=100, help="simulated volunteers sending heartbeats")
    parser.add_argument("--heartbeats", type=float, default=100.0, help="heartbeats per second from all of them")
    parser.add_argument("--no-report", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()

    ctx = multiprocessing.get_context("spawn")
    grpc_port, http_port = free_port(), free_port()
    phases: list[dict] = []
    with tempfile.TemporaryDirectory() as state_dir:
        server_ready = ctx.Event()
        server = ctx.Process(target=_serve, args=(state_dir, grpc_port, http_port, server_ready), daemon=True)
        server.start()
        volunteers = None
        try:
            assert server_ready.wait(60), "the coordinator did not start"
            ready, stop, grpc_results = ctx.Event(), ctx.Event(), ctx.Queue()
            from omi.coordinator.credentials import TLS_CERT_FILENAME
            from omi.protos.channels import pinned

            target = pinned(f"127.0.0.1:{grpc_port}", (Path(state_dir) / TLS_CERT_FILENAME).read_bytes())
            volunteers = ctx.Process(target=_volunteers, args=(target, args.volunteers,
                                                               args.heartbeats, ready, stop, grpc_results))
            volunteers.start()
            deadline = time.monotonic() + 120
            while not ready.wait(1):
                assert volunteers.is_alive() and time.monotonic() < deadline, "the volunteers did not register"
            time.sleep(2.0)  # warm-up; the history gets its first points meanwhile
            for name, mode in (("baseline (heartbeats only)", None), (f"page: {args.viewers} viewers", "page"),
                               (f"saturation: {args.viewers} viewers back to back", "saturate")):
                http_results = ctx.Queue()
                cpu_before, start = cpu_seconds(server.pid), time.time()
                viewer = None
                if mode is not None:
                    viewer = ctx.Process(target=_viewer_process,
                                         args=(http_port, args.viewers, args.seconds, mode, http_results))
                    viewer.start()
                    http = http_results.get(timeout=args.seconds + 60)
                    viewer.join(30)
                else:
                    time.sleep(args.seconds)
                    http = ([], 0)
                end = time.time()
                phases.append(dict(name=name, start=start, end=end, http=http[0], http_errors=http[1],
                                   server_cpu=cpu_seconds(server.pid) - cpu_before))
                print(f"{name}: done", flush=True)
            stop.set()
            heartbeats = grpc_results.get(timeout=60)
            volunteers.join(30)
        finally:
            for process in (volunteers, server):
                if process is not None and process.is_alive():
                    process.terminate()
                    process.join(30)

    rows = []
    baseline_p99 = None
    for phase in phases:
        grpc_lat = [lat for sent, lat in heartbeats if phase["start"] <= sent < phase["end"]]
        elapsed = phase["end"] - phase["start"]
        g99 = percentile(grpc_lat, 99) * 1000
        baseline_p99 = baseline_p99 or g99
        http = phase["http"]
        rows.append(dict(phase=phase["name"], http_rate=len(http) / elapsed if http else 0.0,
                         http_p50=percentile(http, 50) * 1000 if http else None,
                         http_p99=percentile(http, 99) * 1000 if http else None, http_errors=phase["http_errors"],
                         grpc_rate=len(grpc_lat) / elapsed, grpc_p50=percentile(grpc_lat, 50) * 1000, grpc_p99=g99,
                         slowdown=g99 / baseline_p99 - 1, cpu=phase["server_cpu"] / elapsed))

    def ms(value):
        return "–" if value is None else f"{value:.1f}"

    table = ["| phase | HTTP req/s | HTTP p50 ms | HTTP p99 ms | heartbeats/s | gRPC p50 ms | gRPC p99 ms | "
             "gRPC p99 vs baseline | coordinator CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['phase']} | {r['http_rate']:,.0f} | {ms(r['http_p50'])} | {ms(r['http_p99'])} | "
                     f"{r['grpc_rate']:,.0f} | {r['grpc_p50']:.1f} | {r['grpc_p99']:.1f} | {r['slowdown']:+.0%} | "
                     f"{r['cpu']:.0%} |")
    page = rows[1]
    verdict = (f"page load slows the heartbeats' p99 by {page['slowdown']:+.1%}: "
               + ("meets" if page["slowdown"] <= GOAL_SLOWDOWN else "misses")
               + f" the goal (<= {GOAL_SLOWDOWN:.0%})")
    errors = sum(r["http_errors"] for r in rows)
    body = "\n".join([
        f"One coordinator process (gRPC + dashboard in one asyncio loop, SQLite WAL) on loopback; "
        f"{args.volunteers} simulated volunteers (`omi.node.client`, another process) send "
        f"{args.heartbeats:g} signed heartbeats/s in all throughout; {args.viewers} viewers (a third process, one "
        f"keep-alive connection each) join for the page and saturation phases, {args.seconds:g} s each. The page "
        f"phase polls what `dashboard.js` polls (status + history every {PAGE_POLL:g} s, contributors + "
        f"checkpoints every {SLOW_EVERY}rd poll); saturation asks for the status back to back.",
        "",
        *table,
        "",
        f"**{verdict}.** HTTP errors: {errors}. API answers are computed at most once a second per run and "
        "served from cached bytes in between (`omi.dashboard.api.Snapshots`), so viewers cost the loop HTTP "
        "parsing and a copy, not database queries. The saturation row shows the ceiling: there the viewers take "
        "the loop's time and the heartbeats wait for it (the three processes share the machine's cores).",
        "",
        "`.venv/bin/python -m bench.bench_dashboard`",
    ])
    print(body)
    if not args.no_report:
        write_section("dashboard", f"Dashboard: {args.viewers} viewers and the volunteers' gRPC p99", body)


if __name__ == "__main__":
    main()
