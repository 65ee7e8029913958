"""CenteredClip's radius (``averaging.clip_tau``) for the captioned digits' Sana transformer, as
tests/test_verification.py calibrated it for the UNet digits: a lock-step swarm of four nodes (the real trainer,
coordinator and records; the ideal all-reduce) in which one node steps on its gradient x(-1000) while committing
honest records (``send_scaled``; audits are off). For each tau the honest nodes' final loss is compared with the
clean run's (the same identities, so the same samples and noise: paired); the plain mean is shown
beside it, and each radius in a swarm without the attacker (what clipping costs honest nodes). Goal: within 5 % of
the clean run.

    python -m bench.bench_clip_tau                    # prepares the captioned digits in a temporary folder (~25 s)
    python -m bench.bench_clip_tau --data data/digits-captioned --rounds 8 --taus 0.1 0.25 1
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from adversaries import ATTACKS, HONEST  # noqa: E402
from adversaries.sim import LockstepSwarm, sim_run_toml  # noqa: E402
from coordinator_helpers import ServerThread  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from omi.protos import signing  # noqa: E402

MODEL = "sana-digits"
NODES = ("honest-0", "honest-1", "honest-2", "fourth")


def captioned_toml(data: Path, *, reducer: str, clip_tau: float, inner_steps: int) -> str:
    """The lock-step run on the captioned digits' Sana transformer (flow matching, the prepared latents)."""
    toml = sim_run_toml(audit_rate=0.0, reducer=reducer, clip_tau=clip_tau, inner_steps=inner_steps)
    assert 'model = "unet-digits-16"' in toml and "[training]\n" in toml
    toml = toml.replace('model = "unet-digits-16"', f'model = "{MODEL}"')
    toml = toml.replace("[training]\n", '[training]\nprediction_type = "flow"\n', 1)
    return toml + f'[data]\nsource = "manifest:{data}"\nshard_size = 64\nresolution = 32\n'


def final_loss(workdir: Path, data: Path, *, reducer: str, clip_tau: float, attacker, rounds: int,
               inner_steps: int, seed: int) -> list[float]:
    toml = captioned_toml(data, reducer=reducer, clip_tau=clip_tau, inner_steps=inner_steps)
    with ServerThread(workdir / "state", toml, per_address=0) as server:
        spec = server.coordinator.runs.spec_for_nodes("sim")
        classes = {name: (attacker if name == "fourth" else HONEST) for name in NODES}
        for name in classes:  # the same identities in every run: the same samples and noise (paired)
            key = hashlib.sha256(f"{seed}-{name}".encode()).digest()
            signing.save_key(Ed25519PrivateKey.from_private_bytes(key), workdir / name / "node_key.pem")
        swarm = LockstepSwarm(server, spec, classes, workdir)
        try:
            return swarm.run(rounds).losses
        finally:
            swarm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a prepared captioned digits folder (default: prepare one)")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--inner-steps", type=int, default=4, help="inner steps per round")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="identity seeds (pairings)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="omi-clip-tau-") as scratch:
        data = args.data
        if data is None:
            from omi.models.prepare import prepare
            from omi.models.toy_parts import make_toy_parts

            parts, _ = make_toy_parts(MODEL, Path(scratch) / "parts", steps=20)
            data = Path(scratch) / "data"
            prepare("builtin:digits", parts, data, model=MODEL, shard_size=64)
        data = data.resolve()
        print(f"## CenteredClip radius for {MODEL} (lock-step swarm of 4, one x-1000 send_scaled node, "
              f"{args.rounds} rounds of {args.inner_steps} inner steps, final loss of the honest nodes vs the clean "
              f"run)\n")
        print("| seed | run | final loss | vs clean |\n|---|---|---|---|")
        for seed in args.seeds:
            runs = [("clean", "mean", 1.0, HONEST), ("mean", "mean", 1.0, ATTACKS["send_scaled"])]
            runs += [(f"centered_clip tau {tau:g}", "centered_clip", tau, ATTACKS["send_scaled"]) for tau in args.taus]
            # what the radius costs when every node is honest (a tight radius clips honest pseudo-gradients too)
            runs += [(f"centered_clip tau {tau:g}, no attacker", "centered_clip", tau, HONEST) for tau in args.taus]
            clean = None
            for i, (label, reducer, tau, attacker) in enumerate(runs):
                started = time.perf_counter()
                losses = final_loss(Path(scratch) / f"s{seed}-{i}", data, reducer=reducer, clip_tau=tau,
                                    attacker=attacker, rounds=args.rounds, inner_steps=args.inner_steps, seed=seed)
                loss = losses[-1]
                clean = loss if clean is None else clean
                print(f"| {seed} | {label} | {loss:.4f} | {100 * (loss - clean) / clean:+.1f} % "
                      f"({time.perf_counter() - started:.0f} s) |", flush=True)


if __name__ == "__main__":
    main()
