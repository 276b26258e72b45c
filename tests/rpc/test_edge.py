"""Protobuf stays at the edge: who may import the generated stubs, and what an import loads.

The stubs (``specdec.v1``) are for the servicers, the worker stream, the oracle link,
the client and ``specdec.rpc.convert``; the core, telemetry, the drafters, the engine,
the configs and the logic of the gateway and the draft work on core types. Checked
twice: the source's imports (any module, whether or not it is imported here), and the
modules really loaded by importing a protobuf-free module in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Every module under these folders, and these files, must not import specdec.v1.
PROTOBUF_FREE_PACKAGES = ("specdec/core", "specdec/telemetry", "specdec/drafters", "specdec/engine")
PROTOBUF_FREE_FILES = (
    "specdec/config.py",
    "gateway/config.py",
    "gateway/generation.py",
    "gateway/sessions.py",
    "gateway/detokenize.py",
    "gateway/commits.py",
    "gateway/identity.py",
    "gateway/limits.py",
    "draft_service/config.py",
    "draft_service/worker.py",
    "oracle_service/config.py",
)


def _protobuf_free_sources() -> list[Path]:
    files = [ROOT / f for f in PROTOBUF_FREE_FILES]
    for package in PROTOBUF_FREE_PACKAGES:
        files.extend(sorted((ROOT / package).rglob("*.py")))
    return files


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", _protobuf_free_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_imports_no_generated_stubs(path: Path) -> None:
    stubs = sorted(n for n in _imports(path) if n == "specdec.v1" or n.startswith("specdec.v1."))
    assert not stubs, f"{path.relative_to(ROOT)} imports {stubs}: convert in specdec.rpc.convert"


def _loaded_by(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _heavy(loaded: set[str], *roots: str) -> list[str]:
    return sorted(m for m in loaded if m in roots or m.startswith(tuple(r + "." for r in roots)))


@pytest.mark.parametrize("module", ["specdec.core.types", "specdec.core.messages"])
def test_core_types_load_neither_protobuf_grpc_nor_torch(module: str) -> None:
    assert _heavy(_loaded_by(module), "specdec.v1", "grpc", "google.protobuf", "torch") == []


@pytest.mark.parametrize(
    "module", ["specdec.core.wiring", "specdec.telemetry.gateway", "specdec.telemetry.setup"]
)
def test_core_logic_and_telemetry_load_no_protobuf(module: str) -> None:
    assert _heavy(_loaded_by(module), "specdec.v1", "grpc") == []


def test_the_client_starts_without_torch() -> None:
    # `specdec generate` and applications: the speculation settings are converted in
    # specdec.rpc.convert, which must not pull the sampling maths' torch in.
    loaded = _loaded_by("specdec.client")
    assert "specdec.rpc.convert" in loaded
    assert _heavy(loaded, "torch", "transformers") == []
