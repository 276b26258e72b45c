"""The user's domain text for ``specdec distill``: documents, a held-out split, token streams.

``--data`` names folders (every text file under them, recursively, in path order), quoted
glob patterns (``'src/**/*.pm'``: the matching files, keyed below the pattern's folder),
``.txt`` files (cut into pieces of about ``PIECE_BYTES`` at blank lines, so that one big
file still has pieces to hold out) and ``.jsonl`` files (one record a line: a JSON string,
or an object with ``text``, or ``prompt`` and an optional ``completion`` / ``response``, or
chat ``messages`` rendered by the oracle's chat template). Each file, piece or record is a
document, keyed by its path (and piece or line number).

Held-out rule (``corpus.is_heldout``): a document is held out when
``int(sha256("<name>/<key>")[:8], 16) % 1000 < heldout_permille``, where name is the last
component of the ``--data`` path and key the document's path below it; it depends only on
names, so `specdec bench --prompt-data` finds the same test documents later, anywhere. Held-out
documents alternate between validation (choosing the checkpoint) and test (the acceptance
reported before and after). Identical documents are kept once; binary files and files
that are not UTF-8 are skipped and counted.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specdec.core.errors import InvalidArgument, NotFound
from specdec.training.corpus import CorpusFile, admit, split_heldout
from specdec.training.tokenizer import build_stream, encode_texts

PIECE_BYTES = 16_384
GLOB_CHARS = "*?["
DEFAULT_HELDOUT_PERMILLE = 50
TEXT_FIELDS = ("text", "content", "document")
PROMPT_FIELDS = ("prompt", "instruction", "question", "input")
ANSWER_FIELDS = ("completion", "response", "answer", "output")
# Renders chat ``messages`` as the oracle was trained to see them (its chat template).
RenderChat = Callable[[list[dict[str, Any]]], str] | None


@dataclass
class DomainText:
    """Documents (train first, then held out, each in path order) and what was skipped."""

    sources: list[str]
    files: list[CorpusFile]
    skipped: Counter[str] = field(default_factory=Counter)

    def split(self, name: str) -> list[CorpusFile]:
        return [f for f in self.files if f.split == name]

    def describe(self) -> dict[str, Any]:
        """Summary for the model card."""
        return {
            "sources": self.sources,
            "documents": {s: len(self.split(s)) for s in ("train", "eval")},
            "bytes": {
                s: sum(len(f.text.encode("utf-8")) for f in self.split(s))
                for s in ("train", "eval")
            },
            "skipped": dict(sorted(self.skipped.items())),
        }


def read_domain(
    paths: Sequence[str],
    heldout_permille: int = DEFAULT_HELDOUT_PERMILLE,
    max_bytes: int | None = None,
    render_chat: RenderChat = None,
) -> DomainText:
    """Read ``paths`` into documents and split them; ``max_bytes`` keeps the first documents
    (in path order) up to that much text. Raises ``NotFound`` / ``InvalidArgument`` with what
    to change when a path is missing or the text is too small to hold some of it out."""
    if not 0 < heldout_permille < 1000:
        raise InvalidArgument(f"--heldout-permille must be in 1..999, got {heldout_permille}")
    if not paths:
        raise InvalidArgument("give the domain text with --data (a folder, .txt or .jsonl)")
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    files: list[CorpusFile] = []
    total = 0
    for source in paths:
        root, documents = _source(source, skipped, render_chat)
        name = root.resolve().name
        for key, text in documents:
            data = text.encode("utf-8")
            kept = admit(name, key, text, hashlib.sha256(data).hexdigest(), seen, skipped,
                         heldout_permille)  # fmt: skip
            if kept is None:
                continue
            files.append(kept)
            total += len(data)
            if max_bytes is not None and total >= max_bytes:
                break
        if max_bytes is not None and total >= max_bytes:
            break
    train = [f for f in files if f.split == "train"]
    held = [f for f in files if f.split == "eval"]
    if not train or len(held) < 2:
        raise InvalidArgument(
            f"--data gives {len(train)} training and {len(held)} held-out documents "
            f"({total:,} bytes; skipped {dict(skipped)}); distillation needs both, two held "
            "out at least: add text, or raise --heldout-permille"
        )
    return DomainText([str(p) for p in paths], train + held, skipped)


def _source(
    source: str,
    skipped: Counter[str],
    render_chat: RenderChat,
) -> tuple[Path, Iterator[tuple[str, str]]]:
    """The folder documents of ``source`` are keyed below, and the documents."""
    path = Path(source).expanduser()
    if not any(c in source for c in GLOB_CHARS):
        if not path.exists():
            raise NotFound(f"--data {source}: no such file or folder")
        return path, _documents(path, skipped, render_chat)
    parts = path.parts
    first = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
    base = Path(*parts[:first]) if first else Path(".")
    matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
    files = [m for m in matches if m.is_file() and not m.name.startswith(".")]
    if not files:
        raise NotFound(f"--data {source}: the pattern matches no file")

    def documents() -> Iterator[tuple[str, str]]:
        for file in files:
            key = file.relative_to(base).as_posix()
            yield from _file_documents(file, key, skipped, render_chat)

    return base, documents()


def _documents(
    root: Path,
    skipped: Counter[str],
    render_chat: RenderChat,
) -> Iterator[tuple[str, str]]:
    """(key, text) of every document under ``root``, in path order, read as needed."""
    if root.is_file():
        yield from _file_documents(root, root.name, skipped, render_chat)
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if not path.is_file():
                skipped["not a regular file"] += 1
                continue
            yield from _file_documents(
                path, path.relative_to(root).as_posix(), skipped, render_chat
            )


def _file_documents(
    path: Path,
    key: str,
    skipped: Counter[str],
    render_chat: RenderChat,
) -> list[tuple[str, str]]:
    try:
        data = path.read_bytes()
    except OSError:
        skipped["unreadable"] += 1
        return []
    if b"\x00" in data[:8192]:
        skipped["binary"] += 1
        return []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        skipped["not UTF-8"] += 1
        return []
    if not text.strip():
        skipped["empty"] += 1
        return []
    if path.suffix == ".jsonl":
        return _records(text, key, skipped, render_chat)
    if len(data) <= PIECE_BYTES:
        return [(key, text)]
    return [(f"{key}#{i}", piece) for i, piece in enumerate(_pieces(text))]


def _pieces(text: str) -> list[str]:
    """``text`` cut at blank lines into pieces of at least ``PIECE_BYTES`` characters."""
    pieces: list[str] = []
    start = 0
    while start < len(text):
        cut = text.find("\n\n", start + PIECE_BYTES)
        end = len(text) if cut < 0 else cut + 2
        pieces.append(text[start:end])
        start = end
    return pieces


def _records(
    text: str,
    key: str,
    skipped: Counter[str],
    render_chat: RenderChat,
) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{key} line {number} is not JSON: {exc}") from None
        document = _record_text(record, render_chat)
        if document is None:
            raise InvalidArgument(
                f"{key} line {number}: expected a string, or an object with one of "
                f"{list(TEXT_FIELDS + PROMPT_FIELDS)} or 'messages'"
            )
        if document.strip():
            out.append((f"{key}:{number}", document))
        else:
            skipped["empty"] += 1
    return out


def _record_text(record: Any, render_chat: RenderChat) -> str | None:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    for name in TEXT_FIELDS:
        if isinstance(record.get(name), str):
            return str(record[name])
    messages = record.get("messages")
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        if render_chat is not None:
            return render_chat(messages)
        return "\n".join(str(m.get("content", "")) for m in messages)
    for name in PROMPT_FIELDS:
        if isinstance(record.get(name), str):
            answer = next((record[a] for a in ANSWER_FIELDS if isinstance(record.get(a), str)), "")
            return str(record[name]) + str(answer)
    return None


@dataclass
class DomainStreams:
    """Token streams (int32, CPU) of the three splits, documents separated by ``separator``."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    separator: int


def encode_domain(domain: DomainText, tokenizer: Any, separator: int) -> DomainStreams:
    """Tokenize every document (in parallel with a fast tokenizer) into the three streams."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    texts = [f.text for f in domain.files]
    if backend is not None:
        encoded = encode_texts(backend, texts)
    else:  # a slow (Python) tokenizer
        from array import array

        encoded = [array("i", tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    by_key: dict[str, Any] = {}
    for f, ids in zip(domain.files, encoded, strict=True):
        f.n_tokens = len(ids)
        by_key[f.key] = ids
    valid, test = split_heldout(domain.files)
    return DomainStreams(
        train=build_stream([by_key[f.key] for f in domain.split("train")], separator),
        valid=build_stream([by_key[f.key] for f in valid], separator),
        test=build_stream([by_key[f.key] for f in test], separator),
        separator=separator,
    )


def heldout_prompts(
    paths: Sequence[str],
    encode: Callable[[str], Sequence[int]],
    count: int,
    prompt_tokens: int,
    heldout_permille: int = DEFAULT_HELDOUT_PERMILLE,
) -> list[list[int]]:
    """Benchmark prompts from the test documents of ``paths``: one per document, its text up
    to the line nearest its middle, the last ``prompt_tokens`` tokens of that."""
    _, test = split_heldout(read_domain(paths, heldout_permille).files)
    prompts: list[list[int]] = []
    for doc in test:
        middle = doc.text.rfind("\n", 0, len(doc.text) // 2) + 1 or len(doc.text) // 2
        ids = list(encode(doc.text[:middle]))
        if len(ids) >= prompt_tokens // 2:
            prompts.append(ids[-prompt_tokens:])
        if len(prompts) == count:
            return prompts
    raise InvalidArgument(
        f"the test documents of {list(paths)} give only {len(prompts)} prompts of at least "
        f"{prompt_tokens // 2} tokens; ask for fewer (--prompts) or shorter (--prompt-tokens)"
    )
