"""The domain text of `specdec distill`: folders, .txt and .jsonl; the held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specdec.core.errors import InvalidArgument, NotFound
from specdec.training.corpus import is_heldout
from specdec.training.domain import PIECE_BYTES, encode_domain, heldout_prompts, read_domain
from tests.conftest import CORPUS, build_tokenizer


def write_folder(root: Path, n: int = 40) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        folder = root / "sub" if i % 3 else root
        (folder / f"doc{i:02d}.h").write_text(f"/* file {i} */\n" + "\n".join(CORPUS[: 1 + i % 5]))
    return root


def test_folder_documents_split_by_path(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "headers")
    (root / "blob.bin").write_bytes(b"\x00\x01binary")
    (root / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / ".hidden").write_text("not read")
    (root / "zz_copy.h").write_text((root / "doc00.h").read_text())
    domain = read_domain([str(root)], heldout_permille=300)
    keys = {f.relpath for f in domain.files}
    assert "sub/doc01.h" in keys and "doc00.h" in keys and ".hidden" not in keys
    assert domain.skipped == {"binary": 1, "not UTF-8": 1, "duplicate": 1}
    for f in domain.files:  # the split is a function of "<folder name>/<relative path>"
        assert (f.split == "eval") == is_heldout("headers", f.relpath, 300)
    # The same text elsewhere, under the same name: the same split.
    moved = read_domain([str(write_folder(tmp_path / "elsewhere" / "headers"))], 300)
    assert [(f.relpath, f.split) for f in moved.files] == [
        (f.relpath, f.split) for f in domain.files if f.relpath != "zz_copy.h"
    ]


def test_txt_is_cut_into_pieces_and_jsonl_records_are_documents(tmp_path: Path) -> None:
    paragraph = "\n".join(CORPUS) + "\n\n"
    big = tmp_path / "book.txt"
    count = 8 * PIECE_BYTES // len(paragraph) + 1
    big.write_text("".join(f"{i}: {paragraph}" for i in range(count)))
    domain = read_domain([str(big)], heldout_permille=500)
    assert len(domain.files) >= 8
    assert all(f.relpath.startswith("book.txt#") for f in domain.files)
    assert all(f.text.endswith("\n\n") for f in domain.files)

    records = tmp_path / "chat.jsonl"
    lines = [
        json.dumps("a plain string document"),
        json.dumps({"text": "a text field"}),
        json.dumps({"prompt": "question? ", "completion": "answer."}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"content": "hello"}]}),
    ]
    records.write_text("\n".join(lines * 3) + "\n")
    texts = [f.text for f in read_domain([str(records)], 500).files]
    assert "question? answer." in texts and "hi\nhello" in texts
    rendered = read_domain([str(records)], 500, render_chat=lambda m: "<chat>" + m[0]["content"])
    assert "<chat>hi" in [f.text for f in rendered.files]


def test_bad_data_is_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such file"):
        read_domain([str(tmp_path / "missing")])
    tiny = tmp_path / "one.txt"
    tiny.write_text("just one small document\n")
    with pytest.raises(InvalidArgument, match="held-out documents"):
        read_domain([str(tiny)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(InvalidArgument, match="line 2 is not JSON"):
        read_domain([str(bad)])
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"tokens": [1, 2]}\n')
    with pytest.raises(InvalidArgument, match="line 1: expected a string"):
        read_domain([str(odd)])


def test_max_bytes_keeps_the_first_documents(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "h", n=60)
    full = read_domain([str(root)], 300)
    capped = read_domain([str(root)], 300, max_bytes=2000)
    assert sum(len(f.text) for f in capped.files) < sum(len(f.text) for f in full.files)
    assert {f.key for f in capped.files} <= {f.key for f in full.files}


def test_streams_and_bench_prompts_come_from_the_split(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "h", n=60)
    tokenizer = build_tokenizer()
    domain = read_domain([str(root)], 300)
    streams = encode_domain(domain, tokenizer, separator=2)
    n_train = sum(f.n_tokens + 1 for f in domain.split("train")) + 1
    assert streams.train.numel() == n_train
    assert streams.valid.numel() > 1 and streams.test.numel() > 1
    assert int(streams.train[0]) == int(streams.train[-1]) == 2
    prompts = heldout_prompts([str(root)], lambda t: tokenizer.encode(t), 3, 8, 300)
    assert len(prompts) == 3 and all(4 <= len(p) <= 8 for p in prompts)
    with pytest.raises(InvalidArgument, match="give only"):
        heldout_prompts([str(root)], lambda t: tokenizer.encode(t), 500, 8, 300)


def test_glob_patterns_pick_files_keyed_below_their_folder(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "headers", n=60)
    (root / "sub" / "notes.txt").write_text("not a header")
    domain = read_domain([str(root / "**" / "*.h")], heldout_permille=300)
    whole = read_domain([str(root)], heldout_permille=300)
    assert [(f.relpath, f.split) for f in domain.files] == [
        (f.relpath, f.split) for f in whole.files if f.relpath.endswith(".h")
    ]
    with pytest.raises(NotFound, match="matches no file"):
        read_domain([str(root / "*.nothing")])
