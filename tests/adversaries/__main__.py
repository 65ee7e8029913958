"""Run one adversary like ``omi-node join``: ``python -m tests.adversaries NAME --coordinator HOST:PORT [...]``.

The join command's own code parses the options and runs the node; only the node class is swapped.
"""

import sys

import omi.node.trainer as trainer
from omi.node.cli import app

from .attacks import ATTACKS

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ATTACKS:
        sys.exit(f"usage: python -m tests.adversaries {{{','.join(ATTACKS)}}} --coordinator HOST:PORT ...")
    trainer.VolunteerNode = ATTACKS[sys.argv[1]]  # `join` looks the class up in omi.node.trainer when it runs
    app(["join", *sys.argv[2:]], prog_name="adversary")
