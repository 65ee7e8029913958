"""Run one adversary like ``omi-node join``: ``python -m tests.adversaries NAME --coordinator HOST:PORT [...]``.

The join command's own code parses the options and runs the node; only the trainer class is swapped.
"""

import sys

import omi.node.volunteer as volunteer
from omi.node.cli import app

from .attacks import ATTACKS

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ATTACKS:
        sys.exit(f"usage: python -m tests.adversaries {{{','.join(ATTACKS)}}} --coordinator HOST:PORT ...")
    volunteer.Trainer = ATTACKS[sys.argv[1]]  # `join`'s VolunteerNode looks its trainer class up when it is made
    app(["join", *sys.argv[2:]], prog_name="adversary")
