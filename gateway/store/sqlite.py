"""The SQLite session store (the default): one database file under ``--state-dir``.

One gateway process owns the file (an exclusive ``flock`` on ``gateway.lock``
beside it: a second gateway on the same directory is refused at start), so the
turn locks are in-process. The database is in WAL mode with
``synchronous=NORMAL``: a commit is one append to the write-ahead log, with no
fsync, and survives the death of the process (SIGKILL, OOM kill, a crash);
only an operating-system crash or power loss can lose the last commits.

A session's tokens are stored as one row per committed round (``chunks``:
little-endian int32 ids after ``base`` tokens), so an append costs the same
however long the session is; ``sessions.length`` is the committed length every
append must extend. Calls run on the event loop: each is tens of microseconds
(BENCHMARKS.md, "What the session store costs").
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from gateway.store.base import (
    Fence,
    LocallyLocked,
    SessionRecord,
    TurnRecord,
    pack_tokens,
    stale,
    unpack_tokens,
)
from specdec.core.errors import FailedPrecondition, Unavailable

DB_NAME = "sessions.db"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    ephemeral INTEGER NOT NULL,
    length INTEGER NOT NULL DEFAULT 0,
    turns INTEGER NOT NULL DEFAULT 0,
    oracle_id TEXT NOT NULL DEFAULT '',
    draft_id TEXT NOT NULL DEFAULT '',
    created_ms INTEGER NOT NULL,
    last_used_ms INTEGER NOT NULL,
    turn TEXT
);
CREATE INDEX IF NOT EXISTS sessions_by_last_use ON sessions (last_used_ms);
CREATE TABLE IF NOT EXISTS chunks (
    session_id TEXT NOT NULL,
    base INTEGER NOT NULL,
    ids BLOB NOT NULL,
    PRIMARY KEY (session_id, base)
) WITHOUT ROWID;
"""


class SqliteStore(LocallyLocked):
    def __init__(self, state_dir: Path | str) -> None:
        super().__init__()
        self.directory = Path(state_dir).expanduser()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._owner = _own(self.directory)
            self.path = self.directory / DB_NAME
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"{self.path} was written by a newer specdec (schema {version}, this one "
                    f"reads {SCHEMA_VERSION}); upgrade, or point --state-dir elsewhere"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as exc:
            raise Unavailable(
                f"cannot open the session store in {self.directory}: {exc}; set --state-dir "
                "to a writable directory (or --session-store memory)"
            ) from None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise Unavailable(f"the session store {self.path} failed: {exc}") from None

    async def create(self, record: SessionRecord) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.session_id,
                    record.owner,
                    int(record.ephemeral),
                    len(record.tokens),
                    record.turns,
                    record.oracle_id,
                    record.draft_id,
                    record.created_unix_ms,
                    record.last_used_unix_ms,
                    record.turn.to_json() if record.turn is not None else None,
                ),
            )
            if record.tokens:
                db.execute(
                    "INSERT INTO chunks VALUES (?, 0, ?)",
                    (record.session_id, pack_tokens(record.tokens)),
                )

    async def load(self, session_id: str) -> SessionRecord | None:
        try:
            row = self._db.execute(
                "SELECT owner, ephemeral, length, turns, oracle_id, draft_id, created_ms, "
                "last_used_ms, turn FROM sessions WHERE id = ?",
                (session_id,),
            ).fetchone()
            if row is None:
                return None
            chunks = self._db.execute(
                "SELECT ids FROM chunks WHERE session_id = ? ORDER BY base", (session_id,)
            ).fetchall()
        except sqlite3.Error as exc:
            raise Unavailable(f"the session store {self.path} failed: {exc}") from None
        tokens = unpack_tokens(b"".join(c[0] for c in chunks))
        owner, ephemeral, length, turns, oracle_id, draft_id, created, last_used, turn = row
        assert len(tokens) == length, f"session {session_id}: {len(tokens)} tokens, {length} noted"
        return SessionRecord(
            session_id,
            owner,
            bool(ephemeral),
            tokens,
            turns,
            oracle_id,
            draft_id,
            created,
            last_used,
            TurnRecord.from_json(turn) if turn is not None else None,
        )

    async def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM sessions").fetchone()[0])

    async def append(
        self, fence: Fence, base_length: int, token_ids: Sequence[int], turn: TurnRecord | None
    ) -> None:
        self._locks.check(fence)
        with self._transaction() as db:
            if turn is not None:
                cursor = db.execute(
                    "UPDATE sessions SET length = length + ?, turn = ? WHERE id = ? AND length = ?",
                    (len(token_ids), turn.to_json(), fence.session_id, base_length),
                )
            else:
                cursor = db.execute(
                    "UPDATE sessions SET length = length + ? WHERE id = ? AND length = ?",
                    (len(token_ids), fence.session_id, base_length),
                )
            if cursor.rowcount != 1:
                raise stale(fence.session_id, base_length, self._length(fence.session_id))
            if token_ids:
                db.execute(
                    "INSERT INTO chunks VALUES (?, ?, ?)",
                    (fence.session_id, base_length, pack_tokens(token_ids)),
                )

    def _length(self, session_id: str) -> int:
        row = self._db.execute("SELECT length FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return -1 if row is None else int(row[0])

    async def truncate(self, fence: Fence, length: int) -> None:
        self._locks.check(fence)
        with self._transaction() as db:
            # A turn's tokens start at a chunk boundary: its prompt is one chunk.
            db.execute(
                "DELETE FROM chunks WHERE session_id = ? AND base >= ?", (fence.session_id, length)
            )
            db.execute(
                "UPDATE sessions SET length = ?, turn = NULL WHERE id = ?",
                (length, fence.session_id),
            )

    async def update(self, record: SessionRecord) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE sessions SET turns = ?, oracle_id = ?, draft_id = ?, last_used_ms = ?, "
                "turn = ? WHERE id = ?",
                (
                    record.turns,
                    record.oracle_id,
                    record.draft_id,
                    record.last_used_unix_ms,
                    record.turn.to_json() if record.turn is not None else None,
                    record.session_id,
                ),
            )

    async def delete(self, session_id: str) -> bool:
        with self._transaction() as db:
            db.execute("DELETE FROM chunks WHERE session_id = ?", (session_id,))
            return db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount == 1

    async def idle(self, cutoff_unix_ms: int) -> list[str]:
        rows = self._db.execute(
            "SELECT id FROM sessions WHERE last_used_ms < ?", (cutoff_unix_ms,)
        ).fetchall()
        return [r[0] for r in rows]

    async def known(self, session_ids: Iterable[str]) -> set[str]:
        wanted = list(session_ids)
        found: set[str] = set()
        for i in range(0, len(wanted), 500):  # SQLite's bound on host parameters
            part = wanted[i : i + 500]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(f"SELECT id FROM sessions WHERE id IN ({marks})", part)
            found.update(r[0] for r in rows)
        return found

    async def close(self) -> None:
        self._db.close()
        self._owner.close()


def _own(directory: Path) -> IO[Any]:
    """Hold ``directory/gateway.lock`` for this process's lifetime (the kernel drops it
    when the process dies, SIGKILL included); ``FailedPrecondition`` when another holds it."""
    handle = open(directory / "gateway.lock", "a+")  # noqa: SIM115 - held until close()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FailedPrecondition(
            f"another gateway uses the session store in {directory}: give each gateway its "
            "own --state-dir, or share sessions between replicas with --session-store "
            "redis://host:port/db"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
