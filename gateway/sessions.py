"""The session table: the committed tokens of every session are the source of truth.

Workers' KV caches are soft state rebuilt from these tokens. A session is
bound to the principal that created it: to anyone else it does not exist
(NOT_FOUND, so ids cannot be probed). Idle sessions expire after a TTL.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

from gateway.chat import ChatHistory
from specdec.core.errors import FailedPrecondition, NotFound, ResourceExhausted


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Session:
    """One conversation: its committed tokens and where its caches live."""

    session_id: str
    owner: str
    ephemeral: bool  # a one-off Generate: closed when the turn ends
    tokens: list[int] = field(default_factory=list)
    turns: int = 0
    oracle_id: str = ""
    draft_id: str = ""
    chat: ChatHistory | None = None  # a chat session's conversation (gateway/chat.py)
    created_unix_ms: int = field(default_factory=_now_ms)
    last_used_unix_ms: int = field(default_factory=_now_ms)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def touch(self) -> None:
        self.last_used_unix_ms = _now_ms()


class SessionTable:
    """Sessions by id, bounded in number, expiring when idle."""

    def __init__(self, max_sessions: int, ttl_s: float) -> None:
        self._sessions: dict[str, Session] = {}
        self._max_sessions = max_sessions
        self._ttl_ms = int(ttl_s * 1000)

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, owner: str, *, ephemeral: bool = False) -> Session:
        self.expire_idle()
        if len(self._sessions) >= self._max_sessions:
            raise ResourceExhausted(
                f"the gateway holds its maximum of {self._max_sessions} sessions; "
                "close sessions you no longer need or retry later"
            )
        session = Session(secrets.token_urlsafe(24), owner, ephemeral)
        self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str, owner: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or not secrets.compare_digest(session.owner, owner):
            raise NotFound(f"no session {session_id!r} (it may have expired or been closed)")
        return session

    def close(self, session_id: str, owner: str) -> Session:
        session = self.get(session_id, owner)
        if session.lock.locked():
            raise FailedPrecondition(
                f"session {session_id!r} is generating; cancel that request first"
            )
        del self._sessions[session_id]
        return session

    def discard(self, session: Session) -> None:
        self._sessions.pop(session.session_id, None)

    def expire_idle(self) -> list[Session]:
        """Drop sessions idle for longer than the TTL; return them (their caches to free)."""
        cutoff = _now_ms() - self._ttl_ms
        expired = [
            s
            for s in self._sessions.values()
            if s.last_used_unix_ms < cutoff and not s.lock.locked()
        ]
        for session in expired:
            del self._sessions[session.session_id]
        return expired
