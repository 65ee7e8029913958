"""What an exact-parameter audit costs: an audited node's parameters fetched peer to peer vs. read from disk.

    python -m bench.bench_audit_params                      # unet-digits-16 and unet-64
    python -m bench.bench_audit_params --models unet-digits-16 --repeats 3

A coordinator's bootstrap DHT peer and two token-holding peers (a "node" serving with ``ParamsServer``, a
"validator" fetching with ``ParamsFetcher``) run on 127.0.0.1 in DHT processes of this process; each model's
parameters are fetched ``--repeats`` times. Baseline in the same run: writing the same safetensors bytes to a
file and reading them back (page cache). Also: the cost on the node (snapshot + serialise per audited round) and
one micro-batch's recomputation, which the fetch comes on top of. Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from omi import swarm  # noqa: E402
from omi.models import build_model, model_info, params_hash  # noqa: E402
from omi.protos import signing  # noqa: E402
from omi.swarm.params_p2p import ParamsFetcher, ParamsServer, snapshot  # noqa: E402
from safetensors.torch import load, save  # noqa: E402
from swarm_helpers import make_peer_files, make_spec  # noqa: E402

from bench.report import write_section  # noqa: E402


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def _measure(model_name: str, server: ParamsServer, fetcher: ParamsFetcher, peer: str, tmp: Path,
             repeats: int) -> tuple:
    """(model, parameters, MiB, node seconds, fetch seconds, disk seconds) of one model."""
    model, _ = build_model(model_name, seed=0)
    info = model_info(model_name)
    digest, limit = params_hash(model), info.bytes + (1 << 20)
    node_seconds = _median_seconds(lambda: server.hold(digest, snapshot(model)), repeats)
    fetcher.fetch(peer, digest, max_bytes=limit)  # warm-up: the connection
    fetch = _median_seconds(lambda: fetcher.fetch(peer, digest, max_bytes=limit), repeats)
    data = save(snapshot(model))
    path = tmp / f"{model_name}.safetensors"

    def disk():
        path.write_bytes(data)
        load(path.read_bytes())

    baseline = _median_seconds(disk, repeats)
    mib = len(data) / 2**20
    print(f"{model_name}: {mib:.1f} MiB, node snapshot+serialise {node_seconds:.3f} s, P2P fetch {fetch:.3f} s "
          f"({mib / fetch:.0f} MiB/s), disk write+read {baseline:.3f} s, ratio {fetch / baseline:.1f}x", flush=True)
    return model_name, info.parameters, mib, node_seconds, fetch, baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="unet-digits-16,unet-64", help="comma-separated model names")
    parser.add_argument("--repeats", type=int, default=3, help="fetches per model (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    key = signing.generate_key()
    spec = make_spec(key)
    bootstrap, maddrs = swarm.start_bootstrap_dht(key, spec)
    spec.initial_peers.extend(maddrs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dhts = []
        for name in ("node", "validator"):
            files = make_peer_files(Path(tmp) / name, key, spec)
            dhts.append(swarm.start_dht(spec, swarm.TokenFile(files.token_path),
                                        swarm_key=swarm.load_or_create_swarm_key(files.swarm_key_path),
                                        identity_path=files.identity_path))
        server = ParamsServer.start(dhts[0], spec)
        fetcher = ParamsFetcher(dhts[1], spec)
        try:
            time.sleep(3)  # both tokens published in the registry
            for model_name in args.models.split(","):
                rows.append(_measure(model_name, server, fetcher, dhts[0].peer_id.to_base58(), Path(tmp),
                                     args.repeats))
        finally:
            fetcher.shutdown()
            server.shutdown()
            for dht in dhts + [bootstrap]:
                dht.shutdown()
    body = ["An audited node's starting parameters handed to a validator over hivemind's P2P (two token-holding "
            f"peers on 127.0.0.1, median of {args.repeats}), against writing and reading the same safetensors "
            "bytes on the local disk in the same run.", "",
            "| model | parameters | MiB | node: snapshot + serialise | P2P fetch | MiB/s | disk write + read | "
            "fetch / disk |", "|---|---|---|---|---|---|---|---|"]
    for name, params, mib, node_seconds, fetch, baseline in rows:
        body.append(f"| {name} | {params:,} | {mib:.1f} | {node_seconds:.3f} s | {fetch:.3f} s | {mib / fetch:.0f} | "
                    f"{baseline:.3f} s | {fetch / baseline:.1f}× |")
    body += ["", "The node pays the snapshot every round (it learns that a round is audited only when it reports) "
             "and the serialisation only for audited rounds; the validator pays one fetch per audit whose "
             "parameters it does not already hold."]
    write_section("audit_params", "Exact-parameter audits: fetching the node's parameters", "\n".join(body))


if __name__ == "__main__":
    main()
