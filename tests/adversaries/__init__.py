"""The attack harness: volunteer variants that change exactly one behaviour of the real node's ``Trainer``.

Each class in :mod:`.attacks` subclasses :class:`omi.node.trainer.Trainer` and overrides one of its hooks
(``_micro_batch``, ``_before_averaging``, ``_commit``, ``_hand_over``, ``_hold_segments``), so an adversary runs
the same code as an honest node everywhere else and cannot drift from it.
Run one against a coordinator like ``omi-node join``::

    python -m tests.adversaries sign_flip --coordinator 127.0.0.1:50051 --state-dir /tmp/evil

:mod:`.sim` drives the same classes in one process, in rounds with a lock-step stand-in for the round optimizer's
all-reduce, against a real coordinator and the real validator's segment audits (for the many-run statistics of
``bench/bench_verification.py``).
"""

from .attacks import ATTACKS, HONEST

__all__ = ["ATTACKS", "HONEST"]
