"""The Redis session store (``--session-store redis://host:port/db``): sessions shared by
every gateway replica behind one Service.

Keys (``P`` = ``specdec:``): ``P<id>`` a hash of the session's fields and latest
turn; ``P<id>:tokens`` its committed tokens, little-endian int32, appended with
APPEND; ``P<id>:lock`` the turn lock; ``Psessions`` a sorted set of every
session by last use (counting, expiry, the live-session list of KV leases).

The turn lock is ``SET NX PX`` with a random token and a TTL (``LOCK_TTL_S``),
renewed every third of it while the turn runs: a replica that dies holding it
frees it within the TTL, and a turn cut by its death is resumed by another
replica after that. Every append is one Lua script that checks the lock's token
and the committed length before it writes (fencing), so a replica that lost its
lock cannot write. Redis's durability is the server's: run it with
``--appendonly yes`` (the compose file and the manifests do).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from gateway.store.base import (
    Fence,
    SessionRecord,
    SessionStore,
    TurnRecord,
    busy,
    pack_tokens,
    stale,
    unpack_tokens,
)
from specdec.core.errors import FailedPrecondition, Unavailable

log = logging.getLogger(__name__)

PREFIX = "specdec:"
LOCK_TTL_S = 5.0

# KEYS: lock, tokens, hash. ARGV: fence token, base length in bytes, bytes, turn json ("").
_APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local length = redis.call('STRLEN', KEYS[2])
if length ~= tonumber(ARGV[2]) then return length end
if ARGV[3] ~= '' then redis.call('APPEND', KEYS[2], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], 'turn', ARGV[4]) end
return -2
"""
# KEYS: lock, tokens, hash. ARGV: fence token, length in bytes.
_TRUNCATE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local kept = redis.call('GETRANGE', KEYS[2], 0, tonumber(ARGV[2]) - 1)
redis.call('SET', KEYS[2], kept)
redis.call('HDEL', KEYS[3], 'turn')
return 0
"""
# KEYS: lock. ARGV: token, ttl ms.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


def _key(session_id: str, part: str = "") -> str:
    return f"{PREFIX}{session_id}{':' + part if part else ''}"


_INDEX = PREFIX + "sessions"


class RedisStore(SessionStore):
    shared = True

    def __init__(self, url: str, lock_ttl_s: float = LOCK_TTL_S) -> None:
        import redis.asyncio

        self.url = _redacted(url)  # logged and put in errors: no password
        self._redis: Any = redis.asyncio.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=10
        )
        self._lock_ttl_ms = int(lock_ttl_s * 1000)
        self._append = self._redis.register_script(_APPEND)
        self._truncate = self._redis.register_script(_TRUNCATE)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)

    @contextlib.asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """Redis errors as ``Unavailable``: the request can be retried once it is back."""
        import redis.exceptions

        try:
            yield
        except redis.exceptions.RedisError as exc:
            raise Unavailable(f"the session store {self.url} is unreachable: {exc}") from None

    async def ping(self) -> None:
        async with self._call():
            await self._redis.ping()

    async def create(self, record: SessionRecord) -> None:
        fields = _fields(record)
        fields.update(owner=record.owner, ephemeral=int(record.ephemeral))
        fields["created"] = record.created_unix_ms
        async with self._call():
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(_key(record.session_id), mapping=fields)
            pipe.set(_key(record.session_id, "tokens"), pack_tokens(record.tokens))
            pipe.zadd(_INDEX, {record.session_id: record.last_used_unix_ms})
            await pipe.execute()

    async def load(self, session_id: str) -> SessionRecord | None:
        async with self._call():
            pipe = self._redis.pipeline(transaction=True)
            pipe.hgetall(_key(session_id))
            pipe.get(_key(session_id, "tokens"))
            fields, tokens = await pipe.execute()
        if not fields:
            return None
        f = {k.decode(): v.decode() for k, v in fields.items()}
        return SessionRecord(
            session_id,
            f["owner"],
            f["ephemeral"] == "1",
            unpack_tokens(tokens or b""),
            int(f["turns"]),
            f["oracle_id"],
            f["draft_id"],
            int(f["created"]),
            int(f["last_used"]),
            TurnRecord.from_json(f["turn"]) if f.get("turn") else None,
        )

    async def count(self) -> int:
        async with self._call():
            return int(await self._redis.zcard(_INDEX))

    async def append(
        self, fence: Fence, base_length: int, token_ids: Sequence[int], turn: TurnRecord | None
    ) -> None:
        keys = [_key(fence.session_id, "lock"), _key(fence.session_id, "tokens")]
        args: list[str | int | bytes] = [
            fence.token,
            base_length * 4,
            pack_tokens(token_ids),
            turn.to_json() if turn else "",
        ]
        async with self._call():
            result = int(await self._append(keys=[*keys, _key(fence.session_id)], args=args))
        if result == -1:
            raise FailedPrecondition(
                f"session {fence.session_id!r}: this turn's lock expired and another gateway "
                "may have taken the session over"
            )
        if result != -2:
            raise stale(fence.session_id, base_length, result // 4)

    async def truncate(self, fence: Fence, length: int) -> None:
        keys = [_key(fence.session_id, "lock"), _key(fence.session_id, "tokens")]
        async with self._call():
            result = await self._truncate(
                keys=[*keys, _key(fence.session_id)], args=[fence.token, length * 4]
            )
        if int(result) == -1:
            raise FailedPrecondition(f"session {fence.session_id!r}: this turn lost its lock")

    async def update(self, record: SessionRecord) -> None:
        fields = _fields(record)
        async with self._call():
            pipe = self._redis.pipeline(transaction=True)
            pipe.exists(_key(record.session_id))
            pipe.hset(_key(record.session_id), mapping=fields)
            if record.turn is None:
                pipe.hdel(_key(record.session_id), "turn")
            pipe.zadd(_INDEX, {record.session_id: record.last_used_unix_ms}, xx=True)
            existed, *_ = await pipe.execute()
            if not existed:  # deleted meanwhile (closed on another replica): stay deleted
                await self.delete(record.session_id)

    async def delete(self, session_id: str) -> bool:
        async with self._call():
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(_key(session_id), _key(session_id, "tokens"))
            pipe.zrem(_INDEX, session_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def idle(self, cutoff_unix_ms: int) -> list[str]:
        async with self._call():
            ids = await self._redis.zrangebyscore(_INDEX, "-inf", f"({cutoff_unix_ms}")
        return [i.decode() for i in ids]

    async def known(self, session_ids: Iterable[str]) -> set[str]:
        wanted = list(session_ids)
        if not wanted:
            return set()
        async with self._call():
            scores = await self._redis.zmscore(_INDEX, wanted)
        return {i for i, score in zip(wanted, scores, strict=True) if score is not None}

    @contextlib.asynccontextmanager
    async def lock(self, session_id: str, wait_s: float = 0.0) -> AsyncIterator[Fence]:
        key = _key(session_id, "lock")
        token = secrets.token_hex(16)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            async with self._call():
                if await self._redis.set(key, token, nx=True, px=self._lock_ttl_ms):
                    break
            if loop.time() >= deadline:
                raise busy(session_id)
            await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
        renewal = asyncio.create_task(self._keep(key, token))
        try:
            yield Fence(session_id, token)
        finally:
            renewal.cancel()
            with contextlib.suppress(Exception):
                await self._release(keys=[key], args=[token])

    async def _keep(self, key: str, token: str) -> None:
        """Renew the lock every third of its TTL while the turn runs."""
        while True:
            await asyncio.sleep(self._lock_ttl_ms / 3000)
            try:
                if not await self._renew(keys=[key], args=[token, self._lock_ttl_ms]):
                    log.warning("lost the turn lock %s; its next write will be refused", key)
                    return
            except Exception as exc:  # the next write reports the store's failure
                log.warning("could not renew the turn lock %s: %s", key, exc)

    async def locked(self, session_id: str) -> bool:
        async with self._call():
            return bool(await self._redis.exists(_key(session_id, "lock")))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._redis.aclose()


def _fields(record: SessionRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "turns": record.turns,
        "oracle_id": record.oracle_id,
        "draft_id": record.draft_id,
        "last_used": record.last_used_unix_ms,
    }
    if record.turn is not None:
        fields["turn"] = record.turn.to_json()
    return fields


def _redacted(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
