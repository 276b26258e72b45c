"""The in-memory session store (``--session-store memory``): sessions die with the gateway.

For tests and throwaway runs; the same interface and rules as the durable stores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from gateway.store.base import Fence, LocallyLocked, SessionRecord, TurnRecord, stale


class MemoryStore(LocallyLocked):
    def __init__(self) -> None:
        super().__init__()
        self._records: dict[str, SessionRecord] = {}

    async def create(self, record: SessionRecord) -> None:
        self._records[record.session_id] = _copy(record)

    async def load(self, session_id: str) -> SessionRecord | None:
        record = self._records.get(session_id)
        return _copy(record) if record is not None else None

    async def count(self) -> int:
        return len(self._records)

    def _held(self, fence: Fence) -> SessionRecord:
        self._locks.check(fence)
        return self._records[fence.session_id]

    async def append(
        self, fence: Fence, base_length: int, token_ids: Sequence[int], turn: TurnRecord | None
    ) -> None:
        record = self._held(fence)
        if len(record.tokens) != base_length:
            raise stale(fence.session_id, base_length, len(record.tokens))
        record.tokens.extend(token_ids)
        if turn is not None:
            record.turn = turn

    async def truncate(self, fence: Fence, length: int) -> None:
        record = self._held(fence)
        del record.tokens[length:]
        record.turn = None

    async def update(self, record: SessionRecord) -> None:
        stored = self._records.get(record.session_id)
        if stored is not None:
            self._records[record.session_id] = dataclasses.replace(record, tokens=stored.tokens)

    async def delete(self, session_id: str) -> bool:
        return self._records.pop(session_id, None) is not None

    async def idle(self, cutoff_unix_ms: int) -> list[str]:
        return [i for i, r in self._records.items() if r.last_used_unix_ms < cutoff_unix_ms]

    async def known(self, session_ids: Iterable[str]) -> set[str]:
        return {i for i in session_ids if i in self._records}

    async def close(self) -> None:
        self._records.clear()


def _copy(record: SessionRecord) -> SessionRecord:
    """A copy whose token list is its own (the rest is immutable)."""
    return dataclasses.replace(record, tokens=list(record.tokens))
