"""Benchmark segment audits of rounds: what they cost a validator, how fast they ban a cheater, whether they
ever fail an honest node.

    .venv/bin/python -m bench.bench_audit_cost --threads 1                 # 1,000 honest audits (~15 min)
    .venv/bin/python -m bench.bench_audit_cost --threads 1 --audits 40     # smoke test

**Lock-step harness** (one process): a node trains the digits run (examples/runs/digits.toml: H inner steps of
``micro_batch_size`` per round, a committed training-state hash every ``segment_steps`` steps, the sketch of its
pseudo-gradient θ_r − θ_end) round after round, and the validator's own code (``Recomputer.check_segment``, the
code ``omi-node validate`` and the coordinator's validator run) audits **every** segment of every round: it loads
the segment's start state by hash, replays its inner steps, compares every record exactly and the end state, and
checks the committed sketch of Δ. The node's held states reach the validator through an in-process fetcher (a
dict by hash); the P2P transfer of a state (parameters and two AdamW moments) is tested in tests/test_segments.py,
its size is reported here. Cheaters train the same rounds dishonestly (skip every other inner step of the round's
second half; train on other samples than assigned; send 2 × Δ) and are audited the same way.

**Figures**: honest audits passed / run (goal: 0 false positives in ≥ 1,000); per cheater, the share of audits
that catch it; the measured seconds of one audit against one round of training (one node, the same thread
count); from these, the audit rate a node needs so that an always-cheater is banned (``max_strikes`` failed
audits) within 25 rounds with ≥ 99 % probability (one audit = one random segment, binomial over rounds), and what
that rate costs validators as a share of training compute (goal ≤ 3 %).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omi.models import (
    GradientSketch,
    build_for_spec,
    merkle_root,
    micro_batch_samples,
    micro_batch_seed,
    model_info,
    open_source,
    pick_device,
)
from omi.models.microbatch import named_tensors_hash
from omi.models.optimizer import optimizer_for
from omi.models.records import audited_record
from omi.models.segments import SegmentStep, replay_segment, segment_steps, training_state, training_state_hash
from omi.node.parameter_history import ParameterHistory
from omi.node.recompute import Recomputer
from omi.protos import pb
from omi.protos.runspec import load_runspec
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

logger = logging.getLogger(__name__)

RUN = Path(__file__).resolve().parent.parent / "examples" / "runs" / "digits.toml"
BAN_ROUNDS = 25  # the goal: an always-cheater banned within 25 rounds ...
BAN_PROBABILITY = 0.99  # ... with at least this probability ...
GOAL_COST = 0.03  # ... at validator compute ≤ 3 % of training compute
GOAL_HONEST_AUDITS = 1000  # ... and 0 false positives in ≥ 1,000 honest audits
CHEATS = ("skips_steps", "other_data", "scaled_delta")
NODE = "node-bench"


class DictFetcher:
    """The node's held states by hash, in process (stands in for ``ParamsFetcher`` over the node's P2P handler)."""

    def __init__(self):
        self.held: dict[bytes, dict[str, torch.Tensor]] = {}

    def fetch(self, peer_id: str, digest: bytes, max_bytes: int) -> dict[str, torch.Tensor]:
        return self.held[digest]


@dataclass
class Round:
    task_template: pb.AuditTask  # everything but the audited segment
    records: list
    train_seconds: float


class Node:
    """A volunteer training the run's rounds (one node: θ_{r+1} is its own end state, AdamW state carried)."""

    def __init__(self, spec: pb.RunSpec, device: torch.device, cheat: str | None = None):
        self.spec, self.cheat = spec, cheat
        self.model, self.scheduler = build_for_spec(spec)
        self.model.to(device)
        self.optimizer = optimizer_for(spec.training)(self.model.parameters())
        self.source = open_source(spec.data, channels=model_info(spec.model).channels)
        self.sketch = GradientSketch(self.model, spec.verification.sketch_size, seed=spec.training.seed)
        self.k = segment_steps(spec)
        self.round = 0

    def assignment(self) -> pb.WorkAssignment:
        """H micro-batches of the digits, starting at a different shard every round."""
        data, training = self.spec.data, self.spec.training
        shards = -(-len(self.source) // data.shard_size)
        needed = -(-self.spec.rounds.inner_steps * training.micro_batch_size // data.shard_size)
        ranges = []
        for j in range(needed):
            shard = (self.round * needed + j) % shards
            ranges.append(pb.ShardRange(shard_id=shard, start=shard * data.shard_size,
                                        end=min((shard + 1) * data.shard_size, len(self.source))))
        return pb.WorkAssignment(assignment_id=f"a{self.round}", run_id=self.spec.run_id, round=self.round,
                                 node_id=NODE, shards=ranges, seed=training.seed,
                                 micro_batch_size=training.micro_batch_size)

    def train_round(self, fetcher: DictFetcher) -> Round:
        spec, training = self.spec, self.spec.training
        assignment = self.assignment()
        steps = [SegmentStep(index=i, samples=micro_batch_samples(assignment, i, training.micro_batch_size),
                             seed=micro_batch_seed(training.seed, spec.run_id, self.round, NODE, i))
                 for i in range(spec.rounds.inner_steps)]
        theta = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}
        started = time.perf_counter()
        states, records = [training_state(self.model, self.optimizer)], []
        for first in range(0, len(steps), self.k):
            segment = steps[first:first + self.k]
            if self.cheat == "other_data":
                segment = [SegmentStep(s.index, [(x + 500) % len(self.source) for x in s.samples], s.seed)
                           for s in segment]
            if self.cheat == "skips_steps" and first >= len(steps) // 2:
                for step in segment:  # the second half of the round: every other inner step not taken
                    if step.index % 2:
                        records += replay_segment(self.model, _NoStep(), self.scheduler, self.source, [step],
                                                  prediction_type=training.prediction_type, sketch=self.sketch)
                        self.optimizer.zero_grad(set_to_none=True)
                    else:
                        records += replay_segment(self.model, self.optimizer, self.scheduler, self.source, [step],
                                                  prediction_type=training.prediction_type, sketch=self.sketch)
            else:
                records += replay_segment(self.model, self.optimizer, self.scheduler, self.source, segment,
                                          prediction_type=training.prediction_type, sketch=self.sketch)
            states.append(training_state(self.model, self.optimizer))
        hashes = [training_state_hash(state) for state in states]  # the node's commitment to its round
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        scale = 2.0 if self.cheat == "scaled_delta" else 1.0
        delta = [scale * (theta[n] - states[-1][n].float()) for n in names]
        delta_sketch = self.sketch.of_grads(delta, delta).tolist()
        train_seconds = time.perf_counter() - started
        for digest, state in zip(hashes, states, strict=True):
            fetcher.held[digest] = state
        task = pb.AuditTask(task_id=f"t{self.round}", run_id=spec.run_id, node_id=NODE, round=self.round,
                            params_hash=named_tensors_hash(theta.items()), assignment=assignment, has_task=True,
                            commitment=merkle_root(records), micro_batches=len(records), peer_id="node",
                            segment_hashes=hashes, delta_sketch=delta_sketch)
        self.round += 1
        return Round(task, records, train_seconds)


class _NoStep:
    """An optimizer that does not step: the cheater's skipped inner step."""

    def step(self):
        pass

    def zero_grad(self, set_to_none: bool = True):
        pass


def audit(recomputer: Recomputer, round_: Round, segment: int, k: int, fetcher: DictFetcher
          ) -> tuple[pb.AuditVerdict, float]:
    """The validator's verdict on one segment of a round, and the seconds it took."""
    task = pb.AuditTask()
    task.CopyFrom(round_.task_template)
    indices = list(range(segment * k, min((segment + 1) * k, task.micro_batches)))
    task.micro_batch_indices.extend(indices)
    task.records.extend(audited_record(round_.records, i) for i in indices)
    started = time.perf_counter()
    verdict = recomputer.check_segment(task, ParameterHistory(2), fetcher)
    return verdict, time.perf_counter() - started


def ban_probability(rate: float, detection: float, strikes: int, rounds: int = BAN_ROUNDS) -> float:
    """P(at least ``strikes`` failed audits in ``rounds`` rounds), one audit per round with probability ``rate``
    that catches the cheat with probability ``detection``."""
    p = rate * detection
    return 1.0 - sum(math.comb(rounds, j) * p ** j * (1 - p) ** (rounds - j) for j in range(strikes))


def rate_needed(detection: float, strikes: int) -> float:
    """The smallest audit rate (to 0.001) that bans within BAN_ROUNDS with BAN_PROBABILITY; inf if none does."""
    if ban_probability(1.0, detection, strikes) < BAN_PROBABILITY:
        return math.inf
    low, high = 0.0, 1.0
    while high - low > 1e-3:
        middle = (low + high) / 2
        low, high = (middle, high) if ban_probability(middle, detection, strikes) < BAN_PROBABILITY else (low, middle)
    return high


def measure(spec: pb.RunSpec, device: torch.device, audits: int, cheat_rounds: int, bar: Progress) -> dict:
    """Honest audits and cheaters at ``spec``'s segment length: pass counts, detection shares, seconds."""
    k, inner = segment_steps(spec), spec.rounds.inner_steps
    segments = -(-inner // k)
    recomputer, fetcher = Recomputer.for_spec(spec), DictFetcher()
    honest = Node(spec, device)
    passed = run = 0
    audit_seconds, train_seconds, failures = [], [], []
    task = bar.add_task(f"k={k}: honest audits", total=audits)
    while run < audits:
        round_ = honest.train_round(fetcher)
        train_seconds.append(round_.train_seconds)
        for segment in range(min(segments, audits - run)):
            verdict, seconds = audit(recomputer, round_, segment, k, fetcher)
            run += 1
            audit_seconds.append(seconds)
            if verdict is not None and verdict.passed:
                passed += 1
            else:
                failures.append(verdict.reason if verdict is not None else "no verdict")
            bar.update(task, advance=1)
        fetcher.held.clear()
    mean_audit, mean_round = sum(audit_seconds) / len(audit_seconds), sum(train_seconds) / len(train_seconds)
    ratio = mean_audit / mean_round  # validator seconds per audit / node seconds per round
    strikes, rate = spec.verification.max_strikes, spec.verification.audit_rate
    cheaters = []
    for cheat in CHEATS:
        cheater, caught, audited = Node(spec, device, cheat), 0, 0
        task = bar.add_task(f"k={k}: cheater {cheat}", total=cheat_rounds * segments)
        for _ in range(cheat_rounds):
            round_ = cheater.train_round(fetcher)
            for segment in range(segments):
                verdict, _ = audit(recomputer, round_, segment, k, fetcher)
                audited += 1
                caught += int(verdict is not None and not verdict.passed)
                bar.update(task, advance=1)
            fetcher.held.clear()
        d = caught / audited
        needed = rate_needed(d, strikes)
        cheaters.append(dict(cheat=cheat, detection=d, rate_needed=needed, cost_at_rate=needed * ratio,
                             ban_at_spec_rate=ban_probability(rate, d, strikes)))
    return dict(segment_steps=k, audits=run, passed=passed, failures=failures[:5], audit_seconds=mean_audit,
                round_seconds=mean_round, ratio=ratio, cost_at_spec_rate=rate * ratio, cheaters=cheaters,
                held_states=segments + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segment-steps", default="2,5",
                        help="segment lengths to measure, comma-separated (the run's is 5); honest audits run at "
                             "the first, --other-audits at the others")
    parser.add_argument("--audits", type=int, default=GOAL_HONEST_AUDITS, help="honest audits (every segment)")
    parser.add_argument("--other-audits", type=int, default=40, help="honest audits at the other segment lengths")
    parser.add_argument("--cheat-rounds", type=int, default=4, help="rounds each cheater trains")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--out", default=None, help="write the raw figures to this JSON file")
    args = parser.parse_args()
    try:
        lengths = [int(k) for k in args.segment_steps.split(",")]
        assert lengths and all(k > 0 for k in lengths)
    except (ValueError, AssertionError):
        parser.error(f"--segment-steps: positive integers separated by commas, not {args.segment_steps!r}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    logging.getLogger("omi.node.recompute").setLevel(logging.ERROR)
    spec = load_runspec(RUN)
    device = pick_device("cpu")
    started = time.perf_counter()
    results = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) \
            as bar:
        for i, k in enumerate(lengths):
            spec.verification.segment_steps = k
            results.append(measure(spec, device, args.audits if i == 0 else args.other_audits, args.cheat_rounds, bar))
    model = build_for_spec(spec)[0]
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3  # parameters, two moments
    figures = dict(
        settings=dict(run=str(RUN.relative_to(RUN.parent.parent.parent)), model=spec.model,
                      inner_steps=spec.rounds.inner_steps,
                      run_segment_steps=load_runspec(RUN).verification.segment_steps,
                      micro_batch_size=spec.training.micro_batch_size, threads=args.threads,
                      audit_rate=spec.verification.audit_rate, max_strikes=spec.verification.max_strikes,
                      state_bytes=state_bytes, cheat_rounds=args.cheat_rounds,
                      wall_seconds=time.perf_counter() - started),
        lengths=results)
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    if args.audits >= GOAL_HONEST_AUDITS:
        from bench.report import write_section

        command = shlex.join(["python", "-m", "bench.bench_audit_cost", *sys.argv[1:]])
        write_section("audit_cost", "Segment audits of rounds: cost, time to ban, false positives",
                      section_body(figures, command))


def section_body(f: dict, command: str) -> str:
    s = f["settings"]
    rows, costs, honest = [], [], []
    for r in f["lengths"]:
        k = r["segment_steps"]
        mark = " (the run's)" if k == s["run_segment_steps"] else ""
        costs.append(f"| {k}{mark} | {r['held_states']} | {r['audit_seconds']:.2f} s | {r['round_seconds']:.2f} s | "
                     f"{100 * r['ratio']:.1f} % | {100 * r['cost_at_spec_rate']:.1f} % |")
        honest.append(f"k = {k}: **{r['passed']:,} of {r['audits']:,} honest audits passed**")
        for c in r["cheaters"]:
            reached = math.isfinite(c["rate_needed"])
            verdict = "✓" if reached and c["cost_at_rate"] <= GOAL_COST else "✗"
            rows.append(f"| {k} | {c['cheat']} | {c['detection']:.2f} | {c['ban_at_spec_rate']:.3f} | "
                        + (f"{c['rate_needed']:.3f} | {100 * c['cost_at_rate']:.1f} % {verdict} |" if reached
                           else "none | – ✗ |"))
    first = f["lengths"][0]
    honest_verdict = "✓" if first["passed"] == first["audits"] >= GOAL_HONEST_AUDITS else "✗"
    nl = "\n"
    return f"""Command: `{command}`. Lock-step harness in one process (bench/bench_audit_cost.py docstring): a node
trains `{s['run']}` (`{s['model']}`, H = {s['inner_steps']} inner steps of {s['micro_batch_size']} samples per round, a
committed training state every k steps) and `Recomputer.check_segment` audits every segment of every round (start
state by hash, replay, exact records, end state, Δ sketch), for each segment length k. A held training state
(parameters and two AdamW moments) is {s['state_bytes'] / 1e6:.1f} MB: what a validator fetches per audit (twice or
three times when the Δ check needs the round's first and last states too), and what a node holds per segment
boundary of an audited round.

{'; '.join(honest)} (goal: 0 false positives in ≥ {GOAL_HONEST_AUDITS:,}) {honest_verdict}.

| k | states held per round | one audit | one round of training | audit / round \
| validator cost at the run's rate {s['audit_rate']} |
|---|---|---|---|---|---|
{nl.join(costs)}

Cheaters, each training {s['cheat_rounds']} rounds dishonestly with every segment audited. In a run a round is
audited with probability = the audit rate, one random segment of it, and {s['max_strikes']} failed audits ban; the
probabilities below are binomial over {BAN_ROUNDS} rounds from the measured share of audits that catch the cheat:

| k | cheat | audits that catch it | P(ban in {BAN_ROUNDS} rounds) at rate {s['audit_rate']} \
| rate for ≥ {BAN_PROBABILITY:.0%} | validator cost at that rate (goal ≤ {GOAL_COST:.0%}) |
|---|---|---|---|---|---|
{nl.join(rows)}

skips_steps: every other inner step of the round's second half not taken (claims H, computes ~3H/4 steps: only
segments of the second half can show it); other_data: trains on samples it was not assigned; scaled_delta: honest
steps, but commits to (and would send) 2 × Δ (the Δ check runs in every audit).

Benchmark wall time: {s['wall_seconds']:.0f} s ({s['threads']} torch thread(s)).
"""


if __name__ == "__main__":
    main()
