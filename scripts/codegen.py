"""Regenerate the Python modules of protos/ from the .proto files (grpcio-tools).

    python scripts/codegen.py           # rewrite protos/omi/v1/*_pb2*.py and *.pyi
    python scripts/codegen.py --check   # exit 1 if the committed files differ from a fresh run

The protos/ folder is importable as `omi.protos`; protoc is run on a temporary tree where
`omi/protos` points at it, so the generated imports read `from omi.protos.omi.v1 import ...`.
"""

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every .proto under protos/; write into out_root/omi/protos/...; return outputs."""
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(tmp) / "include"
        (include / "omi").mkdir(parents=True)
        skip = shutil.ignore_patterns("*.py", "*.pyi", "__pycache__")
        shutil.copytree(PROTOS, include / "omi" / "protos", ignore=skip)
        sources = sorted(str(p.relative_to(include)) for p in include.rglob("*.proto"))
        (out_root / "omi" / "protos").mkdir(parents=True, exist_ok=True)
        args = ["protoc", f"-I{include}", f"-I{protoc._get_resource_file_name('grpc_tools', '_proto')}",
                f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *sources]
        if protoc.main(args) != 0:
            sys.exit("protoc failed")
    return sorted(p for p in (out_root / "omi" / "protos").rglob("*") if p.suffix in (".py", ".pyi"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out_root = Path(tmp)
        stale = []
        for produced in generate(out_root):
            target = PROTOS / produced.relative_to(out_root / "omi" / "protos")
            if args.check:
                if not target.exists() or not filecmp.cmp(produced, target, shallow=False):
                    stale.append(target.relative_to(ROOT))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(produced, target)
                print(f"wrote {target.relative_to(ROOT)}")
        if stale:
            sys.exit("generated code is stale, run `python scripts/codegen.py`: " + ", ".join(map(str, stale)))
        if args.check:
            print("generated code is up to date")


if __name__ == "__main__":
    main()
