"""Generate the Python gRPC stubs in specdec/v1/ from protos/specdec/v1/*.proto.

Usage: python scripts/gen_protos.py [--out DIR]

The stubs are committed; tests/rpc/test_protos.py regenerates them into a temporary
folder and fails when the committed ones differ (never edit them by hand).
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out: Path) -> list[Path]:
    """Run protoc on every proto; return the files written under ``out``."""
    from grpc_tools import protoc  # a dev dependency, imported only here

    protos = sorted(PROTO_ROOT.glob("specdec/v1/*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p) for p in protos],
    ]
    out.mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    package = out / "specdec" / "v1"
    (package / "__init__.py").write_text('"""Generated gRPC stubs of package specdec.v1."""\n')
    return sorted(package.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repo)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))


if __name__ == "__main__":
    main()
