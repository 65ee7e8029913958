"""List the benchmarks, or run the ones named: ``python -m bench [NAME ...] [-- OPTIONS]``.

    python -m bench                              # each bench/bench_NAME.py: what it measures, how to run it
    python -m bench models                       # runs bench/bench_models.py with its defaults
    python -m bench swarm rounds                 # one after the other; the first that fails stops the rest
    python -m bench dashboard -- --seconds 4     # options after -- go to the one benchmark named

Nothing runs without a name: all of them in a row take hours on a CPU. Each benchmark runs in a process of its own
(``python -m bench.bench_NAME``) and writes its figures to its own section of docs/benchmarks.md
(bench/report.py's ``write_section``; bench_verification writes docs/verification.md).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "bench_"
SUMMARY_WIDTH = 100  # characters per line of a benchmark's summary in the listing


def benchmarks() -> dict[str, str]:
    """Name → module docstring of each bench/bench_NAME.py, read without importing it (imports take seconds)."""
    found = {}
    for path in sorted(Path(__file__).parent.glob(f"{PREFIX}*.py")):
        found[path.stem.removeprefix(PREFIX)] = ast.get_docstring(ast.parse(path.read_text())) or ""
    return found


def summary(docstring: str) -> str:
    """The docstring's first sentence."""
    paragraph = " ".join(docstring.split("\n\n")[0].split())
    return re.split(r"\.\s+(?=[A-Z])", paragraph)[0].rstrip(".") + "."


def usage_lines(docstring: str) -> list[str]:
    """The command lines the docstring shows (they say the options and, mostly, how long a run takes)."""
    return [line.strip() for line in docstring.splitlines() if f"-m bench.{PREFIX}" in line]


def print_list(found: dict[str, str]) -> None:
    width = max(map(len, found))
    for name, docstring in found.items():
        lines = textwrap.wrap(summary(docstring), SUMMARY_WIDTH, max_lines=2, placeholder=" …", break_on_hyphens=False)
        print(f"{name:<{width}}  " + f"\n{'':<{width}}  ".join(lines))
        for line in usage_lines(docstring):
            print(f"{'':<{width}}    {line}")
    print("\nRun one or more: python -m bench NAME [NAME ...] [-- OPTIONS]  (make bench B=\"NAME ...\").\n"
          "None runs without a name: all of them in a row take hours on a CPU. Each rewrites its own section of\n"
          "docs/benchmarks.md (bench_verification: docs/verification.md).")


def main(argv: list[str]) -> int:
    names, options = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    found = benchmarks()
    if not names:
        print_list(found)
        return 0
    unknown = [name for name in names if name not in found]
    if unknown:
        print(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(found)}", file=sys.stderr)
        return 2
    if options and len(names) > 1:
        print("options after -- go to one benchmark; name only one", file=sys.stderr)
        return 2
    for name in names:
        command = [sys.executable, "-m", f"bench.{PREFIX}{name}", *options]
        print(f"$ {' '.join(command)}", flush=True)
        returncode = subprocess.run(command, cwd=ROOT, check=False).returncode
        if returncode:
            return returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
