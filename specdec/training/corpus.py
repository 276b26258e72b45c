"""The training corpus: Python source every machine running specdec already has.

Sources are CPython's standard library (minus its test suites, IDLE, lib2to3 and bundled
data) and the Python files of installed packages specdec depends on, directly or through
torch / transformers. Packages are located with ``importlib.util.find_spec`` so none of
them is imported. Identical files are kept once (first in root order, then path order).

Held-out rule: a file is held out when ``int(sha256("<root>/<relpath>")[:8], 16) % 1000 <
eval_permille``; it depends only on the path, so it is the same on every machine and
every package version. The order of files in the token stream comes from a second,
salted hash of the same key, so it is deterministic too.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import platform
import re
import sysconfig
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from specdec.core.errors import InvalidArgument

STDLIB = "stdlib"

# specdec's dependencies (pyproject) and what they pull in; each one importable is used.
DEFAULT_PACKAGES: tuple[str, ...] = (
    STDLIB,
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "grpc",
    "google.protobuf",
    "opentelemetry",
    "prometheus_client",
    "numpy",
    "huggingface_hub",
    "sympy",
    "mpmath",
    "networkx",
    "jinja2",
    "markupsafe",
    "filelock",
    "fsspec",
    "packaging",
    "yaml",
    "regex",
    "tqdm",
    "typing_extensions",
    "setuptools",
    "httpx",
    "httpcore",
    "h11",
    "anyio",
    "requests",
    "urllib3",
    "idna",
    "certifi",
    "charset_normalizer",
)

# Directory names never descended into in the standard library: test suites, IDLE,
# lib2to3 (grammar tests), bundled wheels, demo scripts, pydoc's 700 kB data file, and
# third-party installs that live under the stdlib folder on some systems.
STDLIB_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "ensurepip",
        "turtledemo",
        "pydoc_data",
        "__pycache__",
    }
)
PACKAGE_SKIP_DIRS = frozenset({"__pycache__"})

# Module name -> distribution name, where they differ and packages_distributions() is ambiguous.
DIST_NAMES = {
    "grpc": "grpcio",
    "google.protobuf": "protobuf",
    "yaml": "PyYAML",
    "huggingface_hub": "huggingface_hub",
}

DEFAULT_EVAL_PERMILLE = 20
DEFAULT_MAX_FILE_BYTES = 1_000_000
MAX_LINE_CHARS = 1000
_LONG_LINE = re.compile(rb"^[^\n]{%d}" % (MAX_LINE_CHARS + 1), re.MULTILINE)  # anchored: linear


@dataclass(frozen=True)
class SourceRoot:
    """One place files come from: ``name`` (module name or "stdlib") and its folders."""

    name: str
    paths: tuple[Path, ...]
    versions: dict[str, str]


@dataclass
class CorpusFile:
    """One kept file; ``text`` is its exact UTF-8 content."""

    root: str
    relpath: str
    sha256: str
    text: str
    split: str  # "train" or "eval"
    n_tokens: int = 0

    @property
    def key(self) -> str:
        return f"{self.root}/{self.relpath}"


@dataclass
class Corpus:
    """Kept files (train first, then eval, each in stream order) and what was skipped."""

    roots: list[SourceRoot]
    files: list[CorpusFile]
    skipped: Counter[str] = field(default_factory=Counter)
    missing_packages: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[CorpusFile]:
        return [f for f in self.files if f.split == name]


def _hash_int(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16)


def is_heldout(root: str, relpath: str, eval_permille: int) -> bool:
    """The held-out rule: a function of the path relative to its root, nothing else."""
    return _hash_int(f"{root}/{relpath}") % 1000 < eval_permille


def order_key(root: str, relpath: str) -> int:
    """Position of a file in the token stream (a salted hash: a fixed shuffle)."""
    return _hash_int(f"order:{root}/{relpath}")


@functools.cache
def _packages_distributions() -> Mapping[str, list[str]]:
    """Top-level module → distributions; scans every installed distribution, so only once."""
    return importlib.metadata.packages_distributions()


def _versions(name: str) -> dict[str, str]:
    if name == STDLIB:
        return {"python": platform.python_version()}
    if name in DIST_NAMES:
        dist_names = [DIST_NAMES[name]]
    else:
        dist_names = sorted(set(_packages_distributions().get(name, [])))
    out: dict[str, str] = {}
    for dist in dist_names:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def find_roots(packages: Sequence[str]) -> tuple[list[SourceRoot], list[str]]:
    """Locate each package's source folder(s) without importing it; returns (found, missing)."""
    roots: list[SourceRoot] = []
    missing: list[str] = []
    for name in packages:
        if name == STDLIB:
            paths: tuple[Path, ...] = (Path(sysconfig.get_paths()["stdlib"]),)
        else:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            if spec is None:
                missing.append(name)
                continue
            if spec.submodule_search_locations:
                paths = tuple(dict.fromkeys(Path(p) for p in spec.submodule_search_locations))
            elif spec.origin and spec.origin.endswith(".py"):
                paths = (Path(spec.origin),)  # a single-module distribution
            else:
                missing.append(name)  # compiled-only module: no Python source
                continue
        roots.append(SourceRoot(name, paths, _versions(name)))
    return roots, missing


def _walk(root: SourceRoot) -> list[tuple[str, Path]]:
    """(relpath, absolute path) of every .py file under the root, sorted by relpath."""
    skip = STDLIB_SKIP_DIRS if root.name == STDLIB else PACKAGE_SKIP_DIRS
    found: dict[str, Path] = {}
    for base in root.paths:
        if base.is_file():
            found.setdefault(base.name, base)
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(
                d for d in dirnames if d not in skip and not d.startswith("config-")
            )
            for fname in filenames:
                if fname.endswith(".py"):
                    path = Path(dirpath) / fname
                    found.setdefault(path.relative_to(base).as_posix(), path)
    return sorted(found.items())


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _reject_reason(relpath: str, data: bytes, max_file_bytes: int) -> str | None:
    if not data.strip():
        return "empty"
    if len(data) > max_file_bytes:
        return "too large"
    if relpath.endswith("_pb2.py"):
        return "generated protobuf"
    if b"\x00" in data:
        return "binary"
    if _LONG_LINE.search(data):
        return "long lines (data, not code)"
    return None


def admit(
    root: str,
    relpath: str,
    text: str,
    digest: str,
    seen: set[str],
    skipped: Counter[str],
    eval_permille: int,
) -> CorpusFile | None:
    """The file on its side of the held-out rule, or None (counted) when its content was seen."""
    if digest in seen:
        skipped["duplicate"] += 1
        return None
    seen.add(digest)
    split = "eval" if is_heldout(root, relpath, eval_permille) else "train"
    return CorpusFile(root, relpath, digest, text, split)


def collect(
    packages: Sequence[str] = DEFAULT_PACKAGES,
    eval_permille: int = DEFAULT_EVAL_PERMILLE,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_files: int | None = None,
) -> Corpus:
    """Read, filter, deduplicate and split the corpus.

    ``max_files`` keeps a deterministic sample (the first files in stream order of each
    split, about ``eval_permille`` ‰ of them held out, at least two); tests use it.
    """
    if not 0 < eval_permille < 1000:
        raise InvalidArgument(f"eval_permille must be in 1..999, got {eval_permille}")
    roots, missing = find_roots(packages)
    if not roots:
        raise InvalidArgument(f"none of the packages {list(packages)} has Python source here")
    skipped: Counter[str] = Counter()
    seen_paths: set[Path] = set()
    seen_hashes: set[str] = set()
    files: list[CorpusFile] = []
    candidates: list[tuple[str, str, Path]] = []
    for root in roots:
        for relpath, path in _walk(root):
            real = path.resolve()
            if real in seen_paths:
                skipped["inside another root"] += 1
                continue
            seen_paths.add(real)
            candidates.append((root.name, relpath, path))
    # Reads overlap in threads (cold disks, network file systems); order is kept.
    with ThreadPoolExecutor(max_workers=16) as pool:
        contents = list(pool.map(_read, (path for _, _, path in candidates)))
    for (root_name, relpath, _), data in zip(candidates, contents, strict=True):
        if data is None:
            skipped["unreadable"] += 1
            continue
        reason = _reject_reason(relpath, data, max_file_bytes)
        text = ""
        if reason is None:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                reason = "not UTF-8"
        if reason is not None:
            skipped[reason] += 1
            continue
        kept = admit(root_name, relpath, text, hashlib.sha256(data).hexdigest(), seen_hashes,
                     skipped, eval_permille)  # fmt: skip
        if kept is not None:
            files.append(kept)
    train = sorted(
        (f for f in files if f.split == "train"), key=lambda f: order_key(f.root, f.relpath)
    )
    held = sorted(
        (f for f in files if f.split == "eval"), key=lambda f: order_key(f.root, f.relpath)
    )
    if max_files is not None:
        n_eval = max(2, round(max_files * eval_permille / 1000))
        held = held[:n_eval]
        train = train[: max(1, max_files - n_eval)]
    if not train or not held:
        raise InvalidArgument(
            f"corpus has {len(train)} training and {len(held)} held-out files; need both "
            "(add packages, raise --max-files or --eval-permille)"
        )
    return Corpus(roots, train + held, skipped, missing)


def split_heldout(files: Sequence[CorpusFile]) -> tuple[list[CorpusFile], list[CorpusFile]]:
    """Held-out files → (validation, test): alternate files in stream order.

    Validation drives early stopping and checkpoint choice; test gives the reported
    acceptance, so the reported numbers are not the ones checkpoints were selected on.
    """
    held = [f for f in files if f.split == "eval"]
    if len(held) < 2:
        return held, held
    return held[0::2], held[1::2]


def file_list_tsv(corpus: Corpus) -> str:
    """The file list as TSV (split, root, relpath, sha256, bytes, tokens), one file a line."""
    lines = ["split\troot\trelpath\tsha256\tbytes\ttokens"]
    for f in corpus.files:
        n_bytes = len(f.text.encode("utf-8"))
        lines.append(f"{f.split}\t{f.root}\t{f.relpath}\t{f.sha256}\t{n_bytes}\t{f.n_tokens}")
    return "\n".join(lines) + "\n"


def write_file_list(corpus: Corpus, path: Path) -> str:
    """Write the list gzip-compressed (byte-reproducible: no timestamp); returns its sha256.

    The hash is of the uncompressed TSV, so it does not depend on the gzip library.
    """
    text = file_list_tsv(corpus).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        gz.write(text)
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(text).hexdigest()


def describe(corpus: Corpus) -> dict[str, object]:
    """Summary for the card: roots with versions, file and byte counts per split."""
    n_files: Counter[str] = Counter()
    n_bytes: Counter[str] = Counter()
    for f in corpus.files:
        if f.split in ("train", "eval"):
            n_files[f.root] += 1
            n_bytes[f.root] += len(f.text.encode("utf-8"))
    per_root = {
        r.name: {"versions": r.versions, "files": n_files[r.name], "bytes": n_bytes[r.name]}
        for r in corpus.roots
    }
    return {
        "roots": per_root,
        "missing_packages": corpus.missing_packages,
        "files": {s: len(corpus.split(s)) for s in ("train", "eval")},
        "bytes": {
            s: sum(len(f.text.encode("utf-8")) for f in corpus.split(s)) for s in ("train", "eval")
        },
        "skipped": dict(sorted(corpus.skipped.items())),
    }
