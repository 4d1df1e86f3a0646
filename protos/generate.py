"""Regenerate the Python code for protos/smartpath/v1/*.proto (run after editing a .proto).

python protos/generate.py            # write the generated files next to the .proto files
python protos/generate.py --check    # exit 1 if the committed generated code is stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "smartpath" / "v1"


def generate(out: Path) -> list[Path]:
    """Run protoc (Python, gRPC and .pyi outputs) into ``out``; return the generated files."""
    protos = sorted(PACKAGE.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out / "smartpath" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        if args.check:
            stale = [
                f.name
                for f in fresh
                if not (PACKAGE / f.name).exists() or not filecmp.cmp(f, PACKAGE / f.name, False)
            ]
            committed = {p.name for p in PACKAGE.glob("*_pb2*.py*")}
            stale += sorted(committed - {f.name for f in fresh})
            if stale:
                print(f"stale generated code: {stale}; run python protos/generate.py")
                return 1
            return 0
        for f in fresh:
            (PACKAGE / f.name).write_bytes(f.read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
