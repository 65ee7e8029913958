"""Verification figures: detection per attack, contributions until ban, false positives, compute share, loss vs clean.

    python -m bench.bench_verification            # writes the figures section of docs/verification.md
    python -m bench.bench_verification --quick    # fewer rounds and runs (a smoke test)

Three experiments, each driven by the real code (see docs/verification.md for what is simulated):

1. **Detection and tolerances**: every attack of ``tests/adversaries`` and honest nodes in the lock-step swarm of
   ``tests/adversaries/sim.py`` (real nodes training rounds, real coordinator over gRPC, real segment audits: the
   validator replays one segment from the training state the audited node serves, read in process here), every
   round audited, no bans.
2. **Contributions until ban**: many runs of one always-cheating identity through the real ``Ledger``/``Auditor``/
   ``Registry`` at the RunSpec's audit rate; each audit's outcome is drawn with the detection rate measured in 1.
3. **Loss vs clean and compute share**: lock-step runs with 30 % attackers (sign flip x-1, x-1000 and a node that
   commits honest records but steps on its gradient x-1000), ``mean`` vs ``centered_clip``, audits at 20 %.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from adversaries import ATTACKS, HONEST  # noqa: E402
from adversaries.sim import LockstepSwarm, sim_run_toml  # noqa: E402
from coordinator_helpers import ServerThread  # noqa: E402
from omi.coordinator.core import Coordinator  # noqa: E402
from omi.coordinator.registry import Caller  # noqa: E402
from omi.coordinator.store import Audit, Node, Store  # noqa: E402
from omi.models import MicroBatchRecord, merkle_root, record_to_proto, sent_sketch  # noqa: E402
from omi.node.client import register_request  # noqa: E402
from omi.protos import pb, signing  # noqa: E402
from omi.protos.peer_ids import new_identity  # noqa: E402

logger = logging.getLogger(__name__)

DOC = ROOT / "docs" / "verification.md"
CLIP_TAU = 0.25  # examples/runs/digits.toml's, calibrated in tests/test_verification.py
BEGIN, END = "<!-- figures: bench/bench_verification.py -->", "<!-- end of figures -->"
INNER_STEPS = 4  # inner steps per round of the detection runs (tests/test_verification.py's)
TRAINING_INNER_STEPS = 8  # inner steps per round of the training runs
SEGMENT_STEPS = 2  # inner steps per audited segment


def _node_names(server) -> dict[str, str]:
    with server.store.session() as s:
        return {n.node_id: n.display_name for n in s.query(Node)}


def detection(workdir: Path, rounds: int) -> dict[str, dict]:
    """Per class: audits, failed audits, worst honest differences (every round audited, nobody banned)."""
    toml = sim_run_toml(audit_rate=1.0, max_strikes=1000, audit_window=1, inner_steps=INNER_STEPS,
                        segment_steps=SEGMENT_STEPS)
    classes = {"honest-0": HONEST, "honest-1": HONEST, "honest-2": HONEST, **ATTACKS}
    with ServerThread(workdir / "state", toml, per_address=0) as server:
        spec = server.coordinator.runs.spec_for_nodes("sim")
        swarm = LockstepSwarm(server, spec, classes, workdir)
        result = swarm.run(rounds)
        swarm.close()
        names = _node_names(server)
        verdicts = {v.task_id: v for v in result.verdicts}
        rows: dict[str, dict] = {}
        with server.store.session() as s:
            for audit in s.query(Audit):
                name = names[audit.node_id]
                key = "honest" if name.startswith("honest") else name
                row = rows.setdefault(key, dict(audits=0, failed=0, first_round_skipped=0, max_diff=[0.0, 0.0, 0.0]))
                if audit.state not in ("passed", "failed"):
                    continue  # still open when the run ended (e.g. records withheld, window not closed yet)
                if key in ("stale", "replay") and audit.round == 0:
                    row["first_round_skipped"] += 1  # nothing to replay yet: honest work
                    continue
                row["audits"] += 1
                row["failed"] += audit.state == "failed"
                verdict = verdicts.get(audit.task_id)
                if key == "honest" and verdict is not None:
                    for check in verdict.checks:
                        row["max_diff"] = [max(a, b) for a, b in zip(
                            row["max_diff"], (check.loss_diff, check.norm_diff, check.sketch_diff), strict=True)]
    return rows


def _records(n: int, seed: int) -> list[MicroBatchRecord]:
    generator = torch.Generator().manual_seed(seed)
    return [MicroBatchRecord(i, 32, 0.5, 1.0, torch.randn(8, generator=generator)) for i in range(n)]


def contributions_until_ban(detect: float, *, runs: int, audit_rate: float, max_strikes: int = 2,
                            cap: int = 200, seed: int = 0) -> list[int]:
    """Contributions an always-cheating identity reports before the real Auditor bans it, over ``runs`` runs."""
    import random

    rng = random.Random(seed)
    coordinator = Coordinator(Store("sqlite://"), signing.generate_key())
    coordinator.runs.create(f"""[run]\nid = "mc"\nmodel = "unet-digits-16"\n[training]\nshards_per_assignment = 1
[rounds]\ninner_steps = 2\n[verification]\naudit_rate = {audit_rate}\nmax_strikes = {max_strikes}
audit_window_rounds = 2\nsketch_size = 8\nsegment_steps = 2\n""", start=True)
    validator_key = signing.generate_key()
    validator = Caller("v" * 64, "mc", "peer-v", signing.public_bytes(validator_key), pb.AccessToken())
    coordinator.auditor.grant(validator.node_id, "the bench's validator")
    coordinator.auditor.trust(validator.node_id)  # it plays the coordinator's built-in validator
    counts, round_number = [], 0
    for run in range(runs):
        key = signing.generate_key()
        challenge = coordinator.registry.challenge(f"source-{run}")
        request = register_request(key, challenge.nonce, "mc", new_identity())
        token = coordinator.registry.register(request, f"source-{run}").token
        caller = Caller(token.node_id, "mc", token.peer_id, signing.public_bytes(key), token)
        reported = 0
        while not coordinator.registry.is_banned(caller.node_id) and reported < cap:
            work = coordinator.work.get_work(caller, round_number)
            records = _records(2, run * 1000 + reported)
            contribution = pb.Contribution(run_id="mc", node_id=caller.node_id, round=round_number,
                                           assignment_id=work.assignment_id, samples=64, mean_loss=0.5,
                                           compute_seconds=1.0, params_hash=b"p" * 32,
                                           commitment=merkle_root(records), micro_batches=2,
                                           gradient_sketch=sent_sketch(records).tolist(),
                                           segment_hashes=[b"s" * 32, b"e" * 32])  # a round of one segment
            _, task_id = coordinator.ledger.report(caller, signing.sign(contribution, key))
            reported += 1
            round_number += 1
            coordinator.runs.advance("mc", round_number)  # as the coordinator's witness does
            if task_id:
                coordinator.auditor.submit_records(caller, pb.SubmitAuditRecordsRequest(
                    task_id=task_id, records=[record_to_proto(r) for r in records]))
                task = coordinator.auditor.next_task(validator)
                verdict = signing.sign(pb.AuditVerdict(task_id=task.task_id, validator_node_id=validator.node_id,
                                                       passed=rng.random() >= detect), validator_key)
                coordinator.auditor.record_verdict(validator, verdict)
        counts.append(reported)
    coordinator.close()
    return counts


def training(workdir: Path, rounds: int, reducer: str, attackers: list[str], honest: int = 7,
             audit_rate: float = 0.2) -> dict:
    toml = sim_run_toml(audit_rate=audit_rate, reducer=reducer, clip_tau=CLIP_TAU, audit_window=2,
                        micro_batch_size=8, inner_steps=TRAINING_INNER_STEPS, segment_steps=SEGMENT_STEPS)
    classes = {f"honest-{i}": HONEST for i in range(honest)}
    classes.update({name: ATTACKS[name] for name in attackers})
    with ServerThread(workdir / "state", toml, per_address=0) as server:
        spec = server.coordinator.runs.spec_for_nodes("sim")
        swarm = LockstepSwarm(server, spec, classes, workdir)
        result = swarm.run(rounds)
        swarm.close()
    return dict(loss=result.losses[-1], losses=result.losses, banned=result.banned,
                train_seconds=result.train_seconds, verify_seconds=result.verify_seconds,
                audits=len(result.verdicts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    rounds, runs, train_rounds = (3, 40, 3) if args.quick else (6, 500, 6)
    figures: dict = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        figures["detection"] = detection(tmp / "detection", rounds)
        print(json.dumps({n: (r["audits"], r["failed"]) for n, r in figures["detection"].items()}))
        figures["until_ban"], by_rate = {}, {}
        for name, row in figures["detection"].items():
            if name == "honest":
                continue
            rate = round(row["failed"] / max(row["audits"], 1), 3)
            if rate not in by_rate:  # the ban statistics depend on the attack only through its detection rate
                by_rate[rate] = contributions_until_ban(rate, runs=runs, audit_rate=0.2, seed=len(by_rate))
            counts = by_rate[rate]
            figures["until_ban"][name] = dict(rate=rate, median=statistics.median(counts), worst=max(counts),
                                              within_25=sum(c <= 25 for c in counts) / len(counts))
            print(name, figures["until_ban"][name])
        honest_counts = contributions_until_ban(0.0, runs=20, audit_rate=0.2, cap=50)
        figures["honest_bans"] = sum(c < 50 for c in honest_counts)
        figures["training"] = {}
        for label, reducer, attackers in [("clean", "centered_clip", []),
                                          ("30% attackers, mean", "mean", ["sign_flip", "flip_1000", "send_scaled"]),
                                          ("30% attackers, centered_clip", "centered_clip",
                                           ["sign_flip", "flip_1000", "send_scaled"])]:
            figures["training"][label] = training(tmp / label.replace(" ", "_").replace("%", ""), train_rounds,
                                                  reducer, attackers, honest=10 - len(attackers) if attackers else 10)
            print(label, {k: v for k, v in figures["training"][label].items() if k != "losses"})
    figures["seconds"] = time.perf_counter() - started
    write_report(figures, quick=args.quick)


def _fmt(x: float) -> str:
    return f"{x:.2e}" if x else "0"


def write_report(f: dict, *, quick: bool) -> None:
    lines = [BEGIN, "", f"Produced by `python -m bench.bench_verification{' --quick' if quick else ''}` "
             f"({f['seconds'] / 60:.0f} min on the 2-core machine shared with other jobs; torch 1 thread).", ""]
    lines += [f"### Detection per audited round (lock-step swarm, rounds of {INNER_STEPS} inner steps, every round "
              f"audited, one segment of {SEGMENT_STEPS} replayed from the state the node serves)", "",
              "| node | audits | failed |", "|---|---|---|"]
    for name, row in f["detection"].items():
        lines.append(f"| {name} | {row['audits']} | {row['failed']}/{row['audits']} = "
                     f"{row['failed'] / max(row['audits'], 1):.0%} |")
    lines += ["", f"Largest honest differences (loss, norm, sketch): "
              f"{', '.join(map(_fmt, f['detection']['honest']['max_diff']))}.", "",
              "### Contributions until ban (real Ledger/Auditor/Registry, audit_rate 0.2, max_strikes 2, "
              "a struck node audited on every contribution)", "",
              "| attack | detection per audit | median | worst | banned within 25 |", "|---|---|---|---|---|"]
    for name, row in f["until_ban"].items():
        lines.append(f"| {name} | {row['rate']:.0%} | {row['median']:.0f} | {row['worst']} | {row['within_25']:.1%} |")
    lines += ["", f"Honest identities banned in 20 runs of 50 contributions each: {f['honest_bans']}.", "",
              f"### Training with 30 % attackers (lock-step swarm of 10, audit_rate 0.2, rounds of "
              f"{TRAINING_INNER_STEPS} inner steps of 8 samples per node, one segment of {SEGMENT_STEPS} replayed per "
              f"audit, clip_tau {CLIP_TAU})", "",
              "| run | final eval loss | vs clean | banned (contributions before the ban) | validator / node compute |",
              "|---|---|---|---|---|"]
    clean = f["training"]["clean"]["loss"]
    for label, row in f["training"].items():
        share = row["verify_seconds"] / max(row["train_seconds"], 1e-9)
        lines.append(f"| {label} | {row['loss']:.4f} | {row['loss'] / clean - 1:+.1%} | {row['banned'] or '-'} "
                     f"| {share:.1%} |")
    lines += ["", END]
    text = DOC.read_text() if DOC.exists() else f"# Verified contributions\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    DOC.write_text(head + "\n".join(lines) + rest.split(END, 1)[1])
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
