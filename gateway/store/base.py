"""What a session store keeps, and the interface every store implements.

A session's durable state is a ``SessionRecord``: its committed tokens, owner,
turn count, worker placement and, while a turn runs (or after a gateway died
under it), the ``TurnRecord`` that lets any gateway continue that turn exactly:
its id, where its prompt starts and ends, its sampling parameters with the
*resolved* seed, and its speculation settings. Tokens are appended per round and
written before the client is sent them, so every token a client has received is
in the store.

Writes of a running turn are fenced: ``lock`` hands out a ``Fence`` (one turn of
one session at a time, across every gateway sharing the store), and every append
names the committed length it extends, so a writer that lost its lock (a replica
that was paused, then taken over) cannot write past its successor.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import json
import struct
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field

from specdec.core.errors import FailedPrecondition
from specdec.core.sampling import SamplingParams
from specdec.core.stopping import FinishReason
from specdec.core.types import ChatMessage, DrafterKind, Speculation


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class ChatRecord:
    """A chat turn's conversation (``gateway.chat``): every message up to and including
    the turn's own, and ``text``, what the committed tokens up to its prompt's end stand
    for (each turn's rendered prompt, each reply as generated, special tokens kept)."""

    messages: tuple[ChatMessage, ...]
    text: str


@dataclass(frozen=True)
class TurnRecord:
    """The durable parameters of a session's latest turn.

    ``start``: the committed length before its prompt; ``prompt_tokens``: the prompt's
    length, so the turn's generated tokens are ``tokens[prompt_end:]``. ``params`` has
    the resolved seed (sampling draws depend only on it and the position, so a
    continued turn draws what the cut one would have). ``finish`` is None while the
    turn runs, or after it was cut before it finished.
    """

    turn_id: str
    start: int
    prompt_tokens: int
    params: SamplingParams
    speculation: Speculation
    finish: FinishReason | None = None
    chat: ChatRecord | None = None  # a chat turn's conversation; None for a plain prompt

    @property
    def prompt_end(self) -> int:
        return self.start + self.prompt_tokens

    def to_json(self) -> str:
        speculation = dataclasses.asdict(self.speculation)
        speculation["drafter"] = self.speculation.drafter.value
        return json.dumps(
            {
                "turn_id": self.turn_id,
                "start": self.start,
                "prompt_tokens": self.prompt_tokens,
                "params": dataclasses.asdict(self.params),
                "speculation": speculation,
                "finish": self.finish.value if self.finish is not None else None,
                "chat": None
                if self.chat is None
                else {
                    "messages": [[m.role, m.content] for m in self.chat.messages],
                    "text": self.chat.text,
                },
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> TurnRecord:
        data = json.loads(text)
        params = data["params"]
        params["stop_token_ids"] = tuple(params["stop_token_ids"])
        params["stop"] = tuple(params["stop"])
        speculation = data["speculation"]
        speculation["drafter"] = DrafterKind(speculation["drafter"])
        finish = data["finish"]
        chat = data.get("chat")  # absent in records written before chat
        return cls(
            turn_id=data["turn_id"],
            start=data["start"],
            prompt_tokens=data["prompt_tokens"],
            params=SamplingParams(**params),
            speculation=Speculation(**speculation),
            finish=FinishReason(finish) if finish is not None else None,
            chat=None
            if chat is None
            else ChatRecord(tuple(ChatMessage(*m) for m in chat["messages"]), chat["text"]),
        )


@dataclass
class SessionRecord:
    """One session as the store holds it."""

    session_id: str
    owner: str
    ephemeral: bool  # a one-off Generate: deleted when its turn ends
    tokens: list[int] = field(default_factory=list)
    turns: int = 0  # completed turns
    oracle_id: str = ""
    draft_id: str = ""
    created_unix_ms: int = field(default_factory=now_ms)
    last_used_unix_ms: int = field(default_factory=now_ms)
    turn: TurnRecord | None = None  # the latest turn (None: none yet, or rolled back)


@dataclass(frozen=True)
class Fence:
    """Proof of holding a session's turn lock; ``token`` is checked by every write."""

    session_id: str
    token: str


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian int32: 4 bytes each, appendable."""
    return struct.pack(f"<{len(token_ids)}i", *token_ids)


def unpack_tokens(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 4}i", data))


def busy(session_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"session {session_id!r} is already generating; one turn at a time "
        "(resume a cut turn with the same turn_id)"
    )


def stale(session_id: str, base_length: int, length: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"session {session_id!r}: a write at committed length {base_length} found "
        f"{length}; another gateway took this turn over"
    )


class SessionStore(abc.ABC):
    """Where sessions live. Every method may raise ``Unavailable`` (store unreachable)."""

    #: Shared by several gateway processes (sessions and locks are seen by all).
    shared: bool = False

    @abc.abstractmethod
    async def create(self, record: SessionRecord) -> None:
        """Store a new session (its tokens too)."""

    @abc.abstractmethod
    async def load(self, session_id: str) -> SessionRecord | None:
        """The session as stored, or None."""

    @abc.abstractmethod
    async def count(self) -> int:
        """Sessions stored."""

    @abc.abstractmethod
    async def append(
        self, fence: Fence, base_length: int, token_ids: Sequence[int], turn: TurnRecord | None
    ) -> None:
        """Commit ``token_ids`` after exactly ``base_length`` tokens, and set the latest
        turn to ``turn`` when given; ``FailedPrecondition`` when the length differs or
        the fence is no longer held."""

    @abc.abstractmethod
    async def truncate(self, fence: Fence, length: int) -> None:
        """Drop the tokens after ``length`` and the latest turn (a turn that produced
        nothing never happened)."""

    @abc.abstractmethod
    async def update(self, record: SessionRecord) -> None:
        """Write the record's turn count, placement, last use and latest turn (not its
        tokens)."""

    @abc.abstractmethod
    async def delete(self, session_id: str) -> bool:
        """Forget the session; False when it was not stored."""

    @abc.abstractmethod
    async def idle(self, cutoff_unix_ms: int) -> list[str]:
        """Ids of sessions last used before ``cutoff_unix_ms``."""

    @abc.abstractmethod
    async def known(self, session_ids: Iterable[str]) -> set[str]:
        """Those of ``session_ids`` the store holds."""

    @abc.abstractmethod
    def lock(
        self, session_id: str, wait_s: float = 0.0
    ) -> contextlib.AbstractAsyncContextManager[Fence]:
        """Hold the session's turn lock: one turn at a time across every gateway of
        the store. Waits up to ``wait_s`` for it, then ``busy``."""

    @abc.abstractmethod
    async def locked(self, session_id: str) -> bool:
        """Whether some gateway holds the session's turn lock now."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and files."""


class LocalLocks:
    """Turn locks of one process (the memory and SQLite stores: one gateway each)."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}  # holders and waiters, per session
        self._holders: dict[str, str] = {}  # session -> the token of its fence
        self._counter = 0

    def locked(self, session_id: str) -> bool:
        return session_id in self._holders

    def check(self, fence: Fence) -> None:
        """``FailedPrecondition`` unless ``fence`` holds its session's lock."""
        if self._holders.get(fence.session_id) != fence.token:
            raise FailedPrecondition(
                f"session {fence.session_id!r}: this turn no longer holds the session"
            )

    @contextlib.asynccontextmanager
    async def hold(self, session_id: str, wait_s: float) -> AsyncIterator[Fence]:
        if session_id in self._holders and wait_s <= 0:
            raise busy(session_id)
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        self._users[session_id] = self._users.get(session_id, 0) + 1
        try:
            try:
                await asyncio.wait_for(lock.acquire(), wait_s if wait_s > 0 else None)
            except TimeoutError:
                raise busy(session_id) from None
            self._counter += 1
            fence = Fence(session_id, str(self._counter))
            self._holders[session_id] = fence.token
            try:
                yield fence
            finally:
                del self._holders[session_id]
                lock.release()
        finally:
            self._users[session_id] -= 1
            if not self._users[session_id]:
                del self._users[session_id], self._locks[session_id]


class LocallyLocked(SessionStore):
    """A store of one gateway process: its turn locks are ``LocalLocks``."""

    def __init__(self) -> None:
        self._locks = LocalLocks()

    def lock(
        self, session_id: str, wait_s: float = 0.0
    ) -> contextlib.AbstractAsyncContextManager[Fence]:
        return self._locks.hold(session_id, wait_s)

    async def locked(self, session_id: str) -> bool:
        return self._locks.locked(session_id)
