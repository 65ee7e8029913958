"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections as they are."""

import re
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (  # docs/benchmarks.md's opening, for a page written from scratch
    "# Benchmarks\n\n"
    "Every measured figure that README.md and docs/ quote is in a section of this page, or the page that quotes it\n"
    "says where else it comes from. Each section names its date, machine, commit and command.\n\n"
    "**Who wrote what.** Text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` is written by that section's\n"
    "script through `bench/report.py`, except the paragraphs marked _(by hand)_; rerunning the script replaces the\n"
    "whole section, hand-written paragraphs included. Text outside the markers is written by hand.\n"
)


def machine() -> str:
    """One line saying where the figures come from."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return (f"{time.strftime('%Y-%m-%d')}, {cpu}, {torch.get_num_threads()} torch threads, "
            f"Python {sys.version.split()[0]}, torch {torch.__version__}, commit {commit or '?'}")


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section between `<!-- bench:name -->` markers in docs/benchmarks.md."""
    BENCHMARKS_MD.parent.mkdir(parents=True, exist_ok=True)
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = f"{start}\n## {title}\n\n_{machine()}_\n\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS_MD.write_text(text)
    print(f"wrote section '{name}' of {BENCHMARKS_MD}")
