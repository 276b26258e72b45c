"""The committed stubs in specdec/v1/ are exactly what protoc makes from protos/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    fresh = _load_generator().generate(tmp_path)
    committed_dir = ROOT / "specdec" / "v1"
    names = sorted(p.name for p in fresh)
    assert names == sorted(p.name for p in committed_dir.iterdir() if p.is_file()), (
        "specdec/v1 has stale or extra files: run `python scripts/gen_protos.py`"
    )
    for path in fresh:
        assert (committed_dir / path.name).read_text() == path.read_text(), (
            f"specdec/v1/{path.name} is stale: run `python scripts/gen_protos.py`"
        )


def test_enums_start_unspecified() -> None:
    from specdec.v1 import common_pb2, gateway_pb2

    for enum in (
        common_pb2.DrafterKind,
        common_pb2.FinishReason,
        gateway_pb2.WorkerKind,
    ):
        zero = enum.Name(0)
        assert zero.endswith("_UNSPECIFIED"), zero
