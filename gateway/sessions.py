"""The session table: the rules over the session store (``gateway.store``).

The committed tokens of every session are the source of truth; workers' KV
caches are soft state rebuilt from them. A session is bound to the principal
that created it: to anyone else it does not exist (NOT_FOUND, so ids cannot be
probed; the one place this is checked is ``SessionTable.get``). Sessions are
bounded in number and expire when idle. A turn holds the session's turn lock
(``SessionTable.turn``) and writes through its ``Session``: the prompt and the
turn's parameters first, then each round's tokens, each before the client is
sent them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import secrets
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field

from gateway.store.base import Fence, SessionRecord, SessionStore, TurnRecord, now_ms
from specdec.core.errors import FailedPrecondition, NotFound, ResourceExhausted, quoted
from specdec.core.stopping import FinishReason


@dataclass(eq=False)
class Session(SessionRecord):
    """A request's copy of one session; its turn writes through to the store while it
    holds the session's turn lock (``fence``)."""

    store: SessionStore | None = field(default=None, repr=False)
    fence: Fence | None = field(default=None, repr=False)
    _previous_turn: TurnRecord | None = field(default=None, repr=False)  # of a running turn

    @classmethod
    def of(cls, record: SessionRecord, store: SessionStore) -> Session:
        values = {f.name: getattr(record, f.name) for f in dataclasses.fields(SessionRecord)}
        return cls(**values, store=store)

    def _writer(self) -> tuple[SessionStore, Fence]:
        assert self.store is not None and self.fence is not None, "write only inside a turn"
        return self.store, self.fence

    def touch(self) -> None:
        self.last_used_unix_ms = now_ms()

    async def begin_turn(self, prompt_ids: Sequence[int], turn: TurnRecord) -> None:
        """Commit the prompt and the turn's parameters (one write)."""
        store, fence = self._writer()
        await store.append(fence, len(self.tokens), prompt_ids, turn)
        self.tokens.extend(prompt_ids)
        self._previous_turn, self.turn = self.turn, turn

    async def commit(self, token_ids: Sequence[int]) -> None:
        """Commit one round's tokens; durable when this returns."""
        if token_ids:
            store, fence = self._writer()
            await store.append(fence, len(self.tokens), token_ids, None)
            self.tokens.extend(token_ids)

    async def rollback(self, length: int) -> None:
        """Undo a turn that produced nothing: its prompt and its record go, and the turn
        before it is the latest again (a chat goes on from it)."""
        store, fence = self._writer()
        await store.truncate(fence, length)
        del self.tokens[length:]
        self.turn, self._previous_turn = self._previous_turn, None
        if self.turn is not None:
            await store.update(self)

    async def note_workers(self, oracle_id: str, draft_id: str) -> None:
        """Where the session's caches are, when a turn ends short of finishing (cancelled):
        its next turn goes back to them instead of prefilling elsewhere."""
        store, _ = self._writer()
        self.oracle_id = oracle_id
        self.draft_id = draft_id or self.draft_id
        await store.update(self)

    async def finish_turn(self, reason: FinishReason, oracle_id: str, draft_id: str) -> None:
        """The turn completed: count it, note where its caches are."""
        store, _ = self._writer()
        self.turns += 1
        self.oracle_id = oracle_id
        self.draft_id = draft_id or self.draft_id
        if self.turn is not None:
            self.turn = dataclasses.replace(self.turn, finish=reason)
        self.touch()
        await store.update(self)


def ephemeral_session_id(owner: str, turn_id: str) -> str:
    """The session of a one-off request, found again by its caller's turn id (resume)."""
    digest = hashlib.sha256(f"{owner}\0{turn_id}".encode()).hexdigest()
    return "turn-" + digest[:40]


class SessionTable:
    """Sessions by id, bounded in number, expiring when idle, owned by their creator."""

    def __init__(self, store: SessionStore, max_sessions: int, ttl_s: float) -> None:
        self.store = store
        self._max_sessions = max_sessions
        self._ttl_ms = int(ttl_s * 1000)

    async def create(self, owner: str, *, ephemeral: bool = False, session_id: str = "") -> Session:
        if await self.store.count() >= self._max_sessions:
            await self.expire_idle()
            if await self.store.count() >= self._max_sessions:
                raise ResourceExhausted(
                    f"the gateway holds its maximum of {self._max_sessions} sessions; "
                    "close sessions you no longer need or retry later"
                )
        record = SessionRecord(session_id or secrets.token_urlsafe(24), owner, ephemeral)
        await self.store.create(record)
        return Session.of(record, self.store)

    async def find(self, session_id: str, owner: str) -> Session | None:
        """The caller's session, or None (also when it is someone else's)."""
        record = await self.store.load(session_id)
        if record is None or not secrets.compare_digest(record.owner, owner):
            return None
        return Session.of(record, self.store)

    async def get(self, session_id: str, owner: str) -> Session:
        session = await self.find(session_id, owner)
        if session is None:
            raise NotFound(f"no session {quoted(session_id)} (it may have expired or been closed)")
        return session

    @contextlib.asynccontextmanager
    async def turn(self, session: Session, wait_s: float = 0.0) -> AsyncIterator[Session]:
        """Hold the session's turn lock (``busy`` when another turn holds it longer than
        ``wait_s``); yields the session as stored now, its writes fenced by the lock."""
        async with self.store.lock(session.session_id, wait_s) as fence:
            current = await self.find(session.session_id, session.owner)
            if current is None:
                raise NotFound(f"session {quoted(session.session_id)} was closed meanwhile")
            current.fence = fence
            try:
                yield current
            finally:
                current.fence = None

    async def close(self, session_id: str, owner: str) -> Session:
        session = await self.get(session_id, owner)
        if await self.store.locked(session_id):
            raise FailedPrecondition(
                f"session {quoted(session_id)} is generating; cancel that request first"
            )
        await self.store.delete(session_id)
        return session

    async def discard(self, session: Session) -> None:
        await self.store.delete(session.session_id)

    async def expire_idle(self) -> list[str]:
        """Drop sessions idle for longer than the TTL; return their ids (caches to free)."""
        expired = []
        for session_id in await self.store.idle(now_ms() - self._ttl_ms):
            if not await self.store.locked(session_id) and await self.store.delete(session_id):
                expired.append(session_id)
        return expired

    async def known(self, session_ids: Iterable[str]) -> set[str]:
        """Those of ``session_ids`` that are live sessions (the KV leases of workers)."""
        return await self.store.known(session_ids)
